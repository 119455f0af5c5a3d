//! `cras train`: the method's training (docs/architecture.md, "Training") on cached embeddings.
//!
//! The backbone is frozen and training uses no augmentation, so every image's patch
//! embedding is computed once (onnxruntime, the same graph as inference) and cached on
//! disk ([`features`]). The adaptor and the scorer ([`params`]) train with candle on the
//! [`device`]: centers from the initial adaptor ([`centers`]), distance-guided Gaussian
//! noise on the adapted features, BCE on normal vs synthetic patches ([`epoch`]), AdamW
//! (adaptor) and Adam with L2 (scorer) ([`adam`]). Every epoch is checkpointed
//! ([`checkpoint`]); one run's loop is [`run`]; the selected epoch is exported as a
//! bundle ([`export`]). `--restarts` trains several runs over the same embeddings and
//! keeps the best on validation.
//!
//! Model selection never looks at the test split: a held-out part of the good training
//! images is scored each epoch against the same images with synthetic defects painted on
//! (`synth` defects: scratch, spot, missing part, crack), or against the user's real
//! defect images (`--val-defect-images`), and the epoch with the best image AUROC on that
//! validation set is kept (ties: the earlier epoch).

mod adam;
mod batchnorm;
mod centers;
mod checkpoint;
mod data;
mod device;
mod epoch;
mod error;
mod export;
pub mod features;
mod kernels;
mod params;
pub mod recipe;
mod run;
mod step;

pub use device::TrainDevice;
pub use error::TrainError;
pub use export::{CENTERS_KEY, head_file, sha_of_sources};

use crate::backbone::{Backbone, BackboneKind};
use crate::dataset::ClassData;
use crate::engine::EngineOptions;
use crate::model::bundle::{Bundle, RestartRecord};
use crate::model::head::Centers;
use crate::path_error::PathError;
use crate::preprocess::InputSpec;
use run::{Run, train_once};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

type Result<T> = std::result::Result<T, TrainError>;

/// Training options (the CLI fills them from a [`recipe::Recipe`]).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub classes: Vec<String>,
    pub backbone: BackboneKind,
    pub backbone_weights: PathBuf,
    pub out: PathBuf,
    pub work: PathBuf,
    pub input: InputSpec,
    pub embed_dim: usize,
    pub pre_dim: usize,
    pub epochs: usize,
    pub batch: usize,
    pub adaptor_lr: f64,
    pub scorer_lr: f64,
    /// The synthetic anomalies' noise level: sigma itself, or relative to the adapted
    /// features' spread at initialisation.
    pub noise: recipe::Noise,
    pub noise_k: f64,
    pub val_fraction: f64,
    /// Blends of the validation positives' synthetic defects (1: full strength): each
    /// held-out image is painted once per strength.
    pub val_defect_strength: Vec<f64>,
    /// The kinds of synthetic defect validation positives are drawn from.
    pub val_defects: crate::synth::DefectKinds,
    /// How the image score is taken: validation chooses the epoch with it and the
    /// graph is written with it.
    pub image_score: crate::model::score::ImageScore,
    /// The orientations the graph scores each image in (validation scores the original).
    pub views: crate::model::views::Views,
    /// Real defective images (`<dir>/<class>/*`) as the validation positives instead of
    /// painted ones.
    pub val_defect_images: Option<PathBuf>,
    /// Runs from seeds `seed`, `seed + 1`, ...; the best on validation is kept.
    pub restarts: usize,
    /// Which recipe the settings came from (`default`, `paper`), for the record.
    pub recipe: String,
    pub seed: u64,
    /// Seed of the validation hold-out and of its painted defects.
    pub holdout_seed: u64,
    pub resume: bool,
    pub engine_options: EngineOptions,
    /// Where the training steps run. The embedding pass always runs on the engine in
    /// `engine_options`.
    pub device: TrainDevice,
}

