//! `cras train`: a multi-class model from good images.

use anyhow::{Context, Result};
use clap::Args;
use cras::backbone::BackboneSpec;
use cras::preprocess::{InputSpec, Normalization};
use cras::train::recipe::{Noise, Recipe, Resize};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct TrainArgs {
    /// Dataset root in MVTec layout (<class>/train/good/*.png).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Classes to train, comma separated [default: every class folder under --data]
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Backbone as NAME or NAME=WEIGHTS (NAME alone uses the weights `cras setup --backbone NAME` installed).
    #[arg(long, value_name = "NAME[=PATH]", value_parser = cras::setup::backbone_spec)]
    pub backbone: BackboneSpec,
    /// Output bundle directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Work folder for the embedding cache and checkpoints [default: <out>.work]
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Network input size (square crop).
    #[arg(long, default_value_t = 288)]
    pub image_size: usize,
    /// Shorter side before the centre crop [default: the image size, so a square frame is
    /// inspected whole; the paper's 329 for 288 drops 6% of each edge, where defects can
    /// be; --paper: 329 for 288]
    #[arg(long)]
    pub resize: Option<usize>,
    /// Embedding width D [default: 384 for the efficientnet_lite backbones, 1536 for the ResNets]
    #[arg(long)]
    pub embed_dim: Option<usize>,
    /// Per-stage pooled width before fusion [default: the embedding width]
    #[arg(long)]
    pub pretrain_embed_dim: Option<usize>,
    /// The paper's settings instead of the default recipe, for comparison: 100 epochs,
    /// batch 32, absolute noise 0.015, ImageNet scaling, resize 329 for 288, every
    /// validation defect kind at full strength. Explicit flags still override.
    #[arg(long)]
    pub paper: bool,
    /// Training epochs; the best one on validation is kept [default: 4; --paper: 100]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step [default: 16; --paper: 32]
    #[arg(long)]
    pub batch: Option<usize>,
    /// Adaptor learning rate (AdamW, weight decay 0.01).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Scorer learning rate (Adam, L2 1e-5).
    #[arg(long, default_value_t = 2e-4)]
    pub scorer_lr: f64,
    /// Absolute standard deviation of the synthetic-anomaly noise (sigma), instead of the
    /// relative default [--paper: 0.015]
    #[arg(long, conflicts_with = "noise_relative")]
    pub noise: Option<f64>,
    /// Noise sigma relative to the adapted features' spread (mean per-dimension std at
    /// initialisation) [default: 0.4]. The paper's absolute 0.015 is 0.4% of
    /// EfficientNet-Lite0's feature spread, too small for the scorer to learn from.
    #[arg(long)]
    pub noise_relative: Option<f64>,
    /// Shrink of the distance-guided noise scale towards 1 (k).
    #[arg(long, default_value_t = 0.3)]
    pub noise_k: f64,
    /// Fraction of good training images held out per class to choose the epoch.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Strengths of the synthetic defects painted on the validation images, each in (0, 1],
    /// comma-separated: every held-out image is painted once per strength, and validation
    /// AUROC is the mean over them, so that it still ranks epochs where the strong ones
    /// are all obvious (AUROC 1.0) or the weak ones all invisible (0.5)
    /// [default: 0.1,0.3,1; --paper: 1]
    #[arg(long, value_delimiter = ',')]
    pub val_defect_strength: Option<Vec<f64>>,
    /// Kinds of synthetic defect painted on validation positives, comma-separated, from
    /// scratch, spot, missing, crack. Pick the ones that look like your product's real
    /// defects: the epoch is chosen on them [default: crack; --paper: all four]
    #[arg(long)]
    pub val_defects: Option<String>,
    /// Real defective images as the validation positives, in DIR/<class>/ (classes
    /// without a folder simply have none), instead of painted defects: the epoch is
    /// chosen on how well the model tells them from the held-out good images. A few
    /// dozen images of the line's own defects see differences between models that
    /// painted ones do not (docs/decisions.md). They are never trained on.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["val_defects", "val_defect_strength"])]
    pub val_defect_images: Option<PathBuf>,
    /// How the image score is taken from the anomaly map: map-top:FRACTION, the mean of
    /// that fraction of the smoothed map's highest pixels, or patch-max, the largest
    /// patch score (the paper's). Validation chooses the epoch with it and the graph
    /// scores with it [default: map-top:0.005; --paper: patch-max]
    #[arg(long, value_name = "RULE", value_parser = cras::model::score::ImageScore::parse)]
    pub image_score: Option<cras::model::score::ImageScore>,
    /// The orientations the graph scores each image in, their maps averaged: original
    /// first, then any of flip_h, flip_v, rotate180. Each view costs one more pass of
    /// the whole model per image; validation still scores the original alone. Off by
    /// default: on ELPV they helped painted validation but not the test (docs/decisions.md)
    /// [default: original]
    #[arg(long, value_name = "VIEWS", value_parser = cras::model::views::Views::parse)]
    pub views: Option<cras::model::views::Views>,
    /// Random seed (split, initialisation, noise, shuffling).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the validation hold-out and its painted defects alone [default: --seed].
    /// Different --seed with one --holdout-seed trains on the same images and selects on
    /// the same validation set: what moves is the training's own randomness.
    #[arg(long)]
    pub holdout_seed: Option<u64>,
    /// Train this many runs, from seeds --seed, --seed + 1, ..., over the same embeddings
    /// and hold-out (--holdout-seed defaults to --seed), and keep the one whose selected
    /// epoch does best on validation. Seeds move a result more than most settings; this
    /// picks among them on validation, so give --val-defect-images: painted defects did
    /// not rank runs as a real test did (docs/decisions.md). Costs one training per run.
    #[arg(long, default_value_t = 1)]
    pub restarts: usize,
    /// Continue an interrupted run from the checkpoint in the work folder.
    #[arg(long)]
    pub resume: bool,
    /// Input normalisation [default: the backbone's own: tflite for efficientnet_lite*,
    /// imagenet for the ResNets; --paper: imagenet]
    #[arg(long, value_enum)]
    pub normalization: Option<Normalization>,
    /// onnxruntime for the embedding pass.
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
    /// Device for the training steps: cpu, cuda (GPU 0) or cuda:N. CUDA needs a build
    /// with `--features cuda`; the embedding pass runs on onnxruntime either way.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: cras::train::TrainDevice,
}

