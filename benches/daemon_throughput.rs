//! The daemon against the engine alone: sustained frames/s and end-to-end latency (capture
//! to verdict) of `cras run` with 1 and 4 test-pattern cameras, next to the engine's own
//! rate on the same model; the ratio is the pipeline's overhead. Then peak RSS sampled
//! over a long run, to see that memory stays flat.
//!
//! Model: the lite0-d384 fixture (pretrained EfficientNet-Lite0, D 384, 288 px) through
//! `cras import-reference`, default engine (onnxruntime). Cameras: videotestsrc 640x480.
//! Two loads per camera count:
//! - saturated: the cameras together offer 1.5x the engine's rate (each at least 30
//!   frames/s); the daemon takes what it can and drops
//!   the rest (frames/s judged is the throughput, drops are counted);
//! - paced: the cameras together offer about half the engine's rate; latency p50/p99
//!   come from the daemon's end-to-end histogram (`/metrics`, interpolated in buckets).
//!
//! Two more columns per load: the daemon's mean preparation (resize, crop, normalise)
//! and engine call times from its /metrics, and for saturated loads the engine's busy
//! share, judged x call ms / max_batch: the fraction of the time the daemon kept its
//! engine running, measured within the run itself. The engine-alone ratio compares two
//! runs minutes apart on a shared machine whose speed drifts by 10-20 %; the busy share
//! does not.
//!
//! The sources' own CPU is accounted apart: every thread of the daemon is read from
//! /proc (`utime + stime`); GStreamer's streaming threads (named `<element>:<pad>`, and
//! GLib's `pool-*` workers) are the sources, everything else is the daemon. Two source
//! kinds: `ball` (rendered and converted per frame, as before) and `solid-color`
//! (nearly free: what the daemon costs with a source that costs nothing). The last
//! column divides the judged rate by the engine's rate scaled to the cores the sources
//! left: judged / (engine x (cores - source cores) / cores).
//!
//! `queue` (BENCH_ONLY=queue) prints the queue-latency histogram (capture to the start
//! of the engine call) for one camera at 5 fps (the demo line's shape) and 4 cameras,
//! default batching (max_batch 4, max_wait_ms 20). BENCH_CRAS_BIN runs another `cras`
//! binary (an older build, for before/after).
//!
//! Run: `cargo bench --bench daemon_throughput` (needs `cras setup --backbone
//! efficientnet_lite0` and ../shared/fixtures). BENCH_SECS (default 30) per load;
//! BENCH_RSS_SECS (default 600) for the memory run, 0 to skip it.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "daemon_throughput/scrape.rs"]
mod scrape;
#[path = "daemon_throughput/threads.rs"]
mod threads;

use common::daemon::{free_port, rss_kib};
use common::fixtures;
use cras::daemon::prometheus::bucket_quantile;
use cras::engine::{CrasOutputs, EngineKind, EngineOptions};
use scrape::{metrics, stage_mean, sum_of, window};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use threads::{cpu_split, print_threads, thread_cpu};

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

/// How the daemon under test is set up.
struct Load<'a> {
    cameras: usize,
    fps: u32,
    pattern: &'a str,
    max_batch: usize,
    max_wait_ms: u64,
}

fn cras_bin() -> String {
    std::env::var("BENCH_CRAS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cras").to_string())
}

