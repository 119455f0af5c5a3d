//! `cras add-class`: a new product class in a trained model without training.
//!
//! The adaptor and scorer stay as trained. The new class gets what training gives every
//! class that does not depend on the loss: its centers, the per-patch mean of its good
//! images' adapted features (here under the trained adaptor, which maps the mean of the
//! embeddings exactly as it maps each one: `mean(W x + b) = W mean(x) + b`), and its
//! thresholds, calibrated on a hold-out of its own good images that the centers never saw.
//! The graph is rebuilt with the centers appended and written as a new bundle; the model
//! it came from is not touched.
//!
//! The other classes' outputs on their own images do not change: their centers, the
//! adaptor and the scorer are the same numbers, and an image's class is the argmax over
//! classes, which only moves if the new class's center is the nearest one.

use crate::calibrate::{score, threshold_from_good};
use crate::engine::{EngineKind, EngineOptions};
use crate::model::bundle::{AddedClass, Bundle, ClassThresholds};
use crate::model::graph::{CrasModel, embedding_graph};
use crate::model::head::{Centers, CrasHead};
use crate::path_error::PathError;
use crate::preprocess;
use crate::tool_error::{Result, ToolError};
use std::path::PathBuf;
use std::time::Instant;

pub struct AddClassOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub class: String,
    pub out: PathBuf,
    pub backbone_weights: PathBuf,
    /// Fraction of the class's good images held out for its thresholds.
    pub holdout_fraction: f64,
    pub quantile: f64,
    pub pixel_quantile: f64,
    pub margin: f64,
    pub engine_options: EngineOptions,
}

/// What the new bundle got, for the command's summary.
pub struct Added {
    pub bundle: Bundle,
    pub record: AddedClass,
    pub thresholds: ClassThresholds,
}

/// Images per call of the embedding pass.
const EMBED_BATCH: usize = 8;

pub fn run(o: &AddClassOptions) -> Result<Added> {
    let started = Instant::now();
    crate::calibrate::check_rule(o.quantile, o.pixel_quantile, o.margin)?;
    let old = Bundle::read(&o.model)?;
    check_target(o, &old)?;
    let mut head_sd = old.read_head()?;
    let stored_centers = head_sd.tensors.remove(crate::train::CENTERS_KEY);
    let meta = &old.meta;
    let backbone = crate::rebuild::trained_backbone(&old, &o.backbone_weights, &o.engine_options)?;
    let class = crate::dataset::open(&o.data, std::slice::from_ref(&o.class))?
        .pop()
        .ok_or_else(|| ToolError::Data(format!("class `{}`: not found", o.class)))?;
    let seed = meta
        .provenance
        .training
        .as_ref()
        .map_or(0, |t| t.holdout_seed());
    let (center_paths, held_out) = crate::dataset::holdout_class(&class, seed, o.holdout_fraction)?;

    // The centers: the mean embedding per patch, then the trained adaptor.
    let head = CrasHead::from_state_dict(&head_sd)?;
    let pre_dim = crate::rebuild::recorded_pre_dim(&old);
    let (h, w, d) = (meta.input.height, meta.input.width, meta.embed_dim);
    let patches = meta.patch_grid[0] * meta.patch_grid[1];
    let graph = embedding_graph(&backbone, h, w, pre_dim, d)?;
    let mut engine = EngineKind::Onnxruntime.load(&graph, &o.engine_options)?;
    let mean = mean_embedding(engine.as_mut(), &center_paths, &meta.input, patches, d)?;
    let new_centers = adapt(&head, &mean.values, patches);
    drop(engine);

    let old_centers =
        crate::rebuild::head_centers(stored_centers, [meta.classes.len(), patches, d], &old.dir)?;
    let mut data = old_centers;
    data.extend_from_slice(&new_centers);
    let centers = Centers {
        classes: meta.classes.len() + 1,
        patches,
        dim: d,
        data,
    };
    let onnx = CrasModel {
        backbone: &backbone,
        head: &head,
        centers: &centers,
        height: h,
        width: w,
        pre_dim,
        image_score: meta.image_score,
        views: meta.views.clone(),
    }
    .to_onnx(Default::default())?;
    let head_file = crate::train::head_file(head_sd.tensors, &centers)
        .map_err(PathError::on("serialise the head", &o.out))?;

    // Thresholds from the held-out good images, scored by the new graph before anything
    // is written: a failure leaves no half-made bundle behind.
    let mut engine = EngineKind::Onnxruntime.load(
        &onnx,
        &EngineOptions {
            batch: 4,
            input_hw: (h, w),
            ..o.engine_options.clone()
        },
    )?;
    let mut s = score(engine.as_mut(), &meta.input, &held_out)?;
    drop(engine);
    if s.image.is_empty() {
        return Err(ToolError::Data(format!(
            "class `{}`: no readable held-out image to calibrate on",
            class.name
        )));
    }
    let new_id = meta.classes.len() as i64;
    let thresholds = ClassThresholds {
        image: threshold_from_good(&mut s.image, o.quantile, o.margin) as f32,
        pixel: Some(threshold_from_good(&mut s.pixels, o.pixel_quantile, o.margin) as f32),
    };
    crate::calibrate::warn_if_saturated(&class.name, thresholds.image as f64);
    let record = AddedClass {
        class: class.name.clone(),
        dataset: o.data.display().to_string(),
        data_sha256: crate::train::sha_of_sources(&class.train_good, &o.data)?,
        center_images: mean.images,
        holdout_images: s.image.len(),
        seed,
        holdout_fraction: o.holdout_fraction,
        holdout_chosen: s.class_ids.iter().filter(|&&c| c == new_id).count(),
        added_at: crate::clock::unix_secs(),
        seconds: started.elapsed().as_secs_f64(),
    };

    let mut new_meta = meta.clone();
    new_meta.classes.push(class.name.clone());
    new_meta
        .thresholds
        .insert(class.name.clone(), thresholds.clone());
    new_meta.provenance.added_classes.push(record.clone());
    let bundle = Bundle::write(&o.out, new_meta, &onnx, Some(&head_file))?;
    Ok(Added {
        bundle,
        record,
        thresholds,
    })
}

