//! `cras engine prepare`: builds a bundle's TensorRT engine ahead of time into the
//! engine cache, then checks it against the CPU engine on the given images and records
//! the differences in the cache (`check.json`). A daemon started later with the same
//! model, GPU, libraries, precision and `batching.max_batch` loads it in seconds.

use crate::engine::cache::{self, CheckRecord, EngineCache};
use crate::engine::upgrade::{Differences, Sample, SampleInput, Tolerance, check_one};
use crate::engine::{CrasOutputs, EngineKind, EngineOptions, GpuOptions, Policy, Provider};
use crate::model::bundle::Bundle;
use crate::preprocess;
use crate::tool_error::{Result, ToolError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct PrepareOptions {
    pub model: PathBuf,
    /// Images to check the engine on (files).
    pub images: Vec<PathBuf>,
    /// The daemon's `batching.max_batch`: the engine is built for 1 to this many images.
    pub max_batch: usize,
    pub gpu: GpuOptions,
    pub engine_options: EngineOptions,
}

/// What was built and how it compared.
pub struct Prepared {
    pub cache_dir: PathBuf,
    pub check: CheckRecord,
}

pub fn run(o: &PrepareOptions) -> Result<Prepared> {
    if o.images.is_empty() {
        return Err(ToolError::Options(
            "give --images: a few good and defective images of the line to check the engine on"
                .into(),
        ));
    }
    if !(1..=64).contains(&o.max_batch) {
        return Err(ToolError::Options(
            "--max-batch must be from 1 to 64".into(),
        ));
    }
    let bundle = Bundle::read(&o.model)?;
    let spec = bundle.meta.input.clone();
    crate::engine::onnxruntime::ensure_runtime(o.engine_options.ort_lib.as_deref(), true)?;
    let gpu_missing =
        |reason: String| ToolError::Options(format!("TensorRT unavailable: {reason}"));
    if let Some(why) = crate::engine::onnxruntime::unavailable(Provider::Tensorrt) {
        return Err(gpu_missing(why));
    }
    let hw = (spec.height, spec.width);
    let key = cache::key_for(&bundle.onnx, o.gpu.device, o.gpu.fp16, o.max_batch, hw)
        .map_err(gpu_missing)?;
    let store = EngineCache::in_state_dir();
    let paths = store
        .prepare(&key)
        .map_err(|e| ToolError::Options(e.to_string()))?;
    let base = EngineOptions {
        batch: o.max_batch,
        input_hw: hw,
        ..o.engine_options.clone()
    };

    // The reference: the CPU engine's answers on the images, batch by batch.
    let mut cpu = EngineKind::Onnxruntime.load(&bundle.onnx, &base)?;
    let mut samples = Vec::new();
    for chunk in o.images.chunks(o.max_batch) {
        let mut data = Vec::new();
        for path in chunk {
            data.extend(preprocess::prepare(path, &spec)?.0);
        }
        let shape = [chunk.len(), 3, spec.height, spec.width];
        let outputs = CrasOutputs::for_batch(cpu.run(&data, shape)?, chunk.len())?;
        samples.push(Sample {
            input: SampleInput::Prepared { data, shape },
            n: chunk.len(),
            outputs,
        });
    }
    drop(cpu);

    eprintln!(
        "building the TensorRT engine for {} (compute capability {}, TensorRT {}, {}) into {}",
        key.gpu_name,
        key.compute_capability,
        key.tensorrt_version,
        key.precision,
        paths.engines.display()
    );
    let target = EngineOptions {
        provider: Provider::Tensorrt,
        gpu: GpuOptions {
            policy: Policy::Require,
            ..o.gpu.clone()
        },
        cache: Some(paths.clone()),
        ..base
    };
    let started = Instant::now();
    let onnx = bundle.onnx.clone();
    let build = std::thread::Builder::new()
        .name("engine-build".into())
        .spawn(move || EngineKind::Onnxruntime.load(&onnx, &target))
        .map_err(|source| ToolError::Spawn {
            what: "the engine build".into(),
            source,
        })?;
    // A line per minute: a first build takes minutes and must not look hung.
    let mut next = Duration::from_secs(60);
    while !build.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() >= next {
            eprintln!(
                "still building the TensorRT engine: {} min",
                next.as_secs() / 60
            );
            next += Duration::from_secs(60);
        }
    }
    let mut gpu = build
        .join()
        .map_err(|_| ToolError::Data("the engine build panicked".into()))??;
    let build_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "built in {build_seconds:.0} s; checking it on {} images",
        o.images.len()
    );

    let mut d = Differences::default();
    for s in &samples {
        check_one(gpu.as_mut(), s, &mut d).map_err(ToolError::Data)?;
    }
    let t = Tolerance::default();
    let check = CheckRecord::of(&d, t, build_seconds);
    store
        .record(&key, &check)
        .map_err(|e| ToolError::Options(e.to_string()))?;
    let figures = format!(
        "on {} images the TensorRT engine's scores differ from the CPU engine's by at most {:.1e} \
         (tolerance {:.1e}), its maps by {:.1e} (tolerance {:.1e}), its class on {} images",
        d.images, d.score, t.score, d.map, t.map, d.class
    );
    if !check.passed {
        return Err(ToolError::Data(format!(
            "refused: {figures}{}",
            if o.gpu.fp16 {
                "; fp16 is too far from fp32 here: prepare without --fp16"
            } else {
                ""
            }
        )));
    }
    eprintln!("{figures}: kept");
    Ok(Prepared {
        cache_dir: paths.engines,
        check,
    })
}
