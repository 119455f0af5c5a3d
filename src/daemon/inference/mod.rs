//! Inference: one thread takes frames from every camera's queue, batches them
//! ([`batcher`]: at most one frame per camera, waiting only for live cameras), prepares
//! them (in Rust, or in the engine's frames stage), runs the engine and passes each
//! frame's outputs on.

pub mod batcher;
mod config;
pub mod engines;
pub mod status;

pub use batcher::Batcher;
pub use config::{BatchingConfig, ModelConfig, Preprocess};

use super::capture::{Frame, Pixels};
use super::telemetry::{CameraTelemetry, Latency, Stage, Telemetry};
use crate::engine::upgrade::{Sample, SampleInput, Upgrade, UpgradeState};
use crate::engine::{CrasOutputs, Engine, EngineError, NamedTensor, PixelLayout};
use crate::preprocess::{InputSpec, check_size, normalise_into, resize_and_crop};
use crossbeam_channel::Sender;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    /// The provider configured.
    pub wanted: crate::engine::Provider,
    /// The engine being built to replace it ([`engines`]).
    pub upgrade: Option<Upgrade>,
    /// Why the configured provider does not serve, beyond what the engine reports.
    pub note: Option<String>,
    pub input: InputSpec,
    pub batcher: Batcher,
    pub cameras: Vec<Arc<CameraTelemetry>>,
    pub out: Sender<Inferred>,
    pub telemetry: Arc<Telemetry>,
    /// Set when the daemon stops: end once every camera queue is closed and empty.
    /// (Cameras whose stream ended close their queue too; without a stop this stage
    /// keeps idling, so the watchdog still sees it alive.)
    pub stopping: Arc<AtomicBool>,
    /// The engine input, reused from batch to batch: normalised floats (Rust
    /// pre-processing) or frame bytes (the engine's frames stage).
    pub batch_input: Vec<f32>,
    pub batch_bytes: Vec<u8>,
}

/// One engine call's results for its frames.
struct Ran {
    outs: Result<CrasOutputs, EngineError>,
    /// Per frame: milliseconds of host-side preparation.
    prepare_ms: Vec<f64>,
    inference_ms: f64,
}

impl Ran {
    /// Times one engine call on `n` frames and checks it answered for all of them.
    fn timed(
        n: usize,
        prepare_ms: Vec<f64>,
        call: impl FnOnce() -> Result<Vec<NamedTensor>, EngineError>,
    ) -> Ran {
        let t0 = Instant::now();
        let outs = call().and_then(|outs| CrasOutputs::for_batch(outs, n));
        Ran {
            outs,
            prepare_ms,
            inference_ms: t0.elapsed().as_secs_f64() * 1e3,
        }
    }
}

