//! What the daemon knows about itself, shared by the stages and read by `/metrics`,
//! `/healthz`, the MQTT `health` message and the watchdog: counters per camera, camera
//! states, latency histograms per stage, queue depths, and the publisher's state.
//! Stages only add to counters and set states; nothing here is a channel or a lock held
//! across work.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Where a camera is in its life.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CameraState {
    Starting,
    Running,
    /// Lost (error or stall); the pipeline is rebuilt after `retry_in_s`.
    Reconnecting {
        reason: String,
        attempt: u32,
        retry_in_s: f64,
    },
    /// The stream ended (end of a file or folder); nothing more will come.
    Ended,
    /// The pipeline cannot work as configured (missing element, bad description).
    Failed {
        reason: String,
    },
    Stopped,
}

impl CameraState {
    pub fn name(&self) -> &'static str {
        match self {
            CameraState::Starting => "starting",
            CameraState::Running => "running",
            CameraState::Reconnecting { .. } => "reconnecting",
            CameraState::Ended => "ended",
            CameraState::Failed { .. } => "failed",
            CameraState::Stopped => "stopped",
        }
    }
}

/// Counters of one camera.
pub struct CameraTelemetry {
    pub id: String,
    /// Frames accepted from the source (after the frame-rate cap).
    pub frames_in: AtomicU64,
    /// Frames judged.
    pub frames_processed: AtomicU64,
    /// Frames dropped because inference was behind (oldest first).
    pub frames_dropped: AtomicU64,
    /// Frames that could not be decoded or prepared.
    pub frames_failed: AtomicU64,
    pub frames_anomalous: AtomicU64,
    /// Frames whose detected class differs from the camera's pinned class.
    pub class_mismatches: AtomicU64,
    /// Frames waiting for inference.
    pub queue_depth: AtomicUsize,
    state: Mutex<CameraState>,
}

impl CameraTelemetry {
    pub fn new(id: &str) -> CameraTelemetry {
        CameraTelemetry {
            id: id.to_string(),
            frames_in: AtomicU64::new(0),
            frames_processed: AtomicU64::new(0),
            frames_dropped: AtomicU64::new(0),
            frames_failed: AtomicU64::new(0),
            frames_anomalous: AtomicU64::new(0),
            class_mismatches: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            state: Mutex::new(CameraState::Starting),
        }
    }

    pub fn state(&self) -> CameraState {
        self.state
            .lock()
            .map(|s| s.clone())
            .unwrap_or(CameraState::Stopped)
    }

    /// Sets the state without telling anyone (tests of the stages alone).
    #[cfg(test)]
    pub fn force_state(&self, state: CameraState) {
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
    }
}

/// A span of a frame's life timed into a latency histogram, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// Waiting in the camera's queue for inference.
    Queue,
    Preprocess,
    Inference,
    /// Thresholds, regions and the verdict.
    Judging,
    /// From capture to the verdict.
    EndToEnd,
}

impl Latency {
    pub const ALL: [Latency; 5] = [
        Latency::Queue,
        Latency::Preprocess,
        Latency::Inference,
        Latency::Judging,
        Latency::EndToEnd,
    ];

    /// The `stage` label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Latency::Queue => "queue",
            Latency::Preprocess => "preprocess",
            Latency::Inference => "inference",
            Latency::Judging => "judging",
            Latency::EndToEnd => "end_to_end",
        }
    }
}

/// A stage thread whose loop must keep turning for the watchdog to be petted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Inference,
    Judging,
    Publish,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Inference, Stage::Judging, Stage::Publish];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Inference => "inference",
            Stage::Judging => "judging",
            Stage::Publish => "publish",
        }
    }
}

/// Upper bounds (ms) of the latency histogram buckets.
pub const BUCKETS_MS: [f64; 22] = [
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0,
    750.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0, 60000.0,
];

