//! The map stage alone (bilinear 36 -> 288, Gaussian sigma 4 with scipy's reflect border)
//! reproduces the reference maps from the stored patch scores within 1e-6.

mod common;

use cras::engine::{EngineKind, EngineOptions};
use cras::model::graph::{gaussian_kernel, map_stage, reflect_indices};
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
    let fx = common::fixtures();
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
    let mut checked = 0;
    for (set, n) in [
        ("lite0-d384", 6),
        ("wrn50-formula", 4),
        ("wrn50-formula-bnquirk", 4),
    ] {
        for i in 0..n {
            let ps = common::f32s(&fx.join(set).join(format!("img{i}_patch_scores.npy")));
            let want = common::f32s(&fx.join(set).join(format!("img{i}_map.npy")));
            let out = engine.run(&ps, [1, 1, 36, 36]).unwrap();
            let got = out[0].f32().unwrap();
            let d = common::max_diff_where(got, &want, |_| true);
            assert!(d <= 1e-6, "{set} image {i}: map stage differs by {d:e}");
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
}
