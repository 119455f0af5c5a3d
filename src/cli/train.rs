//! `cras train`: a multi-class model from good images.

use anyhow::{Context, Result};
use clap::Args;
use cras::backbone::BackboneSpec;
use cras::preprocess::{InputSpec, Normalization};
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
    /// be]
    #[arg(long)]
    pub resize: Option<usize>,
    /// Embedding width D [default: 384 for efficientnet_lite0, 1536 for the ResNets]
    #[arg(long)]
    pub embed_dim: Option<usize>,
    /// Per-stage pooled width before fusion [default: the embedding width]
    #[arg(long)]
    pub pretrain_embed_dim: Option<usize>,
    /// Training epochs.
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Adaptor learning rate (AdamW, weight decay 0.01).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Scorer learning rate (Adam, L2 1e-5).
    #[arg(long, default_value_t = 2e-4)]
    pub scorer_lr: f64,
    /// Standard deviation of the synthetic-anomaly noise (sigma).
    #[arg(long, default_value_t = 0.015)]
    pub noise: f64,
    /// Noise sigma relative to the adapted features' spread (mean per-dimension std at
    /// initialisation), instead of --noise: e.g. 0.05. The paper's absolute 0.015 is 0.4%
    /// of EfficientNet-Lite0's feature spread, too small for the scorer to learn from.
    #[arg(long, conflicts_with = "noise")]
    pub noise_relative: Option<f64>,
    /// Shrink of the distance-guided noise scale towards 1 (k).
    #[arg(long, default_value_t = 0.3)]
    pub noise_k: f64,
    /// Fraction of good training images held out per class to choose the epoch.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Strength of the synthetic defects painted on the validation images (0-1]: lower it
    /// when validation AUROC saturates at 1.0 (every painted defect obvious), so that it
    /// still ranks epochs and settings.
    #[arg(long, default_value_t = 1.0)]
    pub val_defect_strength: f64,
    /// Kinds of synthetic defect painted on validation positives, comma-separated, from
    /// scratch, spot, missing, crack. Pick the ones that look like your product's real
    /// defects: the epoch and settings are chosen on them.
    #[arg(long, default_value = "scratch,spot,missing,crack")]
    pub val_defects: String,
    /// Random seed (split, initialisation, noise, shuffling).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue an interrupted run from the checkpoint in the work folder.
    #[arg(long)]
    pub resume: bool,
    /// Input normalisation.
    #[arg(long, value_enum, default_value = "imagenet")]
    pub normalization: Normalization,
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
        // Not the paper's 329/288 margin: a model that crops never sees the outer
        // ring of each camera frame (docs/decisions.md, "Whole frame").
        let resize = self.resize.unwrap_or(self.image_size);
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
            input: InputSpec::square(self.image_size, resize, self.normalization),
            embed_dim,
            pre_dim: self.pretrain_embed_dim.unwrap_or(embed_dim),
            epochs: self.epochs,
            batch: self.batch,
            adaptor_lr: self.lr,
            scorer_lr: self.scorer_lr,
            noise_std: self.noise,
            noise_relative: self.noise_relative,
            noise_k: self.noise_k,
            val_fraction: self.val_fraction,
            val_defect_strength: self.val_defect_strength,
            val_defects: cras::synth::DefectKinds::parse(&self.val_defects)
                .context("--val-defects")?,
            seed: self.seed,
            resume: self.resume,
            engine_options: self.runtime.options(8),
            device: self.device,
        };
        cras::train::train(&opts, &data, interrupted)?;
        Ok(ExitCode::SUCCESS)
    }
}
