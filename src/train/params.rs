//! The trainable network: the adaptor (one linear layer) and the scorer (two
//! Linear-BatchNorm-LeakyReLU blocks and a bias-free linear tail), in PyTorch layouts and
//! CRAS state-dict names, initialised as the reference does (Xavier normal weights,
//! uniform biases), with the forward passes training and validation use.

use super::TrainError;
use crate::rng::Rng;
use crate::weights::Tensor as WTensor;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::BTreeMap;

pub(super) const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
pub(super) const LEAKY: f64 = 0.2;

/// `v` ([C]) repeated on every row ([N, C]) as a product with a ones column, so that its
/// gradient is a matrix product too rather than a slow reduction over rows.
pub(super) fn rows_of(ones_col: &Tensor, v: &Tensor) -> Result<Tensor> {
    ones_col.matmul(&v.unsqueeze(0)?)
}

/// Trainable parameters, PyTorch layouts ([out, in] weights).
pub(super) struct Params {
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

/// The trainable parameters copied out of the variables for the written-out CPU step
/// (train/step.rs), in the same layouts.
pub(super) struct HostParams {
    pub dim: usize,
    pub wa: Vec<f32>,
    pub ba: Vec<f32>,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub g1: Vec<f32>,
    pub beta1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
    pub g2: Vec<f32>,
    pub beta2: Vec<f32>,
    pub w3: Vec<f32>,
}

fn host(v: &Var) -> Result<Vec<f32>> {
    v.as_tensor().flatten_all()?.to_vec1::<f32>()
}

fn xavier(rng: &mut Rng, out: usize, inp: usize, dev: &Device) -> Result<Var> {
    let std = (2.0 / (out + inp) as f64).sqrt();
    let v: Vec<f32> = (0..out * inp)
        .map(|_| (rng.normal() * std) as f32)
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, (out, inp), dev)?)
}

fn bias(rng: &mut Rng, out: usize, fan_in: usize, dev: &Device) -> Result<Var> {
    let b = 1.0 / (fan_in as f64).sqrt();
    let v: Vec<f32> = (0..out).map(|_| rng.range(-b, b) as f32).collect();
    Var::from_tensor(&Tensor::from_vec(v, out, dev)?)
}

/// A running statistic moved towards a batch's: `(1 - momentum) running + momentum batch`.
fn blend(running: &Tensor, batch: &Tensor) -> Result<Tensor> {
    running
        .affine(1.0 - BN_MOMENTUM, 0.0)?
        .add(&batch.affine(BN_MOMENTUM, 0.0)?)
}

fn constant(v: f32, n: usize, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(vec![v; n], n, dev)
}

impl Params {
    pub fn init(d: usize, rng: &mut Rng, dev: &Device) -> Result<Params> {
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

    /// A copy of the weights for the CPU step.
    pub fn host(&self) -> Result<HostParams> {
        Ok(HostParams {
            dim: self.adaptor_b.as_tensor().dim(0)?,
            wa: host(&self.adaptor_w)?,
            ba: host(&self.adaptor_b)?,
            w1: host(&self.w1)?,
            b1: host(&self.b1)?,
            g1: host(&self.g1)?,
            beta1: host(&self.beta1)?,
            w2: host(&self.w2)?,
            b2: host(&self.b2)?,
            g2: host(&self.g2)?,
            beta2: host(&self.beta2)?,
            w3: host(&self.w3)?,
        })
    }

    /// Moves the BatchNorm running statistics of both layers towards a batch's (mean,
    /// unbiased variance), as train mode does.
    pub fn update_running(&mut self, stats: &[(Vec<f32>, Vec<f32>); 2]) -> Result<()> {
        let dev = self.rm1.device().clone();
        let running = [
            (&mut self.rm1, &mut self.rv1),
            (&mut self.rm2, &mut self.rv2),
        ];
        for ((rm, rv), (m, v)) in running.into_iter().zip(stats) {
            *rm = blend(rm, &Tensor::from_slice(m, m.len(), &dev)?)?;
            *rv = blend(rv, &Tensor::from_slice(v, v.len(), &dev)?)?;
        }
        Ok(())
    }

    pub fn adaptor_vars(&self) -> Vec<&Var> {
        vec![&self.adaptor_w, &self.adaptor_b]
    }

    pub fn scorer_vars(&self) -> Vec<&Var> {
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
    pub fn named(&self) -> Vec<(&'static str, Tensor)> {
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

    pub fn snapshot(&self) -> Result<BTreeMap<String, WTensor>> {
        let mut out = BTreeMap::new();
        for (name, t) in self.named() {
            let shape = t.dims().to_vec();
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            out.insert(name.to_string(), WTensor::f32(shape, v));
        }
        Ok(out)
    }

    pub fn restore(
        &mut self,
        s: &BTreeMap<String, WTensor>,
        dev: &Device,
        file: &std::path::Path,
    ) -> std::result::Result<(), TrainError> {
        let get = |k: &str| -> std::result::Result<Tensor, TrainError> {
            let bad = |reason: String| TrainError::Checkpoint {
                path: file.to_path_buf(),
                reason,
            };
            let t = s.get(k).ok_or_else(|| bad(format!("lacks {k}")))?;
            let v = t.as_f32().ok_or_else(|| bad(format!("{k} is not float")))?;
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

    pub fn adapt(&self, x: &Tensor) -> Result<Tensor> {
        let ones = Tensor::ones((x.dim(0)?, 1), DType::F32, x.device())?;
        x.matmul(&self.adaptor_w.as_tensor().t()?)?
            .add(&rows_of(&ones, self.adaptor_b.as_tensor())?)
    }

    fn leaky(x: &Tensor) -> Result<Tensor> {
        x.maximum(&x.affine(LEAKY, 0.0)?)
    }

    /// Scorer logits [rows, 1]; train mode uses batch statistics and updates the running ones.
    pub fn score_logits(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
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
            *rm = blend(rm, &m)?;
            *rv = blend(rv, &v)?;
        }
        h.matmul(&self.w3.as_tensor().t()?)
    }
}
