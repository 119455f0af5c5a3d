//! The operator's picture of one judged frame: the camera image with the anomaly map
//! blended in the Turbo colour map where it reaches the pixel threshold, a box around
//! each region, and a banner band (green OK, red NG) under the text the pipeline's
//! `textoverlay` writes. Drawn in Rust because no GStreamer element blends a float map
//! or fills boxes from data; text, scaling and encoding are GStreamer's.

use crate::daemon::regions::{CropGeometry, Region};
use image::{Rgb, RgbImage};

/// What one picture is made of.
pub struct Picture<'a> {
    pub frame: &'a RgbImage,
    /// The anomaly map at model-input resolution, row-major, `map_hw` = (rows, columns).
    pub map: &'a [f32],
    pub map_hw: (usize, usize),
    /// Where the model's input crop lies in the frame.
    pub geometry: CropGeometry,
    pub pixel_threshold: f32,
    pub regions: &'a [Region],
    pub anomalous: bool,
}

/// How much of the heat colour covers the image where the map is above the threshold.
pub const HEAT_ALPHA: f32 = 0.55;
pub const OK_GREEN: [u8; 3] = [0, 150, 60];
pub const NG_RED: [u8; 3] = [205, 20, 20];
pub const BOX_COLOUR: [u8; 3] = [255, 0, 255];

/// Height of the banner band for a frame `height` pixels tall.
pub fn banner_height(height: u32) -> u32 {
    (height / 12).clamp(20, 64).min(height)
}

/// Turbo (Google, 2019) for `x` in [0, 1]: the polynomial fit of its authors.
pub fn turbo(x: f32) -> [u8; 3] {
    let x = x.clamp(0.0, 1.0);
    let (x2, x3) = (x * x, x * x * x);
    let (x4, x5) = (x2 * x2, x2 * x3);
    let poly = |c: [f32; 6]| c[0] + c[1] * x + c[2] * x2 + c[3] * x3 + c[4] * x4 + c[5] * x5;
    let r = poly([
        0.135_721_4,
        4.615_392_6,
        -42.660_323,
        132.131_08,
        -152.942_4,
        59.286_38,
    ]);
    let g = poly([
        0.091_402_61,
        2.194_188_4,
        4.842_966_6,
        -14.185_033,
        4.277_298_6,
        2.829_566,
    ]);
    let b = poly([
        0.106_673_3,
        12.641_946,
        -60.582_05,
        110.362_77,
        -89.903_11,
        27.348_25,
    ]);
    [r, g, b].map(|c| (c.clamp(0.0, 1.0) * 255.0).round() as u8)
}

/// The heat colour of a map value `v` at or above threshold `t`: from the middle of the
/// scale (yellow-green at the threshold) to its end (dark red at 1).
pub fn heat_colour(v: f32, t: f32) -> [u8; 3] {
    let s = if t < 1.0 { (v - t) / (1.0 - t) } else { 1.0 };
    turbo(0.6 + 0.4 * s.clamp(0.0, 1.0))
}

pub fn draw(p: &Picture) -> RgbImage {
    let mut out = p.frame.clone();
    heat(&mut out, p);
    let thickness = (out.width().min(out.height()) / 240).max(2);
    for r in p.regions {
        outline(&mut out, r, thickness);
    }
    let band = banner_height(out.height());
    let colour = if p.anomalous { NG_RED } else { OK_GREEN };
    for y in 0..band {
        for x in 0..out.width() {
            out.put_pixel(x, y, Rgb(colour));
        }
    }
    out
}

fn heat(out: &mut RgbImage, p: &Picture) {
    let (rows, cols) = p.map_hw;
    if p.map.len() < rows * cols || rows == 0 || cols == 0 {
        return;
    }
    let g = p.geometry;
    let (w, h) = (out.width() as f64, out.height() as f64);
    // The crop's rectangle in frame pixels.
    let x0 = (g.left * g.scale_x).max(0.0);
    let y0 = (g.top * g.scale_y).max(0.0);
    let x1 = ((g.left + cols as f64) * g.scale_x).min(w);
    let y1 = ((g.top + rows as f64) * g.scale_y).min(h);
    for fy in y0 as u32..y1.ceil() as u32 {
        let my = ((fy as f64 + 0.5) / g.scale_y - g.top).floor();
        if my < 0.0 || my >= rows as f64 {
            continue;
        }
        let row = &p.map[my as usize * cols..(my as usize + 1) * cols];
        for fx in x0 as u32..x1.ceil() as u32 {
            let mx = ((fx as f64 + 0.5) / g.scale_x - g.left).floor();
            if mx < 0.0 || mx >= cols as f64 {
                continue;
            }
            let v = row[mx as usize];
            if v >= p.pixel_threshold {
                let c = heat_colour(v, p.pixel_threshold);
                let px = out.get_pixel_mut(fx, fy);
                for (channel, heat) in px.0.iter_mut().zip(c) {
                    *channel = (*channel as f32 * (1.0 - HEAT_ALPHA) + heat as f32 * HEAT_ALPHA)
                        .round() as u8;
                }
            }
        }
    }
}

