//! Bad model files, images and bundles end in clear errors naming what was wrong; in
//! `cras infer` a bad image fails alone and the others are still processed.

mod common;

use common::*;
use cras::weights::{StateDict, save_safetensors};
use std::path::{Path, PathBuf};

fn import(
    backbone: &str,
    checkpoint: &Path,
    centers: &Path,
    classes: &str,
    out: &Path,
) -> (i32, String) {
    let (code, _, err) = cras(&[
        "import-reference",
        "--backbone",
        backbone,
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--centers",
        centers.to_str().unwrap(),
        "--classes",
        classes,
        "--no-bn-replay",
        "--out",
        out.to_str().unwrap(),
    ]);
    (code, err)
}

fn lite0_set() -> PathBuf {
    fixtures().join("lite0-d384")
}

#[test]
fn backbone_with_a_missing_key_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = StateDict::load(&lite0_weights()).unwrap();
    sd.tensors.remove("_blocks.3._bn1.running_var");
    let p = dir.path().join("bb.safetensors");
    save_safetensors(&sd.tensors, &p).unwrap();
    let set = lite0_set();
    let (code, err) = import(
        &format!("efficientnet_lite0={}", p.display()),
        &set.join("ckpt_best_0.pth"),
        &set.join("center.pth"),
        "alpha,beta",
        &dir.path().join("b"),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("missing tensor `_blocks.3._bn1.running_var`"),
        "{err}"
    );
    assert!(
        !dir.path().join("b/model.onnx").exists(),
        "no bundle may be written"
    );
}

#[test]
fn backbone_with_a_wrong_shape_names_key_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = StateDict::load(&lite0_weights()).unwrap();
    let t = sd
        .tensors
        .get_mut("_blocks.4._project_conv.weight")
        .unwrap();
    t.shape = vec![40, 240, 1, 1, 1];
    let p = dir.path().join("bb.safetensors");
    save_safetensors(&sd.tensors, &p).unwrap();
    let set = lite0_set();
    let (code, err) = import(
        &format!("efficientnet_lite0={}", p.display()),
        &set.join("ckpt_best_0.pth"),
        &set.join("center.pth"),
        "alpha,beta",
        &dir.path().join("b"),
    );
    assert_eq!(code, 2);
    assert!(err.contains("`_blocks.4._project_conv.weight` has shape [40, 240, 1, 1, 1], expected [40, 240, 1, 1]"), "{err}");
}

#[test]
fn wrong_architecture_is_caught_by_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let set = lite0_set();
    let (code, err) = import(
        &format!("resnet18={}", lite0_weights().display()),
        &set.join("ckpt_best_0.pth"),
        &set.join("center.pth"),
        "alpha,beta",
        &dir.path().join("b"),
    );
    assert_eq!(code, 2);
    assert!(err.contains("missing tensor `conv1.weight`"), "{err}");
}

#[test]
fn truncated_pth_files_are_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let set = lite0_set();
    // Zip-format checkpoint cut in half.
    let bytes = std::fs::read(set.join("ckpt_best_0.pth")).unwrap();
    let ckpt = dir.path().join("ckpt.pth");
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).unwrap();
    let (code, err) = import(
        &format!("efficientnet_lite0={}", lite0_weights().display()),
        &ckpt,
        &set.join("center.pth"),
        "alpha,beta",
        &dir.path().join("b"),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("ckpt.pth") && err.contains("truncated"),
        "{err}"
    );
    // Legacy-format backbone cut short.
    let bytes = std::fs::read(lite0_weights()).unwrap();
    let bb = dir.path().join("bb.pth");
    std::fs::write(&bb, &bytes[..bytes.len() - 1000]).unwrap();
    let (code, err) = import(
        &format!("efficientnet_lite0={}", bb.display()),
        &set.join("ckpt_best_0.pth"),
        &set.join("center.pth"),
        "alpha,beta",
        &dir.path().join("b"),
    );
    assert_eq!(code, 2);
    assert!(err.contains("bb.pth") && err.contains("truncated"), "{err}");
}

