//! `cras eval`: runs a bundle over the test split of an MVTec-layout dataset and reports
//! image AUROC / AP / F1-max, pixel AUROC / AP and AUPRO per class and their mean, as
//! `metrics.json` and an HTML page with ROC curves, score histograms and heat-map
//! overlays of the worst false positives and false negatives.
//!
//! Pixel metrics need a mask for every defective image of a class; otherwise they are
//! reported as absent (null), never as zero. Masks go through the same resize and
//! centre crop as the images (Pillow bilinear, then > 127).

mod report;

use crate::dataset::{ClassData, TestImage};
use crate::engine::{EngineKind, EngineOptions};
use crate::metrics;
use crate::model::bundle::Bundle;
use crate::path_error::PathError;
use crate::preprocess::{self, InputSpec};
use crate::tool_error::{Result, ToolError};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct EvalOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub report: PathBuf,
    pub classes: Vec<String>,
    pub batch: usize,
    pub engine: EngineKind,
    pub engine_options: EngineOptions,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassMetrics {
    pub class: String,
    pub good_images: usize,
    pub defect_images: usize,
    /// Share of test images whose class the model chose correctly.
    pub class_choice_accuracy: f64,
    pub image_auroc: Option<f64>,
    pub image_ap: Option<f64>,
    pub image_f1_max: Option<f64>,
    pub pixel_auroc: Option<f64>,
    pub pixel_ap: Option<f64>,
    pub aupro: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub model_id: String,
    pub dataset: String,
    pub classes: Vec<ClassMetrics>,
    /// Mean over the classes where each metric is present.
    pub mean: BTreeMap<String, Option<f64>>,
    /// Images that could not be read (skipped).
    pub failed_images: Vec<String>,
}

struct Scored {
    item: TestImage,
    score: f32,
    class_ok: bool,
    map: Vec<f32>,
    mask: Option<Vec<bool>>,
}

fn mean_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn score_class(
    engine: &mut dyn crate::engine::Engine,
    bundle: &Bundle,
    class: &ClassData,
    batch: usize,
    failed: &mut Vec<String>,
    bar: &ProgressBar,
) -> Result<Vec<Scored>> {
    let spec = &bundle.meta.input;
    let class_id = bundle.meta.classes.iter().position(|c| *c == class.name);
    let mut out = Vec::new();
    for chunk in class.test.chunks(batch.max(1)) {
        let mut input = Vec::new();
        let mut items = Vec::new();
        for t in chunk {
            match preprocess::prepare(&t.path, spec) {
                Ok((x, _)) => {
                    input.extend(x);
                    items.push(t.clone());
                }
                Err(e) => {
                    bar.suspend(|| tracing::warn!("skipping {e}"));
                    failed.push(t.path.display().to_string());
                }
            }
        }
        bar.inc(chunk.len() as u64);
        if items.is_empty() {
            continue;
        }
        let n = items.len();
        let o = crate::engine::run_images(engine, &mut input, n, (spec.height, spec.width))?;
        for (i, item) in items.into_iter().enumerate() {
            let mask = match &item.mask {
                Some(p) => Some(crate::dataset::load_mask(p, spec)?),
                None if !item.is_defect() => Some(vec![false; spec.height * spec.width]),
                None => None,
            };
            out.push(Scored {
                score: o.image_scores[i],
                class_ok: class_id.is_some_and(|c| c as i64 == o.class_ids[i]),
                map: o.map(i).to_vec(),
                mask,
                item,
            });
        }
    }
    Ok(out)
}

