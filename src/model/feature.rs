//! Which of the network's features a consumer takes: the pooled backbone output, the neck's
//! clustered feature, or an earlier stage's map with its layout kept.

use candle_core::{Tensor, D};

use super::OdcModel;

/// Which feature of the network is taken: evaluated (`odcd eval --feature`, `[eval] feature`)
/// or published (`odcd embed --feature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FeatureKind {
    /// Global-average-pooled backbone output (512-d for ResNet-18): the usual protocol.
    #[default]
    Backbone,
    /// The neck's D-dim feature, the one the ODC memory clusters.
    Neck,
    /// The backbone's last map flattened (C × h × w) instead of averaged: the same as
    /// `backbone` where the map is 1×1 (the standard stem), and keeps the layout where it is
    /// not (a small stem at 28 px ends in 2×2).
    Spatial,
    /// `stageN`: the output map of backbone stage N (1–4) flattened: earlier stages keep
    /// more of the layout and are less specialised to the training task.
    Stage(u8),
    /// `stagesN`: the flattened maps of stages N..=4, each L2-normalised, side by side.
    Stages(u8),
}

impl std::str::FromStr for FeatureKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let stage = |n: &str| match n {
            "1" | "2" | "3" | "4" => Ok(n.as_bytes()[0] - b'0'),
            _ => Err(format!("`{s}`: the stage must be 1, 2, 3 or 4")),
        };
        match s {
            "backbone" => Ok(FeatureKind::Backbone),
            "neck" => Ok(FeatureKind::Neck),
            "spatial" => Ok(FeatureKind::Spatial),
            _ => {
                if let Some(n) = s.strip_prefix("stages") {
                    stage(n).map(FeatureKind::Stages)
                } else if let Some(n) = s.strip_prefix("stage") {
                    stage(n).map(FeatureKind::Stage)
                } else {
                    Err(format!(
                        "`{s}`: use backbone, neck, spatial, stage1..stage4 or stages1..stages4"
                    ))
                }
            }
        }
    }
}

impl std::fmt::Display for FeatureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FeatureKind::Backbone => f.write_str("backbone"),
            FeatureKind::Neck => f.write_str("neck"),
            FeatureKind::Spatial => f.write_str("spatial"),
            FeatureKind::Stage(n) => write!(f, "stage{n}"),
            FeatureKind::Stages(n) => write!(f, "stages{n}"),
        }
    }
}

impl TryFrom<String> for FeatureKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<FeatureKind> for String {
    fn from(k: FeatureKind) -> String {
        k.to_string()
    }
}

impl OdcModel {
    /// Eval-mode feature `kind` of the images `x`, (N, d).
    pub fn features(&self, x: &Tensor, kind: FeatureKind) -> candle_core::Result<Tensor> {
        match kind {
            FeatureKind::Backbone => self.backbone_features(x, false),
            FeatureKind::Neck => self.features_eval(x),
            FeatureKind::Spatial => self.backbone_map_features(x),
            FeatureKind::Stage(_) | FeatureKind::Stages(_) => {
                from_stage_maps(&self.backbone_stage_maps(x)?, kind)
            }
        }
    }

    /// Eval-mode neck feature (what the memory clusters) and feature `kind` of `x` from one
    /// backbone forward.
    pub fn neck_and_features(
        &self,
        x: &Tensor,
        kind: FeatureKind,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let maps = self.backbone_stage_maps(x)?;
        let last = maps
            .last()
            .ok_or_else(|| candle_core::Error::msg("the backbone has no stage"))?;
        let pooled = last.mean(D::Minus1)?.mean(D::Minus1)?;
        let neck = self.neck(&pooled, false, 0)?;
        let feature = match kind {
            FeatureKind::Neck => neck.clone(),
            FeatureKind::Backbone => pooled,
            FeatureKind::Spatial => last.flatten_from(1)?,
            FeatureKind::Stage(_) | FeatureKind::Stages(_) => from_stage_maps(&maps, kind)?,
        };
        Ok((neck, feature))
    }
}

