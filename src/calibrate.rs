//! `cras calibrate`: per-class alarm thresholds stored in `model.yaml`.
//!
//! From good images only (the default), per class:
//! - image threshold `t = Q_q + margin * (Q_q - Q_0.5)` of the good images' scores,
//!   with `q` = 0.99 and margin 0.5 by default: the q-quantile sets the expected false
//!   alarm rate on good parts and the margin, measured in the spread of the good scores
//!   above their median, keeps a small validation set from placing it too tightly. The
//!   rule runs on the scores' logit (see [`threshold_from_good`]);
//! - pixel threshold: the same rule over every anomaly-map value of those images, with
//!   the pixel quantile (0.999 by default).
//!
//! The good images are the validation hold-out `cras train` recorded (same seed and
//! fraction, so never images the model trained on). A bundle without training
//! provenance (imported) uses `train/good`, whose scores run low: thresholds then err on
//! the side of more alarms, and a warning says so.
//!
//! With `--with-defects` the labelled test images (`test/*`, `ground_truth/*`) are used
//! instead: the image threshold is the F1-optimal one, and the pixel threshold the
//! F1-optimal one over mask pixels when every defect has a mask. Evaluating afterwards
//! on the same test images is then optimistic.

use crate::dataset::ClassData;
use crate::engine::{EngineKind, EngineOptions};
use crate::model::bundle::{Bundle, ClassThresholds};
use crate::preprocess;
use crate::tool_error::{Result, ToolError};
use std::path::PathBuf;

pub struct CalibrateOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub quantile: f64,
    pub pixel_quantile: f64,
    pub margin: f64,
    pub with_defects: bool,
    pub engine: EngineKind,
    pub engine_options: EngineOptions,
}

/// Linear-interpolated quantile (NumPy's default) of unsorted values.
pub fn quantile(values: &mut [f32], q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (values.len().saturating_sub(1)) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = pos - lo as f64;
    values[lo] as f64 * (1.0 - frac) + values[hi] as f64 * frac
}

/// Warns when an image threshold sits at the top of the score range (the largest f32
/// below 1.0 or above): the scorer saturates on the class's good parts, typically a class
/// it was not trained with, and the threshold cannot be placed finer than "the score
/// saturated" (never an alarm, or one on every part that saturates too).
pub fn warn_if_saturated(class: &str, image_threshold: f64) {
    if image_threshold as f32 >= 1.0 - f32::EPSILON / 2.0 {
        tracing::warn!(
            "class `{class}`: image threshold {} is at the top of the score range: the scorer \
             saturates on this class's good parts, so only parts whose score saturates too will \
             alarm. Train a model with this class, or calibrate it with --with-defects",
            image_threshold as f32
        );
    }
}

/// Refuses quantiles outside [0, 1] and a negative margin.
pub fn check_rule(quantile: f64, pixel_quantile: f64, margin: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&quantile)
        || !(0.0..=1.0).contains(&pixel_quantile)
        || margin.is_nan()
        || margin < 0.0
    {
        return Err(ToolError::Options(
            "--quantile and --pixel-quantile must be in [0, 1] and --margin at least 0".into(),
        ));
    }
    Ok(())
}

/// The rule `Q_q + margin * (Q_q - Q_0.5)`, taken on the logit of the scores and mapped
/// back through the sigmoid. Scores are probabilities; near 1.0 a probability keeps
/// almost no room above the good parts' quantile (a class whose good parts score
/// 0.9999 got thresholds above 1.0 under the same rule on probabilities, and could never
/// alarm), while the logit spreads that range out. A quantile is the same in both spaces
/// (the logit is monotone); only the margin is measured on the logit scale. Scores of
/// exactly 0 or 1 are clamped to the nearest f32 values inside the open interval.
pub fn threshold_from_good(values: &mut [f32], q: f64, margin: f64) -> f64 {
    let median = logit(quantile(values, 0.5));
    let qq = logit(quantile(values, q));
    sigmoid(qq + margin * (qq - median))
}

/// The smallest positive f32 gap below 1.0: scores are clamped to
/// `[EDGE, 1 - EDGE]` before the logit so that saturated scores stay finite.
const EDGE: f64 = 5.960_464_477_539_063e-8; // 2^-24

