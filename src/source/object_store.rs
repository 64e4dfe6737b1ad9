//! Object-store source: lists shards under a prefix and streams them through the tar reader.

use super::config::{ObjectStoreSourceConfig, SourceMode};
use super::webdataset::{read_shard, ReadOptions, ShardEnd, TransportFault};
use super::{DataMetrics, RejectReason, RejectedRecord, SourceError, SourceItem, SourceState};
use crate::record::Position;
use futures::{StreamExt, TryStreamExt};
use object_store::{path::Path, ObjectStore};
use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tokio_util::sync::CancellationToken;

/// While the store cannot be reached, it is probed at most this far apart (the retry backoff
/// otherwise doubles to 30 s, which would leave the source idle long after the store is back).
const OUTAGE_PROBE_MAX: Duration = Duration::from_secs(5);

/// True when `e` says the store could not be reached at all (connection refused or reset,
/// timed out, the request not sent): an outage of the server or the network, not a problem of
/// the object. object_store has already retried such errors by then.
pub fn store_unreachable(e: &object_store::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::NotConnected
                    | K::BrokenPipe
                    | K::TimedOut
                    | K::UnexpectedEof
                    | K::AddrNotAvailable
                    | K::HostUnreachable
                    | K::NetworkUnreachable
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    // object_store's transport errors (as opposed to error statuses the server answered with)
    // read "HTTP error: ..." in its retry error's text; their io cause is not always chained.
    e.to_string().contains("HTTP error:")
}

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

