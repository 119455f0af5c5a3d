//! Helpers for the operator-view tests: a real RTSP client (ffmpeg) grabbing frames, and
//! what the decoded pictures show (banner colour, heat against the source frame).
#![allow(dead_code)]

use image::{GrayImage, RgbImage};
use std::path::Path;
use std::process::Command;

/// Grabs `n` frames from `url` into `dir` as PNG; true when ffmpeg succeeded.
pub fn grab(url: &str, dir: &Path, n: usize) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    Command::new("timeout")
        .args([
            "60",
            "ffmpeg",
            "-v",
            "error",
            "-rtsp_transport",
            "tcp",
            "-i",
            url,
        ])
        .args([
            "-fps_mode",
            "passthrough",
            "-frames:v",
            &n.to_string(),
            "-y",
        ])
        .arg(dir.join("%03d.png"))
        .status()
        .is_ok_and(|s| s.success())
}

/// The banner colour of a decoded frame: the mean of the band's saturated pixels (the
/// text, white with a dark outline, is left out).
pub fn banner(path: &Path) -> [f64; 3] {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let band = (h / 12).clamp(20, 64);
    let mut sum = [0f64; 3];
    let mut n = 0.0;
    for y in 1..band - 1 {
        for x in 0..w {
            let p = img.get_pixel(x, y).0;
            let (hi, lo) = (p.iter().max().unwrap(), p.iter().min().unwrap());
            if hi - lo > 60 {
                for i in 0..3 {
                    sum[i] += p[i] as f64;
                }
                n += 1.0;
            }
        }
    }
    sum.map(|s| s / f64::max(n, 1.0))
}

/// The mean absolute difference of `img` from each of the line's `frames` (in playing
/// order) below its banner (`skip` rows); frames of another size are `f64::MAX` away.
pub fn distances(img: &RgbImage, frames: &[RgbImage], skip: u32) -> Vec<f64> {
    frames
        .iter()
        .map(|f| {
            if f.dimensions() != img.dimensions() {
                return f64::MAX;
            }
            let (mut sum, mut n) = (0.0f64, 0.0f64);
            for y in skip..f.height() {
                for x in 0..f.width() {
                    let (a, b) = (f.get_pixel(x, y).0, img.get_pixel(x, y).0);
                    sum += (0..3)
                        .map(|c| (a[c] as f64 - b[c] as f64).abs())
                        .sum::<f64>();
                    n += 3.0;
                }
            }
            sum / n.max(1.0)
        })
        .collect()
}

/// The line's frame closest to `img` below its banner: (index, mean absolute difference).
pub fn source_of(img: &RgbImage, frames: &[RgbImage], skip: u32) -> (usize, f64) {
    distances(img, frames, skip)
        .into_iter()
        .enumerate()
        .fold((0, f64::MAX), |a, b| if b.1 < a.1 { b } else { a })
}

/// How much warmer (red minus blue) `shown` is than `source` on the mask's pixels below
/// row `skip`.
pub fn warm_shift(shown: &RgbImage, source: &RgbImage, mask: &GrayImage, skip: u32) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0.0f64);
    for (x, y, m) in mask.enumerate_pixels() {
        if m.0[0] > 127 && y >= skip {
            let (o, f) = (shown.get_pixel(x, y).0, source.get_pixel(x, y).0);
            sum += (o[0] as f64 - o[2] as f64) - (f[0] as f64 - f[2] as f64);
            n += 1.0;
        }
    }
    sum / n.max(1.0)
}

/// The share of pixels below row `skip` that are much warmer in `shown` than in
/// `source`: heat-coloured pixels.
pub fn heat_share(shown: &RgbImage, source: &RgbImage, skip: u32) -> f64 {
    let (mut hot, mut n) = (0.0f64, 0.0f64);
    for y in skip..source.height() {
        for x in 0..source.width() {
            let (o, f) = (shown.get_pixel(x, y).0, source.get_pixel(x, y).0);
            let shift = (o[0] as f64 - o[2] as f64) - (f[0] as f64 - f[2] as f64);
            hot += f64::from(u8::from(shift > 60.0));
            n += 1.0;
        }
    }
    hot / n.max(1.0)
}

/// Red (NG) or green (OK) banner, from its mean colour; None when neither.
pub fn verdict_of(rgb: [f64; 3]) -> Option<bool> {
    let [r, g, b] = rgb;
    if r > 140.0 && g < 90.0 && b < 90.0 {
        Some(true)
    } else if g > 100.0 && r < 70.0 && b < 110.0 {
        Some(false)
    } else {
        None
    }
}
