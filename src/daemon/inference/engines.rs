//! Which engine the daemon serves on, and the one it builds meanwhile.
//!
//! CPU and CUDA engines load in seconds. A TensorRT engine loads in seconds from the
//! engine cache once built and checked; without one the daemon does not start blind:
//! it serves at once on CUDA (or the CPU), builds the TensorRT engine in the background
//! ([`Upgrade`]), checks it on the frames it is serving, records the check in the
//! cache, and swaps engines between two batches (docs/decisions.md, "No blind first
//! boot").

use super::config::ModelConfig;
use crate::engine::cache::{self, CheckRecord, EngineCache, Lookup};
use crate::engine::upgrade::{Tolerance, Upgrade};
use crate::engine::{Engine, EngineError, EngineOptions, Policy, Provider};
use crate::model::bundle::Bundle;
use std::sync::Arc;
use std::time::Instant;

/// Frames the new engine is checked on before it serves.
pub const CHECK_IMAGES: usize = 8;

/// What the daemon serves on, and what it will serve on once built and checked.
pub struct Engines {
    /// The provider configured.
    pub wanted: Provider,
    pub serving: Box<dyn Engine>,
    pub upgrade: Option<Upgrade>,
    /// Why the configured provider does not serve (policy `prefer`), beyond what the
    /// engine itself reports.
    pub note: Option<String>,
}

/// The engine options of `model` for `bundle`, on `provider`.
pub fn options(model: &ModelConfig, bundle: &Bundle, max_batch: usize) -> EngineOptions {
    EngineOptions {
        ort_lib: model.ort_lib.clone(),
        threads: model.threads,
        batch: max_batch,
        frames: model.frames_stage().then(|| bundle.meta.input.clone()),
        provider: model.provider,
        gpu: model.gpu.clone(),
        input_hw: (bundle.meta.input.height, bundle.meta.input.width),
        ..EngineOptions::default()
    }
}

/// Loads what `model` asks for ([module docs](self)).
pub fn load(
    model: &ModelConfig,
    bundle: &Bundle,
    max_batch: usize,
) -> Result<Engines, EngineError> {
    let opts = options(model, bundle, max_batch);
    let load = |o: &EngineOptions| model.engine.load(&bundle.onnx, o);
    if model.provider != Provider::Tensorrt {
        return Ok(Engines {
            wanted: model.provider,
            serving: load(&opts)?,
            upgrade: None,
            note: None,
        });
    }
    let require = model.gpu.policy == Policy::Require;
    // Meanwhile (or instead) on CUDA, else the CPU.
    let interim = |note: Option<String>| -> Result<Engines, EngineError> {
        let o = EngineOptions {
            provider: Provider::Cuda,
            gpu: crate::engine::GpuOptions {
                policy: Policy::Prefer,
                ..model.gpu.clone()
            },
            ..opts.clone()
        };
        Ok(Engines {
            wanted: Provider::Tensorrt,
            serving: load(&o)?,
            upgrade: None,
            note,
        })
    };
    // The library first: its build and version decide before the GPU is asked.
    crate::engine::onnxruntime::ensure_runtime(model.ort_lib.as_deref(), true)?;
    let key = match crate::engine::onnxruntime::unavailable(Provider::Tensorrt).map_or_else(
        || {
            cache::key_for(
                &bundle.onnx,
                model.gpu.device,
                model.gpu.fp16,
                max_batch,
                opts.input_hw,
            )
        },
        Err,
    ) {
        Ok(k) => k,
        Err(reason) if require => {
            return Err(EngineError::Provider {
                provider: "tensorrt",
                reason,
            });
        }
        Err(reason) => {
            tracing::warn!("model.provider tensorrt unavailable, serving without it: {reason}");
            return interim(Some(format!("tensorrt unavailable: {reason}")));
        }
    };
    let store = EngineCache::in_state_dir();
    let lookup = store
        .lookup(&key)
        .map_err(|e| EngineError::Load(e.to_string()))?;
    match lookup {
        Lookup::Ready(check) => {
            tracing::info!(
                "engine: TensorRT engine from the cache {} (checked on {} images: score {:.1e}, map {:.1e})",
                store.paths(&key).engines.display(),
                check.images,
                check.max_score_diff,
                check.max_map_diff
            );
            let o = EngineOptions {
                cache: Some(store.paths(&key)),
                ..opts.clone()
            };
            Ok(Engines {
                wanted: Provider::Tensorrt,
                serving: load(&o)?,
                upgrade: None,
                note: None,
            })
        }
        Lookup::Failed(check) => {
            let reason = format!(
                "its TensorRT engine failed the parity check (score differs by {:.1e}, map by {:.1e}; \
                 tolerance {:.1e} / {:.1e}){}: delete {} to build it again",
                check.max_score_diff,
                check.max_map_diff,
                check.score_tolerance,
                check.map_tolerance,
                if model.gpu.fp16 {
                    ", so fp16 is refused: set model.gpu.fp16: false"
                } else {
                    ""
                },
                store.paths(&key).engines.display()
            );
            if require {
                return Err(EngineError::Provider {
                    provider: "tensorrt",
                    reason,
                });
            }
            interim(Some(format!("tensorrt refused: {reason}")))
        }
        Lookup::Missing | Lookup::Unchecked => {
            let paths = store
                .prepare(&key)
                .map_err(|e| EngineError::Load(e.to_string()))?;
            let mut engines = interim(None)?;
            let target = EngineOptions {
                cache: Some(paths),
                gpu: crate::engine::GpuOptions {
                    policy: Policy::Require,
                    ..model.gpu.clone()
                },
                ..opts.clone()
            };
            let kind = model.engine;
            let onnx = Arc::new(bundle.onnx.clone());
            let started = Instant::now();
            let record = move |d: &crate::engine::upgrade::Differences, t: Tolerance| {
                let check = CheckRecord::of(d, t, started.elapsed().as_secs_f64());
                if let Err(e) = store.record(&key, &check) {
                    tracing::error!("engine: cannot record the check: {e}");
                }
            };
            tracing::info!(
                "engine: no checked TensorRT engine in the cache; serving on {} while it is built (minutes)",
                engines.serving.placement().serving.name()
            );
            engines.upgrade = Some(
                Upgrade::start(
                    "engine-build",
                    move || kind.load(&onnx, &target),
                    CHECK_IMAGES,
                    Tolerance::default(),
                    record,
                )
                .map_err(|e| EngineError::Load(format!("cannot start the engine build: {e}")))?,
            );
            Ok(engines)
        }
    }
}

/// Whether frames in `memory` can go to `engine` on the GPU, else why not (the camera
/// then captures through its host-memory fallback).
pub fn device_frames(
    engine: &dyn Engine,
    memory: crate::daemon::capture::Memory,
) -> Result<(), String> {
    if memory == crate::daemon::capture::Memory::Host {
        return Ok(());
    }
    #[cfg(feature = "gpu")]
    {
        if !engine.takes_device_frames() {
            return Err(format!(
                "the engine serves on {} without a GPU frames stage (model.preprocess)",
                engine.placement().serving.name()
            ));
        }
        crate::engine::device::available(memory).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = engine;
        Err("this cras is built without the `gpu` feature".into())
    }
}
