//! torchvision resnet18 and resnet50 (their state-dict key names), with random weights
//! since their pretrained files are not reachable here: the importer accepts exactly
//! their keys, and the embedding graph runs with the stage sizes the method expects.

mod common;

use cras::backbone::{Backbone, BackboneKind};
use cras::engine::{EngineKind, EngineOptions};
use cras::model::graph::embedding_graph;
use cras::rng::Rng;
use cras::weights::{StateDict, Tensor};

fn random(kind: BackboneKind) -> StateDict {
    let mut rng = Rng::new(5);
    let tensors = Backbone::expected_keys(kind)
        .into_iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let data: Vec<f32> =
                if k.ends_with("running_var") || (shape.len() == 1 && k.ends_with(".weight")) {
                    vec![1.0; n]
                } else if shape.len() == 1 {
                    vec![0.0; n]
                } else {
                    (0..n)
                        .map(|_| (rng.normal() * (2.0 / fan_in as f64).sqrt()) as f32)
                        .collect()
                };
            (k, Tensor::f32(shape, data))
        })
        .collect();
    StateDict {
        tensors,
        source: "random".into(),
    }
}

#[test]
fn resnet18_and_resnet50_embed_a_288_image() {
    for (kind, (ca, cb)) in [
        (BackboneKind::Resnet18, (128, 256)),
        (BackboneKind::Resnet50, (512, 1024)),
    ] {
        let sd = random(kind);
        // The classifier may have any number of classes; other keys must match exactly.
        let backbone = Backbone::from_state_dict(kind, sd.clone()).unwrap();
        assert_eq!(backbone.stage_channels(), (ca, cb));
        assert_eq!(backbone.stage_sizes(288, 288), ((36, 36), (18, 18)));
        let graph = embedding_graph(&backbone, 288, 288, 256, 256).unwrap();
        let mut engine = EngineKind::Onnxruntime
            .load(&graph, &EngineOptions::default())
            .unwrap();
        let input: Vec<f32> = (0..3 * 288 * 288)
            .map(|i| ((i % 97) as f32 / 97.0) - 0.5)
            .collect();
        let out = engine.run(&input, [1, 3, 288, 288]).unwrap();
        let emb = out.iter().find(|t| t.name == "embedding").unwrap();
        assert_eq!(emb.shape, vec![1, 1296, 256], "{}", kind.name());
        let v = emb.f32().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{}", kind.name());
        assert!(v.iter().any(|x| *x != 0.0), "{}", kind.name());

        // A key of the other architecture is foreign.
        let mut extra = sd.clone();
        extra.tensors.insert(
            "layer1.0.conv3.weight".into(),
            Tensor::f32(vec![1], vec![0.0]),
        );
        if kind == BackboneKind::Resnet18 {
            let err = Backbone::from_state_dict(kind, extra)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("unexpected tensor `layer1.0.conv3.weight`"),
                "{err}"
            );
        }
    }
}