impl TrainOptions {
    /// Refuses options no run could use, before any work.
    pub fn check(&self) -> Result<()> {
        let d = self.embed_dim;
        let bad = |why: String| Err(TrainError::Options(why));
        if d < 2 || !d.is_multiple_of(2) {
            return bad("--embed-dim must be an even number >= 2".into());
        }
        self.image_score.check().map_err(TrainError::Options)?;
        if self.batch == 0 || self.epochs == 0 {
            return bad("--batch and --epochs must be at least 1".into());
        }
        if self.input.resize < self.input.height {
            return bad(format!(
                "--resize ({}) must be at least --image-size ({})",
                self.input.resize, self.input.height
            ));
        }
        if self.val_defect_strength.is_empty()
            || self
                .val_defect_strength
                .iter()
                .any(|s| !(*s > 0.0 && *s <= 1.0))
        {
            return bad(format!(
                "--val-defect-strength {:?}: give strengths in (0, 1]",
                self.val_defect_strength
            ));
        }
        if self.restarts == 0 || (self.restarts > 1 && self.val_fraction <= 0.0) {
            return bad(format!(
                "--restarts {}: give at least 1, and more than 1 only with a validation \
                 hold-out to choose on (--val-fraction above 0)",
                self.restarts
            ));
        }
        if self.val_defect_images.is_some() && self.val_fraction <= 0.0 {
            return bad(
                "--val-defect-images needs held-out good images to tell them from: \
                 --val-fraction must be above 0"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The work folder (embedding cache, checkpoints) of a bundle written to `out`:
/// `<out>.work` beside it.
pub fn default_work_folder(out: &std::path::Path) -> PathBuf {
    let mut w = out.as_os_str().to_owned();
    w.push(".work");
    PathBuf::from(w)
}

/// A flag that SIGINT and SIGTERM set: training stops after the current step, and the
/// last completed epoch stays in the checkpoint for `--resume`.
pub fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone()).map_err(TrainError::Signals)?;
    }
    Ok(flag)
}

/// Runs training and writes the bundle.
pub fn train(
    o: &TrainOptions,
    classes: &[ClassData],
    interrupted: Arc<AtomicBool>,
) -> Result<Bundle> {
    o.check()?;
    let dev = o.device.open()?;
    std::fs::create_dir_all(&o.work).map_err(PathError::on("create the work folder", &o.work))?;
    let backbone = Backbone::load(o.backbone, &o.backbone_weights)?;
    let ((ha, wa), _) = backbone.stage_sizes(o.input.height, o.input.width);
    let shape = [classes.len(), ha * wa, o.embed_dim];

    // 1. The seeded hold-out and every image's embedding, once.
    let data = data::prepare(o, classes, &backbone, [ha, wa])?;

    // 2-4. One run per seed (`--restarts`), each in its own checkpoint folder; the best
    // on validation is kept (ties: the earlier seed).
    if o.restarts > 1 && o.val_defect_images.is_none() {
        tracing::warn!(
            "--restarts {} chooses on painted validation defects, which did not rank runs as a \
             real test did on ELPV (docs/decisions.md); give --val-defect-images if you can",
            o.restarts
        );
    }
    let mut best: Option<Run> = None;
    let mut restarts = Vec::new();
    for r in 0..o.restarts {
        let seed = o.seed.wrapping_add(r as u64);
        let folder = if o.restarts > 1 {
            tracing::info!("restart {}/{}: seed {seed}", r + 1, o.restarts);
            o.work.join(format!("restart-{r}"))
        } else {
            o.work.clone()
        };
        let run = train_once(o, seed, &folder, &dev, &data, shape, &interrupted)?;
        let (epoch, auroc) = (run.progress.state.best_epoch, run.progress.state.best_auroc);
        restarts.push(RestartRecord {
            seed,
            selected_epoch: epoch.unwrap_or(o.epochs),
            validation_auroc: auroc,
        });
        if best.as_ref().is_none_or(|b| {
            auroc.unwrap_or(f64::MIN) > b.progress.state.best_auroc.unwrap_or(f64::MIN)
        }) {
            best = Some(run);
        }
    }
    let Some(best) = best else {
        return Err(TrainError::Options("--restarts must be at least 1".into()));
    };
    if o.restarts > 1 {
        let line: Vec<String> = restarts
            .iter()
            .map(|r| {
                let v = r
                    .validation_auroc
                    .map_or("n/a".into(), |a| format!("{a:.4}"));
                format!("seed {} {v}", r.seed)
            })
            .collect();
        tracing::info!(
            "restarts on validation: {}; kept seed {}",
            line.join(", "),
            best.seed
        );
    }

    // 5. The selected epoch of the kept run as a bundle; its seed is the record's seed.
    let chosen = TrainOptions {
        seed: best.seed,
        ..o.clone()
    };
    let centers = Centers {
        classes: shape[0],
        patches: shape[1],
        dim: shape[2],
        data: best.centers,
    };
    let kept = export::Kept {
        progress: best.progress,
        centers,
        restarts: if o.restarts > 1 { restarts } else { Vec::new() },
    };
    export::write_bundle(&chosen, classes, &backbone, &data, kept, [ha, wa])
}
