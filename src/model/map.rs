//! The map stage written into the graph: patch scores upsampled bilinearly to the input
//! size, then smoothed with a Gaussian (sigma 4, truncate 4) as
//! scipy.ndimage.gaussian_filter does, reflecting at the borders.

use crate::onnx::{Attr, GraphBuilder};

/// Gaussian smoothing of the anomaly map (scipy.ndimage.gaussian_filter semantics).
pub const MAP_SIGMA: f64 = 4.0;
pub const MAP_TRUNCATE: f64 = 4.0;

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