/// The rank of `ranks` that reads the shard `name` in `follow` mode: FNV-1a of the name
/// modulo `ranks`. Stable while the listing grows, and the same on every rank and every
/// restart with the same number of ranks.
pub fn shard_rank(name: &str, ranks: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % ranks.max(1) as u64) as usize
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
        if let Some((rank, ranks)) = self.cfg.rank_split.filter(|&(_, n)| n > 1) {
            // This rank's part: every shard is read by exactly one rank.
            names = match self.cfg.mode {
                // The listing grows while the run reads it: a shard's place in it moves when
                // a name sorting before it appears, so the split follows the name alone.
                SourceMode::Follow => names
                    .into_iter()
                    .filter(|(n, _)| shard_rank(n, ranks) == rank)
                    .collect(),
                // A listing fixed for the pass: every rank-th shard, so the parts differ by
                // one shard at most and the ranks' batches interleave in listing order. In
                // `loop` mode each rank lists at the start of its own pass: a shard added in
                // between may be read by two ranks, or none, in that one pass.
                _ => names
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| i % ranks == rank)
                    .map(|(_, n)| n)
                    .collect(),
            };
        }
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
                let mut warned_empty = false;
                while passes.is_none_or(|n| state.pass < n) {
                    let Some(shards) = self.list_retrying(&cancel).await else {
                        return;
                    };
                    // A wrong URL lists nothing: say so once per empty streak rather than
                    // wait (or end) without a word.
                    if shards.is_empty() && !warned_empty {
                        tracing::warn!(
                            url = %self.cfg.url,
                            "no shards (*.tar, *.tar.gz, *.tgz) under this URL: nothing to read \
                             (check the path, or make shards with `odcd shards import-idx`)"
                        );
                    }
                    warned_empty = shards.is_empty();
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

    /// List with retries; `None` when cancelled or still failing (logged). A store that cannot
    /// be reached is waited for without limit (an outage is not the end of the data): the
    /// source reports it ([`DataMetrics::set_store_error`]) and probes every few seconds.
    async fn list_retrying(&self, cancel: &CancellationToken) -> Option<Vec<(String, u64)>> {
        let mut attempt = 0;
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            match self.list_shard_sizes().await {
                Ok(s) => {
                    self.store_reachable();
                    return Some(s);
                }
                Err(e) => {
                    let unreachable = match &e {
                        SourceError::List { source, .. } => store_unreachable(source),
                        _ => false,
                    };
                    if unreachable {
                        self.store_down(&e.to_string());
                    } else if attempt >= self.cfg.max_retries {
                        tracing::error!("{e}; giving up on this listing");
                        return None;
                    } else {
                        tracing::warn!(attempt, "{e}; retrying");
                    }
                    if let Some(m) = &self.metrics {
                        m.retries.inc();
                    }
                    let pause = self.backoff(attempt);
                    let pause = if unreachable {
                        pause.min(OUTAGE_PROBE_MAX)
                    } else {
                        pause
                    };
                    if !self.sleep(pause, cancel).await {
                        return None;
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// The store could not be reached: report it (once per outage in the log).
    fn store_down(&self, message: &str) {
        let first = self
            .metrics
            .as_ref()
            .is_none_or(|m| m.store_error().is_none());
        if first {
            tracing::error!(
                url = %self.cfg.url,
                "the source's object store cannot be reached ({message}); waiting for it, \
                 retrying every few seconds"
            );
        }
        if let Some(m) = &self.metrics {
            m.set_store_error(Some(message.to_string()));
        }
    }

    /// The store answered: clear an outage report.
    fn store_reachable(&self) {
        if let Some(m) = &self.metrics {
            if m.store_error().is_some() {
                tracing::info!(url = %self.cfg.url, "the source's object store is reachable again");
                m.set_store_error(None);
            }
        }
    }

    /// After a shard's retries ran out: wait while the store itself cannot be reached (the
    /// shard is not at fault then). Returns `Break` when cancelled, `Continue(true)` when the
    /// store was down and is back (retry the shard afresh), `Continue(false)` when the store
    /// answers (the shard itself fails: skip it).
    async fn wait_out_outage(
        &self,
        shard: &str,
        message: &str,
        cancel: &CancellationToken,
    ) -> ControlFlow<(), bool> {
        let path = Path::from(shard);
        let mut was_down = false;
        loop {
            let probe = tokio::select! {
                _ = cancel.cancelled() => return ControlFlow::Break(()),
                r = self.store.head(&path) => r,
            };
            match probe {
                Err(e) if store_unreachable(&e) => {
                    was_down = true;
                    self.store_down(&format!("reading shard {shard}: {message}; probe: {e}"));
                    if let Some(m) = &self.metrics {
                        m.retries.inc();
                    }
                    if !self.sleep(OUTAGE_PROBE_MAX, cancel).await {
                        return ControlFlow::Break(());
                    }
                }
                _ => {
                    self.store_reachable();
                    return ControlFlow::Continue(was_down);
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
            let down = Arc::new(AtomicBool::new(false));
            match self.read_once(shard, delivered, tx, cancel, &down).await {
                ShardEnd::Done { .. } => {
                    self.store_reachable();
                    if let Some(m) = &self.metrics {
                        m.shards_read.inc();
                    }
                    return ControlFlow::Continue(());
                }
                ShardEnd::Stopped { .. } => return ControlFlow::Break(()),
                ShardEnd::Transport { items, message } => {
                    delivered = delivered.max(items);
                    // A failure that looks like the store's outage, and any failure once the
                    // shard's retries are spent, first asks whether the store answers at all:
                    // while it does not, the shard is not at fault and is waited for.
                    if down.load(Ordering::Relaxed) || attempt >= self.cfg.max_retries {
                        match self.wait_out_outage(shard, &message, cancel).await {
                            ControlFlow::Break(()) => return ControlFlow::Break(()),
                            ControlFlow::Continue(true) => {
                                // The failures were the store's outage: the shard gets its
                                // retries afresh.
                                attempt = 0;
                                continue;
                            }
                            ControlFlow::Continue(false) => {}
                        }
                    }
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
        down: &Arc<AtomicBool>,
    ) -> ShardEnd {
        let path = Path::from(shard);
        let got = tokio::select! {
            _ = cancel.cancelled() => return ShardEnd::Stopped { items: skip },
            r = self.store.get(&path) => r,
        };
        if let Err(e) = &got {
            down.store(store_unreachable(e), Ordering::Relaxed);
        }
        let get = match got {
            Ok(g) => {
                self.store_reachable();
                g
            }
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
        let down_in = down.clone();
        let bytes = Box::pin(
            get.into_stream()
                .map_err(move |e| {
                    down_in.store(store_unreachable(&e), Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::{aws::AmazonS3Builder, BackoffConfig, RetryConfig};

    /// `follow` mode with 2 ranks: the two parts split the listing, and a shard whose name
    /// sorts first leaves every other shard with the rank that already had it.
    #[tokio::test]
    async fn follow_mode_splits_shards_by_name_and_keeps_the_split_as_the_listing_grows() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str| std::fs::write(dir.path().join(name), b"").unwrap();
        for i in 1..=9 {
            put(&format!("s-{i:03}.tar"));
        }
        let url = format!("file://{}/", dir.path().display());
        let part = |rank: usize| {
            let mut cfg = ObjectStoreSourceConfig::new(url.clone());
            cfg.mode = SourceMode::Follow;
            cfg.rank_split = Some((rank, 2));
            ObjectStoreSource::from_config(cfg).unwrap()
        };
        let (a, b) = (part(0), part(1));
        let (a1, b1) = (
            a.list_shards().await.unwrap(),
            b.list_shards().await.unwrap(),
        );
        assert_eq!(a1.len() + b1.len(), 9);
        assert!(a1.iter().all(|n| !b1.contains(n)), "{a1:?} / {b1:?}");
        put("s-000.tar");
        let (a2, b2) = (
            a.list_shards().await.unwrap(),
            b.list_shards().await.unwrap(),
        );
        assert_eq!(a2.len() + b2.len(), 10);
        assert!(a1.iter().all(|n| a2.contains(n)), "{a1:?} -> {a2:?}");
        assert!(b1.iter().all(|n| b2.contains(n)), "{b1:?} -> {b2:?}");
    }

    /// An S3 endpoint nobody listens on is an outage of the store; a missing object in a store
    /// that answers is not.
    #[tokio::test]
    async fn a_refused_connection_is_an_unreachable_store_and_a_missing_object_is_not() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let down = AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_bucket_name("b")
            .with_region("us-east-1")
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 0,
                retry_timeout: Duration::from_secs(1),
            })
            .build()
            .unwrap();
        let e = down.head(&Path::from("x.tar")).await.unwrap_err();
        assert!(store_unreachable(&e), "{e}");
        let e = down.list(None).try_collect::<Vec<_>>().await.unwrap_err();
        assert!(store_unreachable(&e), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let e = local.head(&Path::from("x.tar")).await.unwrap_err();
        assert!(!store_unreachable(&e), "{e}");
    }
}
