//! The daemon against the engine alone: sustained frames/s and end-to-end latency (capture
//! to verdict) of `cras run` with 1 and 4 test-pattern cameras, next to the engine's own
//! rate on the same model; the ratio is the pipeline's overhead. Then peak RSS sampled
//! over a long run, to see that memory stays flat.
//!
//! Model: the lite0-d384 fixture (pretrained EfficientNet-Lite0, D 384, 288 px) through
//! `cras import-reference`, default engine (onnxruntime). Cameras: videotestsrc 640x480.
//! Two loads per camera count:
//! - saturated: every camera offers 30 frames/s; the daemon takes what it can and drops
//!   the rest (frames/s judged is the throughput, drops are counted);
//! - paced: the cameras together offer about half the engine's rate; latency p50/p99
//!   come from the daemon's end-to-end histogram (`/metrics`, interpolated in buckets).
//!
//! Run: `cargo bench --bench daemon_throughput` (needs `cras setup --backbone
//! efficientnet_lite0` and ../shared/fixtures). BENCH_SECS (default 30) per load;
//! BENCH_RSS_SECS (default 600) for the memory run, 0 to skip it.

#[path = "../tests/common/mod.rs"]
mod common;

use common::daemon::{free_port, rss_kib};
use common::fixtures;
use cras::daemon::prometheus::bucket_quantile;
use cras::engine::{CrasOutputs, EngineKind, EngineOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bundle(dir: &Path) -> PathBuf {
    let set = fixtures().join("lite0-d384");
    let weights = cras::setup::backbone_path(&cras::setup::EFFICIENTNET_LITE0);
    let out = dir.join("model");
    let st = Command::new(env!("CARGO_BIN_EXE_cras"))
        .args(["import-reference", "--backbone"])
        .arg(format!("efficientnet_lite0={}", weights.display()))
        .arg("--checkpoint")
        .arg(set.join("ckpt_best_0.pth"))
        .arg("--centers")
        .arg(set.join("center.pth"))
        .args(["--classes", "alpha,beta", "--no-bn-replay", "--out"])
        .arg(&out)
        .stderr(Stdio::null())
        .status()
        .expect("cras import-reference");
    assert!(
        st.success(),
        "import-reference failed (fixtures and Lite0 weights needed)"
    );
    out
}

/// Engine alone: images/s at batch `n` on the bundle's graph.
fn engine_rate(model: &Path, n: usize, threads: Option<usize>) -> f64 {
    let b = cras::model::bundle::Bundle::read(model).unwrap();
    let spec = &b.meta.input;
    let mut engine = EngineKind::Onnxruntime
        .load(
            &b.onnx,
            &EngineOptions {
                ort_lib: None,
                threads,
                batch: n,
                ..Default::default()
            },
        )
        .unwrap();
    let input = vec![0.1f32; n * 3 * spec.height * spec.width];
    let shape = [n, 3, spec.height, spec.width];
    for _ in 0..3 {
        CrasOutputs::from_named(engine.run(&input, shape).unwrap()).unwrap();
    }
    let runs = 20;
    let t0 = Instant::now();
    for _ in 0..runs {
        CrasOutputs::from_named(engine.run(&input, shape).unwrap()).unwrap();
    }
    (runs * n) as f64 / t0.elapsed().as_secs_f64()
}

fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\n\r\n");
    let mut t = String::new();
    let _ = s.read_to_string(&mut t);
    t
}

