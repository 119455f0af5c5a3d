//! The Prometheus text exposition (format 0.0.4) of the daemon's [`Telemetry`], served
//! by [`super::http`] at `/metrics`, and the inverse a reader of it needs: a quantile from
//! cumulative buckets.
//!
//! Metric names are stable. The judging stage's `stage` and `queue` label was
//! `postprocess` before the stage got one name everywhere (README, "Metrics").

use super::telemetry::{BUCKETS_MS, CameraState, CameraTelemetry, Latency, Telemetry};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// `/metrics` for `t`.
pub fn render(t: &Telemetry) -> String {
    let mut o = String::new();
    let cams = t.cameras();
    camera_counters(&mut o, &cams);
    queues(&mut o, t, &cams);
    latencies(&mut o, t);
    totals(&mut o, t);
    engine(&mut o, t);
    let model = t.model_id.lock().map(|m| m.clone()).unwrap_or_default();
    let _ = writeln!(
        o,
        "# HELP cras_model_info The loaded model.\n# TYPE cras_model_info gauge\ncras_model_info{{model_id=\"{model}\"}} {}",
        u8::from(t.model_loaded.load(Ordering::Relaxed))
    );
    o
}

/// Where the engine runs against the configuration, and its background build.
fn engine(o: &mut String, t: &Telemetry) {
    let r = t.engine.get();
    let _ = writeln!(
        o,
        "# HELP cras_engine_info The engine's provider now, the one configured, and its state \
         (serving, building, checking, refused, failed).\n# TYPE cras_engine_info gauge\n\
         cras_engine_info{{provider=\"{}\",wanted=\"{}\",state=\"{}\"}} 1",
        r.provider, r.wanted, r.state
    );
    let _ = writeln!(
        o,
        "# HELP cras_engine_fallback 1 while the engine serves on another provider than \
         configured (model.gpu.policy: prefer).\n# TYPE cras_engine_fallback gauge\n\
         cras_engine_fallback {}",
        u8::from(r.fell_back())
    );
    let _ = writeln!(
        o,
        "# HELP cras_engine_swaps_total Engines swapped in after a background build and \
         check.\n# TYPE cras_engine_swaps_total counter\ncras_engine_swaps_total {}",
        r.swaps
    );
}

fn camera_counters(o: &mut String, cams: &[std::sync::Arc<CameraTelemetry>]) {
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
        for c in cams {
            let v = field(c).load(Ordering::Relaxed);
            let _ = writeln!(o, "cras_{name}{{camera=\"{}\"}} {v}", c.id);
        }
    }
    let _ = writeln!(
        o,
        "# HELP cras_camera_up 1 when the camera is running.\n# TYPE cras_camera_up gauge"
    );
    for c in cams {
        let s = c.state();
        let _ = writeln!(
            o,
            "cras_camera_up{{camera=\"{}\",state=\"{}\"}} {}",
            c.id,
            s.name(),
            u8::from(s == CameraState::Running)
        );
    }
}

