//! Writes the whole CRAS inference graph as one ONNX model:
//! backbone -> aggregation -> adaptor -> per-image class choice -> local center search
//! -> residual -> scorer -> patch scores, image score and the smoothed anomaly map.
//! One node family per function: the frozen embedding is in [`super::embedding`], the
//! map stage in [`super::map`].
//!
//! Inputs: `image` [N,3,H,W] float32, normalised. Outputs: `anomaly_map` [N,1,H,W],
//! `patch_scores` [N,h,w], `image_score` [N], `class_id` [N] int64. N is dynamic.

use super::aggregation;
use super::embedding::{embedding, image_input};
use super::head::{Centers, CrasHead};
use super::score::ImageScore;
use super::views::Views;
use crate::backbone::{Backbone, BnMode};
use crate::onnx::{Attr, Dim, ElemType, GraphBuilder};
use crate::weights::WeightsError;

pub use super::embedding::{
    BnReplayGraph, Embedding, bn_replay_graph, embedding_graph, stages_graph,
};
pub use super::map::{MAP_SIGMA, MAP_TRUNCATE, gaussian_kernel, map_stage, reflect_indices};

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
    /// How `image_score` is taken from the scores.
    pub image_score: ImageScore,
    /// The orientations each image is scored in; their maps are averaged.
    pub views: Views,
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
        // Every view runs the whole model but the class choice, made on the original.
        let per_view = backbone + aggregation + adaptor + center_search + scorer + map;
        Ok(per_view * self.views.count() as u64 + class_choice)
    }

    /// Builds the ONNX model bytes.
    pub fn to_onnx(&self, opts: GraphOptions) -> Result<Vec<u8>, GraphError> {
        self.validate()?;
        let mut g = GraphBuilder::new();
        let n = Dim::Sym("N");
        let (h, w) = (self.height, self.width);
        let d = self.head.embed_dim;
        let image = image_input(&mut g, n.clone(), h, w);
        // Every view runs as one batch; `f` and what follows hold V*N images.
        let x = self.views.expand(&mut g, &image, h, w);
        let emb = embedding(&mut g, self.backbone, &x, h, w, self.pre_dim, d)?;
        let ((ha, wa), _) = self.backbone.stage_sizes(h, w);
        let f = g.linear(
            &emb.embedding,
            &self.head.adaptor_weight,
            d,
            d,
            Some(&self.head.adaptor_bias),
        );
        let centers = g.init_f32(
            "centers",
            &[self.centers.classes * ha * wa, d],
            self.centers.data.clone(),
        );
        // The class is chosen on the original, and every view is judged against its
        // centers.
        let original = self.views.first(&mut g, &f, &[ha * wa, d]);
        let class_id = self.class_choice(&mut g, &original, &centers);
        let view_class = self.views.repeat(&mut g, &class_id);
        let (residual, q) = self.center_residual(&mut g, &f, &centers, &view_class);
        let s = self.scorer(&mut g, &f, &residual);
        let patch_scores = g.reshape(&s, &[0, ha as i64, wa as i64]);
        let grid = g.reshape(&s, &[0, 1, ha as i64, wa as i64]);
        let map = map_stage(&mut g, &grid, h, w);
        // The views read back and averaged (nothing is added for the original alone).
        let map = self.views.combine(&mut g, &map, &[1, h, w]);
        let patch_scores = self.views.combine(&mut g, &patch_scores, &[ha, wa]);
        let image_score = self.image_score.graph(&mut g, &patch_scores, &map, h * w);
        let fixed = |v: usize| Dim::Fixed(v as i64);
        g.output(
            &map,
            "anomaly_map",
            ElemType::F32,
            vec![n.clone(), fixed(1), fixed(h), fixed(w)],
        );
        g.output(
            &patch_scores,
            "patch_scores",
            ElemType::F32,
            vec![n.clone(), fixed(ha), fixed(wa)],
        );
        g.output(&image_score, "image_score", ElemType::F32, vec![n.clone()]);
        g.output(&class_id, "class_id", ElemType::I64, vec![n.clone()]);
        if opts.debug_outputs {
            let inner = [("embedding", &emb.embedding), ("adapted", &f)];
            debug_outputs(&mut g, &emb.backbone, &inner, &q, ha * wa, d);
        }
        Ok(g.to_bytes("cras", "cras"))
    }

    /// Class per image: argmax of cosine(f flattened, center_c flattened). |f| is the
    /// same for every class, so dividing the dot products by |center_c| suffices.
    fn class_choice(&self, g: &mut GraphBuilder, f: &str, centers: &str) -> String {
        let (c, p, d) = (self.centers.classes, self.centers.patches, self.centers.dim);
        let inv_norm: Vec<f32> = self
            .centers
            .data
            .chunks(p * d)
            .map(|cc| (1.0 / cc.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()) as f32)
            .collect();
        let f_flat = g.reshape(f, &[0, -1]);
        let centers_flat = g.reshape(centers, &[c as i64, -1]);
        let dots = g.node(
            "Gemm",
            &[&f_flat, &centers_flat],
            vec![("transB", Attr::Int(1))],
        );
        let inv = g.init_f32("center_inv_norm", &[c], inv_norm);
        let cos = g.node("Mul", &[&dots, &inv], vec![]);
        g.node(
            "ArgMax",
            &[&cos],
            vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))],
        )
    }

    /// Local center: rows class*P .. class*P+P of the bank, the most similar by cosine
    /// for each patch. Returns the residual f - center and the chosen rows q.
    fn center_residual(
        &self,
        g: &mut GraphBuilder,
        f: &str,
        centers: &str,
        class_id: &str,
    ) -> (String, String) {
        let p = self.centers.patches;
        let ax1 = g.init_i64("axes", &[1], vec![1]);
        let class_col = g.node("Unsqueeze", &[class_id, &ax1], vec![]);
        let p_const = g.init_i64("patches", &[], vec![p as i64]);
        let base = g.node("Mul", &[&class_col, &p_const], vec![]);
        let range = g.init_i64("positions", &[1, p], (0..p as i64).collect());
        let bank_idx = g.node("Add", &[&base, &range], vec![]);
        let bank = g.node(
            "Gather",
            &[centers, &bank_idx],
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
        let sim = g.node("MatMul", &[f, &bank_t], vec![]);
        let q = g.node(
            "ArgMax",
            &[&sim],
            vec![("axis", Attr::Int(2)), ("keepdims", Attr::Int(0))],
        );
        let gidx = g.node("Add", &[&base, &q], vec![]);
        let matched = g.node("Gather", &[centers, &gidx], vec![("axis", Attr::Int(0))]);
        (g.node("Sub", &[f, &matched], vec![]), q)
    }

    /// The scorer on [f, r]: Linear + LeakyReLU blocks (BatchNorm folded), a bias-free
    /// tail, a sigmoid. [N, P, 1].
    fn scorer(&self, g: &mut GraphBuilder, f: &str, residual: &str) -> String {
        let mut s = g.node("Concat", &[f, residual], vec![("axis", Attr::Int(2))]);
        for layer in &self.head.hidden {
            s = g.linear(&s, &layer.weight, layer.out, layer.inp, Some(&layer.bias));
            s = g.node("LeakyRelu", &[&s], vec![("alpha", Attr::Float(0.2))]);
        }
        let tail_in = self
            .head
            .hidden
            .last()
            .map(|l| l.out)
            .unwrap_or(2 * self.head.embed_dim);
        s = g.linear(&s, &self.head.tail, 1, tail_in, None);
        g.node("Sigmoid", &[&s], vec![])
    }
}

