//! Capture: one thread per camera runs its GStreamer pipeline (a template from
//! `pipelines/`, ending in `appsink name=sink`) and hands frames to inference through a
//! small bounded queue. When inference is behind, the oldest queued frame of that camera
//! is dropped and counted, so the freshest frame wins and memory stays flat.
//!
//! Bus errors and end of stream become a camera state: an error, a stall (no frame for
//! `stall_timeout_s`) or the end of a live stream rebuilds the pipeline after a backoff
//! (1 s doubling to 30 s, reset once frames flow again); the end of a finite source (a
//! file or folder, `# finite` in its template) is final (`ended`); a pipeline that
//! cannot be built at all is `failed`. Either way the other cameras keep running.
//!
//! The appsink may deliver raw `video/x-raw,format=RGB` frames or encoded images
//! (`image/...`, from the image-folder template); encoded images are decoded here, so a
//! corrupt file costs one frame, not the stream, and are paced to the caps' frame rate.
//!
//! A device-memory template (`# memory cuda|nvmm`, feature `gpu`) hands over frames
//! that stay on the GPU ([`crate::engine::device`]). Where they cannot be taken (no
//! `gpu` feature, no driver, an engine not on the GPU, a pipeline that does not build
//! or a frame that does not map) the camera switches to its `# fallback` host-memory
//! template for good, with one log line.

pub mod config;
mod pixels;
mod sample;
pub mod template;

pub use pixels::Pixels;
pub use template::Memory;

use super::telemetry::{CameraState, CameraTelemetry, Telemetry};
use crate::clock::unix_ms;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use sample::{bus_error, describe_error, encoded_fps, pixels};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One camera frame on its way through the stages.
pub struct Frame {
    /// Index of the camera in the configuration.
    pub camera: usize,
    /// The camera's frame number since the daemon started.
    pub number: u64,
    /// Capture time (wall clock, Unix ms) and its monotonic twin for latencies.
    pub captured_ms: i64,
    pub captured: Instant,
    /// The frame as captured; resized and normalised only if inference takes it (under
    /// overload most frames are dropped, and preparing them would be wasted work).
    pub pixels: Pixels,
}

/// Frames a camera may have waiting for inference; more and the oldest is dropped.
pub const QUEUE_FRAMES: usize = 2;

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct CameraSource {
    pub index: usize,
    pub pipeline: String,
    /// Where the pipeline's frames are delivered.
    pub memory: Memory,
    /// For a device-memory pipeline: the host-memory template (name, text) to switch to.
    pub host: Option<(String, String)>,
    /// Whether this daemon can take device frames (else why not).
    pub device_frames: Result<(), String>,
    pub max_fps: f64,
    /// A finite source (file, folder): its end of stream ends the camera; for any other
    /// source it means the camera was lost.
    pub finite: bool,
    /// No frame for this long: the camera is lost (None: never).
    pub stall_timeout: Option<Duration>,
    pub telemetry: Arc<CameraTelemetry>,
    pub queue: Sender<Frame>,
    /// The receiving end too, to drop the oldest frame when the queue is full.
    pub queue_rx: Receiver<Frame>,
}

enum Outcome {
    Stopped,
    Ended,
    Failed(String),
    Lost { reason: String, had_frames: bool },
}

impl CameraSource {
    /// Switches a device-memory camera to its host-memory template, for good; false if
    /// there is none to switch to.
    fn fall_back_to_host(&mut self, why: &str) -> bool {
        let Some((name, text)) = self.host.take() else {
            return false;
        };
        tracing::warn!(
            camera = %self.telemetry.id,
            "device frames ({}) unavailable: {why}; capturing through `{name}` in host memory",
            self.memory.name()
        );
        self.pipeline = text;
        self.memory = Memory::Host;
        true
    }
}