/// Refuses a class the model has, and an output that would overwrite a bundle.
fn check_target(o: &AddClassOptions, old: &Bundle) -> Result<()> {
    if old.meta.classes.contains(&o.class) {
        return Err(ToolError::Options(format!(
            "class `{}` is already in {} (classes: {})",
            o.class,
            o.model.display(),
            old.meta.classes.join(", ")
        )));
    }
    crate::rebuild::check_out(&o.out, &o.model)
}

struct MeanEmbedding {
    /// [patches * dim], the mean over images.
    values: Vec<f64>,
    images: usize,
}

/// The per-patch mean of the images' embeddings (before the adaptor). Unreadable
/// images are skipped with a warning.
fn mean_embedding(
    engine: &mut dyn crate::engine::Engine,
    paths: &[PathBuf],
    spec: &preprocess::InputSpec,
    patches: usize,
    dim: usize,
) -> Result<MeanEmbedding> {
    let mut sum = vec![0f64; patches * dim];
    let mut images = 0;
    let mut last_note = Instant::now();
    for (k, chunk) in paths.chunks(EMBED_BATCH).enumerate() {
        let (mut input, n) = preprocess::prepare_readable(chunk, spec);
        if n == 0 {
            continue;
        }
        let outs = crate::engine::run_padded(engine, &mut input, n, (spec.height, spec.width))?;
        // The input now holds the padded batch the engine ran.
        let ran = input.len() / (3 * spec.height * spec.width);
        let emb = outs
            .iter()
            .find(|t| t.name == "embedding")
            .and_then(|t| t.f32())
            .filter(|e| e.len() == ran * patches * dim)
            .ok_or_else(|| {
                ToolError::Data("the embedding graph gave no embedding of the expected size".into())
            })?;
        for img in emb[..n * patches * dim].chunks_exact(patches * dim) {
            for (s, v) in sum.iter_mut().zip(img) {
                *s += *v as f64;
            }
        }
        images += n;
        if last_note.elapsed().as_secs() >= 10 {
            eprintln!(
                "embedded {} of {} images",
                ((k + 1) * EMBED_BATCH).min(paths.len()),
                paths.len()
            );
            last_note = Instant::now();
        }
    }
    if images == 0 {
        return Err(ToolError::Data(
            "no readable good image to compute the class's centers from".into(),
        ));
    }
    sum.iter_mut().for_each(|s| *s /= images as f64);
    Ok(MeanEmbedding {
        values: sum,
        images,
    })
}

/// The adaptor applied to each patch row of `mean` ([patches * dim]): W x + b.
fn adapt(head: &CrasHead, mean: &[f64], patches: usize) -> Vec<f32> {
    let d = head.embed_dim;
    let mut out = Vec::with_capacity(patches * d);
    for row in mean.chunks_exact(d).take(patches) {
        for o in 0..d {
            let w = &head.adaptor_weight[o * d..(o + 1) * d];
            let dot: f64 = w.iter().zip(row).map(|(a, b)| *a as f64 * b).sum();
            out.push((dot + head.adaptor_bias[o] as f64) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::head::ScorerLayer;

    #[test]
    fn the_adaptor_maps_each_patch_row() {
        // W = [[1, 2], [3, 4]] (PyTorch [out, in]), b = [0.5, -1].
        let head = CrasHead {
            embed_dim: 2,
            adaptor_weight: vec![1.0, 2.0, 3.0, 4.0],
            adaptor_bias: vec![0.5, -1.0],
            hidden: Vec::<ScorerLayer>::new(),
            tail: vec![],
        };
        let out = adapt(&head, &[1.0, 1.0, 0.0, 2.0], 2);
        assert_eq!(out, vec![3.5, 6.0, 4.5, 7.0]);
    }
}
