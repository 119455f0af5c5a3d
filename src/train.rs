//! `cras train`: the method's training (method page, section 8) on cached embeddings.
//!
//! The backbone is frozen and training uses no augmentation, so every image's patch
//! embedding is computed once (onnxruntime, the same graph as inference) and cached on
//! disk. The adaptor and the scorer train with candle on the CPU:
//! centers from the initial adaptor, distance-guided Gaussian noise on the adapted
//! features, BCE on normal vs synthetic patches, AdamW (adaptor) and Adam with L2 (scorer).
//!
//! Model selection never looks at the test split: a held-out part of the good training
//! images is scored each epoch against the same images with synthetic defects painted on
//! (`synth` defects: scratch, spot, missing part), and the epoch with the best image
//! AUROC on that validation set is kept (ties: the earlier epoch).

use crate::backbone::{Backbone, BackboneKind};
use crate::dataset::ClassData;
use crate::engine::{EngineKind, EngineOptions};
use crate::features::{self, FeatureCache, Source};
use crate::model::bundle::{
    Bundle, BundleMeta, EpochRecord, FORMAT_VERSION, Provenance, SourceFile, TrainingRecord,
    sha256_file,
};
use crate::model::graph::{CrasModel, GraphOptions, embedding_graph};
use crate::model::head::{Centers, CrasHead};
use crate::preprocess::InputSpec;
use crate::rng::Rng;
use crate::weights::{StateDict, Tensor as WTensor};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Training options; defaults are the paper's.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub classes: Vec<String>,
    pub backbone: BackboneKind,
    pub backbone_weights: PathBuf,
    pub out: PathBuf,
    pub work: PathBuf,
    pub input: InputSpec,
    pub embed_dim: usize,
    pub pre_dim: usize,
    pub epochs: usize,
    pub batch: usize,
    pub adaptor_lr: f64,
    pub scorer_lr: f64,
    pub noise_std: f64,
    /// When set, sigma = this x the adapted features' mean per-dimension std at
    /// initialisation (instead of `noise_std`): the same relative perturbation whatever
    /// the backbone's feature scale.
    pub noise_relative: Option<f64>,
    pub noise_k: f64,
    pub val_fraction: f64,
    /// Blend of the validation positives' synthetic defects (1: full strength).
    pub val_defect_strength: f64,
    /// The kinds of synthetic defect validation positives are drawn from.
    pub val_defects: crate::synth::DefectKinds,
    pub seed: u64,
    pub resume: bool,
    pub engine_options: EngineOptions,
    /// Where the training steps run. The embedding pass always runs on the engine in
    /// `engine_options`.
    pub device: TrainDevice,
}

/// The compute device for the training steps, parsed once from `cpu`, `cuda` (GPU 0) or
/// `cuda:N`; shown back in that form (model.yaml provenance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainDevice {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for TrainDevice {
    type Err = anyhow::Error;

    /// A CUDA name in a build without the `cuda` feature is refused here, with the
    /// rebuild command, rather than by candle's generic "not compiled" error after
    /// minutes of embedding extraction.
    fn from_str(name: &str) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        let device = match lower.as_str() {
            "cpu" => return Ok(TrainDevice::Cpu),
            "cuda" => TrainDevice::Cuda(0),
            n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => TrainDevice::Cuda(i),
                _ => bail!(
                    "unknown training device {name:?}: use cpu, cuda or cuda:N (N = GPU index)"
                ),
            },
        };
        if !cfg!(feature = "cuda") {
            bail!(
                "training device {name:?} needs a cras built with the `cuda` feature \
                 (cargo build --release --features cuda, with the CUDA toolkit installed); \
                 this build trains on the cpu only"
            );
        }
        Ok(device)
    }
}

impl std::fmt::Display for TrainDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainDevice::Cpu => f.write_str("cpu"),
            TrainDevice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl TrainDevice {
    fn open(self) -> Result<Device> {
        match self {
            TrainDevice::Cpu => Ok(Device::Cpu),
            TrainDevice::Cuda(i) => Device::new_cuda(i)
                .with_context(|| format!("cannot open CUDA device {i} for training")),
        }
    }
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
const LEAKY: f64 = 0.2;

/// `v` ([C]) repeated on every row ([N, C]) as a product with a ones column, so that its
/// gradient is a matrix product too rather than a slow reduction over rows.
fn rows_of(ones_col: &Tensor, v: &Tensor) -> Result<Tensor> {
    Ok(ones_col.matmul(&v.unsqueeze(0)?)?)
}

/// Trainable parameters, PyTorch layouts ([out, in] weights).
struct Params {
    adaptor_w: Var,
    adaptor_b: Var,
    w1: Var,
    b1: Var,
    g1: Var,
    beta1: Var,
    w2: Var,
    b2: Var,
    g2: Var,
    beta2: Var,
    w3: Var,
    /// BatchNorm running statistics (not trained).
    rm1: Tensor,
    rv1: Tensor,
    rm2: Tensor,
    rv2: Tensor,
}

fn xavier(rng: &mut Rng, out: usize, inp: usize, dev: &Device) -> Result<Var> {
    let std = (2.0 / (out + inp) as f64).sqrt();
    let v: Vec<f32> = (0..out * inp)
        .map(|_| (rng.normal() * std) as f32)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, (out, inp), dev)?)?)
}