fn start(dir: &Path, model: &Path, load: &Load) -> Run {
    let Load {
        cameras,
        fps,
        pattern,
        max_batch,
        max_wait_ms,
    } = *load;
    let http = free_port();
    let mut cams = String::new();
    for i in 0..cameras {
        cams.push_str(&format!(
            "  - {{id: cam{i}, pipeline: test-pattern, params: {{pattern: {pattern}, width: 640, height: 480, fps: {fps}}}, max_fps: {fps}}}\n"
        ));
    }
    let yaml = format!(
        "device: {{site: bench, id: box}}\n\
         model: {{bundle: {}, thresholds: {{alpha: {{image: 0.99, pixel: 0.99}}, beta: {{image: 0.99, pixel: 0.99}}}}}}\n\
         cameras:\n{cams}\
         batching: {{max_batch: {max_batch}, max_wait_ms: {max_wait_ms}}}\n\
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
    let child = Command::new(cras_bin())
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

struct Measured {
    judged: f64,
    dropped: f64,
    p50: f64,
    p99: f64,
    /// Cores busy with the sources and with the daemon's own work.
    source_cores: f64,
    daemon_cores: f64,
    /// The queue stage's histogram over the window: (le, count).
    queue: Vec<(f64, f64)>,
    /// Mean host-side preparation per frame (resize, crop, normalise), ms.
    prepare_ms: f64,
    /// Mean engine call as the daemon sees it, ms (per batch).
    engine_ms: f64,
}

/// What the daemon did over `secs`.
fn measure(run: &Run, secs: u64) -> Measured {
    let pid = run.child.id();
    let m0 = metrics(run.http);
    let c0 = cpu_split(pid);
    let before = thread_cpu(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let m1 = metrics(run.http);
    let c1 = cpu_split(pid);
    if std::env::var_os("BENCH_THREADS").is_some() {
        print_threads(&before, &thread_cpu(pid), t0.elapsed().as_secs_f64());
    }
    let dt = t0.elapsed().as_secs_f64();
    let rate = |p: &str| (sum_of(&m1, p) - sum_of(&m0, p)) / dt;
    let e2e = window(&m0, &m1, "end_to_end");
    Measured {
        judged: rate("cras_frames_processed_total"),
        dropped: rate("cras_frames_dropped_total"),
        p50: bucket_quantile(&e2e, 0.5).unwrap_or(f64::NAN),
        p99: bucket_quantile(&e2e, 0.99).unwrap_or(f64::NAN),
        source_cores: (c1.0 - c0.0) / dt,
        daemon_cores: (c1.1 - c0.1) / dt,
        queue: window(&m0, &m1, "queue"),
        prepare_ms: stage_mean(&m0, &m1, "preprocess"),
        engine_ms: stage_mean(&m0, &m1, "inference"),
    }
}

/// The queue stage before and after: one camera at 5 fps (the demo line's shape), 2
/// cameras (fewer than max_batch: nothing more can join once both are in) and 4
/// cameras, at 2 fps each (under half the engine's rate here, so that queues show
/// batching, not a backlog); default batching.
fn queue_histograms(dir: &Path, model: &Path, secs: u64) {
    println!("queue latency (capture to engine call), {}:", cras_bin());
    for (cameras, fps) in [(1usize, 5u32), (2, 2), (4, 2)] {
        let load = Load {
            cameras,
            fps,
            pattern: "ball",
            max_batch: 4,
            max_wait_ms: 20,
        };
        let run = start(dir, model, &load);
        std::thread::sleep(Duration::from_secs(3));
        let m = measure(&run, secs);
        let total = m.queue.last().map_or(0.0, |b| b.1);
        let cells: Vec<String> = m
            .queue
            .iter()
            .scan(0.0, |prev, (le, c)| {
                let n = c - *prev;
                *prev = *c;
                Some((le, n))
            })
            .filter(|(_, n)| *n > 0.0)
            .map(|(le, n)| format!("<={le}: {n:.0}"))
            .collect();
        println!(
            "  {cameras} camera(s) x {fps} fps: {total:.0} frames, p50 {:.1} ms, p99 {:.1} ms; {}",
            bucket_quantile(&m.queue, 0.5).unwrap_or(f64::NAN),
            bucket_quantile(&m.queue, 0.99).unwrap_or(f64::NAN),
            cells.join(", ")
        );
        drop(run);
        let _ = std::fs::remove_dir_all(dir.join("spool"));
    }
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
    if std::env::var("BENCH_ONLY").as_deref() == Ok("queue") {
        return queue_histograms(dir.path(), &model, secs);
    }
    let e1 = engine_rate(&model, 1, None);
    let e4 = engine_rate(&model, 4, None);
    println!("engine alone: {e1:.1} images/s at batch 1, {e4:.1} at batch 4");
    println!(
        "| cameras | source | offered fps | judged fps | dropped fps | e2e p50 ms | e2e p99 ms | source cores | daemon cores | judged / engine | judged / engine on the cores left | prepare ms / frame | engine call ms | engine busy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for cameras in [1usize, 4] {
        let max_batch = cameras.min(4);
        let engine = if max_batch == 1 { e1 } else { e4 };
        for (pattern, paced) in [("ball", false), ("solid-color", false), ("ball", true)] {
            let fps = if paced {
                ((engine * 0.5) / cameras as f64).floor().max(1.0) as u32
            } else {
                // Saturated: half as much again as the engine takes (at least 30 fps).
                ((engine * 1.5) / cameras as f64).ceil().max(30.0) as u32
            };
            let load = Load {
                cameras,
                fps,
                pattern,
                max_batch,
                max_wait_ms: 10,
            };
            let run = start(dir.path(), &model, &load);
            std::thread::sleep(Duration::from_secs(3));
            let m = measure(&run, secs);
            let left = (cores as f64 - m.source_cores).max(0.1) / cores as f64;
            println!(
                "| {cameras} | {pattern} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {} |",
                fps as usize * cameras,
                m.judged,
                m.dropped,
                m.p50,
                m.p99,
                m.source_cores,
                m.daemon_cores,
                m.judged / engine,
                m.judged / (engine * left),
                m.prepare_ms,
                m.engine_ms,
                // Saturated, every call carries max_batch frames: the share of the
                // wall time the engine ran, measured in the same run (immune to the
                // machine's speed drifting between the engine-alone run and this one).
                if paced {
                    "-".to_string()
                } else {
                    format!(
                        "{:.3}",
                        m.judged * m.engine_ms / (1000.0 * max_batch as f64)
                    )
                }
            );
            drop(run);
            let _ = std::fs::remove_dir_all(dir.path().join("spool"));
        }
    }
    if rss_secs > 0 {
        // Saturated 4 cameras for the whole time: the worst case for queues and spool.
        let run = start(
            dir.path(),
            &model,
            &Load {
                cameras: 4,
                fps: 30,
                pattern: "ball",
                max_batch: 4,
                max_wait_ms: 10,
            },
        );
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
