//! Engine latency per image at 288x288: the `lite0-d384` model (pretrained
//! EfficientNet-Lite0, D 384) and the paper's configuration (wide_resnet50_2, D 1536,
//! P 1296; weights are random: timing does not depend on their values), batch 1 and 4,
//! with the onnxruntime engine (and tract when built with `--features tract`). Also prints the multiply-accumulates per image and how
//! far the measured time is from the machine's peak FP32 rate.
//!
//! `frames` times the daemon's two ways in from a camera frame on the lite0 model: the Rust
//! pre-processing then the graph, against the frames stage (bytes in, inside onnxruntime).
//!
//! Run: `cargo bench --bench engine_latency` (needs `cras setup --backbone efficientnet_lite0`
//! and ../shared/fixtures, or CRAS_FIXTURES / CRAS_LITE0_PTH).
//! On a GPU (`--features gpu`, `cras setup --gpu`): BENCH_PROVIDER=cuda|tensorrt, and
//! BENCH_BATCHES=1,8,32 for other batch sizes (default 1,4). A GPU provider that cannot
//! run is an error here, not a fallback.
//! Peak: CRAS_PEAK_GFLOPS, else cores x MHz x 32 FLOP/cycle (AVX2, two 8-lane FMA pipes).

#[path = "../tests/common/mod.rs"]
mod common;

use cras::backbone::{Backbone, BackboneKind};
use cras::engine::{EngineKind, EngineOptions, GpuOptions, PixelLayout, Policy, Provider};
use cras::model::graph::{CrasModel, GraphOptions};
use cras::model::head::{Centers, CrasHead};
use cras::preprocess::{InputSpec, Normalization, normalise_into, resize_and_crop};
use cras::weights::{StateDict, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(
            shape.to_vec(),
            (0..n).map(|_| self.next() * scale).collect(),
        )
    }
}

fn random_state_dict(keys: &[(String, Vec<usize>)], rng: &mut Rng) -> StateDict {
    let mut t = BTreeMap::new();
    for (k, shape) in keys {
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        let tensor = if k.ends_with("running_var") || (shape.len() == 1 && k.ends_with(".weight")) {
            Tensor::f32(shape.clone(), vec![1.0; shape[0]])
        } else if shape.len() == 1 {
            rng.tensor(shape, 0.01)
        } else {
            rng.tensor(shape, (2.0 / fan_in as f32).sqrt())
        };
        t.insert(k.clone(), tensor);
    }
    StateDict {
        tensors: t,
        source: "random".into(),
    }
}

fn random_head(d: usize, rng: &mut Rng) -> CrasHead {
    CrasHead::from_state_dict(&random_state_dict(&CrasHead::expected_keys(d), rng))
        .expect("random head")
}

