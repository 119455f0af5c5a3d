//! Bad input at run time gets a clear error and the rest keeps running: a corrupt image
//! in a folder camera costs that frame only; a camera whose device is missing keeps
//! retrying with a reason; a pipeline that cannot be built is `failed`; /healthz says
//! which camera and why. At start, a missing model or a bad key stops `cras run` with a
//! message naming the key.

mod common;

use common::daemon::*;
use common::*;
use std::path::Path;

#[test]
fn broken_cameras_and_frames_do_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let line = line(dir);
    // Frame 3 (00002.png) is cut short: a corrupt file.
    let third = line.frames.join("00002.png");
    let bytes = std::fs::read(&third).unwrap();
    std::fs::write(&third, &bytes[..bytes.len() / 3]).unwrap();
    // The shipped templates plus one naming an element that does not exist.
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    for e in std::fs::read_dir(&shipped).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, pipelines.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        pipelines.join("broken.pipeline"),
        "# A plugin that is not installed.\nnosuchcamerasrc ! videoconvert ! appsink name=sink\n",
    )
    .unwrap();
    let broker = Broker::start(&dir.join("broker"));
    let http = free_port();
    let cfg = write_config(
        dir,
        &line,
        &broker.url(),
        http,
        &[
            ("good", "image-sequence", &folder_params(&line, 6, false)),
            ("usb", "v4l2", "{device: /dev/video-missing}"),
            ("plugin", "broken", "{}"),
        ],
        "",
    );
    let mut d = Daemon::start(&cfg, &dir.join("cras.log"), &[]);
    let n = line.defective.len() as f64;
    wait_for(90.0, "the folder camera to finish", || {
        http_get(http, "/metrics")
            .map(|(_, m)| {
                metric(&m, "cras_frames_processed_total{camera=\"good\"}") == Some(n - 1.0)
                    && metric(&m, "cras_frames_failed_total{camera=\"good\"}") == Some(1.0)
            })
            .unwrap_or(false)
    });
    let (code, body) = http_get(http, "/healthz").unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("camera usb: reconnecting:"), "{body}");
    assert!(body.contains("/dev/video-missing"), "{body}");
    assert!(body.contains("camera plugin: failed:"), "{body}");
    assert!(body.contains("nosuchcamerasrc"), "{body}");
    let log = d.log_text();
    assert!(
        log.lines().any(|l| l.contains("frame skipped")
            && l.contains("cannot decode")
            && l.contains("camera=good")),
        "{log}"
    );
    let (code, _) = d.stop_with("TERM", 30.0);
    assert_eq!(code, Some(0), "{}", d.log_text());
}

#[test]
fn run_refuses_a_bad_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let model = lite0_bundle(dir, "model");
    let yaml = format!(
        "device: {{site: plant1, id: box1}}\nmodel: {{bundle: {}, thresholds: {{alpha: {{image: 0.5}}, beta: {{image: 0.5}}}}}}\n\
         cameras: [{{id: cam1, pipeline: test-pattern}}]\nmqtt: {{url: \"mqtt://127.0.0.1:1\", client_id: c}}\nspool: {{dir: {}}}\nhttp: {{listen: \"127.0.0.1:{}\"}}\n",
        model.display(),
        dir.join("spool").display(),
        free_port()
    );
    let cfg = dir.join("config.yaml");
    let pipelines = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let run = |yaml: &str| {
        std::fs::write(&cfg, yaml).unwrap();
        cras(&[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--pipelines",
            pipelines.to_str().unwrap(),
        ])
    };
    let (code, _, err) = run(&yaml.replace(model.to_str().unwrap(), "/nonexistent/model"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("model.bundle") && err.contains("/nonexistent/model"),
        "{err}"
    );
    let (code, _, err) = run(&yaml.replace("client_id: c", "client_id: c, keepalive: 5"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("keepalive"), "{err}");
    // A model file that is not what model.yaml says (corrupt or swapped).
    let onnx = model.join("model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&onnx, bytes).unwrap();
    let (code, _, err) = run(&yaml);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("model.bundle") && err.contains("sha256"),
        "{err}"
    );
}