#[test]
fn class_count_must_match_the_centers() {
    let dir = tempfile::tempdir().unwrap();
    let set = lite0_set();
    let (code, err) = import(
        &format!("efficientnet_lite0={}", lite0_weights().display()),
        &set.join("ckpt_best_0.pth"),
        &set.join("center.pth"),
        "alpha",
        &dir.path().join("b"),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("centers for 2 classes but --classes names 1"),
        "{err}"
    );
}

#[test]
fn corrupt_image_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = lite0_bundle(dir.path(), "bundle");
    let good = lite0_set().join("images/alpha/test/good/000.png");
    let bytes = std::fs::read(&good).unwrap();
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, &bytes[..bytes.len() / 3]).unwrap();
    let missing = dir.path().join("missing.png");
    let (code, stdout, err) = cras(&[
        "infer",
        "--model",
        bundle.to_str().unwrap(),
        "--batch",
        "3",
        corrupt.to_str().unwrap(),
        good.to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let by_image = |p: &Path| {
        lines
            .iter()
            .find(|l| l["image"] == p.display().to_string())
            .unwrap()
            .clone()
    };
    assert!(
        by_image(&corrupt)["error"]
            .as_str()
            .unwrap()
            .contains("cannot decode image")
    );
    assert!(
        by_image(&missing)["error"]
            .as_str()
            .unwrap()
            .contains("cannot read image")
    );
    let ok = by_image(&good);
    assert!(
        (ok["score"].as_f64().unwrap() - 0.8569036722183228).abs() < 1e-5,
        "{ok}"
    );
    assert!(err.contains("2 image(s) failed"), "{err}");
}

#[test]
fn changed_model_onnx_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = lite0_bundle(dir.path(), "bundle");
    let onnx = bundle.join("model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x55;
    std::fs::write(&onnx, &bytes).unwrap();
    let img = lite0_set().join("images/alpha/test/good/000.png");
    let (code, _, err) = cras(&[
        "infer",
        "--model",
        bundle.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("model.onnx does not match model.yaml"),
        "{err}"
    );
}

#[test]
fn bad_model_yaml_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = lite0_bundle(dir.path(), "bundle");
    let yaml_path = bundle.join("model.yaml");
    let yaml = std::fs::read_to_string(&yaml_path).unwrap();
    std::fs::write(&yaml_path, yaml.replace("resize: 329", "resize: 100")).unwrap();
    let img = lite0_set().join("images/alpha/test/good/000.png");
    let (code, _, err) = cras(&[
        "infer",
        "--model",
        bundle.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("input.resize (100) must be at least the crop size"),
        "{err}"
    );
    std::fs::write(&yaml_path, format!("{yaml}surprise: 1\n")).unwrap();
    let (code, _, err) = cras(&[
        "infer",
        "--model",
        bundle.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("surprise"), "{err}");
}

#[test]
fn missing_onnxruntime_library_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = lite0_bundle(dir.path(), "bundle");
    let img = lite0_set().join("images/alpha/test/good/000.png");
    let out = std::process::Command::new(cras_bin())
        .args([
            "infer",
            "--model",
            bundle.to_str().unwrap(),
            img.to_str().unwrap(),
        ])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("onnxruntime library not found") && err.contains("cras setup"),
        "{err}"
    );
}

/// A 1x100000 PNG is a few hundred bytes; resizing its short side to the model's size
/// used to allocate gigabytes and abort the process. It fails alone now.
#[test]
fn a_huge_image_in_a_tiny_file_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = lite0_bundle(dir.path(), "bundle");
    let sliver = dir.path().join("sliver.png");
    image::GrayImage::new(1, 100_000).save(&sliver).unwrap();
    assert!(
        std::fs::metadata(&sliver).unwrap().len() < 1 << 20,
        "a small file"
    );
    let good = lite0_set().join("images/alpha/test/good/000.png");
    let (code, stdout, err) = cras(&[
        "infer",
        "--model",
        bundle.to_str().unwrap(),
        sliver.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0]["error"]
            .as_str()
            .unwrap()
            .contains("1x100000 is larger than 16384 pixels"),
        "{}",
        lines[0]
    );
    assert!(lines[1]["score"].as_f64().is_some(), "{}", lines[1]);
}