fn outline(out: &mut RgbImage, r: &Region, thickness: u32) {
    let (w, h) = (out.width(), out.height());
    if w == 0 || h == 0 {
        return;
    }
    let x0 = r.x.min(w - 1);
    let y0 = r.y.min(h - 1);
    let x1 = r.x.saturating_add(r.width).min(w).max(x0 + 1);
    let y1 = r.y.saturating_add(r.height).min(h).max(y0 + 1);
    for y in y0..y1 {
        for x in x0..x1 {
            let edge = x < x0 + thickness
                || x + thickness >= x1
                || y < y0 + thickness
                || y + thickness >= y1;
            if edge {
                out.put_pixel(x, y, Rgb(BOX_COLOUR));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(w: u32, h: u32) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([100, 100, 100]))
    }

    #[test]
    fn turbo_runs_dark_blue_to_dark_red() {
        // The polynomial's ends: near black at 0, blue by 0.15.
        assert_eq!(turbo(0.0), [35, 23, 27]);
        let [r0, _, b0] = turbo(0.15);
        assert!(b0 > r0 + 80, "{:?}", turbo(0.15));
        let [r1, g1, b1] = turbo(1.0);
        assert!(r1 > 100 && g1 < 40 && b1 < 40, "{:?}", turbo(1.0));
        // The heat range is warm: more red than blue everywhere.
        for v in [0.5, 0.7, 0.9, 1.0] {
            let [r, _, b] = heat_colour(v, 0.5);
            assert!(r > b + 80, "{v}: {:?}", heat_colour(v, 0.5));
        }
    }

    /// A 200x100 frame, resize 100 (shorter side), crop 100: the crop is the frame's
    /// centre square, 2 frame pixels per map pixel... here 1:1 on a 100-row frame.
    #[test]
    fn heat_only_above_the_threshold_inside_the_crop_and_a_red_banner_when_ng() {
        let frame = grey(200, 100);
        let spec = crate::preprocess::InputSpec::square(
            100,
            100,
            crate::preprocess::Normalization::Imagenet,
        );
        let geometry = CropGeometry::for_frame(200, 100, &spec);
        let mut map = vec![0.1f32; 100 * 100];
        // A hot 10x10 patch at map (60..70, 40..50).
        for y in 40..50 {
            for x in 60..70 {
                map[y * 100 + x] = 0.9;
            }
        }
        let region = Region {
            x: 150,
            y: 30,
            width: 20,
            height: 30,
            area_px: 100,
            peak: 0.9,
        };
        let regions = [region];
        let pic = Picture {
            frame: &frame,
            map: &map,
            map_hw: (100, 100),
            geometry,
            pixel_threshold: 0.5,
            regions: &regions,
            anomalous: true,
        };
        let out = draw(&pic);
        // The crop starts at frame x 50: map (65, 45) is frame (115, 45).
        let hot = out.get_pixel(115, 45).0;
        assert!(hot[0] > hot[2] + 40, "heat pixel {hot:?}");
        assert_eq!(out.get_pixel(20, 45).0, [100, 100, 100], "outside the crop");
        assert_eq!(
            out.get_pixel(100, 80).0,
            [100, 100, 100],
            "below the threshold"
        );
        assert_eq!(out.get_pixel(100, 2).0, NG_RED, "banner");
        assert_eq!(out.get_pixel(150, 45).0, BOX_COLOUR, "box edge");
        assert_eq!(out.get_pixel(160, 45).0, [100, 100, 100], "box inside");
        let ok = draw(&Picture {
            anomalous: false,
            regions: &[],
            ..pic
        });
        assert_eq!(ok.get_pixel(100, 2).0, OK_GREEN);
    }
}