fn bias(rng: &mut Rng, out: usize, fan_in: usize, dev: &Device) -> Result<Var> {
    let b = 1.0 / (fan_in as f64).sqrt();
    let v: Vec<f32> = (0..out).map(|_| rng.range(-b, b) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, out, dev)?)?)
}

fn constant(v: f32, n: usize, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(vec![v; n], n, dev)?)
}

impl Params {
    fn init(d: usize, rng: &mut Rng, dev: &Device) -> Result<Params> {
        let h = d / 2;
        Ok(Params {
            adaptor_w: xavier(rng, d, d, dev)?,
            adaptor_b: bias(rng, d, d, dev)?,
            w1: xavier(rng, d, 2 * d, dev)?,
            b1: bias(rng, d, 2 * d, dev)?,
            g1: Var::from_tensor(&constant(1.0, d, dev)?)?,
            beta1: Var::from_tensor(&constant(0.0, d, dev)?)?,
            w2: xavier(rng, h, d, dev)?,
            b2: bias(rng, h, d, dev)?,
            g2: Var::from_tensor(&constant(1.0, h, dev)?)?,
            beta2: Var::from_tensor(&constant(0.0, h, dev)?)?,
            w3: xavier(rng, 1, h, dev)?,
            rm1: constant(0.0, d, dev)?,
            rv1: constant(1.0, d, dev)?,
            rm2: constant(0.0, h, dev)?,
            rv2: constant(1.0, h, dev)?,
        })
    }

    fn adaptor_vars(&self) -> Vec<&Var> {
        vec![&self.adaptor_w, &self.adaptor_b]
    }

    fn scorer_vars(&self) -> Vec<&Var> {
        vec![
            &self.w1,
            &self.b1,
            &self.g1,
            &self.beta1,
            &self.w2,
            &self.b2,
            &self.g2,
            &self.beta2,
            &self.w3,
        ]
    }