/// A Prometheus histogram (cumulative buckets when rendered).
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS_MS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Observations per bucket of [`BUCKETS_MS`] (not cumulative).
    pub fn counts(&self) -> &[u64; BUCKETS_MS.len()] {
        &self.counts
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn observe(&mut self, ms: f64) {
        if let Some(i) = BUCKETS_MS.iter().position(|b| ms <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += ms;
    }
}

pub struct Telemetry {
    started: Instant,
    cameras: RwLock<Vec<Arc<CameraTelemetry>>>,
    latency: Mutex<[Histogram; Latency::ALL.len()]>,
    pub model_id: Mutex<String>,
    pub model_loaded: AtomicBool,
    pub broker_connected: AtomicBool,
    pub alarms_total: AtomicU64,
    pub alarms_acknowledged: AtomicU64,
    pub alarms_evicted: AtomicU64,
    /// Alarms that could not be stored (spool write or encoding failed).
    pub alarms_failed: AtomicU64,
    pub alarms_spooled: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub results_published: AtomicU64,
    pub infer_queue_depth: AtomicUsize,
    pub publish_queue_depth: AtomicUsize,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub last_reload_error: Mutex<Option<String>>,
    /// Operator-view frames drawn and handed to the encoder, and scenes dropped because
    /// drawing was behind.
    pub overlay_frames: AtomicU64,
    pub overlay_dropped: AtomicU64,
    /// The evidence store's counters (shared with its writer thread).
    pub evidence: Arc<super::evidence::EvidenceCounters>,
    /// HTTP connections closed on accept because the server was at its limit.
    pub http_refused: AtomicU64,
    /// Failed accepts (out of file descriptors or memory); the server retries.
    pub http_accept_errors: AtomicU64,
    /// The engine's provider and background build.
    pub engine: super::inference::status::EngineStatus,
    /// Something the health message reports changed (camera state, reload).
    pub changed: AtomicBool,
    heartbeats: [AtomicU64; Stage::ALL.len()],
    /// Stages whose thread ended while the daemon runs (a panic, an unexpected return).
    stopped: [AtomicBool; Stage::ALL.len()],
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        Telemetry {
            started: Instant::now(),
            cameras: RwLock::new(Vec::new()),
            latency: Mutex::new(Default::default()),
            model_id: Mutex::new(String::new()),
            model_loaded: AtomicBool::new(false),
            broker_connected: AtomicBool::new(false),
            alarms_total: AtomicU64::new(0),
            alarms_acknowledged: AtomicU64::new(0),
            alarms_evicted: AtomicU64::new(0),
            alarms_failed: AtomicU64::new(0),
            alarms_spooled: AtomicU64::new(0),
            spool_bytes: AtomicU64::new(0),
            results_published: AtomicU64::new(0),
            infer_queue_depth: AtomicUsize::new(0),
            publish_queue_depth: AtomicUsize::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_error: Mutex::new(None),
            overlay_frames: AtomicU64::new(0),
            overlay_dropped: AtomicU64::new(0),
            evidence: Default::default(),
            http_refused: AtomicU64::new(0),
            http_accept_errors: AtomicU64::new(0),
            engine: Default::default(),
            changed: AtomicBool::new(false),
            heartbeats: Default::default(),
            stopped: Default::default(),
        }
    }

    /// The camera set of a (re)started pipeline; counters of cameras that stay are kept.
    pub fn set_cameras(&self, ids: &[String]) -> Vec<Arc<CameraTelemetry>> {
        let mut cams = self.cameras.write().unwrap_or_else(|e| e.into_inner());
        let new: Vec<Arc<CameraTelemetry>> = ids
            .iter()
            .map(|id| {
                cams.iter()
                    .find(|c| &c.id == id)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(CameraTelemetry::new(id)))
            })
            .collect();
        *cams = new.clone();
        new
    }

    pub fn cameras(&self) -> Vec<Arc<CameraTelemetry>> {
        self.cameras.read().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn set_state(&self, cam: &CameraTelemetry, state: CameraState) {
        if let Ok(mut s) = cam.state.lock()
            && *s != state
        {
            *s = state;
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    pub fn observe(&self, span: Latency, ms: f64) {
        if let Ok(mut h) = self.latency.lock() {
            h[span as usize].observe(ms);
        }
    }

    /// The latency histograms, in [`Latency::ALL`] order.
    pub fn latencies(&self) -> [Histogram; Latency::ALL.len()] {
        self.latency.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Marks that `stage`'s thread went round its loop.
    pub fn beat(&self, stage: Stage) {
        self.heartbeats[stage as usize]
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `stage`'s thread ended while the daemon runs: the daemon is unhealthy and the
    /// stage counts as stalled for ever, so the watchdog is no longer petted.
    pub fn stage_stopped(&self, stage: Stage) {
        if !self.stopped[stage as usize].swap(true, Ordering::Relaxed) {
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// The stage whose loop turned least recently, and how many seconds ago (infinite
    /// for a stage that stopped).
    pub fn stalest(&self) -> (Stage, f64) {
        let now = self.started.elapsed().as_millis() as u64;
        Stage::ALL
            .iter()
            .zip(&self.heartbeats)
            .map(|(s, b)| {
                if self.stopped[*s as usize].load(Ordering::Relaxed) {
                    return (*s, f64::INFINITY);
                }
                (
                    *s,
                    now.saturating_sub(b.load(Ordering::Relaxed)) as f64 / 1e3,
                )
            })
            .fold(
                (Stage::Inference, 0.0),
                |a, b| if b.1 >= a.1 { b } else { a },
            )
    }

    /// Why the daemon is not healthy, or None: every camera running and a model loaded.
    pub fn unhealthy_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.model_loaded.load(Ordering::Relaxed) {
            why.push("model not loaded".to_string());
        }
        for s in Stage::ALL {
            if self.stopped[s as usize].load(Ordering::Relaxed) {
                why.push(format!("the {} stage stopped", s.name()));
            }
        }
        for c in self.cameras() {
            match c.state() {
                CameraState::Running => {}
                CameraState::Reconnecting { reason, .. } => {
                    why.push(format!("camera {}: reconnecting: {reason}", c.id))
                }
                CameraState::Failed { reason } => {
                    why.push(format!("camera {}: failed: {reason}", c.id))
                }
                s => why.push(format!("camera {}: {}", c.id, s.name())),
            }
        }
        why
    }

    /// Whole seconds since the daemon started.
    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stalest_stage_is_named_for_the_watchdog() {
        let t = Telemetry::new();
        std::thread::sleep(std::time::Duration::from_millis(60));
        t.beat(Stage::Inference);
        t.beat(Stage::Publish);
        // Judging has not gone round its loop since the start.
        let (stage, age) = t.stalest();
        assert_eq!(stage.name(), "judging");
        assert!(age >= 0.05, "{age}");
        t.beat(Stage::Judging);
        assert!(t.stalest().1 < 0.05);
    }

    #[test]
    fn a_stopped_stage_is_unhealthy_and_stops_the_watchdog() {
        let t = Telemetry::new();
        t.model_loaded.store(true, Ordering::Relaxed);
        for s in Stage::ALL {
            t.beat(s);
        }
        assert!(t.unhealthy_reasons().is_empty());
        assert!(t.stalest().1 < 1.0);
        t.stage_stopped(Stage::Judging);
        assert_eq!(t.unhealthy_reasons(), vec!["the judging stage stopped"]);
        t.beat(Stage::Judging);
        let (stage, age) = t.stalest();
        assert_eq!((stage, age), (Stage::Judging, f64::INFINITY));
        assert!(t.changed.load(Ordering::Relaxed));
    }

    #[test]
    fn health_needs_every_camera_running_and_a_model() {
        let t = Telemetry::new();
        let cams = t.set_cameras(&["a".into(), "b".into()]);
        assert_eq!(t.unhealthy_reasons().len(), 3);
        t.model_loaded.store(true, Ordering::Relaxed);
        t.set_state(&cams[0], CameraState::Running);
        t.set_state(
            &cams[1],
            CameraState::Reconnecting {
                reason: "no route".into(),
                attempt: 2,
                retry_in_s: 2.0,
            },
        );
        assert_eq!(
            t.unhealthy_reasons(),
            vec!["camera b: reconnecting: no route"]
        );
        t.set_state(&cams[1], CameraState::Running);
        assert!(t.unhealthy_reasons().is_empty());
        // A camera that stays across a reload keeps its counters.
        cams[0].frames_in.store(7, Ordering::Relaxed);
        let again = t.set_cameras(&["a".into(), "c".into()]);
        assert_eq!(again[0].frames_in.load(Ordering::Relaxed), 7);
        assert_eq!(again[1].frames_in.load(Ordering::Relaxed), 0);
    }
}
