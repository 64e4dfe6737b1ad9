//! Object-store source: lists shards under a prefix and streams them through the tar reader.

use super::config::{ObjectStoreSourceConfig, SourceMode};
use super::webdataset::{read_shard, ReadOptions, ShardEnd, TransportFault};
use super::{DataMetrics, RejectReason, RejectedRecord, SourceError, SourceItem, SourceState};
use crate::record::Position;
use futures::{StreamExt, TryStreamExt};
use object_store::{path::Path, ObjectStore};
use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tokio_util::sync::CancellationToken;

/// True for the object names the source reads.
pub fn is_shard_name(name: &str) -> bool {
    name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// A source over the WebDataset shards under one object-store prefix.
#[derive(Clone)]
pub struct ObjectStoreSource {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    cfg: ObjectStoreSourceConfig,
    metrics: Option<DataMetrics>,
}

impl ObjectStoreSource {
    /// Open the store named by `cfg.url` (environment credentials + `cfg.options`).
    pub fn from_config(cfg: ObjectStoreSourceConfig) -> Result<Self, SourceError> {
        let (store, prefix) =
            crate::store::open_store(&cfg.url, &cfg.options).map_err(|e| SourceError::BadUrl {
                url: cfg.url.clone(),
                message: e.to_string(),
            })?;
        Ok(Self::with_store(store, prefix, cfg))
    }

    /// Use an already built store (tests, `LimitStore`-wrapped stores, shared clients);
    /// `cfg.url` and `cfg.options` are then only informative.
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        cfg: ObjectStoreSourceConfig,
    ) -> Self {
        ObjectStoreSource {
            store,
            prefix,
            cfg,
            metrics: None,
        }
    }

    /// Count records read, retries and shards on these metrics.
    pub fn with_metrics(mut self, metrics: DataMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The shards under the prefix, in lexicographic order.
    /// A prefix that itself names a shard is that one shard.
    pub async fn list_shards(&self) -> Result<Vec<String>, SourceError> {
        Ok(self
            .list_shard_sizes()
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// [`Self::list_shards`] with each shard's size in bytes (0 when the prefix names the shard).
    pub async fn list_shard_sizes(&self) -> Result<Vec<(String, u64)>, SourceError> {
        if is_shard_name(self.prefix.as_ref()) {
            return Ok(vec![(self.prefix.to_string(), 0)]);
        }
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let metas: Vec<_> = self
            .store
            .list(prefix)
            .try_collect()
            .await
            .map_err(|source| SourceError::List {
                prefix: self.prefix.to_string(),
                source,
            })?;
        let mut names: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| (m.location.to_string(), m.size))
            .filter(|(n, _)| is_shard_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Start reading on the current tokio runtime, resuming after `resume`. Items arrive on the
    /// returned bounded receiver; the task ends at the end of the data, when `cancel` fires or
    /// when the receiver is dropped.
    pub fn spawn(
        self,
        resume: SourceState,
        cancel: CancellationToken,
    ) -> mpsc::Receiver<SourceItem> {
        let (tx, rx) = mpsc::channel(self.cfg.channel_capacity.max(1));
        tokio::spawn(async move { self.run(resume, tx, cancel).await });
        rx
    }

    async fn run(
        self,
        mut state: SourceState,
        tx: mpsc::Sender<SourceItem>,
        cancel: CancellationToken,
    ) {
        let poll = Duration::from_millis(self.cfg.poll_interval_ms.max(1));
        match self.cfg.mode.clone() {
            SourceMode::Once | SourceMode::Loop { .. } => {
                let passes = match self.cfg.mode {
                    SourceMode::Loop { passes } => passes,
                    _ => Some(1),
                };
                while passes.is_none_or(|n| state.pass < n) {
                    let Some(shards) = self.list_retrying(&cancel).await else {
                        return;
                    };
                    let mut lag = Lag::new(
                        self.metrics.as_ref(),
                        shards.iter().filter(|(s, _)| state.skip_for(s).is_some()),
                    );
                    for (shard, size) in &shards {
                        let Some(skip) = state.skip_for(shard) else {
                            continue;
                        };
                        if self
                            .read_retrying(shard, skip, &tx, &cancel)
                            .await
                            .is_break()
                        {
                            return;
                        }
                        lag.done(*size);
                    }
                    state.pass += 1;
                    state.completed.clear();
                    state.current = None;
                    if shards.is_empty() && !self.sleep(poll, &cancel).await {
                        return; // nothing to loop over yet: do not spin
                    }
                }
            }
            SourceMode::Follow => {
                let mut seen: BTreeSet<String> = state.completed.clone();
                loop {
                    if let Some(shards) = self.list_retrying(&cancel).await {
                        let mut lag = Lag::new(
                            self.metrics.as_ref(),
                            shards.iter().filter(|(s, _)| !seen.contains(s)),
                        );
                        for (shard, size) in shards {
                            if seen.contains(&shard) {
                                continue;
                            }
                            let skip = state.skip_for(&shard).unwrap_or(0);
                            if self
                                .read_retrying(&shard, skip, &tx, &cancel)
                                .await
                                .is_break()
                            {
                                return;
                            }
                            seen.insert(shard);
                            lag.done(size);
                        }
                    }
                    if !self.sleep(poll, &cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleep unless cancelled; false when cancelled.
    async fn sleep(&self, d: Duration, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let ms = self
            .cfg
            .retry_backoff_ms
            .saturating_mul(1u64 << attempt.min(16));
        Duration::from_millis(ms.min(30_000))
    }

    /// List with retries; `None` when cancelled or still failing (logged).
    async fn list_retrying(&self, cancel: &CancellationToken) -> Option<Vec<(String, u64)>> {
        let mut attempt = 0;
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            match self.list_shard_sizes().await {
                Ok(s) => return Some(s),
                Err(e) if attempt < self.cfg.max_retries => {
                    tracing::warn!(attempt, "{e}; retrying");
                    if let Some(m) = &self.metrics {
                        m.retries.inc();
                    }
                    if !self.sleep(self.backoff(attempt), cancel).await {
                        return None;
                    }
                    attempt += 1;
                }
                Err(e) => {
                    tracing::error!("{e}; giving up on this listing");
                    return None;
                }
            }
        }
    }

    /// Read one shard, retrying transport failures and skipping what was already delivered.
    async fn read_retrying(
        &self,
        shard: &str,
        skip: u64,
        tx: &mpsc::Sender<SourceItem>,
        cancel: &CancellationToken,
    ) -> ControlFlow<()> {
        let mut delivered = skip;
        let mut attempt = 0;
        loop {
            match self.read_once(shard, delivered, tx, cancel).await {
                ShardEnd::Done { .. } => {
                    if let Some(m) = &self.metrics {
                        m.shards_read.inc();
                    }
                    return ControlFlow::Continue(());
                }
                ShardEnd::Stopped { .. } => return ControlFlow::Break(()),
                ShardEnd::Transport { items, message } => {
                    delivered = delivered.max(items);
                    if attempt >= self.cfg.max_retries {
                        let item = Err(RejectedRecord {
                            key: shard.to_string(),
                            reason: RejectReason::ReadError,
                            message: format!(
                                "shard {shard} could not be read after {} retries ({message}); \
                                 skipped from record {delivered}",
                                self.cfg.max_retries
                            ),
                            position: Position::Shard {
                                shard: shard.to_string(),
                                index: delivered,
                            },
                            payload: None,
                            format: None,
                        });
                        return send(tx, cancel, item).await;
                    }
                    tracing::warn!(shard, attempt, "reading shard failed: {message}; retrying");
                    if let Some(m) = &self.metrics {
                        m.retries.inc();
                    }
                    if !self.sleep(self.backoff(attempt), cancel).await {
                        return ControlFlow::Break(());
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One streamed read of `shard`: GET → StreamReader → SyncIoBridge → tar on a blocking thread.
    async fn read_once(
        &self,
        shard: &str,
        skip: u64,
        tx: &mpsc::Sender<SourceItem>,
        cancel: &CancellationToken,
    ) -> ShardEnd {
        let path = Path::from(shard);
        let got = tokio::select! {
            _ = cancel.cancelled() => return ShardEnd::Stopped { items: skip },
            r = self.store.get(&path) => r,
        };
        let get = match got {
            Ok(g) => g,
            // NotFound is retried too: after a successful listing it is as likely a restarted or
            // failing-over server as a deletion; a shard that stays gone is reported after retries.
            Err(object_store::Error::NotFound { .. }) => {
                return ShardEnd::Transport {
                    items: skip,
                    message: format!("shard {shard} not found (deleted after listing?)"),
                }
            }
            Err(e) => {
                return ShardEnd::Transport {
                    items: skip,
                    message: e.to_string(),
                }
            }
        };
        let fault = TransportFault::default();
        let fault_in = fault.clone();
        let bytes = Box::pin(
            get.into_stream()
                .map_err(move |e| {
                    fault_in.set(e.to_string());
                    std::io::Error::other(e)
                })
                // Cancellation ends the byte stream so a stalled read cannot pin the thread.
                .take_until(cancel.clone().cancelled_owned()),
        );
        let reader = SyncIoBridge::new(StreamReader::new(bytes));
        let handle = tokio::runtime::Handle::current();
        let (tx, cancel) = (tx.clone(), cancel.clone());
        let shard_name = shard.to_string();
        let opts = ReadOptions {
            max_member_bytes: self.cfg.max_member_bytes,
        };
        let metrics = self.metrics.clone();
        let res = tokio::task::spawn_blocking(move || {
            read_shard(reader, &shard_name, &opts, &fault, |item| {
                let index = match &item {
                    Ok(r) => index_of(&r.position),
                    Err(r) => index_of(&r.position),
                };
                if index < skip {
                    return ControlFlow::Continue(()); // consumed before the resume/retry
                }
                if let Some(m) = &metrics {
                    m.records_read.inc();
                }
                handle.block_on(send(&tx, &cancel, item))
            })
        })
        .await;
        match res {
            Ok(end) => end,
            Err(e) => ShardEnd::Transport {
                items: skip,
                message: format!("reader thread failed: {e}"),
            },
        }
    }
}

/// The source-lag gauges over one listing: what is still to read of it.
struct Lag<'a> {
    metrics: Option<&'a DataMetrics>,
}

impl<'a> Lag<'a> {
    fn new<'s>(
        metrics: Option<&'a DataMetrics>,
        pending: impl Iterator<Item = &'s (String, u64)>,
    ) -> Self {
        if let Some(m) = metrics {
            let (n, bytes) = pending.fold((0i64, 0i64), |(n, b), (_, size)| {
                (
                    n + 1,
                    b.saturating_add(i64::try_from(*size).unwrap_or(i64::MAX)),
                )
            });
            m.lag_shards.set(n);
            m.lag_bytes.set(bytes);
        }
        Lag { metrics }
    }

    fn done(&mut self, size: u64) {
        if let Some(m) = self.metrics {
            m.lag_shards.dec();
            m.lag_bytes.sub(
                i64::try_from(size)
                    .unwrap_or(i64::MAX)
                    .min(m.lag_bytes.get()),
            );
        }
    }
}

fn index_of(p: &Position) -> u64 {
    match p {
        Position::Shard { index, .. } => *index,
        Position::Kafka { .. } => 0,
    }
}

/// Send unless cancelled or the receiver is gone (backpressure: waits while the channel is full).
async fn send(
    tx: &mpsc::Sender<SourceItem>,
    cancel: &CancellationToken,
    item: SourceItem,
) -> ControlFlow<()> {
    if cancel.is_cancelled() {
        return ControlFlow::Break(());
    }
    tokio::select! {
        _ = cancel.cancelled() => ControlFlow::Break(()),
        r = tx.send(item) => if r.is_ok() { ControlFlow::Continue(()) } else { ControlFlow::Break(()) },
    }
}
