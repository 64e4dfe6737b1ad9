//! Embeddings to Parquet files on an object store (`file://`, `s3://`, `gs://`, `az://`,
//! `memory://`).
//!
//! Schema (one row per sample):
//!
//! | column          | Arrow type                     | nullable | meaning                          |
//! |-----------------|--------------------------------|----------|----------------------------------|
//! | `key`           | Utf8                           | no       | sample key                       |
//! | `step`          | UInt64                         | no       | training step of the embedding   |
//! | `model_version` | Utf8                           | no       | e.g. `step-000000001234`         |
//! | `cluster`       | UInt32                         | yes      | ODC label (null without memory)  |
//! | `class_label`   | Int64                          | yes      | `.cls` label when present        |
//! | `embedding`     | FixedSizeList<Float32, D>      | no       | the feature vector               |
//!
//! Files are `<url>/<file_prefix>-<first_step:012>-<seq:06>-<unique>.parquet`, so names sort
//! by time. A file is written through object_store's `BufWriter` (a single PUT, or a
//! multipart upload for big files) and becomes visible under its final name only when it is
//! closed: readers globbing `*.parquet` never see a partial file. On local disk the object
//! store writes to a staging name (`<name>#<n>`) and renames it on completion.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow_array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, StringArray, UInt32Array,
    UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use object_store::path::Path;
use object_store::ObjectStore;
use parquet::arrow::async_writer::ParquetObjectWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

/// Compression codec of the Parquet column chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ParquetCompression {
    /// No compression.
    None,
    /// Snappy (fast; read by every Parquet reader).
    #[default]
    Snappy,
}

/// Parquet embeddings sink configuration (`[sink.parquet]` in the daemon config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSinkConfig {
    /// Publish the current file once it holds this many rows; a batch is split across files
    /// so no file holds more. Default 1,000,000.
    #[serde(default = "default_max_rows_per_file")]
    pub max_rows_per_file: usize,
    /// Publish the current file once it is this old (seconds since its first row), checked
    /// on every write and by [`ParquetSink::flush_if_older`]; 0 = no age limit. Default 300.
    #[serde(default = "default_max_file_age_secs")]
    pub max_file_age_secs: u64,
    /// Start of every file name, before `-<first_step:012>-<seq:06>-<unique>.parquet`. May
    /// contain `/` to write into a sub-folder of the URL. Default `part`.
    #[serde(default = "default_file_prefix")]
    pub file_prefix: String,
    /// `snappy` (default) or `none`.
    #[serde(default)]
    pub compression: ParquetCompression,
    /// Rows per Parquet row group: the writer buffers one row group in memory
    /// (rows × D × 4 bytes), so keep it moderate. Default 16,384.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
}

fn default_max_rows_per_file() -> usize {
    1_000_000
}
fn default_max_file_age_secs() -> u64 {
    300
}
fn default_file_prefix() -> String {
    "part".to_string()
}
fn default_row_group_rows() -> usize {
    16_384
}

impl Default for ParquetSinkConfig {
    fn default() -> Self {
        ParquetSinkConfig {
            max_rows_per_file: default_max_rows_per_file(),
            max_file_age_secs: default_max_file_age_secs(),
            file_prefix: default_file_prefix(),
            compression: ParquetCompression::default(),
            row_group_rows: default_row_group_rows(),
        }
    }
}

use crate::validate::FieldError;

impl ParquetSinkConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        let bad = |field: &str, message: &str| {
            Err(FieldError::new(
                format!("embeddings.parquet.{field}"),
                message,
            ))
        };
        if self.max_rows_per_file == 0 {
            return bad("max_rows_per_file", "must be at least 1");
        }
        if self.row_group_rows == 0 {
            return bad("row_group_rows", "must be at least 1");
        }
        let segs: Vec<&str> = self.file_prefix.split('/').collect();
        if segs
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains('#'))
        {
            return bad(
                "file_prefix",
                "must be non-empty path segments separated by `/`, without `.`, `..` or `#`",
            );
        }
        Ok(())
    }
}

/// Embeddings of one batch of samples (row-major `embeddings`, `keys.len()` × `dim`).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingBatch {
    pub keys: Vec<String>,
    pub step: u64,
    pub model_version: String,
    /// Per row; `None` when the run has no ODC memory (inference).
    pub clusters: Vec<Option<u32>>,
    /// Per row; `None` when the sample has no `.cls`.
    pub class_labels: Vec<Option<i64>>,
    pub dim: usize,
    pub embeddings: Vec<f32>,
}

