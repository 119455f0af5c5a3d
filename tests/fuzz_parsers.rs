//! Mutation fuzzing of every parser that reads outside data: PyTorch checkpoints (zip
//! and legacy pickle), `.npy`, model.yaml and the graph's signature, the daemon
//! configuration, pipeline templates, and the image decode-resize path.
//!
//! Each target starts from the committed corpus in `tests/fuzz/corpus/<target>/` (see
//! `tests/fuzz/seeds.py`), runs every seed as it is, then mutates seeds (bit flips,
//! interesting integers, inserted, deleted, repeated and spliced runs) until its time is
//! up: `CRAS_FUZZ_SECS` seconds (default 5; CI gives each 20). An input whose outcome is
//! new (a different error once digits are ignored) joins the in-memory corpus, a cheap
//! stand-in for coverage feedback. A failure is a panic, or one allocation larger than the
//! target's bound (a tracking allocator watches every allocation); the input is written
//! to `target/fuzz-failures/` and the seed printed, so the run can be replayed with
//! `CRAS_FUZZ_SEED`. An abort (stack overflow) fails the test process itself.

use cras::daemon::capture::template::PipelineTemplate;
use cras::daemon::config::Config;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, remembering the largest single request.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

const MIB: usize = 1 << 20;

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    1 << 40,
];

/// One to eight stacked mutations of `input`; `other` is another corpus entry to splice.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(v.len() + 1);
        match rng.below(9) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                // An interesting integer, little- or big-endian, 1 to 8 bytes.
                let width = [1, 2, 4, 8][rng.below(4)];
                let value = INTERESTING[rng.below(INTERESTING.len())];
                let mut bytes = value.to_le_bytes()[..width].to_vec();
                if rng.below(2) == 0 {
                    bytes.reverse();
                }
                let end = (at + width).min(v.len());
                v.splice(at..end, bytes);
            }
            3 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            4 if !v.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                v.drain(at.min(end)..end);
            }
            5 if !v.is_empty() => {
                // Repeat a run, up to 64 times: long strings, deep nesting.
                let start = rng.below(v.len());
                let end = (start + 1 + rng.below(8)).min(v.len());
                let run = v[start..end].to_vec();
                for _ in 0..1 + rng.below(64) {
                    v.splice(start..start, run.iter().copied());
                }
            }
            6 if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(64)).min(other.len());
                v.splice(at..at, other[start..end].iter().copied());
            }
            7 => v.truncate(at),
            _ => {
                // A digit run replaced by a large or negative number (text formats).
                let number = [
                    "-1",
                    "0",
                    "4294967296",
                    "99999999999999999999",
                    "1e309",
                    "NaN",
                ][rng.below(6)];
                v.splice(at..at, number.bytes());
            }
        }
        if v.len() > 1 << 20 {
            v.truncate(1 << 20);
        }
    }
    v
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The outcome with digits left out, so that "offset 12" and "offset 13" are one class.
fn class_of(outcome: &str) -> String {
    outcome
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(160)
        .collect()
}

/// Runs `target` on the seeds, then on mutations, for the time budget. `target` returns
/// a short description of what happened (an error message or a summary).
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, max_alloc: usize, target: impl Fn(&[u8]) -> String) {
    assert!(!seeds.is_empty(), "{name}: empty corpus");
    let secs: f64 = std::env::var("CRAS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let seed: u64 = std::env::var("CRAS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 ^ cras::clock::unix_ms() as u64);
    let mut rng = Rng(seed);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut pool = seeds.clone();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    let mut failure = None;
    let mut next_seed = 0;
    while failure.is_none() && (next_seed < seeds.len() || Instant::now() < deadline) {
        let input = if next_seed < seeds.len() {
            next_seed += 1;
            seeds[next_seed - 1].clone()
        } else {
            let a = rng.below(pool.len());
            let b = rng.below(pool.len());
            mutate(&mut rng, &pool[a], &pool[b])
        };
        LARGEST.store(0, Ordering::Relaxed);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        runs += 1;
        let largest = LARGEST.load(Ordering::Relaxed);
        match result {
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failure = Some((input, format!("panicked: {msg}")));
            }
            Ok(_) if largest > max_alloc => {
                failure = Some((input, format!("allocated {largest} bytes at once")));
            }
            Ok(outcome) => {
                if seen.insert(class_of(&outcome)) && pool.len() < 2000 {
                    pool.push(input);
                }
            }
        }
    }
    std::panic::set_hook(quiet);
    if let Some((input, why)) = failure {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}-{seed}-{runs}.bin"));
        std::fs::write(&path, &input).unwrap();
        panic!(
            "fuzz {name}: run {runs} (CRAS_FUZZ_SEED={seed}) {why}; input in {}",
            path.display()
        );
    }
    eprintln!(
        "fuzz {name}: {runs} runs in {secs} s from {} seeds, {} outcome classes, {} inputs kept, seed {seed}: no failure",
        seeds.len(),
        seen.len(),
        pool.len()
    );
}

