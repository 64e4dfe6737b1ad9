//! What the benches share: the architecture flag, how a network and a device are named in
//! their lines, and the process's resident set size.

use candle_core::Device;

use crate::model::{Arch, ModelConfig};

pub(crate) fn parse_arch(s: &str) -> Result<Arch, String> {
    match s {
        "resnet18" => Ok(Arch::Resnet18),
        "resnet50" => Ok(Arch::Resnet50),
        _ => Err(format!("`{s}`: expected resnet18 or resnet50")),
    }
}

/// "" for the standard stem at width 64, else e.g. " (3x3/s2 stem, width 32)".
pub(crate) fn stem_label(m: &ModelConfig) -> String {
    let mut parts = Vec::new();
    if m.small_stem {
        parts.push(format!("3x3/s{} stem", m.small_stem_stride));
    }
    if m.width != ModelConfig::default().width {
        parts.push(format!("width {}", m.width));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Resident set size of this process (Linux `/proc/self/status`), NaN where unavailable.
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub(crate) fn device_name(dev: &Device) -> String {
    match dev {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}
