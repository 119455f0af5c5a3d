//! Shared helpers for the parity tests: where the fixtures are, the closed-form weights
//! of the `wrn50-formula` fixtures, and tolerance checks.
#![allow(dead_code)]

use cras::weights::{Tensor, TensorData, npy};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod daemon;
pub mod mqtt;
pub mod view;

/// The fixture folder: `$CRAS_FIXTURES`, else `../shared/fixtures` beside the checkout.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("CRAS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(
        dir.join("README.md").is_file(),
        "parity fixtures not found at {} (set CRAS_FIXTURES)",
        dir.display()
    );
    dir
}

/// The pretrained EfficientNet-Lite0 weights: `$CRAS_LITE0_PTH`, else where
/// `cras setup --backbone efficientnet_lite0` puts them.
pub fn lite0_weights() -> PathBuf {
    let p = std::env::var_os("CRAS_LITE0_PTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| cras::setup::backbone_path(&cras::setup::EFFICIENTNET_LITE0));
    assert!(
        p.is_file(),
        "EfficientNet-Lite0 weights not found at {}; run `cras setup --backbone efficientnet_lite0` \
         (or set CRAS_LITE0_PTH)",
        p.display()
    );
    p
}

pub fn cras_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cras")
}

/// Runs the `cras` binary; returns (exit code, stdout, stderr).
pub fn cras(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cras_bin())
        .args(args)
        .output()
        .expect("run cras");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The small synthetic line the training tests use: 3 classes (checker, grain, stripes)
/// of 20 good training images, 6 good and 3 per defect type in test, 128 px, seed 1.
pub fn synth_line(dir: &Path) {
    let (code, _, err) = cras(&[
        "synth",
        "--out",
        dir.to_str().unwrap(),
        "--classes",
        "3",
        "--train",
        "20",
        "--test-good",
        "6",
        "--test-defect",
        "3",
        "--size",
        "128",
        "--seed",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
}

/// `cras train` on `classes` of `data` at 128 px with the real Lite0 weights, the
/// default recipe plus `extra` flags, into `out`; panics with train's errors on failure.
pub fn train_128(data: &Path, classes: &str, out: &Path, extra: &[&str]) {
    let bb = format!("efficientnet_lite0={}", lite0_weights().display());
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--classes",
        classes,
        "--backbone",
        &bb,
        "--out",
        out.to_str().unwrap(),
        "--image-size",
        "128",
    ];
    args.extend(extra);
    let (code, _, err) = cras(&args);
    assert_eq!(code, 0, "train: {err}");
}

/// Every file under `dir`, sorted.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

pub fn f32s(path: &Path) -> Vec<f32> {
    match npy::read_file(path).unwrap().data {
        TensorData::F32(v) => v,
        TensorData::I64(_) => panic!("{} holds integers", path.display()),
    }
}

pub fn i64s(path: &Path) -> Vec<i64> {
    match npy::read_file(path).unwrap().data {
        TensorData::I64(v) => v,
        TensorData::F32(_) => panic!("{} holds floats", path.display()),
    }
}

pub fn results(set: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(set.join("results.json")).unwrap()).unwrap()
}

pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Largest |a - b| over the elements where `mask` is true.
pub fn max_diff_where(a: &[f32], b: &[f32], mask: impl Fn(usize) -> bool) -> f32 {
    assert_eq!(a.len(), b.len());
    (0..a.len())
        .filter(|&i| mask(i))
        .fold(0f32, |m, i| m.max((a[i] - b[i]).abs()))
}

/// Features agree within `rel` of the reference's largest magnitude.
/// A JSON array of non-negative integers.
pub fn json_usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

pub fn assert_close_rel(what: &str, ours: &[f32], reference: &[f32], rel: f32) {
    let tol = rel * max_abs(reference);
    let d = max_diff_where(ours, reference, |_| true);
    assert!(d <= tol, "{what}: max |diff| {d:e} > {tol:e}");
}

// ---- wrn50-formula weights ------------------------------------------------------------

/// The closed-form value of element i of a tensor (fixtures README, section 3.2).
pub fn formula_value(key: &str, kind: &str, shape: &[usize], i: usize) -> f32 {
    let h = key.bytes().map(|b| b as u64).sum::<u64>() % 997;
    let m = 1 + h % 7;
    let fi = i as f64;
    let theta = ((0.001 * fi) * fi) * m as f64 + 0.1 * h as f64;
    let sig = theta.sin();
    let g = match kind {
        "weight" => {
            let fan_in: usize = shape[1..].iter().product();
            (2.0 / fan_in as f64).sqrt() * sig
        }
        "bias" | "bn_bias" | "bn_mean" => 0.1 * sig,
        "bn_weight" => 1.0 + 0.1 * sig,
        "bn_var" => 1.0 + 0.5 * sig.abs(),
        "center" => 0.05 * sig,
        k => panic!("unknown kind {k}"),
    };
    g as f32
}

/// All formula tensors of the manifest (without `center`), each checked against the
/// manifest's sha256, split into (backbone, head).
pub fn formula_weights(set: &Path) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let manifest: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(set.join("params_manifest.json")).unwrap())
            .unwrap();
    let mut backbone = BTreeMap::new();
    let mut head = BTreeMap::new();
    for (key, entry) in manifest {
        let kind = entry["kind"].as_str().unwrap();
        if kind == "center" {
            continue;
        }
        let shape = json_usizes(&entry["shape"]);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| formula_value(&key, kind, &shape, i))
            .collect();
        let mut hasher = Sha256::new();
        for v in &data {
            hasher.update(v.to_le_bytes());
        }
        let sha: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            sha,
            entry["sha256_f32le"].as_str().unwrap(),
            "formula tensor {key}"
        );
        let t = Tensor::f32(shape, data);
        if key.starts_with("pre_projection.") || key.starts_with("discriminator.") {
            head.insert(key, t);
        } else {
            backbone.insert(key, t);
        }
    }
    (backbone, head)
}

/// Runs `cras import-reference` on the lite0-d384 fixture (BatchNorm replay off, as the
/// fixture was made) into `dir/<name>`; returns the bundle folder.
pub fn lite0_bundle(dir: &Path, name: &str) -> PathBuf {
    let set = fixtures().join("lite0-d384");
    let out = dir.join(name);
    let (code, _, err) = cras(&[
        "import-reference",
        "--backbone",
        &format!("efficientnet_lite0={}", lite0_weights().display()),
        "--checkpoint",
        set.join("ckpt_best_0.pth").to_str().unwrap(),
        "--centers",
        set.join("center.pth").to_str().unwrap(),
        "--classes",
        "alpha,beta",
        "--no-bn-replay",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "import-reference failed: {err}");
    out
}

/// A model that hands its `image` input back as `prepared`: what an engine's frames
/// stage produced for `spec`.
pub fn identity_model(spec: &cras::preprocess::InputSpec) -> Vec<u8> {
    use cras::onnx::{Dim, ElemType, GraphBuilder};
    let mut g = GraphBuilder::new();
    let dims = vec![
        Dim::Sym("N"),
        Dim::Fixed(3),
        Dim::Fixed(spec.height as i64),
        Dim::Fixed(spec.width as i64),
    ];
    let x = g.input("image", ElemType::F32, dims.clone());
    g.output(&x, "prepared", ElemType::F32, dims);
    g.to_bytes("identity", "test")
}
