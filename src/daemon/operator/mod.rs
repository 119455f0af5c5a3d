//! The operator's live view: every judged frame of a watched camera drawn (heat map,
//! region boxes, verdict banner) and streamed over RTSP, one mount per camera.
//!
//! The judging stage offers a [`Scene`] only for cameras someone watches, through a
//! bounded queue it never waits on: when drawing falls behind, scenes are dropped and
//! counted (`cras_overlay_dropped_total`). Drawing and encoding run on their own threads,
//! so the view can never slow judging or alarms.

pub mod config;
pub mod draw;
pub mod gallery;
pub mod still;
pub mod stream;

use super::regions::{CropGeometry, Verdict};
use super::telemetry::Telemetry;
use config::RtspConfig;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(
        "rtsp.address {address}, rtsp.port {port}: cannot listen (in use, or not an address of this machine)"
    )]
    Listen { address: String, port: u16 },
    #[error("rtsp: {0}")]
    Rtsp(String),
    #[error("cannot start the operator view thread: {0}")]
    Thread(std::io::Error),
}

/// One judged frame as every picture of it is drawn: the live view, `latest.jpg` and
/// the evidence of an alarm share it (no copy of the frame).
pub struct Shot {
    pub camera: String,
    pub frame_number: u64,
    pub captured_ms: i64,
    pub frame: image::RgbImage,
    /// The anomaly map at model-input resolution, row-major, `map_hw` = (rows, columns).
    pub map: Vec<f32>,
    pub map_hw: (usize, usize),
    pub geometry: CropGeometry,
    pub pixel_threshold: f32,
    pub class: String,
    pub verdict: Verdict,
}

impl Shot {
    /// The frame with heat, boxes and the banner band (the text goes on separately).
    pub fn overlay(&self) -> image::RgbImage {
        draw::draw(&draw::Picture {
            frame: &self.frame,
            map: &self.map,
            map_hw: self.map_hw,
            geometry: self.geometry,
            pixel_threshold: self.pixel_threshold,
            regions: &self.verdict.regions,
            anomalous: self.verdict.anomalous,
        })
    }

    /// The banner's text: camera, class, score / threshold, verdict, then `tail` (the
    /// live view's frames per second, a still's capture time).
    pub fn banner(&self, tail: &str) -> String {
        let v = &self.verdict;
        format!(
            "{}  {}  {:.3} / {:.3}  {}  {tail}",
            self.camera,
            self.class,
            v.score,
            v.threshold,
            if v.anomalous { "NG" } else { "OK" },
        )
    }
}

#[cfg(test)]
impl Shot {
    /// A grey `width` x `height` frame of camera `cam1`, class `stripes`, with a 4x4
    /// map of zeros at the pixel threshold 0.5; `anomalous` decides the verdict.
    pub fn example(width: u32, height: u32, anomalous: bool) -> Shot {
        Shot {
            camera: "cam1".into(),
            frame_number: 1,
            captured_ms: 0,
            frame: image::RgbImage::from_pixel(width, height, image::Rgb([90, 90, 90])),
            map: vec![0.0; 16],
            map_hw: (4, 4),
            geometry: CropGeometry {
                scale_x: 1.0,
                scale_y: 1.0,
                left: 0.0,
                top: 0.0,
            },
            pixel_threshold: 0.5,
            class: "stripes".into(),
            verdict: Verdict {
                anomalous,
                score: if anomalous { 0.9 } else { 0.1 },
                threshold: 0.5,
                regions: vec![],
            },
        }
    }
}

/// One judged frame for the live view of camera `camera` (an index in the
/// configuration's list).
pub struct Scene {
    pub camera: usize,
    pub shot: Arc<Shot>,
}

/// A camera as the view knows it, in the configuration's order.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewedCamera {
    pub id: String,
    /// Nominal frames per second (`max_fps`): the stream's declared rate and its
    /// key-frame interval.
    pub fps: f64,
    /// Mounted (`cameras[].rtsp`); a camera that is not is never watched.
    pub shown: bool,
}

