//! Inference engines: one trait, several back ends, the same ONNX graph for all.
//!
//! Loading and running are separate: an [`EngineKind`] plus options loads a graph into
//! a `Box<dyn Engine>`, which only runs.

pub mod cache;
#[cfg(feature = "gpu")]
pub mod device;
pub mod frames;
pub mod gpu_info;
pub mod onnxruntime;
pub mod provider;
#[cfg(feature = "tract")]
pub mod tract;
pub mod upgrade;

pub use frames::{Memory, PixelLayout};
pub use provider::{GpuOptions, Policy, Provider};

use crate::preprocess::InputSpec;
use std::path::PathBuf;

/// Values of one graph output.
#[derive(Debug, Clone)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Debug, Clone)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Values,
}

impl NamedTensor {
    pub fn f32(&self) -> Option<&[f32]> {
        match &self.values {
            Values::F32(v) => Some(v),
            _ => None,
        }
    }
    pub fn i64(&self) -> Option<&[i64]> {
        match &self.values {
            Values::I64(v) => Some(v),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "onnxruntime library not found (looked in: {looked}). Run `cras setup` to fetch the pinned \
         library, or point --ort-lib / ORT_DYLIB_PATH at libonnxruntime.so (>= 1.17)"
    )]
    RuntimeMissing { looked: String },
    #[error("cannot load onnxruntime from {path}: {reason}")]
    RuntimeLoad { path: PathBuf, reason: String },
    #[error("cannot load the model graph: {0}")]
    Load(String),
    #[error("inference failed: {0}")]
    Run(String),
    #[error(
        "engine `{0}` is not built into this binary; rebuild with `cargo build --features {0}`"
    )]
    NotBuilt(&'static str),
    #[error("model output `{0}` is missing or has the wrong type")]
    Output(String),
    #[error("the model returned results for {got} images, {asked} asked")]
    Batch { got: usize, asked: usize },
    #[error("engine `{0}` has no frames stage; pre-process the frames before running")]
    NoFramesStage(&'static str),
    #[error("model.provider `{provider}` is required (model.gpu.policy: require) but {reason}")]
    Provider {
        provider: &'static str,
        reason: String,
    },
}

/// Where an engine runs, against where it was asked to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub wanted: Provider,
    pub serving: Provider,
    /// Why `serving` is not `wanted` (policy `prefer`).
    pub fallback: Option<String>,
}

/// Runs one ONNX graph on batches.
pub trait Engine: Send {
    fn name(&self) -> &'static str;
    /// Runs on the `image` input of shape `shape` ([N,3,H,W]); returns every graph output.
    fn run(&mut self, image: &[f32], shape: [usize; 4]) -> Result<Vec<NamedTensor>, EngineError>;
    /// The only batch size this engine runs, if it has one (tract).
    fn fixed_batch(&self) -> Option<usize> {
        None
    }
    /// The execution provider it runs on, and why not the one asked for.
    fn placement(&self) -> Placement {
        Placement::default()
    }
    /// Whether [`Engine::run_frames`] works: the engine was loaded with a frames stage.
    fn takes_frames(&self) -> bool {
        false
    }
    /// Runs on camera frames as captured: `frames` holds `shape` = [N,H,W,C] bytes laid
    /// out as `layout`; the engine's frames stage pre-processes them
    /// ([`frames::frames_graph`]).
    fn run_frames(
        &mut self,
        frames: &[u8],
        shape: [usize; 4],
        layout: PixelLayout,
    ) -> Result<Vec<NamedTensor>, EngineError> {
        let _ = (frames, shape, layout);
        Err(EngineError::NoFramesStage(self.name()))
    }
    /// Whether [`Engine::run_device_frames`] works: a frames stage on a CUDA device.
    #[cfg(feature = "gpu")]
    fn takes_device_frames(&self) -> bool {
        false
    }
    /// Runs on frames in GPU memory (one size and layout), through the frames stage.
    #[cfg(feature = "gpu")]
    fn run_device_frames(
        &mut self,
        frames: &[&device::DeviceFrame],
    ) -> Result<Vec<NamedTensor>, EngineError> {
        let _ = frames;
        Err(EngineError::NoFramesStage(self.name()))
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// onnxruntime through a dynamically loaded libonnxruntime (default).
    Onnxruntime,
    /// tract: pure Rust, no system library (Cargo feature `tract`; fixed batch size).
    Tract,
}

/// Options shared by the engines.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Path of libonnxruntime.so (else ORT_DYLIB_PATH, else the `cras setup` location).
    pub ort_lib: Option<PathBuf>,
    /// Intra-op threads (default: all cores).
    pub threads: Option<usize>,
    /// Fixed batch size, for engines that need one (tract).
    pub batch: usize,
    /// Load a frames stage for this input as well (engines that have one: onnxruntime).
    pub frames: Option<InputSpec>,
    /// Where onnxruntime should run the graph, and the GPU settings when not the CPU.
    pub provider: Provider,
    pub gpu: GpuOptions,
    /// The network input's height and width (a TensorRT engine is built for it).
    pub input_hw: (usize, usize),
    /// Where TensorRT keeps its engines (none: built at every start).
    pub cache: Option<provider::CachePaths>,
    /// onnxruntime's graph optimisations (all, unless looking into a parity question).
    pub optimization: Optimization,
}