fn class_metrics(name: &str, s: &[Scored], spec: &InputSpec) -> ClassMetrics {
    let scores: Vec<f32> = s.iter().map(|x| x.score).collect();
    let labels: Vec<bool> = s.iter().map(|x| x.item.is_defect()).collect();
    let all_masks = s.iter().all(|x| x.mask.is_some()) && labels.iter().any(|l| *l);
    let (pixel_auroc, pixel_ap, aupro) = if all_masks {
        let maps: Vec<&[f32]> = s.iter().map(|x| x.map.as_slice()).collect();
        let masks: Vec<&[bool]> = s.iter().filter_map(|x| x.mask.as_deref()).collect();
        let pix: Vec<f32> = maps.iter().flat_map(|m| m.iter().copied()).collect();
        let lab: Vec<bool> = masks.iter().flat_map(|m| m.iter().copied()).collect();
        (
            metrics::roc_auc(&pix, &lab),
            metrics::average_precision(&pix, &lab),
            metrics::aupro(&maps, &masks, spec.width, spec.height, 0.3),
        )
    } else {
        (None, None, None)
    };
    ClassMetrics {
        class: name.to_string(),
        good_images: labels.iter().filter(|l| !**l).count(),
        defect_images: labels.iter().filter(|l| **l).count(),
        class_choice_accuracy: s.iter().filter(|x| x.class_ok).count() as f64
            / s.len().max(1) as f64,
        image_auroc: metrics::roc_auc(&scores, &labels),
        image_ap: metrics::average_precision(&scores, &labels),
        image_f1_max: metrics::f1_max(&scores, &labels).map(|x| x.0),
        pixel_auroc,
        pixel_ap,
        aupro,
    }
}

/// The classes to evaluate (all the model's by default) with their test images; a class
/// the model does not know, or one without test images, is an error.
fn test_data(o: &EvalOptions, bundle: &Bundle) -> Result<Vec<ClassData>> {
    let known = &bundle.meta.classes;
    let classes = if o.classes.is_empty() {
        known.clone()
    } else {
        o.classes.clone()
    };
    if let Some(c) = classes.iter().find(|c| !known.contains(c)) {
        return Err(ToolError::Options(format!(
            "class `{c}` is not one of the model's classes {known:?}"
        )));
    }
    let data = crate::dataset::open(&o.data, &classes)?;
    if let Some(c) = data.iter().find(|c| c.test.is_empty()) {
        return Err(ToolError::Data(format!(
            "class `{}` has no test images under {}/{}/test",
            c.name,
            o.data.display(),
            c.name
        )));
    }
    Ok(data)
}

/// The mean of each metric over the classes where it is defined.
fn means(per_class: &[ClassMetrics]) -> BTreeMap<String, Option<f64>> {
    let mut mean = BTreeMap::new();
    type Getter = fn(&ClassMetrics) -> Option<f64>;
    let getters: [(&str, Getter); 6] = [
        ("image_auroc", |m| m.image_auroc),
        ("image_ap", |m| m.image_ap),
        ("image_f1_max", |m| m.image_f1_max),
        ("pixel_auroc", |m| m.pixel_auroc),
        ("pixel_ap", |m| m.pixel_ap),
        ("aupro", |m| m.aupro),
    ];
    for (k, g) in getters {
        mean.insert(k.to_string(), mean_of(per_class.iter().map(g)));
    }
    mean
}

pub fn run(o: &EvalOptions) -> Result<EvalReport> {
    let bundle = Bundle::read(&o.model)?;
    let data = test_data(o, &bundle)?;
    let mut engine = o.engine.load(
        &bundle.onnx,
        &EngineOptions {
            batch: o.batch,
            input_hw: (bundle.meta.input.height, bundle.meta.input.width),
            ..o.engine_options.clone()
        },
    )?;
    std::fs::create_dir_all(&o.report).map_err(PathError::on("create", &o.report))?;
    let total: usize = data.iter().map(|c| c.test.len()).sum();
    let bar = ProgressBar::new(total as u64).with_message("eval");
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>8} [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let spec = bundle.meta.input.clone();
    let mut failed = Vec::new();
    let mut per_class = Vec::new();
    let mut html_sections = String::new();
    for c in &data {
        let scored = score_class(engine.as_mut(), &bundle, c, o.batch, &mut failed, &bar)?;
        let threshold = bundle.meta.thresholds.get(&c.name).map(|t| t.image);
        let overlays =
            bar.suspend(|| report::write_overlays(&o.report, &c.name, &scored, &spec, threshold))?;
        html_sections += &report::class_section(&c.name, &scored, &overlays);
        per_class.push(class_metrics(&c.name, &scored, &spec));
    }
    bar.finish_and_clear();
    let mean = means(&per_class);
    let report = EvalReport {
        model_id: bundle.model_id(),
        dataset: o.data.display().to_string(),
        classes: per_class,
        mean,
        failed_images: failed,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|source| ToolError::Json {
        what: "the metrics",
        source,
    })?;
    let metrics = o.report.join("metrics.json");
    std::fs::write(&metrics, json).map_err(PathError::on("write", &metrics))?;
    report::write_index(&o.report, &report, &html_sections)?;
    Ok(report)
}
