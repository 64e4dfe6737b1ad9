//! Which of the network's features a consumer takes: the pooled backbone output, the neck's
//! clustered feature, or an earlier stage's map with its layout kept.

use candle_core::Tensor;

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
        let stage = |n: &str| match n.parse::<u8>() {
            Ok(n @ 1..=4) => Ok(n),
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
            FeatureKind::Stage(n) => {
                let maps = self.backbone_stage_maps(x)?;
                maps[usize::from(n).clamp(1, maps.len()) - 1].flatten_from(1)
            }
            FeatureKind::Stages(n) => self.stage_map_features(x, usize::from(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn stage_features_keep_each_stage_layout() -> Result<(), crate::model::ModelError> {
        use crate::model::{Arch, ModelConfig};
        use candle_core::Device;
        let cfg = ModelConfig {
            arch: Arch::Resnet18,
            in_channels: 1,
            small_stem: true,
            small_stem_stride: 2,
            width: 8,
            neck_hidden: 32,
            feat_dim: 16,
            ..ModelConfig::default()
        };
        let dev = Device::Cpu;
        let m = OdcModel::new(&cfg, 10, &dev, 1)?;
        let x = Tensor::randn(0f32, 1f32, (3, 1, 28, 28), &dev)?;
        // 28 px, stride-2 stem: stages at 14, 7, 4, 2 px with 8, 16, 32, 64 channels
        let dim = |k: &str| -> Result<Vec<usize>, crate::model::ModelError> {
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
        Ok(())
    }
}
