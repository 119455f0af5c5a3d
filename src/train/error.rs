//! Why a training run stopped.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An option no run could use; the message names the option.
    #[error("{0}")]
    Options(String),
    #[error("unknown training device {0:?}: use cpu, cuda or cuda:N (N = GPU index)")]
    UnknownDevice(String),
    /// A CUDA device asked of a build without the `cuda` feature: refused before any work
    /// rather than by candle after minutes of embedding extraction.
    #[error(
        "training device {0:?} needs a cras built with the `cuda` feature \
         (cargo build --release --features cuda, with the CUDA toolkit installed); \
         this build trains on the cpu only"
    )]
    CudaNotBuilt(String),
    #[error("cannot open CUDA device {index} for training: {source}")]
    OpenDevice {
        index: usize,
        source: candle_core::Error,
    },
    #[error("training computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] crate::path_error::PathError),
    #[error("checkpoint {path}: {reason}; start afresh without --resume")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("class `{0}` has no readable training image left")]
    NoImages(String),
    #[error("{0}")]
    Cache(String),
    #[error(
        "interrupted during epoch {epoch}; the last completed epoch is saved in {work}: continue with --resume"
    )]
    Interrupted { epoch: usize, work: PathBuf },
    #[error("no epoch completed")]
    NoEpoch,
    #[error("cannot install the interrupt handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error(transparent)]
    Graph(#[from] crate::model::graph::GraphError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Bundle(#[from] crate::model::bundle::BundleError),
}
