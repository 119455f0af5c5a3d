//! `cras check-config` accepts a good configuration, and for each class of mistake exits
//! non-zero with a message naming the key and what is expected. Secrets are never printed.

mod common;

use common::*;
use std::path::Path;

const GOOD: &str = r#"
device: {site: plant1, id: box1}
model:
  bundle: MODEL
  thresholds: {alpha: {image: 0.5}, beta: {image: 0.5, pixel: 0.6}}
cameras:
  - id: cam1
    pipeline: test-pattern
    params: {pattern: ball}
    class: auto
    max_fps: 5
  - id: cam2
    pipeline: rtsp
    params: {url: "rtsp://10.0.0.2/stream1"}
    class: alpha
mqtt:
  url: mqtt://127.0.0.1:1883
  client_id: cras-box1
spool:
  dir: SPOOL
"#;

fn bundle(dir: &Path) -> std::path::PathBuf {
    lite0_bundle(dir, "bundle")
}

fn check(dir: &Path, yaml: &str) -> (i32, String) {
    let file = dir.join("config.yaml");
    std::fs::write(&file, yaml).unwrap();
    let pipelines = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let (code, out, err) = cras(&[
        "check-config",
        file.to_str().unwrap(),
        "--pipelines",
        pipelines.to_str().unwrap(),
    ]);
    (code, format!("{out}{err}"))
}

#[test]
fn good_config_passes_and_each_mistake_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = bundle(dir.path());
    let good = GOOD
        .replace("MODEL", model.to_str().unwrap())
        .replace("SPOOL", dir.path().join("spool").to_str().unwrap());
    let (code, out) = check(dir.path(), &good);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK") && out.contains("2 camera(s)"), "{out}");
    assert!(
        out.contains("rtspsrc location=rtsp://10.0.0.2/stream1"),
        "{out}"
    );

    let at = format!("  bundle: {}", model.display());
    let cases: Vec<(String, &[&str])> = vec![
        (
            good.replace(
                "  client_id: cras-box1",
                "  client_id: cras-box1\n  retain: true",
            ),
            &["retain"],
        ),
        (good.replace("max_fps: 5", "max_fps: fast"), &["max_fps"]),
        (
            good.replace(&at, &format!("{at}\n  preprocess: gpu")),
            &["preprocess", "gpu"],
        ),
        (
            good.replace(&at, &format!("{at}\n  engine: tract\n  preprocess: graph")),
            &["model.preprocess", "onnxruntime"],
        ),
        (
            good.replace(&at, &format!("{at}\n  provider: opencl")),
            &["provider", "opencl"],
        ),
        (
            good.replace(&at, &format!("{at}\n  engine: tract\n  provider: cuda")),
            &["model.provider", "onnxruntime"],
        ),
        (
            good.replace(&at, &format!("{at}\n  gpu: {{builder_level: 9}}")),
            &["model.gpu.builder_level", "0 to 5"],
        ),
        (
            good.replace(&at, &format!("{at}\n  gpu: {{policy: always}}")),
            &["policy", "always"],
        ),
        (good.replace("  url: mqtt://127.0.0.1:1883\n", ""), &["url"]),
        (
            good.replace("id: cam2", "id: cam1"),
            &["cameras[1].id", "cam1"],
        ),
        (
            good.replace("class: alpha", "class: gamma"),
            &["cameras[1].class", "gamma"],
        ),
        (
            good.replace("pipeline: test-pattern", "pipeline: firewire"),
            &["cameras[0].pipeline", "firewire"],
        ),
        (
            good.replace("params: {url: \"rtsp://10.0.0.2/stream1\"}", "params: {}"),
            &["cameras[1].params", "url"],
        ),
        (
            good.replace(
                "params: {pattern: ball}",
                "params: {pattern: ball, zoom: 2}",
            ),
            &["cameras[0].params", "zoom"],
        ),
        (
            good.replace("mqtt://127.0.0.1:1883", "http://127.0.0.1:1883"),
            &["mqtt.url"],
        ),
        (
            good.replace(model.to_str().unwrap(), "/nonexistent/bundle"),
            &["model.bundle", "/nonexistent/bundle"],
        ),
        (
            good.replace(
                "  client_id: cras-box1",
                "  client_id: cras-box1\n  username: u\n  password_file: /nonexistent/pw",
            ),
            &["mqtt.password_file"],
        ),
        (
            good.replace("spool:", "http: {listen: everywhere}\nspool:"),
            &["http.listen", "everywhere"],
        ),
        (
            good.replace("site: plant1", "site: plant/1"),
            &["device.site"],
        ),
        (
            good.replace("  client_id: cras-box1", "  client_id: cras-box1\n  qos: 2"),
            &["mqtt.qos"],
        ),
        (
            good.replace("max_fps: 5", "max_fps: 5\n    stall_timeout_s: -1"),
            &["cameras[0].stall_timeout_s"],
        ),
        (
            good.replace(
                "spool:",
                "evidence: {enabled: true, dir: ev, jpeg_quality: 0}\nspool:",
            ),
            &["evidence.jpeg_quality"],
        ),
        (
            good.replace(
                "spool:",
                "evidence: {enabled: true, dir: ev, max_age_days: 0}\nspool:",
            ),
            &["evidence.max_age_days"],
        ),
        (
            good.replace("spool:", "evidence: {enabled: true, dir: /proc/ev}\nspool:"),
            &["evidence.dir", "/proc/ev"],
        ),
        (
            good.replace("spool:", "evidence: {enabled: true, keep: forever}\nspool:"),
            &["keep"],
        ),
        (
            // The imported model is not calibrated: every class needs a threshold.
            good.replace(", beta: {image: 0.5, pixel: 0.6}", ""),
            &["model.thresholds.beta", "cras calibrate"],
        ),
    ];
    for (yaml, needles) in &cases {
        let (code, out) = check(dir.path(), yaml);
        assert_ne!(code, 0, "accepted a bad config:\n{yaml}");
        for n in *needles {
            assert!(out.contains(n), "error does not name `{n}`:\n{out}");
        }
    }
}

