//! `model.provider` through `cras run`, on this CPU-only machine with onnxruntime's CPU
//! library: `tensorrt` with `policy: prefer` serves on the CPU and says so in the log,
//! /metrics, /healthz, the `health` message and the service status; with `require` the
//! daemon does not start and names what is missing. The `prefer` run also feeds camera
//! frames through the engine's frames stage (`preprocess: graph`): every frame gets the
//! verdict `cras infer` gave it through the Rust pre-processing. A second camera on the
//! device-memory template `test-pattern-cuda` falls back to its host-memory template
//! with one log line and is judged like any other.

mod common;

use common::daemon::*;
use std::time::Duration;

fn with_model_lines(config: &std::path::Path, lines: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        text.replacen("model:\n", &format!("model:\n{lines}"), 1),
    )
    .unwrap();
}

#[test]
fn prefer_serves_on_the_cpu_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Looping: a folder camera that ended would make the daemon unhealthy.
    let line = line(dir);
    let params = folder_params(&line, 4, true);
    let rig = rig_with(
        dir,
        line,
        &[
            ("cam1", "image-sequence", &params),
            (
                "cam2",
                "test-pattern-cuda",
                "{width: 320, height: 240, fps: 5}",
            ),
        ],
        "  result_rate_hz: 100\n",
    );
    with_model_lines(
        &rig.config,
        "  provider: tensorrt\n  gpu: {policy: prefer}\n  preprocess: graph\n",
    );
    let (sock, notes) = notify_socket(dir);
    let d = Daemon::start(
        &rig.config,
        &dir.join("cras.log"),
        &[("NOTIFY_SOCKET", sock.to_str().unwrap())],
    );
    let n = rig.line.defective.len();
    wait_for(240.0, "every frame to be judged", || {
        frames_processed(rig.http, "cam1") >= n as f64
    });
    wait_for(60.0, "the device-memory camera to be judged", || {
        frames_processed(rig.http, "cam2") >= 3.0
    });
    let log = d.log_text();
    assert_eq!(
        log.matches("device frames (cuda) unavailable").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("capturing through `test-pattern` in host memory"),
        "{log}"
    );
    let (_, metrics) = http_get(rig.http, "/metrics").unwrap();
    assert_eq!(metric(&metrics, "cras_engine_fallback"), Some(1.0));
    assert!(
        metrics
            .contains("cras_engine_info{provider=\"cpu\",wanted=\"tensorrt\",state=\"serving\"} 1"),
        "{metrics}"
    );
    let (code, body) = http_get(rig.http, "/healthz").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "ok\nengine on cpu (not tensorrt)\n")
    );
    wait_for(10.0, "a health message", || {
        !rig.sub.on("/health").is_empty()
    });
    let health = rig.sub.on("/health").last().unwrap().json();
    let engine = &health["engine"];
    assert_eq!(engine["provider"], "cpu");
    assert_eq!(engine["wanted"], "tensorrt");
    let why = engine["fallback"].as_str().unwrap_or_default().to_string();
    // The reason names what is missing here: a GPU build of onnxruntime.
    assert!(
        why.contains("TensorrtExecutionProvider") || why.contains("gpu"),
        "{why}"
    );
    assert!(
        d.log_text().contains("tensorrt unavailable"),
        "{}",
        d.log_text()
    );
    let first = notes.lock().unwrap().first().cloned().unwrap_or_default();
    assert!(
        first.starts_with("READY=1") && first.contains(", engine on cpu (not tensorrt)"),
        "{first}"
    );

    // The frames stage judged as the Rust path did (the line's threshold lies in the
    // widest gap of the scores `cras infer` gave).
    std::thread::sleep(Duration::from_millis(1000));
    let results: Vec<serde_json::Value> = rig
        .sub
        .on("/cam1/result")
        .iter()
        .map(|m| m.json())
        .collect();
    assert!(
        results.len() >= n,
        "one result per frame: {}",
        results.len()
    );
    for r in &results {
        let frame = r["frame"].as_u64().unwrap() as usize;
        assert_eq!(
            r["anomalous"].as_bool(),
            Some(rig.line.defective[(frame - 1) % n]),
            "frame {frame}: {r}"
        );
    }
}

#[test]
fn require_refuses_to_start_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let rig = folder_rig(dir, 4, false, "");
    with_model_lines(&rig.config, "  provider: cuda\n  gpu: {policy: require}\n");
    let mut d = Daemon::start(&rig.config, &dir.join("cras.log"), &[]);
    let mut child = d.child.take().unwrap();
    let mut code = None;
    for _ in 0..600 {
        if let Some(s) = child.try_wait().unwrap() {
            code = s.code();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = d.log_text();
    assert_ne!(code, Some(0), "{log}");
    assert!(code.is_some(), "still running: {log}");
    assert!(log.contains("model.provider `cuda` is required"), "{log}");
    assert!(
        log.contains("CUDAExecutionProvider") && log.contains("cras setup --gpu"),
        "{log}"
    );
}

#[test]
fn engine_prepare_names_what_is_missing_on_a_cpu_machine() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::lite0_bundle(dir.path(), "model");
    let images = common::fixtures().join("lite0-d384/images/alpha/test/good");
    let (code, _, err) = common::cras(&[
        "engine",
        "prepare",
        "--model",
        model.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("TensorRT unavailable")
            && err.contains("TensorrtExecutionProvider")
            && err.contains("cras setup --gpu"),
        "{err}"
    );
}
