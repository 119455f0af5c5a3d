//! `cras synth`: a synthetic, seeded dataset in MVTec AD layout for tests and demos.
//!
//! Each class is a textured product surface (stripes, checkerboard, grain, dots) whose
//! good images vary in phase, contrast and noise. Defects are drawn on good images with
//! exact masks: `scratch` (thin dark line), `spot` (bright blob), `missing` (a patch of
//! the texture gone, flat background). Layout:
//! `<class>/train/good/NNN.png`, `<class>/test/good/NNN.png`,
//! `<class>/test/<defect>/NNN.png`, `<class>/ground_truth/<defect>/NNN_mask.png`.

use crate::path_error::PathError;
use crate::rng::Rng;

/// Why a synthetic dataset could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// An option out of range; the message names it.
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("cannot write {path}: {source}")]
    Image {
        path: std::path::PathBuf,
        source: image::ImageError,
    },
}

type Result<T> = std::result::Result<T, SynthError>;
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::{Path, PathBuf};

pub const TEXTURES: [&str; 4] = ["stripes", "checker", "grain", "dots"];
pub const DEFECTS: [&str; 3] = ["scratch", "spot", "missing"];
/// Kinds of synthetic defect painted on validation positives: the dataset's three and
/// `crack`, a thin jagged dark line that may fork (cracks in cells, ceramics, glass and
/// castings look like this, and they are subtler than the others).
pub const VALIDATION_DEFECTS: [&str; 4] = ["scratch", "spot", "missing", "crack"];
/// Bumped whenever a validation defect is drawn differently, so cached validation
/// embeddings made with the old drawing are not reused.
pub const PAINTER_VERSION: u32 = 2;

/// A set of `VALIDATION_DEFECTS` kinds, as a bit mask (bit i = kind i).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefectKinds(pub u8);

impl DefectKinds {
    pub const ALL: DefectKinds = DefectKinds(0b1111);
    /// Cracks only (bit 3 of `VALIDATION_DEFECTS`).
    pub const CRACK: DefectKinds = DefectKinds(1 << 3);

    /// Parses a comma-separated list of kind names.
    pub fn parse(list: &str) -> Result<DefectKinds> {
        let mut bits = 0u8;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let i = VALIDATION_DEFECTS
                .iter()
                .position(|k| *k == name)
                .ok_or_else(|| {
                    SynthError::Options(format!(
                        "unknown defect kind `{name}`: choose from {}",
                        VALIDATION_DEFECTS.join(", ")
                    ))
                })?;
            bits |= 1 << i;
        }
        if bits == 0 {
            return Err(SynthError::Options(format!(
                "give at least one defect kind ({})",
                VALIDATION_DEFECTS.join(", ")
            )));
        }
        Ok(DefectKinds(bits))
    }

    fn indices(self) -> Vec<usize> {
        (0..VALIDATION_DEFECTS.len())
            .filter(|i| self.0 & (1 << i) != 0)
            .collect()
    }

    pub fn names(self) -> String {
        self.indices()
            .iter()
            .map(|&i| VALIDATION_DEFECTS[i])
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub out: PathBuf,
    /// Number of classes (1..=4), taken from TEXTURES in order.
    pub classes: usize,
    pub train: usize,
    pub test_good: usize,
    /// Defective test images per defect type.
    pub test_defect: usize,
    pub size: u32,
    pub seed: u64,
}

/// Base texture value at (x, y) in [0, 1] for a class, with per-image parameters.
struct Texture {
    kind: usize,
    phase: (f64, f64),
    angle: f64,
    contrast: f64,
    tint: [f64; 3],
}

impl Texture {
    fn random(kind: usize, rng: &mut Rng) -> Texture {
        Texture {
            kind,
            phase: (rng.range(0.0, 100.0), rng.range(0.0, 100.0)),
            angle: rng.range(-0.08, 0.08),
            contrast: rng.range(0.85, 1.0),
            tint: [
                rng.range(0.95, 1.05),
                rng.range(0.95, 1.05),
                rng.range(0.95, 1.05),
            ],
        }
    }

    fn value(&self, x: f64, y: f64) -> f64 {
        let (px, py) = (x + self.phase.0, y + self.phase.1);
        let (s, c) = self.angle.sin_cos();
        let (u, v) = (c * px - s * py, s * px + c * py);
        let base = match self.kind {
            0 => 0.5 + 0.35 * (u * std::f64::consts::TAU / 12.0).sin(),
            1 => {
                let cell = ((u / 16.0).floor() + (v / 16.0).floor()) as i64;
                if cell.rem_euclid(2) == 0 { 0.3 } else { 0.7 }
            }
            2 => 0.5 + 0.2 * ((u * 0.9).sin() * (v * 1.3).cos() + (u * 0.37 + v * 0.21).sin()),
            _ => {
                let (cu, cv) = (u.rem_euclid(14.0) - 7.0, v.rem_euclid(14.0) - 7.0);
                if cu * cu + cv * cv < 12.0 { 0.75 } else { 0.35 }
            }
        };
        0.5 + (base - 0.5) * self.contrast
    }
}

