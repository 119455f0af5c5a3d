//! Why an offline tool (`infer`, `eval`, `calibrate`, `import-reference`, `demo`) stopped.
//! The four run a bundle over image files and fail for the same reasons (the bundle, the
//! engine, the dataset, an image, a file, an option), so they share one error type
//! rather than four copies of it; training has its own (`train::TrainError`).

use crate::path_error::PathError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// An option no run could use; the message names it.
    #[error("{0}")]
    Options(String),
    /// The data cannot give what was asked (no test images, no defects, ...).
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
    #[error("cannot write {path}: {source}")]
    WriteImage {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("loading {model} with the {engine} engine: {source}")]
    LoadModel {
        model: PathBuf,
        engine: &'static str,
        source: crate::engine::EngineError,
    },
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Bundle(#[from] crate::model::bundle::BundleError),
    #[error(transparent)]
    Graph(#[from] crate::model::graph::GraphError),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    #[error(transparent)]
    Image(#[from] crate::preprocess::ImageError),
    #[error("cannot encode {what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("{what}: cannot start it: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status})")]
    Step {
        what: String,
        status: std::process::ExitStatus,
    },
}

pub type Result<T> = std::result::Result<T, ToolError>;
