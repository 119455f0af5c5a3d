//! The evaluation report: the text table `cras eval` prints, and `index.html` with the
//! per-class table, ROC curves, score histograms (inline SVG, no plotting crate) and
//! heat-map overlays of the worst false positives and false negatives.

use super::{EvalReport, Scored};
use crate::metrics;
use crate::overlay;
use crate::path_error::PathError;
use crate::preprocess::{self, InputSpec};
use crate::tool_error::{Result, ToolError};
use std::fmt::Write as _;
use std::path::Path;

pub(super) fn roc_svg(s: &[Scored]) -> String {
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

pub(super) fn histogram_svg(s: &[Scored]) -> String {
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

pub(super) fn write_overlays(
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
                .map_err(|source| ToolError::WriteImage {
                    path: report.join(&name),
                    source,
                })?;
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

/// One class's section of `index.html`: its curves and its overlays.
pub(super) fn class_section(
    class: &str,
    scored: &[Scored],
    overlays: &[(String, String)],
) -> String {
    let mut html = format!(
        "<h2>{class}</h2><div class=row><figure>{}<figcaption>ROC (image level)</figcaption></figure><figure>{}<figcaption>score histogram</figcaption></figure></div><div class=row>",
        roc_svg(scored),
        histogram_svg(scored)
    );
    for (file, caption) in overlays {
        let _ = write!(
            html,
            "<figure><img src=\"{file}\" width=200><figcaption>{caption}</figcaption></figure>"
        );
    }
    html.push_str("</div>");
    html
}

/// Writes `index.html`: the table of every class and the mean, then the sections.
pub(super) fn write_index(dir: &Path, report: &EvalReport, html_sections: &str) -> Result<()> {
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
    let path = dir.join("index.html");
    std::fs::write(&path, html).map_err(PathError::on("write", &path))?;
    Ok(())
}