fn good_image(kind: usize, size: u32, rng: &mut Rng) -> RgbImage {
    let t = Texture::random(kind, rng);
    let colour = [
        [0.9, 0.8, 0.6],
        [0.5, 0.6, 0.9],
        [0.7, 0.7, 0.7],
        [0.6, 0.85, 0.6],
    ][kind];
    RgbImage::from_fn(size, size, |x, y| {
        let v = t.value(x as f64, y as f64);
        let n = rng.normal() * 0.02;
        Rgb([0, 1, 2]
            .map(|c| ((v * colour[c] * t.tint[c] + n).clamp(0.0, 1.0) * 255.0).round() as u8))
    })
}

/// Paints one defect; returns its mask (255 = defect).
fn add_defect(img: &mut RgbImage, defect: usize, rng: &mut Rng) -> GrayImage {
    let s = img.width() as f64;
    let mut mask = GrayImage::new(img.width(), img.height());
    // Scratch, spot and missing are centred in the middle half; a crack picks its own start.
    let centre = |rng: &mut Rng| (rng.range(0.25 * s, 0.75 * s), rng.range(0.25 * s, 0.75 * s));
    match defect {
        0 => {
            let (cx, cy) = centre(rng);
            // scratch: a dark line segment, 2-3 px wide
            let angle = rng.range(0.0, std::f64::consts::PI);
            let half = rng.range(0.12 * s, 0.25 * s);
            let width = rng.range(1.0, 1.8);
            let (dx, dy) = (angle.cos(), angle.sin());
            for (x, y, p) in img.enumerate_pixels_mut() {
                let (rx, ry) = (x as f64 - cx, y as f64 - cy);
                let along = rx * dx + ry * dy;
                let across = (-rx * dy + ry * dx).abs();
                if along.abs() <= half && across <= width {
                    *p = Rgb(p.0.map(|v| (v as f64 * 0.25) as u8));
                    mask.put_pixel(x, y, Luma([255]));
                }
            }
        }
        1 => {
            let (cx, cy) = centre(rng);
            // spot: a bright elliptical blob
            let (rx, ry) = (rng.range(0.04 * s, 0.08 * s), rng.range(0.04 * s, 0.08 * s));
            for (x, y, p) in img.enumerate_pixels_mut() {
                let d = ((x as f64 - cx) / rx).powi(2) + ((y as f64 - cy) / ry).powi(2);
                if d <= 1.0 {
                    *p = Rgb(p.0.map(|v| (v as f64 * 0.3 + 255.0 * 0.7) as u8));
                    mask.put_pixel(x, y, Luma([255]));
                }
            }
        }
        2 => {
            let (cx, cy) = centre(rng);
            // missing: a rectangle of the texture gone, flat dark background
            let (w, h) = (rng.range(0.08 * s, 0.16 * s), rng.range(0.08 * s, 0.16 * s));
            for (x, y, p) in img.enumerate_pixels_mut() {
                if (x as f64 - cx).abs() <= w / 2.0 && (y as f64 - cy).abs() <= h / 2.0 {
                    *p = Rgb([40, 40, 40]);
                    mask.put_pixel(x, y, Luma([255]));
                }
            }
        }
        _ => add_crack(img, &mut mask, rng),
    }
    mask
}

