//! The map stage alone (bilinear 36 -> 288, Gaussian sigma 4 with scipy's reflect border)
//! reproduces the reference maps from the stored patch scores within 1e-6, in the graph
//! and on the host (where training's validation computes it); the image-score rules
//! give the same figure in the graph as on the host.

mod common;

use cras::engine::{EngineKind, EngineOptions};
use cras::model::graph::{gaussian_kernel, map_stage, reflect_indices};
use cras::model::score::{HostMap, ImageScore};
use cras::onnx::{Dim, ElemType, GraphBuilder};

#[test]
fn gaussian_and_reflect_follow_scipy() {
    let k = gaussian_kernel(4.0, 4.0);
    assert_eq!(k.len(), 33);
    assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
    assert!((k[16] / k[15] - (1.0f64 / 32.0).exp()).abs() < 1e-12);
    // d c b a | a b c d | d c b a
    assert_eq!(
        reflect_indices(4, 4),
        vec![3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0]
    );
    // Radius beyond the length keeps mirroring.
    assert_eq!(
        reflect_indices(2, 5),
        vec![0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
    );
}

#[test]
fn maps_from_stored_patch_scores() {
    check_maps(EngineKind::Onnxruntime);
}

#[cfg(feature = "tract")]
#[test]
fn maps_from_stored_patch_scores_on_tract() {
    check_maps(EngineKind::Tract);
}

fn check_maps(kind: EngineKind) {
    let mut g = GraphBuilder::new();
    let x = g.input(
        "image",
        ElemType::F32,
        vec![Dim::Sym("N"), Dim::Fixed(1), Dim::Fixed(36), Dim::Fixed(36)],
    );
    let m = map_stage(&mut g, &x, 288, 288);
    g.output(
        &m,
        "map",
        ElemType::F32,
        vec![
            Dim::Sym("N"),
            Dim::Fixed(1),
            Dim::Fixed(288),
            Dim::Fixed(288),
        ],
    );
    let mut engine = kind
        .load(
            &g.to_bytes("map", "test"),
            &EngineOptions {
                batch: 1,
                ..Default::default()
            },
        )
        .unwrap();
    let sets = stored_sets();
    for (set, i, ps, want) in &sets {
        let out = engine.run(ps, [1, 1, 36, 36]).unwrap();
        let got = out[0].f32().unwrap();
        let d = common::max_diff_where(got, want, |_| true);
        assert!(d <= 1e-6, "{set} image {i}: map stage differs by {d:e}");
    }
    assert_eq!(sets.len(), 14);
}

/// The fixtures' stored patch scores and reference maps: (set, image, scores, map).
fn stored_sets() -> Vec<(&'static str, usize, Vec<f32>, Vec<f32>)> {
    let fx = common::fixtures();
    let mut out = Vec::new();
    for (set, n) in [
        ("lite0-d384", 6),
        ("wrn50-formula", 4),
        ("wrn50-formula-bnquirk", 4),
    ] {
        for i in 0..n {
            let ps = common::f32s(&fx.join(set).join(format!("img{i}_patch_scores.npy")));
            let map = common::f32s(&fx.join(set).join(format!("img{i}_map.npy")));
            out.push((set, i, ps, map));
        }
    }
    out
}

#[test]
fn host_map_matches_the_reference() {
    let sets = stored_sets();
    let plan = HostMap::new([36, 36], [288, 288]);
    for (set, i, ps, want) in &sets {
        let got = plan.smooth(ps);
        let d = common::max_diff_where(&got, want, |_| true);
        assert!(d <= 1e-6, "{set} image {i}: host map differs by {d:e}");
    }
    assert_eq!(sets.len(), 14);
}

#[test]
fn image_score_rules_agree_with_the_host() {
    check_rules(EngineKind::Onnxruntime);
}

#[cfg(feature = "tract")]
#[test]
fn image_score_rules_agree_with_the_host_on_tract() {
    check_rules(EngineKind::Tract);
}

/// The map stage and one rule as a graph: [N,1,36,36] patch scores in, [N] score out.
fn rule_graph(rule: ImageScore) -> Vec<u8> {
    let mut g = GraphBuilder::new();
    let n = Dim::Sym("N");
    let x = g.input(
        "image",
        ElemType::F32,
        vec![n.clone(), Dim::Fixed(1), Dim::Fixed(36), Dim::Fixed(36)],
    );
    let patches = g.reshape(&x, &[0, 36, 36]);
    let map = map_stage(&mut g, &x, 288, 288);
    let score = rule.graph(&mut g, &patches, &map, 288 * 288);
    g.output(&score, "image_score", ElemType::F32, vec![n]);
    g.to_bytes("rule", "test")
}

fn check_rules(kind: EngineKind) {
    let sets = stored_sets();
    let plan = HostMap::new([36, 36], [288, 288]);
    let rules = [
        ImageScore::PatchMax,
        ImageScore::MapTop { fraction: 0.005 },
        ImageScore::MapTop { fraction: 0.05 },
        ImageScore::MapTop { fraction: 1e-9 },
    ];
    for rule in rules {
        let opts = EngineOptions {
            batch: 1,
            ..Default::default()
        };
        let mut engine = kind.load(&rule_graph(rule), &opts).unwrap();
        for (set, i, ps, map) in &sets {
            let out = engine.run(ps, [1, 1, 36, 36]).unwrap();
            let got = out[0].f32().unwrap()[0];
            let host = rule.of_patches(ps, &plan);
            let scale = host.abs().max(1e-3);
            assert!(
                ((got - host) / scale).abs() <= 1e-5,
                "{set} image {i}, {}: graph {got} vs host {host}",
                rule.label()
            );
            // The rules mean what they say on the reference map itself.
            let map_max = map.iter().copied().fold(f32::MIN, f32::max);
            match rule {
                ImageScore::PatchMax => {
                    assert_eq!(host, ps.iter().copied().fold(f32::MIN, f32::max))
                }
                ImageScore::MapTop { fraction } if fraction < 1e-6 => {
                    assert!(
                        (host - map_max).abs() <= 1e-6,
                        "{set} {i}: {host} vs {map_max}"
                    )
                }
                ImageScore::MapTop { .. } => assert!(host <= map_max + 1e-6),
            }
        }
    }
}
