//! `cras eval`: runs a bundle over the test split of an MVTec-layout dataset and reports
//! image AUROC / AP / F1-max, pixel AUROC / AP and AUPRO per class and their mean, as
//! `metrics.json` and an HTML page with ROC curves, score histograms and heat-map
//! overlays of the worst false positives and false negatives.
//!
//! Pixel metrics need a mask for every defective image of a class; otherwise they are
//! reported as absent (null), never as zero. Masks go through the same resize and
//! centre crop as the images (Pillow bilinear, then > 127).

use crate::dataset::{ClassData, TestImage};
use crate::engine::{CrasOutputs, EngineKind, EngineOptions};
use crate::metrics;
use crate::model::bundle::Bundle;
use crate::overlay;
use crate::preprocess::{self, InputSpec};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

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
        let run_n = engine.fixed_batch().unwrap_or(n).max(n);
        input.resize(run_n * 3 * spec.height * spec.width, 0.0);
        let o = CrasOutputs::from_named(engine.run(&input, [run_n, 3, spec.height, spec.width])?)?;
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

// ---- report ---------------------------------------------------------------------------

fn roc_svg(s: &[Scored]) -> String {
    let scores: Vec<f32> = s.iter().map(|x| x.score).collect();
    let labels: Vec<bool> = s.iter().map(|x| x.item.is_defect()).collect();
    let pts = metrics::roc_points(&scores, &labels);
    let (w, h, m) = (260.0, 260.0, 30.0);
    let path: Vec<String> = pts
        .iter()
        .map(|(x, y)| {
            format!(
                "{:.1},{:.1}",
                m + x * (w - 2.0 * m),
                h - m - y * (h - 2.0 * m)
            )
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><rect x="{m}" y="{m}" width="{iw}" height="{iw}" fill="none" stroke="#999"/><line x1="{m}" y1="{b}" x2="{r}" y2="{m}" stroke="#ccc" stroke-dasharray="4"/><polyline fill="none" stroke="#c0392b" stroke-width="2" points="{pts}"/><text x="{cx}" y="{ty}" font-size="11" text-anchor="middle">false positive rate</text><text x="10" y="{cx}" font-size="11" transform="rotate(-90 10 {cx})" text-anchor="middle">true positive rate</text></svg>"##,
        iw = w - 2.0 * m,
        b = h - m,
        r = w - m,
        pts = path.join(" "),
        cx = w / 2.0,
        ty = h - 8.0
    )
}

fn histogram_svg(s: &[Scored]) -> String {
    let (lo, hi) = s
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
            (a.min(x.score), b.max(x.score))
        });
    let bins = 30;
    let span = ((hi - lo) as f64).max(1e-9);
    let mut good = vec![0usize; bins];
    let mut bad = vec![0usize; bins];
    for x in s {
        let b = (((x.score - lo) as f64 / span) * bins as f64).min(bins as f64 - 1.0) as usize;
        if x.item.is_defect() {
            bad[b] += 1
        } else {
            good[b] += 1
        }
    }
    let top = good.iter().chain(&bad).copied().max().unwrap_or(1).max(1) as f64;
    let (w, h, m) = (360.0, 200.0, 25.0);
    let bw = (w - 2.0 * m) / bins as f64;
    let mut bars = String::new();
    for (series, colour) in [(&good, "#2980b9"), (&bad, "#c0392b")] {
        for (i, c) in series.iter().enumerate() {
            let bh = *c as f64 / top * (h - 2.0 * m);
            let _ = write!(
                bars,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{colour}" fill-opacity="0.55"/>"#,
                m + i as f64 * bw,
                h - m - bh,
                bw
            );
        }
    }
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">{bars}<line x1="{m}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/><text x="{m}" y="{t}" font-size="11">{lo:.4}</text><text x="{r}" y="{t}" font-size="11" text-anchor="end">{hi:.4}</text><text x="{r}" y="14" font-size="11" text-anchor="end"><tspan fill="#2980b9">good</tspan> / <tspan fill="#c0392b">defect</tspan> image scores</text></svg>"##,
        b = h - m,
        r = w - m,
        t = h - 8.0
    )
}

/// A metric in percent with two decimals, or `absent` for an undefined one.
fn pct(v: Option<f64>, absent: &str) -> String {
    v.map(|x| format!("{:.2}", 100.0 * x))
        .unwrap_or_else(|| absent.into())
}

fn fmt(v: Option<f64>) -> String {
    pct(v, "&ndash;")
}

impl EvalReport {
    /// The per-class table and the mean, as plain text (what `cras eval` prints).
    pub fn text_table(&self) -> String {
        let row = |name: &str, v: [Option<f64>; 6]| {
            let c = v.map(|x| pct(x, "-"));
            format!(
                "{name:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
                c[0], c[1], c[2], c[3], c[4], c[5]
            )
        };
        let mut out = format!(
            "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            "class", "I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "AUPRO"
        );
        for m in &self.classes {
            out += &row(
                &m.class,
                [
                    m.image_auroc,
                    m.image_ap,
                    m.image_f1_max,
                    m.pixel_auroc,
                    m.pixel_ap,
                    m.aupro,
                ],
            );
        }
        let mean = |k: &str| self.mean.get(k).copied().flatten();
        out += &row(
            "mean",
            [
                "image_auroc",
                "image_ap",
                "image_f1_max",
                "pixel_auroc",
                "pixel_ap",
                "aupro",
            ]
            .map(mean),
        );
        out
    }
}