fn logit(p: f64) -> f64 {
    let p = p.clamp(EDGE, 1.0 - EDGE);
    (p / (1.0 - p)).ln()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub(crate) struct Scores {
    pub image: Vec<f32>,
    /// Anomaly maps, concatenated.
    pub pixels: Vec<f32>,
    /// The class the graph chose, per image.
    pub class_ids: Vec<i64>,
}

pub(crate) fn score(
    engine: &mut dyn crate::engine::Engine,
    spec: &crate::preprocess::InputSpec,
    paths: &[PathBuf],
) -> Result<Scores> {
    let mut s = Scores {
        image: Vec::new(),
        pixels: Vec::new(),
        class_ids: Vec::new(),
    };
    for chunk in paths.chunks(4) {
        let (mut input, n) = preprocess::prepare_readable(chunk, spec);
        if n == 0 {
            continue;
        }
        let o = crate::engine::run_images(engine, &mut input, n, (spec.height, spec.width))?;
        for i in 0..n {
            s.image.push(o.image_scores[i]);
            s.class_ids.push(o.class_ids[i]);
            s.pixels.extend_from_slice(o.map(i));
        }
    }
    Ok(s)
}

fn good_images(bundle: &Bundle, classes: &[ClassData]) -> Result<Vec<Vec<PathBuf>>> {
    let prov = &bundle.meta.provenance;
    if let Some(t) = &prov.training {
        let fraction: f64 = t
            .options
            .get("val_fraction")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.1);
        // The trained classes share the training run's draw; each added class has its own.
        let added = |c: &ClassData| prov.added_classes.iter().find(|a| a.class == c.name);
        let trained: Vec<ClassData> = classes
            .iter()
            .filter(|c| added(c).is_none())
            .cloned()
            .collect();
        let mut joint =
            crate::dataset::holdout_split(&trained, t.holdout_seed(), fraction)?.into_iter();
        let mut held = Vec::with_capacity(classes.len());
        for c in classes {
            held.push(match added(c) {
                Some(a) => crate::dataset::holdout_class(c, a.seed, a.holdout_fraction)?.1,
                None => joint.next().map(|(_, v)| v).unwrap_or_default(),
            });
        }
        if held.iter().all(|v| !v.is_empty()) {
            return Ok(held);
        }
    }
    tracing::warn!(
        "the bundle records no validation hold-out: calibrating on train/good, whose scores run low, so \
         thresholds err towards more alarms"
    );
    Ok(classes.iter().map(|c| c.train_good.clone()).collect())
}

pub fn run(o: &CalibrateOptions) -> Result<Bundle> {
    check_rule(o.quantile, o.pixel_quantile, o.margin)?;
    let mut bundle = Bundle::read(&o.model)?;
    let classes = crate::dataset::open(&o.data, &bundle.meta.classes)?;
    let mut engine = o.engine.load(
        &bundle.onnx,
        &EngineOptions {
            batch: 4,
            input_hw: (bundle.meta.input.height, bundle.meta.input.width),
            ..o.engine_options.clone()
        },
    )?;
    let goods = if o.with_defects {
        Vec::new()
    } else {
        good_images(&bundle, &classes)?
    };
    for (ci, c) in classes.iter().enumerate() {
        let t = if o.with_defects {
            labelled_thresholds(engine.as_mut(), &bundle, c)?
        } else {
            let paths = &goods[ci];
            let mut s = score(engine.as_mut(), &bundle.meta.input, paths)?;
            if s.image.is_empty() {
                return Err(ToolError::Data(format!(
                    "class `{}`: no readable good image to calibrate on",
                    c.name
                )));
            }
            let image = threshold_from_good(&mut s.image, o.quantile, o.margin);
            let pixel = threshold_from_good(&mut s.pixels, o.pixel_quantile, o.margin);
            // Shortest exact form of the stored f32: near 1.0 five decimals hide it.
            eprintln!(
                "{}: image threshold {}, pixel threshold {} (from {} good images, q {}, margin {})",
                c.name,
                image as f32,
                pixel as f32,
                s.image.len(),
                o.quantile,
                o.margin
            );
            warn_if_saturated(&c.name, image);
            ClassThresholds {
                image: image as f32,
                pixel: Some(pixel as f32),
            }
        };
        bundle.meta.thresholds.insert(c.name.clone(), t);
    }
    let how = if o.with_defects {
        "F1-optimal on labelled test images".to_string()
    } else {
        format!(
            "good images: Q{} + {} x (Q{} - median); pixels Q{}",
            o.quantile, o.margin, o.quantile, o.pixel_quantile
        )
    };
    bundle
        .meta
        .provenance
        .notes
        .insert("calibration".to_string(), how);
    bundle.write_meta()?;
    Ok(bundle)
}

