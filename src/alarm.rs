//! The MQTT contract's payloads (design.md, "MQTT contract"): topics under
//! `<prefix>/<site>/<device>`, JSON with a schema version. Alarms carry the spool's
//! sequence number, unique per device and never reused, so a subscriber can drop the
//! duplicate QoS 1 may deliver after a crash.

use crate::postprocess::Region;

pub const SCHEMA_VERSION: u32 = 1;

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
    pub postprocess_ms: f64,
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
}

/// RFC 3339 UTC time (`2026-11-28T23:41:05.123Z`) from Unix milliseconds.
pub fn rfc3339_utc(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        // `date -u -d @1795908064` (GNU date) prints 2026-11-28T23:21:04
        assert_eq!(rfc3339_utc(1_795_908_064_123), "2026-11-28T23:21:04.123Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn topics_follow_the_contract() {
        let t = Topics::new("factory/", "plant1", "box1");
        assert_eq!(t.status(), "factory/plant1/box1/status");
        assert_eq!(t.alarm("cam1"), "factory/plant1/box1/cam1/alarm");
        assert_eq!(t.result("cam1"), "factory/plant1/box1/cam1/result");
        assert_eq!(t.health(), "factory/plant1/box1/health");
    }
}