    /// (name, tensor) in CRAS state-dict names, running statistics included.
    fn named(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            (
                "pre_projection.layers.0fc.weight",
                self.adaptor_w.as_tensor().clone(),
            ),
            (
                "pre_projection.layers.0fc.bias",
                self.adaptor_b.as_tensor().clone(),
            ),
            (
                "discriminator.body.block1.0.weight",
                self.w1.as_tensor().clone(),
            ),
            (
                "discriminator.body.block1.0.bias",
                self.b1.as_tensor().clone(),
            ),
            (
                "discriminator.body.block1.1.weight",
                self.g1.as_tensor().clone(),
            ),
            (
                "discriminator.body.block1.1.bias",
                self.beta1.as_tensor().clone(),
            ),
            ("discriminator.body.block1.1.running_mean", self.rm1.clone()),
            ("discriminator.body.block1.1.running_var", self.rv1.clone()),
            (
                "discriminator.body.block2.0.weight",
                self.w2.as_tensor().clone(),
            ),
            (
                "discriminator.body.block2.0.bias",
                self.b2.as_tensor().clone(),
            ),
            (
                "discriminator.body.block2.1.weight",
                self.g2.as_tensor().clone(),
            ),
            (
                "discriminator.body.block2.1.bias",
                self.beta2.as_tensor().clone(),
            ),
            ("discriminator.body.block2.1.running_mean", self.rm2.clone()),
            ("discriminator.body.block2.1.running_var", self.rv2.clone()),
            ("discriminator.tail.0.weight", self.w3.as_tensor().clone()),
        ]
    }

    fn snapshot(&self) -> Result<BTreeMap<String, WTensor>> {
        let mut out = BTreeMap::new();
        for (name, t) in self.named() {
            let shape = t.dims().to_vec();
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            out.insert(name.to_string(), WTensor::f32(shape, v));
        }
        Ok(out)
    }

    fn restore(&mut self, s: &BTreeMap<String, WTensor>, dev: &Device) -> Result<()> {
        let get = |k: &str| -> Result<Tensor> {
            let t = s.get(k).with_context(|| format!("checkpoint lacks {k}"))?;
            let v = t
                .as_f32()
                .with_context(|| format!("checkpoint {k} is not float"))?;
            Ok(Tensor::from_vec(v.to_vec(), t.shape.as_slice(), dev)?)
        };
        let vars: [(&str, &Var); 11] = [
            ("pre_projection.layers.0fc.weight", &self.adaptor_w),
            ("pre_projection.layers.0fc.bias", &self.adaptor_b),
            ("discriminator.body.block1.0.weight", &self.w1),
            ("discriminator.body.block1.0.bias", &self.b1),
            ("discriminator.body.block1.1.weight", &self.g1),
            ("discriminator.body.block1.1.bias", &self.beta1),
            ("discriminator.body.block2.0.weight", &self.w2),
            ("discriminator.body.block2.0.bias", &self.b2),
            ("discriminator.body.block2.1.weight", &self.g2),
            ("discriminator.body.block2.1.bias", &self.beta2),
            ("discriminator.tail.0.weight", &self.w3),
        ];
        for (k, v) in vars {
            v.set(&get(k)?)?;
        }
        self.rm1 = get("discriminator.body.block1.1.running_mean")?;
        self.rv1 = get("discriminator.body.block1.1.running_var")?;
        self.rm2 = get("discriminator.body.block2.1.running_mean")?;
        self.rv2 = get("discriminator.body.block2.1.running_var")?;
        Ok(())
    }

    fn adapt(&self, x: &Tensor) -> Result<Tensor> {
        let ones = Tensor::ones((x.dim(0)?, 1), DType::F32, x.device())?;
        Ok(x.matmul(&self.adaptor_w.as_tensor().t()?)?
            .add(&rows_of(&ones, self.adaptor_b.as_tensor())?)?)
    }

    fn leaky(x: &Tensor) -> Result<Tensor> {
        Ok(x.maximum(&x.affine(LEAKY, 0.0)?)?)
    }

    /// Scorer logits [rows, 1]; train mode uses batch statistics and updates the running ones.
    fn score_logits(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let layers = [
            (&self.w1, &self.b1, &self.g1, &self.beta1),
            (&self.w2, &self.b2, &self.g2, &self.beta2),
        ];
        let mut h = x.clone();
        let mut new_stats = Vec::new();
        let n = x.dim(0)?;
        let ones_col = Tensor::ones((n, 1), DType::F32, x.device())?;
        let ones_row = Tensor::ones((1, n), DType::F32, x.device())?;
        for (i, (w, b, g, beta)) in layers.into_iter().enumerate() {
            let z = h
                .matmul(&w.as_tensor().t()?)?
                .add(&rows_of(&ones_col, b.as_tensor())?)?;
            let (mean, var) = if train {
                // Column statistics as products with a ones vector: candle reduces over
                // rows far more slowly than gemm does (and so would every backward
                // broadcast), which made BatchNorm a third of each step.
                let mean = ones_row.matmul(&z)?.affine(1.0 / n as f64, 0.0)?;
                let c = z.sub(&ones_col.matmul(&mean)?)?;
                let var = ones_row.matmul(&c.sqr()?)?.affine(1.0 / n as f64, 0.0)?;
                new_stats.push((
                    mean.squeeze(0)?.detach(),
                    var.squeeze(0)?
                        .detach()
                        .affine(n as f64 / (n as f64 - 1.0), 0.0)?,
                ));
                (mean, var)
            } else {
                let (rm, rv) = if i == 0 {
                    (&self.rm1, &self.rv1)
                } else {
                    (&self.rm2, &self.rv2)
                };
                (rm.unsqueeze(0)?, rv.unsqueeze(0)?)
            };
            let inv_std = var.affine(1.0, BN_EPS)?.sqrt()?.recip()?;
            let zn = z
                .sub(&ones_col.matmul(&mean)?)?
                .mul(&ones_col.matmul(&inv_std)?)?;
            let y = zn
                .mul(&rows_of(&ones_col, g.as_tensor())?)?
                .add(&rows_of(&ones_col, beta.as_tensor())?)?;
            h = Self::leaky(&y)?;
        }
        for (i, (m, v)) in new_stats.into_iter().enumerate() {
            let (rm, rv) = if i == 0 {
                (&mut self.rm1, &mut self.rv1)
            } else {
                (&mut self.rm2, &mut self.rv2)
            };
            *rm = rm
                .affine(1.0 - BN_MOMENTUM, 0.0)?
                .add(&m.affine(BN_MOMENTUM, 0.0)?)?;
            *rv = rv
                .affine(1.0 - BN_MOMENTUM, 0.0)?
                .add(&v.affine(BN_MOMENTUM, 0.0)?)?;
        }
        Ok(h.matmul(&self.w3.as_tensor().t()?)?)
    }
}

/// Adam moments of one variable.
struct Moments {
    m: Tensor,
    v: Tensor,
}

/// Adam (L2 weight decay added to the gradient) or AdamW (decoupled decay).
struct Adam {
    lr: f64,
    weight_decay: f64,
    decoupled: bool,
    step: i32,
    moments: Vec<Moments>,
}

