//! Writes the whole CRAS inference graph as one ONNX model:
//! backbone -> aggregation -> adaptor -> per-image class choice -> local center search
//! -> residual -> scorer -> patch scores, image score and the smoothed anomaly map.
//!
//! Inputs: `image` [N,3,H,W] float32, normalised. Outputs: `anomaly_map` [N,1,H,W],
//! `patch_scores` [N,h,w], `image_score` [N], `class_id` [N] int64. N is dynamic.

use super::aggregation;
use super::head::{Centers, CrasHead};
use crate::backbone::{Backbone, BnMode};
use crate::onnx::{Attr, Dim, ElemType, GraphBuilder};
use crate::weights::WeightsError;

/// Gaussian smoothing of the anomaly map (scipy.ndimage.gaussian_filter semantics).
pub const MAP_SIGMA: f64 = 4.0;
pub const MAP_TRUNCATE: f64 = 4.0;

/// Everything the graph needs.
pub struct CrasModel<'a> {
    pub backbone: &'a Backbone,
    pub head: &'a CrasHead,
    pub centers: &'a Centers,
    /// Network input size (after crop).
    pub height: usize,
    pub width: usize,
    /// Per-stage pooled width before fusion (the reference's pretrain_embed_dimension).
    pub pre_dim: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("the model does not fit together: {0}")]
    Mismatch(String),
}

/// Extra outputs for parity checks: `stage_a`, `stage_b`, `embedding` [N,P,D] (before
/// the adaptor), `adapted` [N,P,D], `q` [N,P].
#[derive(Debug, Clone, Copy, Default)]
pub struct GraphOptions {
    pub debug_outputs: bool,
}

