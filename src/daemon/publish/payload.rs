//! The MQTT contract's payloads (README, "Run the daemon"): topics under
//! `<prefix>/<site>/<device>`, JSON with a schema version. Alarms carry the spool's
//! sequence number, unique per device and never reused, so a subscriber can drop the
//! duplicate QoS 1 may deliver after a crash. The per-frame `result` and the periodic
//! `health` messages are built here too, so the whole contract is in one file.

use crate::clock::{rfc3339_utc, unix_ms};
use crate::daemon::judging::Judged;
use crate::daemon::regions::Region;
use crate::daemon::telemetry::Telemetry;
use std::sync::atomic::Ordering;

pub const SCHEMA_VERSION: u32 = 1;
/// Regions listed in one alarm at most (largest first); `regions_total` has the count.
pub const MAX_REGIONS: usize = 32;

/// Topic names of one device.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str, device: &str) -> Topics {
        Topics {
            base: format!("{}/{site}/{device}", prefix.trim_end_matches('/')),
        }
    }
    /// Retained "online"/"offline" (the last will).
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    pub fn health(&self) -> String {
        format!("{}/health", self.base)
    }
    pub fn alarm(&self, camera: &str) -> String {
        format!("{}/{camera}/alarm", self.base)
    }
    pub fn result(&self, camera: &str) -> String {
        format!("{}/{camera}/result", self.base)
    }
}

/// Milliseconds spent in each stage of the pipeline for one frame.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageLatencies {
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    pub inference_ms: f64,
    /// The judging stage's time. Alarm schema 1 calls it `postprocess_ms`; the name
    /// stays until the schema changes, so that subscribers keep working.
    #[serde(rename = "postprocess_ms")]
    pub judging_ms: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AlarmPayload {
    pub schema: u32,
    pub device: String,
    pub site: String,
    pub camera: String,
    /// Device-wide alarm sequence number (spool order; never reused).
    pub sequence: u64,
    /// The camera's frame number (restarts with the daemon).
    pub frame: u64,
    /// Capture time, UTC, RFC 3339 with milliseconds.
    pub captured_at: String,
    /// The class judged against (the camera's pinned class, else the detected one).
    pub class: String,
    /// The class the model recognised.
    pub detected_class: String,
    pub score: f32,
    pub threshold: f32,
    /// The largest regions (at most 32), in camera-frame pixels.
    pub regions: Vec<Region>,
    pub regions_total: usize,
    pub model_id: String,
    pub latency: StageLatencies,
    /// Where the alarm's evidence is, relative to the store (`<UTC date>/<camera>/<sequence>`;
    /// add `.jpg`, `.map.png`, `.overlay.jpg` or `.json`). Absent when the store is off
    /// or was behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// The evidence's file names, in that folder (absent with `evidence`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence_files: Vec<String>,
}

impl AlarmPayload {
    /// The alarm of an anomalous frame, numbered `sequence` by the spool.
    pub fn new(j: &Judged, sequence: u64, site: &str, device: &str) -> AlarmPayload {
        let mut regions = j.verdict.regions.clone();
        regions.truncate(MAX_REGIONS);
        AlarmPayload {
            schema: SCHEMA_VERSION,
            device: device.to_string(),
            site: site.to_string(),
            camera: j.camera.clone(),
            sequence,
            frame: j.frame,
            captured_at: rfc3339_utc(j.captured_ms),
            class: j.class.clone(),
            detected_class: j.detected_class.clone(),
            score: j.verdict.score,
            threshold: j.verdict.threshold,
            regions,
            regions_total: j.verdict.regions.len(),
            model_id: j.model_id.clone(),
            latency: j.latency.clone(),
            evidence: None,
            evidence_files: Vec::new(),
        }
    }
}

/// The rate-limited per-frame `result` message (QoS 0, not spooled).
pub fn result_json(j: &Judged, device: &str) -> serde_json::Value {
    serde_json::json!({
        "schema": SCHEMA_VERSION,
        "device": device,
        "camera": j.camera,
        "frame": j.frame,
        "captured_at": rfc3339_utc(j.captured_ms),
        "class": j.class,
        "score": j.verdict.score,
        "threshold": j.verdict.threshold,
        "anomalous": j.verdict.anomalous,
        "model_id": j.model_id,
        "latency": j.latency,
    })
}

/// The periodic `health` message: the daemon's state as `/healthz` and `/metrics` see it.
pub fn health_json(t: &Telemetry, device: &str, site: &str, spooled: usize) -> serde_json::Value {
    let problems = t.unhealthy_reasons();
    let cams: Vec<serde_json::Value> = t
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
        "schema": SCHEMA_VERSION,
        "device": device,
        "site": site,
        "time": rfc3339_utc(unix_ms()),
        "uptime_s": t.uptime_s(),
        "model_id": t.model_id.lock().map(|m| m.clone()).unwrap_or_default(),
        "healthy": problems.is_empty(),
        "problems": problems,
        "cameras": cams,
        "engine": t.engine.get(),
        "alarms_spooled": spooled,
        "alarms_evicted_total": t.alarms_evicted.load(Ordering::Relaxed),
        "last_reload_error": t.last_reload_error.lock().ok().and_then(|e| e.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_contract() {
        let t = Topics::new("factory/", "plant1", "box1");
        assert_eq!(t.status(), "factory/plant1/box1/status");
        assert_eq!(t.alarm("cam1"), "factory/plant1/box1/cam1/alarm");
        assert_eq!(t.result("cam1"), "factory/plant1/box1/cam1/result");
        assert_eq!(t.health(), "factory/plant1/box1/health");
    }
}