impl EmbeddingBatch {
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Sink errors; each names the store URL or file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("parquet sink URL `{url}` is not usable: {message} (use file:///abs/path, s3://bucket/prefix, gs://..., az://... or a local path)")]
    BadUrl { url: String, message: String },
    #[error(transparent)]
    Config(#[from] FieldError),
    #[error("kafka sink, topic `{topic}`: {message}")]
    Kafka { topic: String, message: String },
    #[error("parquet sink: bad embedding batch: {0}")]
    BadBatch(String),
    #[error("parquet sink `{url}`: cannot write `{file}`: {message} (the file's rows are kept and written again into a new file on the next attempt; check that the location is writable)")]
    Write {
        url: String,
        file: String,
        message: String,
    },
}

impl SinkError {
    /// Whether trying again may succeed (a store or broker failure), as opposed to a batch or
    /// config that can never be written.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Write { .. } | SinkError::Kafka { .. })
    }
}

/// Counters for the daemon's metrics (read with `load(Ordering::Relaxed)`).
#[derive(Debug, Default)]
pub struct SinkMetrics {
    /// Rows accepted by the sink.
    pub rows_written: AtomicU64,
    /// Rows in published files.
    pub rows_published: AtomicU64,
    /// Files published (closed under their final name).
    pub files_published: AtomicU64,
    /// Bytes of published files.
    pub bytes_published: AtomicU64,
    /// Failed writes / publishes (each abandons the current file; its rows are kept).
    pub errors: AtomicU64,
    /// Attempts repeated after a failed write or publish (any sink of an [`super::EmbeddingSinks`]).
    pub retries: AtomicU64,
    /// The error of the last failed attempt, cleared by the next success: what `/readyz` and a
    /// failed checkpoint name while a sink holds the checkpoint barrier.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl SinkMetrics {
    /// The error of the last failed attempt, if the sink has not succeeded since.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
}

/// Rows `range` of a batch. Batches are shared: one may be split across two files.
struct Rows {
    batch: Arc<EmbeddingBatch>,
    range: std::ops::Range<usize>,
}

struct OpenFile {
    writer: AsyncArrowWriter<ParquetObjectWriter>,
    name: String,
    rows: usize,
    opened: Instant,
}

/// Writes [`EmbeddingBatch`]es into rolling Parquet files. Call [`ParquetSink::flush`] or
/// [`ParquetSink::close`] at shutdown, or the rows of the open file are lost (nothing partial
/// is ever published).
///
/// Every accepted row stays in memory until the file holding it is published: a failed write
/// or publish abandons the file, and the next call writes its rows again into a new file, so a
/// failure loses nothing. The memory is bounded by the open file (`max_rows_per_file`, its age
/// limit, and the checkpoint barrier of `odcd run`, which publishes it at every checkpoint).
pub struct ParquetSink {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    cfg: ParquetSinkConfig,
    /// Fixed by the first batch.
    dim: Option<usize>,
    schema: Option<SchemaRef>,
    seq: u64,
    unique: String,
    current: Option<OpenFile>,
    /// Rows in the open file, kept until it is published.
    held: Vec<Rows>,
    /// Rows accepted and in no file yet (after a failure, the abandoned file's rows first).
    queued: std::collections::VecDeque<Rows>,
    metrics: Arc<SinkMetrics>,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

impl ParquetSink {
    /// Opens the sink at `url` (a plain local path is accepted too). `options` override the
    /// `AWS_*` / `GOOGLE_*` / `AZURE_*` environment variables. Nothing is written yet.
    pub fn open(
        url: &str,
        options: &BTreeMap<String, String>,
        cfg: ParquetSinkConfig,
    ) -> Result<Self, SinkError> {
        cfg.validate()?;
        let url =
            crate::store::local_path_to_url(url, "sink.url").map_err(|e| SinkError::BadUrl {
                url: url.to_string(),
                message: e.to_string(),
            })?;
        let (store, prefix) =
            crate::store::open_store(&url, options).map_err(|e| SinkError::BadUrl {
                url: url.clone(),
                message: e.to_string(),
            })?;
        Self::with_store(&url, store, prefix, cfg)
    }

    /// The sink on an already opened `store` under `prefix`; `url` names it in errors and logs.
    /// [`ParquetSink::open`] builds the store from a URL; a test wraps a real store here.
    pub fn with_store(
        url: &str,
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        cfg: ParquetSinkConfig,
    ) -> Result<Self, SinkError> {
        cfg.validate()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let unique = format!("{nanos:016x}{:04x}{n:04x}", std::process::id() & 0xffff);
        Ok(ParquetSink {
            url: url.to_string(),
            store,
            prefix,
            cfg,
            dim: None,
            schema: None,
            seq: 0,
            unique,
            current: None,
            held: Vec::new(),
            queued: Default::default(),
            metrics: Arc::new(SinkMetrics::default()),
        })
    }