/// Runs the camera until `stop` is set (or its stream ends or cannot work).
pub fn run_camera(mut src: CameraSource, all: Arc<Telemetry>, stop: Arc<AtomicBool>) {
    if src.memory != Memory::Host
        && let Err(why) = src.device_frames.clone()
    {
        src.fall_back_to_host(&why);
    }
    let cam = src.telemetry.clone();
    let mut backoff = BACKOFF_START;
    let mut attempt = 0u32;
    let mut number = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        all.set_state(&cam, CameraState::Starting);
        match run_pipeline(&src, &all, &stop, &mut number) {
            Outcome::Stopped => break,
            Outcome::Ended => {
                tracing::info!(camera = %cam.id, "stream ended");
                all.set_state(&cam, CameraState::Ended);
                return;
            }
            Outcome::Failed(reason) if src.fall_back_to_host(&reason) => continue,
            Outcome::Failed(reason) => {
                tracing::error!(camera = %cam.id, "camera failed: {reason}");
                all.set_state(&cam, CameraState::Failed { reason });
                return;
            }
            Outcome::Lost { reason, had_frames } => {
                if had_frames {
                    backoff = BACKOFF_START;
                    attempt = 0;
                }
                attempt += 1;
                tracing::warn!(
                    camera = %cam.id,
                    "camera lost: {reason}; retry {attempt} in {:.0} s",
                    backoff.as_secs_f64()
                );
                all.set_state(
                    &cam,
                    CameraState::Reconnecting {
                        reason,
                        attempt,
                        retry_in_s: backoff.as_secs_f64(),
                    },
                );
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    all.set_state(&cam, CameraState::Stopped);
}

/// A built pipeline and the ends the capture thread reads.
struct Built {
    pipeline: gst::Pipeline,
    sink: gst_app::AppSink,
    bus: gst::Bus,
}

impl Built {
    /// Stops the pipeline (state Null) and passes `outcome` on.
    fn shut(&self, outcome: Outcome) -> Outcome {
        let _ = self.pipeline.set_state(gst::State::Null);
        outcome
    }
}

/// Parses the pipeline text and finds its appsink and bus.
fn build(text: &str, memory: Memory) -> Result<Built, Outcome> {
    let element = gst::parse::launch(text)
        .map_err(|e| Outcome::Failed(format!("pipeline does not build: {e}")))?;
    let Ok(pipeline) = element.downcast::<gst::Pipeline>() else {
        return Err(Outcome::Failed("the description is not a pipeline".into()));
    };
    let Some(sink) = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
    else {
        return Err(Outcome::Failed(
            "the pipeline has no `appsink name=sink`".into(),
        ));
    };
    // A short appsink queue: frames are copied out at once, and a stalled consumer
    // must not make the source buffer without bound.
    sink.set_max_buffers(2);
    #[cfg(feature = "gpu")]
    if memory == Memory::Cuda
        && let Some(pad) = sink.static_pad("sink")
    {
        crate::engine::device::ask_for_video_meta(&pad);
    }
    #[cfg(not(feature = "gpu"))]
    let _ = memory;
    let Some(bus) = pipeline.bus() else {
        return Err(Outcome::Failed("the pipeline has no bus".into()));
    };
    Ok(Built {
        pipeline,
        sink,
        bus,
    })
}

/// What the bus says happened to the stream, if anything ended it; warnings are logged.
fn bus_outcome(src: &CameraSource, bus: &gst::Bus, had_frames: bool) -> Option<Outcome> {
    while let Some(msg) = bus.pop_filtered(&[
        gst::MessageType::Error,
        gst::MessageType::Eos,
        gst::MessageType::Warning,
    ]) {
        match msg.view() {
            gst::MessageView::Error(e) => {
                return Some(Outcome::Lost {
                    reason: describe_error(e),
                    had_frames,
                });
            }
            gst::MessageView::Eos(_) if src.finite => return Some(Outcome::Ended),
            gst::MessageView::Eos(_) => {
                return Some(Outcome::Lost {
                    reason: "the stream ended".into(),
                    had_frames,
                });
            }
            gst::MessageView::Warning(w) => {
                tracing::warn!(camera = %src.telemetry.id, "{}", w.error());
            }
            _ => {}
        }
    }
    None
}

/// Waits until an encoded image is due: they carry no timestamps, so they are played at
/// the caps' frame rate from the first one (`paced`: start time and count).
fn pace(sample: &gst::Sample, paced: &mut Option<(Instant, u64)>, stop: &AtomicBool) {
    if let Some(fps) = encoded_fps(sample) {
        let (t0, n) = paced.get_or_insert((Instant::now(), 0));
        let due = *t0 + Duration::from_secs_f64(*n as f64 / fps);
        *n += 1;
        while Instant::now() < due && !stop.load(Ordering::Relaxed) {
            std::thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}

/// Builds, plays and reads one pipeline until it stops, ends or breaks.
fn run_pipeline(
    src: &CameraSource,
    all: &Telemetry,
    stop: &AtomicBool,
    number: &mut u64,
) -> Outcome {
    let cam = &src.telemetry;
    let p = match build(&src.pipeline, src.memory) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    if p.pipeline.set_state(gst::State::Playing).is_err() {
        let reason = bus_error(&p.bus).unwrap_or_else(|| "the pipeline does not start".into());
        return p.shut(Outcome::Lost {
            reason,
            had_frames: false,
        });
    }
    let mut cap = RateCap::new(src.max_fps);
    let mut last_progress = Instant::now();
    let mut had_frames = false;
    let mut paced = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return p.shut(Outcome::Stopped);
        }
        if let Some(outcome) = bus_outcome(src, &p.bus, had_frames) {
            return p.shut(outcome);
        }
        let Some(sample) = p.sink.try_pull_sample(gst::ClockTime::from_mseconds(100)) else {
            // A source can stop delivering without an error (a network camera that lost
            // power mid-stream, a hung driver): that is a lost camera too.
            if let Some(limit) = src.stall_timeout
                && last_progress.elapsed() > limit
            {
                return p.shut(Outcome::Lost {
                    reason: format!("no frame for {:.0} s", limit.as_secs_f64()),
                    had_frames,
                });
            }
            continue;
        };
        last_progress = Instant::now();
        if !had_frames {
            had_frames = true;
            all.set_state(cam, CameraState::Running);
        }
        pace(&sample, &mut paced, stop);
        let captured_ms = unix_ms();
        let captured = Instant::now();
        *number += 1;
        if !cap.take(captured) {
            continue;
        }
        let pixels = match pixels(&sample, src.memory) {
            Ok(px) => px,
            // A device frame that does not map: the camera goes to host memory.
            Err(sample::Skip::Device(reason)) => return p.shut(Outcome::Failed(reason)),
            Err(sample::Skip::Frame(reason)) => {
                cam.frames_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(camera = %cam.id, frame = *number, "frame skipped: {reason}");
                continue;
            }
        };
        cam.frames_in.fetch_add(1, Ordering::Relaxed);
        let frame = Frame {
            camera: src.index,
            number: *number,
            captured_ms,
            captured,
            pixels,
        };
        offer(src, frame);
    }
}

/// The frame-rate cap: frames are taken on a schedule of `1/max_fps` slots. A frame
/// that arrives up to a quarter slot early still takes its slot, so a camera running at
/// exactly `max_fps` loses nothing to jitter; one that falls behind restarts the schedule.
struct RateCap {
    interval: Duration,
    next: Option<Instant>,
}

impl RateCap {
    fn new(max_fps: f64) -> RateCap {
        RateCap {
            interval: Duration::from_secs_f64(1.0 / max_fps),
            next: None,
        }
    }

    fn take(&mut self, t: Instant) -> bool {
        let slack = self.interval / 4;
        match self.next {
            Some(next) if t + slack < next => false,
            Some(next) if t < next + self.interval => {
                self.next = Some(next + self.interval);
                true
            }
            _ => {
                self.next = Some(t + self.interval);
                true
            }
        }
    }
}

/// Queues a frame; when the queue is full the oldest frame waiting is dropped.
fn offer(src: &CameraSource, mut frame: Frame) {
    let cam = &src.telemetry;
    loop {
        match src.queue.try_send(frame) {
            Ok(()) => break,
            Err(TrySendError::Full(f)) => {
                if src.queue_rx.try_recv().is_ok() {
                    cam.frames_dropped.fetch_add(1, Ordering::Relaxed);
                }
                frame = f;
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
    cam.queue_depth.store(src.queue.len(), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_cap_keeps_a_jittery_stream_at_its_rate_and_halves_a_double_one() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        // 10 fps source, cap 10: +-20 ms jitter loses nothing.
        let mut cap = RateCap::new(10.0);
        let jitter = [0, 120, 180, 310, 390, 520, 580, 710, 790, 900];
        assert!(jitter.iter().all(|m| cap.take(ms(*m))));
        // 20 fps source, cap 10: every other frame.
        let mut cap = RateCap::new(10.0);
        let taken = (0..20).filter(|i| cap.take(ms(i * 50))).count();
        assert_eq!(taken, 10);
        // After a pause the schedule restarts instead of letting a burst through.
        assert!(cap.take(ms(5000)));
        assert!(!cap.take(ms(5010)));
    }
}
