//! ResNet-18 / ResNet-50 backbones with torchvision shapes and parameter names, plus a
//! small-image stem (3×3 conv of stride 1 or 2, no max-pool) for 28–64 px inputs and a
//! stage-1 width other than torchvision's 64.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::{BatchNorm, Conv2d};
use super::ops::MaxPool2d;
use super::params::{KernelChoice, ParamStore};
use super::residual::add_relu;
use super::{ModelConfig, ModelError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Resnet18,
    Resnet50,
}

impl Arch {
    /// Channels of the last stage (the backbone's output feature size) at stage-1 `width`.
    pub fn out_channels(self, width: usize) -> usize {
        match self {
            Arch::Resnet18 => width * 8,
            Arch::Resnet50 => width * 32,
        }
    }
}

/// Backbone BatchNorm momentum (PyTorch default).
const BN_MOMENTUM: f64 = 0.1;

/// The 1×1 conv + BatchNorm shortcut of a block whose shape changes; `None` otherwise.
fn downsample(
    ps: &mut ParamStore,
    name: &str,
    c_in: usize,
    c_out: usize,
    stride: usize,
) -> Result<Option<(Conv2d, BatchNorm)>, ModelError> {
    if stride == 1 && c_in == c_out {
        return Ok(None);
    }
    Ok(Some((
        Conv2d::new(
            ps,
            &format!("{name}.downsample.0"),
            c_in,
            c_out,
            1,
            stride,
            0,
        )?,
        BatchNorm::new(
            ps,
            &format!("{name}.downsample.1"),
            c_out,
            true,
            BN_MOMENTUM,
        )?,
    )))
}

struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl BasicBlock {
    fn new(
        ps: &mut ParamStore,
        name: &str,
        c_in: usize,
        c_out: usize,
        stride: usize,
    ) -> Result<Self, ModelError> {
        let downsample = downsample(ps, name, c_in, c_out, stride)?;
        Ok(BasicBlock {
            conv1: Conv2d::new(ps, &format!("{name}.conv1"), c_in, c_out, 3, stride, 1)?,
            bn1: BatchNorm::new(ps, &format!("{name}.bn1"), c_out, true, BN_MOMENTUM)?,
            conv2: Conv2d::new(ps, &format!("{name}.conv2"), c_out, c_out, 3, 1, 1)?,
            bn2: BatchNorm::new(ps, &format!("{name}.bn2"), c_out, true, BN_MOMENTUM)?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool, cpu: bool) -> candle_core::Result<Tensor> {
        let y = self.bn1.forward_act(&self.conv1.forward(x)?, train, true)?;
        let y = self.bn2.forward(&self.conv2.forward(&y)?, train)?;
        let id = match &self.downsample {
            Some((c, b)) => b.forward(&c.forward(x)?, train)?,
            None => x.clone(),
        };
        join(&y, &id, cpu)
    }
}

/// The residual join relu(y + identity): the fused CPU kernel when `cpu`, candle ops
/// otherwise.
fn join(y: &Tensor, id: &Tensor, cpu: bool) -> candle_core::Result<Tensor> {
    if cpu {
        add_relu(y, id)
    } else {
        super::layers::relu(&(y + id)?)
    }
}

/// torchvision v1.5 bottleneck: the stride sits on the 3×3 conv.
struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    bn3: BatchNorm,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl Bottleneck {
    fn new(
        ps: &mut ParamStore,
        name: &str,
        c_in: usize,
        width: usize,
        stride: usize,
    ) -> Result<Self, ModelError> {
        let c_out = width * 4;
        let downsample = downsample(ps, name, c_in, c_out, stride)?;
        Ok(Bottleneck {
            conv1: Conv2d::new(ps, &format!("{name}.conv1"), c_in, width, 1, 1, 0)?,
            bn1: BatchNorm::new(ps, &format!("{name}.bn1"), width, true, BN_MOMENTUM)?,
            conv2: Conv2d::new(ps, &format!("{name}.conv2"), width, width, 3, stride, 1)?,
            bn2: BatchNorm::new(ps, &format!("{name}.bn2"), width, true, BN_MOMENTUM)?,
            conv3: Conv2d::new(ps, &format!("{name}.conv3"), width, c_out, 1, 1, 0)?,
            bn3: BatchNorm::new(ps, &format!("{name}.bn3"), c_out, true, BN_MOMENTUM)?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool, cpu: bool) -> candle_core::Result<Tensor> {
        let y = self.bn1.forward_act(&self.conv1.forward(x)?, train, true)?;
        let y = self
            .bn2
            .forward_act(&self.conv2.forward(&y)?, train, true)?;
        let y = self.bn3.forward(&self.conv3.forward(&y)?, train)?;
        let id = match &self.downsample {
            Some((c, b)) => b.forward(&c.forward(x)?, train)?,
            None => x.clone(),
        };
        join(&y, &id, cpu)
    }
}

enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool, cpu: bool) -> candle_core::Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward(x, train, cpu),
            Block::Bottleneck(b) => b.forward(x, train, cpu),
        }
    }
}

pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: Option<MaxPool2d>,
    blocks: Vec<Block>,
    /// Number of blocks in each of the four stages.
    depths: [usize; 4],
    arch: Arch,
    out_channels: usize,
    kernels: KernelChoice,
}

impl ResNet {
    /// Builds the backbone of `cfg` (arch, input channels, stem, width) under the name prefix
    /// `prefix` (e.g. `backbone`).
    pub fn new(ps: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (arch, in_channels, w) = (cfg.arch, cfg.in_channels, cfg.width);
        let conv1_name = format!("{prefix}.conv1");
        let (conv1, maxpool) = if cfg.small_stem {
            let stride = cfg.small_stem_stride;
            (
                Conv2d::new(ps, &conv1_name, in_channels, w, 3, stride, 1)?,
                None,
            )
        } else {
            (
                Conv2d::new(ps, &conv1_name, in_channels, w, 7, 2, 3)?,
                Some(MaxPool2d::new(3, 2, 1)),
            )
        };
        let bn1 = BatchNorm::new(ps, &format!("{prefix}.bn1"), w, true, BN_MOMENTUM)?;
        let depths: [usize; 4] = match arch {
            Arch::Resnet18 => [2, 2, 2, 2],
            Arch::Resnet50 => [3, 4, 6, 3],
        };
        let widths = [w, 2 * w, 4 * w, 8 * w];
        let mut blocks = Vec::new();
        let mut c_in = w;
        for (stage, (&depth, &width)) in depths.iter().zip(widths.iter()).enumerate() {
            for i in 0..depth {
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                let name = format!("{prefix}.layer{}.{i}", stage + 1);
                match arch {
                    Arch::Resnet18 => {
                        blocks.push(Block::Basic(BasicBlock::new(
                            ps, &name, c_in, width, stride,
                        )?));
                        c_in = width;
                    }
                    Arch::Resnet50 => {
                        blocks.push(Block::Bottleneck(Bottleneck::new(
                            ps, &name, c_in, width, stride,
                        )?));
                        c_in = width * 4;
                    }
                }
            }
        }
        Ok(ResNet {
            conv1,
            bn1,
            maxpool,
            blocks,
            depths,
            arch,
            out_channels: arch.out_channels(w),
            kernels: ps.kernel_choice().clone(),
        })
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Channels of the backbone feature.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// (N, C, H, W) → stage-4 map (N, C4, h, w).
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (mut y, cpu) = self.stem(x, train)?;
        for b in &self.blocks {
            y = b.forward(&y, train, cpu)?;
        }
        Ok(y)
    }

    /// (N, C, H, W) → the output map of every stage, stage 1 first (the last is
    /// [`Self::forward`]'s): for evaluating earlier, less invariant features.
    pub fn forward_stages(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        let (mut y, cpu) = self.stem(x, train)?;
        let mut maps = Vec::with_capacity(self.depths.len());
        let mut blocks = self.blocks.iter();
        for &depth in &self.depths {
            for b in blocks.by_ref().take(depth) {
                y = b.forward(&y, train, cpu)?;
            }
            maps.push(y.clone());
        }
        Ok(maps)
    }

    /// conv1 + BN + ReLU (+ max-pool), and whether odcd's CPU kernels run the blocks.
    fn stem(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, bool)> {
        let mut y = self.bn1.forward_act(&self.conv1.forward(x)?, train, true)?;
        let cpu = self.kernels.cpu_kernels_for(&y);
        if let Some(mp) = &self.maxpool {
            y = if cpu {
                mp.forward(&y)?
            } else {
                mp.forward_generic(&y)?
            };
        }
        Ok((y, cpu))
    }
}
