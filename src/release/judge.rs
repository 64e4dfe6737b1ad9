//! Judging a candidate checkpoint: its vectors as a release would publish them (the release's
//! feature, centred on a reference sample of the catalog, L2-normalised), measured without
//! labels (the effective rank, the collapse guard) and, with a labelled `[eval]` set, by
//! weighted k-NN against the current release and the two baselines (raw pixels, the
//! untrained network).

use std::collections::BTreeMap;

use candle_core::Tensor;
use tokio_util::sync::CancellationToken;

use super::config::PromoteConfig;
use super::layout::{PreviousQuality, Quality};
use super::metrics::RejectReason;
use super::metrics::ReleaseMetrics;
use super::share::CpuShare;
use super::ReleaseError;
use crate::eval::data::{dense_labels, LabelledSet};
use crate::eval::knn::{weighted_knn, KnnResult};
use crate::eval::label_free::effective_rank;
use crate::eval::{EvalModel, KnnEvalConfig};
use crate::infer::{center_rows, column_mean, Centroids};
use crate::model::{FeatureKind, OdcModel};

/// A checkpoint offered as the next release.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub step: u64,
    /// Its manifest id in the checkpoint store.
    pub checkpoint_id: String,
    /// Model weights (safetensors).
    pub weights: Vec<u8>,
    /// The ODC memory's centroids at that step (each row's cluster).
    pub centroids: Option<Centroids>,
    /// The last checkpoint of a run that ended by itself (`train.max_steps`, the source's
    /// end): not held back by `promote.min_interval_secs`.
    pub last_of_run: bool,
}

/// A model's vectors measured as a release would publish them.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// The centring mean (the release's `mean`).
    pub mean: Vec<f32>,
    pub dim: usize,
    pub effective_rank: f64,
    /// Weighted k-NN top-1 on the labelled set (empty without one).
    pub knn: Vec<KnnResult>,
}

impl Measured {
    /// The k-NN top-1 at the first k.
    pub fn knn_first(&self) -> Option<f64> {
        self.knn.first().map(|k| k.top1)
    }
}

/// The decision on a candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Promote, with the reason (kept in the release's quality figures).
    Promote(String),
    Reject(RejectReason, String),
}

/// The labelled sets of `[eval]` and how they are scored.
struct Labelled {
    train: LabelledSet,
    test: LabelledSet,
    ytr: Vec<u32>,
    yte: Vec<u32>,
    classes: usize,
    ks: Vec<usize>,
    temperature: f32,
}

/// What a judgement needs, loaded once: the reference sample, the labelled sets, and the
/// baselines, measured at the first judgement.
pub struct Judge {
    net: EvalModel,
    feature: FeatureKind,
    batch: usize,
    reference: LabelledSet,
    labelled: Option<Labelled>,
    untrained: Option<Measured>,
    pixels: Option<Vec<KnnResult>>,
    /// The current release's figures, by release id.
    current: Option<(String, Measured)>,
}

impl Judge {
    /// Reads the reference sample (the first `reference_samples` images of the catalog, eval
    /// transform) and the labelled sets of `eval`, if any.
    #[allow(clippy::too_many_arguments)]
    pub async fn load(
        net: EvalModel,
        feature: FeatureKind,
        catalog_url: &str,
        catalog_options: &BTreeMap<String, String>,
        reference_samples: usize,
        eval: Option<&KnnEvalConfig>,
        batch: usize,
        cancel: &CancellationToken,
    ) -> Result<Self, ReleaseError> {
        let pipeline = net.pipeline.for_eval(batch);
        let reference = crate::eval::data::load_unlabelled(
            catalog_url,
            catalog_options,
            &pipeline,
            Some(reference_samples),
            cancel,
        )
        .await?;
        let labelled = match eval {
            Some(e) => {
                use crate::eval::data::load_set;
                let train = load_set(
                    &e.train_url,
                    &e.options,
                    &pipeline,
                    Some(e.max_train),
                    cancel,
                )
                .await?;
                let test =
                    load_set(&e.test_url, &e.options, &pipeline, Some(e.max_test), cancel).await?;
                let (ytr, yte, classes) = dense_labels(&train.labels, &test.labels);
                Some(Labelled {
                    train,
                    test,
                    ytr,
                    yte,
                    classes,
                    ks: e.k.clone(),
                    temperature: e.temperature,
                })
            }
            None => None,
        };
        tracing::info!(
            reference = reference.len(),
            labelled = labelled
                .as_ref()
                .map(|l| (l.train.len(), l.test.len()))
                .is_some(),
            "release judge: reference sample loaded"
        );
        Ok(Judge {
            net,
            feature,
            batch,
            reference,
            labelled,
            untrained: None,
            pixels: None,
            current: None,
        })
    }

