//! The paper's configuration (wide_resnet50_2, layer2 + layer3, D = 1536, P = 1296) with
//! closed-form weights: `wrn50-formula` (backbone in eval state) and
//! `wrn50-formula-bnquirk` (the reference's train-mode BatchNorm pass replayed).

mod common;

use common::*;
use cras::backbone::{Backbone, BackboneKind};
use cras::engine::{CrasOutputs, EngineKind, EngineOptions};
use cras::import::replay_train_mode_pass;
use cras::model::graph::{CrasModel, GraphOptions};
use cras::model::head::{Centers, CrasHead};
use cras::weights::{StateDict, TensorData};
use std::path::Path;

fn formula_parts() -> (Backbone, CrasHead) {
    let (bb, head) = formula_weights(&fixtures().join("wrn50-formula"));
    let backbone = Backbone::from_state_dict(
        BackboneKind::WideResnet50_2,
        StateDict {
            tensors: bb,
            source: "formula".into(),
        },
    )
    .unwrap();
    let head = CrasHead::from_state_dict(&StateDict {
        tensors: head,
        source: "formula".into(),
    })
    .unwrap();
    (backbone, head)
}

/// Runs the debug graph on the fixture images of `set` and checks every stage.
fn check_set(set: &Path, backbone: &Backbone, head: &CrasHead, kind: EngineKind) {
    let images = fixtures().join("wrn50-formula/images");
    let centers = Centers::load(&set.join("centers_f16.npy")).unwrap();
    assert_eq!(
        (centers.classes, centers.patches, centers.dim),
        (2, 1296, 1536)
    );
    let model = CrasModel {
        backbone,
        head,
        centers: &centers,
        height: 288,
        width: 288,
        pre_dim: 1536,
        image_score: cras::model::score::ImageScore::PatchMax,
        views: Default::default(),
    };
    let onnx = model
        .to_onnx(GraphOptions {
            debug_outputs: true,
        })
        .unwrap();
    let mut engine = kind
        .load(
            &onnx,
            &EngineOptions {
                batch: 4,
                ..Default::default()
            },
        )
        .unwrap();
    let spec = cras::preprocess::InputSpec {
        height: 288,
        width: 288,
        resize: 329,
        mean: cras::preprocess::IMAGENET_MEAN,
        std: cras::preprocess::IMAGENET_STD,
    };
    // Batch of all 4 images: class choice is per image, so batching changes nothing.
    let results = results(set);
    let mut batch = Vec::new();
    for r in &results {
        let (t, _) =
            cras::preprocess::prepare(&images.join(r["source"].as_str().unwrap()), &spec).unwrap();
        batch.extend(t);
    }
    let outs = engine.run(&batch, [4, 3, 288, 288]).unwrap();
    let get = |n: &str| outs.iter().find(|t| t.name == n).unwrap().clone();

    // Backbone features of image 0: per-channel sums of layer2 / layer3.
    for (name, file) in [
        ("stage_a", "img0_layer2_chansum.npy"),
        ("stage_b", "img0_layer3_chansum.npy"),
    ] {
        let t = get(name);
        let (c, hw) = (t.shape[1], t.shape[2] * t.shape[3]);
        let v = t.f32().unwrap();
        let ours: Vec<f32> = (0..c)
            .map(|ch| {
                v[ch * hw..(ch + 1) * hw]
                    .iter()
                    .map(|x| *x as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let reference: Vec<f32> = cras::weights::npy::read_f64_file(&set.join(file))
            .unwrap()
            .iter()
            .map(|x| *x as f32)
            .collect();
        assert_close_rel(
            &format!("{} {name} channel sums", set.display()),
            &ours,
            &reference,
            1e-4,
        );
    }

    let q_all = get("q").i64().unwrap().to_vec();
    let o = CrasOutputs::from_named(outs).unwrap();
    for (b, r) in results.iter().enumerate() {
        let i = r["index"].as_u64().unwrap();
        let q = &q_all[b * 1296..(b + 1) * 1296];
        let q_ref = i64s(&set.join(format!("img{i}_q.npy")));
        let margin = f32s(&set.join(format!("img{i}_q_margin.npy")));
        for p in 0..1296 {
            if margin[p] >= 1e-5 {
                assert_eq!(
                    q[p], q_ref[p],
                    "image {i} patch {p}: q differs at margin {}",
                    margin[p]
                );
            }
        }
        assert_eq!(
            o.class_ids[b],
            r["class_index"].as_i64().unwrap(),
            "image {i} class"
        );
        let ps_ref = f32s(&set.join(format!("img{i}_patch_scores.npy")));
        let d = max_diff_where(o.patches(b), &ps_ref, |p| q[p] == q_ref[p]);
        assert!(d <= 1e-5, "image {i}: patch scores differ by {d:e}");
        let want = r["image_score"].as_f64().unwrap() as f32;
        assert!(
            (o.image_scores[b] - want).abs() <= 1e-5,
            "image {i}: score {} vs {want}",
            o.image_scores[b]
        );
        if q == q_ref.as_slice() {
            let d = max_diff_where(
                o.map(b),
                &f32s(&set.join(format!("img{i}_map.npy"))),
                |_| true,
            );
            assert!(d <= 1e-5, "image {i}: map differs by {d:e}");
        } else {
            // A near-tie flip moves the map by up to ~1e-3 near the patch (fixture README).
            let d = max_diff_where(
                o.map(b),
                &f32s(&set.join(format!("img{i}_map.npy"))),
                |_| true,
            );
            assert!(d <= 3e-3, "image {i}: map differs by {d:e}");
        }
    }
}

#[test]
fn formula_model_matches_reference() {
    let (backbone, head) = formula_parts();
    check_set(
        &fixtures().join("wrn50-formula"),
        &backbone,
        &head,
        EngineKind::Onnxruntime,
    );
}

#[cfg(feature = "tract")]
#[test]
fn formula_model_matches_reference_on_tract() {
    let (backbone, head) = formula_parts();
    check_set(
        &fixtures().join("wrn50-formula"),
        &backbone,
        &head,
        EngineKind::Tract,
    );
}

#[test]
fn bn_replay_matches_reference_quirk() {
    check_bn_replay(EngineKind::Onnxruntime);
}

#[cfg(feature = "tract")]
#[test]
fn bn_replay_matches_reference_quirk_on_tract() {
    check_bn_replay(EngineKind::Tract);
}

fn check_bn_replay(kind: EngineKind) {
    let set = fixtures().join("wrn50-formula-bnquirk");
    let (mut backbone, head) = formula_parts();
    replay_train_mode_pass(&mut backbone, 288, 288, kind, &EngineOptions::default()).unwrap();
    let stat = |k: &str| match &backbone.weights.tensors[k].data {
        TensorData::F32(v) => v.clone(),
        _ => unreachable!(),
    };
    // Stored buffers. The all-ones image makes bn1's batch variance nearly 0, so the
    // train-mode normalisation amplifies float32 rounding differences through the
    // layers: the reference's own float64 rerun moved these statistics by up to 6.3e-6
    // (fixture README 6.5). Our float32 pass (another summation order) was measured at
    // 1.1e-5 (mean, absolute) and 2.0e-5 (var, relative) on layer3.5.bn3; bound 5e-5; the scores downstream still agree within 1e-5 (checked below).
    for layer in ["bn1", "layer3_5_bn3"] {
        let key = layer.replace('_', ".");
        let mean = stat(&format!("{key}.running_mean"));
        let var = stat(&format!("{key}.running_var"));
        let mean_ref = f32s(&set.join(format!("bn_{layer}_running_mean.npy")));
        let var_ref = f32s(&set.join(format!("bn_{layer}_running_var.npy")));
        let dm = max_diff_where(&mean, &mean_ref, |_| true);
        assert!(dm <= 5e-5, "{key} running_mean differs by {dm:e}");
        for (a, b) in var.iter().zip(&var_ref) {
            assert!(
                (a - b).abs() <= 5e-5 * b.abs(),
                "{key} running_var {a} vs {b}"
            );
        }
    }
    // Every one of the 53 layers, by the sums the fixture records.
    let summary: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(set.join("bn_after_quirk.json")).unwrap())
            .unwrap();
    assert_eq!(summary.len(), 53);
    for (key, entry) in &summary {
        let n = entry["n_per_channel"].as_u64().unwrap() as usize;
        if key.starts_with("layer4") {
            continue; // never computed: layer4 cannot affect any output
        }
        let shape = entry["input_shape"].as_array().unwrap();
        let hw = (shape[2].as_u64().unwrap() * shape[3].as_u64().unwrap()) as usize;
        assert_eq!(n, hw, "{key}: statistics count");
        for (field, sum_key) in [
            ("running_mean", "running_mean_sum_f64"),
            ("running_var", "running_var_sum_f64"),
        ] {
            let ours: f64 = stat(&format!("{key}.{field}"))
                .iter()
                .map(|v| *v as f64)
                .sum();
            let want = entry[sum_key].as_f64().unwrap();
            let c = stat(&format!("{key}.{field}")).len() as f64;
            assert!(
                (ours - want).abs() <= 1e-5 * c.max(want.abs()),
                "{key}.{field} sum {ours} vs {want}"
            );
        }
    }
    check_set(&set, &backbone, &head, kind);
}

#[test]
fn import_reference_cli_replays_the_quirk_by_default() {
    let set = fixtures().join("wrn50-formula-bnquirk");
    let dir = tempfile::tempdir().unwrap();
    let (bb, head) = formula_weights(&fixtures().join("wrn50-formula"));
    let bb_path = dir.path().join("wrn50.safetensors");
    let head_path = dir.path().join("head.safetensors");
    cras::weights::save_safetensors(&bb, &bb_path).unwrap();
    cras::weights::save_safetensors(&head, &head_path).unwrap();
    let bundle = dir.path().join("wrn");
    let (code, _, err) = cras(&[
        "import-reference",
        "--backbone",
        &format!("wide_resnet50_2={}", bb_path.display()),
        "--checkpoint",
        head_path.to_str().unwrap(),
        "--centers",
        set.join("centers_f16.npy").to_str().unwrap(),
        "--classes",
        "alpha,beta",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "import-reference failed: {err}");
    let yaml = std::fs::read_to_string(bundle.join("model.yaml")).unwrap();
    assert!(
        yaml.contains("bn_train_pass_replayed: 'true'")
            || yaml.contains("bn_train_pass_replayed: \"true\""),
        "{yaml}"
    );
    let images = fixtures().join("wrn50-formula/images");
    let results = results(&set);
    let paths: Vec<String> = results
        .iter()
        .map(|r| {
            images
                .join(r["source"].as_str().unwrap())
                .display()
                .to_string()
        })
        .collect();
    let mut args = vec!["infer", "--model", bundle.to_str().unwrap(), "--batch", "2"];
    args.extend(paths.iter().map(String::as_str));
    let (code, stdout, err) = cras(&args);
    assert_eq!(code, 0, "infer failed: {err}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (r, line) in results.iter().zip(&lines) {
        assert_eq!(line["class"], r["class_name"]);
        let d = (line["score"].as_f64().unwrap() - r["image_score"].as_f64().unwrap()).abs();
        // Without the replay the scores would be off by 5e-4 .. 3.6e-3 (fixture README 6.4).
        assert!(d <= 1e-5, "{}: score differs by {d:e}", r["source"]);
    }

    // add-class on this model replays the same pass: the rebuilt graph keeps the altered
    // backbone, so the imported classes score exactly as before (without the replay they
    // would move by the amounts above).
    let gamma = dir.path().join("data/gamma/train/good");
    std::fs::create_dir_all(&gamma).unwrap();
    for (i, p) in paths.iter().enumerate() {
        std::fs::copy(p, gamma.join(format!("{i}.png"))).unwrap();
    }
    let bigger = dir.path().join("wrn+gamma");
    let (code, _, err) = cras(&[
        "add-class",
        "--model",
        bundle.to_str().unwrap(),
        "--backbone",
        &format!("wide_resnet50_2={}", bb_path.display()),
        "--data",
        dir.path().join("data").to_str().unwrap(),
        "--class",
        "gamma",
        "--out",
        bigger.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "add-class failed: {err}");
    let mut args = vec!["infer", "--model", bigger.to_str().unwrap(), "--batch", "2"];
    args.extend(paths.iter().map(String::as_str));
    let (code, stdout, err) = cras(&args);
    assert_eq!(code, 0, "infer failed: {err}");
    let again: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (a, b) in lines.iter().zip(&again) {
        if b["class"] != "gamma" {
            assert_eq!(a["score"], b["score"], "{a} vs {b}");
        }
    }
    assert!(again.iter().any(|l| l["class"] != "gamma"), "{again:?}");
}