/// model.yaml's model fields are covered by the bundle's hash: an edit that passes the
/// range checks is still refused, and a resize that would exhaust memory is out of range.
#[test]
fn edited_model_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = lite0_bundle(dir.path(), "bundle");
    let yaml_path = bundle.join("model.yaml");
    let yaml = std::fs::read_to_string(&yaml_path).unwrap();
    let img = lite0_set().join("images/alpha/test/good/000.png");
    let infer = || {
        cras(&[
            "infer",
            "--model",
            bundle.to_str().unwrap(),
            img.to_str().unwrap(),
        ])
    };
    std::fs::write(&yaml_path, yaml.replace("resize: 329", "resize: 330")).unwrap();
    let (code, _, err) = infer();
    assert_eq!(code, 2);
    assert!(err.contains("model fields"), "{err}");
    std::fs::write(&yaml_path, yaml.replace("resize: 329", "resize: 60000")).unwrap();
    let (code, _, err) = infer();
    assert_eq!(code, 2);
    assert!(err.contains("at most 4 times the crop size"), "{err}");
    // The image-score rule is written into the graph: naming another one in model.yaml
    // is an edit of the model (a bundle without it used the paper's largest patch score).
    assert!(!yaml.contains("image_score"), "{yaml}");
    let rule = "image_score:\n  rule: map_top\n  fraction: 0.005\nthresholds:";
    std::fs::write(&yaml_path, yaml.replacen("thresholds:", rule, 1)).unwrap();
    let (code, _, err) = infer();
    assert_eq!(code, 2);
    assert!(err.contains("model fields"), "{err}");
    let rule = "image_score:\n  rule: map_top\n  fraction: 2\nthresholds:";
    std::fs::write(&yaml_path, yaml.replacen("thresholds:", rule, 1)).unwrap();
    let (code, _, err) = infer();
    assert_eq!(code, 2);
    assert!(
        err.contains("image_score") && err.contains("(0, 1]"),
        "{err}"
    );
    // So are the test-time views: adding one is an edit, naming a view badly is named.
    let views = "views:\n- original\n- rotate180\nthresholds:";
    std::fs::write(&yaml_path, yaml.replacen("thresholds:", views, 1)).unwrap();
    let (code, _, err) = infer();
    assert_eq!(code, 2);
    assert!(err.contains("model fields"), "{err}");
    let views = "views:\n- rotate180\nthresholds:";
    std::fs::write(&yaml_path, yaml.replacen("thresholds:", views, 1)).unwrap();
    let (code, _, err) = infer();
    assert_eq!(code, 2);
    assert!(err.contains("first view must be `original`"), "{err}");
    // Thresholds are not model fields: calibration may change them.
    std::fs::write(&yaml_path, &yaml).unwrap();
    let (code, _, err) = infer();
    assert_eq!(code, 0, "{err}");
}

/// A bundle whose hashes agree but whose model.yaml sizes do not fit its graph (a tool
/// that rewrote both, a hand-made bundle) is refused when it loads, naming the output.
#[test]
fn sizes_that_do_not_fit_the_graph_are_refused_at_load() {
    use cras::model::bundle::Bundle;
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::read(&lite0_bundle(dir.path(), "bundle")).unwrap();
    let mut meta = bundle.meta.clone();
    meta.patch_grid = [meta.patch_grid[0] + 1, meta.patch_grid[1]];
    let edited = dir.path().join("edited");
    Bundle::write(&edited, meta, &bundle.onnx, None).unwrap();
    let img = lite0_set().join("images/alpha/test/good/000.png");
    let (code, _, err) = cras(&[
        "infer",
        "--model",
        edited.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("the graph does not match model.yaml") && err.contains("`patch_scores`"),
        "{err}"
    );
}
