//! Labelled evaluation sets: shards read once through the normal source + decode path with
//! the eval transform, held in memory as pixels, and their features under a frozen model.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use tokio_util::sync::CancellationToken;

use super::EvalError;
use crate::decode::{BatchStream, PipelineConfig};
pub use crate::model::FeatureKind;
use crate::model::OdcModel;
use crate::source::{
    DataMetrics, ObjectStoreSource, ObjectStoreSourceConfig, RejectReason, SourceMode, SourceState,
};

/// Decoded, eval-transformed images with their keys and class labels.
#[derive(Debug, Clone, Default)]
pub struct LabelledSet {
    /// Where the shards came from (for messages).
    pub url: String,
    pub keys: Vec<String>,
    /// Class ids from `<key>.cls`.
    pub labels: Vec<i64>,
    /// n × channels × size × size, normalised as the eval transform does.
    pub pixels: Vec<f32>,
    pub channels: usize,
    pub size: usize,
    /// Records the data path rejected (undecodable, ...): not in the set.
    pub rejected: u64,
}

impl LabelledSet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// Values per image.
    pub fn per_image(&self) -> usize {
        self.channels * self.size * self.size
    }
}

/// Reads every record under `url` once (at most `max` images), decoding with `pipeline`
/// (which must carry the eval transform). Every image must have a `.cls` label.
pub async fn load_set(
    url: &str,
    options: &BTreeMap<String, String>,
    pipeline: &PipelineConfig,
    max: Option<usize>,
    cancel: &CancellationToken,
) -> Result<LabelledSet, EvalError> {
    load_images(url, options, pipeline, max, true, cancel).await
}

/// [`load_set`] where a label is optional (`-1` in `labels` for an image without `.cls`):
/// a sample of a stream's images for label-free measurements.
pub async fn load_unlabelled(
    url: &str,
    options: &BTreeMap<String, String>,
    pipeline: &PipelineConfig,
    max: Option<usize>,
    cancel: &CancellationToken,
) -> Result<LabelledSet, EvalError> {
    load_images(url, options, pipeline, max, false, cancel).await
}

async fn load_images(
    url: &str,
    options: &BTreeMap<String, String>,
    pipeline: &PipelineConfig,
    max: Option<usize>,
    require_labels: bool,
    cancel: &CancellationToken,
) -> Result<LabelledSet, EvalError> {
    let url = crate::store::local_path_to_url(url, "shards URL").map_err(|e| EvalError::Data {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    let mut source = ObjectStoreSourceConfig::new(url.clone());
    source.options = options.clone();
    source.mode = SourceMode::Once;
    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry).map_err(|e| EvalError::Data {
        url: url.clone(),
        message: e.to_string(),
    })?;
    let child = cancel.child_token();
    let data_err = |e: &dyn std::fmt::Display| EvalError::Data {
        url: url.clone(),
        message: e.to_string(),
    };
    let rx = ObjectStoreSource::from_config(source)
        .map_err(|e| data_err(&e))?
        .with_metrics(metrics.clone())
        .spawn(SourceState::default(), child.clone());
    let mut stream = BatchStream::spawn(
        rx,
        pipeline.clone(),
        metrics.clone(),
        None,
        SourceState::default(),
        child.clone(),
    )
    .map_err(|e| data_err(&e))?;
    let size = pipeline.transform.size() as usize;
    let channels = pipeline.decode.channels as usize;
    let mut set = LabelledSet {
        url: url.clone(),
        channels,
        size,
        ..LabelledSet::default()
    };
    let limit = max.unwrap_or(usize::MAX);
    while set.len() < limit {
        let batch = tokio::select! {
            b = stream.next() => b,
            _ = cancel.cancelled() => return Err(EvalError::Cancelled),
        };
        let Some(batch) = batch else { break };
        let take = (limit - set.len()).min(batch.keys.len());
        let per = channels * size * size;
        let v = batch
            .images
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| EvalError::Data {
                url: url.clone(),
                message: format!("decoded batch: {e}"),
            })?;
        for i in 0..take {
            let label = match batch.class_labels[i] {
                Some(l) => l,
                None if !require_labels => -1,
                None => {
                    return Err(EvalError::Unlabelled {
                        url: url.clone(),
                        key: batch.keys[i].clone(),
                    })
                }
            };
            set.keys.push(batch.keys[i].clone());
            set.labels.push(label);
            set.pixels.extend_from_slice(&v[i * per..(i + 1) * per]);
        }
    }
    // Stop the source and decoders if we left early (max reached).
    child.cancel();
    set.rejected = RejectReason::ALL
        .iter()
        .map(|&r| metrics.rejected_count(r))
        .sum();
    if set.rejected > 0 {
        tracing::warn!(url = %url, rejected = set.rejected, "records rejected while reading the evaluation set (see odcd shards inspect)");
    }
    if set.is_empty() {
        return Err(EvalError::Empty { url });
    }
    Ok(set)
}