    /// The Arrow schema of the files for embeddings of length `dim`.
    pub fn schema_for(dim: usize) -> Result<SchemaRef, SinkError> {
        let d = i32::try_from(dim)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| SinkError::BadBatch(format!("dim {dim} must be in 1..=i32::MAX")))?;
        Ok(Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("step", DataType::UInt64, false),
            Field::new("model_version", DataType::Utf8, false),
            Field::new("cluster", DataType::UInt32, true),
            Field::new("class_label", DataType::Int64, true),
            Field::new(
                "embedding",
                DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), d),
                false,
            ),
        ])))
    }

    pub fn metrics(&self) -> Arc<SinkMetrics> {
        self.metrics.clone()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Rows in the file being written (not yet published).
    pub fn pending_rows(&self) -> usize {
        self.current.as_ref().map_or(0, |f| f.rows)
    }

    /// Rows accepted and not yet in a published file (the open file's and those waiting to be
    /// written again after a failure).
    pub fn unpublished_rows(&self) -> usize {
        self.held
            .iter()
            .chain(&self.queued)
            .map(|r| r.range.len())
            .sum()
    }

    fn write_err(&self, file: &str, e: impl std::fmt::Display) -> SinkError {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        SinkError::Write {
            url: self.url.clone(),
            file: file.to_string(),
            message: e.to_string(),
        }
    }

    fn check(&self, b: &EmbeddingBatch) -> Result<(), SinkError> {
        let n = b.keys.len();
        if b.clusters.len() != n || b.class_labels.len() != n {
            return Err(SinkError::BadBatch(format!(
                "{n} keys but {} clusters and {} class labels",
                b.clusters.len(),
                b.class_labels.len()
            )));
        }
        if Some(b.embeddings.len()) != n.checked_mul(b.dim) {
            return Err(SinkError::BadBatch(format!(
                "{} embedding values for {n} rows of dim {}",
                b.embeddings.len(),
                b.dim
            )));
        }
        if let Some(d) = self.dim {
            if d != b.dim {
                return Err(SinkError::BadBatch(format!(
                    "dim {} differs from this sink's dim {d}",
                    b.dim
                )));
            }
        }
        Ok(())
    }

    fn record_batch(
        schema: &SchemaRef,
        b: &EmbeddingBatch,
        range: std::ops::Range<usize>,
    ) -> Result<RecordBatch, SinkError> {
        let n = range.len();
        let d = b.dim;
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values = Float32Array::from(b.embeddings[range.start * d..range.end * d].to_vec());
        let emb = FixedSizeListArray::try_new(item, d as i32, Arc::new(values), None)
            .map_err(|e| SinkError::BadBatch(e.to_string()))?;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(&b.keys[range.clone()])),
            Arc::new(UInt64Array::from(vec![b.step; n])),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                b.model_version.as_str(),
                n,
            ))),
            Arc::new(UInt32Array::from(b.clusters[range.clone()].to_vec())),
            Arc::new(Int64Array::from(b.class_labels[range].to_vec())),
            Arc::new(emb),
        ];
        RecordBatch::try_new(schema.clone(), cols).map_err(|e| SinkError::BadBatch(e.to_string()))
    }

    fn open_file(&mut self, first_step: u64, schema: &SchemaRef) -> Result<(), SinkError> {
        let name = format!(
            "{}-{first_step:012}-{:06}-{}.parquet",
            self.cfg.file_prefix, self.seq, self.unique
        );
        self.seq += 1;
        let mut path = self.prefix.clone();
        for seg in name.split('/') {
            path = path.child(seg);
        }
        let compression = match self.cfg.compression {
            ParquetCompression::None => Compression::UNCOMPRESSED,
            ParquetCompression::Snappy => Compression::SNAPPY,
        };
        let props = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_size(self.cfg.row_group_rows)
            .set_created_by(format!("odcd {}", env!("CARGO_PKG_VERSION")))
            .build();
        let obj = ParquetObjectWriter::new(self.store.clone(), path);
        let writer = AsyncArrowWriter::try_new(obj, schema.clone(), Some(props))
            .map_err(|e| self.write_err(&name, e))?;
        self.current = Some(OpenFile {
            writer,
            name,
            rows: 0,
            opened: Instant::now(),
        });
        Ok(())
    }

    /// Abandons the open file after a failed write: aborts its upload so nothing is
    /// published (safe: the writer has not been shut down yet); its rows go back to the front
    /// of the queue.
    async fn abandon(&mut self) {
        if let Some(f) = self.current.take() {
            let _ = f.writer.into_inner().into_inner().abort().await;
        }
        self.requeue_held();
    }

    /// The open file's rows back to the front of the queue, in order, to be written again.
    fn requeue_held(&mut self) {
        for r in self.held.drain(..).rev() {
            self.queued.push_front(r);
        }
    }

    /// Accepts the rows of `rows` and writes them; publishes the current file when it reaches
    /// `max_rows_per_file` rows or `max_file_age_secs`. A batch that can never be written (bad
    /// shape) is refused as [`SinkError::BadBatch`]. Once accepted, rows are never dropped: on a
    /// write or publish error the open file is abandoned, its rows kept, and the error
    /// returned; [`ParquetSink::resume`] (or any later call) writes them again into a new file.
    pub async fn write(&mut self, rows: EmbeddingBatch) -> Result<(), SinkError> {
        self.check(&rows)?;
        if rows.is_empty() {
            return Ok(());
        }
        if self.schema.is_none() {
            self.schema = Some(Self::schema_for(rows.dim)?);
            self.dim = Some(rows.dim);
        }
        let n = rows.len();
        self.metrics
            .rows_written
            .fetch_add(n as u64, Ordering::Relaxed);
        self.queued.push_back(Rows {
            batch: Arc::new(rows),
            range: 0..n,
        });
        self.resume().await
    }

    /// Writes the rows waiting after a failure (if any) and publishes the open file if it is
    /// older than `max_file_age_secs`: the retry of a failed [`ParquetSink::write`].
    pub async fn resume(&mut self) -> Result<(), SinkError> {
        self.drain().await?;
        self.flush_if_older(self.cfg.max_file_age_secs).await?;
        Ok(())
    }

    /// Writes the queued rows into files, publishing each file as it fills.
    async fn drain(&mut self) -> Result<(), SinkError> {
        let Some(schema) = self.schema.clone() else {
            return Ok(()); // nothing was ever accepted
        };
        while let Some((batch, range)) = self
            .queued
            .front()
            .map(|f| (f.batch.clone(), f.range.clone()))
        {
            let start = range.start;
            if self.current.is_none() {
                self.open_file(batch.step, &schema)?;
            }
            let room = self.cfg.max_rows_per_file - self.pending_rows();
            let end = range.end.min(start + room);
            let rb = Self::record_batch(&schema, &batch, start..end)?;
            let Some(f) = self.current.as_mut() else {
                return Err(self.write_err("(no open file)", "internal: no open file"));
            };
            if let Err(e) = f.writer.write(&rb).await {
                let name = f.name.clone();
                let err = self.write_err(&name, e);
                self.abandon().await;
                return Err(err);
            }
            f.rows += end - start;
            self.held.push(Rows {
                batch,
                range: start..end,
            });
            match self.queued.front_mut() {
                Some(front) if end < front.range.end => front.range.start = end,
                _ => {
                    self.queued.pop_front();
                }
            }
            if self.pending_rows() >= self.cfg.max_rows_per_file {
                self.publish().await?;
            }
        }
        Ok(())
    }

    /// Publishes the open file if it is at least `max_age_secs` old (0 = never by age), after
    /// writing any rows waiting after a failure. Call it from a timer so a quiet stream still
    /// publishes. Returns whether it published.
    pub async fn flush_if_older(&mut self, max_age_secs: u64) -> Result<bool, SinkError> {
        if !self.queued.is_empty() {
            self.drain().await?;
        }
        let old = max_age_secs > 0
            && self
                .current
                .as_ref()
                .is_some_and(|f| f.opened.elapsed() >= Duration::from_secs(max_age_secs));
        if old {
            self.publish().await?;
        }
        Ok(old)
    }

    /// Writes every accepted row and publishes the open file: when it returns `Ok`, every row
    /// accepted so far is in a published file (the checkpoint barrier of `odcd run`).
    pub async fn flush(&mut self) -> Result<(), SinkError> {
        self.drain().await?;
        self.publish().await
    }

    /// Closes and publishes the open file, if any; on failure its rows go back to the queue.
    async fn publish(&mut self) -> Result<(), SinkError> {
        let Some(f) = self.current.take() else {
            return Ok(());
        };
        let (name, rows) = (f.name, f.rows);
        let mut writer = f.writer;
        // `finish` uploads the footer and completes the upload: only now the object appears.
        match writer.finish().await {
            Ok(_) => {
                let bytes = writer.bytes_written() as u64;
                self.held.clear();
                self.metrics.files_published.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .rows_published
                    .fetch_add(rows as u64, Ordering::Relaxed);
                self.metrics
                    .bytes_published
                    .fetch_add(bytes, Ordering::Relaxed);
                tracing::info!(url = %self.url, file = %name, rows, bytes, "parquet file published");
                Ok(())
            }
            Err(e) => {
                // Not `abort`: object_store's BufWriter panics when aborted after a shutdown
                // attempt. Dropping it discards the buffer / staging file; an unfinished S3
                // multipart upload is left to the bucket's abort-incomplete-uploads rule.
                drop(writer);
                self.requeue_held();
                Err(self.write_err(&name, e))
            }
        }
    }

    /// Publishes every accepted row and drops the sink.
    pub async fn close(mut self) -> Result<(), SinkError> {
        self.flush().await
    }
}

#[cfg(test)]
mod tests;