impl InferenceStage {
    /// Runs until every camera queue is closed and empty; hands the engines back.
    pub fn run(mut self) -> engines::Engines {
        loop {
            self.telemetry.beat(Stage::Inference);
            self.poll_upgrade();
            if !self.batcher.any_open() {
                if self.stopping.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            let batch = self.batcher.next(Duration::from_millis(250));
            if batch.is_empty() {
                continue;
            }
            for (q, c) in self.batcher.queues.iter().zip(&self.cameras) {
                c.queue_depth.store(q.len(), Ordering::Relaxed);
            }
            if !self.run_batch(batch) {
                break;
            }
        }
        engines::Engines {
            wanted: self.wanted,
            serving: self.engine,
            upgrade: self.upgrade,
            note: self.note,
        }
    }

    /// Between two batches: swaps in the new engine once it is built and checked, and
    /// keeps the engine report up to date meanwhile.
    fn poll_upgrade(&mut self) {
        let Some(up) = self.upgrade.as_mut() else {
            return;
        };
        up.log_progress();
        if let Some(new) = up.take() {
            let placement = new.placement();
            tracing::info!(
                "engine: now serving on {} ({})",
                placement.serving.name(),
                up.state().describe()
            );
            self.engine = new;
            self.upgrade = None;
            self.telemetry.engine.update(|r| r.swapped(&placement));
            self.telemetry.changed.store(true, Ordering::Relaxed);
            return;
        }
        let state = up.state();
        let before = self.telemetry.engine.get().state;
        self.telemetry.engine.update(|r| r.building(&state));
        if matches!(state, UpgradeState::Refused(_) | UpgradeState::Failed(_)) {
            self.upgrade = None;
        }
        if self.telemetry.engine.get().state != before {
            self.telemetry.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Gives the engine being built a copy of a batch just run, while it wants some.
    fn offer_sample(&self, ran: &Ran, n: usize, input: impl FnOnce() -> Option<SampleInput>) {
        let (Some(up), Ok(outputs)) = (&self.upgrade, &ran.outs) else {
            return;
        };
        if up.wants_sample()
            && let Some(input) = input()
        {
            up.offer(Sample {
                input,
                n,
                outputs: outputs.clone(),
            });
        }
    }

    /// The frames the pre-processing can take; the others are counted as failed.
    fn refuse_bad_sizes(&self, batch: Vec<Frame>) -> Vec<Frame> {
        batch
            .into_iter()
            .filter(|f| {
                let (w, h) = f.pixels.dimensions();
                check_size(w, h)
                    .map_err(|e| self.skipped(f.camera, f.number, e))
                    .is_ok()
            })
            .collect()
    }

    /// Counts and logs a frame that cannot be judged.
    fn skipped(&self, camera: usize, number: u64, why: impl std::fmt::Display) {
        let cam = &self.cameras[camera];
        cam.frames_failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(camera = %cam.id, frame = number, "frame skipped: {why}");
    }

    /// Device frames the engine cannot take (it was swapped or reloaded onto the CPU)
    /// are copied to host memory first; a frame whose copy fails is counted as failed.
    fn settle(&self, batch: Vec<Frame>) -> Vec<Frame> {
        #[cfg(feature = "gpu")]
        if self.engine.takes_device_frames() {
            return batch;
        }
        batch
            .into_iter()
            .filter_map(|f| {
                if !f.pixels.is_device() {
                    return Some(f);
                }
                let (camera, number) = (f.camera, f.number);
                match f.pixels.into_host() {
                    Ok(img) => Some(Frame {
                        pixels: Pixels::Host(img),
                        ..f
                    }),
                    Err(e) => {
                        self.skipped(camera, number, e);
                        None
                    }
                }
            })
            .collect()
    }

    /// Runs one batch; false when the next stage is gone.
    fn run_batch(&mut self, batch: Vec<Frame>) -> bool {
        let batch = self.settle(self.refuse_bad_sizes(batch));
        if batch.is_empty() {
            return true;
        }
        let started = Instant::now();
        if !self.engine.takes_frames() {
            let ran = self.run_prepared(&batch);
            return self.emit(batch, ran, started);
        }
        // The frames stage takes one frame size (and memory) per call: a call per kind.
        let kind = |f: &Frame| (f.pixels.dimensions(), f.pixels.is_device());
        let mut groups: Vec<Vec<Frame>> = Vec::new();
        for f in batch {
            match groups.iter_mut().find(|g| kind(&g[0]) == kind(&f)) {
                Some(g) => g.push(f),
                None => groups.push(vec![f]),
            }
        }
        for group in groups {
            let ran = if group[0].pixels.is_device() {
                self.run_device(&group)
            } else {
                self.run_frames(&group)
            };
            if !self.emit(group, ran, started) {
                return false;
            }
        }
        true
    }

    /// Device frames into the engine's frames stage, no host copy (feature `gpu`).
    fn run_device(&mut self, group: &[Frame]) -> Ran {
        let n = group.len();
        #[cfg(feature = "gpu")]
        {
            let frames: Vec<&crate::engine::device::DeviceFrame> = group
                .iter()
                .filter_map(|f| match &f.pixels {
                    Pixels::Device(d) => Some(d),
                    Pixels::Host(_) => None,
                })
                .collect();
            let ran = Ran::timed(n, vec![0.0; n], || self.engine.run_device_frames(&frames));
            // The engine being built is checked on host copies of the same pixels
            // (only while it wants samples).
            self.offer_sample(&ran, n, || {
                let mut data = Vec::new();
                for d in &frames {
                    data.extend_from_slice(d.to_host().ok()?.as_raw());
                }
                let (w, h) = (frames[0].width, frames[0].height);
                Some(SampleInput::Frames {
                    data,
                    shape: [n, h, w, 3],
                    layout: PixelLayout::Rgb,
                })
            });
            ran
        }
        #[cfg(not(feature = "gpu"))]
        Ran::timed(n, vec![0.0; n], || {
            Err(EngineError::Run(
                "device frames need the `gpu` feature".into(),
            ))
        })
    }

    /// Rust pre-processing, then the graph.
    fn run_prepared(&mut self, batch: &[Frame]) -> Ran {
        let spec = &self.input;
        let n = batch.len();
        let run_n = self.engine.fixed_batch().unwrap_or(n).max(n);
        let per = 3 * spec.height * spec.width;
        // One buffer for every batch: allocated once, refilled per batch.
        let mut input = std::mem::take(&mut self.batch_input);
        input.clear();
        let mut prepare_ms = Vec::with_capacity(n);
        for f in batch {
            let t0 = Instant::now();
            match host(&f.pixels).map(|img| resize_and_crop(img, spec)) {
                Some(Ok(crop)) => normalise_into(&crop, spec, &mut input),
                // Sizes were checked above; keep the batch aligned all the same.
                _ => input.resize(input.len() + per, 0.0),
            }
            prepare_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        input.resize(run_n * per, 0.0);
        let shape = [run_n, 3, spec.height, spec.width];
        let ran = Ran::timed(n, prepare_ms, || self.engine.run(&input, shape));
        self.offer_sample(&ran, n, || {
            Some(SampleInput::Prepared {
                data: input.clone(),
                shape,
            })
        });
        self.batch_input = input;
        ran
    }

    /// Frame bytes into the engine's frames stage (frames of one size).
    fn run_frames(&mut self, group: &[Frame]) -> Ran {
        let n = group.len();
        let (w, h) = group[0].pixels.dimensions();
        let mut bytes = std::mem::take(&mut self.batch_bytes);
        bytes.clear();
        let mut prepare_ms = Vec::with_capacity(n);
        for f in group {
            let t0 = Instant::now();
            if let Some(img) = host(&f.pixels) {
                bytes.extend_from_slice(img.as_raw());
            }
            prepare_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let shape = [n, h as usize, w as usize, 3];
        let ran = Ran::timed(n, prepare_ms, || {
            self.engine.run_frames(&bytes, shape, PixelLayout::Rgb)
        });
        self.offer_sample(&ran, n, || {
            Some(SampleInput::Frames {
                data: bytes.clone(),
                shape,
                layout: PixelLayout::Rgb,
            })
        });
        self.batch_bytes = bytes;
        ran
    }

    /// Passes each frame's outputs on; false when the next stage is gone.
    fn emit(&mut self, batch: Vec<Frame>, ran: Ran, started: Instant) -> bool {
        let outs = match ran.outs {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("inference failed for a batch of {}: {e}", batch.len());
                for f in &batch {
                    self.cameras[f.camera]
                        .frames_failed
                        .fetch_add(1, Ordering::Relaxed);
                }
                return true;
            }
        };
        for (i, f) in batch.into_iter().enumerate() {
            let (camera, number) = (f.camera, f.number);
            // The one host copy of a device frame, for the stages after inference.
            let image = match f.pixels.into_host() {
                Ok(img) => img,
                Err(e) => {
                    self.skipped(camera, number, e);
                    continue;
                }
            };
            let queue_ms = started.duration_since(f.captured).as_secs_f64() * 1e3;
            let preprocess_ms = ran.prepare_ms[i];
            self.telemetry.observe(Latency::Queue, queue_ms);
            self.telemetry.observe(Latency::Preprocess, preprocess_ms);
            self.telemetry.observe(Latency::Inference, ran.inference_ms);
            let r = Inferred {
                camera: f.camera,
                number: f.number,
                captured_ms: f.captured_ms,
                captured: f.captured,
                width: image.width() as usize,
                height: image.height() as usize,
                score: outs.image_scores[i],
                class_id: outs.class_ids[i],
                map: outs.map(i).to_vec(),
                map_hw: outs.map_hw,
                image,
                queue_ms,
                preprocess_ms,
                inference_ms: ran.inference_ms,
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

/// A frame's host pixels (device frames have none).
fn host(p: &Pixels) -> Option<&image::RgbImage> {
    match p {
        Pixels::Host(img) => Some(img),
        #[cfg(feature = "gpu")]
        Pixels::Device(_) => None,
    }
}
