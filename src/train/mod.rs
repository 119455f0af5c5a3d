//! `cras train`: the method's training (docs/architecture.md, "Training") on cached embeddings.
//!
//! The backbone is frozen and training uses no augmentation, so every image's patch
//! embedding is computed once (onnxruntime, the same graph as inference) and cached on
//! disk ([`features`]). The adaptor and the scorer ([`params`]) train with candle on the
//! [`device`]: centers from the initial adaptor ([`centers`]), distance-guided Gaussian
//! noise on the adapted features, BCE on normal vs synthetic patches ([`epoch`]), AdamW
//! (adaptor) and Adam with L2 (scorer) ([`adam`]). Every epoch is checkpointed
//! ([`checkpoint`]); the selected one is exported as a bundle ([`export`]).
//!
//! Model selection never looks at the test split: a held-out part of the good training
//! images is scored each epoch against the same images with synthetic defects painted on
//! (`synth` defects: scratch, spot, missing part, crack), and the epoch with the best
//! image AUROC on that validation set is kept (ties: the earlier epoch).

mod adam;
mod centers;
mod checkpoint;
mod data;
mod device;
mod epoch;
mod error;
mod export;
pub mod features;
mod params;
pub mod recipe;

pub use device::TrainDevice;
pub use error::TrainError;
pub use export::{CENTERS_KEY, head_file, sha_of_sources};

use crate::backbone::{Backbone, BackboneKind};
use crate::dataset::ClassData;
use crate::engine::EngineOptions;
use crate::model::bundle::{Bundle, EpochRecord};
use crate::model::head::Centers;
use crate::path_error::PathError;
use crate::preprocess::InputSpec;
use crate::rng::Rng;
use adam::Adam;
use candle_core::Device;
use centers::{CenterBank, CenterSums};
use checkpoint::{Checkpoint, CheckpointState, Progress};
use data::{Split, TrainingData};
use epoch::{EpochStats, Trainer};
use params::Params;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

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
    /// Real defective images (`<dir>/<class>/*`) as the validation positives instead of
    /// painted ones.
    pub val_defect_images: Option<PathBuf>,
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
    let data = data::prepare(o, classes, &backbone, shape[1])?;

    // 2. The network and its optimisers; 3. the centers under the initial adaptor (or
    // everything from the checkpoint of an interrupted run).
    let mut rng = Rng::new(o.seed);
    let params = Params::init(o.embed_dim, &mut rng, &dev)?;
    let ckpt = Checkpoint::in_folder(&o.work);
    let resuming = o.resume && ckpt.exists();
    if o.resume && !resuming {
        tracing::warn!(
            "--resume: no checkpoint in {}; starting afresh",
            o.work.display()
        );
    }
    let (centers, sigma) = if resuming {
        (ckpt.load_centers(shape)?, None)
    } else {
        let (centers, sigma) = initial_centers(o, &params, &dev, &data.train, shape)?;
        ckpt.save_centers(&centers, shape)?;
        (centers, Some(sigma))
    };
    let mut trainer = Trainer {
        adaptor_opt: Adam::new(&params.adaptor_vars(), o.adaptor_lr, 0.01, true)?,
        scorer_opt: Adam::new(&params.scorer_vars(), o.scorer_lr, 1e-5, false)?,
        params,
        bank: CenterBank::new(centers.clone(), shape[0], shape[1], shape[2], &dev)?,
        rng,
        dev,
        sigma: 0.0, // set below, from the fresh run or the checkpoint
        noise_k: o.noise_k,
        batch: o.batch,
    };
    let mut progress = match sigma {
        Some(sigma) => Progress {
            state: CheckpointState::fresh(sigma),
            best: None,
        },
        None => {
            let progress = ckpt.load(&mut trainer)?;
            tracing::info!(
                "resuming at epoch {} from {}",
                progress.state.next_epoch + 1,
                o.work.display()
            );
            progress
        }
    };
    trainer.sigma = match (progress.state.noise_sigma, o.noise) {
        (Some(sigma), _) => sigma,
        (None, recipe::Noise::Absolute(sigma)) => sigma,
        (None, recipe::Noise::Relative(_)) => {
            return Err(TrainError::Options(format!(
                "the checkpoint in {} records no noise sigma (an older run) to resume relative noise with; \
                 train again without --resume",
                o.work.display()
            )));
        }
    };

    // 4. The epochs, each scored on validation and checkpointed.
    for epoch in progress.state.next_epoch..o.epochs {
        let t0 = Instant::now();
        let stats = trainer.epoch(&data.train, epoch, o.epochs, &interrupted)?;
        if stats.interrupted {
            // The partial epoch is discarded: the checkpoint holds the last full epoch.
            return Err(TrainError::Interrupted {
                epoch: epoch + 1,
                work: o.work.clone(),
            });
        }
        let val_auroc = trainer.validate(&data.val, &data.val_labels)?;
        record_epoch(
            o,
            &mut progress,
            &trainer,
            &data,
            epoch,
            &stats,
            val_auroc,
            t0,
        )?;
        ckpt.save(&trainer, &progress)?;
    }

    // 5. The selected epoch as a bundle.
    let centers = Centers {
        classes: shape[0],
        patches: shape[1],
        dim: shape[2],
        data: centers,
    };
    export::write_bundle(o, classes, &backbone, &data, &progress, centers, [ha, wa])
}

