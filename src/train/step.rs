//! The training step on the CPU, written out: the same loss as the candle graph in
//! epoch.rs (which still runs on CUDA and is the reference the tests hold this to), with
//! its backward pass by hand. Two things make it faster than autograd on two cores:
//! element-wise work is fused into a few row-parallel passes over buffers reused from
//! step to step, and the scorer's first layer is split by its two input halves,
//! `W1 [f, f - m] = (W1a + W1b) f - W1b m`, so that the residual is never formed and
//! its products are shared by the normal and the synthetic rows (12 instead of 17
//! products of the size rows x dim x dim per step). Both only reorder sums: the result
//! is the candle graph's up to float rounding (docs/decisions.md, "Training speed").

use super::batchnorm::{Bn, bn_backward, bn_forward, leak};
use super::kernels::{View, column_sums, column_totals, for_row_pairs, for_rows, gemm};
use super::params::HostParams;
use candle_core::Result;
use rayon::prelude::*;

/// Buffers one step works in, kept between steps (sizes for the largest batch).
#[derive(Default)]
pub(super) struct Scratch {
    /// [R, D]: the batch's embeddings.
    pub x: Vec<f32>,
    /// [R, D]: each patch's nearest center.
    pub m: Vec<f32>,
    /// [R, D]: the synthetic noise, scaled.
    pub noise: Vec<f32>,
    /// [2R, D]: the adapted features f (written by the caller, with [`adapt`]), then the
    /// synthetic g; later df in the first half.
    pub fg: Vec<f32>,
    /// [2R, D]: pre-activations of layer 1, then normalised, then their gradient.
    z1: Vec<f32>,
    /// [2R, D]: activations of layer 1, then their gradient.
    h1: Vec<f32>,
    /// [2R, H]: as z1, for layer 2.
    z2: Vec<f32>,
    /// [2R, H]: as h1, for layer 2.
    h2: Vec<f32>,
    /// [2R]: the logits.
    z: Vec<f32>,
    /// [D, D]: W1a + W1b.
    wsum: Vec<f32>,
}

pub(super) fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Gradients of every parameter, in the parameters' layouts.
pub(super) struct Gradients {
    pub wa: Vec<f32>,
    pub ba: Vec<f32>,
    /// In the order of `Params::scorer_vars`.
    pub scorer: [Vec<f32>; 9],
}

/// What one step measured and computed.
pub(super) struct StepOut {
    pub loss: f64,
    /// Share of normal rows with a logit below 0 (probability below 0.5).
    pub normal_ok: f64,
    /// Share of synthetic rows with a logit at or above 0.
    pub synthetic_ok: f64,
    pub grads: Gradients,
    /// Per layer: batch mean and unbiased variance, for the running statistics.
    pub stats: [(Vec<f32>, Vec<f32>); 2],
}

/// log(1 + e^t), stable for large |t|.
fn softplus(t: f32) -> f64 {
    let t = t as f64;
    t.max(0.0) + (-t.abs()).exp().ln_1p()
}

fn sigmoid(t: f32) -> f32 {
    1.0 / (1.0 + (-t).exp())
}

/// The adapted features `x Wa^T + ba` of `x` ([R, D]) into `out` ([R, D]).
pub(super) fn adapt(p: &HostParams, x: &[f32], out: &mut [f32]) -> Result<()> {
    let d = p.dim;
    for_rows(out, d, |_, row| row.copy_from_slice(&p.ba));
    gemm(
        out,
        d,
        View::new(x, x.len() / d, d),
        View::new(&p.wa, d, d).t(),
        true,
        1.0,
    )
}

/// Distance-guided noise: each row of `noise` ([R, D], drawn with sigma) is scaled by
/// a_i = |n_i| / |f_i - m_i|, normalised by its batch mean and shrunk towards 1 by `k`.
pub(super) fn scale_noise(f: &[f32], m: &[f32], noise: &mut [f32], d: usize, k: f64) {
    let a: Vec<f32> = (0..noise.len() / d)
        .into_par_iter()
        .map(|i| {
            let row = i * d..(i + 1) * d;
            let dist = f[row.clone()]
                .iter()
                .zip(&m[row.clone()])
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt()
                + 1e-12;
            noise[row].iter().map(|v| v * v).sum::<f32>().sqrt() / dist
        })
        .collect();
    let mean = (a.iter().map(|v| *v as f64).sum::<f64>() / a.len().max(1) as f64) as f32;
    let (k, keep) = (k as f32, (1.0 - k) as f32);
    for_rows(noise, d, |i, row| {
        let scale = k * (a[i] / mean) + keep;
        for v in row {
            *v *= scale;
        }
    });
}