/// A crack: a random walk of short segments (1-2.4 px wide, darkened to 45%) starting
/// anywhere but the outermost 5%, 20-50% of the image side long, forking once in half of
/// the cases.
fn add_crack(img: &mut RgbImage, mask: &mut GrayImage, rng: &mut Rng) {
    let s = img.width().min(img.height()) as f64;
    let step = (0.02 * s).max(1.5);
    let half_width = rng.range(0.5, 1.2);
    let walk = |rng: &mut Rng, mut x: f64, mut y: f64, mut angle: f64, len: f64| {
        let mut segs = Vec::new();
        let mut done = 0.0;
        while done < len {
            angle += rng.normal() * 0.2;
            let (nx, ny) = (x + step * angle.cos(), y + step * angle.sin());
            segs.push(((x, y), (nx, ny)));
            (x, y) = (nx, ny);
            done += step;
        }
        segs
    };
    let (x0, y0) = (rng.range(0.05 * s, 0.95 * s), rng.range(0.05 * s, 0.95 * s));
    let angle = rng.range(0.0, 2.0 * std::f64::consts::PI);
    let len = rng.range(0.2 * s, 0.5 * s);
    let mut segs = walk(rng, x0, y0, angle, len);
    if rng.uniform() < 0.5 && segs.len() > 2 {
        let ((fx, fy), _) = segs[rng.below(segs.len())];
        let turn = if rng.uniform() < 0.5 { -0.7 } else { 0.7 };
        let more = walk(rng, fx, fy, angle + turn, len * 0.5);
        segs.extend(more);
    }
    let (w, h) = (img.width() as i64, img.height() as i64);
    for ((ax, ay), (bx, by)) in segs {
        let (dx, dy) = (bx - ax, by - ay);
        let l2 = (dx * dx + dy * dy).max(1e-9);
        let pad = half_width + 1.0;
        let x_lo = (ax.min(bx) - pad).floor().max(0.0) as i64;
        let x_hi = ((ax.max(bx) + pad).ceil() as i64).min(w - 1);
        let y_lo = (ay.min(by) - pad).floor().max(0.0) as i64;
        let y_hi = ((ay.max(by) + pad).ceil() as i64).min(h - 1);
        for y in y_lo..=y_hi {
            for x in x_lo..=x_hi {
                let (px, py) = (x as f64 - ax, y as f64 - ay);
                let t = ((px * dx + py * dy) / l2).clamp(0.0, 1.0);
                let (ex, ey) = (px - t * dx, py - t * dy);
                if ex * ex + ey * ey <= half_width * half_width
                    && mask.get_pixel(x as u32, y as u32).0[0] == 0
                {
                    let p = img.get_pixel_mut(x as u32, y as u32);
                    *p = Rgb(p.0.map(|v| (v as f64 * 0.45) as u8));
                    mask.put_pixel(x as u32, y as u32, Luma([255]));
                }
            }
        }
    }
}

fn save<P>(img: &image::ImageBuffer<P, Vec<u8>>, path: &Path) -> Result<()>
where
    P: image::Pixel<Subpixel = u8> + image::PixelWithColorType,
{
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(PathError::on("create", parent))?;
    }
    img.save(path).map_err(|source| SynthError::Image {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes the dataset; returns the class names.
pub fn generate(o: &SynthOptions) -> Result<Vec<String>> {
    if o.classes == 0 || o.classes > TEXTURES.len() {
        return Err(SynthError::Options(format!(
            "--classes must be between 1 and {}",
            TEXTURES.len()
        )));
    }
    if o.size < 32 {
        return Err(SynthError::Options(
            "--size must be at least 32 pixels".into(),
        ));
    }
    let mut rng = Rng::new(o.seed);
    let mut names = Vec::new();
    for (kind, name) in TEXTURES.iter().enumerate().take(o.classes) {
        let root = o.out.join(name);
        for i in 0..o.train {
            save(
                &good_image(kind, o.size, &mut rng),
                &root.join(format!("train/good/{i:03}.png")),
            )?;
        }
        for i in 0..o.test_good {
            save(
                &good_image(kind, o.size, &mut rng),
                &root.join(format!("test/good/{i:03}.png")),
            )?;
        }
        for (d, defect) in DEFECTS.iter().enumerate() {
            for i in 0..o.test_defect {
                let mut img = good_image(kind, o.size, &mut rng);
                let mask = add_defect(&mut img, d, &mut rng);
                save(&img, &root.join(format!("test/{defect}/{i:03}.png")))?;
                save(
                    &mask,
                    &root.join(format!("ground_truth/{defect}/{i:03}_mask.png")),
                )?;
            }
        }
        names.push(name.to_string());
    }
    Ok(names)
}

/// Paints a random synthetic defect of one of `kinds` on an image (used for validation
/// positives), blended at `strength` (1: as `cras synth` paints it; 0.3: 30% of the way
/// from the image to the defect, a subtler one for images where full-strength defects
/// are all obvious).
pub fn paint_random_defect(
    img: &mut RgbImage,
    rng: &mut Rng,
    strength: f64,
    kinds: DefectKinds,
) -> GrayImage {
    let choices = kinds.indices();
    let d = if choices.is_empty() {
        0
    } else {
        choices[rng.below(choices.len())]
    };
    let original = img.clone();
    let mask = add_defect(img, d, rng);
    let a = strength.clamp(0.0, 1.0);
    for ((p, o), m) in img.pixels_mut().zip(original.pixels()).zip(mask.pixels()) {
        if m.0[0] > 0 {
            for c in 0..3 {
                let (o, v) = (o.0[c] as f64, p.0[c] as f64);
                p.0[c] = (o + (v - o) * a).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests;