impl TrainArgs {
    pub fn run(self) -> Result<ExitCode> {
        crate::keep_freed_memory();
        let classes = if self.classes.is_empty() {
            cras::dataset::discover_classes(&self.data)?
        } else {
            self.classes.clone()
        };
        let data = cras::dataset::open(&self.data, &classes)?;
        let embed_dim = self
            .embed_dim
            .unwrap_or(self.backbone.kind.default_embed_dim());
        let recipe = self.recipe()?;
        let interrupted = cras::train::interrupt_flag()?;
        let work = self
            .work
            .clone()
            .unwrap_or_else(|| cras::train::default_work_folder(&self.out));
        let opts = cras::train::TrainOptions {
            data: self.data.clone(),
            classes,
            backbone: self.backbone.kind,
            backbone_weights: self.backbone.weights.clone(),
            out: self.out.clone(),
            work,
            input: InputSpec::square(
                self.image_size,
                recipe.resize.shorter_side(self.image_size),
                recipe.normalization,
            ),
            embed_dim,
            pre_dim: self.pretrain_embed_dim.unwrap_or(embed_dim),
            epochs: recipe.epochs,
            batch: recipe.batch,
            adaptor_lr: self.lr,
            scorer_lr: self.scorer_lr,
            noise: recipe.noise,
            noise_k: self.noise_k,
            val_fraction: self.val_fraction,
            val_defect_strength: recipe.val_defect_strength,
            val_defects: recipe.val_defects,
            image_score: recipe.image_score,
            views: recipe.views,
            val_defect_images: self.val_defect_images.clone(),
            restarts: self.restarts,
            recipe: if self.paper { "paper" } else { "default" }.into(),
            seed: self.seed,
            holdout_seed: self.holdout_seed.unwrap_or(self.seed),
            resume: self.resume,
            engine_options: self.runtime.options(8),
            device: self.device,
        };
        cras::train::train(&opts, &data, interrupted)?;
        Ok(ExitCode::SUCCESS)
    }

    /// The default recipe (or the paper's), with every explicit flag applied on top.
    fn recipe(&self) -> Result<Recipe> {
        let mut r = if self.paper {
            Recipe::paper()
        } else {
            Recipe::default_for(self.backbone.kind)
        };
        if let Some(e) = self.epochs {
            r.epochs = e;
        }
        if let Some(b) = self.batch {
            r.batch = b;
        }
        if let Some(sigma) = self.noise {
            r.noise = Noise::Absolute(sigma);
        }
        if let Some(rel) = self.noise_relative {
            r.noise = Noise::Relative(rel);
        }
        if let Some(n) = self.normalization {
            r.normalization = n;
        }
        if let Some(size) = self.resize {
            r.resize = Resize::To(size);
        }
        if let Some(kinds) = &self.val_defects {
            r.val_defects = cras::synth::DefectKinds::parse(kinds).context("--val-defects")?;
        }
        if let Some(s) = &self.val_defect_strength {
            r.val_defect_strength = s.clone();
        }
        if let Some(rule) = self.image_score {
            r.image_score = rule;
        }
        if let Some(views) = &self.views {
            r.views = views.clone();
        }
        Ok(r)
    }
}
