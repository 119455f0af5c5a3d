//! Writing ONNX models: a minimal protobuf encoder for the ONNX schema and a graph
//! builder with one helper per node family; [`signature`] reads a graph's inputs and
//! outputs back.
//!
//! Only what our graphs need is encoded; field numbers follow `onnx/onnx.proto` (IR 8).

mod proto;
pub mod signature;

use proto::{Encoder, encode_node, encode_tensor, encode_value_info};

pub const OPSET: i64 = 17;
const IR_VERSION: i64 = 8;

#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ElemType {
    F32 = 1,
    U8 = 2,
    I64 = 7,
}

/// A dimension of a graph input/output: fixed or symbolic (dynamic batch).
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(i64),
    Sym(&'static str),
}

struct Node {
    op: String,
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<(String, Attr)>,
}

enum InitData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

struct Initializer {
    name: String,
    dims: Vec<i64>,
    data: InitData,
}

struct ValueInfo {
    name: String,
    elem: ElemType,
    dims: Vec<Dim>,
}

/// Builds one ONNX graph. Node helpers return the name of their output value.
#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<Node>,
    inits: Vec<Initializer>,
    inputs: Vec<ValueInfo>,
    outputs: Vec<ValueInfo>,
    counter: usize,
    metadata: Vec<(String, String)>,
    /// Opset of the default domain; [`OPSET`] unless set.
    opset: Option<i64>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder whose model imports `opset` of the default domain instead of [`OPSET`]
    /// (the frames stage needs 18 for Resize's `antialias`).
    pub fn with_opset(opset: i64) -> Self {
        GraphBuilder {
            opset: Some(opset),
            ..Self::default()
        }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    pub fn input(&mut self, name: &str, elem: ElemType, dims: Vec<Dim>) -> String {
        self.inputs.push(ValueInfo {
            name: name.to_string(),
            elem,
            dims,
        });
        name.to_string()
    }

    /// Declares `value` as a graph output named `name` (an Identity node renames it).
    pub fn output(&mut self, value: &str, name: &str, elem: ElemType, dims: Vec<Dim>) {
        self.nodes.push(Node {
            op: "Identity".into(),
            name: format!("out_{name}"),
            inputs: vec![value.to_string()],
            outputs: vec![name.to_string()],
            attrs: vec![],
        });
        self.outputs.push(ValueInfo {
            name: name.to_string(),
            elem,
            dims,
        });
    }

    pub fn metadata(&mut self, key: &str, value: &str) {
        self.metadata.push((key.to_string(), value.to_string()));
    }

    pub fn init_f32(&mut self, hint: &str, dims: &[usize], data: Vec<f32>) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len(), "{hint}");
        let name = self.fresh(hint);
        self.inits.push(Initializer {
            name: name.clone(),
            dims: dims.iter().map(|d| *d as i64).collect(),
            data: InitData::F32(data),
        });
        name
    }

    pub fn init_i64(&mut self, hint: &str, dims: &[usize], data: Vec<i64>) -> String {
        let name = self.fresh(hint);
        self.inits.push(Initializer {
            name: name.clone(),
            dims: dims.iter().map(|d| *d as i64).collect(),
            data: InitData::I64(data),
        });
        name
    }

    /// A node with one output.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.node_outputs(op, inputs, attrs, 1).remove(0)
    }

    /// A node with `count` outputs (TopK's values and indices, ...), named after the
    /// node (`<op>_<n>`, then `_<i>` when there are several).
    pub fn node_outputs(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        count: usize,
    ) -> Vec<String> {
        let base = self.fresh(&op.to_ascii_lowercase());
        let outputs: Vec<String> = match count {
            1 => vec![base.clone()],
            _ => (0..count).map(|i| format!("{base}_{i}")).collect(),
        };
        self.nodes.push(Node {
            op: op.to_string(),
            name: format!("n_{base}"),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.clone(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
        outputs
    }

    // ---- node families -------------------------------------------------------------

    /// 2-D convolution; `pads` is [top, left, bottom, right].
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        x: &str,
        weight: Vec<f32>,
        wshape: [usize; 4],
        bias: Option<Vec<f32>>,
        stride: usize,
        pads: [usize; 4],
        group: usize,
    ) -> String {
        let w = self.init_f32("conv_w", &wshape, weight);
        let mut ins = vec![x.to_string(), w];
        if let Some(b) = bias {
            ins.push(self.init_f32("conv_b", &[wshape[0]], b));
        }
        let ins: Vec<&str> = ins.iter().map(String::as_str).collect();
        self.node(
            "Conv",
            &ins,
            vec![
                (
                    "kernel_shape",
                    Attr::Ints(vec![wshape[2] as i64, wshape[3] as i64]),
                ),
                ("strides", Attr::Ints(vec![stride as i64, stride as i64])),
                ("pads", Attr::Ints(pads.iter().map(|p| *p as i64).collect())),
                ("group", Attr::Int(group as i64)),
            ],
        )
    }

    /// Inference-mode BatchNormalization over channel axis 1.
    pub fn batch_norm(&mut self, x: &str, p: &BatchNormParams) -> String {
        let c = p.weight.len();
        let s = self.init_f32("bn_scale", &[c], p.weight.clone());
        let b = self.init_f32("bn_bias", &[c], p.bias.clone());
        let m = self.init_f32("bn_mean", &[c], p.running_mean.clone());
        let v = self.init_f32("bn_var", &[c], p.running_var.clone());
        self.node(
            "BatchNormalization",
            &[x, &s, &b, &m, &v],
            vec![("epsilon", Attr::Float(p.eps))],
        )
    }

    /// Train-mode BatchNorm on an NCHW tensor written with plain ops: normalises with the
    /// batch's own mean and biased variance, and returns (output, batch mean, batch var)
    /// with the statistics as [C] vectors.
    pub fn batch_norm_train(&mut self, x: &str, p: &BatchNormParams) -> (String, String, String) {
        let c = p.weight.len();
        let axes = Attr::Ints(vec![0, 2, 3]);
        let mean = self.node(
            "ReduceMean",
            &[x],
            vec![("axes", axes.clone()), ("keepdims", Attr::Int(1))],
        );
        let d = self.node("Sub", &[x, &mean], vec![]);
        let sq = self.node("Mul", &[&d, &d], vec![]);
        let var = self.node(
            "ReduceMean",
            &[&sq],
            vec![("axes", axes), ("keepdims", Attr::Int(1))],
        );
        let eps = self.init_f32("bn_eps", &[], vec![p.eps]);
        let ve = self.node("Add", &[&var, &eps], vec![]);
        let sd = self.node("Sqrt", &[&ve], vec![]);
        let xn = self.node("Div", &[&d, &sd], vec![]);
        let w = self.init_f32("bn_w", &[1, c, 1, 1], p.weight.clone());
        let b = self.init_f32("bn_b", &[1, c, 1, 1], p.bias.clone());
        let y = self.node("Mul", &[&xn, &w], vec![]);
        let y = self.node("Add", &[&y, &b], vec![]);
        let flat = self.init_i64("shape", &[1], vec![-1]);
        let mean_v = self.node("Reshape", &[&mean, &flat], vec![]);
        let var_v = self.node("Reshape", &[&var, &flat], vec![]);
        (y, mean_v, var_v)
    }

    pub fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &[x], vec![])
    }

    pub fn relu6(&mut self, x: &str) -> String {
        let lo = self.init_f32("clip_lo", &[], vec![0.0]);
        let hi = self.init_f32("clip_hi", &[], vec![6.0]);
        self.node("Clip", &[x, &lo, &hi], vec![])
    }

    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.node("Add", &[a, b], vec![])
    }

    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.init_i64("shape", &[shape.len()], shape.to_vec());
        self.node("Reshape", &[x, &s], vec![])
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.node("Transpose", &[x], vec![("perm", Attr::Ints(perm.to_vec()))])
    }

    /// x @ W^T + b for a PyTorch Linear weight `w` of shape [out, in].
    pub fn linear(
        &mut self,
        x: &str,
        w: &[f32],
        out: usize,
        inp: usize,
        bias: Option<&[f32]>,
    ) -> String {
        let mut wt = vec![0f32; w.len()];
        for o in 0..out {
            for i in 0..inp {
                wt[i * out + o] = w[o * inp + i];
            }
        }
        let wt = self.init_f32("linear_wt", &[inp, out], wt);
        let y = self.node("MatMul", &[x, &wt], vec![]);
        match bias {
            Some(b) => {
                let b = self.init_f32("linear_b", &[out], b.to_vec());
                self.add(&y, &b)
            }
            None => y,
        }
    }

    /// Bilinear resize of an NCHW tensor to (h, w), half-pixel centres
    /// (PyTorch `interpolate(mode="bilinear", align_corners=False)`).
    pub fn resize_bilinear(&mut self, x: &str, h: usize, w: usize) -> String {
        let shape = self.node("Shape", &[x], vec![]);
        let start = self.init_i64("start", &[1], vec![0]);
        let end = self.init_i64("end", &[1], vec![2]);
        let nc = self.node("Slice", &[&shape, &start, &end], vec![]);
        let hw = self.init_i64("hw", &[2], vec![h as i64, w as i64]);
        let sizes = self.node("Concat", &[&nc, &hw], vec![("axis", Attr::Int(0))]);
        self.node(
            "Resize",
            &[x, "", "", &sizes],
            vec![
                ("mode", Attr::Str("linear".into())),
                (
                    "coordinate_transformation_mode",
                    Attr::Str("half_pixel".into()),
                ),
            ],
        )
    }

    /// Encodes the model (opset 17 unless built [`GraphBuilder::with_opset`]) as ONNX
    /// protobuf bytes.
    pub fn to_bytes(&self, graph_name: &str, producer: &str) -> Vec<u8> {
        let mut graph = Encoder::new();
        for n in &self.nodes {
            graph.message(1, &encode_node(n));
        }
        graph.string(2, graph_name);
        for i in &self.inits {
            graph.message(5, &encode_tensor(i));
        }
        for v in &self.inputs {
            graph.message(11, &encode_value_info(v));
        }
        for v in &self.outputs {
            graph.message(12, &encode_value_info(v));
        }
        let mut model = Encoder::new();
        model.int(1, IR_VERSION);
        model.string(2, producer);
        model.string(3, env!("CARGO_PKG_VERSION"));
        model.message(7, &graph.into_bytes());
        let mut opset = Encoder::new();
        opset.string(1, "");
        opset.int(2, self.opset.unwrap_or(OPSET));
        model.message(8, &opset.into_bytes());
        for (k, v) in &self.metadata {
            let mut e = Encoder::new();
            e.string(1, k);
            e.string(2, v);
            model.message(14, &e.into_bytes());
        }
        model.into_bytes()
    }
}

/// BatchNorm parameters of one layer (PyTorch names).
#[derive(Debug, Clone)]
pub struct BatchNormParams {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    pub eps: f32,
}
