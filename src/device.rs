//! Compute device selection from config (`cpu`, `cuda:N` or `auto`), and which kernels the
//! training step runs on it (`auto` or `generic`).

use candle_core::Device;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device `{0}` is not understood: use `cpu`, `cuda:N` (N = GPU index) or `auto`")]
    Unknown(String),
    #[error("device `{spec}` asks for CUDA but this odcd was built without the `cuda` feature: rebuild with `cargo build --release --features cuda` or set device = \"cpu\"")]
    NoCudaSupport { spec: String },
    #[error("could not open CUDA device {index}: {source}")]
    Cuda {
        index: usize,
        source: candle_core::Error,
    },
}

/// Which implementation the training step's layers use (config `train.kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// odcd's own kernels (hand-written backwards) on f32 CPU tensors, the generic path on
    /// any other device.
    #[default]
    Auto,
    /// The generic path everywhere: candle ops that all have a backward on every device.
    /// On CPU it is slower; it exists to run (and test) on CPU what a GPU runs.
    Generic,
}

impl Kernels {
    /// Parses the config value; the error says what is allowed.
    pub fn parse(spec: &str) -> Result<Self, String> {
        match spec.trim() {
            "auto" => Ok(Kernels::Auto),
            "generic" => Ok(Kernels::Generic),
            other => Err(format!(
                "is `{other}`: use \"auto\" (odcd's CPU kernels on CPU, the generic path \
                 elsewhere) or \"generic\" (the generic path everywhere)"
            )),
        }
    }

    /// Whether odcd's CPU kernels may run on `device`.
    pub fn cpu_kernels_on(self, device: &Device) -> bool {
        self == Kernels::Auto && device.is_cpu()
    }
}

/// Parses a device spec and opens the device. `auto` picks CUDA device 0 when this build
/// has CUDA support and a device answers, else the CPU.
pub fn select_device(spec: &str) -> Result<Device, DeviceError> {
    let spec_trim = spec.trim();
    match spec_trim {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let index = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| DeviceError::Unknown(spec.to_string()))?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError::NoCudaSupport {
                    spec: spec.to_string(),
                });
            }
            Device::new_cuda(index).map_err(|source| DeviceError::Cuda { index, source })
        }
        _ => Err(DeviceError::Unknown(spec.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_choices() {
        assert_eq!(Kernels::parse("auto"), Ok(Kernels::Auto));
        assert_eq!(Kernels::parse(" generic "), Ok(Kernels::Generic));
        let e = Kernels::parse("cuda").err().unwrap_or_default();
        assert!(e.contains("`cuda`") && e.contains("\"generic\""), "{e}");
        assert!(Kernels::Auto.cpu_kernels_on(&Device::Cpu));
        assert!(!Kernels::Generic.cpu_kernels_on(&Device::Cpu));
    }

    #[test]
    fn parses_specs() {
        assert!(matches!(select_device("cpu"), Ok(Device::Cpu)));
        assert!(select_device("auto").is_ok());
        assert!(matches!(select_device("gpu"), Err(DeviceError::Unknown(_))));
        assert!(matches!(
            select_device("cuda:x"),
            Err(DeviceError::Unknown(_)) | Err(DeviceError::NoCudaSupport { .. })
        ));
        if !candle_core::utils::cuda_is_available() {
            assert!(matches!(
                select_device("cuda:0"),
                Err(DeviceError::NoCudaSupport { .. })
            ));
        }
    }
}
