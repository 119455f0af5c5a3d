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

use super::telemetry::{CameraState, CameraTelemetry, Telemetry, unix_ms};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
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
    pub image: image::RgbImage,
}

/// Frames a camera may have waiting for inference; more and the oldest is dropped.
pub const QUEUE_FRAMES: usize = 2;

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct CameraSource {
    pub index: usize,
    pub pipeline: String,
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

/// Runs the camera until `stop` is set (or its stream ends or cannot work).
pub fn run_camera(src: CameraSource, all: Arc<Telemetry>, stop: Arc<AtomicBool>) {
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

/// Builds, plays and reads one pipeline until it stops, ends or breaks.
fn run_pipeline(
    src: &CameraSource,
    all: &Telemetry,
    stop: &AtomicBool,
    number: &mut u64,
) -> Outcome {
    let cam = &src.telemetry;
    let element = match gst::parse::launch(&src.pipeline) {
        Ok(e) => e,
        Err(e) => return Outcome::Failed(format!("pipeline does not build: {e}")),
    };
    let Ok(pipeline) = element.downcast::<gst::Pipeline>() else {
        return Outcome::Failed("the description is not a pipeline".into());
    };
    let Some(sink) = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
    else {
        return Outcome::Failed("the pipeline has no `appsink name=sink`".into());
    };
    // A short appsink queue: frames are copied out at once, and a stalled consumer
    // must not make the source buffer without bound.
    sink.set_max_buffers(2);
    let Some(bus) = pipeline.bus() else {
        return Outcome::Failed("the pipeline has no bus".into());
    };
    let shut = |outcome: Outcome| {
        let _ = pipeline.set_state(gst::State::Null);
        outcome
    };
    if pipeline.set_state(gst::State::Playing).is_err() {
        let reason = bus_error(&bus).unwrap_or_else(|| "the pipeline does not start".into());
        return shut(Outcome::Lost {
            reason,
            had_frames: false,
        });
    }
    let mut cap = RateCap::new(src.max_fps);
    let mut last_progress = Instant::now();
    let mut had_frames = false;
    // Pacing of encoded images (they carry no timestamps): start time and count.
    let mut paced: Option<(Instant, u64)> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return shut(Outcome::Stopped);
        }
        while let Some(msg) = bus.pop_filtered(&[
            gst::MessageType::Error,
            gst::MessageType::Eos,
            gst::MessageType::Warning,
        ]) {
            match msg.view() {
                gst::MessageView::Error(e) => {
                    return shut(Outcome::Lost {
                        reason: describe_error(e),
                        had_frames,
                    });
                }
                gst::MessageView::Eos(_) if src.finite => return shut(Outcome::Ended),
                gst::MessageView::Eos(_) => {
                    return shut(Outcome::Lost {
                        reason: "the stream ended".into(),
                        had_frames,
                    });
                }
                gst::MessageView::Warning(w) => {
                    tracing::warn!(camera = %cam.id, "{}", w.error());
                }
                _ => {}
            }
        }
        let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(100)) else {
            // A source can stop delivering without an error (a network camera that lost
            // power mid-stream, a hung driver): that is a lost camera too.
            if let Some(limit) = src.stall_timeout
                && last_progress.elapsed() > limit
            {
                return shut(Outcome::Lost {
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
        if let Some(fps) = encoded_fps(&sample) {
            let (t0, n) = paced.get_or_insert((Instant::now(), 0));
            let due = *t0 + Duration::from_secs_f64(*n as f64 / fps);
            *n += 1;
            while Instant::now() < due && !stop.load(Ordering::Relaxed) {
                std::thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
            }
        }
        let captured_ms = unix_ms();
        let captured = Instant::now();
        *number += 1;
        if !cap.take(captured) {
            continue;
        }
        let image = match frame_image(&sample) {
            Ok(img) => img,
            Err(reason) => {
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
            image,
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

fn describe_error(e: &gst::message::Error) -> String {
    let from = e
        .src()
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| "pipeline".into());
    match e.debug() {
        Some(d) => format!("{from}: {} ({d})", e.error()),
        None => format!("{from}: {}", e.error()),
    }
}

fn bus_error(bus: &gst::Bus) -> Option<String> {
    let msg = bus.timed_pop_filtered(
        gst::ClockTime::from_mseconds(200),
        &[gst::MessageType::Error],
    )?;
    match msg.view() {
        gst::MessageView::Error(e) => Some(describe_error(e)),
        _ => None,
    }
}

/// The frame rate to pace encoded images at (they carry no timestamps).
fn encoded_fps(sample: &gst::Sample) -> Option<f64> {
    let s = sample.caps()?.structure(0)?;
    if !s.name().starts_with("image/") {
        return None;
    }
    s.get::<gst::Fraction>("framerate")
        .ok()
        .filter(|f| f.numer() > 0 && f.denom() > 0)
        .map(|f| f.numer() as f64 / f.denom() as f64)
}

/// The RGB image of a sample.
fn frame_image(sample: &gst::Sample) -> Result<image::RgbImage, String> {
    let caps = sample.caps().ok_or("sample without caps")?;
    let s = caps.structure(0).ok_or("empty caps")?;
    let buffer = sample.buffer().ok_or("sample without data")?;
    let map = buffer
        .map_readable()
        .map_err(|_| "buffer not readable".to_string())?;
    let data = map.as_slice();
    if s.name() == "video/x-raw" {
        let format = s.get::<&str>("format").unwrap_or("?");
        if format != "RGB" {
            return Err(format!(
                "frames are {format}; end the pipeline in `videoconvert ! video/x-raw,format=RGB ! appsink name=sink`"
            ));
        }
        let w = s.get::<i32>("width").map_err(|_| "caps without width")? as usize;
        let h = s.get::<i32>("height").map_err(|_| "caps without height")? as usize;
        // GStreamer pads RGB rows to 4 bytes.
        let stride = (w * 3 + 3) & !3;
        if data.len() < stride * (h.max(1) - 1) + w * 3 {
            return Err(format!(
                "frame of {} bytes is short for {w}x{h} RGB",
                data.len()
            ));
        }
        let mut rgb = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            rgb.extend_from_slice(&data[y * stride..y * stride + w * 3]);
        }
        image::RgbImage::from_raw(w as u32, h as u32, rgb)
            .ok_or_else(|| "frame size mismatch".to_string())
    } else if s.name().starts_with("image/") {
        Ok(image::load_from_memory(data)
            .map_err(|e| format!("cannot decode image: {e}"))?
            .to_rgb8())
    } else {
        Err(format!(
            "appsink delivers `{}`; use video/x-raw,format=RGB or encoded images",
            s.name()
        ))
    }
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
