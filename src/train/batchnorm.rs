//! BatchNorm in train mode followed by LeakyReLU, forward and backward, over row-major
//! [rows, channels] buffers in place: the scorer's two blocks as the written-out CPU step
//! (train/step.rs) computes them.

use super::kernels::{column_sums, column_totals, for_row_pairs, for_rows};
use super::params::{BN_EPS, LEAKY};

/// A BatchNorm layer's batch statistics.
pub(super) struct Bn {
    pub mean: Vec<f32>,
    /// Biased (what the batch is normalised with).
    pub var: Vec<f32>,
    pub inv_std: Vec<f32>,
}

/// The derivative of LeakyReLU where its input is positive or not.
pub(super) fn leak(positive: bool) -> f32 {
    if positive { 1.0 } else { LEAKY as f32 }
}

/// LeakyReLU(x) = max(x, 0.2 x), as the graph computes it.
pub(super) fn leaky(x: f32) -> f32 {
    x.max(x * LEAKY as f32)
}

/// Train-mode BatchNorm and LeakyReLU over `z` ([n, c]) in place: `z` becomes the
/// normalised values, `h` the activations.
pub(super) fn bn_forward(
    z: &mut [f32],
    h: &mut [f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
) -> Bn {
    let n = (z.len() / c) as f64;
    let mean: Vec<f64> = column_totals(z, c).iter().map(|s| s / n).collect();
    let sq = column_sums::<1>(z, c, |_, row, acc| {
        for ((a, v), m) in acc.iter_mut().zip(row).zip(&mean) {
            a[0] += (*v as f64 - m).powi(2);
        }
    });
    let var: Vec<f64> = sq.iter().map(|s| s[0] / n).collect();
    let inv_std: Vec<f32> = var
        .iter()
        .map(|v| (1.0 / (v + BN_EPS).sqrt()) as f32)
        .collect();
    let mean: Vec<f32> = mean.iter().map(|m| *m as f32).collect();
    for_row_pairs(z, c, h, c, |_, zr, hr| {
        for j in 0..c {
            let xhat = (zr[j] - mean[j]) * inv_std[j];
            zr[j] = xhat;
            hr[j] = leaky(xhat * gamma[j] + beta[j]);
        }
    });
    Bn {
        mean,
        var: var.iter().map(|v| *v as f32).collect(),
        inv_std,
    }
}

/// Backward of train-mode BatchNorm: `xhat` ([n, c], the normalised values) becomes the
/// gradient of the pre-activations, given `dy`, that of the layer's output before the
/// activation. Returns the gradients of gamma, beta and the linear bias.
pub(super) fn bn_backward(
    xhat: &mut [f32],
    dy: &[f32],
    c: usize,
    gamma: &[f32],
    bn: &Bn,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = (xhat.len() / c) as f64;
    let sums = column_sums::<2>(xhat, c, |i, row, acc| {
        let g = &dy[i * c..(i + 1) * c];
        for j in 0..c {
            acc[j][0] += g[j] as f64;
            acc[j][1] += (g[j] * row[j]) as f64;
        }
    });
    let dbeta: Vec<f32> = sums.iter().map(|s| s[0] as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s[1] as f32).collect();
    let mean_dy: Vec<f32> = sums.iter().map(|s| (s[0] / n) as f32).collect();
    let mean_dyx: Vec<f32> = sums.iter().map(|s| (s[1] / n) as f32).collect();
    let scale: Vec<f32> = gamma.iter().zip(&bn.inv_std).map(|(g, s)| g * s).collect();
    for_rows(xhat, c, |i, row| {
        let g = &dy[i * c..(i + 1) * c];
        for j in 0..c {
            row[j] = scale[j] * (g[j] - mean_dy[j] - row[j] * mean_dyx[j]);
        }
    });
    let dbias = column_totals(xhat, c);
    (dgamma, dbeta, dbias.iter().map(|s| *s as f32).collect())
}