#[test]
fn passwords_are_read_but_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let model = bundle(dir.path());
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret-Pa55\n").unwrap();
    let yaml = GOOD
        .replace("MODEL", model.to_str().unwrap())
        .replace("SPOOL", dir.path().join("spool").to_str().unwrap())
        .replace(
            "  client_id: cras-box1",
            &format!(
                "  client_id: cras-box1\n  username: cras\n  password_file: {}",
                pw.display()
            ),
        );
    let (code, out) = check(dir.path(), &yaml);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("password set"));
    assert!(!out.contains("s3cret"), "{out}");
}

#[test]
fn shipped_config_is_valid_once_its_model_exists() {
    // The shipped config.yaml points at /var/lib/cras/engines/current and /var/lib/cras/spool: check it with
    // those two paths redirected to a real bundle and a temporary spool.
    let dir = tempfile::tempdir().unwrap();
    let model = bundle(dir.path());
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml")).unwrap();
    let yaml = shipped
        .replace(
            "bundle: /var/lib/cras/engines/current",
            &format!("bundle: {}", model.display()),
        )
        .replace(
            "dir: /var/lib/cras/spool",
            &format!("dir: {}", dir.path().join("spool").display()),
        )
        .replace(
            "thresholds: {}",
            "thresholds: {alpha: {image: 0.5}, beta: {image: 0.5}}",
        );
    let (code, out) = check(dir.path(), &yaml);
    assert_eq!(code, 0, "{out}");
}

/// What the publisher would refuse at start (an MQTT URL it cannot parse, a CA file with
/// no certificate, a client key that is not a key) fails `check-config` (the unit's
/// ExecStartPre) with the key named, instead of passing and failing at start.
#[test]
fn what_the_publisher_refuses_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let model = bundle(dir.path());
    let good = GOOD
        .replace("MODEL", model.to_str().unwrap())
        .replace("SPOOL", dir.path().join("spool").to_str().unwrap());
    let not_a_cert = dir.path().join("ca.pem");
    std::fs::write(&not_a_cert, "this is not a certificate\n").unwrap();
    let tls = |ca: &Path, extra: &str| {
        good.replace(
            "  url: mqtt://127.0.0.1:1883\n",
            &format!(
                "  url: mqtts://127.0.0.1:8883\n  tls: {{ca: {}{extra}}}\n",
                ca.display()
            ),
        )
    };
    let cases: Vec<(String, &[&str])> = vec![
        (
            good.replace("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:99999"),
            &["mqtt.url", "99999", "port"],
        ),
        (
            good.replace("mqtt://127.0.0.1:1883", "mqtt://broker:port"),
            &["mqtt.url", "port"],
        ),
        (
            good.replace("mqtt://127.0.0.1:1883", "mqtt://:1883"),
            &["mqtt.url", "no host"],
        ),
        (
            tls(&not_a_cert, ""),
            &["mqtt.tls.ca", "no certificate", "ca.pem"],
        ),
        (
            tls(&dir.path().join("missing.pem"), ""),
            &["mqtt.tls.ca", "missing.pem"],
        ),
    ];
    for (yaml, needles) in &cases {
        let (code, out) = check(dir.path(), yaml);
        assert_ne!(code, 0, "accepted a config the publisher refuses:\n{yaml}");
        for n in *needles {
            assert!(out.contains(n), "error does not name `{n}`:\n{out}");
        }
    }
    // A real CA passes: the same files the publisher loads at start.
    let ca = dir.path().join("real-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=cras-test-ca", "-keyout"])
        .arg(dir.path().join("real-ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl: {made:?}");
    let (code, out) = check(dir.path(), &tls(&ca, ""));
    assert_eq!(code, 0, "{out}");
}