/// The centers under the freshly initialised adaptor, and the noise sigma: `--noise`, or
/// `--noise-relative` times the adapted features' spread.
fn initial_centers(
    o: &TrainOptions,
    params: &Params,
    dev: &Device,
    train: &Split,
    [classes, patches, dim]: [usize; 3],
) -> Result<(Vec<f32>, f64)> {
    let mut sums = CenterSums::new(classes, patches, dim);
    let all: Vec<usize> = (0..train.cache.count).collect();
    for chunk in all.chunks(16) {
        let f = params
            .adapt(&train.batch(chunk, dev)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (k, &i) in chunk.iter().enumerate() {
            sums.add(
                train.classes[i],
                &f[k * patches * dim..(k + 1) * patches * dim],
            );
        }
    }
    let mean_std = sums.mean_std();
    let sigma = o.noise.sigma(mean_std);
    tracing::info!(
        "adapted features at initialisation: mean per-dimension std {mean_std:.4}; noise sigma {sigma:.5} is {:.1}% of it",
        100.0 * sigma / mean_std.max(f64::MIN_POSITIVE)
    );
    Ok((sums.centers(), sigma))
}

/// Keeps the epoch if it is the best on validation so far (ties: the earlier), prints
/// its line, and appends it to the history.
#[allow(clippy::too_many_arguments)]
fn record_epoch(
    o: &TrainOptions,
    progress: &mut Progress,
    t: &Trainer,
    data: &TrainingData,
    epoch: usize,
    stats: &EpochStats,
    val_auroc: Option<f64>,
    started: Instant,
) -> Result<()> {
    let state = &mut progress.state;
    let secs = started.elapsed().as_secs_f64();
    let improved = match (val_auroc, state.best_auroc) {
        (Some(a), Some(b)) => a > b,
        (Some(_), None) => true,
        (None, _) => true, // no validation: the last epoch is kept
    };
    if improved {
        state.best_auroc = val_auroc;
        state.best_epoch = Some(epoch + 1);
        progress.best = Some(t.params.snapshot()?);
    }
    eprintln!(
        "epoch {:>3}/{}: loss {:.4}, validation image AUROC {}, {:.0}% / {:.0}% of normal / synthetic patches on the right side, {secs:.1} s ({:.1} images/s){}",
        epoch + 1,
        o.epochs,
        stats.loss,
        val_auroc
            .map(|a| format!("{a:.4}"))
            .unwrap_or_else(|| "n/a".into()),
        100.0 * stats.normal_ok,
        100.0 * stats.synthetic_ok,
        data.train.cache.count as f64 / secs,
        if improved { " *" } else { "" }
    );
    state.history.push(EpochRecord {
        epoch: epoch + 1,
        loss: stats.loss,
        validation_auroc: val_auroc,
        seconds: secs,
    });
    state.next_epoch = epoch + 1;
    state.adaptor_step = t.adaptor_opt.step;
    state.scorer_step = t.scorer_opt.step;
    state.rng_state = t.rng.state();
    Ok(())
}
