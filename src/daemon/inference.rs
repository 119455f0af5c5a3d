//! Inference: one thread takes frames from every camera's queue, batches them (up to
//! `max_batch` frames, or whatever arrived within `max_wait` of the first), runs the
//! engine and passes each frame's outputs on. Cameras are served round-robin so a busy
//! camera cannot starve a quiet one.

use super::capture::Frame;
use super::config::{Invalid, resolve, within};
use super::telemetry::{CameraTelemetry, Latency, Stage, Telemetry};
use crate::engine::EngineKind;
use crate::engine::{CrasOutputs, Engine};
use crate::model::bundle::{Bundle, ClassThresholds};
use crate::preprocess::{InputSpec, check_size, normalise_into, resize_and_crop};
use crossbeam_channel::{Receiver, Select, Sender, TryRecvError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Bundle directory (model.onnx + model.yaml).
    pub bundle: PathBuf,
    #[serde(default = "default_engine")]
    pub engine: EngineKind,
    /// libonnxruntime.so (default: ORT_DYLIB_PATH, else the `cras setup` library).
    #[serde(default)]
    pub ort_lib: Option<PathBuf>,
    /// Inference threads (default: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Per-class threshold overrides (else the bundle's calibrated ones).
    #[serde(default)]
    pub thresholds: BTreeMap<String, ClassThresholds>,
}

fn default_engine() -> EngineKind {
    EngineKind::Onnxruntime
}

impl ModelConfig {
    /// Resolves the bundle path against `base`, reads the bundle, and checks that every
    /// class the model can see has an alarm threshold (an override here, else the
    /// bundle's calibrated one) before the first frame.
    pub fn validate(&mut self, base: &Path) -> Result<Bundle, Invalid> {
        self.bundle = resolve(base, &self.bundle);
        let bundle =
            Bundle::read(&self.bundle).map_err(|e| Invalid::new("model.bundle", e.to_string()))?;
        if let Some(threads) = self.threads {
            within("model.threads", threads, 1, 1024, "")?;
        }
        let classes = &bundle.meta.classes;
        for (class, t) in &self.thresholds {
            if !classes.contains(class) {
                return Err(Invalid::new(
                    format!("model.thresholds.{class}"),
                    format!("not a class of the model ({})", classes.join(", ")),
                ));
            }
            if !t.image.is_finite() {
                return Err(Invalid::new(
                    format!("model.thresholds.{class}.image"),
                    "must be a number",
                ));
            }
        }
        for class in classes {
            if !self.thresholds.contains_key(class) && !bundle.meta.thresholds.contains_key(class) {
                return Err(Invalid::new(
                    format!("model.thresholds.{class}"),
                    format!(
                        "the model has no calibrated threshold for class `{class}`: run `cras calibrate --model {}` or set model.thresholds.{class}.image",
                        self.bundle.display()
                    ),
                ));
            }
        }
        Ok(bundle)
    }

    /// The alarm threshold of each class of `bundle`: the override, else the calibrated.
    pub fn thresholds(&self, bundle: &Bundle) -> BTreeMap<String, ClassThresholds> {
        bundle
            .meta
            .classes
            .iter()
            .filter_map(|class| {
                self.thresholds
                    .get(class)
                    .or_else(|| bundle.meta.thresholds.get(class))
                    .map(|t| (class.clone(), t.clone()))
            })
            .collect()
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Frames per engine call at most (across cameras).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long the first frame of a batch waits for more, in milliseconds.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
}

fn default_max_batch() -> usize {
    4
}
fn default_max_wait_ms() -> u64 {
    20
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch: default_max_batch(),
            max_wait_ms: default_max_wait_ms(),
        }
    }
}

impl BatchingConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        within("batching.max_batch", self.max_batch, 1, 64, " frames")?;
        within("batching.max_wait_ms", self.max_wait_ms, 0, 10_000, " ms")
    }
}

/// One frame's model outputs.
pub struct Inferred {
    pub camera: usize,
    pub number: u64,
    pub captured_ms: i64,
    pub captured: Instant,
    pub width: usize,
    pub height: usize,
    pub score: f32,
    pub class_id: i64,
    pub map: Vec<f32>,
    pub map_hw: (usize, usize),
    /// The frame as captured, for the operator view.
    pub image: image::RgbImage,
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    pub inference_ms: f64,
}

pub struct InferenceStage {
    pub engine: Box<dyn Engine>,
    pub input: InputSpec,
    pub queues: Vec<Receiver<Frame>>,
    pub cameras: Vec<Arc<CameraTelemetry>>,
    pub out: Sender<Inferred>,
    pub max_batch: usize,
    pub max_wait: Duration,
    pub telemetry: Arc<Telemetry>,
    /// Set when the daemon stops: end once every camera queue is closed and empty.
    /// (Cameras whose stream ended close their queue too; without a stop this stage
    /// keeps idling, so the watchdog still sees it alive.)
    pub stopping: Arc<AtomicBool>,
    /// The engine input, reused from batch to batch.
    pub batch_input: Vec<f32>,
}

