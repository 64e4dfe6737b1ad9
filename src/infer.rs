//! Eval-mode embedding with a frozen network, shared by `odcd embed` and the releases: one
//! backbone forward gives the published feature and, when the checkpoint's centroids are
//! known, the neck feature's nearest cluster. Rows are optionally centred on a fixed mean (a
//! release's centring) and always L2-normalised, so they are ready for cosine / dot product.

use candle_core::{Device, Tensor};

use crate::model::{FeatureKind, OdcModel};
use crate::odc::{OdcError, OdcMemory};

/// Errors of the frozen forward; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("frozen network forward: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("nearest centroid: {0}")]
    Centroids(#[from] OdcError),
    #[error("centring mean has {got} values but the feature has {dim}")]
    MeanDim { got: usize, dim: usize },
}

/// The centroids a checkpoint's ODC memory held (k × dim, the neck's space).
#[derive(Debug, Clone, PartialEq)]
pub struct Centroids {
    pub k: usize,
    pub dim: usize,
    pub values: Vec<f32>,
}

impl Centroids {
    /// The centroids of `memory`.
    pub fn of(memory: &OdcMemory) -> Self {
        Centroids {
            k: memory.k(),
            dim: memory.dim(),
            values: memory.centroids().to_vec(),
        }
    }
}

/// Rows of one batch, row-major `len × dim`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    pub dim: usize,
    pub values: Vec<f32>,
    /// Per row: the nearest centroid of its neck feature (`None` without centroids).
    pub clusters: Vec<Option<u32>>,
}

/// A frozen network, the feature it publishes and, optionally, the centroids that name each
/// row's cluster and the mean the rows are centred on.
pub struct FrozenEmbedder {
    model: OdcModel,
    feature: FeatureKind,
    centroids: Option<Centroids>,
    mean: Option<Vec<f32>>,
}

impl FrozenEmbedder {
    pub fn new(model: OdcModel, feature: FeatureKind, centroids: Option<Centroids>) -> Self {
        FrozenEmbedder {
            model,
            feature,
            centroids,
            mean: None,
        }
    }

    /// Centre every row on `mean` before normalising it (a release's centring).
    pub fn with_mean(mut self, mean: Vec<f32>) -> Self {
        self.mean = Some(mean);
        self
    }

    pub fn feature(&self) -> FeatureKind {
        self.feature
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    pub fn model(&self) -> &OdcModel {
        &self.model
    }

    /// The raw (not centred, not normalised) feature of `images` (N, C, H, W on any device)
    /// and the nearest cluster of each row. CPU-heavy: call it off the async runtime.
    pub fn raw(&self, images: &Tensor) -> Result<Rows, InferError> {
        let x = images.to_device(self.model.device())?;
        let to_rows = |f: Tensor| -> Result<(Vec<f32>, usize), InferError> {
            let d = f.dim(1)?;
            Ok((f.flatten_all()?.to_vec1::<f32>()?, d))
        };
        let n = x.dim(0)?;
        let (values, dim, clusters) = match (&self.centroids, self.feature) {
            // No centroids: the neck is needed only when it is the feature.
            (None, kind) => {
                let (v, d) = to_rows(self.model.features(&x, kind)?)?;
                (v, d, vec![None; n])
            }
            (Some(c), kind) => {
                let (neck, feature) = self.model.neck_and_features(&x, kind)?;
                let (neck, nd) = to_rows(neck)?;
                if nd != c.dim {
                    return Err(InferError::Centroids(OdcError::LengthMismatch {
                        what: "neck feature (the centroids' dimension)",
                        expected: c.dim,
                        got: nd,
                    }));
                }
                let labels = OdcMemory::nearest_of(&c.values, c.k, c.dim, &neck)?;
                let (v, d) = to_rows(feature)?;
                (v, d, labels.into_iter().map(Some).collect())
            }
        };
        Ok(Rows {
            dim,
            values,
            clusters,
        })
    }

    /// Centres `rows` on the mean (if any) and L2-normalises them in place: what is published.
    pub fn finish(&self, rows: &mut Rows) -> Result<(), InferError> {
        if let Some(mean) = &self.mean {
            center_rows(&mut rows.values, mean, rows.dim)?;
        }
        crate::odc::normalise_rows(&mut rows.values, rows.dim);
        Ok(())
    }

    /// [`Self::raw`] then [`Self::finish`]: the published rows of `images`.
    pub fn embed(&self, images: &Tensor) -> Result<Rows, InferError> {
        let mut rows = self.raw(images)?;
        self.finish(&mut rows)?;
        Ok(rows)
    }
}

/// Subtracts `mean` (one value per column) from every row of `values` (rows of `dim`).
pub fn center_rows(values: &mut [f32], mean: &[f32], dim: usize) -> Result<(), InferError> {
    if mean.len() != dim {
        return Err(InferError::MeanDim {
            got: mean.len(),
            dim,
        });
    }
    for row in values.chunks_exact_mut(dim.max(1)) {
        for (x, m) in row.iter_mut().zip(mean) {
            *x -= m;
        }
    }
    Ok(())
}

/// The column means of `values` (rows of `dim`), summed in f64.
pub fn column_mean(values: &[f32], dim: usize) -> Vec<f32> {
    let rows = values.len() / dim.max(1);
    let mut sum = vec![0f64; dim];
    for row in values.chunks_exact(dim.max(1)) {
        for (s, &x) in sum.iter_mut().zip(row) {
            *s += f64::from(x);
        }
    }
    sum.iter()
        .map(|s| (s / rows.max(1) as f64) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centring_and_means_work_by_column() {
        let mut v = vec![1.0, 10.0, 3.0, 14.0];
        let m = column_mean(&v, 2);
        assert_eq!(m, vec![2.0, 12.0]);
        center_rows(&mut v, &m, 2).unwrap();
        assert_eq!(v, vec![-1.0, -2.0, 1.0, 2.0]);
        assert!(center_rows(&mut v, &[0.0], 2).is_err());
    }

    #[test]
    fn the_nearest_cluster_of_a_row_follows_the_memory_rule() {
        // Two centroids in 2-d: a row along x belongs to 0, along y to 1.
        let c = [1.0, 0.0, 0.0, 1.0];
        let labels = OdcMemory::nearest_of(&c, 2, 2, &[3.0, 0.1, 0.2, 5.0]).unwrap();
        assert_eq!(labels, vec![0, 1]);
        assert!(OdcMemory::nearest_of(&c, 3, 2, &[1.0, 0.0]).is_err());
        assert!(OdcMemory::nearest_of(&c, 2, 2, &[f32::NAN, 0.0]).is_err());
    }
}