/// Scenes waiting to be drawn, all cameras together.
const QUEUE: usize = 4;

/// The judging stage's handle: who is watched, and where scenes go.
#[derive(Clone)]
pub struct Feed {
    mounts: Arc<Vec<Arc<stream::Mount>>>,
    tx: Sender<Scene>,
    telemetry: Arc<Telemetry>,
}

impl Feed {
    /// Someone watches camera `camera` (an index in the configuration's list).
    pub fn wants(&self, camera: usize) -> bool {
        self.mounts.get(camera).is_some_and(|m| m.watched())
    }

    /// Queues a scene, or drops it (counted) when the view is behind.
    pub fn offer(&self, scene: Scene) {
        match self.tx.try_send(scene) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.telemetry
                    .overlay_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The running view: the RTSP server and the drawing thread.
pub struct OperatorView {
    feed: Feed,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    // Dropped last: the drawing thread pushes into its mounts.
    _server: stream::Server,
    /// What it was started with, to know whether a reload needs a new one.
    pub started_with: (RtspConfig, Vec<ViewedCamera>),
}

impl OperatorView {
    /// Starts the server for `cameras`, in configuration order.
    pub fn start(
        cfg: &RtspConfig,
        credentials: &BTreeMap<String, String>,
        cameras: &[ViewedCamera],
        telemetry: Arc<Telemetry>,
    ) -> Result<OperatorView, OperatorError> {
        let server = stream::Server::start(cfg, credentials, cameras)?;
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let mounts = server.mounts.clone();
        let (flag, t) = (stop.clone(), telemetry.clone());
        let thread = std::thread::Builder::new()
            .name("overlay".into())
            .spawn(move || draw_loop(rx, mounts, t, flag))
            .map_err(OperatorError::Thread)?;
        tracing::info!(
            "operator view on rtsp://{}:{}/<camera id> ({})",
            cfg.address,
            cfg.port,
            cfg.encoder.element()
        );
        Ok(OperatorView {
            feed: Feed {
                mounts: server.mounts.clone(),
                tx,
                telemetry,
            },
            stop,
            thread: Some(thread),
            _server: server,
            started_with: (cfg.clone(), cameras.to_vec()),
        })
    }

    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }
}

impl Drop for OperatorView {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Judged frames per second of one camera, smoothed.
#[derive(Default)]
struct Rate {
    last: Option<Instant>,
    fps: f64,
}

impl Rate {
    fn tick(&mut self) -> f64 {
        let now = Instant::now();
        if let Some(last) = self.last {
            let dt = now.duration_since(last).as_secs_f64().max(1e-3);
            self.fps = if self.fps == 0.0 {
                1.0 / dt
            } else {
                0.8 * self.fps + 0.2 / dt
            };
        }
        self.last = Some(now);
        self.fps
    }
}

fn draw_loop(
    rx: Receiver<Scene>,
    mounts: Arc<Vec<Arc<stream::Mount>>>,
    telemetry: Arc<Telemetry>,
    stop: Arc<AtomicBool>,
) {
    let mut rates: Vec<Rate> = mounts.iter().map(|_| Rate::default()).collect();
    while !stop.load(Ordering::Relaxed) {
        let Ok(scene) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let (Some(mount), Some(rate)) = (mounts.get(scene.camera), rates.get_mut(scene.camera))
        else {
            continue;
        };
        let fps = rate.tick();
        let picture = scene.shot.overlay();
        let text = scene.shot.banner(&format!("{fps:.1} fps"));
        let (w, h) = picture.dimensions();
        let mut rgbx = Vec::with_capacity(w as usize * h as usize * 4);
        for p in picture.pixels() {
            rgbx.extend_from_slice(&[p.0[0], p.0[1], p.0[2], 255]);
        }
        if mount.push(rgbx, w, h, &text) {
            telemetry.overlay_frames.fetch_add(1, Ordering::Relaxed);
        }
    }
}
