//! `cras demo --prepare-only` builds the whole demo line from nothing: data, a trained
//! and calibrated model, camera frames and a config that `cras check-config` accepts.

mod common;

use common::*;

#[test]
fn demo_line_is_complete_and_valid() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let (code, out, err) = cras(&[
        "demo",
        "--dir",
        demo.to_str().unwrap(),
        "--epochs",
        "3",
        "--prepare-only",
    ]);
    assert_eq!(code, 0, "{err}");
    let config = std::path::PathBuf::from(out.trim());
    assert_eq!(config, demo.canonicalize().unwrap().join("config.yaml"));
    let bundle = cras::model::bundle::Bundle::read(&demo.join("model")).unwrap();
    assert_eq!(bundle.meta.classes, vec!["checker", "stripes"]);
    assert_eq!(
        bundle.meta.thresholds.len(),
        2,
        "the demo model is calibrated"
    );
    // 2 classes x (6 good + 3 defect kinds x 2) test images, interleaved.
    let frames = std::fs::read_dir(demo.join("frames")).unwrap().count();
    assert_eq!(frames, 24);
    let (code, out, err) = cras(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("image-sequence") || out.contains("multifilesrc"),
        "{out}"
    );
}
