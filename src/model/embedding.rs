//! The frozen part of the model written into a graph: the backbone and the aggregation
//! into patch embeddings; alone as the embedding graph training caches, the backbone
//! alone (its stage maps, for parity checks), and the backbone with train-mode
//! BatchNorm for replaying the reference's statistics pass.

use super::aggregation;
use super::graph::GraphError;
use crate::backbone::{Backbone, BnMode};
use crate::onnx::{Attr, Dim, ElemType, GraphBuilder};

/// The graph input `image` [batch, 3, h, w], float32.
pub(super) fn image_input(g: &mut GraphBuilder, batch: Dim, h: usize, w: usize) -> String {
    g.input(
        "image",
        ElemType::F32,
        vec![
            batch,
            Dim::Fixed(3),
            Dim::Fixed(h as i64),
            Dim::Fixed(w as i64),
        ],
    )
}

/// The patch embedding written into a graph: backbone, then the aggregation as two
/// grouped 3x3 convolutions with stage B resized to stage A's grid, as [N, P, D].
pub struct Embedding {
    pub backbone: crate::backbone::BackboneOutputs,
    pub embedding: String,
}

pub fn embedding(
    g: &mut GraphBuilder,
    backbone: &Backbone,
    x: &str,
    h: usize,
    w: usize,
    pre_dim: usize,
    d: usize,
) -> Result<Embedding, GraphError> {
    let feats = backbone.build(g, x, h, w, BnMode::Eval)?;
    let ((ha, wa), _) = backbone.stage_sizes(h, w);
    let (ca, cb) = backbone.stage_channels();
    let agg = aggregation::plan(ca, cb, pre_dim, d);
    let ea = g.conv(
        &feats.stage_a,
        agg.stage_a.weight.clone(),
        agg.stage_a.shape,
        None,
        1,
        [1; 4],
        agg.stage_a.groups,
    );
    let eb = g.conv(
        &feats.stage_b,
        agg.stage_b.weight.clone(),
        agg.stage_b.shape,
        None,
        1,
        [1; 4],
        agg.stage_b.groups,
    );
    let eb = g.resize_bilinear(&eb, ha, wa);
    let emb = if agg.concat {
        g.node("Concat", &[&ea, &eb], vec![("axis", Attr::Int(1))])
    } else {
        g.add(&ea, &eb)
    };
    // [N,D,h,w] -> [N,P,D]
    let emb = g.reshape(&emb, &[0, d as i64, -1]);
    let emb = g.transpose(&emb, &[0, 2, 1]);
    Ok(Embedding {
        backbone: feats,
        embedding: emb,
    })
}

/// A graph from `image` [N,3,H,W] to `embedding` [N,P,D]: the frozen part of the model,
/// whose outputs training caches.
pub fn embedding_graph(
    backbone: &Backbone,
    h: usize,
    w: usize,
    pre_dim: usize,
    d: usize,
) -> Result<Vec<u8>, GraphError> {
    let mut g = GraphBuilder::new();
    let n = Dim::Sym("N");
    let x = image_input(&mut g, n.clone(), h, w);
    let emb = embedding(&mut g, backbone, &x, h, w, pre_dim, d)?;
    let ((ha, wa), _) = backbone.stage_sizes(h, w);
    g.output(
        &emb.embedding,
        "embedding",
        ElemType::F32,
        vec![n, Dim::Fixed((ha * wa) as i64), Dim::Fixed(d as i64)],
    );
    Ok(g.to_bytes("cras_embedding", "cras"))
}

/// A graph from `image` [1,3,H,W] to the backbone's two stage maps, `stage_a` and
/// `stage_b` [1,C,h,w]: the backbone alone, for checking it against a reference port.
pub fn stages_graph(backbone: &Backbone, h: usize, w: usize) -> Result<Vec<u8>, GraphError> {
    let mut g = GraphBuilder::new();
    let x = image_input(&mut g, Dim::Fixed(1), h, w);
    let out = backbone.build(&mut g, &x, h, w, BnMode::Eval)?;
    let (ca, cb) = backbone.stage_channels();
    let ((ha, wa), (hb, wb)) = backbone.stage_sizes(h, w);
    for (value, name, dims) in [
        (&out.stage_a, "stage_a", [1, ca, ha, wa]),
        (&out.stage_b, "stage_b", [1, cb, hb, wb]),
    ] {
        let dims = dims.map(|n| Dim::Fixed(n as i64)).to_vec();
        g.output(value, name, ElemType::F32, dims);
    }
    Ok(g.to_bytes("cras_stages", "cras"))
}

/// The backbone-only graph that replays a train-mode pass, and the BatchNorm layers
/// whose statistics it outputs (`<key>.mean`, `<key>.var`) with their per-channel counts.
pub struct BnReplayGraph {
    pub onnx: Vec<u8>,
    pub layers: Vec<(String, usize)>,
}

/// A graph of the backbone alone with train-mode BatchNorm whose outputs are every
/// layer's batch mean and variance: running it on the reference's all-ones image
/// replays the train-mode pass its training script makes (docs/decisions.md, "BatchNorm replay").
pub fn bn_replay_graph(
    backbone: &Backbone,
    h: usize,
    w: usize,
) -> Result<BnReplayGraph, GraphError> {
    let mut g = GraphBuilder::new();
    let x = image_input(&mut g, Dim::Fixed(1), h, w);
    let out = backbone.build(&mut g, &x, h, w, BnMode::Train)?;
    let mut layers = Vec::new();
    for st in &out.bn_stats {
        g.output(
            &st.mean,
            &format!("{}.mean", st.key),
            ElemType::F32,
            vec![Dim::Sym("c")],
        );
        g.output(
            &st.var,
            &format!("{}.var", st.key),
            ElemType::F32,
            vec![Dim::Sym("c")],
        );
        layers.push((st.key.clone(), st.count));
    }
    Ok(BnReplayGraph {
        onnx: g.to_bytes("cras_bn_replay", "cras"),
        layers,
    })
}