/// The parity outputs: the backbone's stages, the embedding and the adapted features
/// ([N, P, D] each, as `inner` names them) and the chosen center rows `q`.
fn debug_outputs(
    g: &mut GraphBuilder,
    backbone: &crate::backbone::BackboneOutputs,
    inner: &[(&str, &String)],
    q: &str,
    p: usize,
    d: usize,
) {
    let n = Dim::Sym("N");
    for (name, value, c, hh, ww) in [
        ("stage_a", &backbone.stage_a, "ca", "ha", "wa"),
        ("stage_b", &backbone.stage_b, "cb", "hb", "wb"),
    ] {
        let dims = vec![n.clone(), Dim::Sym(c), Dim::Sym(hh), Dim::Sym(ww)];
        g.output(value, name, ElemType::F32, dims);
    }
    for (name, value) in inner {
        let dims = vec![n.clone(), Dim::Fixed(p as i64), Dim::Fixed(d as i64)];
        g.output(value, name, ElemType::F32, dims);
    }
    g.output(q, "q", ElemType::I64, vec![n, Dim::Fixed(p as i64)]);
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
            image_score: super::ImageScore::PatchMax,
            views: Views::default(),
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
        // Two views run everything twice but the class choice (2 * P * D), made once.
        let views = CrasModel {
            views: Views::parse("original,rotate180").unwrap(),
            ..model
        };
        let class_choice = 2 * p * d;
        assert_eq!(
            views.macs_per_image().unwrap(),
            2 * (backbone_macs + head_macs) - class_choice
        );
    }
}
