//! One training run: initialise (or resume from its checkpoint), compute the centers under
//! the initial adaptor, train the epochs, score each on validation and keep the best.

use super::adam::Adam;
use super::centers::{CenterBank, CenterSums};
use super::checkpoint::{Checkpoint, CheckpointState, Progress};
use super::data::{Split, TrainingData};
use super::epoch::{EpochStats, Trainer, ValidationScore};
use super::params::Params;
use super::{Result, TrainError, TrainOptions, recipe};
use crate::model::bundle::EpochRecord;
use crate::model::score::HostMap;
use crate::path_error::PathError;
use crate::rng::Rng;
use candle_core::Device;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// One training run: its seed, where its epochs ended, and its centers.
pub(super) struct Run {
    pub seed: u64,
    pub progress: Progress,
    pub centers: Vec<f32>,
}

/// Initialises (or resumes from the checkpoint in `folder`) and trains one run with
/// `seed` over the prepared data.
pub(super) fn train_once(
    o: &TrainOptions,
    seed: u64,
    folder: &std::path::Path,
    dev: &Device,
    data: &TrainingData,
    shape: [usize; 3],
    interrupted: &AtomicBool,
) -> Result<Run> {
    std::fs::create_dir_all(folder).map_err(PathError::on("create the work folder", folder))?;
    // 2. The network and its optimisers; 3. the centers under the initial adaptor (or
    // everything from the checkpoint of an interrupted run).
    let mut rng = Rng::new(seed);
    let params = Params::init(o.embed_dim, &mut rng, dev)?;
    let ckpt = Checkpoint::in_folder(folder);
    let resuming = o.resume && ckpt.exists();
    if o.resume && !resuming {
        tracing::warn!(
            "--resume: no checkpoint in {}; starting afresh",
            folder.display()
        );
    }
    let (centers, sigma) = if resuming {
        (ckpt.load_centers(shape)?, None)
    } else {
        let (centers, sigma) = initial_centers(o, &params, dev, &data.train, shape)?;
        ckpt.save_centers(&centers, shape)?;
        (centers, Some(sigma))
    };
    let mut trainer = Trainer {
        adaptor_opt: Adam::new(&params.adaptor_vars(), o.adaptor_lr, 0.01, true)?,
        scorer_opt: Adam::new(&params.scorer_vars(), o.scorer_lr, 1e-5, false)?,
        params,
        bank: CenterBank::new(centers.clone(), shape[0], shape[1], shape[2], dev)?,
        rng,
        dev: dev.clone(),
        sigma: 0.0, // set below, from the fresh run or the checkpoint
        noise_k: o.noise_k,
        batch: o.batch,
        scratch: Default::default(),
        validation: ValidationScore {
            rule: o.image_score,
            map: HostMap::new(data.grid, [o.input.height, o.input.width]),
        },
    };
    let mut progress = match sigma {
        Some(sigma) => Progress {
            state: CheckpointState::fresh(sigma, o.image_score.label()),
            best: None,
        },
        None => {
            let progress = ckpt.load(&mut trainer)?;
            tracing::info!(
                "resuming at epoch {} from {}",
                progress.state.next_epoch + 1,
                folder.display()
            );
            check_rule(&progress.state, o, folder)?;
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
                folder.display()
            )));
        }
    };

    // 4. The epochs, each scored on validation and checkpointed.
    for epoch in progress.state.next_epoch..o.epochs {
        let t0 = Instant::now();
        let stats = trainer.epoch(&data.train, epoch, o.epochs, interrupted)?;
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
            data,
            epoch,
            &stats,
            val_auroc,
            t0,
        )?;
        ckpt.save(&trainer, &progress)?;
    }
    Ok(Run {
        seed,
        progress,
        centers,
    })
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

/// A resumed run must choose its epochs with the rule its earlier epochs were scored
/// with: a history of two rules' figures would select on numbers that do not compare.
fn check_rule(state: &CheckpointState, o: &TrainOptions, folder: &std::path::Path) -> Result<()> {
    let now = o.image_score.label();
    match &state.validation_rule {
        Some(rule) if *rule != now => Err(TrainError::Options(format!(
            "the checkpoint in {} scored validation with image score {rule}, not {now}; \
             resume with --image-score {rule}, or train again without --resume",
            folder.display()
        ))),
        Some(_) => Ok(()),
        None => {
            tracing::warn!(
                "the checkpoint in {} does not record its validation's image score (an older run); \
                 if it was not {now}, its epochs' figures compare two rules",
                folder.display()
            );
            Ok(())
        }
    }
}
