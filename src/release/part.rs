//! One Parquet file of a release's rows (the rows of one catalog shard), written through
//! object_store's multipart writer: the object appears under its name only when complete.
//!
//! | column        | Arrow type                | nullable | meaning                                   |
//! |---------------|---------------------------|----------|-------------------------------------------|
//! | `key`         | Utf8                      | no       | sample key                                |
//! | `release`     | Utf8                      | no       | the release id                            |
//! | `step`        | UInt64                    | no       | training step of the release's checkpoint |
//! | `cluster`     | UInt32                    | yes      | nearest centroid of the checkpoint's memory |
//! | `class_label` | Int64                     | yes      | `.cls` label when present (never trained on) |
//! | `embedding`   | FixedSizeList<Float32, D> | no       | `normalise(feature − mean)`               |

use std::sync::Arc;

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
use parquet::schema::types::ColumnPath;

use crate::infer::Rows;

/// The schema of a release's files for vectors of `dim`.
pub fn schema(dim: usize) -> Result<SchemaRef, String> {
    let d = i32::try_from(dim)
        .ok()
        .filter(|&d| d > 0)
        .ok_or_else(|| format!("dim {dim} must be in 1..=i32::MAX"))?;
    Ok(Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("release", DataType::Utf8, false),
        Field::new("step", DataType::UInt64, false),
        Field::new("cluster", DataType::UInt32, true),
        Field::new("class_label", DataType::Int64, true),
        Field::new(
            "embedding",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), d),
            false,
        ),
    ])))
}

/// A part being written. Dropping it unfinished discards the upload (nothing is published).
pub struct PartWriter {
    writer: AsyncArrowWriter<ParquetObjectWriter>,
    schema: SchemaRef,
    release: String,
    step: u64,
    dim: usize,
    rows: u64,
}

impl PartWriter {
    pub fn create(
        store: Arc<dyn ObjectStore>,
        path: Path,
        release: &str,
        step: u64,
        dim: usize,
    ) -> Result<Self, String> {
        let schema = schema(dim)?;
        // Normalised floats neither compress nor repeat: snappy left a 63 MB part of 3,136-d
        // rows at 63 MB, and the dictionary attempt only costs time. The other columns keep
        // both (keys compress to a third).
        let floats = ColumnPath::from(vec![
            "embedding".to_string(),
            "list".to_string(),
            "item".to_string(),
        ]);
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_column_compression(floats.clone(), Compression::UNCOMPRESSED)
            .set_column_dictionary_enabled(floats, false)
            .set_max_row_group_size(16_384)
            .set_created_by(format!("odcd {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = AsyncArrowWriter::try_new(
            ParquetObjectWriter::new(store, path),
            schema.clone(),
            Some(props),
        )
        .map_err(|e| e.to_string())?;
        Ok(PartWriter {
            writer,
            schema,
            release: release.to_string(),
            step,
            dim,
            rows: 0,
        })
    }

    /// Appends the rows of one batch (`keys[i]` ↔ row i of `rows`; the values are moved into
    /// the file's column, not copied).
    pub async fn write(
        &mut self,
        keys: &[String],
        class_labels: &[Option<i64>],
        rows: Rows,
    ) -> Result<(), String> {
        let n = keys.len();
        if rows.dim != self.dim || rows.values.len() != n * self.dim || rows.clusters.len() != n {
            return Err(format!(
                "{n} keys, {} values of dim {} and {} clusters do not make rows of dim {}",
                rows.values.len(),
                rows.dim,
                rows.clusters.len(),
                self.dim
            ));
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let emb = FixedSizeListArray::try_new(
            item,
            self.dim as i32,
            Arc::new(Float32Array::from(rows.values)),
            None,
        )
        .map_err(|e| e.to_string())?;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(keys)),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                self.release.as_str(),
                n,
            ))),
            Arc::new(UInt64Array::from(vec![self.step; n])),
            Arc::new(UInt32Array::from(rows.clusters)),
            Arc::new(Int64Array::from(class_labels.to_vec())),
            Arc::new(emb),
        ];
        let batch = RecordBatch::try_new(self.schema.clone(), cols).map_err(|e| e.to_string())?;
        self.writer.write(&batch).await.map_err(|e| e.to_string())?;
        self.rows += n as u64;
        Ok(())
    }

    /// Completes the upload: only now does the file appear. Returns (rows, bytes).
    pub async fn finish(mut self) -> Result<(u64, u64), String> {
        self.writer.finish().await.map_err(|e| e.to_string())?;
        Ok((self.rows, self.writer.bytes_written() as u64))
    }

    /// Abandons the file: its upload is aborted, nothing is published.
    pub async fn abort(self) {
        let _ = self.writer.into_inner().into_inner().abort().await;
    }
}

enum PartMsg {
    Rows(Vec<String>, Vec<Option<i64>>, Rows),
    Abort,
}

/// A part written on a task of its own: encoding and writing one batch overlap the forward of
/// the next (written on the embedding thread, they took ~4% of a backfill's time).
pub struct PartTask {
    tx: tokio::sync::mpsc::Sender<PartMsg>,
    task: Option<tokio::task::JoinHandle<Result<(u64, u64), String>>>,
}

impl PartWriter {
    /// Moves the writer onto a task; `queue` batches may wait for it.
    pub fn spawn(mut self, queue: usize) -> PartTask {
        let (tx, mut rx) = tokio::sync::mpsc::channel(queue.max(1));
        let task = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                match m {
                    PartMsg::Rows(keys, labels, rows) => {
                        if let Err(e) = self.write(&keys, &labels, rows).await {
                            self.abort().await;
                            return Err(e);
                        }
                    }
                    PartMsg::Abort => {
                        self.abort().await;
                        return Err("aborted".into());
                    }
                }
            }
            self.finish().await
        });
        PartTask {
            tx,
            task: Some(task),
        }
    }
}

impl PartTask {
    /// Queues one batch's rows; waits while the queue is full. A writer that failed
    /// returns its error here (or at [`Self::finish`]).
    pub async fn write(
        &mut self,
        keys: Vec<String>,
        class_labels: Vec<Option<i64>>,
        rows: Rows,
    ) -> Result<(), String> {
        if self
            .tx
            .send(PartMsg::Rows(keys, class_labels, rows))
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self.task.take() {
            Some(t) => match t.await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(_)) => Err("the part writer ended early".into()),
                Err(e) => Err(format!("the part writer failed: {e}")),
            },
            None => Err("the part writer has stopped".into()),
        }
    }

    /// Writes what is queued and completes the upload. Returns (rows, bytes).
    pub async fn finish(self) -> Result<(u64, u64), String> {
        let PartTask { tx, task } = self;
        drop(tx);
        match task {
            Some(t) => t
                .await
                .map_err(|e| format!("the part writer failed: {e}"))?,
            None => Err("the part writer has stopped".into()),
        }
    }

    /// Abandons the part: nothing is published.
    pub async fn abort(self) {
        let PartTask { tx, task } = self;
        let _ = tx.send(PartMsg::Abort).await;
        drop(tx);
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}
