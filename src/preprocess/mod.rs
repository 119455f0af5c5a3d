//! Image pre-processing exactly as the reference's loader does it (Pillow + torchvision):
//! decode to RGB8, resize the shorter side with Pillow's fixed-point antialiased
//! bilinear resampler (uint8 between the horizontal and vertical pass), centre-crop with
//! the offset rounded half to even, scale by 1/255 and normalise per channel, NCHW f32.
//! Reproducing Pillow's integer arithmetic makes the network input bit-identical.

mod resize;

pub use resize::resize_bilinear_pillow;

use image::RgbImage;
use resize::{Window, resize_window};
use std::path::{Path, PathBuf};

/// Input geometry and normalisation of a model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Network input height and width (after the crop).
    pub height: usize,
    pub width: usize,
    /// The shorter image side is resized to this before the centre crop.
    pub resize: usize,
    /// Per-channel mean and std applied to pixel/255 (RGB order).
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Largest network input side a bundle may declare.
pub const MAX_INPUT_SIDE: usize = 4096;
/// Largest image side decoded or taken from a camera.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Longest side over shortest side at most: the resize makes the shorter side the
/// model's size, so the longer one (and the memory) grows with the ratio.
pub const MAX_ASPECT: u32 = 32;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How pixels are scaled for the network: the statistics its backbone was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Normalization {
    /// ImageNet mean/std (what the reference's loader always uses).
    Imagenet,
    /// (pixel - 127) / 128, the scaling TF-Lite EfficientNet weights were trained with.
    Tflite,
}

impl Normalization {
    /// Per-channel (mean, std) applied to pixel / 255.
    pub fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Normalization::Imagenet => (IMAGENET_MEAN, IMAGENET_STD),
            Normalization::Tflite => ([127.0 / 255.0; 3], [128.0 / 255.0; 3]),
        }
    }
}

impl InputSpec {
    /// A square input of `size` pixels from a shorter side resized to `resize`.
    pub fn square(size: usize, resize: usize, normalization: Normalization) -> InputSpec {
        let (mean, std) = normalization.mean_std();
        InputSpec {
            height: size,
            width: size,
            resize,
            mean,
            std,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot decode image {path}: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("image {path}: {source}")]
    Size { path: PathBuf, source: SizeError },
}

/// An image whose size the pre-processing refuses: the resize's memory grows with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizeError {
    #[error("{width}x{height} is empty")]
    Empty { width: u32, height: u32 },
    #[error("{width}x{height} is larger than {MAX_IMAGE_SIDE} pixels on a side")]
    TooLarge { width: u32, height: u32 },
    #[error("{width}x{height} is longer than {MAX_ASPECT} times its width")]
    Aspect { width: u32, height: u32 },
}

/// Whether an image of `width` x `height` may be pre-processed: not empty, at most
/// [`MAX_IMAGE_SIDE`] on a side, at most [`MAX_ASPECT`]:1.
pub fn check_size(width: u32, height: u32) -> Result<(), SizeError> {
    let (long, short) = (width.max(height), width.min(height));
    if short == 0 {
        Err(SizeError::Empty { width, height })
    } else if long > MAX_IMAGE_SIDE {
        Err(SizeError::TooLarge { width, height })
    } else if u64::from(long) > u64::from(MAX_ASPECT) * u64::from(short) {
        Err(SizeError::Aspect { width, height })
    } else {
        Ok(())
    }
}

/// Why bytes did not decode to an image the pre-processing takes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Image(String),
    #[error(transparent)]
    Size(#[from] SizeError),
}

/// Decodes encoded image bytes to RGB8 (grayscale replicated, alpha dropped, 16-bit
/// scaled). The size is read from the header and checked first, and the decoder's
/// allocation is bounded, so a small file that declares a huge image takes no memory.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| DecodeError::Image(e.to_string()))
    };
    // The header alone first: the size is refused with its own reason.
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| DecodeError::Image(e.to_string()))?;
    check_size(w, h)?;
    let mut decoder = reader()?;
    decoder.limits(limits_for_decode());
    let img = decoder
        .decode()
        .map_err(|e| DecodeError::Image(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Decodes an image file to RGB8, as [`decode_rgb`] does.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|e| ImageError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    decode_rgb(&bytes).map_err(|e| match e {
        DecodeError::Size(source) => ImageError::Size {
            path: path.to_path_buf(),
            source,
        },
        DecodeError::Image(reason) => ImageError::Decode {
            path: path.to_path_buf(),
            reason,
        },
    })
}

fn limits_for_decode() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(1 << 30);
    limits
}

/// torchvision `Resize(size)` on a PIL image: the shorter side becomes `size`, the longer
/// `int(size * long / short)`.
pub fn resized_dims(w: usize, h: usize, size: usize) -> (usize, usize) {
    if w <= h {
        (size, (size as f64 * h as f64 / w as f64) as usize)
    } else {
        ((size as f64 * w as f64 / h as f64) as usize, size)
    }
}

