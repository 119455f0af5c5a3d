//! Post-processing of one inference result: the verdict against the class's image
//! threshold, and the defect regions (8-connected areas of the anomaly map at or above
//! the pixel threshold) with box, area and peak score, mapped back to the camera frame.

use crate::model::bundle::ClassThresholds;
use crate::preprocess::{InputSpec, resized_dims};

/// A defect region, in camera-frame pixels.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// Pixels of the region in the anomaly map (model input resolution).
    pub area_px: u32,
    pub peak: f32,
}

/// Where the model's input crop lies in the original frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropGeometry {
    /// Frame pixels per resized pixel.
    pub scale_x: f64,
    pub scale_y: f64,
    /// Crop offset in resized pixels.
    pub left: f64,
    pub top: f64,
}

impl CropGeometry {
    /// The geometry `preprocess::resize_and_crop` applies to a frame of this size.
    pub fn for_frame(frame_w: usize, frame_h: usize, spec: &InputSpec) -> CropGeometry {
        let (rw, rh) = resized_dims(frame_w, frame_h, spec.resize);
        CropGeometry {
            scale_x: frame_w as f64 / rw as f64,
            scale_y: frame_h as f64 / rh as f64,
            left: ((rw as f64 - spec.width as f64) / 2.0).round_ties_even(),
            top: ((rh as f64 - spec.height as f64) / 2.0).round_ties_even(),
        }
    }

    /// Frame coordinates of a crop-space box [x0, x1) x [y0, y1).
    fn frame_box(&self, x0: usize, y0: usize, x1: usize, y1: usize) -> (u32, u32, u32, u32) {
        let fx0 = ((x0 as f64 + self.left) * self.scale_x).floor();
        let fy0 = ((y0 as f64 + self.top) * self.scale_y).floor();
        let fx1 = ((x1 as f64 + self.left) * self.scale_x).ceil();
        let fy1 = ((y1 as f64 + self.top) * self.scale_y).ceil();
        (
            fx0 as u32,
            fy0 as u32,
            (fx1 - fx0) as u32,
            (fy1 - fy0) as u32,
        )
    }
}

/// Regions of `map` (row-major, `width` x `height`) at or above `threshold`, largest first.
pub fn regions(
    map: &[f32],
    width: usize,
    height: usize,
    threshold: f32,
    geometry: &CropGeometry,
) -> Vec<Region> {
    let mask: Vec<bool> = map.iter().map(|v| *v >= threshold).collect();
    let (labels, n) = crate::metrics::connected_regions(&mask, width, height);
    // Per label: min x, min y, max x, max y, area, peak.
    let mut acc = vec![
        (
            usize::MAX,
            usize::MAX,
            0usize,
            0usize,
            0u32,
            f32::NEG_INFINITY
        );
        n as usize + 1
    ];
    for (i, &l) in labels.iter().enumerate() {
        if l == 0 {
            continue;
        }
        let (x, y) = (i % width, i / width);
        let a = &mut acc[l as usize];
        a.0 = a.0.min(x);
        a.1 = a.1.min(y);
        a.2 = a.2.max(x);
        a.3 = a.3.max(y);
        a.4 += 1;
        a.5 = a.5.max(map[i]);
    }
    let mut out: Vec<Region> = acc
        .into_iter()
        .skip(1)
        .map(|(x0, y0, x1, y1, area, peak)| {
            let (x, y, w, h) = geometry.frame_box(x0, y0, x1 + 1, y1 + 1);
            Region {
                x,
                y,
                width: w,
                height: h,
                area_px: area,
                peak,
            }
        })
        .collect();
    out.sort_by(|a, b| b.area_px.cmp(&a.area_px).then(b.peak.total_cmp(&a.peak)));
    out
}

/// The decision for one frame.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    pub anomalous: bool,
    pub score: f32,
    pub threshold: f32,
    pub regions: Vec<Region>,
}

/// Judges a frame: anomalous when the image score reaches the image threshold; regions
/// from the pixel threshold (the image threshold when the class has none).
pub fn judge(
    score: f32,
    map: &[f32],
    map_hw: (usize, usize),
    t: &ClassThresholds,
    geometry: &CropGeometry,
) -> Verdict {
    let anomalous = score >= t.image;
    let regions = if anomalous {
        regions(
            map,
            map_hw.1,
            map_hw.0,
            t.pixel.unwrap_or(t.image),
            geometry,
        )
    } else {
        Vec::new()
    };
    Verdict {
        anomalous,
        score,
        threshold: t.image,
        regions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InputSpec {
        InputSpec {
            height: 288,
            width: 288,
            resize: 329,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }

    #[test]
    fn geometry_inverts_the_resize_and_crop() {
        // A 658x658 frame is halved to 329 and cropped at 20: crop (0,0) is frame (40,40).
        let g = CropGeometry::for_frame(658, 658, &spec());
        assert_eq!(g.frame_box(0, 0, 10, 10), (40, 40, 20, 20));
        // Identity-sized frame: only the crop offset.
        let g = CropGeometry::for_frame(329, 329, &spec());
        assert_eq!(g.frame_box(5, 6, 7, 9), (25, 26, 2, 3));
    }

    #[test]
    fn regions_have_boxes_areas_and_peaks() {
        let (w, h) = (10, 8);
        let mut map = vec![0.1f32; w * h];
        for (x, y, v) in [(1, 1, 0.9), (2, 1, 0.8), (2, 2, 0.7), (7, 5, 0.6)] {
            map[y * w + x] = v;
        }
        let g = CropGeometry {
            scale_x: 1.0,
            scale_y: 1.0,
            left: 0.0,
            top: 0.0,
        };
        let r = regions(&map, w, h, 0.5, &g);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            Region {
                x: 1,
                y: 1,
                width: 2,
                height: 2,
                area_px: 3,
                peak: 0.9
            }
        );
        assert_eq!(
            r[1],
            Region {
                x: 7,
                y: 5,
                width: 1,
                height: 1,
                area_px: 1,
                peak: 0.6
            }
        );
        let t = ClassThresholds {
            image: 0.95,
            pixel: Some(0.5),
        };
        assert!(!judge(0.9, &map, (h, w), &t, &g).anomalous);
        let v = judge(0.96, &map, (h, w), &t, &g);
        assert!(v.anomalous && v.regions.len() == 2 && v.threshold == 0.95);
    }
}
