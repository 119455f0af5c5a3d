//! `cras infer`: runs a bundle on image files, one JSON line per image on stdout, and
//! optionally writes each anomaly map (`.map.npy`) and a heat-map overlay (`.overlay.png`).

use crate::engine::{Engine, EngineKind, EngineOptions};
use crate::model::bundle::Bundle;
use crate::overlay;
use crate::path_error::PathError;
use crate::preprocess;
use crate::tool_error::{Result, ToolError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct InferOptions {
    pub model: PathBuf,
    pub engine: EngineKind,
    pub engine_options: EngineOptions,
    pub out: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub batch: usize,
}

/// One image's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageResult {
    pub image: String,
    pub class: String,
    pub class_id: i64,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<&'static str>,
    pub latency_ms: f64,
}

/// The deepest folder containing every input, so that output names can keep the inputs'
/// relative folders (`a/good/000.png` and `b/good/000.png` must not collide).
pub fn common_root(paths: &[PathBuf]) -> PathBuf {
    let abs: Vec<PathBuf> = paths
        .iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let mut root: Option<PathBuf> = None;
    for p in &abs {
        let parent = p.parent().map(Path::to_path_buf).unwrap_or_default();
        root = Some(match root {
            None => parent,
            Some(r) => {
                let mut common = PathBuf::new();
                for (a, b) in r.components().zip(parent.components()) {
                    if a != b {
                        break;
                    }
                    common.push(a.as_os_str());
                }
                common
            }
        });
    }
    root.unwrap_or_default()
}

/// Output path stem for `image` under `out`: its path relative to `root`, without the
/// extension (`out/a/good/000`). Only plain names are kept, so an input named with `..`
/// can never put an output outside `out`.
pub fn output_stem(out: &Path, root: &Path, image: &Path) -> PathBuf {
    let abs = std::path::absolute(image).unwrap_or_else(|_| image.to_path_buf());
    let rel = abs
        .strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| PathBuf::from(image.file_name().unwrap_or_default()));
    let mut inside: PathBuf = rel
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    if inside.as_os_str().is_empty() {
        inside = PathBuf::from("image");
    }
    out.join(inside.with_extension(""))
}

fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Runs inference; returns the number of images that failed.
pub fn run(opts: &InferOptions) -> Result<usize> {
    if opts.batch == 0 {
        return Err(ToolError::Options("--batch must be at least 1".into()));
    }
    let bundle = Bundle::read(&opts.model)?;
    let spec = bundle.meta.input.clone();
    let mut engine: Box<dyn Engine> = opts
        .engine
        .load(
            &bundle.onnx,
            &EngineOptions {
                batch: opts.batch,
                input_hw: (spec.height, spec.width),
                ..opts.engine_options.clone()
            },
        )
        .map_err(|source| ToolError::LoadModel {
            model: opts.model.clone(),
            engine: opts.engine.name(),
            source,
        })?;
    tracing::info!(
        "model {} ({} classes) on {}; {} images",
        bundle.model_id(),
        bundle.meta.classes.len(),
        engine.name(),
        opts.images.len()
    );
    let root = common_root(&opts.images);
    let stdout = std::io::stdout();
    let mut failures = 0;
    for chunk in opts.images.chunks(opts.batch.max(1)) {
        let mut tensors = Vec::new();
        let mut ok: Vec<(&PathBuf, image::RgbImage, f64)> = Vec::new();
        for path in chunk {
            let t0 = Instant::now();
            match preprocess::prepare(path, &spec) {
                Ok((t, crop)) => {
                    tensors.extend(t);
                    ok.push((path, crop, t0.elapsed().as_secs_f64() * 1e3));
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!("{e}");
                    let line = serde_json::json!({"image": path.display().to_string(), "error": e.to_string()});
                    writeln!(stdout.lock(), "{line}").map_err(ToolError::Stdout)?;
                }
            }
        }
        if ok.is_empty() {
            continue;
        }
        let n = ok.len();
        let t0 = Instant::now();
        let outs =
            crate::engine::run_images(engine.as_mut(), &mut tensors, n, (spec.height, spec.width))?;
        let engine_ms = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
        for (i, (path, crop, pre_ms)) in ok.iter().enumerate() {
            let class_id = outs.class_ids[i];
            let class = bundle
                .meta
                .classes
                .get(class_id as usize)
                .cloned()
                .unwrap_or_default();
            let score = outs.image_scores[i];
            let threshold = bundle.meta.thresholds.get(&class).map(|t| t.image);
            let result = ImageResult {
                image: path.display().to_string(),
                class,
                class_id,
                score,
                threshold,
                verdict: threshold.map(|t| if score >= t { "anomalous" } else { "normal" }),
                latency_ms: ((pre_ms + engine_ms) * 1000.0).round() / 1000.0,
            };
            if let Some(out) = &opts.out {
                let stem = output_stem(out, &root, path);
                if let Some(parent) = stem.parent() {
                    std::fs::create_dir_all(parent).map_err(PathError::on("create", parent))?;
                }
                let (h, w) = outs.map_hw;
                let npy = with_suffix(&stem, ".map.npy");
                crate::weights::npy::write_f32(&npy, &[h, w], outs.map(i))
                    .map_err(PathError::on("write", &npy))?;
                let png = with_suffix(&stem, ".overlay.png");
                overlay::heat_overlay(crop, outs.map(i), threshold)
                    .save(&png)
                    .map_err(|source| ToolError::WriteImage { path: png, source })?;
            }
            let line = serde_json::to_string(&result).map_err(|source| ToolError::Json {
                what: "a result line",
                source,
            })?;
            writeln!(stdout.lock(), "{line}").map_err(ToolError::Stdout)?;
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_keep_relative_folders() {
        let imgs = vec![
            PathBuf::from("/d/a/good/000.png"),
            PathBuf::from("/d/b/good/000.png"),
        ];
        let root = common_root(&imgs);
        assert_eq!(root, PathBuf::from("/d"));
        let out = Path::new("/o");
        assert_eq!(
            output_stem(out, &root, &imgs[0]),
            PathBuf::from("/o/a/good/000")
        );
        assert_eq!(
            output_stem(out, &root, &imgs[1]),
            PathBuf::from("/o/b/good/000")
        );
        let single = vec![PathBuf::from("/d/a/x.png")];
        assert_eq!(
            output_stem(out, &common_root(&single), &single[0]),
            PathBuf::from("/o/x")
        );
    }

    #[test]
    fn outputs_stay_inside_the_output_folder() {
        let out = Path::new("/results");
        let stem = output_stem(
            out,
            Path::new("/data"),
            Path::new("/data/../../etc/passwd.png"),
        );
        assert!(stem.starts_with(out), "{}", stem.display());
        assert!(
            stem.components()
                .all(|c| c != std::path::Component::ParentDir),
            "{}",
            stem.display()
        );
    }
}
