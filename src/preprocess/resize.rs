//! Pillow's antialiased bilinear resampler (`Image.resize(size, BILINEAR)`), in its
//! fixed-point form: 22-bit integer weights, an `int` accumulator, uint8 between the
//! horizontal and the vertical pass. Reproducing that arithmetic makes the network
//! input bit-identical to the reference's loader.
//!
//! Every output pixel depends only on its own taps, so the resize followed by the
//! centre crop can compute the crop window alone ([`resize_window`]): the horizontal
//! pass for the crop's columns on the input rows the vertical pass reads, the vertical
//! pass for the crop's rows. The taps are still computed from the full sizes, so each
//! pixel is the one the full resize gives (the tests compare both on many sizes).

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output pixel's taps: the first input index and the fixed-point weights.
struct Tap {
    start: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter, for
/// output indices `from..to` of a resize from `in_size` to `out_size`.
fn taps(in_size: usize, out_size: usize, from: usize, to: usize) -> Vec<Tap> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 1.0 * filterscale;
    (from..to)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut k: Vec<f64> = (0..n)
                .map(|x| {
                    let t = (((x + xmin) as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let weights = k
                .iter()
                .map(|&v| {
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }
                })
                .collect();
            Tap {
                start: xmin,
                weights,
            }
        })
        .collect()
}

/// Identity taps (a pass Pillow skips because the size does not change).
fn identity(from: usize, to: usize) -> Vec<Tap> {
    (from..to)
        .map(|x| Tap {
            start: x,
            weights: vec![1 << PRECISION_BITS],
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    // Pillow's `clip8`; the accumulator never exceeds 2^31 (weights sum to 2^22).
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// One RGB pixel through `weights` applied to `px` (3 bytes per pixel, `step` bytes
/// between taps).
#[inline]
fn accumulate(px: &[u8], step: usize, weights: &[i32]) -> [u8; 3] {
    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
    for (i, w) in weights.iter().enumerate() {
        let p = &px[i * step..i * step + 3];
        acc[0] += i32::from(p[0]) * w;
        acc[1] += i32::from(p[1]) * w;
        acc[2] += i32::from(p[2]) * w;
    }
    [clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]
}

/// A rectangle of the resized image: columns `x..x + w`, rows `y..y + h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

/// The `window` of `src` resized to `out_w` x `out_h`, as RGB8 (the window must lie
/// inside the resized image).
pub fn resize_window(src: &RgbImage, out_w: usize, out_h: usize, window: Window) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let Window { x, y, w, h } = window;
    let cols = if out_w != in_w {
        taps(in_w, out_w, x, x + w)
    } else {
        identity(x, x + w)
    };
    let rows = if out_h != in_h {
        taps(in_h, out_h, y, y + h)
    } else {
        identity(y, y + h)
    };
    // The input rows the vertical pass reads.
    let first = rows.iter().map(|t| t.start).min().unwrap_or(0);
    let last = rows
        .iter()
        .map(|t| t.start + t.weights.len())
        .max()
        .unwrap_or(0);
    let s = src.as_raw();
    // Horizontal pass: the window's columns on rows first..last.
    let mut tmp = vec![0u8; (last - first) * w * 3];
    for (r, line) in tmp.chunks_exact_mut(w * 3).enumerate() {
        let row = &s[(first + r) * in_w * 3..(first + r + 1) * in_w * 3];
        for (t, out) in cols.iter().zip(line.chunks_exact_mut(3)) {
            out.copy_from_slice(&accumulate(&row[t.start * 3..], 3, &t.weights));
        }
    }
    // Vertical pass: the window's rows.
    let mut out = vec![0u8; w * h * 3];
    let step = w * 3;
    for (t, line) in rows.iter().zip(out.chunks_exact_mut(w * 3)) {
        let top = &tmp[(t.start - first) * step..];
        for (c, px) in line.chunks_exact_mut(3).enumerate() {
            px.copy_from_slice(&accumulate(&top[c * 3..], step, &t.weights));
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).unwrap_or_default()
}

/// Pillow `Image.resize((w, h), BILINEAR)` on an RGB image.
pub fn resize_bilinear_pillow(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let whole = Window {
        x: 0,
        y: 0,
        w: out_w,
        h: out_h,
    };
    resize_window(src, out_w, out_h, whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resampler as first written: the whole image, pass by pass, i64 accumulators.
    fn reference(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
        let (in_w, in_h) = (src.width() as usize, src.height() as usize);
        let s = src.as_raw();
        let one = |acc: i64| clip8(acc as i32);
        let (tmp, tw) = if out_w != in_w {
            let cx = taps(in_w, out_w, 0, out_w);
            let mut t = vec![0u8; out_w * in_h * 3];
            for y in 0..in_h {
                for (x, tap) in cx.iter().enumerate() {
                    for c in 0..3 {
                        let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                        for (i, w) in tap.weights.iter().enumerate() {
                            acc += s[(y * in_w + tap.start + i) * 3 + c] as i64 * *w as i64;
                        }
                        t[(y * out_w + x) * 3 + c] = one(acc);
                    }
                }
            }
            (t, out_w)
        } else {
            (s.to_vec(), in_w)
        };
        let out = if out_h != in_h {
            let cy = taps(in_h, out_h, 0, out_h);
            let mut o = vec![0u8; tw * out_h * 3];
            for (y, tap) in cy.iter().enumerate() {
                for x in 0..tw {
                    for c in 0..3 {
                        let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                        for (i, w) in tap.weights.iter().enumerate() {
                            acc += tmp[((tap.start + i) * tw + x) * 3 + c] as i64 * *w as i64;
                        }
                        o[(y * tw + x) * 3 + c] = one(acc);
                    }
                }
            }
            o
        } else {
            tmp
        };
        RgbImage::from_raw(out_w as u32, out_h as u32, out).unwrap()
    }

    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        RgbImage::from_fn(w, h, |_, _| {
            let mut px = [0u8; 3];
            for p in &mut px {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *p = (state >> 24) as u8;
            }
            image::Rgb(px)
        })
    }

    #[test]
    fn windows_equal_the_whole_resize_cropped() {
        let cases = [
            ((640, 480), (341, 256)),
            ((480, 640), (256, 341)),
            ((1920, 1080), (455, 256)),
            ((300, 300), (329, 329)),
            ((224, 224), (224, 224)),
            ((256, 100), (256, 50)),
            ((97, 61), (40, 200)),
            ((7, 5), (3, 2)),
        ];
        for (i, ((iw, ih), (ow, oh))) in cases.into_iter().enumerate() {
            let src = noise(iw, ih, i as u32);
            let whole = reference(&src, ow, oh);
            assert_eq!(resize_bilinear_pillow(&src, ow, oh), whole, "{iw}x{ih}");
            let win = Window {
                x: ow / 7,
                y: oh / 5,
                w: ow - ow / 7 - ow / 9,
                h: oh - oh / 5 - oh / 11,
            };
            let crop = image::imageops::crop_imm(
                &whole,
                win.x as u32,
                win.y as u32,
                win.w as u32,
                win.h as u32,
            )
            .to_image();
            assert_eq!(resize_window(&src, ow, oh, win), crop, "{iw}x{ih} window");
        }
    }

    #[test]
    fn identity_resize_keeps_pixels() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        assert_eq!(resize_bilinear_pillow(&img, 5, 4), img);
    }
}
