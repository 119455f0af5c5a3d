//! The compute device of the training steps (`--device cpu|cuda|cuda:N`). The embedding
//! pass always runs on onnxruntime; only the adaptor and scorer steps move.

use super::TrainError;
use candle_core::Device;

/// The compute device for the training steps, parsed once from `cpu`, `cuda` (GPU 0) or
/// `cuda:N`; shown back in that form (model.yaml provenance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainDevice {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for TrainDevice {
    type Err = TrainError;

    /// A CUDA name in a build without the `cuda` feature is refused here, with the
    /// rebuild command, rather than by candle's generic "not compiled" error after
    /// minutes of embedding extraction.
    fn from_str(name: &str) -> Result<Self, TrainError> {
        let lower = name.trim().to_ascii_lowercase();
        let device = match lower.as_str() {
            "cpu" => return Ok(TrainDevice::Cpu),
            "cuda" => TrainDevice::Cuda(0),
            n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => TrainDevice::Cuda(i),
                _ => return Err(TrainError::UnknownDevice(name.to_string())),
            },
        };
        if !cfg!(feature = "cuda") {
            return Err(TrainError::CudaNotBuilt(name.to_string()));
        }
        Ok(device)
    }
}

impl std::fmt::Display for TrainDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainDevice::Cpu => f.write_str("cpu"),
            TrainDevice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl TrainDevice {
    /// Opens the device; a CUDA device that is not there is an error naming its index.
    pub fn open(self) -> Result<Device, TrainError> {
        match self {
            TrainDevice::Cpu => Ok(Device::Cpu),
            TrainDevice::Cuda(i) => {
                Device::new_cuda(i).map_err(|source| TrainError::OpenDevice { index: i, source })
            }
        }
    }
}
