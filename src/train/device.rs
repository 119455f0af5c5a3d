//! The compute device of the training steps (`--device cpu|cuda|cuda:N`). The embedding
//! pass always runs on onnxruntime; only the adaptor and scorer steps move.

use anyhow::{Context, Result, bail};
use candle_core::Device;

/// The compute device for the training steps, parsed once from `cpu`, `cuda` (GPU 0) or
/// `cuda:N`; shown back in that form (model.yaml provenance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainDevice {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for TrainDevice {
    type Err = anyhow::Error;

    /// A CUDA name in a build without the `cuda` feature is refused here, with the
    /// rebuild command, rather than by candle's generic "not compiled" error after
    /// minutes of embedding extraction.
    fn from_str(name: &str) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        let device = match lower.as_str() {
            "cpu" => return Ok(TrainDevice::Cpu),
            "cuda" => TrainDevice::Cuda(0),
            n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => TrainDevice::Cuda(i),
                _ => bail!(
                    "unknown training device {name:?}: use cpu, cuda or cuda:N (N = GPU index)"
                ),
            },
        };
        if !cfg!(feature = "cuda") {
            bail!(
                "training device {name:?} needs a cras built with the `cuda` feature \
                 (cargo build --release --features cuda, with the CUDA toolkit installed); \
                 this build trains on the cpu only"
            );
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
    pub fn open(self) -> Result<Device> {
        match self {
            TrainDevice::Cpu => Ok(Device::Cpu),
            TrainDevice::Cuda(i) => Device::new_cuda(i)
                .with_context(|| format!("cannot open CUDA device {i} for training")),
        }
    }
}
