//! The default engine: onnxruntime through `ort`, with libonnxruntime loaded at run time
//! (no build-time download, no link dependency). The library is the one `cras setup`
//! extracts from the pinned PyPI wheel, or any given by --ort-lib / ORT_DYLIB_PATH.

use super::frames::{PixelLayout, frames_graph};
#[cfg(feature = "gpu")]
mod device_input;
mod session;

use super::provider::Provider;
use super::{Engine, EngineError, EngineOptions, NamedTensor, Placement, Values};
use ort::session::{Session, SessionOutputs};
use ort::value::{Tensor, TensorRef};
use session::placed_session;
pub use session::unavailable;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The onnxruntime release `cras setup` installs.
pub const PINNED_VERSION: &str = "1.32.0";

#[derive(Clone)]
enum RuntimeFailure {
    Missing(String),
    Load(PathBuf, String),
}

static RUNTIME: OnceLock<Result<PathBuf, RuntimeFailure>> = OnceLock::new();
static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Where `cras setup` puts the runtime: `$CRAS_HOME`, else `$XDG_DATA_HOME/cras`,
/// else `~/.local/share/cras`.
pub fn data_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CRAS_HOME") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(p).join("cras");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    home.join(".local/share/cras")
}

/// The libonnxruntime this process loaded, once it did.
pub fn loaded_library() -> Option<PathBuf> {
    RUNTIME.get().and_then(|r| r.as_ref().ok()).cloned()
}

/// The library file `cras setup` installs.
pub fn installed_library() -> PathBuf {
    data_dir()
        .join("lib")
        .join(format!("libonnxruntime.so.{PINNED_VERSION}"))
}

fn candidates(explicit: Option<&Path>, gpu: bool) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = explicit {
        c.push(p.to_path_buf());
        return c;
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        c.push(PathBuf::from(p));
        return c;
    }
    // The GPU build (`cras setup --gpu`) only where a GPU provider is asked for: the
    // CPU library is the release the CPU path is tested with.
    if gpu {
        c.push(crate::setup::gpu::gpu_library());
    }
    c.push(installed_library());
    // Where the Debian package puts it (`/usr/lib/cras`).
    c.push(crate::install::packaged(&format!(
        "lib/cras/libonnxruntime.so.{PINNED_VERSION}"
    )));
    c
}

/// Loads libonnxruntime once per process (the GPU build first when `gpu` and `cras
/// setup --gpu` installed it). Later calls return the first outcome.
pub fn ensure_runtime(explicit: Option<&Path>, gpu: bool) -> Result<PathBuf, EngineError> {
    let outcome = RUNTIME.get_or_init(|| {
        let cands = candidates(explicit, gpu);
        let Some(path) = cands.iter().find(|p| p.is_file()).cloned() else {
            let looked = cands
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>();
            return Err(RuntimeFailure::Missing(looked.join(", ")));
        };
        if gpu {
            // The NVIDIA libraries beside a GPU build, loaded before the providers that
            // need them (which carry no search path of their own).
            super::gpu_info::preload_beside(&path);
        }
        let fail = |e: &dyn std::fmt::Display| RuntimeFailure::Load(path.clone(), e.to_string());
        let builder = ort::init_from(&path).map_err(|e| fail(&e))?;
        // Microsoft builds send usage telemetry unless told not to (ort enables it by
        // default); a plant's inspection station sends nothing to anyone.
        let env = builder
            .with_name("cras")
            .with_telemetry(false)
            .build()
            .map_err(|e| fail(&e))?;
        let _ = ENVIRONMENT.set(env);
        Ok(path)
    });
    match outcome {
        Ok(p) => Ok(p.clone()),
        Err(RuntimeFailure::Missing(looked)) => Err(EngineError::RuntimeMissing {
            looked: looked.clone(),
        }),
        Err(RuntimeFailure::Load(path, reason)) => Err(EngineError::RuntimeLoad {
            path: path.clone(),
            reason: reason.clone(),
        }),
    }
}

/// The loaded library's version ("1.32.0"), from its build string; "unknown" before
/// [`ensure_runtime`] succeeded.
pub fn runtime_version() -> String {
    if ENVIRONMENT.get().is_none() {
        return "unknown".into();
    }
    version_from_build_info(ort::info()).unwrap_or_else(|| "unknown".into())
}

fn version_from_build_info(info: &str) -> Option<String> {
    let branch = info.split("git-branch=").nth(1)?;
    let v = branch.split([',', ' ']).next()?;
    Some(v.trim_start_matches("rel-").to_string())
}

pub struct OrtEngine {
    session: Session,
    /// The frames stage ([`frames_graph`]), when loaded with one.
    frames: Option<Session>,
    placement: Placement,
    /// CUDA device the GPU providers use.
    #[cfg(feature = "gpu")]
    ordinal: u32,
    /// Made on the first batch of device frames.
    #[cfg(feature = "gpu")]
    device_input: Option<device_input::DeviceInput>,
}

fn run_err(e: ort::Error) -> EngineError {
    EngineError::Run(e.to_string())
}