fn peak_gflops() -> f64 {
    if let Some(v) = std::env::var("CRAS_PEAK_GFLOPS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return v;
    }
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(2000.0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    cores * mhz * 1e-3 * 32.0
}

fn bench(name: &str, model: &CrasModel, runs: usize) {
    let macs = model.macs_per_image().expect("macs");
    let onnx = model.to_onnx(GraphOptions::default()).expect("graph");
    let peak = peak_gflops();
    println!(
        "{name}: {:.2} GMAC/image = {:.2} GFLOP/image; peak {peak:.0} GFLOP/s -> bound {:.1} ms/image",
        macs as f64 * 1e-9,
        2.0 * macs as f64 * 1e-9,
        2.0 * macs as f64 / (peak * 1e9) * 1e3
    );
    let mut kinds = vec![EngineKind::Onnxruntime];
    let provider = match std::env::var("BENCH_PROVIDER").as_deref() {
        Ok("cuda") => Provider::Cuda,
        Ok("tensorrt") => Provider::Tensorrt,
        _ => Provider::Cpu,
    };
    if cfg!(feature = "tract") && provider == Provider::Cpu {
        kinds.push(EngineKind::Tract);
    }
    let batches: Vec<usize> = std::env::var("BENCH_BATCHES")
        .ok()
        .map(|v| v.split(',').filter_map(|b| b.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4]);
    let runs_of = kinds
        .into_iter()
        .flat_map(|k| batches.iter().map(move |b| (k, *b)));
    for (kind, batch) in runs_of {
        let t0 = Instant::now();
        let mut engine = kind
            .load(
                &onnx,
                &EngineOptions {
                    batch,
                    provider,
                    gpu: GpuOptions {
                        policy: Policy::Require,
                        ..GpuOptions::default()
                    },
                    input_hw: (model.height, model.width),
                    ..Default::default()
                },
            )
            .expect("engine");
        let load_s = t0.elapsed().as_secs_f64();
        let input = vec![0.1f32; batch * 3 * model.height * model.width];
        for _ in 0..2 {
            engine
                .run(&input, [batch, 3, model.height, model.width])
                .expect("run");
        }
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            engine
                .run(&input, [batch, 3, model.height, model.width])
                .expect("run");
            times.push(t.elapsed().as_secs_f64() * 1e3 / batch as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times[times.len() / 2];
        let bound = 2.0 * macs as f64 / (peak * 1e9) * 1e3;
        println!(
            "  {} ({}) batch {batch}: median {median:.1} ms/image (min {:.1}, max {:.1}, {runs} runs; session load {load_s:.1} s); {:.1}x the peak-FLOP bound, {:.0} GFLOP/s achieved",
            kind.name(),
            provider.name(),
            times[0],
            times[times.len() - 1],
            median / bound,
            2.0 * macs as f64 / (median * 1e-3) * 1e-9
        );
    }
}

/// Median milliseconds per image of `run` over `runs` calls of `batch` images.
fn median_ms(runs: usize, batch: usize, mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64() * 1e3 / batch as f64
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// Camera frame to scores: Rust pre-processing + graph against the frames stage.
fn bench_frames(model: &CrasModel, runs: usize) {
    let onnx = model.to_onnx(GraphOptions::default()).expect("graph");
    let spec = InputSpec::square(model.height, 329, Normalization::Imagenet);
    let mut engine = EngineKind::Onnxruntime
        .load(
            &onnx,
            &EngineOptions {
                frames: Some(spec.clone()),
                ..Default::default()
            },
        )
        .expect("engine");
    let mut prep_only = EngineKind::Onnxruntime
        .load(
            &common::identity_model(&spec),
            &EngineOptions {
                frames: Some(spec.clone()),
                ..Default::default()
            },
        )
        .expect("engine");
    for ((w, h), batch) in [(640, 480), (1920, 1080)]
        .into_iter()
        .flat_map(|s| [(s, 1usize), (s, 4)])
    {
        let frame = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8])
        });
        let mut input = Vec::new();
        let rust = median_ms(runs, batch, || {
            input.clear();
            for _ in 0..batch {
                let crop = resize_and_crop(&frame, &spec).expect("size");
                normalise_into(&crop, &spec, &mut input);
            }
            engine
                .run(&input, [batch, 3, spec.height, spec.width])
                .expect("run");
        });
        let mut bytes = Vec::new();
        let stage = median_ms(runs, batch, || {
            bytes.clear();
            for _ in 0..batch {
                bytes.extend_from_slice(frame.as_raw());
            }
            engine
                .run_frames(&bytes, [batch, h as usize, w as usize, 3], PixelLayout::Rgb)
                .expect("run");
        });
        let mut prepared = Vec::new();
        let rust_prep = median_ms(runs, batch, || {
            prepared.clear();
            for _ in 0..batch {
                let crop = resize_and_crop(&frame, &spec).expect("size");
                normalise_into(&crop, &spec, &mut prepared);
            }
        });
        let stage_prep = median_ms(runs, batch, || {
            bytes.clear();
            for _ in 0..batch {
                bytes.extend_from_slice(frame.as_raw());
            }
            prep_only
                .run_frames(&bytes, [batch, h as usize, w as usize, 3], PixelLayout::Rgb)
                .expect("run");
        });
        println!(
            "  frames {w}x{h} batch {batch}: pre-processing alone: Rust {rust_prep:.1} ms/image, frames stage {stage_prep:.1} ms/image"
        );
        println!(
            "  frames {w}x{h} batch {batch}: Rust pre-processing + graph {rust:.1} ms/image, frames stage {stage:.1} ms/image ({:.2}x)",
            stage / rust
        );
    }
}

fn main() {
    let fixtures = std::env::var_os("CRAS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let lite0_pth = std::env::var_os("CRAS_LITE0_PTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| cras::setup::backbone_path(&cras::setup::EFFICIENTNET_LITE0));
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |n: &str| filter.as_deref().is_none_or(|f| n.contains(f));

    if wanted("lite0-d384") || wanted("frames") {
        let set = fixtures.join("lite0-d384");
        let backbone = Backbone::load(BackboneKind::EfficientnetLite0, &lite0_pth)
            .expect("Lite0 weights (run `cras setup --backbone efficientnet_lite0`)");
        let head = CrasHead::from_state_dict(
            &StateDict::load(&set.join("ckpt_best_0.pth")).expect("fixture head"),
        )
        .expect("head");
        let centers = Centers::load(&set.join("center.pth")).expect("fixture centers");
        let model = CrasModel {
            backbone: &backbone,
            head: &head,
            centers: &centers,
            height: 288,
            width: 288,
            pre_dim: 384,
            image_score: cras::model::score::ImageScore::PatchMax,
            views: Default::default(),
        };
        if wanted("lite0-d384") {
            bench("lite0-d384", &model, 20);
        }
        if wanted("frames") {
            bench_frames(&model, 20);
        }
    }
    if wanted("wrn50") {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let backbone = Backbone::from_state_dict(
            BackboneKind::WideResnet50_2,
            random_state_dict(
                &Backbone::expected_keys(BackboneKind::WideResnet50_2),
                &mut rng,
            ),
        )
        .expect("wrn50");
        let head = random_head(1536, &mut rng);
        let centers = Centers {
            classes: 2,
            patches: 1296,
            dim: 1536,
            data: (0..2 * 1296 * 1536).map(|_| rng.next()).collect(),
        };
        let model = CrasModel {
            backbone: &backbone,
            head: &head,
            centers: &centers,
            height: 288,
            width: 288,
            pre_dim: 1536,
            image_score: cras::model::score::ImageScore::PatchMax,
            views: Default::default(),
        };
        bench("wrn50-d1536 (paper)", &model, 5);
    }
}
