//! Where the model computes and in which dtype, chosen explicitly (`--device cpu|cuda[:N]`,
//! `--compute-dtype f32|bf16`), never guessed from what the build happens to support.

use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::Error;

/// The device a pipeline computes on when it is on [`crate::pipeline::Placement::Device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// CUDA device of this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = || {
            Error::InvalidConfig(format!(
                "unknown device {s:?}, expected cpu, cuda or cuda:N"
            ))
        };
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => {
                let ordinal = s.strip_prefix("cuda:").ok_or_else(invalid)?;
                ordinal
                    .parse()
                    .map(DeviceChoice::Cuda)
                    .map_err(|_| invalid())
            }
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device: an error naming CUDA when this build or this host has none.
    pub fn open(self) -> Result<Device, Error> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(ordinal) => open_cuda(ordinal),
        }
    }

    /// The GPU computes in bf16 (its tensor cores' dtype), the CPU in f32.
    pub fn default_compute_dtype(self) -> ComputeDtype {
        match self {
            DeviceChoice::Cpu => ComputeDtype::F32,
            DeviceChoice::Cuda(_) => ComputeDtype::Bf16,
        }
    }
}

/// A CUDA device per ordinal for the whole process: candle compiles its kernels per device
/// object, and each object holds its own context on the GPU, so every move reuses this one.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, Error> {
    use std::sync::Mutex;
    static OPENED: Mutex<Vec<(usize, Device)>> = Mutex::new(Vec::new());
    let mut opened = OPENED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, device)) = opened.iter().find(|(o, _)| *o == ordinal) {
        return Ok(device.clone());
    }
    // cudarc panics rather than returning an error on some missing-driver paths.
    let device = std::panic::catch_unwind(|| Device::new_cuda(ordinal))
        .map_err(|_| "the CUDA driver could not be loaded".to_string())
        .and_then(|opened| opened.map_err(|e| e.to_string()))
        .map_err(|e| {
            Error::InvalidConfig(format!(
                "CUDA device {ordinal} cannot be opened (is there an NVIDIA GPU and driver on \
                 this host?): {e}"
            ))
        })?;
    opened.push((ordinal, device.clone()));
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device, Error> {
    Err(Error::InvalidConfig(format!(
        "device cuda:{ordinal} asks for CUDA, but this build of atelier-inference has no CUDA \
         support (build it with the `cuda` feature, see docs/install.md)"
    )))
}

/// The dtype of the activations. `Bf16` on the CPU runs the GPU's numerics (the same casts)
/// where there is no GPU, to compare them with diffusers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }
}

impl FromStr for ComputeDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "f32" => Ok(ComputeDtype::F32),
            "bf16" => Ok(ComputeDtype::Bf16),
            _ => Err(Error::InvalidConfig(format!(
                "unknown compute dtype {s:?}, expected f32 or bf16"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_from_their_names() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1"] {
            let err = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("cuda:N"), "{err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_an_error_naming_cuda() {
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("CUDA") && err.contains("cuda:0"), "{err}");
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
    }
}