fn sum_of(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn e2e_buckets(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter(|l| l.starts_with("cras_stage_latency_ms_bucket{stage=\"end_to_end\""))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

struct Run {
    child: Child,
    http: u16,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, model: &Path, cameras: usize, fps: u32, max_batch: usize) -> Run {
    let http = free_port();
    let mut cams = String::new();
    for i in 0..cameras {
        cams.push_str(&format!(
            "  - {{id: cam{i}, pipeline: test-pattern, params: {{pattern: ball, width: 640, height: 480, fps: {fps}}}, max_fps: {fps}}}\n"
        ));
    }
    let yaml = format!(
        "device: {{site: bench, id: box}}\n\
         model: {{bundle: {}, thresholds: {{alpha: {{image: 0.99, pixel: 0.99}}, beta: {{image: 0.99, pixel: 0.99}}}}}}\n\
         cameras:\n{cams}\
         batching: {{max_batch: {max_batch}, max_wait_ms: 10}}\n\
         mqtt: {{url: \"mqtt://127.0.0.1:{}\", client_id: bench}}\n\
         spool: {{dir: {}}}\n\
         http: {{listen: \"127.0.0.1:{http}\"}}\n\
         logging: {{level: warn}}\n",
        model.display(),
        free_port(),
        dir.join("spool").display()
    );
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cras"))
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--pipelines")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines"))
        .env("CRAS_LOG", "error")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run = Run { child, http };
    let until = Instant::now() + Duration::from_secs(60);
    while sum_of(&metrics(http), "cras_frames_processed_total") < 5.0 {
        assert!(
            Instant::now() < until,
            "the daemon judged no frame within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    run
}

/// (frames judged per s, frames dropped per s, p50 ms, p99 ms) over `secs`.
fn measure(run: &Run, secs: u64) -> (f64, f64, f64, f64) {
    let m0 = metrics(run.http);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let m1 = metrics(run.http);
    let dt = t0.elapsed().as_secs_f64();
    let rate = |p: &str| (sum_of(&m1, p) - sum_of(&m0, p)) / dt;
    let b0 = e2e_buckets(&m0);
    let b1 = e2e_buckets(&m1);
    let window: Vec<(f64, f64)> = b1
        .iter()
        .zip(b0.iter())
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    (
        rate("cras_frames_processed_total"),
        rate("cras_frames_dropped_total"),
        bucket_quantile(&window, 0.5).unwrap_or(f64::NAN),
        bucket_quantile(&window, 0.99).unwrap_or(f64::NAN),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs = env_secs("BENCH_SECS", 30);
    let rss_secs = env_secs("BENCH_RSS_SECS", 600);
    let dir = tempfile::tempdir().unwrap();
    let model = bundle(dir.path());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cras daemon vs engine (lite0-d384, 288 px, onnxruntime, {cores} cores)");
    let e1 = engine_rate(&model, 1, None);
    let e4 = engine_rate(&model, 4, None);
    println!("engine alone: {e1:.1} images/s at batch 1, {e4:.1} at batch 4");
    println!(
        "| cameras | offered fps | judged fps | dropped fps | e2e p50 ms | e2e p99 ms | judged / engine |"
    );
    println!("|---|---|---|---|---|---|---|");
    for cameras in [1usize, 4] {
        let max_batch = cameras.min(4);
        let engine = if max_batch == 1 { e1 } else { e4 };
        for paced in [false, true] {
            let fps = if paced {
                ((engine * 0.5) / cameras as f64).floor().max(1.0) as u32
            } else {
                30
            };
            let run = start(dir.path(), &model, cameras, fps, max_batch);
            std::thread::sleep(Duration::from_secs(3));
            let (judged, dropped, p50, p99) = measure(&run, secs);
            println!(
                "| {cameras} | {} | {judged:.1} | {dropped:.1} | {p50:.0} | {p99:.0} | {:.2} |",
                fps as usize * cameras,
                judged / engine
            );
            drop(run);
            let _ = std::fs::remove_dir_all(dir.path().join("spool"));
        }
    }
    if rss_secs > 0 {
        // Saturated 4 cameras for the whole time: the worst case for queues and spool.
        let run = start(dir.path(), &model, 4, 30, 4);
        let pid = run.child.id();
        let t0 = Instant::now();
        let mut samples = Vec::new();
        while t0.elapsed().as_secs() < rss_secs {
            std::thread::sleep(Duration::from_secs(10));
            samples.push((t0.elapsed().as_secs(), rss_kib(pid)));
        }
        let m = metrics(run.http);
        let first = samples.first().map_or(0, |s| s.1);
        let last = samples.last().map_or(0, |s| s.1);
        let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
        println!(
            "RSS over {rss_secs} s, 4 saturated cameras: {:.0} MiB after 10 s, {:.0} MiB at the end, peak {:.0} MiB; {} frames judged, {} dropped",
            first as f64 / 1024.0,
            last as f64 / 1024.0,
            peak as f64 / 1024.0,
            sum_of(&m, "cras_frames_processed_total"),
            sum_of(&m, "cras_frames_dropped_total")
        );
        let per_minute: Vec<String> = samples
            .iter()
            .filter(|s| s.0 % 60 < 10)
            .map(|s| format!("{}s:{:.0}", s.0, s.1 as f64 / 1024.0))
            .collect();
        println!("RSS samples (MiB): {}", per_minute.join(" "));
    }
}