/// Resize + centre crop: the image the network sees, as RGB8 (also used for overlays).
/// Refuses an image [`check_size`] refuses. Only the crop window is resampled.
pub fn resize_and_crop(img: &RgbImage, spec: &InputSpec) -> Result<RgbImage, SizeError> {
    check_size(img.width(), img.height())?;
    let (rw, rh) = resized_dims(img.width() as usize, img.height() as usize, spec.resize);
    // torchvision CenterCrop: int(round((size - crop) / 2)), Python rounds half to even;
    // a crop larger than the image is clamped to it, as `imageops::crop_imm` does.
    let offset = |size: usize, crop: usize| {
        let o = ((size as f64 - crop as f64) / 2.0)
            .round_ties_even()
            .max(0.0) as usize;
        let o = o.min(size);
        (o, crop.min(size - o))
    };
    let (y, h) = offset(rh, spec.height);
    let (x, w) = offset(rw, spec.width);
    Ok(resize_window(img, rw, rh, Window { x, y, w, h }))
}

/// Normalised CHW float32 tensor of a cropped RGB8 image, appended to `out`.
pub fn normalise_into(crop: &RgbImage, spec: &InputSpec, out: &mut Vec<f32>) {
    let raw = crop.as_raw();
    out.reserve(raw.len());
    for c in 0..3 {
        let (m, s) = (spec.mean[c], spec.std[c]);
        // The same expression for each of the 256 values, looked up per pixel.
        let lut: [f32; 256] = std::array::from_fn(|v| (v as f32 / 255.0 - m) / s);
        out.extend(raw.chunks_exact(3).map(|px| lut[usize::from(px[c])]));
    }
}

/// The whole pipeline for one file: (network input [3,H,W], the cropped RGB image).
pub fn prepare(path: &Path, spec: &InputSpec) -> Result<(Vec<f32>, RgbImage), ImageError> {
    let img = load_rgb(path)?;
    let crop = resize_and_crop(&img, spec).map_err(|source| ImageError::Size {
        path: path.to_path_buf(),
        source,
    })?;
    let mut t = Vec::new();
    normalise_into(&crop, spec, &mut t);
    Ok((t, crop))
}

/// The network inputs of `paths`, one after another, for one engine call; an unreadable
/// image is skipped with a warning. Returns the inputs and how many images they hold.
pub fn prepare_readable(paths: &[std::path::PathBuf], spec: &InputSpec) -> (Vec<f32>, usize) {
    let mut input = Vec::new();
    let mut n = 0;
    for p in paths {
        match prepare(p, spec) {
            Ok((x, _)) => {
                input.extend(x);
                n += 1;
            }
            Err(e) => tracing::warn!("skipping {e}"),
        }
    }
    (input, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_the_resize_cannot_take_are_refused() {
        assert!(check_size(640, 480).is_ok());
        assert!(check_size(8192, 256).is_ok(), "a 32:1 line-scan frame");
        assert_eq!(
            check_size(1, 100_000),
            Err(SizeError::TooLarge {
                width: 1,
                height: 100_000
            })
        );
        assert!(matches!(check_size(1, 1000), Err(SizeError::Aspect { .. })));
        assert!(matches!(check_size(0, 10), Err(SizeError::Empty { .. })));
        assert!(matches!(
            check_size(16_385, 16_000),
            Err(SizeError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_tiny_file_declaring_a_huge_image_is_refused_before_decoding() {
        let mut png = Vec::new();
        image::GrayImage::new(1, 10_000)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(matches!(
            decode_rgb(&png),
            Err(DecodeError::Size(SizeError::Aspect { .. }))
        ));
        let spec = InputSpec::square(288, 288, Normalization::Imagenet);
        let sliver = RgbImage::new(2, 1000);
        assert!(resize_and_crop(&sliver, &spec).is_err());
    }

    #[test]
    fn resized_dims_follow_torchvision() {
        assert_eq!(resized_dims(288, 288, 329), (329, 329));
        assert_eq!(resized_dims(300, 200, 329), (493, 329));
        assert_eq!(resized_dims(200, 300, 329), (329, 493));
    }

    #[test]
    fn the_crop_window_is_the_whole_resize_cropped() {
        let img = RgbImage::from_fn(333, 250, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (x * y) as u8])
        });
        // (height, width, resize): a square crop, a crop of the whole side, a crop
        // larger than the resized image (clamped, as before).
        for (h, w, resize) in [(224, 224, 256), (120, 160, 120), (300, 300, 256)] {
            let spec = InputSpec {
                height: h,
                width: w,
                resize,
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            };
            let (rw, rh) = resized_dims(333, 250, resize);
            let whole = resize_bilinear_pillow(&img, rw, rh);
            let top = ((rh as f64 - h as f64) / 2.0).round_ties_even() as u32;
            let left = ((rw as f64 - w as f64) / 2.0).round_ties_even() as u32;
            let want = image::imageops::crop_imm(&whole, left, top, w as u32, h as u32).to_image();
            assert_eq!(
                resize_and_crop(&img, &spec).unwrap(),
                want,
                "{h}x{w} from {resize}"
            );
        }
    }

    #[test]
    fn normalising_through_the_table_is_the_arithmetic() {
        let spec = InputSpec::square(2, 2, Normalization::Imagenet);
        let crop = RgbImage::from_raw(2, 2, (0..12).map(|v| v * 21).collect()).unwrap();
        let mut out = Vec::new();
        normalise_into(&crop, &spec, &mut out);
        for c in 0..3 {
            for i in 0..4 {
                let v = crop.as_raw()[i * 3 + c] as f32;
                let want = (v / 255.0 - spec.mean[c]) / spec.std[c];
                assert_eq!(out[c * 4 + i].to_bits(), want.to_bits());
            }
        }
    }
}
