//! EfficientNet-Lite1 and -Lite2 with their pinned pretrained weights: the backbone's two
//! stage maps for the Lite0 fixture's input against an independent numpy port of the
//! PyPI package's forward pass (tests/reference/lite_port.py, which reproduces the torch
//! fixture's Lite0 stages to 1.4e-6). The reference holds, per stage, each channel's
//! spatial mean and standard deviation and its values at the corners and the centre,
//! where a wrong static padding or a misplaced stage shows first.

mod common;

use common::*;
use cras::backbone::{Backbone, BackboneKind};
use cras::engine::{EngineKind, EngineOptions};
use cras::model::graph::stages_graph;

/// Where `cras setup --backbone NAME` puts the weights.
fn weights(kind: BackboneKind) -> std::path::PathBuf {
    let pinned = cras::setup::pretrained(kind).unwrap();
    let p = cras::setup::backbone_path(pinned);
    assert!(
        p.is_file(),
        "{} weights not found at {}; run `cras setup --backbone {}`",
        kind.name(),
        p.display(),
        kind.name()
    );
    p
}

fn f32_list(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Compares one stage map [C,h,w] with the reference's summary of it.
fn check_stage(what: &str, ours: &[f32], reference: &serde_json::Value) {
    let shape = json_usizes(&reference["shape"]);
    let (c, h, w) = (shape[0], shape[1], shape[2]);
    assert_eq!(ours.len(), c * h * w, "{what}: size");
    let plane = |ch: usize| &ours[ch * h * w..(ch + 1) * h * w];
    let mean: Vec<f32> = (0..c)
        .map(|ch| (plane(ch).iter().map(|&v| v as f64).sum::<f64>() / (h * w) as f64) as f32)
        .collect();
    let std: Vec<f32> = (0..c)
        .map(|ch| {
            let m = mean[ch] as f64;
            let var = plane(ch)
                .iter()
                .map(|&v| (v as f64 - m).powi(2))
                .sum::<f64>()
                / (h * w) as f64;
            var.sqrt() as f32
        })
        .collect();
    let points: Vec<(usize, usize)> = reference["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (json_usizes(p)[0], json_usizes(p)[1]))
        .collect();
    let at_points: Vec<f32> = (0..c)
        .flat_map(|ch| points.iter().map(move |&(y, x)| plane(ch)[y * w + x]))
        .collect();
    let ref_points: Vec<f32> = reference["at_points"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(f32_list)
        .collect();
    // The reference rounds to 6 decimals; the maps reach tens, so 1e-4 of the largest
    // value is far above the rounding and far below any structural error.
    let tol = 1e-4 * max_abs(&ref_points).max(1.0);
    for (name, a, b) in [
        ("channel means", &mean, &f32_list(&reference["mean"])),
        ("channel stds", &std, &f32_list(&reference["std"])),
        ("corners and centre", &at_points, &ref_points),
    ] {
        let d = max_diff_where(a, b, |_| true);
        assert!(d <= tol, "{what} {name}: max |diff| {d:e} > {tol:e}");
    }
}

#[test]
fn lite1_and_lite2_stages_match_the_reference_port() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/reference/lite12_stages.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let input = f32s(&fixtures().join("lite0-d384/img0_input.npy"));
    for (kind, channels) in [
        (BackboneKind::EfficientnetLite1, (40, 112)),
        (BackboneKind::EfficientnetLite2, (48, 120)),
    ] {
        let backbone = Backbone::load(kind, &weights(kind)).unwrap();
        assert_eq!(backbone.stage_channels(), channels, "{}", kind.name());
        assert_eq!(backbone.stage_sizes(288, 288), ((36, 36), (18, 18)));
        let graph = stages_graph(&backbone, 288, 288).unwrap();
        let mut engine = EngineKind::Onnxruntime
            .load(&graph, &EngineOptions::default())
            .unwrap();
        let outs = engine.run(&input, [1, 3, 288, 288]).unwrap();
        let want = &reference[kind.name()];
        for stage in ["stage_a", "stage_b"] {
            let got = outs.iter().find(|t| t.name == stage).unwrap();
            check_stage(
                &format!("{} {stage}", kind.name()),
                got.f32().unwrap(),
                &want[stage],
            );
        }
    }
}

/// Each Lite model's weights are refused as another's: the shapes tell them apart.
#[test]
fn a_lite_weights_file_is_refused_as_another_variant() {
    let lite2 = weights(BackboneKind::EfficientnetLite2);
    for kind in [
        BackboneKind::EfficientnetLite0,
        BackboneKind::EfficientnetLite1,
    ] {
        let err = Backbone::load(kind, &lite2).unwrap_err().to_string();
        assert!(
            err.contains("_blocks."),
            "{}: expected a named key in the error, got: {err}",
            kind.name()
        );
    }
}