fn write_overlays(
    report: &Path,
    class: &str,
    s: &[Scored],
    spec: &InputSpec,
    threshold: Option<f32>,
) -> Result<Vec<(String, String)>> {
    let mut good: Vec<&Scored> = s.iter().filter(|x| !x.item.is_defect()).collect();
    good.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut bad: Vec<&Scored> = s.iter().filter(|x| x.item.is_defect()).collect();
    bad.sort_by(|a, b| a.score.total_cmp(&b.score));
    let mut out = Vec::new();
    for (tag, list) in [
        ("worst false positive", good),
        ("worst false negative", bad),
    ] {
        for (k, x) in list.into_iter().take(3).enumerate() {
            let (_, crop) = preprocess::prepare(&x.item.path, spec)?;
            let name = format!("{class}_{}_{k}.png", tag.replace(' ', "_"));
            overlay::heat_overlay(&crop, &x.map, threshold)
                .save(report.join(&name))
                .with_context(|| format!("cannot write {name}"))?;
            out.push((
                name,
                format!(
                    "{tag} {}: {} ({}), score {:.4}",
                    k + 1,
                    x.item
                        .path
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    x.item.kind,
                    x.score
                ),
            ));
        }
    }
    Ok(out)
}

pub fn run(o: &EvalOptions) -> Result<EvalReport> {
    let bundle = Bundle::read(&o.model)?;
    let classes = if o.classes.is_empty() {
        bundle.meta.classes.clone()
    } else {
        o.classes.clone()
    };
    for c in &classes {
        if !bundle.meta.classes.contains(c) {
            bail!(
                "class `{c}` is not one of the model's classes {:?}",
                bundle.meta.classes
            );
        }
    }
    let data = crate::dataset::open(&o.data, &classes)?;
    for c in &data {
        if c.test.is_empty() {
            bail!(
                "class `{}` has no test images under {}/{}/test",
                c.name,
                o.data.display(),
                c.name
            );
        }
    }
    let mut engine = o.engine.load(
        &bundle.onnx,
        &EngineOptions {
            batch: o.batch,
            ..o.engine_options.clone()
        },
    )?;
    std::fs::create_dir_all(&o.report)
        .with_context(|| format!("cannot create {}", o.report.display()))?;
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
        let m = class_metrics(&c.name, &scored, &spec);
        let threshold = bundle.meta.thresholds.get(&c.name).map(|t| t.image);
        let overlays =
            bar.suspend(|| write_overlays(&o.report, &c.name, &scored, &spec, threshold))?;
        let _ = write!(
            html_sections,
            "<h2>{}</h2><div class=row><figure>{}<figcaption>ROC (image level)</figcaption></figure><figure>{}<figcaption>score histogram</figcaption></figure></div><div class=row>",
            c.name,
            roc_svg(&scored),
            histogram_svg(&scored)
        );
        for (file, caption) in overlays {
            let _ = write!(
                html_sections,
                "<figure><img src=\"{file}\" width=200><figcaption>{caption}</figcaption></figure>"
            );
        }
        html_sections.push_str("</div>");
        per_class.push(m);
    }
    bar.finish_and_clear();
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
    let report = EvalReport {
        model_id: bundle.model_id(),
        dataset: o.data.display().to_string(),
        classes: per_class,
        mean,
        failed_images: failed,
    };
    std::fs::write(
        o.report.join("metrics.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let mut rows = String::new();
    for m in &report.classes {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}/{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            m.class,
            m.good_images,
            m.defect_images,
            100.0 * m.class_choice_accuracy,
            fmt(m.image_auroc),
            fmt(m.image_ap),
            fmt(m.image_f1_max),
            fmt(m.pixel_auroc),
            fmt(m.pixel_ap),
            fmt(m.aupro)
        );
    }
    let mm = |k: &str| fmt(report.mean.get(k).copied().flatten());
    let _ = write!(
        rows,
        "<tr class=mean><td>mean</td><td></td><td></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        mm("image_auroc"),
        mm("image_ap"),
        mm("image_f1_max"),
        mm("pixel_auroc"),
        mm("pixel_ap"),
        mm("aupro")
    );
    let html = format!(
        "<!doctype html><meta charset=utf-8><title>cras eval: {id}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}.mean{{font-weight:bold}}.row{{display:flex;flex-wrap:wrap;gap:1em}}figure{{margin:0}}figcaption{{font-size:12px;max-width:260px}}</style>\
         <h1>Model {id}</h1><p>Dataset {ds}. Values in %; &ndash; means undefined (e.g. no masks). AUPRO up to FPR 0.3, normalised, no dilation.</p>\
         <table><tr><th>class</th><th>good/defect</th><th>class choice</th><th>image AUROC</th><th>image AP</th><th>image F1-max</th><th>pixel AUROC</th><th>pixel AP</th><th>AUPRO</th></tr>{rows}</table>{sections}",
        id = report.model_id,
        ds = report.dataset,
        sections = html_sections
    );
    std::fs::write(o.report.join("index.html"), html)?;
    Ok(report)
}
