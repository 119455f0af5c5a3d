//! cras: multi-class industrial anomaly detection with CRAS (Center-aware Residual
//! Anomaly Synthesis). This crate holds the model tool chain (weights, graph builder,
//! bundles, engines, pre-processing) behind the `cras` binary.

pub mod add_class;
pub mod backbone;
pub mod calibrate;
pub mod clock;
pub mod daemon;
pub mod dataset;
pub mod demo;
pub mod engine;
pub mod eval;
pub mod import;
pub mod infer;
pub mod install;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod overlay;
pub mod path_error;
pub mod prepare_engine;
pub mod preprocess;
pub mod rebuild;
pub mod rng;
pub mod setup;
pub mod synth;
pub mod tool_error;
pub mod train;
pub mod weights;
