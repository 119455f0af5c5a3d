//! Where a model came from: model.yaml's `provenance` (the sources and their hashes,
//! how it was trained, and the classes added after training).

use std::collections::BTreeMap;

/// Where the model came from.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The command that made the bundle.
    pub created_by: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Input files with their sha256, by role (backbone, checkpoint, centers, ...).
    #[serde(default)]
    pub sources: BTreeMap<String, SourceFile>,
    /// Free-form notes (options used, quirks replayed).
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
    /// How the model was trained, when `cras train` made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingRecord>,
    /// Classes `cras add-class` added after training, in the order they were added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added_classes: Vec<AddedClass>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingRecord {
    pub dataset: String,
    /// sha256 over the training images (relative path and content hash, in order).
    pub data_sha256: String,
    /// Good training images per class (validation hold-out included).
    pub train_images: BTreeMap<String, usize>,
    pub validation_images: usize,
    pub seed: u64,
    /// Seed of the validation hold-out when it differs from `seed` (`--holdout-seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout_seed: Option<u64>,
    pub options: BTreeMap<String, String>,
    pub epochs: Vec<EpochRecord>,
    pub selected_epoch: usize,
    /// How the epoch was chosen, in words.
    pub selection: String,
    /// The runs `--restarts` trained, one per seed; the bundle is the best of them on
    /// validation, and `seed` is its seed (empty for a single run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<RestartRecord>,
}

/// One run of `cras train --restarts`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartRecord {
    pub seed: u64,
    pub selected_epoch: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_auroc: Option<f64>,
}

impl TrainingRecord {
    /// The seed that drew the validation hold-out.
    pub fn holdout_seed(&self) -> u64 {
        self.holdout_seed.unwrap_or(self.seed)
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochRecord {
    pub epoch: usize,
    pub loss: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_auroc: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub file: String,
    pub sha256: String,
}

/// A class `cras add-class` added: its centers come from its good images under the
/// trained adaptor; nothing was trained.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddedClass {
    pub class: String,
    pub dataset: String,
    /// sha256 over the class's good images (relative path and content hash, in order).
    pub data_sha256: String,
    /// Good images the centers were computed from.
    pub center_images: usize,
    /// Good images held out for its thresholds (its own seeded draw, see
    /// `dataset::holdout_class`).
    pub holdout_images: usize,
    pub seed: u64,
    pub holdout_fraction: f64,
    /// Held-out images the graph assigned to this class, of `holdout_images`.
    pub holdout_chosen: usize,
    /// Seconds since the Unix epoch.
    pub added_at: u64,
    pub seconds: f64,
}