/// One step's forward and backward pass over `r` rows. The scratch holds the batch's
/// embeddings `x`, the adapted features f (in the first half of `fg`: the caller
/// needs them to find the centers), each row's nearest center `m` and the scaled
/// synthetic noise (see [`scale_noise`]), each [r, D].
pub(super) fn forward_backward(p: &HostParams, r: usize, s: &mut Scratch) -> Result<StepOut> {
    let [bn1, bn2] = forward(p, r, s)?;
    let (loss, normal_ok, synthetic_ok) = bce(&mut s.z[..2 * r]);
    let grads = backward(p, r, s, &bn1, &bn2)?;
    let n = (2 * r) as f32;
    let k = n / (n - 1.0);
    let unbiased = |bn: Bn| {
        let var = bn.var.iter().map(|v| v * k).collect();
        (bn.mean, var)
    };
    Ok(StepOut {
        loss,
        normal_ok,
        synthetic_ok,
        grads,
        stats: [unbiased(bn1), unbiased(bn2)],
    })
}

/// The synthetic rows g = f + noise, then the scorer on [f; g]: leaves the logits in
/// `z` and each layer's normalised values and activations in the scratch.
fn forward(p: &HostParams, r: usize, s: &mut Scratch) -> Result<[Bn; 2]> {
    let (d, h) = (p.dim, p.dim / 2);
    let n = 2 * r;
    let (m, noise) = (&s.m[..r * d], &s.noise[..r * d]);
    let fg = fit(&mut s.fg, n * d);
    let (f, g) = fg.split_at_mut(r * d);
    for_row_pairs(f, d, g, d, |i, fr, gr| {
        let nr = &noise[i * d..(i + 1) * d];
        for j in 0..d {
            gr[j] = fr[j] + nr[j];
        }
    });
    // Layer 1: (W1a + W1b) [f; g] - W1b m + b1, with W1 = [W1a | W1b] ([D, 2D]).
    let wsum = fit(&mut s.wsum, d * d);
    for_rows(wsum, d, |o, row| {
        let w = &p.w1[o * 2 * d..(o + 1) * 2 * d];
        for i in 0..d {
            row[i] = w[i] + w[d + i];
        }
    });
    let z1 = fit(&mut s.z1, n * d);
    let (z1n, z1s) = z1.split_at_mut(r * d);
    let w1b = View::strided(&p.w1[d..], d, d, 2 * d);
    gemm(z1n, d, View::new(m, r, d), w1b.t(), false, -1.0)?;
    for_row_pairs(z1n, d, z1s, d, |_, a, b| {
        for (v, bias) in a.iter_mut().zip(&p.b1) {
            *v += bias;
        }
        b.copy_from_slice(a);
    });
    gemm(
        z1,
        d,
        View::new(fg, n, d),
        View::new(wsum, d, d).t(),
        true,
        1.0,
    )?;
    let h1 = fit(&mut s.h1, n * d);
    let bn1 = bn_forward(z1, h1, d, &p.g1, &p.beta1);
    // Layer 2 and the tail.
    let z2 = fit(&mut s.z2, n * h);
    for_rows(z2, h, |_, row| row.copy_from_slice(&p.b2));
    gemm(
        z2,
        h,
        View::new(h1, n, d),
        View::new(&p.w2, h, d).t(),
        true,
        1.0,
    )?;
    let h2 = fit(&mut s.h2, n * h);
    let bn2 = bn_forward(z2, h2, h, &p.g2, &p.beta2);
    let z = fit(&mut s.z, n);
    for_row_pairs(h2, h, z, 1, |_, hr, zr| {
        zr[0] = hr.iter().zip(&p.w3).map(|(a, b)| a * b).sum();
    });
    Ok([bn1, bn2])
}

