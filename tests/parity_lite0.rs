//! `lite0-d384`: the real pretrained EfficientNet-Lite0 with a D=384 CRAS head, through
//! `cras import-reference` (BatchNorm replay off, as the fixture was made) and `cras
//! infer`, and stage by stage through the graph with debug outputs.

mod common;

use common::*;
use cras::backbone::{Backbone, BackboneKind};
use cras::engine::{CrasOutputs, EngineKind, EngineOptions};
use cras::model::graph::{CrasModel, GraphOptions};
use cras::model::head::{Centers, CrasHead};
use cras::weights::StateDict;

#[test]
fn stages_match_the_reference() {
    check_stages(EngineKind::Onnxruntime);
}

#[cfg(feature = "tract")]
#[test]
fn stages_match_the_reference_on_tract() {
    check_stages(EngineKind::Tract);
}

fn check_stages(kind: EngineKind) {
    let set = fixtures().join("lite0-d384");
    let backbone = Backbone::load(BackboneKind::EfficientnetLite0, &lite0_weights()).unwrap();
    let head =
        CrasHead::from_state_dict(&StateDict::load(&set.join("ckpt_best_0.pth")).unwrap()).unwrap();
    // The same head from its safetensors export (CRAS-level names) must be identical.
    let head_st =
        CrasHead::from_state_dict(&StateDict::load(&set.join("head.safetensors")).unwrap())
            .unwrap();
    assert_eq!(head.adaptor_weight, head_st.adaptor_weight);
    assert_eq!(head.hidden[1].weight, head_st.hidden[1].weight);
    let centers = Centers::load(&set.join("center.pth")).unwrap();
    assert_eq!(
        centers.data,
        Centers::load(&set.join("centers.npy")).unwrap().data
    );
    let model = CrasModel {
        backbone: &backbone,
        head: &head,
        centers: &centers,
        height: 288,
        width: 288,
        pre_dim: 384,
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
                batch: 1,
                ..Default::default()
            },
        )
        .unwrap();

    let results = results(&set);
    assert_eq!(results.len(), 6);
    let mut total_flips = 0;
    for r in &results {
        let i = r["index"].as_u64().unwrap();
        let input = f32s(&set.join(format!("img{i}_input.npy")));
        let outs = engine.run(&input, [1, 3, 288, 288]).unwrap();
        let get = |n: &str| outs.iter().find(|t| t.name == n).unwrap().clone();
        if i == 0 {
            assert_close_rel(
                "stage A (_blocks.4)",
                get("stage_a").f32().unwrap(),
                &f32s(&set.join("img0_feat_blocks4.npy")),
                1e-4,
            );
            assert_close_rel(
                "stage B (_blocks.10)",
                get("stage_b").f32().unwrap(),
                &f32s(&set.join("img0_feat_blocks10.npy")),
                1e-4,
            );
            assert_close_rel(
                "embedding",
                get("embedding").f32().unwrap(),
                &f32s(&set.join("img0_embed_pre_proj.npy")),
                1e-4,
            );
            assert_close_rel(
                "adapted",
                get("adapted").f32().unwrap(),
                &f32s(&set.join("img0_embed_post_proj.npy")),
                1e-4,
            );
        }
        let q = get("q").i64().unwrap().to_vec();
        let q_ref = i64s(&set.join(format!("img{i}_q.npy")));
        let margin = f32s(&set.join(format!("img{i}_q_margin.npy")));
        for p in 0..q.len() {
            if margin[p] >= 1e-5 {
                assert_eq!(
                    q[p], q_ref[p],
                    "image {i} patch {p}: q differs at margin {}",
                    margin[p]
                );
            }
        }
        let flips: Vec<usize> = (0..q.len()).filter(|&p| q[p] != q_ref[p]).collect();
        total_flips += flips.len();
        let o = CrasOutputs::from_named(outs).unwrap();
        assert_eq!(
            o.class_ids[0],
            r["class_index"].as_i64().unwrap(),
            "image {i} class"
        );
        let ps_ref = f32s(&set.join(format!("img{i}_patch_scores.npy")));
        let d = max_diff_where(o.patches(0), &ps_ref, |p| q[p] == q_ref[p]);
        assert!(d <= 1e-5, "image {i}: patch scores differ by {d:e}");
        let want = r["image_score"].as_f64().unwrap() as f32;
        assert!(
            (o.image_scores[0] - want).abs() <= 1e-5,
            "image {i}: score {} vs {want}",
            o.image_scores[0]
        );
        if flips.is_empty() {
            let d = max_diff_where(
                o.map(0),
                &f32s(&set.join(format!("img{i}_map.npy"))),
                |_| true,
            );
            assert!(d <= 1e-5, "image {i}: map differs by {d:e}");
        }
    }
    // Near-ties may flip; the fixture documents at most a few per image.
    assert!(total_flips <= 12, "{total_flips} q flips over 6 images");
}

#[test]
fn import_reference_then_infer_reproduces_scores_and_maps() {
    let set = fixtures().join("lite0-d384");
    let dir = tempfile::tempdir().unwrap();
    let bundle = lite0_bundle(dir.path(), "line1");
    let results = results(&set);
    let images: Vec<String> = results
        .iter()
        .map(|r| {
            set.join("images")
                .join(r["source"].as_str().unwrap())
                .display()
                .to_string()
        })
        .collect();
    let out = dir.path().join("results");
    let mut args = vec![
        "infer",
        "--model",
        bundle.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "4",
    ];
    args.extend(images.iter().map(String::as_str));
    let (code, stdout, err) = cras(&args);
    assert_eq!(code, 0, "infer failed: {err}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for (r, line) in results.iter().zip(&lines) {
        let i = r["index"].as_u64().unwrap();
        assert_eq!(line["class"], r["class_name"], "image {i}");
        assert_eq!(line["class_id"], r["class_index"], "image {i}");
        let d = (line["score"].as_f64().unwrap() - r["image_score"].as_f64().unwrap()).abs();
        assert!(
            d <= 1e-5,
            "image {i}: score differs by {d:e} (batch of 4, per-image class)"
        );
        assert!(line["latency_ms"].as_f64().unwrap() > 0.0);
        // Names keep the relative folders under the common root (images/).
        let stem = out.join(r["source"].as_str().unwrap().trim_end_matches(".png"));
        let map = f32s(&std::path::PathBuf::from(format!(
            "{}.map.npy",
            stem.display()
        )));
        let map_ref = f32s(&set.join(format!("img{i}_map.npy")));
        // A near-tie q flip moves the map by up to ~1e-2 near that patch (fixture README).
        let d = max_diff_where(&map, &map_ref, |_| true);
        assert!(d <= 2e-2, "image {i}: map differs by {d:e}");
        let overlay = image::open(format!("{}.overlay.png", stem.display())).unwrap();
        assert_eq!((overlay.width(), overlay.height()), (288, 288));
    }
    // beta/test/good/000 and alpha/test/good/000 share a file name: both outputs exist.
    assert!(out.join("alpha/test/good/000.map.npy").is_file());
    assert!(out.join("beta/test/good/000.map.npy").is_file());
}