    /// Images in the reference sample.
    pub fn reference_len(&self) -> usize {
        self.reference.len()
    }

    pub fn has_labels(&self) -> bool {
        self.labelled.is_some()
    }

    /// The network of the run with `weights`.
    pub fn model(&self, weights: &[u8]) -> Result<OdcModel, ReleaseError> {
        let device = crate::device::select_device(&self.net.device)
            .map_err(|e| ReleaseError::Model(format!("train.device: {e}")))?;
        Ok(self.net.build(Some(weights), 0, &device)?)
    }

    /// The network `weights` as a release freezes it: with `calibrate`, its BatchNorm running
    /// statistics re-measured on the reference sample through the eval transform (the
    /// images and transform it will embed), as `odcd eval --precise-bn` does; training's
    /// running statistics come from augmented crops. Returns the network and its weights.
    pub fn prepare(
        &self,
        weights: &[u8],
        calibrate: bool,
        share: &mut CpuShare,
    ) -> Result<(OdcModel, Vec<u8>), ReleaseError> {
        let model = self.model(weights)?;
        if !calibrate {
            return Ok((model, weights.to_vec()));
        }
        self.calibrate(&model, share)?;
        let w = model
            .to_safetensors()
            .map_err(|e| ReleaseError::Model(e.to_string()))?;
        Ok((model, w))
    }