fn labelled_thresholds(
    engine: &mut dyn crate::engine::Engine,
    bundle: &Bundle,
    c: &ClassData,
) -> Result<ClassThresholds> {
    let spec = &bundle.meta.input;
    let paths: Vec<PathBuf> = c.test.iter().map(|t| t.path.clone()).collect();
    if !c.test.iter().any(|t| t.is_defect()) || !c.test.iter().any(|t| !t.is_defect()) {
        return Err(ToolError::Data(format!(
            "class `{}`: --with-defects needs good and defective test images",
            c.name
        )));
    }
    let s = score(engine, spec, &paths)?;
    if s.image.len() != c.test.len() {
        return Err(ToolError::Data(format!(
            "class `{}`: some test images could not be read; fix them before calibrating on labels",
            c.name
        )));
    }
    let labels: Vec<bool> = c.test.iter().map(|t| t.is_defect()).collect();
    let (f1, image) = crate::metrics::f1_max(&s.image, &labels)
        .ok_or_else(|| ToolError::Data(format!("class `{}`: no defects", c.name)))?;
    let pixel = if c.test.iter().all(|t| !t.is_defect() || t.mask.is_some()) {
        let mut lab = Vec::with_capacity(s.pixels.len());
        for t in &c.test {
            match &t.mask {
                Some(m) => lab.extend(crate::dataset::load_mask(m, spec)?),
                None => lab.extend(std::iter::repeat_n(false, spec.height * spec.width)),
            }
        }
        crate::metrics::f1_max(&s.pixels, &lab).map(|x| x.1)
    } else {
        None
    };
    eprintln!(
        "{}: image threshold {image:.5} (F1 {f1:.3}), pixel threshold {:?}",
        c.name, pixel
    );
    Ok(ClassThresholds { image, pixel })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        // numpy.quantile([1, 2, 3, 4, 10], [0.5, 0.9]) -> [3.0, 7.6]
        let mut v = [10.0f32, 1.0, 3.0, 2.0, 4.0];
        assert!((quantile(&mut v, 0.5) - 3.0).abs() < 1e-9);
        assert!((quantile(&mut v, 0.9) - 7.6).abs() < 1e-6);
    }

    #[test]
    fn the_rule_runs_on_the_logit() {
        // Scores 0.1..0.9: median 0.5 (logit 0), Q0.9 = 0.82 (logit ln(0.82/0.18)).
        let mut v: Vec<f32> = (1..=9).map(|i| i as f32 / 10.0).collect();
        let lq = (0.82f64 / 0.18).ln();
        let want = 1.0 / (1.0 + (-(1.5 * lq)).exp());
        assert!((threshold_from_good(&mut v, 0.9, 0.5) - want).abs() < 1e-6);
        // Without a margin it is the plain quantile.
        assert!((threshold_from_good(&mut v, 0.9, 0.0) - 0.82).abs() < 1e-6);
    }

    #[test]
    fn good_parts_near_one_still_get_a_threshold_below_one() {
        // The case that made the old rule blind: good scores crowding under 1.0.
        let mut v: Vec<f32> = (0..100).map(|i| 0.9999 + i as f32 * 9e-7).collect();
        let q = quantile(&mut v.clone(), 0.99);
        let t = threshold_from_good(&mut v, 0.99, 0.5);
        assert!(t > q && t < 1.0, "threshold {t} vs Q0.99 {q}");
        // Saturated scores stay finite: the threshold is the top of the range.
        let mut sat = vec![1.0f32; 10];
        let t = threshold_from_good(&mut sat, 0.99, 0.5);
        assert!(t.is_finite() && t as f32 == 1.0 - f32::EPSILON / 2.0);
    }
}
