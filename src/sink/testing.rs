//! Test kit: a fault injector around a REAL object store. [`FailingPuts`] refuses the next N
//! writes (single PUTs and multipart uploads) and passes everything else, and every write
//! after those, to the store it wraps.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

#[derive(Debug)]
pub struct FailingPuts {
    inner: Arc<dyn ObjectStore>,
    left: AtomicUsize,
    /// Writes refused so far.
    pub refused: AtomicUsize,
}

impl FailingPuts {
    /// `inner` refusing its next `n` writes.
    pub fn new(inner: Arc<dyn ObjectStore>, n: usize) -> Arc<Self> {
        Arc::new(FailingPuts {
            inner,
            left: AtomicUsize::new(n),
            refused: AtomicUsize::new(0),
        })
    }

    /// Refuse the next `n` writes (`usize::MAX`: until told otherwise).
    pub fn fail_next(&self, n: usize) {
        self.left.store(n, Ordering::SeqCst);
    }

    fn refuse(&self) -> Result<()> {
        let took = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if took.is_ok() {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(object_store::Error::Generic {
                store: "FailingPuts",
                source: "injected fault: the store refuses this write".into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for FailingPuts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FailingPuts({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FailingPuts {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.refuse()?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.refuse()?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// `(key, step)` of every row in the published Parquet files under `dir` (recursively), read
/// back with the parquet crate. Panics on a file that is not a complete Parquet file (a staging
/// file left visible, a partial upload).
pub fn published_rows(dir: &std::path::Path) -> Vec<(String, u64)> {
    use arrow_array::{Array, StringArray, UInt64Array};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            out.extend(published_rows(&p));
            continue;
        }
        let f = std::fs::File::open(&p).expect("open a published file");
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap_or_else(|e| panic!("{} is not a whole Parquet file: {e}", p.display()))
            .build()
            .expect("parquet reader");
        for rb in reader {
            let rb = rb.expect("record batch");
            let keys = rb.column(0).as_any().downcast_ref::<StringArray>();
            let steps = rb.column(1).as_any().downcast_ref::<UInt64Array>();
            let (Some(keys), Some(steps)) = (keys, steps) else {
                panic!("{}: unexpected column types", p.display());
            };
            for i in 0..keys.len() {
                out.push((keys.value(i).to_string(), steps.value(i)));
            }
        }
    }
    out
}