impl OrtEngine {
    pub fn load(model: &[u8], opts: &EngineOptions) -> Result<OrtEngine, EngineError> {
        ensure_runtime(opts.ort_lib.as_deref(), opts.provider.is_gpu())?;
        let threads = opts.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let model = placed_session(model, opts.provider, opts, threads, true)?;
        // The frames stage's antialiased resize is no TensorRT layer: on a GPU the
        // stage runs on CUDA (docs/decisions.md, "The frames stage").
        let stage_on = if model.serving.is_gpu() {
            Provider::Cuda
        } else {
            Provider::Cpu
        };
        let frames = match &opts.frames {
            Some(spec) => Some(
                placed_session(&frames_graph(spec), stage_on, opts, threads, false)
                    .map_err(|e| EngineError::Load(format!("the frames stage: {e}")))?
                    .session,
            ),
            None => None,
        };
        Ok(OrtEngine {
            session: model.session,
            frames,
            placement: Placement {
                wanted: opts.provider,
                serving: model.serving,
                fallback: model.fallback,
            },
            #[cfg(feature = "gpu")]
            ordinal: opts.gpu.device,
            #[cfg(feature = "gpu")]
            device_input: None,
        })
    }
}

/// Every output of a run, copied out of onnxruntime's buffers.
fn collect(outputs: SessionOutputs<'_>) -> Result<Vec<NamedTensor>, EngineError> {
    let mut result = Vec::new();
    for (name, value) in outputs.iter() {
        let (shape, values) = if let Ok((s, v)) = value.try_extract_tensor::<f32>() {
            (
                s.iter().map(|d| *d as usize).collect(),
                Values::F32(v.to_vec()),
            )
        } else if let Ok((s, v)) = value.try_extract_tensor::<i64>() {
            (
                s.iter().map(|d| *d as usize).collect(),
                Values::I64(v.to_vec()),
            )
        } else {
            return Err(EngineError::Output(name.to_string()));
        };
        result.push(NamedTensor {
            name: name.to_string(),
            shape,
            values,
        });
    }
    Ok(result)
}

impl Engine for OrtEngine {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn run(&mut self, image: &[f32], shape: [usize; 4]) -> Result<Vec<NamedTensor>, EngineError> {
        let input = TensorRef::from_array_view((shape, image)).map_err(run_err)?;
        let outputs = self
            .session
            .run(ort::inputs!["image" => input])
            .map_err(run_err)?;
        collect(outputs)
    }

    fn placement(&self) -> Placement {
        self.placement.clone()
    }

    fn takes_frames(&self) -> bool {
        self.frames.is_some()
    }

    fn run_frames(
        &mut self,
        frames: &[u8],
        shape: [usize; 4],
        layout: PixelLayout,
    ) -> Result<Vec<NamedTensor>, EngineError> {
        let Some(stage) = self.frames.as_mut() else {
            return Err(EngineError::NoFramesStage("onnxruntime"));
        };
        if shape[3] != layout.channels() || shape.iter().product::<usize>() != frames.len() {
            return Err(EngineError::Run(format!(
                "{} bytes of frames do not make {shape:?} in {layout:?}",
                frames.len()
            )));
        }
        let input = TensorRef::from_array_view((shape, frames)).map_err(run_err)?;
        let channels =
            Tensor::from_array(([3usize], layout.rgb_indices().to_vec())).map_err(run_err)?;
        let mut prepared = stage
            .run(ort::inputs!["frames" => input, "channels" => channels])
            .map_err(run_err)?;
        let image = prepared
            .remove("image")
            .ok_or_else(|| EngineError::Output("image (frames stage)".into()))?;
        drop(prepared);
        let outputs = self
            .session
            .run(ort::inputs!["image" => image])
            .map_err(run_err)?;
        collect(outputs)
    }

    #[cfg(feature = "gpu")]
    fn takes_device_frames(&self) -> bool {
        // The frames stage runs on CUDA exactly when the model serves on a GPU.
        self.frames.is_some() && self.placement.serving.is_gpu()
    }

    #[cfg(feature = "gpu")]
    fn run_device_frames(
        &mut self,
        frames: &[&super::device::DeviceFrame],
    ) -> Result<Vec<NamedTensor>, EngineError> {
        if !self.takes_device_frames() {
            return Err(EngineError::NoFramesStage("onnxruntime (GPU)"));
        }
        let Some(stage) = self.frames.as_mut() else {
            return Err(EngineError::NoFramesStage("onnxruntime"));
        };
        let input = match self.device_input.as_mut() {
            Some(d) => d,
            None => self
                .device_input
                .insert(device_input::DeviceInput::new(stage, self.ordinal)?),
        };
        input.run(stage, &mut self.session, frames)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_comes_from_the_build_string() {
        let info =
            "ORT Build Info: git-branch=rel-1.32.0, git-commit-id=26250ae, build type=Release";
        assert_eq!(
            super::version_from_build_info(info).as_deref(),
            Some("1.32.0")
        );
        assert_eq!(super::version_from_build_info("no branch"), None);
    }
}