fn outcome<T, E: std::fmt::Display>(r: Result<T, E>, ok: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(v) => ok(v),
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn fuzz_pytorch_checkpoints() {
    let seeds = corpus("pth");
    for s in &seeds {
        assert_eq!(
            cras::weights::parse(s, "x").unwrap().len(),
            4,
            "a seed stopped parsing"
        );
    }
    // Storage is read as it inflates, up to what the file holds: never far past the input.
    fuzz("pth", seeds, 64 * MIB, |b| {
        outcome(cras::weights::parse(b, "x"), |t| {
            format!("{} tensors", t.len())
        })
    });
}

#[test]
fn fuzz_npy() {
    let seeds = corpus("npy");
    for s in &seeds {
        cras::weights::npy::read(s).expect("a seed stopped parsing");
    }
    fuzz("npy", seeds, 64 * MIB, |b| {
        outcome(cras::weights::npy::read(b), |t| {
            format!("{:?}", t.shape.len())
        })
    });
}

#[test]
fn fuzz_model_yaml_and_graph_signature() {
    use cras::model::bundle::BundleMeta;
    let seeds = corpus("model_yaml");
    let path = Path::new("model.yaml");
    for s in &seeds {
        BundleMeta::parse(&String::from_utf8_lossy(s), path).expect("a seed stopped parsing");
    }
    fuzz("model_yaml", seeds, 64 * MIB, |b| {
        outcome(BundleMeta::parse(&String::from_utf8_lossy(b), path), |m| {
            format!("ok {}", m.classes.len())
        })
    });
    // The signature reader on graphs the builder writes, mutated.
    let mut g = cras::onnx::GraphBuilder::new();
    let x = g.input(
        "image",
        cras::onnx::ElemType::F32,
        vec![cras::onnx::Dim::Sym("N"), cras::onnx::Dim::Fixed(3)],
    );
    let y = g.relu(&x);
    g.output(
        &y,
        "anomaly_map",
        cras::onnx::ElemType::F32,
        vec![cras::onnx::Dim::Fixed(1)],
    );
    fuzz(
        "onnx_signature",
        vec![g.to_bytes("g", "fuzz")],
        64 * MIB,
        |b| {
            outcome(cras::onnx::signature::read(b), |s| {
                format!("{} {}", s.inputs.len(), s.outputs.len())
            })
        },
    );
}

#[test]
fn fuzz_daemon_configuration() {
    let seeds = corpus("config");
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let base = tempfile::tempdir().unwrap();
    let classes = vec!["alpha".to_string(), "checker".to_string()];
    for s in &seeds {
        Config::parse(&String::from_utf8_lossy(s)).expect("a seed stopped parsing");
    }
    // Every check that reads no file other than the templates (spool creation, password
    // and certificate files have their own tests).
    fuzz("config", seeds, 64 * MIB, |b| {
        let mut c = match Config::parse(&String::from_utf8_lossy(b)) {
            Ok(c) => c,
            Err(e) => return format!("parse: {e}"),
        };
        let checks = || -> Result<(), cras::daemon::config::Invalid> {
            c.device.validate()?;
            cras::daemon::capture::config::validate(&c.cameras, &classes, &templates)?;
            c.batching.validate()?;
            c.http.validate()?;
            c.logging.validate()?;
            Ok(())
        };
        let first = outcome(checks(), |_| "ok".into());
        if c.mqtt.tls.is_none() && c.mqtt.password_file.is_none() {
            return first + &outcome(c.mqtt.validate(base.path()), |_| " ok".into());
        }
        first
    });
}

#[test]
fn fuzz_pipeline_templates() {
    let seeds = corpus("template");
    // Template text, then NUL, then `name=value` lines.
    fuzz("template", seeds, 64 * MIB, |b| {
        let text = String::from_utf8_lossy(b);
        let (template, params) = text.split_once('\0').unwrap_or((&text, ""));
        let values: BTreeMap<String, String> = params
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match PipelineTemplate::parse("fuzz", Path::new("fuzz.pipeline"), template) {
            Ok(t) => outcome(t.render(&values), |r| format!("rendered {}", !r.is_empty())),
            Err(e) => format!("parse: {e}"),
        }
    });
}

#[test]
fn fuzz_image_decode_and_resize() {
    use cras::preprocess::{InputSpec, Normalization, decode_rgb, normalise_into, resize_and_crop};
    let seeds = corpus("image");
    for s in &seeds {
        decode_rgb(s).expect("a seed stopped decoding");
    }
    let spec = InputSpec::square(64, 72, Normalization::Imagenet);
    // The decoder may allocate what a 16384-pixel side at 32:1 needs (the documented
    // limit, about 1 GiB at most); nothing beyond.
    fuzz("image", seeds, 1 << 30, |b| {
        let img = match decode_rgb(b) {
            Ok(img) => img,
            Err(e) => return format!("decode: {e}"),
        };
        outcome(resize_and_crop(&img, &spec), |crop| {
            let mut out = Vec::new();
            normalise_into(&crop, &spec, &mut out);
            format!("ok {}", out.len())
        })
    });
}
