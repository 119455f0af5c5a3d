//! Heat-map overlays of anomaly maps for people: the cropped input blended with a
//! colour map of the scores.
//!
//! Scores are probabilities, so the colour scale is absolute ([0, 1]) by default: the same
//! colour means the same score on every image. With a class threshold the scale is
//! [0, 2 x threshold], so the threshold sits at the middle (green) of the scale and
//! everything at or above it reads yellow to red.

use image::{Rgb, RgbImage};

/// Jet-like colour for v in [0, 1].
pub fn colour(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let ch = |c: f32| ((1.5 - (4.0 * v - c).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [ch(3.0), ch(2.0), ch(1.0)]
}

/// Blends `map` (row-major, same size as `img`) over `img` at 50 %.
pub fn heat_overlay(img: &RgbImage, map: &[f32], threshold: Option<f32>) -> RgbImage {
    let scale = threshold
        .filter(|t| *t > 0.0)
        .map(|t| 0.5 / t)
        .unwrap_or(1.0);
    let w = img.width() as usize;
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let v = map.get(y as usize * w + x as usize).copied().unwrap_or(0.0) * scale;
        let c = colour(v);
        let p = img.get_pixel(x, y).0;
        Rgb([0, 1, 2].map(|i| ((p[i] as u16 + c[i] as u16) / 2) as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_scale_runs_blue_to_red() {
        assert_eq!(colour(0.0), [0, 0, 128]);
        assert_eq!(colour(0.5), [128, 255, 128]);
        assert_eq!(colour(1.0), [128, 0, 0]);
    }
}