/// How much onnxruntime rewrites the graph before running it (node fusions change
/// float rounding, never the method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Optimization {
    #[default]
    All,
    Basic,
    Disabled,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Onnxruntime => "onnxruntime",
            EngineKind::Tract => "tract",
        }
    }

    /// Loads an ONNX graph (bytes) into a runnable engine.
    pub fn load(self, model: &[u8], opts: &EngineOptions) -> Result<Box<dyn Engine>, EngineError> {
        match self {
            EngineKind::Onnxruntime => Ok(Box::new(onnxruntime::OrtEngine::load(model, opts)?)),
            #[cfg(feature = "tract")]
            EngineKind::Tract => Ok(Box::new(tract::TractEngine::load(model, opts)?)),
            #[cfg(not(feature = "tract"))]
            EngineKind::Tract => Err(EngineError::NotBuilt("tract")),
        }
    }
}

/// Runs `n` prepared images (`input` holds n x [3, `h`, `w`]) through a CRAS graph; an
/// engine with a fixed batch (tract) gets the batch padded with zero images, whose results
/// are ignored.
pub fn run_images(
    engine: &mut dyn Engine,
    input: &mut Vec<f32>,
    n: usize,
    (h, w): (usize, usize),
) -> Result<CrasOutputs, EngineError> {
    CrasOutputs::for_batch(run_padded(engine, input, n, (h, w))?, n)
}

/// Runs `n` images, padded with zero images to the engine's fixed batch if it has one;
/// outputs of the padding come back too (callers read the first `n`).
pub fn run_padded(
    engine: &mut dyn Engine,
    input: &mut Vec<f32>,
    n: usize,
    (h, w): (usize, usize),
) -> Result<Vec<NamedTensor>, EngineError> {
    let run_n = engine.fixed_batch().unwrap_or(n).max(n);
    input.resize(run_n * 3 * h * w, 0.0);
    engine.run(input, [run_n, 3, h, w])
}

/// The four outputs of a CRAS graph for one batch.
#[derive(Debug, Clone)]
pub struct CrasOutputs {
    pub batch: usize,
    /// [N, H, W]
    pub anomaly_maps: Vec<f32>,
    pub map_hw: (usize, usize),
    /// [N, h, w]
    pub patch_scores: Vec<f32>,
    pub patch_hw: (usize, usize),
    pub image_scores: Vec<f32>,
    pub class_ids: Vec<i64>,
}

impl CrasOutputs {
    pub fn from_named(outs: Vec<NamedTensor>) -> Result<CrasOutputs, EngineError> {
        let find = |n: &str| {
            outs.iter()
                .find(|t| t.name == n)
                .ok_or_else(|| EngineError::Output(n.into()))
        };
        let map = find("anomaly_map")?;
        let ps = find("patch_scores")?;
        let is = find("image_score")?;
        let cls = find("class_id")?;
        if map.shape.len() != 4 || ps.shape.len() != 3 {
            return Err(EngineError::Output("anomaly_map".into()));
        }
        let o = CrasOutputs {
            batch: map.shape[0],
            anomaly_maps: map
                .f32()
                .ok_or_else(|| EngineError::Output("anomaly_map".into()))?
                .to_vec(),
            map_hw: (map.shape[2], map.shape[3]),
            patch_scores: ps
                .f32()
                .ok_or_else(|| EngineError::Output("patch_scores".into()))?
                .to_vec(),
            patch_hw: (ps.shape[1], ps.shape[2]),
            image_scores: is
                .f32()
                .ok_or_else(|| EngineError::Output("image_score".into()))?
                .to_vec(),
            class_ids: cls
                .i64()
                .ok_or_else(|| EngineError::Output("class_id".into()))?
                .to_vec(),
        };
        o.check_sizes()?;
        Ok(o)
    }

    /// The outputs of a run on `n` images: the graph must have answered for all of them.
    pub fn for_batch(outs: Vec<NamedTensor>, n: usize) -> Result<CrasOutputs, EngineError> {
        let o = CrasOutputs::from_named(outs)?;
        if o.batch < n {
            return Err(EngineError::Batch {
                got: o.batch,
                asked: n,
            });
        }
        Ok(o)
    }

    /// Every output holds `batch` images of its declared size, so [`CrasOutputs::map`]
    /// and [`CrasOutputs::patches`] never index past the data.
    fn check_sizes(&self) -> Result<(), EngineError> {
        let per = |(h, w): (usize, usize)| h.checked_mul(w).and_then(|v| v.checked_mul(self.batch));
        let bad = |name: &str| Err(EngineError::Output(format!("{name} (its size)")));
        if per(self.map_hw) != Some(self.anomaly_maps.len()) {
            return bad("anomaly_map");
        }
        if per(self.patch_hw) != Some(self.patch_scores.len()) {
            return bad("patch_scores");
        }
        if self.image_scores.len() != self.batch {
            return bad("image_score");
        }
        if self.class_ids.len() != self.batch {
            return bad("class_id");
        }
        Ok(())
    }

    pub fn map(&self, i: usize) -> &[f32] {
        let n = self.map_hw.0 * self.map_hw.1;
        &self.anomaly_maps[i * n..(i + 1) * n]
    }

    pub fn patches(&self, i: usize) -> &[f32] {
        let n = self.patch_hw.0 * self.patch_hw.1;
        &self.patch_scores[i * n..(i + 1) * n]
    }
}