impl Adam {
    fn new(vars: &[&Var], lr: f64, weight_decay: f64, decoupled: bool) -> Result<Adam> {
        let moments = vars
            .iter()
            .map(|v| {
                Ok(Moments {
                    m: v.as_tensor().zeros_like()?,
                    v: v.as_tensor().zeros_like()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Adam {
            lr,
            weight_decay,
            decoupled,
            step: 0,
            moments,
        })
    }

    fn apply(&mut self, vars: &[&Var], grads: &candle_core::backprop::GradStore) -> Result<()> {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        const EPS: f64 = 1e-8;
        self.step += 1;
        let (c1, c2) = (1.0 - B1.powi(self.step), 1.0 - B2.powi(self.step));
        for (var, mo) in vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let theta = var.as_tensor();
            let g = if !self.decoupled && self.weight_decay > 0.0 {
                g.add(&theta.affine(self.weight_decay, 0.0)?)?
            } else {
                g.clone()
            };
            mo.m = mo.m.affine(B1, 0.0)?.add(&g.affine(1.0 - B1, 0.0)?)?;
            mo.v =
                mo.v.affine(B2, 0.0)?
                    .add(&g.sqr()?.affine(1.0 - B2, 0.0)?)?;
            let update =
                mo.m.affine(1.0 / c1, 0.0)?
                    .div(&mo.v.affine(1.0 / c2, 0.0)?.sqrt()?.affine(1.0, EPS)?)?;
            let mut next = theta.sub(&update.affine(self.lr, 0.0)?)?;
            if self.decoupled && self.weight_decay > 0.0 {
                next = next.sub(&theta.affine(self.lr * self.weight_decay, 0.0)?)?;
            }
            var.set(&next)?;
        }
        Ok(())
    }
}

/// Per-class center banks and the search over them.
struct CenterBank {
    /// [C*P, D]
    flat: Tensor,
    /// Row-normalised copy, [C*P, D]
    normed: Tensor,
    /// 1/|center_c| over the flattened bank, per class.
    inv_norm: Vec<f32>,
    patches: usize,
}

impl CenterBank {
    fn new(
        data: Vec<f32>,
        classes: usize,
        patches: usize,
        dim: usize,
        dev: &Device,
    ) -> Result<CenterBank> {
        let inv_norm = data
            .chunks(patches * dim)
            .map(|c| (1.0 / c.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()) as f32)
            .collect();
        let flat = Tensor::from_vec(data, (classes * patches, dim), dev)?;
        let norms = flat.sqr()?.sum_keepdim(1)?.sqrt()?.affine(1.0, 1e-12)?;
        let normed = flat.broadcast_div(&norms)?;
        Ok(CenterBank {
            flat,
            normed,
            inv_norm,
            patches,
        })
    }

    /// Rows of the bank nearest (cosine) to each patch of each image of `f` [B*P, D],
    /// searching class `classes[b]` for image b. Returns the global row indices.
    fn nearest_rows(&self, f: &Tensor, classes: &[usize]) -> Result<Tensor> {
        let p = self.patches;
        let mut idx = Vec::with_capacity(classes.len() * p);
        for (b, &c) in classes.iter().enumerate() {
            let fb = f.narrow(0, b * p, p)?;
            let bank = self.normed.narrow(0, c * p, p)?;
            let q = fb
                .matmul(&bank.t()?)?
                .argmax_keepdim(1)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            idx.extend(q.into_iter().map(|q| (c * p) as u32 + q));
        }
        Ok(Tensor::from_vec(idx, classes.len() * p, f.device())?)
    }

    /// The class each image would be assigned at inference (flattened cosine argmax).
    fn choose_classes(&self, f: &Tensor, images: usize) -> Result<Vec<usize>> {
        let p = self.patches;
        let d = f.dim(1)?;
        let c = self.inv_norm.len();
        let ff = f.reshape((images, p * d))?;
        let cf = self.flat.reshape((c, p * d))?;
        let dots = ff.matmul(&cf.t()?)?.to_vec2::<f32>()?;
        Ok(dots
            .iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(k, v)| (k, v * self.inv_norm[k]))
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |best, x| if x.1 > best.1 { x } else { best },
                    )
                    .0
            })
            .collect())
    }
}

/// One labelled set of cached images.
struct Split {
    cache: FeatureCache,
    /// Class index per cached image.
    classes: Vec<usize>,
}

impl Split {
    fn batch(&self, idx: &[usize], dev: &Device) -> Result<Tensor> {
        let (p, d) = (self.cache.patches, self.cache.dim);
        let mut v = Vec::with_capacity(idx.len() * p * d);
        for &i in idx {
            v.extend_from_slice(self.cache.image(i));
        }
        Ok(Tensor::from_vec(v, (idx.len() * p, d), dev)?)
    }
}