/// Every number and topic level has a range, checked at validation: values that used to
/// pass and then panic or stall the daemon (a health interval of u64::MAX, a stall
/// timeout of 1e20 s, 1e-300 frames per second, a `$SYS` or wildcard topic prefix) are
/// refused with the key and the range named, and the value itself is not echoed.
#[test]
fn every_limit_is_checked_at_validation() {
    let dir = tempfile::tempdir().unwrap();
    let model = bundle(dir.path());
    let good = GOOD
        .replace("MODEL", model.to_str().unwrap())
        .replace("SPOOL", dir.path().join("spool").to_str().unwrap());
    let mqtt = |extra: &str| {
        good.replace(
            "  client_id: cras-box1",
            &format!("  client_id: cras-box1\n  {extra}"),
        )
    };
    let cases: Vec<(String, &[&str])> = vec![
        (
            mqtt("health_interval_s: 18446744073709551615"),
            &["mqtt.health_interval_s", "86400"],
        ),
        (
            mqtt("result_rate_hz: 1e300"),
            &["mqtt.result_rate_hz", "100"],
        ),
        (mqtt("result_rate_hz: .nan"), &["mqtt.result_rate_hz"]),
        (mqtt("topic_prefix: $SYS/cras"), &["mqtt.topic_prefix", "$"]),
        (
            mqtt("topic_prefix: cras/#"),
            &["mqtt.topic_prefix", "wildcards"],
        ),
        (
            mqtt("topic_prefix: a/+/b"),
            &["mqtt.topic_prefix", "wildcards"],
        ),
        (
            mqtt("topic_prefix: a//b"),
            &["mqtt.topic_prefix", "empty level"],
        ),
        (
            mqtt("topic_prefix: /cras"),
            &["mqtt.topic_prefix", "empty level"],
        ),
        (mqtt("topic_prefix: \"\""), &["mqtt.topic_prefix"]),
        (
            good.replace("max_fps: 5", "max_fps: 5\n    stall_timeout_s: 1e20"),
            &["cameras[0].stall_timeout_s", "86400"],
        ),
        (
            good.replace("max_fps: 5", "max_fps: 1e-300"),
            &["cameras[0].max_fps"],
        ),
        (
            good.replace("max_fps: 5", "max_fps: .inf"),
            &["cameras[0].max_fps"],
        ),
        (
            good.replace("spool:", "batching: {max_batch: 100000}\nspool:"),
            &["batching.max_batch", "64"],
        ),
        (
            good.replace(
                "spool:",
                "batching: {max_wait_ms: 18446744073709551615}\nspool:",
            ),
            &["batching.max_wait_ms"],
        ),
        (
            good.replace("spool:\n", "spool:\n  max_bytes: 1099511627777\n"),
            &["spool.max_bytes"],
        ),
        (
            good.replace("id: cam1", &format!("id: {}", "c".repeat(65))),
            &["cameras[0].id", "64"],
        ),
    ];
    for (yaml, needles) in &cases {
        let (code, out) = check(dir.path(), yaml);
        assert_ne!(code, 0, "accepted:\n{yaml}");
        for n in *needles {
            assert!(out.contains(n), "error does not name `{n}`:\n{out}");
        }
        assert!(!out.contains("1e20") && !out.contains("1e-300"), "{out}");
    }
}

#[test]
fn the_flush_timeout_is_bounded() {
    for bad in ["inf", "NaN", "-1", "1e9", "soon"] {
        let flag = format!("--flush-timeout={bad}");
        let (code, _out, err) = cras(&["run", "--config", "/nonexistent.yaml", &flag]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--flush-timeout"), "{bad}: {err}");
        assert!(
            !err.contains("/nonexistent.yaml"),
            "refused before reading the config: {err}"
        );
    }
}

/// An RTSP camera's password is neither printed by check-config (the unit's
/// ExecStartPre, so the journal) nor echoed by an error about its value.
#[test]
fn camera_passwords_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let model = bundle(dir.path());
    let good = GOOD
        .replace("MODEL", model.to_str().unwrap())
        .replace("SPOOL", dir.path().join("spool").to_str().unwrap());
    let with_password = good.replace(
        "rtsp://10.0.0.2/stream1",
        "rtsp://op:Pa55w0rd@10.0.0.2/stream1",
    );
    let (code, out) = check(dir.path(), &with_password);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rtsp://op:***@10.0.0.2/stream1"), "{out}");
    assert!(!out.contains("Pa55w0rd"), "{out}");
    let refused = good.replace(
        "rtsp://10.0.0.2/stream1",
        "rtsp://op:Pa55w0rd@10.0.0.2/s\\\"1",
    );
    let (code, out) = check(dir.path(), &refused);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("cameras[1].params"), "{out}");
    assert!(!out.contains("Pa55w0rd"), "{out}");
    let url = good.replace("mqtt://127.0.0.1:1883", "mqtt://u:Pa55w0rd@broker:port");
    let (code, out) = check(dir.path(), &url);
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains("Pa55w0rd"), "{out}");
}