    /// BatchNorm running statistics of `model` from the reference sample (eval transform).
    fn calibrate(&self, model: &OdcModel, share: &mut CpuShare) -> Result<(), ReleaseError> {
        let set = &self.reference;
        let per = set.per_image();
        let xs = set
            .pixels
            .chunks(per * self.batch)
            .map(|c| {
                Tensor::from_slice(
                    c,
                    (c.len() / per, set.channels, set.size, set.size),
                    model.device(),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| ReleaseError::Model(e.to_string()))?;
        share
            .run(|| model.calibrate_batchnorm(xs.iter()))
            .map_err(|e| ReleaseError::Model(format!("BatchNorm calibration: {e}")))?;
        Ok(())
    }

    /// `model`'s raw features of every image of `set`, batch by batch on `share`.
    fn features(
        &self,
        model: &OdcModel,
        set: &LabelledSet,
        share: &mut CpuShare,
        cancel: &CancellationToken,
    ) -> Result<(Vec<f32>, usize), ReleaseError> {
        let per = set.per_image();
        let (mut out, mut d) = (Vec::new(), 0);
        for chunk in set.pixels.chunks(per * self.batch) {
            if cancel.is_cancelled() {
                return Err(ReleaseError::Cancelled);
            }
            let n = chunk.len() / per;
            let x =
                Tensor::from_slice(chunk, (n, set.channels, set.size, set.size), model.device())
                    .map_err(|e| ReleaseError::Model(e.to_string()))?;
            let feature = self.feature;
            let f = share
                .run(|| -> candle_core::Result<(Vec<f32>, usize)> {
                    let f = model.features(&x, feature)?;
                    Ok((f.flatten_all()?.to_vec1::<f32>()?, f.dim(1)?))
                })
                .map_err(|e| ReleaseError::Model(e.to_string()))?;
            d = f.1;
            out.extend(f.0);
        }
        Ok((out, d))
    }

    /// Measures `model`: centred on `mean` (a release's) or on the reference sample's own
    /// mean (a candidate's, which becomes its release's mean), then normalised.
    pub fn measure(
        &self,
        model: &OdcModel,
        mean: Option<&[f32]>,
        share: &mut CpuShare,
        cancel: &CancellationToken,
    ) -> Result<Measured, ReleaseError> {
        let (mut reference, d) = self.features(model, &self.reference, share, cancel)?;
        let mean = match mean {
            Some(m) => m.to_vec(),
            None => column_mean(&reference, d),
        };
        center_rows(&mut reference, &mean, d)?;
        crate::odc::normalise_rows(&mut reference, d);
        let rank = share.run(|| effective_rank(&reference, d));
        let knn = match &self.labelled {
            Some(l) => {
                let (mut ftr, _) = self.features(model, &l.train, share, cancel)?;
                let (mut fte, _) = self.features(model, &l.test, share, cancel)?;
                center_rows(&mut ftr, &mean, d)?;
                center_rows(&mut fte, &mean, d)?;
                share.run(|| knn_of(l, &mut ftr, &mut fte, d))
            }
            None => Vec::new(),
        };
        Ok(Measured {
            mean,
            dim: d,
            effective_rank: rank,
            knn,
        })
    }

    /// The untrained network of the run (`train.seed`), measured once, its BatchNorm
    /// calibrated as a candidate's is (`calibrate`).
    pub fn untrained(
        &mut self,
        calibrate: bool,
        share: &mut CpuShare,
        cancel: &CancellationToken,
    ) -> Result<Measured, ReleaseError> {
        if let Some(u) = &self.untrained {
            return Ok(u.clone());
        }
        let device = crate::device::select_device(&self.net.device)
            .map_err(|e| ReleaseError::Model(format!("train.device: {e}")))?;
        let model = self.net.build(None, self.net.seed, &device)?;
        if calibrate {
            self.calibrate(&model, share)?;
        }
        let m = self.measure(&model, None, share, cancel)?;
        self.untrained = Some(m.clone());
        Ok(m)
    }

    /// Raw pixels' k-NN on the labelled sets (centred on the train pixels' mean), once.
    pub fn pixels(&mut self) -> Option<Vec<KnnResult>> {
        if self.pixels.is_none() {
            let l = self.labelled.as_ref()?;
            let (mut tr, mut te) = (l.train.pixels.clone(), l.test.pixels.clone());
            let d = l.train.per_image();
            crate::eval::center_on_train_mean(&mut tr, &mut te, d);
            self.pixels = Some(knn_of(l, &mut tr, &mut te, d));
        }
        self.pixels.clone()
    }

    /// The figures of the current release `id` (its network and mean), measured once per id.
    pub fn current(
        &mut self,
        id: &str,
        weights: &[u8],
        mean: &[f32],
        share: &mut CpuShare,
        cancel: &CancellationToken,
    ) -> Result<Measured, ReleaseError> {
        if let Some((cid, m)) = &self.current {
            if cid == id {
                return Ok(m.clone());
            }
        }
        let model = self.model(weights)?;
        let m = self.measure(&model, Some(mean), share, cancel)?;
        self.current = Some((id.to_string(), m.clone()));
        Ok(m)
    }
}

/// A candidate measured beside everything it is compared with.
#[derive(Debug, Clone)]
pub struct Assessment {
    /// The weights as they would be released (BatchNorm calibrated if asked).
    pub weights: Vec<u8>,
    pub candidate: Measured,
    pub untrained: Measured,
    /// Raw pixels' k-NN on the labelled set, if there is one.
    pub pixels: Option<Vec<KnnResult>>,
    /// The current release's id and figures.
    pub current: Option<(String, Measured)>,
}

impl Assessment {
    /// The promotion rule ([`decide`]) on these figures.
    pub fn verdict(&self, cfg: &PromoteConfig) -> Verdict {
        decide(
            cfg,
            &self.candidate,
            self.current.as_ref().map(|(id, m)| (id.as_str(), m)),
            &self.untrained,
            self.pixels.as_deref(),
        )
    }

    /// The figures kept in the release's spec, with the reason it was made.
    pub fn quality(&self, decision: String) -> Quality {
        let mut baselines = BTreeMap::new();
        if let Some(px) = &self.pixels {
            baselines.insert("raw_pixels".to_string(), px.clone());
        }
        if !self.untrained.knn.is_empty() {
            baselines.insert("untrained".to_string(), self.untrained.knn.clone());
        }
        Quality {
            decision,
            effective_rank: self.candidate.effective_rank,
            untrained_effective_rank: Some(self.untrained.effective_rank),
            knn: self.candidate.knn.clone(),
            baselines,
            previous: self.current.as_ref().map(|(id, m)| PreviousQuality {
                release: id.clone(),
                effective_rank: m.effective_rank,
                knn: m.knn.clone(),
            }),
        }
    }

    /// `odcd_release_candidate_score{signal, model}`.
    pub fn export(&self, metrics: &ReleaseMetrics) {
        let score = |signal: &str, model: &str, v: Option<f64>| {
            if let Some(v) = v {
                metrics.scores.with_label_values(&[signal, model]).set(v);
            }
        };
        let current = self.current.as_ref().map(|(_, m)| m);
        for (model, m) in [
            ("candidate", Some(&self.candidate)),
            ("untrained", Some(&self.untrained)),
            ("current", current),
        ] {
            score("effective_rank", model, m.map(|m| m.effective_rank));
            score("knn_top1", model, m.and_then(Measured::knn_first));
        }
        score(
            "knn_top1",
            "raw_pixels",
            self.pixels.as_ref().and_then(|p| p.first()).map(|k| k.top1),
        );
    }
}

impl Judge {
    /// Measures candidate `weights` as a release (BatchNorm calibrated with `calibrate`),
    /// the untrained network, raw pixels and the current release (`current`: its id,
    /// weights and centring mean), all on the same images.
    pub fn assess(
        &mut self,
        weights: &[u8],
        calibrate: bool,
        current: Option<(&str, &[u8], &[f32])>,
        share: &mut CpuShare,
        cancel: &CancellationToken,
    ) -> Result<Assessment, ReleaseError> {
        let (model, weights) = self.prepare(weights, calibrate, share)?;
        let candidate = self.measure(&model, None, share, cancel)?;
        drop(model);
        let untrained = self.untrained(calibrate, share, cancel)?;
        let pixels = self.pixels();
        let current = match current {
            Some((id, w, mean)) => {
                Some((id.to_string(), self.current(id, w, mean, share, cancel)?))
            }
            None => None,
        };
        Ok(Assessment {
            weights,
            candidate,
            untrained,
            pixels,
            current,
        })
    }
}

/// Weighted k-NN of `test` against `train` (rows normalised here).
fn knn_of(l: &Labelled, train: &mut [f32], test: &mut [f32], d: usize) -> Vec<KnnResult> {
    crate::odc::normalise_rows(train, d);
    crate::odc::normalise_rows(test, d);
    weighted_knn(
        train,
        &l.ytr,
        test,
        &l.yte,
        d,
        l.classes,
        &l.ks,
        l.temperature,
    )
}

/// Promote or not, on the measurements: the collapse guard always; with labels, k-NN above
/// both baselines and above the current release by `min_knn_gain`.
pub fn decide(
    cfg: &PromoteConfig,
    cand: &Measured,
    current: Option<(&str, &Measured)>,
    untrained: &Measured,
    pixels: Option<&[KnnResult]>,
) -> Verdict {
    if cand.effective_rank < cfg.min_effective_rank {
        return Verdict::Reject(
            RejectReason::Collapsed,
            format!(
                "effective rank {:.1} < releases.promote.min_effective_rank = {}: the features have collapsed onto a few directions",
                cand.effective_rank, cfg.min_effective_rank
            ),
        );
    }
    if let Some((id, c)) = current {
        if cand.effective_rank < cfg.min_rank_ratio * c.effective_rank {
            return Verdict::Reject(
                RejectReason::Collapsed,
                format!(
                    "effective rank {:.1} < {} × {:.1} of the current release {id}: the features have collapsed",
                    cand.effective_rank, cfg.min_rank_ratio, c.effective_rank
                ),
            );
        }
    }
    let Some(knn) = cand.knn_first() else {
        return Verdict::Promote(match current {
            Some(_) => format!(
                "schedule (no labelled [eval] set): effective rank {:.1} passes the collapse guard",
                cand.effective_rank
            ),
            None => "first release".into(),
        });
    };
    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    if let Some(p) = pixels.and_then(|p| p.first()) {
        if knn <= p.top1 {
            return Verdict::Reject(
                RejectReason::BelowPixels,
                format!(
                    "k-NN@{} {} is not above raw pixels' {}",
                    p.k,
                    pct(knn),
                    pct(p.top1)
                ),
            );
        }
    }
    if let Some(u) = untrained.knn_first() {
        if knn <= u {
            return Verdict::Reject(
                RejectReason::BelowUntrained,
                format!(
                    "k-NN {} is not above the untrained network's {}",
                    pct(knn),
                    pct(u)
                ),
            );
        }
    }
    match current.and_then(|(id, c)| c.knn_first().map(|k| (id, k))) {
        Some((id, cur)) if knn < cur + cfg.min_knn_gain => Verdict::Reject(
            RejectReason::NotBetter,
            format!(
                "k-NN {} is not {:.2} points above the current release {id}'s {}",
                pct(knn),
                100.0 * cfg.min_knn_gain,
                pct(cur)
            ),
        ),
        Some((id, cur)) => Verdict::Promote(format!(
            "k-NN {} beats the current release {id}'s {} by {:.2} points",
            pct(knn),
            pct(cur),
            100.0 * (knn - cur)
        )),
        None => Verdict::Promote(format!("first release: k-NN {}", pct(knn))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rank: f64, knn: Option<f64>) -> Measured {
        Measured {
            mean: vec![],
            dim: 2,
            effective_rank: rank,
            knn: knn
                .map(|t| vec![KnnResult { k: 20, top1: t }])
                .unwrap_or_default(),
        }
    }

    #[test]
    fn the_verdict_follows_the_guard_the_baselines_and_the_margin() {
        let cfg = PromoteConfig::default();
        let untrained = m(40.0, Some(0.80));
        let pixels = [KnnResult { k: 20, top1: 0.85 }];
        // No labels: the collapse guard only.
        assert!(matches!(
            decide(&cfg, &m(30.0, None), None, &untrained, None),
            Verdict::Promote(_)
        ));
        assert!(matches!(
            decide(&cfg, &m(10.0, None), None, &untrained, None),
            Verdict::Reject(RejectReason::Collapsed, _)
        ));
        // A first release is not measured against the untrained network's (random) rank.
        assert!(matches!(
            decide(&cfg, &m(17.0, None), None, &m(400.0, Some(0.8)), None),
            Verdict::Promote(_)
        ));
        let cur = m(30.0, Some(0.87));
        assert!(matches!(
            decide(
                &cfg,
                &m(14.0, Some(0.95)),
                Some(("r1", &cur)),
                &untrained,
                Some(&pixels)
            ),
            Verdict::Reject(RejectReason::Collapsed, _)
        ));
        // Labels: above both baselines, then above the current release by the margin.
        assert!(matches!(
            decide(&cfg, &m(30.0, Some(0.84)), None, &untrained, Some(&pixels)),
            Verdict::Reject(RejectReason::BelowPixels, _)
        ));
        let strong_untrained = m(40.0, Some(0.90));
        assert!(matches!(
            decide(
                &cfg,
                &m(30.0, Some(0.88)),
                None,
                &strong_untrained,
                Some(&pixels)
            ),
            Verdict::Reject(RejectReason::BelowUntrained, _)
        ));
        assert!(matches!(
            decide(
                &cfg,
                &m(30.0, Some(0.873)),
                Some(("r1", &cur)),
                &untrained,
                Some(&pixels)
            ),
            Verdict::Reject(RejectReason::NotBetter, _)
        ));
        assert!(matches!(
            decide(
                &cfg,
                &m(30.0, Some(0.88)),
                Some(("r1", &cur)),
                &untrained,
                Some(&pixels)
            ),
            Verdict::Promote(_)
        ));
        assert!(matches!(
            decide(&cfg, &m(30.0, Some(0.86)), None, &untrained, Some(&pixels)),
            Verdict::Promote(_)
        ));
    }
}
