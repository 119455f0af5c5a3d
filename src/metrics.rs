//! Detection metrics, computed as scikit-learn and the MVTec AD evaluation code do:
//! ROC AUC and average precision over distinct thresholds (ties handled as one step),
//! F1-max over thresholds, and AUPRO (per-region overlap integrated up to a false
//! positive rate of 0.3 and normalised; 8-connected ground-truth regions, no dilation).
//! A metric that is undefined (no positives or no negatives) is `None`, never 0.

/// Points of the ROC / PR curves at each distinct threshold, highest score first:
/// (threshold, true positives, false positives).
fn curve(scores: &[f32], labels: &[bool]) -> Vec<(f32, f64, f64)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut out = Vec::new();
    let (mut tp, mut fp) = (0.0, 0.0);
    for (k, &i) in idx.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last_of_tie = k + 1 == idx.len() || scores[idx[k + 1]] != scores[i];
        if last_of_tie {
            out.push((scores[i], tp, fp));
        }
    }
    out
}

/// ROC curve points (false positive rate, true positive rate), from (0, 0) to (1, 1).
pub fn roc_points(scores: &[f32], labels: &[bool]) -> Vec<(f64, f64)> {
    let pos = labels.iter().filter(|l| **l).count().max(1) as f64;
    let neg = (labels.len() - labels.iter().filter(|l| **l).count()).max(1) as f64;
    let mut pts = vec![(0.0, 0.0)];
    pts.extend(
        curve(scores, labels)
            .into_iter()
            .map(|(_, tp, fp)| (fp / neg, tp / pos)),
    );
    pts
}

/// Area under the ROC curve (sklearn `roc_auc_score`).
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|l| **l).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    let mut area = 0.0;
    let (mut ptp, mut pfp) = (0.0, 0.0);
    for (_, tp, fp) in curve(scores, labels) {
        area += (fp - pfp) / neg * (tp + ptp) / (2.0 * pos);
        ptp = tp;
        pfp = fp;
    }
    Some(area)
}

/// Average precision (sklearn `average_precision_score`): sum of (R_n - R_{n-1}) P_n.
pub fn average_precision(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|l| **l).count() as f64;
    if pos == 0.0 {
        return None;
    }
    let mut ap = 0.0;
    let mut prev_recall = 0.0;
    for (_, tp, fp) in curve(scores, labels) {
        let recall = tp / pos;
        let precision = tp / (tp + fp);
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
    }
    Some(ap)
}

/// Best F1 over thresholds, and the threshold reaching it (score >= threshold is positive).
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Option<(f64, f32)> {
    let pos = labels.iter().filter(|l| **l).count() as f64;
    if pos == 0.0 {
        return None;
    }
    curve(scores, labels)
        .into_iter()
        .map(|(t, tp, fp)| {
            let f1 = if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + (pos - tp))
            };
            (f1, t)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// Labels the 8-connected regions of a binary mask; returns (labels, region count),
/// with 0 for background and 1..=count for regions.
pub fn connected_regions(mask: &[bool], width: usize, height: usize) -> (Vec<u32>, u32) {
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(p) = stack.pop() {
            let (x, y) = ((p % width) as i64, (p / width) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= width as i64 || ny >= height as i64 {
                        continue;
                    }
                    let q = ny as usize * width + nx as usize;
                    if mask[q] && labels[q] == 0 {
                        labels[q] = count;
                        stack.push(q);
                    }
                }
            }
        }
    }
    (labels, count)
}