/// `set`'s images as (b, C, H, W) tensors of `batch` images (the last one may be smaller).
fn batches<'a>(
    set: &'a LabelledSet,
    batch: usize,
    device: &'a Device,
) -> impl Iterator<Item = Result<Tensor, EvalError>> + 'a {
    let per = set.per_image();
    set.pixels.chunks(per * batch.max(1)).map(move |chunk| {
        Tensor::from_slice(
            chunk,
            (chunk.len() / per, set.channels, set.size, set.size),
            device,
        )
        .map_err(EvalError::model)
    })
}

/// Features (n × d, row-major) of every image of `set` under `model` in eval mode, `batch`
/// images at a time; stops with `Cancelled` between batches once `cancel` fires. CPU-heavy:
/// call it off the async runtime.
pub fn extract_features(
    model: &OdcModel,
    set: &LabelledSet,
    kind: FeatureKind,
    batch: usize,
    device: &Device,
    cancel: Option<&CancellationToken>,
) -> Result<(Vec<f32>, usize), EvalError> {
    let mut out = Vec::new();
    let mut d = 0;
    for x in batches(set, batch, device) {
        if cancel.is_some_and(|c| c.is_cancelled()) {
            return Err(EvalError::Cancelled);
        }
        let x = x?;
        let f = model.features(&x, kind).map_err(EvalError::model)?;
        d = f.dim(1).map_err(EvalError::model)?;
        out.extend(
            f.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(EvalError::model)?,
        );
    }
    Ok((out, d))
}

/// BatchNorm calibration of `model` on the first `batches` batches of `set` (eval transform,
/// `batch` images each): every running statistic becomes the average batch statistic. For
/// the random-network baseline, whose running statistics are otherwise the initial 0/1.
pub fn calibrate_batchnorm(
    model: &OdcModel,
    set: &LabelledSet,
    batches: usize,
    batch: usize,
    device: &Device,
) -> Result<usize, EvalError> {
    let xs = self::batches(set, batch, device)
        .take(batches)
        .collect::<Result<Vec<_>, _>>()?;
    model
        .calibrate_batchnorm(xs.iter())
        .map_err(EvalError::model)
}

/// Maps arbitrary class ids to `0..classes` (sorted), so votes and probes index densely.
pub fn dense_labels(train: &[i64], test: &[i64]) -> (Vec<u32>, Vec<u32>, usize) {
    let mut ids: Vec<i64> = train.iter().chain(test).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let map = |v: &[i64]| -> Vec<u32> {
        v.iter()
            .map(|x| ids.binary_search(x).unwrap_or(0) as u32)
            .collect()
    };
    (map(train), map(test), ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_labels_keep_order_and_count_classes() {
        let (a, b, c) = dense_labels(&[7, 3, 7], &[9, 3]);
        assert_eq!(a, vec![1, 0, 1]);
        assert_eq!(b, vec![2, 0]);
        assert_eq!(c, 3);
    }
}
