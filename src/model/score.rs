//! The image score: how a model turns its anomaly map into one number per image.
//!
//! The paper takes the largest patch score (docs/cras-method.md, section 7); `cras
//! train`'s default takes the mean of the top 0.5 % of the smoothed anomaly map, chosen
//! on validation (docs/decisions.md, "The image score"). The rule is written into the
//! graph (`image_score`) and computed the same way on the host, where training scores
//! its validation set to choose the epoch.

use super::map::{MAP_SIGMA, MAP_TRUNCATE, gaussian_kernel, reflect_indices};
use crate::onnx::{Attr, GraphBuilder};

/// How the image score is taken from a model's scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageScore {
    /// The largest patch score, before upsampling and smoothing (the paper's). Bundles
    /// written before the rule was recorded used it.
    #[default]
    PatchMax,
    /// The mean of the largest `fraction` of the smoothed anomaly map's pixels (at
    /// least one pixel, at most [`MAX_TOP_PIXELS`]).
    MapTop { fraction: f64 },
}

/// The most pixels a top-fraction mean takes: TensorRT's TopK accepts k up to 1024 in
/// its 8.6 releases (3840 from 10), and a graph must build on the Jetson's TensorRT.
/// The default's 0.5 % reaches it at about 450 x 450 pixels; above, the mean covers a
/// smaller share of a larger map.
pub const MAX_TOP_PIXELS: usize = 1024;

/// The default recipe's rule: the mean of the top 0.5 % of the map.
pub const DEFAULT_IMAGE_SCORE: ImageScore = ImageScore::MapTop { fraction: 0.005 };

impl ImageScore {
    /// Parses `patch-max` or `map-top:FRACTION` (a fraction in (0, 1]).
    pub fn parse(s: &str) -> Result<ImageScore, String> {
        let rule = match s.trim() {
            "patch-max" => ImageScore::PatchMax,
            other => {
                let f = other.strip_prefix("map-top:").ok_or_else(|| {
                    format!(
                        "image score {s:?}: give patch-max or map-top:FRACTION (e.g. map-top:0.005)"
                    )
                })?;
                let fraction = f
                    .trim()
                    .parse::<f64>()
                    .map_err(|e| format!("image score {s:?}: the fraction {f:?}: {e}"))?;
                ImageScore::MapTop { fraction }
            }
        };
        rule.check().map(|()| rule)
    }

    /// Refuses a fraction outside (0, 1].
    pub fn check(self) -> Result<(), String> {
        match self {
            ImageScore::MapTop { fraction } if !(fraction > 0.0 && fraction <= 1.0) => Err(
                format!("image score map-top:{fraction}: the fraction must be in (0, 1]"),
            ),
            _ => Ok(()),
        }
    }

    /// The paper's rule (bundles with it keep their older model hash).
    pub fn is_patch_max(&self) -> bool {
        *self == ImageScore::PatchMax
    }

    /// How many map pixels the mean takes, of `pixels`.
    pub fn top_count(fraction: f64, pixels: usize) -> usize {
        ((fraction * pixels as f64) as usize).clamp(1, pixels.clamp(1, MAX_TOP_PIXELS))
    }

    /// The flag's spelling, for logs and model.yaml's options.
    pub fn label(&self) -> String {
        match self {
            ImageScore::PatchMax => "patch-max".into(),
            ImageScore::MapTop { fraction } => format!("map-top:{fraction}"),
        }
    }

    /// Writes the rule into the graph: `patch_scores` [N,h,w], `map` [N,1,H,W];
    /// returns the [N] image score.
    pub fn graph(
        &self,
        g: &mut GraphBuilder,
        patch_scores: &str,
        map: &str,
        pixels: usize,
    ) -> String {
        match *self {
            ImageScore::PatchMax => g.node(
                "ReduceMax",
                &[patch_scores],
                vec![("axes", Attr::Ints(vec![1, 2])), ("keepdims", Attr::Int(0))],
            ),
            ImageScore::MapTop { fraction } => {
                let flat = g.reshape(map, &[0, -1]);
                let k = g.init_i64(
                    "top_k",
                    &[1],
                    vec![Self::top_count(fraction, pixels) as i64],
                );
                let top = g.node_outputs(
                    "TopK",
                    &[&flat, &k],
                    vec![("axis", Attr::Int(1)), ("sorted", Attr::Int(0))],
                    2,
                );
                g.node(
                    "ReduceMean",
                    &[&top[0]],
                    vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
                )
            }
        }
    }