/// AUPRO up to `max_fpr` (standard: 0.3), normalised to [0, 1].
/// `maps` and `masks` hold one H x W image each, row-major.
pub fn aupro(
    maps: &[&[f32]],
    masks: &[&[bool]],
    width: usize,
    height: usize,
    max_fpr: f64,
) -> Option<f64> {
    // Per pixel: its score, its weight towards the mean per-region overlap, and whether
    // it is a normal pixel (counted in the false positive rate).
    let mut pixels: Vec<(f32, f64, bool)> = Vec::new();
    let mut regions_total = 0u32;
    let mut normal_total = 0usize;
    let mut per_image = Vec::new();
    for mask in masks {
        let (labels, n) = connected_regions(mask, width, height);
        let mut sizes = vec![0usize; n as usize + 1];
        for l in &labels {
            sizes[*l as usize] += 1;
        }
        regions_total += n;
        normal_total += sizes[0];
        per_image.push((labels, sizes));
    }
    if regions_total == 0 || normal_total == 0 {
        return None;
    }
    for (map, (labels, sizes)) in maps.iter().zip(&per_image) {
        for (i, &l) in labels.iter().enumerate() {
            let w = if l == 0 {
                0.0
            } else {
                1.0 / (sizes[l as usize] as f64 * regions_total as f64)
            };
            pixels.push((map[i], w, l == 0));
        }
    }
    pixels.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut pro, mut fp) = (0.0f64, 0usize);
    let mut points = vec![(0.0f64, 0.0f64)];
    for k in 0..pixels.len() {
        pro += pixels[k].1;
        fp += pixels[k].2 as usize;
        if k + 1 == pixels.len() || pixels[k + 1].0 != pixels[k].0 {
            points.push((fp as f64 / normal_total as f64, pro));
        }
    }
    // Trapezoid integration of PRO over FPR, cut at max_fpr (interpolated).
    let mut area = 0.0;
    for w in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x0 >= max_fpr {
            break;
        }
        if x1 <= max_fpr {
            area += (x1 - x0) * (y0 + y1) / 2.0;
        } else {
            let y = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0);
            area += (max_fpr - x0) * (y0 + y) / 2.0;
            break;
        }
    }
    Some(area / max_fpr)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed once with scikit-learn 1.9.1:
    //   from sklearn.metrics import roc_auc_score, average_precision_score
    //   y = [0,0,1,1,0,1,0,1,1,0]; s = [0.1,0.4,0.35,0.8,0.4,0.4,0.2,0.9,0.65,0.7]
    //   roc_auc_score(y, s) -> 0.76, average_precision_score(y, s) -> 0.7892857142857144
    // (the three 0.4 scores are a tie across both labels).
    const Y: [bool; 10] = [
        false, false, true, true, false, true, false, true, true, false,
    ];
    const S: [f32; 10] = [0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.2, 0.9, 0.65, 0.7];

    #[test]
    fn auroc_and_ap_match_sklearn_with_ties() {
        assert!((roc_auc(&S, &Y).unwrap() - 0.76).abs() < 1e-12);
        assert!((average_precision(&S, &Y).unwrap() - 0.7892857142857144).abs() < 1e-12);
    }

    #[test]
    fn all_equal_scores_give_chance() {
        // sklearn: roc_auc_score([0,1,0,1], [0.5]*4) -> 0.5, average_precision -> 0.5
        let y = [false, true, false, true];
        let s = [0.5f32; 4];
        assert_eq!(roc_auc(&s, &y), Some(0.5));
        assert_eq!(average_precision(&s, &y), Some(0.5));
    }

    #[test]
    fn no_positives_is_absent_not_zero() {
        let y = [false; 4];
        let s = [0.1f32, 0.2, 0.3, 0.4];
        assert_eq!(roc_auc(&s, &y), None);
        assert_eq!(average_precision(&s, &y), None);
        assert_eq!(f1_max(&s, &y), None);
    }

    #[test]
    fn f1_max_picks_the_best_threshold() {
        // thresholds >= 0.65 give tp 3, fp 1 of 5 positives: F1 = 6/9; >= 0.35 gives tp 5,
        // fp 3: F1 = 10/13 (0.769), the best.
        let (f1, t) = f1_max(&S, &Y).unwrap();
        assert!((f1 - 10.0 / 13.0).abs() < 1e-12, "{f1}");
        assert_eq!(t, 0.35);
    }

    #[test]
    fn regions_are_8_connected() {
        #[rustfmt::skip]
        let m = [
            true, false, false, false,
            false, true, false, true,
            false, false, false, true,
        ];
        let (labels, n) = connected_regions(&m, 4, 3);
        assert_eq!(n, 2);
        assert_eq!(labels[0], labels[5]);
        assert_ne!(labels[0], labels[7]);
    }

    #[test]
    fn aupro_of_a_perfect_and_a_blind_map() {
        let (w, h) = (8, 8);
        let mask: Vec<bool> = (0..64).map(|i| i % 8 < 2 && i / 8 < 2).collect();
        let perfect: Vec<f32> = mask.iter().map(|m| if *m { 1.0 } else { 0.0 }).collect();
        assert!((aupro(&[&perfect], &[&mask], w, h, 0.3).unwrap() - 1.0).abs() < 1e-12);
        // A constant map: one threshold, PRO jumps from 0 to 1 at FPR 1 -> the area below
        // 0.3 under the interpolated segment is 0.3 * 0.3 / 2, normalised: 0.15.
        let flat = vec![0.5f32; 64];
        assert!((aupro(&[&flat], &[&mask], w, h, 0.3).unwrap() - 0.15).abs() < 1e-12);
        // No defect pixels: undefined.
        let none = vec![false; 64];
        assert_eq!(aupro(&[&flat], &[&none], w, h, 0.3), None);
    }
}