impl InferenceStage {
    /// Runs until every camera queue is closed and empty; hands the engine back.
    pub fn run(mut self) -> Box<dyn Engine> {
        let mut open = vec![true; self.queues.len()];
        let mut next_camera = 0;
        loop {
            self.telemetry.beat(Stage::Inference);
            if !open.iter().any(|o| *o) {
                if self.stopping.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            let Some(first) = self.wait_first(&mut open, Duration::from_millis(250)) else {
                continue;
            };
            let mut batch = vec![first];
            let deadline = Instant::now() + self.max_wait;
            while batch.len() < self.max_batch {
                // Round-robin over the cameras, starting after the last one served.
                let n = self.queues.len();
                let mut got = false;
                for k in 0..n {
                    let i = (next_camera + k) % n;
                    if batch.len() >= self.max_batch {
                        break;
                    }
                    if let Ok(f) = self.queues[i].try_recv() {
                        batch.push(f);
                        got = true;
                    }
                }
                next_camera = (next_camera + 1) % n;
                if got {
                    continue;
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match self.wait_first(&mut open, deadline - now) {
                    Some(f) => batch.push(f),
                    None => break,
                }
            }
            for (q, c) in self.queues.iter().zip(&self.cameras) {
                c.queue_depth.store(q.len(), Ordering::Relaxed);
            }
            if !self.run_batch(batch) {
                break;
            }
        }
        self.engine
    }

    /// The first frame to arrive on any open queue within `timeout`.
    fn wait_first(&self, open: &mut [bool], timeout: Duration) -> Option<Frame> {
        let live: Vec<usize> = (0..self.queues.len()).filter(|i| open[*i]).collect();
        if live.is_empty() {
            return None;
        }
        let mut sel = Select::new();
        for i in &live {
            sel.recv(&self.queues[*i]);
        }
        let op = sel.select_timeout(timeout).ok()?;
        let i = live[op.index()];
        match op.recv(&self.queues[i]) {
            Ok(f) => Some(f),
            Err(_) => {
                // Its camera thread ended; drain nothing more from it.
                if matches!(self.queues[i].try_recv(), Err(TryRecvError::Disconnected)) {
                    open[i] = false;
                }
                None
            }
        }
    }

    /// The frames the pre-processing can take; the others are counted as failed.
    fn refuse_bad_sizes(&self, batch: Vec<Frame>) -> Vec<Frame> {
        batch
            .into_iter()
            .filter(|f| match check_size(f.image.width(), f.image.height()) {
                Ok(()) => true,
                Err(e) => {
                    let cam = &self.cameras[f.camera];
                    cam.frames_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(camera = %cam.id, frame = f.number, "frame skipped: {e}");
                    false
                }
            })
            .collect()
    }

    /// Runs one batch; false when the next stage is gone.
    fn run_batch(&mut self, batch: Vec<Frame>) -> bool {
        let spec = &self.input;
        let batch = self.refuse_bad_sizes(batch);
        let n = batch.len();
        if n == 0 {
            return true;
        }
        let run_n = self.engine.fixed_batch().unwrap_or(n).max(n);
        let per = 3 * spec.height * spec.width;
        // One buffer for every batch: allocated once, refilled per batch.
        let mut input = std::mem::take(&mut self.batch_input);
        input.clear();
        let started = Instant::now();
        let mut prepare_ms = Vec::with_capacity(n);
        for f in &batch {
            let t0 = Instant::now();
            match resize_and_crop(&f.image, spec) {
                Ok(crop) => normalise_into(&crop, spec, &mut input),
                // Sizes were checked above; keep the batch aligned all the same.
                Err(_) => input.resize(input.len() + per, 0.0),
            }
            prepare_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        input.resize(run_n * per, 0.0);
        let t0 = Instant::now();
        let outs = self
            .engine
            .run(&input, [run_n, 3, spec.height, spec.width])
            .and_then(|outs| CrasOutputs::for_batch(outs, n));
        let inference_ms = t0.elapsed().as_secs_f64() * 1e3;
        self.batch_input = input;
        let outs = match outs {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("inference failed for a batch of {n}: {e}");
                for f in &batch {
                    self.cameras[f.camera]
                        .frames_failed
                        .fetch_add(1, Ordering::Relaxed);
                }
                return true;
            }
        };
        for (i, f) in batch.into_iter().enumerate() {
            let queue_ms = started.duration_since(f.captured).as_secs_f64() * 1e3;
            let preprocess_ms = prepare_ms[i];
            self.telemetry.observe(Latency::Queue, queue_ms);
            self.telemetry.observe(Latency::Preprocess, preprocess_ms);
            self.telemetry.observe(Latency::Inference, inference_ms);
            let r = Inferred {
                camera: f.camera,
                number: f.number,
                captured_ms: f.captured_ms,
                captured: f.captured,
                width: f.image.width() as usize,
                height: f.image.height() as usize,
                score: outs.image_scores[i],
                class_id: outs.class_ids[i],
                map: outs.map(i).to_vec(),
                map_hw: outs.map_hw,
                image: f.image,
                queue_ms,
                preprocess_ms,
                inference_ms,
            };
            if self.out.send(r).is_err() {
                return false;
            }
        }
        self.telemetry
            .infer_queue_depth
            .store(self.out.len(), Ordering::Relaxed);
        true
    }
}
