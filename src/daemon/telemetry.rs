//! What the daemon knows about itself, shared by the stages and read by `/metrics`,
//! `/healthz`, the MQTT `health` message and the watchdog: counters per camera, camera
//! states, latency histograms per stage, queue depths, and the publisher's state.
//! Stages only add to counters and set states; nothing here is a channel or a lock held
//! across work.

use std::fmt::Write as _;
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
}

/// Latency stages of a frame, in the order they happen.
pub const STAGES: [&str; 5] = [
    "queue",
    "preprocess",
    "inference",
    "postprocess",
    "end_to_end",
];

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

/// The q-quantile of a Prometheus histogram from its cumulative `(le, count)` buckets
/// (the last one `+Inf`), interpolated linearly within the bucket as Prometheus'
/// `histogram_quantile` does.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = cum - prev.1;
            let frac = if width > 0.0 {
                (rank - prev.1) / width
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, cum);
    }
    None
}

impl Histogram {
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
    latency: Mutex<[Histogram; STAGES.len()]>,
    pub model_id: Mutex<String>,
    pub model_loaded: AtomicBool,
    pub broker_connected: AtomicBool,
    pub alarms_total: AtomicU64,
    pub alarms_acknowledged: AtomicU64,
    pub alarms_evicted: AtomicU64,
    pub alarms_spooled: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub results_published: AtomicU64,
    pub infer_queue_depth: AtomicUsize,
    pub publish_queue_depth: AtomicUsize,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub last_reload_error: Mutex<Option<String>>,
    /// Something the health message reports changed (camera state, reload).
    pub changed: AtomicBool,
    heartbeats: [AtomicU64; HEARTBEATS.len()],
}