    /// The image score of one image from its patch scores (probabilities, [h*w] row
    /// major), as the graph computes it; `map` is the map stage for this grid and size.
    pub fn of_patches(&self, patches: &[f32], map: &HostMap) -> f32 {
        match *self {
            ImageScore::PatchMax => patches.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            ImageScore::MapTop { fraction } => {
                let mut map = map.smooth(patches);
                let k = Self::top_count(fraction, map.len());
                map.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                let sum: f64 = map[..k].iter().map(|v| *v as f64).sum();
                (sum / k as f64) as f32
            }
        }
    }
}

/// The graph's map stage on the host, for one patch grid and map size: `[h, w]`
/// patch scores upsampled bilinearly (half-pixel centers, edges clamped) to `[H, W]`,
/// then smoothed with the Gaussian (sigma 4, truncate 4, reflecting borders), rows
/// first. The weights and indices are worked out once; every pass runs along
/// contiguous rows, so the inner loops vectorise.
pub struct HostMap {
    grid: [usize; 2],
    out: [usize; 2],
    /// Per output row / column: the two source indices and the second one's weight.
    taps_y: Vec<(usize, usize, f32)>,
    taps_x: Vec<(usize, usize, f32)>,
    kernel: Vec<f32>,
    /// Reflected source rows / columns of the Gaussian window, radius included.
    rows: Vec<i64>,
    cols: Vec<i64>,
}

impl HostMap {
    pub fn new(grid: [usize; 2], out: [usize; 2]) -> HostMap {
        let taps = |len: usize, to: usize| -> Vec<(usize, usize, f32)> {
            (0..to)
                .map(|i| {
                    let src = ((i as f64 + 0.5) * len as f64 / to as f64 - 0.5).max(0.0);
                    let i0 = (src.floor() as usize).min(len - 1);
                    let i1 = (i0 + 1).min(len - 1);
                    (i0, i1, (src - i0 as f64) as f32)
                })
                .collect()
        };
        let kernel: Vec<f32> = gaussian_kernel(MAP_SIGMA, MAP_TRUNCATE)
            .iter()
            .map(|v| *v as f32)
            .collect();
        let r = kernel.len() / 2;
        HostMap {
            grid,
            out,
            taps_y: taps(grid[0], out[0]),
            taps_x: taps(grid[1], out[1]),
            rows: reflect_indices(out[0], r),
            cols: reflect_indices(out[1], r),
            kernel,
        }
    }