/// 1-D Gaussian weights, scipy's `_gaussian_kernel1d` (float64, normalised).
pub fn gaussian_kernel(sigma: f64, truncate: f64) -> Vec<f64> {
    let radius = (truncate * sigma + 0.5) as i64;
    let w: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// Source indices for scipy's "reflect" border (d c b a | a b c d | d c b a).
pub fn reflect_indices(len: usize, radius: usize) -> Vec<i64> {
    let period = 2 * len as i64;
    (-(radius as i64)..(len + radius) as i64)
        .map(|i| {
            let m = i.rem_euclid(period);
            if m < len as i64 { m } else { period - 1 - m }
        })
        .collect()
}

/// Resize + Gaussian smoothing of [N,1,h,w] scores to [N,1,H,W], as written in the graph.
pub fn map_stage(g: &mut GraphBuilder, scores: &str, height: usize, width: usize) -> String {
    let up = g.resize_bilinear(scores, height, width);
    let k: Vec<f32> = gaussian_kernel(MAP_SIGMA, MAP_TRUNCATE)
        .iter()
        .map(|v| *v as f32)
        .collect();
    let r = k.len() / 2;
    // Rows first (axis 0), then columns, as scipy does.
    let rows = g.init_i64(
        "reflect_rows",
        &[height + 2 * r],
        reflect_indices(height, r),
    );
    let padded = g.node("Gather", &[&up, &rows], vec![("axis", Attr::Int(2))]);
    let v = g.conv(&padded, k.clone(), [1, 1, k.len(), 1], None, 1, [0; 4], 1);
    let cols = g.init_i64("reflect_cols", &[width + 2 * r], reflect_indices(width, r));
    let padded = g.node("Gather", &[&v, &cols], vec![("axis", Attr::Int(3))]);
    g.conv(&padded, k.clone(), [1, 1, 1, k.len()], None, 1, [0; 4], 1)
}

/// The graph input `image` [batch, 3, h, w], float32.
fn image_input(g: &mut GraphBuilder, batch: Dim, h: usize, w: usize) -> String {
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

impl CrasModel<'_> {
    /// Checks that backbone, head, centers and input size agree.
    pub fn validate(&self) -> Result<(), GraphError> {
        let d = self.head.embed_dim;
        let ((ha, wa), _) = self.backbone.stage_sizes(self.height, self.width);
        let p = ha * wa;
        if self.centers.dim != d {
            return Err(GraphError::Mismatch(format!(
                "centers have width {} but the adaptor has {d}",
                self.centers.dim
            )));
        }
        if self.centers.patches != p {
            return Err(GraphError::Mismatch(format!(
                "centers have {} patch positions but a {}x{} input gives {ha}x{wa} = {p} with {}",
                self.centers.patches,
                self.height,
                self.width,
                self.backbone.kind.name()
            )));
        }
        if self.centers.classes == 0 {
            return Err(GraphError::Mismatch("centers hold no class".into()));
        }
        if self.pre_dim == 0 || d == 0 {
            return Err(GraphError::Mismatch(
                "embedding width must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Multiply-accumulates per image: backbone convolutions, aggregation, adaptor, class
    /// choice, center search, scorer and the map stage (elementwise ops not counted).
    pub fn macs_per_image(&self) -> Result<u64, GraphError> {
        let mut g = GraphBuilder::new();
        let x = image_input(&mut g, Dim::Fixed(1), self.height, self.width);
        let backbone = self
            .backbone
            .build(&mut g, &x, self.height, self.width, BnMode::Eval)?
            .macs;
        let ((ha, wa), (hb, wb)) = self.backbone.stage_sizes(self.height, self.width);
        let (ca, cb) = self.backbone.stage_channels();
        let agg = aggregation::plan(ca, cb, self.pre_dim, self.head.embed_dim);
        let aggregation =
            (agg.stage_a.weight.len() * ha * wa + agg.stage_b.weight.len() * hb * wb) as u64;
        let (p, d, c) = (
            (ha * wa) as u64,
            self.head.embed_dim as u64,
            self.centers.classes as u64,
        );
        let adaptor = p * d * d;
        let class_choice = c * p * d;
        let center_search = p * p * d;
        let scorer: u64 = self
            .head
            .hidden
            .iter()
            .map(|l| (l.out * l.inp) as u64 * p)
            .sum::<u64>()
            + self.head.tail.len() as u64 * p;
        let taps = gaussian_kernel(MAP_SIGMA, MAP_TRUNCATE).len() as u64;
        let map = 2 * taps * (self.height * self.width) as u64;
        Ok(backbone + aggregation + adaptor + class_choice + center_search + scorer + map)
    }

    /// Builds the ONNX model bytes.
    pub fn to_onnx(&self, opts: GraphOptions) -> Result<Vec<u8>, GraphError> {
        self.validate()?;
        let mut g = GraphBuilder::new();
        let n = Dim::Sym("N");
        let (h, w) = (self.height, self.width);
        let d = self.head.embed_dim;
        let c = self.centers.classes;
        let x = image_input(&mut g, n.clone(), h, w);
        let emb = embedding(&mut g, self.backbone, &x, h, w, self.pre_dim, d)?;
        let feats = emb.backbone;
        let ((ha, wa), _) = self.backbone.stage_sizes(h, w);
        let p = ha * wa;
        let emb = emb.embedding;

        let f = g.linear(
            &emb,
            &self.head.adaptor_weight,
            d,
            d,
            Some(&self.head.adaptor_bias),
        );

        // Class per image: argmax of cosine(f flattened, center_c flattened). |f| is the
        // same for every class, so dividing the dot products by |center_c| suffices.
        let centers = g.init_f32("centers", &[c * p, d], self.centers.data.clone());
        let inv_norm: Vec<f32> = self
            .centers
            .data
            .chunks(p * d)
            .map(|cc| (1.0 / cc.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()) as f32)
            .collect();
        let f_flat = g.reshape(&f, &[0, -1]);
        let centers_flat = g.reshape(&centers, &[c as i64, -1]);
        let dots = g.node(
            "Gemm",
            &[&f_flat, &centers_flat],
            vec![("transB", Attr::Int(1))],
        );
        let inv = g.init_f32("center_inv_norm", &[c], inv_norm);
        let cos = g.node("Mul", &[&dots, &inv], vec![]);
        let class_id = g.node(
            "ArgMax",
            &[&cos],
            vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))],
        );

        // Local center: rows class*P .. class*P+P of the bank, most similar by cosine.
        let ax1 = g.init_i64("axes", &[1], vec![1]);
        let class_col = g.node("Unsqueeze", &[&class_id, &ax1], vec![]);
        let p_const = g.init_i64("patches", &[], vec![p as i64]);
        let base = g.node("Mul", &[&class_col, &p_const], vec![]);
        let range = g.init_i64("positions", &[1, p], (0..p as i64).collect());
        let bank_idx = g.node("Add", &[&base, &range], vec![]);
        let bank = g.node(
            "Gather",
            &[&centers, &bank_idx],
            vec![("axis", Attr::Int(0))],
        );
        let norm = g.node(
            "ReduceL2",
            &[&bank],
            vec![("axes", Attr::Ints(vec![2])), ("keepdims", Attr::Int(1))],
        );
        let bank_n = g.node("Div", &[&bank, &norm], vec![]);
        let bank_t = g.transpose(&bank_n, &[0, 2, 1]);
        // |f_p| is constant along the search, so f itself ranks like its cosine.
        let sim = g.node("MatMul", &[&f, &bank_t], vec![]);
        let q = g.node(
            "ArgMax",
            &[&sim],
            vec![("axis", Attr::Int(2)), ("keepdims", Attr::Int(0))],
        );
        let gidx = g.node("Add", &[&base, &q], vec![]);
        let matched = g.node("Gather", &[&centers, &gidx], vec![("axis", Attr::Int(0))]);
        let residual = g.node("Sub", &[&f, &matched], vec![]);

        // Scorer on [f, r].
        let mut s = g.node("Concat", &[&f, &residual], vec![("axis", Attr::Int(2))]);
        for layer in &self.head.hidden {
            s = g.linear(&s, &layer.weight, layer.out, layer.inp, Some(&layer.bias));
            s = g.node("LeakyRelu", &[&s], vec![("alpha", Attr::Float(0.2))]);
        }
        let tail_in = self.head.hidden.last().map(|l| l.out).unwrap_or(2 * d);
        s = g.linear(&s, &self.head.tail, 1, tail_in, None);
        s = g.node("Sigmoid", &[&s], vec![]);

        let patch_scores = g.reshape(&s, &[0, ha as i64, wa as i64]);
        let image_score = g.node(
            "ReduceMax",
            &[&patch_scores],
            vec![("axes", Attr::Ints(vec![1, 2])), ("keepdims", Attr::Int(0))],
        );
        let grid = g.reshape(&s, &[0, 1, ha as i64, wa as i64]);
        let map = map_stage(&mut g, &grid, h, w);

        g.output(
            &map,
            "anomaly_map",
            ElemType::F32,
            vec![
                n.clone(),
                Dim::Fixed(1),
                Dim::Fixed(h as i64),
                Dim::Fixed(w as i64),
            ],
        );
        g.output(
            &patch_scores,
            "patch_scores",
            ElemType::F32,
            vec![n.clone(), Dim::Fixed(ha as i64), Dim::Fixed(wa as i64)],
        );
        g.output(&image_score, "image_score", ElemType::F32, vec![n.clone()]);
        g.output(&class_id, "class_id", ElemType::I64, vec![n.clone()]);
        if opts.debug_outputs {
            let (sa, sb) = (feats.stage_a.clone(), feats.stage_b.clone());
            g.output(
                &sa,
                "stage_a",
                ElemType::F32,
                vec![n.clone(), Dim::Sym("ca"), Dim::Sym("ha"), Dim::Sym("wa")],
            );
            g.output(
                &sb,
                "stage_b",
                ElemType::F32,
                vec![n.clone(), Dim::Sym("cb"), Dim::Sym("hb"), Dim::Sym("wb")],
            );
            g.output(
                &emb,
                "embedding",
                ElemType::F32,
                vec![n.clone(), Dim::Fixed(p as i64), Dim::Fixed(d as i64)],
            );
            g.output(
                &f,
                "adapted",
                ElemType::F32,
                vec![n.clone(), Dim::Fixed(p as i64), Dim::Fixed(d as i64)],
            );
            g.output(&q, "q", ElemType::I64, vec![n, Dim::Fixed(p as i64)]);
        }
        Ok(g.to_bytes("cras", "cras"))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::{Backbone, BackboneKind};
    use crate::weights::{StateDict, Tensor};

    fn zeros(keys: &[(String, Vec<usize>)]) -> StateDict {
        StateDict {
            tensors: keys
                .iter()
                .map(|(k, s)| {
                    (
                        k.clone(),
                        Tensor::f32(s.clone(), vec![0.0; s.iter().product()]),
                    )
                })
                .collect(),
            source: "zeros".into(),
        }
    }

    #[test]
    fn wrn50_paper_config_macs_match_a_hand_count() {
        // Hand count at 288x288: backbone up to layer3 15.21 G (stem 0.195, layer1 3.27,
        // layer2 4.76, layer3 6.96), adaptor 1296*1536^2, center search 1296^2*1536,
        // scorer 1296*(3072*1536 + 1536*768 + 768), class choice 2*1296*1536,
        // aggregation 1296*768*18 + 324*768*36, map 2*33*288^2.
        let kind = BackboneKind::WideResnet50_2;
        let backbone =
            Backbone::from_state_dict(kind, zeros(&Backbone::expected_keys(kind))).unwrap();
        let (d, p) = (1536usize, 1296usize);
        let head = CrasHead::from_state_dict(&zeros(&CrasHead::expected_keys(d))).unwrap();
        let centers = Centers {
            classes: 2,
            patches: p,
            dim: d,
            data: vec![0.0; 2 * p * d],
        };
        let model = CrasModel {
            backbone: &backbone,
            head: &head,
            centers: &centers,
            height: 288,
            width: 288,
            pre_dim: d,
        };
        let backbone_macs: u64 = 9408 * 20736
            + (204_800 + 2 * 212_992) * 5184
            + 65_536 * 5184
            + (589_824 + 2 * 131_072) * 1296
            + 3 * 851_968 * 1296
            + 262_144 * 1296
            + (2_359_296 + 2 * 524_288) * 324
            + 5 * 3_407_872 * 324;
        let (d, p) = (d as u64, p as u64);
        let head_macs = p * d * d
            + p * p * d
            + p * (2 * d * d + d * d / 2 + d / 2)
            + 2 * p * d
            + p * (d / 2) * 18
            + 324 * (d / 2) * 36
            + 2 * 33 * 288 * 288;
        assert_eq!(model.macs_per_image().unwrap(), backbone_macs + head_macs);
    }
}