/// Threads whose loops must keep turning for the watchdog to be petted.
pub const HEARTBEATS: [&str; 3] = ["infer", "postprocess", "publish"];

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
            alarms_spooled: AtomicU64::new(0),
            spool_bytes: AtomicU64::new(0),
            results_published: AtomicU64::new(0),
            infer_queue_depth: AtomicUsize::new(0),
            publish_queue_depth: AtomicUsize::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_error: Mutex::new(None),
            changed: AtomicBool::new(false),
            heartbeats: Default::default(),
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

    pub fn observe(&self, stage: usize, ms: f64) {
        if let Ok(mut h) = self.latency.lock() {
            h[stage].observe(ms);
        }
    }

    /// Marks that thread `HEARTBEATS[i]` went round its loop.
    pub fn beat(&self, i: usize) {
        self.heartbeats[i].store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Seconds since the least recent heartbeat, with its thread's name.
    pub fn stalest(&self) -> (&'static str, f64) {
        let now = self.started.elapsed().as_millis() as u64;
        HEARTBEATS
            .iter()
            .zip(&self.heartbeats)
            .map(|(n, b)| {
                (
                    *n,
                    now.saturating_sub(b.load(Ordering::Relaxed)) as f64 / 1e3,
                )
            })
            .fold(("", 0.0), |a, b| if b.1 >= a.1 { b } else { a })
    }

    /// Why the daemon is not healthy, or None: every camera running and a model loaded.
    pub fn unhealthy_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.model_loaded.load(Ordering::Relaxed) {
            why.push("model not loaded".to_string());
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

    /// The periodic MQTT `health` payload.
    pub fn health_json(&self, device: &str, site: &str, spool_queued: usize) -> serde_json::Value {
        let problems = self.unhealthy_reasons();
        let cams: Vec<serde_json::Value> = self
            .cameras()
            .iter()
            .map(|c| {
                serde_json::json!({
                    "camera": c.id,
                    "status": c.state(),
                    "frames_in": c.frames_in.load(Ordering::Relaxed),
                    "frames_processed": c.frames_processed.load(Ordering::Relaxed),
                    "frames_dropped": c.frames_dropped.load(Ordering::Relaxed),
                    "frames_failed": c.frames_failed.load(Ordering::Relaxed),
                    "frames_anomalous": c.frames_anomalous.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({
            "schema": crate::alarm::SCHEMA_VERSION,
            "device": device,
            "site": site,
            "time": crate::alarm::rfc3339_utc(unix_ms()),
            "uptime_s": self.started.elapsed().as_secs(),
            "model_id": self.model_id.lock().map(|m| m.clone()).unwrap_or_default(),
            "healthy": problems.is_empty(),
            "problems": problems,
            "cameras": cams,
            "alarms_spooled": spool_queued,
            "alarms_evicted_total": self.alarms_evicted.load(Ordering::Relaxed),
            "last_reload_error": self.last_reload_error.lock().ok().and_then(|e| e.clone()),
        })
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut o = String::new();
        let cams = self.cameras();
        type Field = fn(&CameraTelemetry) -> &AtomicU64;
        let counters: [(&str, &str, Field); 6] = [
            ("frames_in_total", "Frames accepted from the camera.", |c| {
                &c.frames_in
            }),
            ("frames_processed_total", "Frames judged.", |c| {
                &c.frames_processed
            }),
            (
                "frames_dropped_total",
                "Frames dropped because inference was behind.",
                |c| &c.frames_dropped,
            ),
            (
                "frames_failed_total",
                "Frames that could not be decoded or prepared.",
                |c| &c.frames_failed,
            ),
            ("frames_anomalous_total", "Frames judged anomalous.", |c| {
                &c.frames_anomalous
            }),
            (
                "class_mismatch_total",
                "Frames whose detected class differs from the camera's pinned class.",
                |c| &c.class_mismatches,
            ),
        ];
        for (name, help, field) in counters {
            let _ = writeln!(o, "# HELP cras_{name} {help}\n# TYPE cras_{name} counter");
            for c in &cams {
                let v = field(c).load(Ordering::Relaxed);
                let _ = writeln!(o, "cras_{name}{{camera=\"{}\"}} {v}", c.id);
            }
        }
        let _ = writeln!(
            o,
            "# HELP cras_camera_up 1 when the camera is running.\n# TYPE cras_camera_up gauge"
        );
        for c in &cams {
            let s = c.state();
            let _ = writeln!(
                o,
                "cras_camera_up{{camera=\"{}\",state=\"{}\"}} {}",
                c.id,
                s.name(),
                u8::from(s == CameraState::Running)
            );
        }
        let _ = writeln!(
            o,
            "# HELP cras_queue_depth Frames waiting, per queue.\n# TYPE cras_queue_depth gauge"
        );
        for c in &cams {
            let _ = writeln!(
                o,
                "cras_queue_depth{{queue=\"capture\",camera=\"{}\"}} {}",
                c.id,
                c.queue_depth.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "cras_queue_depth{{queue=\"postprocess\"}} {}",
            self.infer_queue_depth.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "cras_queue_depth{{queue=\"publish\"}} {}",
            self.publish_queue_depth.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP cras_stage_latency_ms Per-frame latency of each stage.\n# TYPE cras_stage_latency_ms histogram"
        );
        let hists = self.latency.lock().map(|h| h.clone()).unwrap_or_default();
        for (stage, h) in STAGES.iter().zip(hists.iter()) {
            let mut cum = 0;
            for (b, n) in BUCKETS_MS.iter().zip(h.counts.iter()) {
                cum += n;
                let _ = writeln!(
                    o,
                    "cras_stage_latency_ms_bucket{{stage=\"{stage}\",le=\"{b}\"}} {cum}"
                );
            }
            let _ = writeln!(
                o,
                "cras_stage_latency_ms_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                o,
                "cras_stage_latency_ms_sum{{stage=\"{stage}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                o,
                "cras_stage_latency_ms_count{{stage=\"{stage}\"}} {}",
                h.count
            );
        }
        let plain = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                o,
                "# HELP cras_{name} {help}\n# TYPE cras_{name} {kind}\ncras_{name} {v}"
            );
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        plain(
            &mut o,
            "alarms_total",
            "counter",
            "Alarms raised.",
            ld(&self.alarms_total),
        );
        plain(
            &mut o,
            "alarms_acknowledged_total",
            "counter",
            "Alarms acknowledged by the broker.",
            ld(&self.alarms_acknowledged),
        );
        plain(
            &mut o,
            "alarms_evicted_total",
            "counter",
            "Alarms evicted from a full spool (lost).",
            ld(&self.alarms_evicted),
        );
        plain(
            &mut o,
            "alarms_spooled",
            "gauge",
            "Alarms on disk waiting for the broker.",
            ld(&self.alarms_spooled),
        );
        plain(
            &mut o,
            "spool_bytes",
            "gauge",
            "Bytes in the alarm spool.",
            ld(&self.spool_bytes),
        );
        plain(
            &mut o,
            "results_published_total",
            "counter",
            "Per-frame result messages published.",
            ld(&self.results_published),
        );
        plain(
            &mut o,
            "broker_connected",
            "gauge",
            "1 while connected to the MQTT broker.",
            u64::from(self.broker_connected.load(Ordering::Relaxed)),
        );
        plain(
            &mut o,
            "reloads_total",
            "counter",
            "Configuration reloads applied.",
            ld(&self.reloads_ok),
        );
        plain(
            &mut o,
            "reloads_failed_total",
            "counter",
            "Configuration reloads rejected.",
            ld(&self.reloads_failed),
        );
        let model = self.model_id.lock().map(|m| m.clone()).unwrap_or_default();
        let _ = writeln!(
            o,
            "# HELP cras_model_info The loaded model.\n# TYPE cras_model_info gauge\ncras_model_info{{model_id=\"{model}\"}} {}",
            u8::from(self.model_loaded.load(Ordering::Relaxed))
        );
        o
    }
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let t = Telemetry::new();
        t.set_cameras(&["cam1".into()]);
        for ms in [0.5, 3.0, 3.0, 40000.0] {
            t.observe(2, ms);
        }
        let text = t.prometheus();
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"1\"} 1"));
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"5\"} 3"));
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"30000\"} 3"));
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"60000\"} 4"));
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"+Inf\"} 4"));
        assert!(text.contains("cras_stage_latency_ms_count{stage=\"inference\"} 4"));
        assert!(text.contains("cras_frames_in_total{camera=\"cam1\"} 0"));
    }

    #[test]
    fn the_stalest_stage_is_named_for_the_watchdog() {
        let t = Telemetry::new();
        std::thread::sleep(std::time::Duration::from_millis(60));
        t.beat(0);
        t.beat(2);
        // Judging (1) has not gone round its loop since the start.
        let (stage, age) = t.stalest();
        assert_eq!(stage, "postprocess");
        assert!(age >= 0.05, "{age}");
        t.beat(1);
        assert!(t.stalest().1 < 0.05);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        // 10 observations in (0,10], 10 in (10,20]: the median is the 10 boundary, p75
        // half way into the second bucket, and nothing is past the last finite bucket.
        let b = [(10.0, 10.0), (20.0, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(bucket_quantile(&b, 0.5), Some(10.0));
        assert_eq!(bucket_quantile(&b, 0.75), Some(15.0));
        assert_eq!(bucket_quantile(&b, 0.25), Some(5.0));
        assert_eq!(bucket_quantile(&[(f64::INFINITY, 0.0)], 0.5), None);
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