/// BCE with logits: normal rows (the first half of `z`) towards 0, synthetic ones
/// towards 1, each half's mean. `z` becomes the loss's gradient; returns the loss and
/// the shares of normal and synthetic rows on the right side of 0.
fn bce(z: &mut [f32]) -> (f64, f64, f64) {
    let r = z.len() / 2;
    let per = r as f64;
    let loss = z[..r].iter().map(|&t| softplus(t)).sum::<f64>() / per
        + z[r..].iter().map(|&t| softplus(-t)).sum::<f64>() / per;
    let normal_ok = z[..r].iter().filter(|&&t| t < 0.0).count() as f64 / per;
    let synthetic_ok = z[r..].iter().filter(|&&t| t >= 0.0).count() as f64 / per;
    for_rows(z, 1, |i, t| {
        t[0] = if i < r {
            sigmoid(t[0]) / r as f32
        } else {
            -sigmoid(-t[0]) / r as f32
        };
    });
    (loss, normal_ok, synthetic_ok)
}

/// The gradients of every parameter from the logits' gradient in `z`, through the
/// buffers the forward pass left (each overwritten by its own gradient on the way).
fn backward(p: &HostParams, r: usize, s: &mut Scratch, bn1: &Bn, bn2: &Bn) -> Result<Gradients> {
    let (d, h) = (p.dim, p.dim / 2);
    let n = 2 * r;
    let (x, m) = (&s.x[..r * d], &s.m[..r * d]);
    let (fg, wsum) = (&mut s.fg[..n * d], &s.wsum[..d * d]);
    let (z1, h1) = (&mut s.z1[..n * d], &mut s.h1[..n * d]);
    let (z2, h2) = (&mut s.z2[..n * h], &mut s.h2[..n * h]);
    let dz = &s.z[..n];
    // Tail and layer 2.
    let dw3 = column_sums::<1>(h2, h, |i, row, acc| {
        for (a, v) in acc.iter_mut().zip(row) {
            a[0] += (dz[i] * v) as f64;
        }
    });
    for_rows(h2, h, |i, row| {
        for (v, w) in row.iter_mut().zip(&p.w3) {
            *v = dz[i] * w * leak(*v > 0.0);
        }
    });
    let (dg2, dbeta2, db2) = bn_backward(z2, h2, h, &p.g2, bn2);
    let mut dw2 = vec![0.0; h * d];
    gemm(
        &mut dw2,
        d,
        View::new(z2, n, h).t(),
        View::new(h1, n, d),
        false,
        1.0,
    )?;
    gemm(
        h1,
        d,
        View::new(z2, n, h),
        View::new(&p.w2, h, d),
        false,
        1.0,
    )?;
    // Layer 1: h1 holds its output's gradient; the sign of the activation's input is
    // recomputed from the normalised values with the forward pass's expression.
    for_row_pairs(h1, d, z1, d, |_, dh, xhat| {
        for j in 0..d {
            dh[j] *= leak(xhat[j] * p.g1[j] + p.beta1[j] > 0.0);
        }
    });
    let (dg1, dbeta1, db1) = bn_backward(z1, h1, d, &p.g1, bn1);
    let mut dw1 = vec![0.0; d * 2 * d];
    gemm(
        &mut dw1,
        2 * d,
        View::new(z1, n, d).t(),
        View::new(fg, n, d),
        false,
        1.0,
    )?;
    // dW1b = dW1a - (dz_normal + dz_synthetic)^T m.
    let (dz1n, dz1s) = z1.split_at_mut(r * d);
    for_row_pairs(dz1n, d, dz1s, d, |_, a, b| {
        for j in 0..d {
            a[j] += b[j];
        }
    });
    for_rows(&mut dw1, 2 * d, |_, row| {
        let (a, b) = row.split_at_mut(d);
        b.copy_from_slice(a);
    });
    gemm(
        &mut dw1[d..],
        2 * d,
        View::new(dz1n, r, d).t(),
        View::new(m, r, d),
        true,
        -1.0,
    )?;

    // The adaptor: df = (dz_normal + dz_synthetic) (W1a + W1b), into the first half of fg.
    let df = &mut fg[..r * d];
    gemm(
        df,
        d,
        View::new(dz1n, r, d),
        View::new(wsum, d, d),
        false,
        1.0,
    )?;
    let mut dwa = vec![0.0; d * d];
    gemm(
        &mut dwa,
        d,
        View::new(df, r, d).t(),
        View::new(x, r, d),
        false,
        1.0,
    )?;
    let dba = column_totals(df, d);

    Ok(Gradients {
        wa: dwa,
        ba: dba.iter().map(|s| *s as f32).collect(),
        scorer: [
            dw1,
            db1,
            dg1,
            dbeta1,
            dw2,
            db2,
            dg2,
            dbeta2,
            dw3.iter().map(|s| s[0] as f32).collect(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::train::epoch::graph_loss;
    use crate::train::params::Params;
    use candle_core::{Device, Tensor};

    fn normal(n: usize, scale: f64, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| (rng.normal() * scale) as f32).collect()
    }

    /// Largest difference, against the reference's largest magnitude.
    fn assert_close(name: &str, got: &[f32], want: &[f32], scale: f32) {
        assert_eq!(got.len(), want.len(), "{name}");
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let size = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        assert!(
            err <= 1e-4 * size.max(scale),
            "{name}: off by {err} against values up to {size}"
        );
    }

    /// One step on `r` rows both ways, with the same parameters and inputs: the loss,
    /// every gradient and the running statistics must agree up to float rounding.
    fn matches_the_graph(r: usize, s: &mut Scratch) {
        let (d, dev) = (16, Device::Cpu);
        let mut graph = Params::init(d, &mut Rng::new(7), &dev).unwrap();
        let mut written = Params::init(d, &mut Rng::new(7), &dev).unwrap();
        let mut rng = Rng::new(r as u64);
        let x = normal(r * d, 2.0, &mut rng);
        let m = normal(r * d, 1.5, &mut rng);
        let noise = normal(r * d, 0.7, &mut rng);

        let tensor = |v: &[f32]| Tensor::from_slice(v, (r, d), &dev).unwrap();
        let f = graph.adapt(&tensor(&x)).unwrap();
        let (loss, _, _) = graph_loss(&mut graph, &f, &tensor(&m), &tensor(&noise)).unwrap();
        let grads = loss.backward().unwrap();

        let host = written.host().unwrap();
        fit(&mut s.x, r * d).copy_from_slice(&x);
        fit(&mut s.m, r * d).copy_from_slice(&m);
        fit(&mut s.noise, r * d).copy_from_slice(&noise);
        adapt(&host, &x, &mut fit(&mut s.fg, 2 * r * d)[..r * d]).unwrap();
        let out = forward_backward(&host, r, s).unwrap();
        written.update_running(&out.stats).unwrap();

        let want_loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (out.loss - want_loss).abs() < 1e-5 * want_loss,
            "{} vs {want_loss}",
            out.loss
        );
        let weight_scale = out.grads.scorer[0]
            .iter()
            .map(|v| v.abs())
            .fold(0.0, f32::max);
        assert!(
            weight_scale > 1e-4,
            "a vanishing gradient would prove nothing"
        );
        let mut vars = graph.adaptor_vars();
        vars.extend(graph.scorer_vars());
        let mut mine = vec![out.grads.wa, out.grads.ba];
        mine.extend(out.grads.scorer);
        for (i, (var, got)) in vars.iter().zip(&mine).enumerate() {
            let want = grads.get(var.as_tensor()).unwrap();
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // The linear biases before BatchNorm have a zero gradient up to rounding;
            // they are held to the scale of the weights' gradients.
            assert_close(&format!("gradient {i}"), got, &want, weight_scale);
        }
        for ((name, a), (_, b)) in written.named().into_iter().zip(graph.named()) {
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(name, &a, &b, 0.0);
        }
    }

    #[test]
    fn the_written_out_step_computes_the_graphs_loss_gradients_and_statistics() {
        let mut s = Scratch::default();
        matches_the_graph(300, &mut s);
        // A smaller batch in the same, larger buffers (the last batch of an epoch).
        matches_the_graph(37, &mut s);
    }
}
