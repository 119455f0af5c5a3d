//! The images of one training run: the seeded hold-out of good images
//! ([`crate::dataset::holdout_split`]), the validation positives (the user's real defect
//! images, or else the held-out images again, each with a seeded synthetic defect painted
//! on), and their patch embeddings,
//! computed once by the embedding graph and cached in the work folder.

use super::TrainError;
use super::TrainOptions;
use super::features::{self, FeatureCache, Source};
use crate::backbone::Backbone;
use crate::dataset::{ClassData, holdout_split};
use crate::engine::EngineKind;
use crate::model::bundle::sha256_file;
use crate::model::graph::embedding_graph;
use crate::path_error::PathError;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

type Result<T> = std::result::Result<T, TrainError>;

/// Images per call of the embedding pass.
const EMBED_BATCH: usize = 8;

/// One labelled set of cached images.
pub(super) struct Split {
    pub cache: FeatureCache,
    /// Class index per cached image.
    pub classes: Vec<usize>,
}

impl Split {
    /// The embeddings of images `idx`, [idx.len() * patches, dim].
    pub fn batch(&self, idx: &[usize], dev: &Device) -> candle_core::Result<Tensor> {
        let (p, d) = (self.cache.patches, self.cache.dim);
        let mut v = Vec::with_capacity(idx.len() * p * d);
        for &i in idx {
            v.extend_from_slice(self.cache.image(i));
        }
        Tensor::from_vec(v, (idx.len() * p, d), dev)
    }
}

/// What training reads, embedded.
pub(super) struct TrainingData {
    pub train: Split,
    pub val: Split,
    /// Per validation image: true for a painted defect.
    pub val_labels: Vec<bool>,
    /// Good training images per class, hold-out included (provenance).
    pub per_class: BTreeMap<String, usize>,
    /// Good images held out for validation.
    pub val_good: usize,
    /// sha256 of the backbone weights file (provenance, cache key).
    pub weights_sha: String,
    /// The patch grid (rows, columns) of every embedding.
    pub grid: [usize; 2],
}

/// Image sources with their class index.
struct Sources {
    files: Vec<Source>,
    classes: Vec<usize>,
}

/// Holds out, paints the validation positives, and embeds everything (or reuses the
/// cache of an earlier run with the same inputs).
pub(super) fn prepare(
    o: &TrainOptions,
    classes: &[ClassData],
    backbone: &Backbone,
    grid: [usize; 2],
) -> Result<TrainingData> {
    let patches = grid[0] * grid[1];
    let (train, val, val_good) = sources(o, classes)?;
    let n = val.files.len() - val_good;
    let positives = match &o.val_defect_images {
        Some(dir) => format!("+{n} real defect images from {}", dir.display()),
        None => format!(
            "+{n} with synthetic defects at {} strengths",
            o.val_defect_strength.len()
        ),
    };
    tracing::info!(
        "{} classes; {} training and {} validation images ({positives}); {} patches x {} dims per image",
        classes.len(),
        train.files.len(),
        val_good,
        patches,
        o.embed_dim
    );
    let (h, w, d) = (o.input.height, o.input.width, o.embed_dim);
    let graph = embedding_graph(backbone, h, w, o.pre_dim, d)?;
    let mut engine = EngineKind::Onnxruntime.load(&graph, &o.engine_options)?;
    let weights_sha =
        sha256_file(&o.backbone_weights).map_err(PathError::on("read", &o.backbone_weights))?;
    let model_key = format!("{}:{weights_sha}:{}:{d}", o.backbone.name(), o.pre_dim);
    let mut embed = |s: &Sources, file: &str, label: &str| -> Result<(Split, Vec<usize>)> {
        let key = features::cache_key(&model_key, &o.input, &s.files);
        let (cache, kept) = features::extract(
            engine.as_mut(),
            &s.files,
            &o.input,
            patches,
            d,
            EMBED_BATCH,
            &o.work.join(file),
            key,
            label,
        )?;
        let classes = kept.iter().map(|&i| s.classes[i]).collect();
        Ok((Split { cache, classes }, kept))
    };
    let (train_split, _) = embed(&train, "train.features", "train")?;
    let (val_split, val_kept) = embed(&val, "val.features", "validation")?;
    for (ci, c) in classes.iter().enumerate() {
        if !train_split.classes.contains(&ci) {
            return Err(TrainError::NoImages(c.name.clone()));
        }
    }
    Ok(TrainingData {
        train: train_split,
        val: val_split,
        val_labels: val_kept.iter().map(|&i| i >= val_good).collect(),
        per_class: classes
            .iter()
            .map(|c| (c.name.clone(), c.train_good.len()))
            .collect(),
        val_good,
        weights_sha,
        grid,
    })
}

/// Training and validation sources; validation is the good hold-out followed by its
/// positives: the real defect images when given, else the same images with a seeded
/// synthetic defect each. Returns the hold-out's size too.
fn sources(o: &TrainOptions, classes: &[ClassData]) -> Result<(Sources, Sources, usize)> {
    let mut train = Sources {
        files: Vec::new(),
        classes: Vec::new(),
    };
    let mut val = Sources {
        files: Vec::new(),
        classes: Vec::new(),
    };
    for (ci, (t, v)) in holdout_split(classes, o.holdout_seed, o.val_fraction)?
        .into_iter()
        .enumerate()
    {
        train.files.extend(t.into_iter().map(Source::File));
        train.classes.resize(train.files.len(), ci);
        val.files.extend(v.into_iter().map(Source::File));
        val.classes.resize(val.files.len(), ci);
    }
    let val_good = val.files.len();
    if let Some(dir) = &o.val_defect_images {
        let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
        for (ci, files) in crate::dataset::defect_images(dir, &names)?
            .into_iter()
            .enumerate()
        {
            val.files.extend(files.into_iter().map(Source::File));
            val.classes.resize(val.files.len(), ci);
        }
        return Ok((train, val, val_good));
    }
    // One painted copy per strength, with the same defect (same seed) at each: the
    // pooled AUROC is the mean of the per-strength AUROCs, since every strength has as
    // many positives as there are good images.
    for &s in &o.val_defect_strength {
        for k in 0..val_good {
            let painted = Source::validation_positive(
                val.files[k].path().to_path_buf(),
                o.holdout_seed,
                k,
                s,
                o.val_defects,
            );
            val.files.push(painted);
            val.classes.push(val.classes[k]);
        }
    }
    Ok((train, val, val_good))
}
