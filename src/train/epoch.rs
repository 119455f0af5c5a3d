//! The method's training steps (docs/architecture.md, "Training") and the validation score that
//! chooses the epoch. A step: adapt a batch of cached embeddings, find each patch's
//! nearest center of its class, synthesise anomalies with distance-guided Gaussian noise
//! on the adapted features, score normal and synthetic patches (with their residuals to
//! the centers) in one BatchNorm batch, and take one BCE step on adaptor and scorer.

use super::adam::Adam;
use super::centers::CenterBank;
use super::data::Split;
use super::params::Params;
use super::step::{Scratch, adapt, fit, forward_backward, scale_noise};
use crate::model::score::{HostMap, ImageScore};
use crate::rng::Rng;
use candle_core::{DType, Device, Result, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Images per call when scoring the validation set.
const VALIDATION_BATCH: usize = 8;

/// The state the steps change, and what they need to take one.
pub(super) struct Trainer {
    pub params: Params,
    /// AdamW on the adaptor.
    pub adaptor_opt: Adam,
    /// Adam with L2 on the scorer.
    pub scorer_opt: Adam,
    pub bank: CenterBank,
    pub rng: Rng,
    pub dev: Device,
    /// Standard deviation of the synthetic-anomaly noise.
    pub sigma: f64,
    /// Shrink of the distance-guided noise scale towards 1.
    pub noise_k: f64,
    pub batch: usize,
    /// The CPU step's buffers, reused from step to step.
    pub scratch: Scratch,
    /// How validation scores an image, as the exported graph will.
    pub validation: ValidationScore,
}

/// The image score validation takes: the bundle's rule, with the map stage for the
/// patch grid and the input size worked out once.
pub(super) struct ValidationScore {
    pub rule: ImageScore,
    pub map: HostMap,
}

/// What one epoch did.
pub(super) struct EpochStats {
    /// Mean BCE over the epoch's images.
    pub loss: f64,
    /// Share of normal patches scored below 0.5.
    pub normal_ok: f64,
    /// Share of synthetic patches scored at or above 0.5.
    pub synthetic_ok: f64,
    /// The epoch stopped early on a signal; its steps do not count.
    pub interrupted: bool,
}

/// Running sums of one epoch.
#[derive(Default)]
struct Tally {
    loss: f64,
    normal_ok: f64,
    synthetic_ok: f64,
    images: usize,
}

impl Tally {
    fn mean(&self, v: f64) -> f64 {
        v / self.images.max(1) as f64
    }
}

/// BCE with logits: normal -> 0 is softplus(z), synthetic -> 1 is softplus(-z).
fn softplus(t: &Tensor) -> Result<Tensor> {
    t.relu()?
        .add(&t.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)
}

/// The step's loss as a candle graph, from the adapted features `f` ([R, D], still
/// attached to the adaptor), each row's nearest center `m` and the scaled synthetic
/// noise (constants): returns the loss and the normal and synthetic logits.
pub(super) fn graph_loss(
    params: &mut Params,
    f: &Tensor,
    m: &Tensor,
    noise: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rows_n = f.dim(0)?;
    let g = f.add(noise)?;
    let normal = Tensor::cat(&[f, &f.sub(m)?], 1)?;
    let synth = Tensor::cat(&[&g, &g.sub(m)?], 1)?;
    let z = params.score_logits(&Tensor::cat(&[&normal, &synth], 0)?, true)?;
    let zn = z.narrow(0, 0, rows_n)?;
    let zs = z.narrow(0, rows_n, rows_n)?;
    let loss = softplus(&zn)?
        .mean_all()?
        .add(&softplus(&zs.neg()?)?.mean_all()?)?;
    Ok((loss, zn, zs))
}

/// Share of `probabilities` on the right side of 0.5 (`above`: synthetic).
fn share_right(logits: &Tensor, above: bool) -> Result<f64> {
    let p = candle_nn::ops::sigmoid(logits)?;
    let right = if above { p.ge(0.5)? } else { p.lt(0.5)? };
    Ok(right.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()? as f64)
}

fn progress_bar(steps: usize, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {prefix:>4} [{bar:30}] {pos}/{len} steps, {msg}, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar
}

impl Trainer {
    /// One pass over `train` in a seeded random order, with a progress bar. Stops after
    /// the current step when `interrupted` is set.
    pub fn epoch(
        &mut self,
        train: &Split,
        epoch: usize,
        epochs: usize,
        interrupted: &AtomicBool,
    ) -> Result<EpochStats> {
        let n = train.cache.count;
        let bar = progress_bar(n.div_ceil(self.batch), epoch, epochs);
        let mut order: Vec<usize> = (0..n).collect();
        self.rng.shuffle(&mut order);
        let mut tally = Tally::default();
        for idx in order.chunks(self.batch) {
            self.step(train, idx, &mut tally)?;
            bar.set_message(format!(
                "loss {:.4}, normal ok {:.0}%, synthetic ok {:.0}%",
                tally.mean(tally.loss),
                100.0 * tally.mean(tally.normal_ok),
                100.0 * tally.mean(tally.synthetic_ok)
            ));
            bar.inc(1);
            if interrupted.load(Ordering::SeqCst) {
                break;
            }
        }
        bar.finish_and_clear();
        Ok(EpochStats {
            loss: tally.mean(tally.loss),
            normal_ok: tally.mean(tally.normal_ok),
            synthetic_ok: tally.mean(tally.synthetic_ok),
            interrupted: interrupted.load(Ordering::SeqCst),
        })
    }

    /// One optimisation step on images `idx` of `train`: written out on the CPU
    /// (train/step.rs), as a candle graph elsewhere.
    fn step(&mut self, train: &Split, idx: &[usize], tally: &mut Tally) -> Result<()> {
        if self.dev.is_cpu() {
            self.step_cpu(train, idx, tally)
        } else {
            self.step_graph(train, idx, tally)
        }
    }

    /// The step of [`Self::step_graph`], with the same random draws in the same order,
    /// computed by train/step.rs.
    fn step_cpu(&mut self, train: &Split, idx: &[usize], tally: &mut Tally) -> Result<()> {
        let (p, d) = (train.cache.patches, train.cache.dim);
        let r = idx.len() * p;
        let host = self.params.host()?;
        let s = &mut self.scratch;
        let x = fit(&mut s.x, r * d);
        for (rows, &i) in x.chunks_exact_mut(p * d).zip(idx) {
            rows.copy_from_slice(train.cache.image(i));
        }
        let f = &mut fit(&mut s.fg, 2 * r * d)[..r * d];
        adapt(&host, x, f)?;
        let cls: Vec<usize> = idx.iter().map(|&i| train.classes[i]).collect();
        let rows = self
            .bank
            .nearest(&Tensor::from_slice(f, (r, d), &self.dev)?, &cls)?;
        let m = fit(&mut s.m, r * d);
        for (center, &row) in m.chunks_exact_mut(d).zip(&rows) {
            center.copy_from_slice(self.bank.center(row as usize));
        }
        let noise = fit(&mut s.noise, r * d);
        for v in noise.iter_mut() {
            *v = (self.rng.normal() * self.sigma) as f32;
        }
        scale_noise(f, m, noise, d, self.noise_k);
        let out = forward_backward(&host, r, s)?;
        self.params.update_running(&out.stats)?;
        let as_tensors = |vars: &[&candle_core::Var], grads: Vec<Vec<f32>>| {
            vars.iter()
                .zip(grads)
                .map(|(v, g)| Ok(Some(Tensor::from_vec(g, v.shape(), &self.dev)?)))
                .collect::<Result<Vec<_>>>()
        };
        let adaptor = self.params.adaptor_vars();
        let grads = as_tensors(&adaptor, vec![out.grads.wa, out.grads.ba])?;
        self.adaptor_opt.apply_grads(&adaptor, &grads)?;
        let scorer = self.params.scorer_vars();
        let grads = as_tensors(&scorer, out.grads.scorer.into())?;
        self.scorer_opt.apply_grads(&scorer, &grads)?;
        let images = idx.len() as f64;
        tally.loss += out.loss * images;
        tally.normal_ok += out.normal_ok * images;
        tally.synthetic_ok += out.synthetic_ok * images;
        tally.images += idx.len();
        Ok(())
    }

    /// One optimisation step on images `idx` of `train` as a candle graph with autograd.
    fn step_graph(&mut self, train: &Split, idx: &[usize], tally: &mut Tally) -> Result<()> {
        let (p, d) = (train.cache.patches, train.cache.dim);
        let x = train.batch(idx, &self.dev)?;
        let cls: Vec<usize> = idx.iter().map(|&i| train.classes[i]).collect();
        let f = self.params.adapt(&x)?;
        let fd = f.detach();
        let rows = self.bank.nearest_rows(&fd, &cls)?;
        let m = self.bank.flat.index_select(&rows, 0)?;
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
            .map(|_| (self.rng.normal() * self.sigma) as f32)
            .collect();
        let noise = Tensor::from_vec(noise, (rows_n, d), &self.dev)?;
        let a = noise.sqr()?.sum_keepdim(1)?.sqrt()?.div(&dist)?;
        let a = a
            .broadcast_div(&a.mean_all()?)?
            .affine(self.noise_k, 1.0 - self.noise_k)?;
        let (loss, zn, zs) = graph_loss(&mut self.params, &f, &m, &noise.broadcast_mul(&a)?)?;
        let grads = loss.backward()?;
        self.adaptor_opt
            .apply(&self.params.adaptor_vars(), &grads)?;
        self.scorer_opt.apply(&self.params.scorer_vars(), &grads)?;
        let images = idx.len() as f64;
        tally.loss += loss.to_scalar::<f32>()? as f64 * images;
        tally.normal_ok += share_right(&zn, false)? * images;
        tally.synthetic_ok += share_right(&zs, true)? * images;
        tally.images += idx.len();
        Ok(())
    }

    /// Image AUROC of the current weights on the validation set (None without one).
    pub fn validate(&mut self, val: &Split, labels: &[bool]) -> Result<Option<f64>> {
        if val.cache.count == 0 {
            return Ok(None);
        }
        let scores = self.image_scores(val)?;
        Ok(crate::metrics::roc_auc(&scores, labels))
    }

    /// Image scores of every image of `split` under the bundle's rule, in inference
    /// mode: the class is chosen as inference chooses it.
    fn image_scores(&mut self, split: &Split) -> Result<Vec<f32>> {
        let p = split.cache.patches;
        let mut out = Vec::new();
        let all: Vec<usize> = (0..split.cache.count).collect();
        for chunk in all.chunks(VALIDATION_BATCH) {
            let x = split.batch(chunk, &self.dev)?;
            let f = self.params.adapt(&x)?;
            let classes = self.bank.choose_classes(&f, chunk.len())?;
            let rows = self.bank.nearest_rows(&f, &classes)?;
            let m = self.bank.flat.index_select(&rows, 0)?;
            let input = Tensor::cat(&[&f, &f.sub(&m)?], 1)?;
            let s = self
                .params
                .score_logits(&input, false)?
                .reshape((chunk.len(), p))?;
            let probs = candle_nn::ops::sigmoid(&s)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let v = &self.validation;
            let scores: Vec<f32> = probs
                .par_chunks(p)
                .map(|patches| v.rule.of_patches(patches, &v.map))
                .collect();
            out.extend(scores);
        }
        Ok(out)
    }
}