/// `stageN` / `stagesN` from the stage maps (stage 1 first); N outside 1..=stages is clamped.
fn from_stage_maps(maps: &[Tensor], kind: FeatureKind) -> candle_core::Result<Tensor> {
    let pick = |n: u8| usize::from(n).clamp(1, maps.len().max(1)) - 1;
    match kind {
        FeatureKind::Stage(n) => maps
            .get(pick(n))
            .ok_or_else(|| candle_core::Error::msg("the backbone has no stage"))?
            .flatten_from(1),
        FeatureKind::Stages(n) => {
            let parts = maps
                .iter()
                .skip(pick(n))
                .map(|m| {
                    let f = m.flatten_from(1)?;
                    let norm = f.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
                    f.broadcast_div(&norm)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 1)
        }
        other => Err(candle_core::Error::msg(format!(
            "{other} is not a stage feature"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelConfig, ModelError};
    use candle_core::Device;

    /// A 1-channel network with the stride-2 small stem at width 8: stages at 14, 7, 4, 2 px
    /// on 28-px input.
    fn small_model(arch: Arch) -> Result<(OdcModel, Device), ModelError> {
        let cfg = ModelConfig {
            arch,
            in_channels: 1,
            small_stem: true,
            small_stem_stride: 2,
            width: 8,
            neck_hidden: 32,
            feat_dim: 16,
            ..ModelConfig::default()
        };
        let dev = Device::Cpu;
        Ok((OdcModel::new(&cfg, 10, &dev, 1)?, dev))
    }

    #[test]
    fn feature_kinds_round_trip_and_reject_unknown_stages() {
        for s in ["backbone", "neck", "spatial", "stage1", "stage4", "stages2"] {
            let k: FeatureKind = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
        }
        assert_eq!("stage3".parse(), Ok(FeatureKind::Stage(3)));
        assert!("stage5".parse::<FeatureKind>().is_err());
        assert!("stages0".parse::<FeatureKind>().is_err());
        assert!("pixels".parse::<FeatureKind>().is_err());
        assert!("stage02".parse::<FeatureKind>().is_err());
        assert!("stage+2".parse::<FeatureKind>().is_err());
        // as config values (serde through the same strings)
        #[derive(serde::Deserialize, serde::Serialize)]
        struct C {
            feature: FeatureKind,
        }
        let c: C = toml::from_str("feature = \"stages3\"").unwrap();
        assert_eq!(c.feature, FeatureKind::Stages(3));
        assert_eq!(toml::to_string(&c).unwrap().trim(), "feature = \"stages3\"");
    }

    #[test]
    fn stage_features_keep_each_stage_layout() -> Result<(), ModelError> {
        let (m, dev) = small_model(Arch::Resnet18)?;
        let x = Tensor::randn(0f32, 1f32, (3, 1, 28, 28), &dev)?;
        // 28 px, stride-2 stem: stages at 14, 7, 4, 2 px with 8, 16, 32, 64 channels
        let dim = |k: &str| -> Result<Vec<usize>, ModelError> {
            Ok(m.features(&x, k.parse().map_err(candle_core::Error::msg)?)?
                .dims()
                .to_vec())
        };
        assert_eq!(dim("stage1")?, [3, 8 * 14 * 14]);
        assert_eq!(dim("stage2")?, [3, 16 * 7 * 7]);
        assert_eq!(dim("stage4")?, dim("spatial")?);
        assert_eq!(dim("backbone")?, [3, 64]);
        assert_eq!(dim("neck")?, [3, 16]);
        assert_eq!(dim("stages3")?, [3, 32 * 4 * 4 + 64 * 2 * 2]);
        // stage 4 is the backbone map: its pooled mean is the backbone feature
        let maps = m.backbone_stage_maps(&x)?;
        let pooled = maps[3]
            .mean(candle_core::D::Minus1)?
            .mean(candle_core::D::Minus1)?;
        let diff = (pooled - m.features(&x, FeatureKind::Backbone)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(
            diff < 1e-5,
            "stage 4 pooled differs from the backbone feature by {diff}"
        );
        // each stage block of `stagesN` has unit norm, so a row's norm is √(stages)
        let norms = m
            .features(&x, FeatureKind::Stages(3))?
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_vec1::<f32>()?;
        for n in norms {
            assert!((n - 2f32.sqrt()).abs() < 1e-4, "row norm {n}");
        }
        // one forward for both gives what two give
        for kind in [
            FeatureKind::Neck,
            FeatureKind::Backbone,
            FeatureKind::Stage(2),
        ] {
            let (neck, f) = m.neck_and_features(&x, kind)?;
            for (a, b) in [
                (neck, m.features(&x, FeatureKind::Neck)?),
                (f, m.features(&x, kind)?),
            ] {
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{kind}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn resnet50_stages_carry_four_times_the_channels() -> Result<(), ModelError> {
        let (m, dev) = small_model(Arch::Resnet50)?;
        let x = Tensor::randn(0f32, 1f32, (2, 1, 28, 28), &dev)?;
        let dims: Vec<Vec<usize>> = m
            .backbone_stage_maps(&x)?
            .iter()
            .map(|t| t.dims().to_vec())
            .collect();
        assert_eq!(
            dims,
            [
                vec![2, 32, 14, 14],
                vec![2, 64, 7, 7],
                vec![2, 128, 4, 4],
                vec![2, 256, 2, 2]
            ]
        );
        Ok(())
    }
}