/// Image scores (max patch score) of images `idx` of `split`, in inference mode.
fn image_scores(
    params: &mut Params,
    bank: &CenterBank,
    split: &Split,
    dev: &Device,
) -> Result<Vec<f32>> {
    let p = split.cache.patches;
    let mut out = Vec::new();
    let all: Vec<usize> = (0..split.cache.count).collect();
    for chunk in all.chunks(8) {
        let x = split.batch(chunk, dev)?;
        let f = params.adapt(&x)?;
        let classes = bank.choose_classes(&f, chunk.len())?;
        let rows = bank.nearest_rows(&f, &classes)?;
        let m = bank.flat.index_select(&rows, 0)?;
        let input = Tensor::cat(&[&f, &f.sub(&m)?], 1)?;
        let s = params
            .score_logits(&input, false)?
            .reshape((chunk.len(), p))?
            .max_keepdim(1)?;
        out.extend(
            candle_nn::ops::sigmoid(&s)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// Everything a run needs to continue after an interruption.
#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointState {
    next_epoch: usize,
    rng_state: (u64, u64),
    adaptor_step: i32,
    scorer_step: i32,
    history: Vec<EpochRecord>,
    best_epoch: Option<usize>,
    best_auroc: Option<f64>,
    /// The noise sigma in use (fixed at the start of the run).
    #[serde(default)]
    noise_sigma: Option<f64>,
}

fn sha_of_sources(paths: &[PathBuf], root: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in paths {
        let rel = p.strip_prefix(root).unwrap_or(p);
        h.update(rel.to_string_lossy().as_bytes());
        h.update(
            sha256_file(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .as_bytes(),
        );
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The seeded per-class hold-out of good training images: (training, validation) paths
/// per class. `cras calibrate` calls it with the bundle's recorded seed and fraction to
/// find the same validation images.
pub fn holdout_split(
    classes: &[ClassData],
    seed: u64,
    fraction: f64,
) -> Result<Vec<(Vec<PathBuf>, Vec<PathBuf>)>> {
    let mut rng = Rng::new(seed ^ 0x484f_4c44_4f55_5421);
    let mut out = Vec::new();
    for c in classes {
        if c.train_good.len() < 2 {
            bail!(
                "class `{}` has {} training images; at least 2 are needed",
                c.name,
                c.train_good.len()
            );
        }
        let mut imgs = c.train_good.clone();
        rng.shuffle(&mut imgs);
        let n_val = if fraction > 0.0 {
            ((imgs.len() as f64 * fraction).round() as usize).clamp(1, imgs.len() - 1)
        } else {
            0
        };
        let train = imgs.split_off(n_val);
        out.push((train, imgs));
    }
    Ok(out)
}

/// Runs training and writes the bundle.
pub fn train(
    o: &TrainOptions,
    classes: &[ClassData],
    interrupted: Arc<AtomicBool>,
) -> Result<Bundle> {
    let dev = o.device.open()?;
    let d = o.embed_dim;
    if d < 2 || !d.is_multiple_of(2) {
        bail!("--embed-dim must be an even number >= 2");
    }
    if o.batch == 0 || o.epochs == 0 {
        bail!("--batch and --epochs must be at least 1");
    }
    std::fs::create_dir_all(&o.work)
        .with_context(|| format!("cannot create work folder {}", o.work.display()))?;
    let backbone = Backbone::load(o.backbone, &o.backbone_weights)?;
    let (h, w) = (o.input.height, o.input.width);
    let ((ha, wa), _) = backbone.stage_sizes(h, w);
    let p = ha * wa;

    // Split the good training images: a seeded, per-class validation hold-out.
    let mut rng = Rng::new(o.seed);
    let mut train_src = Vec::new();
    let mut train_cls = Vec::new();
    let mut val_src = Vec::new();
    let mut val_cls = Vec::new();
    let mut per_class = BTreeMap::new();
    for (ci, (c, (train, val))) in classes
        .iter()
        .zip(holdout_split(classes, o.seed, o.val_fraction)?)
        .enumerate()
    {
        train_src.extend(train.into_iter().map(Source::File));
        train_cls.resize(train_src.len(), ci);
        val_src.extend(val.into_iter().map(Source::File));
        val_cls.resize(val_src.len(), ci);
        per_class.insert(c.name.clone(), c.train_good.len());
    }
    // Validation positives: every validation image again, with a seeded synthetic defect.
    let n_val_good = val_src.len();
    let positives: Vec<(Source, usize)> = val_src
        .iter()
        .zip(&val_cls)
        .enumerate()
        .map(|(k, (s, c))| {
            (
                Source::WithDefect(
                    s.path().to_path_buf(),
                    o.seed.wrapping_mul(1_000_003).wrapping_add(k as u64),
                    (o.val_defect_strength.clamp(0.0, 1.0) * 100.0).round() as u8,
                    o.val_defects,
                ),
                *c,
            )
        })
        .collect();
    for (s, c) in positives {
        val_src.push(s);
        val_cls.push(c);
    }
    tracing::info!(
        "{} classes; {} training and {} validation images (+{} with synthetic defects); {} patches x {} dims per image",
        classes.len(),
        train_src.len(),
        n_val_good,
        n_val_good,
        p,
        d
    );

    // Embeddings, cached.
    let graph = embedding_graph(&backbone, h, w, o.pre_dim, d)?;
    let mut engine = EngineKind::Onnxruntime.load(&graph, &o.engine_options)?;
    let weights_sha = sha256_file(&o.backbone_weights)?;
    let model_key = format!("{}:{weights_sha}:{}:{d}", o.backbone.name(), o.pre_dim);
    let tkey = features::cache_key(&model_key, &o.input, &train_src);
    let (tcache, tkept) = features::extract(
        engine.as_mut(),
        &train_src,
        &o.input,
        p,
        d,
        8,
        &o.work.join("train.features"),
        tkey,
        "train",
    )?;
    let vkey = features::cache_key(&model_key, &o.input, &val_src);
    let (vcache, vkept) = features::extract(
        engine.as_mut(),
        &val_src,
        &o.input,
        p,
        d,
        8,
        &o.work.join("val.features"),
        vkey,
        "validation",
    )?;
    drop(engine);
    let train_split = Split {
        cache: tcache,
        classes: tkept.iter().map(|&i| train_cls[i]).collect(),
    };
    let val_labels: Vec<bool> = vkept.iter().map(|&i| i >= n_val_good).collect();
    let val_split = Split {
        cache: vcache,
        classes: vkept.iter().map(|&i| val_cls[i]).collect(),
    };
    for (ci, c) in classes.iter().enumerate() {
        if !train_split.classes.contains(&ci) {
            bail!("class `{}` has no readable training image left", c.name);
        }
    }

    // Parameters, then the centers from the freshly initialised adaptor.
    let mut params = Params::init(d, &mut rng, &dev)?;
    let mut adam_a = Adam::new(&params.adaptor_vars(), o.adaptor_lr, 0.01, true)?;
    let mut adam_s = Adam::new(&params.scorer_vars(), o.scorer_lr, 1e-5, false)?;
    let ckpt_path = o.work.join("checkpoint.safetensors");
    let state_path = o.work.join("checkpoint.json");
    let centers_path = o.work.join("centers.safetensors");
    let mut state = CheckpointState {
        next_epoch: 0,
        rng_state: (0, 0),
        adaptor_step: 0,
        scorer_step: 0,
        history: Vec::new(),
        best_epoch: None,
        best_auroc: None,
        noise_sigma: None,
    };
    let mut best: Option<BTreeMap<String, WTensor>> = None;
    let nclass = classes.len();
    let centers_data: Vec<f32> = if o.resume && state_path.is_file() {
        let text = std::fs::read_to_string(&state_path)?;
        state = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a checkpoint state", state_path.display()))?;
        let sd = StateDict::load(&ckpt_path)?;
        params.restore(&sd.strip_prefix("current.").tensors, &dev)?;
        if state.best_epoch.is_some() {
            best = Some(sd.strip_prefix("best.").tensors);
        }
        for (opt, prefix) in [(&mut adam_a, "adam_a."), (&mut adam_s, "adam_s.")] {
            for (i, mo) in opt.moments.iter_mut().enumerate() {
                let m = sd.get(&format!("{prefix}{i}.m"), mo.m.dims())?;
                let v = sd.get(&format!("{prefix}{i}.v"), mo.v.dims())?;
                mo.m = Tensor::from_vec(m.to_vec(), mo.m.dims(), &dev)?;
                mo.v = Tensor::from_vec(v.to_vec(), mo.v.dims(), &dev)?;
            }
        }
        adam_a.step = state.adaptor_step;
        adam_s.step = state.scorer_step;
        rng.set_state(state.rng_state);
        tracing::info!(
            "resuming at epoch {} from {}",
            state.next_epoch + 1,
            o.work.display()
        );
        let c = StateDict::load(&centers_path)?;
        c.get("centers", &[nclass, p, d])?.to_vec()
    } else {
        if o.resume {
            tracing::warn!(
                "--resume: no checkpoint in {}; starting afresh",
                o.work.display()
            );
        }
        let mut sums = vec![0f64; nclass * p * d];
        let mut counts = vec![0usize; nclass];
        // Spread of the adapted features, to put the noise level in proportion.
        let (mut dim_sum, mut dim_sq) = (vec![0f64; d], vec![0f64; d]);
        let all: Vec<usize> = (0..train_split.cache.count).collect();
        for chunk in all.chunks(16) {
            let f = params
                .adapt(&train_split.batch(chunk, &dev)?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (k, &i) in chunk.iter().enumerate() {
                let c = train_split.classes[i];
                counts[c] += 1;
                for (s, v) in sums[c * p * d..(c + 1) * p * d]
                    .iter_mut()
                    .zip(&f[k * p * d..(k + 1) * p * d])
                {
                    *s += *v as f64;
                }
            }
            for (j, v) in f.iter().enumerate() {
                dim_sum[j % d] += *v as f64;
                dim_sq[j % d] += (*v as f64).powi(2);
            }
        }
        let rows = (train_split.cache.count * p) as f64;
        let mean_std = (0..d)
            .map(|j| {
                (dim_sq[j] / rows - (dim_sum[j] / rows).powi(2))
                    .max(0.0)
                    .sqrt()
            })
            .sum::<f64>()
            / d as f64;
        let sigma = o
            .noise_relative
            .map(|r| r * mean_std)
            .unwrap_or(o.noise_std);
        state.noise_sigma = Some(sigma);
        tracing::info!(
            "adapted features at initialisation: mean per-dimension std {mean_std:.4}; noise sigma {sigma:.5} is {:.1}% of it",
            100.0 * sigma / mean_std.max(f64::MIN_POSITIVE)
        );
        let data: Vec<f32> = sums
            .iter()
            .enumerate()
            .map(|(i, s)| (s / counts[i / (p * d)] as f64) as f32)
            .collect();
        let mut t = BTreeMap::new();
        t.insert(
            "centers".to_string(),
            WTensor::f32(vec![nclass, p, d], data.clone()),
        );
        crate::weights::save_safetensors(&t, &centers_path)?;
        data
    };
    let bank = CenterBank::new(centers_data.clone(), nclass, p, d, &dev)?;
    let sigma = state.noise_sigma.unwrap_or(o.noise_std);

    let save_checkpoint = |params: &Params,
                           adam_a: &Adam,
                           adam_s: &Adam,
                           state: &CheckpointState,
                           best: &Option<BTreeMap<String, WTensor>>|
     -> Result<()> {
        let mut t: BTreeMap<String, WTensor> = params
            .snapshot()?
            .into_iter()
            .map(|(k, v)| (format!("current.{k}"), v))
            .collect();
        if let Some(b) = best {
            t.extend(b.iter().map(|(k, v)| (format!("best.{k}"), v.clone())));
        }
        for (opt, prefix) in [(adam_a, "adam_a."), (adam_s, "adam_s.")] {
            for (i, mo) in opt.moments.iter().enumerate() {
                for (name, tensor) in [("m", &mo.m), ("v", &mo.v)] {
                    t.insert(
                        format!("{prefix}{i}.{name}"),
                        WTensor::f32(
                            tensor.dims().to_vec(),
                            tensor.flatten_all()?.to_vec1::<f32>()?,
                        ),
                    );
                }
            }
        }
        let tmp = ckpt_path.with_extension("part");
        crate::weights::save_safetensors(&t, &tmp)?;
        std::fs::rename(&tmp, &ckpt_path)?;
        let tmp = state_path.with_extension("part");
        std::fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
        std::fs::rename(&tmp, &state_path)?;
        Ok(())
    };

    let n_train = train_split.cache.count;
    let steps_per_epoch = n_train.div_ceil(o.batch);
    for epoch in state.next_epoch..o.epochs {
        let t0 = Instant::now();
        let bar = ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix:>4} [{bar:30}] {pos}/{len} steps, {msg}, eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, o.epochs));
        let mut order: Vec<usize> = (0..n_train).collect();
        rng.shuffle(&mut order);
        let (mut loss_sum, mut loss_n) = (0.0, 0usize);
        let (mut p_normal, mut p_synth) = (0.0, 0.0);
        for idx in order.chunks(o.batch) {
            let x = train_split.batch(idx, &dev)?;
            let cls: Vec<usize> = idx.iter().map(|&i| train_split.classes[i]).collect();
            let f = params.adapt(&x)?;
            let fd = f.detach();
            let rows = bank.nearest_rows(&fd, &cls)?;
            let m = bank.flat.index_select(&rows, 0)?;
            let rows_n = idx.len() * p;
            // Distance-guided noise: a_p = |n_p| / |f_p - m_p|, normalised by its batch
            // mean and shrunk towards 1 by k; the noise is a constant.
            let dist = fd
                .sub(&m)?
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .affine(1.0, 1e-12)?;
            let noise: Vec<f32> = (0..rows_n * d)
                .map(|_| (rng.normal() * sigma) as f32)
                .collect();
            let noise = Tensor::from_vec(noise, (rows_n, d), &dev)?;
            let a = noise.sqr()?.sum_keepdim(1)?.sqrt()?.div(&dist)?;
            let a = a
                .broadcast_div(&a.mean_all()?)?
                .affine(o.noise_k, 1.0 - o.noise_k)?;
            let g = f.add(&noise.broadcast_mul(&a)?)?;
            let normal = Tensor::cat(&[&f, &f.sub(&m)?], 1)?;
            let synth = Tensor::cat(&[&g, &g.sub(&m)?], 1)?;
            let z = params.score_logits(&Tensor::cat(&[&normal, &synth], 0)?, true)?;
            let zn = z.narrow(0, 0, rows_n)?;
            let zs = z.narrow(0, rows_n, rows_n)?;
            // BCE with logits: normal -> 0 is softplus(z), synthetic -> 1 is softplus(-z).
            let softplus = |t: &Tensor| -> Result<Tensor> {
                Ok(t.relu()?
                    .add(&t.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?)
            };
            let loss = softplus(&zn)?
                .mean_all()?
                .add(&softplus(&zs.neg()?)?.mean_all()?)?;
            let grads = loss.backward()?;
            adam_a.apply(&params.adaptor_vars(), &grads)?;
            adam_s.apply(&params.scorer_vars(), &grads)?;
            let l = loss.to_scalar::<f32>()? as f64;
            loss_sum += l * idx.len() as f64;
            loss_n += idx.len();
            p_normal += candle_nn::ops::sigmoid(&zn)?
                .lt(0.5)?
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()? as f64
                * idx.len() as f64;
            p_synth += candle_nn::ops::sigmoid(&zs)?
                .ge(0.5)?
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()? as f64
                * idx.len() as f64;
            bar.set_message(format!(
                "loss {:.4}, normal ok {:.0}%, synthetic ok {:.0}%",
                loss_sum / loss_n as f64,
                100.0 * p_normal / loss_n as f64,
                100.0 * p_synth / loss_n as f64
            ));
            bar.inc(1);
            if interrupted.load(Ordering::SeqCst) {
                break;
            }
        }
        bar.finish_and_clear();
        if interrupted.load(Ordering::SeqCst) {
            // The partial epoch is discarded: the checkpoint holds the last full epoch.
            state.rng_state = rng.state();
            bail!(
                "interrupted during epoch {}; the last completed epoch is saved in {}: continue with --resume",
                epoch + 1,
                o.work.display()
            );
        }
        let val_auroc = if val_split.cache.count > 0 {
            let scores = image_scores(&mut params, &bank, &val_split, &dev)?;
            crate::metrics::roc_auc(&scores, &val_labels)
        } else {
            None
        };
        let loss = loss_sum / loss_n.max(1) as f64;
        let secs = t0.elapsed().as_secs_f64();
        let improved = match (val_auroc, state.best_auroc) {
            (Some(a), Some(b)) => a > b,
            (Some(_), None) => true,
            (None, _) => true, // no validation: the last epoch is kept
        };
        if improved {
            state.best_auroc = val_auroc;
            state.best_epoch = Some(epoch + 1);
            best = Some(params.snapshot()?);
        }
        eprintln!(
            "epoch {:>3}/{}: loss {loss:.4}, validation image AUROC {}, {:.0}% / {:.0}% of normal / synthetic patches on the right side, {secs:.1} s ({:.1} images/s){}",
            epoch + 1,
            o.epochs,
            val_auroc
                .map(|a| format!("{a:.4}"))
                .unwrap_or_else(|| "n/a".into()),
            100.0 * p_normal / loss_n.max(1) as f64,
            100.0 * p_synth / loss_n.max(1) as f64,
            n_train as f64 / secs,
            if improved { " *" } else { "" }
        );
        state.history.push(EpochRecord {
            epoch: epoch + 1,
            loss,
            validation_auroc: val_auroc,
            seconds: secs,
        });
        state.next_epoch = epoch + 1;
        state.adaptor_step = adam_a.step;
        state.scorer_step = adam_s.step;
        state.rng_state = rng.state();
        save_checkpoint(&params, &adam_a, &adam_s, &state, &best)?;
    }

    // Export the selected epoch.
    let selected = best.context("no epoch completed")?;
    let head = CrasHead::from_state_dict(&StateDict {
        tensors: selected,
        source: o.work.join("checkpoint.safetensors"),
    })?;
    let centers = Centers {
        classes: nclass,
        patches: p,
        dim: d,
        data: centers_data,
    };
    let model = CrasModel {
        backbone: &backbone,
        head: &head,
        centers: &centers,
        height: h,
        width: w,
        pre_dim: o.pre_dim,
    };
    let onnx = model.to_onnx(GraphOptions::default())?;
    let train_paths: Vec<PathBuf> = classes.iter().flat_map(|c| c.train_good.clone()).collect();
    let mut options = BTreeMap::new();
    for (k, v) in [
        ("epochs", o.epochs.to_string()),
        ("batch", o.batch.to_string()),
        ("adaptor_lr", o.adaptor_lr.to_string()),
        ("scorer_lr", o.scorer_lr.to_string()),
        ("noise_std", sigma.to_string()),
        (
            "noise_relative",
            o.noise_relative
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("noise_k", o.noise_k.to_string()),
        ("val_fraction", o.val_fraction.to_string()),
        ("val_defect_strength", o.val_defect_strength.to_string()),
        ("val_defects", o.val_defects.names()),
        ("embed_dim", d.to_string()),
        ("pretrain_embed_dim", o.pre_dim.to_string()),
        ("device", o.device.to_string()),
    ] {
        options.insert(k.to_string(), v);
    }
    let selection = match state.best_auroc {
        Some(a) => format!(
            "epoch {} of {}: best image AUROC ({a:.4}) on {} held-out good images vs the same images with synthetic defects",
            state.best_epoch.unwrap_or(0),
            o.epochs,
            n_val_good
        ),
        None => format!("the last epoch ({}): no validation images", o.epochs),
    };
    tracing::info!("selected {selection}");
    let mut sources = BTreeMap::new();
    sources.insert(
        "backbone".to_string(),
        SourceFile {
            file: o
                .backbone_weights
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: weights_sha,
        },
    );
    let meta = BundleMeta {
        format_version: FORMAT_VERSION,
        classes: classes.iter().map(|c| c.name.clone()).collect(),
        input: o.input.clone(),
        backbone: o.backbone.name().to_string(),
        embed_dim: d,
        patch_grid: [ha, wa],
        thresholds: BTreeMap::new(),
        provenance: Provenance {
            created_by: format!("cras {} train", env!("CARGO_PKG_VERSION")),
            created_at: crate::import::unix_now(),
            sources,
            notes: BTreeMap::new(),
            training: Some(TrainingRecord {
                dataset: o.data.display().to_string(),
                data_sha256: sha_of_sources(&train_paths, &o.data)?,
                train_images: per_class,
                validation_images: n_val_good,
                seed: o.seed,
                options,
                epochs: state.history.clone(),
                selected_epoch: state.best_epoch.unwrap_or(o.epochs),
                selection,
            }),
        },
        onnx_sha256: String::new(),
    };
    let bundle = Bundle::write(&o.out, meta, &onnx)?;
    tracing::info!(
        "bundle written to {} (model id {})",
        o.out.display(),
        bundle.model_id()
    );
    Ok(bundle)
}