    /// The smoothed `[H, W]` map of `patches` (`[h * w]`, row major).
    pub fn smooth(&self, patches: &[f32]) -> Vec<f32> {
        let w = self.grid[1];
        let [oh, ow] = self.out;
        let k = &self.kernel;
        // Bilinear: along each patch row first, then between the rows.
        let wide: Vec<f32> = patches
            .chunks_exact(w)
            .flat_map(|row| {
                self.taps_x
                    .iter()
                    .map(|&(x0, x1, fx)| row[x0] * (1.0 - fx) + row[x1] * fx)
            })
            .collect();
        let mut up = vec![0f32; oh * ow];
        for (dst, &(y0, y1, fy)) in up.chunks_exact_mut(ow).zip(&self.taps_y) {
            let (a, b) = (&wide[y0 * ow..][..ow], &wide[y1 * ow..][..ow]);
            for ((d, a), b) in dst.iter_mut().zip(a).zip(b) {
                *d = a * (1.0 - fy) + b * fy;
            }
        }
        // Down the columns: each output row is a weighted sum of whole (reflected) rows.
        let mut v = vec![0f32; oh * ow];
        for (y, dst) in v.chunks_exact_mut(ow).enumerate() {
            for (kv, &sy) in k.iter().zip(&self.rows[y..y + k.len()]) {
                let src = &up[sy as usize * ow..][..ow];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += kv * s;
                }
            }
        }
        // Along the rows, over each row padded by reflection.
        let mut padded = vec![0f32; self.cols.len()];
        let mut smooth = vec![0f32; oh * ow];
        for (src, dst) in v.chunks_exact(ow).zip(smooth.chunks_exact_mut(ow)) {
            for (p, &sx) in padded.iter_mut().zip(&self.cols) {
                *p = src[sx as usize];
            }
            for (j, kv) in k.iter().enumerate() {
                for (d, s) in dst.iter_mut().zip(&padded[j..j + ow]) {
                    *d += kv * s;
                }
            }
        }
        smooth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rules_and_refuses_bad_fractions() {
        assert_eq!(ImageScore::parse("patch-max"), Ok(ImageScore::PatchMax));
        assert_eq!(
            ImageScore::parse("map-top:0.005"),
            Ok(ImageScore::MapTop { fraction: 0.005 })
        );
        for bad in [
            "map-top:0",
            "map-top:1.5",
            "map-top:x",
            "max",
            "map-top:NaN",
        ] {
            let e = ImageScore::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(
            ImageScore::parse(&DEFAULT_IMAGE_SCORE.label()),
            Ok(DEFAULT_IMAGE_SCORE)
        );
    }

    /// Timing of one map at ELPV's size (run by hand: `cargo test --release --lib
    /// score -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn time_one_map() {
        let p: Vec<f32> = (0..36 * 36).map(|i| (i % 7) as f32 / 7.0).collect();
        let plan = HostMap::new([36, 36], [288, 288]);
        let t = std::time::Instant::now();
        let mut s = 0.0;
        for _ in 0..100 {
            s += DEFAULT_IMAGE_SCORE.of_patches(&p, &plan);
        }
        println!("{:.3} ms per image ({s})", t.elapsed().as_secs_f64() * 10.0);
    }

    #[test]
    fn top_count_takes_at_least_one_pixel() {
        assert_eq!(ImageScore::top_count(0.005, 288 * 288), 414);
        assert_eq!(ImageScore::top_count(1e-9, 100), 1);
        assert_eq!(ImageScore::top_count(1.0, 100), 100);
        // TensorRT's TopK limit caps it on large maps.
        assert_eq!(ImageScore::top_count(0.005, 640 * 640), MAX_TOP_PIXELS);
        assert_eq!(ImageScore::top_count(0.005, 448 * 448), 1003);
    }

    #[test]
    fn a_flat_map_stays_flat_and_a_spot_spreads() {
        let flat = HostMap::new([4, 4], [32, 32]).smooth(&[0.25; 16]);
        assert!(flat.iter().all(|v| (v - 0.25).abs() < 1e-6));
        // One hot patch: the map keeps its mass near it, and the top mean lies between
        // the map's own max and the background.
        let mut p = vec![0.0f32; 36 * 36];
        p[18 * 36 + 18] = 1.0;
        let plan = HostMap::new([36, 36], [288, 288]);
        let map = plan.smooth(&p);
        let max = map.iter().copied().fold(0.0, f32::max);
        let top = ImageScore::MapTop { fraction: 0.005 }.of_patches(&p, &plan);
        assert!(top > 0.0 && top < max, "top {top} max {max}");
        assert_eq!(ImageScore::PatchMax.of_patches(&p, &plan), 1.0);
        // The whole map (fraction 1) of a small map is its mean.
        let small: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        let plan = HostMap::new([4, 4], [32, 32]);
        let map = plan.smooth(&small);
        let all = ImageScore::MapTop { fraction: 1.0 }.of_patches(&small, &plan);
        let mean = map.iter().map(|v| *v as f64).sum::<f64>() / map.len() as f64;
        assert!((all as f64 - mean).abs() < 1e-6, "{all} vs {mean}");
    }
}
