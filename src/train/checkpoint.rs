//! The checkpoint format: what `cras train --resume` continues from after an interruption.
//!
//! In the work folder: `checkpoint.safetensors` (the current weights as `current.*`, the
//! selected epoch's as `best.*`, BatchNorm running statistics included, and both
//! optimisers' moments as `adam_a.<i>.{m,v}` / `adam_s.<i>.{m,v}`), `checkpoint.json`
//! ([`CheckpointState`]: next epoch, RNG state, optimiser steps, history, selection,
//! noise sigma) and `centers.safetensors` (the centers, fixed at the start of the run).
//! Each file is written to a temporary name and renamed, so a crash leaves the previous
//! epoch's checkpoint whole.

use super::TrainError;
use super::epoch::Trainer;
use crate::model::bundle::EpochRecord;
use crate::path_error::PathError;
use crate::weights::{StateDict, Tensor as WTensor};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything a run needs to continue after an interruption.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct CheckpointState {
    pub next_epoch: usize,
    pub rng_state: (u64, u64),
    pub adaptor_step: i32,
    pub scorer_step: i32,
    pub history: Vec<EpochRecord>,
    pub best_epoch: Option<usize>,
    pub best_auroc: Option<f64>,
    /// The noise sigma in use (fixed at the start of the run).
    #[serde(default)]
    pub noise_sigma: Option<f64>,
    /// The image score validation chose epochs with (`--image-score`'s spelling); absent
    /// in checkpoints written before it was recorded.
    #[serde(default)]
    pub validation_rule: Option<String>,
}

impl CheckpointState {
    /// A run that has not completed an epoch yet.
    pub fn fresh(noise_sigma: f64, validation_rule: String) -> CheckpointState {
        CheckpointState {
            next_epoch: 0,
            rng_state: (0, 0),
            adaptor_step: 0,
            scorer_step: 0,
            history: Vec::new(),
            best_epoch: None,
            best_auroc: None,
            noise_sigma: Some(noise_sigma),
            validation_rule: Some(validation_rule),
        }
    }
}

/// A run's progress: its state and the weights of the selected epoch so far.
pub(super) struct Progress {
    pub state: CheckpointState,
    pub best: Option<BTreeMap<String, WTensor>>,
}

/// The checkpoint files of one work folder.
pub(super) struct Checkpoint {
    weights: PathBuf,
    state: PathBuf,
    centers: PathBuf,
}

type Result<T> = std::result::Result<T, TrainError>;

/// Writes `path` through a temporary file and a rename.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let tmp = path.with_extension("part");
    write(&tmp).map_err(PathError::on("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(PathError::on("write", path))?;
    Ok(())
}

impl Checkpoint {
    pub fn in_folder(work: &Path) -> Checkpoint {
        Checkpoint {
            weights: work.join("checkpoint.safetensors"),
            state: work.join("checkpoint.json"),
            centers: work.join("centers.safetensors"),
        }
    }

    /// Whether an earlier run completed an epoch here.
    pub fn exists(&self) -> bool {
        self.state.is_file()
    }

    /// Saves the state after an epoch: weights, optimiser moments, state.
    pub fn save(&self, t: &Trainer, progress: &Progress) -> Result<()> {
        let mut tensors: BTreeMap<String, WTensor> = t
            .params
            .snapshot()?
            .into_iter()
            .map(|(k, v)| (format!("current.{k}"), v))
            .collect();
        if let Some(b) = &progress.best {
            tensors.extend(b.iter().map(|(k, v)| (format!("best.{k}"), v.clone())));
        }
        for (opt, prefix) in [(&t.adaptor_opt, "adam_a."), (&t.scorer_opt, "adam_s.")] {
            for (i, mo) in opt.moments.iter().enumerate() {
                for (name, tensor) in [("m", &mo.m), ("v", &mo.v)] {
                    tensors.insert(
                        format!("{prefix}{i}.{name}"),
                        WTensor::f32(
                            tensor.dims().to_vec(),
                            tensor.flatten_all()?.to_vec1::<f32>()?,
                        ),
                    );
                }
            }
        }
        write_atomically(&self.weights, |tmp| {
            crate::weights::save_safetensors(&tensors, tmp)
        })?;
        let json =
            serde_json::to_string_pretty(&progress.state).map_err(|e| TrainError::Checkpoint {
                path: self.state.clone(),
                reason: e.to_string(),
            })?;
        write_atomically(&self.state, |tmp| std::fs::write(tmp, &json))
    }

    /// Restores weights, optimiser moments and steps, and the RNG into `t`; returns the
    /// run's progress.
    pub fn load(&self, t: &mut Trainer) -> Result<Progress> {
        let text =
            std::fs::read_to_string(&self.state).map_err(PathError::on("read", &self.state))?;
        let state: CheckpointState =
            serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
                path: self.state.clone(),
                reason: format!("not a checkpoint state: {e}"),
            })?;
        let sd = StateDict::load(&self.weights)?;
        t.params
            .restore(&sd.strip_prefix("current.").tensors, &t.dev, &self.weights)?;
        let best = state
            .best_epoch
            .is_some()
            .then(|| sd.strip_prefix("best.").tensors);
        for (opt, prefix) in [
            (&mut t.adaptor_opt, "adam_a."),
            (&mut t.scorer_opt, "adam_s."),
        ] {
            for (i, mo) in opt.moments.iter_mut().enumerate() {
                let m = sd.get(&format!("{prefix}{i}.m"), mo.m.dims())?;
                let v = sd.get(&format!("{prefix}{i}.v"), mo.v.dims())?;
                mo.m = Tensor::from_vec(m.to_vec(), mo.m.dims(), &t.dev)?;
                mo.v = Tensor::from_vec(v.to_vec(), mo.v.dims(), &t.dev)?;
            }
        }
        t.adaptor_opt.step = state.adaptor_step;
        t.scorer_opt.step = state.scorer_step;
        t.rng.set_state(state.rng_state);
        Ok(Progress { state, best })
    }

    pub fn save_centers(&self, data: &[f32], shape: [usize; 3]) -> Result<()> {
        let mut t = BTreeMap::new();
        t.insert(
            "centers".to_string(),
            WTensor::f32(shape.to_vec(), data.to_vec()),
        );
        crate::weights::save_safetensors(&t, &self.centers)
            .map_err(PathError::on("write", &self.centers))?;
        Ok(())
    }

    pub fn load_centers(&self, shape: [usize; 3]) -> Result<Vec<f32>> {
        let c = StateDict::load(&self.centers)?;
        Ok(c.get("centers", &shape)?.to_vec())
    }
}