fn queues(o: &mut String, t: &Telemetry, cams: &[std::sync::Arc<CameraTelemetry>]) {
    let _ = writeln!(
        o,
        "# HELP cras_queue_depth Frames waiting, per queue.\n# TYPE cras_queue_depth gauge"
    );
    for c in cams {
        let _ = writeln!(
            o,
            "cras_queue_depth{{queue=\"capture\",camera=\"{}\"}} {}",
            c.id,
            c.queue_depth.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        o,
        "cras_queue_depth{{queue=\"judging\"}} {}",
        t.infer_queue_depth.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "cras_queue_depth{{queue=\"publish\"}} {}",
        t.publish_queue_depth.load(Ordering::Relaxed)
    );
}

fn latencies(o: &mut String, t: &Telemetry) {
    let _ = writeln!(
        o,
        "# HELP cras_stage_latency_ms Per-frame latency of each stage.\n# TYPE cras_stage_latency_ms histogram"
    );
    for (span, h) in Latency::ALL.iter().zip(t.latencies().iter()) {
        let stage = span.name();
        let mut cum = 0;
        for (b, n) in BUCKETS_MS.iter().zip(h.counts().iter()) {
            cum += n;
            let _ = writeln!(
                o,
                "cras_stage_latency_ms_bucket{{stage=\"{stage}\",le=\"{b}\"}} {cum}"
            );
        }
        let _ = writeln!(
            o,
            "cras_stage_latency_ms_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}",
            h.count()
        );
        let _ = writeln!(
            o,
            "cras_stage_latency_ms_sum{{stage=\"{stage}\"}} {}",
            h.sum()
        );
        let _ = writeln!(
            o,
            "cras_stage_latency_ms_count{{stage=\"{stage}\"}} {}",
            h.count()
        );
    }
}

/// Device-wide metrics (name, type, help), in the order of [`total_values`].
const TOTALS: [(&str, &str, &str); 19] = [
    ("alarms_total", "counter", "Alarms raised."),
    (
        "alarms_acknowledged_total",
        "counter",
        "Alarms acknowledged by the broker.",
    ),
    (
        "alarms_evicted_total",
        "counter",
        "Alarms evicted from a full spool (lost).",
    ),
    (
        "alarms_failed_total",
        "counter",
        "Alarms that could not be stored (lost).",
    ),
    (
        "alarms_spooled",
        "gauge",
        "Alarms on disk waiting for the broker.",
    ),
    ("spool_bytes", "gauge", "Bytes in the alarm spool."),
    (
        "results_published_total",
        "counter",
        "Per-frame result messages published.",
    ),
    (
        "broker_connected",
        "gauge",
        "1 while connected to the MQTT broker.",
    ),
    ("reloads_total", "counter", "Configuration reloads applied."),
    (
        "reloads_failed_total",
        "counter",
        "Configuration reloads rejected.",
    ),
    (
        "overlay_frames_total",
        "counter",
        "Operator-view frames drawn and streamed (only while someone watches).",
    ),
    (
        "overlay_dropped_total",
        "counter",
        "Operator-view frames dropped because drawing was behind.",
    ),
    (
        "evidence_written_total",
        "counter",
        "Alarm evidence sets written (frame, map, overlay, payload).",
    ),
    (
        "evidence_dropped_total",
        "counter",
        "Alarm evidence sets dropped because the writer was behind (the alarm was sent).",
    ),
    (
        "evidence_failed_total",
        "counter",
        "Alarm evidence sets that could not be written (disk, encoding).",
    ),
    (
        "evidence_removed_total",
        "counter",
        "Alarm evidence sets removed by retention (size or age).",
    ),
    ("evidence_bytes", "gauge", "Bytes in the evidence store."),
    (
        "http_refused_total",
        "counter",
        "HTTP connections closed at once: the server was at its connection limit.",
    ),
    (
        "http_accept_errors_total",
        "counter",
        "HTTP accepts that failed (out of file descriptors or memory).",
    ),
];

fn total_values(t: &Telemetry) -> [u64; TOTALS.len()] {
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    [
        ld(&t.alarms_total),
        ld(&t.alarms_acknowledged),
        ld(&t.alarms_evicted),
        ld(&t.alarms_failed),
        ld(&t.alarms_spooled),
        ld(&t.spool_bytes),
        ld(&t.results_published),
        u64::from(t.broker_connected.load(Ordering::Relaxed)),
        ld(&t.reloads_ok),
        ld(&t.reloads_failed),
        ld(&t.overlay_frames),
        ld(&t.overlay_dropped),
        ld(&t.evidence.written),
        ld(&t.evidence.dropped),
        ld(&t.evidence.failed),
        ld(&t.evidence.removed),
        ld(&t.evidence.bytes),
        ld(&t.http_refused),
        ld(&t.http_accept_errors),
    ]
}

fn totals(o: &mut String, t: &Telemetry) {
    for ((name, kind, help), v) in TOTALS.iter().zip(total_values(t)) {
        let _ = writeln!(
            o,
            "# HELP cras_{name} {help}\n# TYPE cras_{name} {kind}\ncras_{name} {v}"
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let t = Telemetry::new();
        t.set_cameras(&["cam1".into()]);
        for ms in [0.5, 3.0, 3.0, 40000.0] {
            t.observe(Latency::Inference, ms);
        }
        let text = render(&t);
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"1\"} 1"));
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"5\"} 3"));
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"30000\"} 3"));
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"60000\"} 4"));
        assert!(text.contains("cras_stage_latency_ms_bucket{stage=\"inference\",le=\"+Inf\"} 4"));
        assert!(text.contains("cras_stage_latency_ms_count{stage=\"inference\"} 4"));
        assert!(text.contains("cras_frames_in_total{camera=\"cam1\"} 0"));
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
}
