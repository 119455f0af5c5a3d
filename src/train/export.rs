//! The bundle a training run writes: the selected epoch's head and the centers composed
//! with the backbone into one ONNX graph, and model.yaml with the provenance a plant
//! needs to trust it (the dataset and its hash, the options, every epoch's figures, and
//! why this epoch was chosen).

use super::TrainError;
use super::TrainOptions;
use super::checkpoint::Progress;
use super::data::TrainingData;
use super::recipe::Noise;
use crate::backbone::Backbone;
use crate::dataset::ClassData;
use crate::model::bundle::{
    Bundle, BundleMeta, FORMAT_VERSION, Provenance, RestartRecord, SourceFile, TrainingRecord,
    sha256_file,
};
use crate::model::graph::{CrasModel, GraphOptions};
use crate::model::head::{Centers, CrasHead};
use crate::path_error::PathError;
use crate::weights::StateDict;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, TrainError>;

/// The run a training keeps: where its epochs ended (the selected weights), its centers,
/// and, after `--restarts`, every run's record.
pub(super) struct Kept {
    pub progress: Progress,
    pub centers: Centers,
    pub restarts: Vec<RestartRecord>,
}

/// Writes the bundle of the kept run's selected epoch to `o.out`.
pub(super) fn write_bundle(
    o: &TrainOptions,
    classes: &[ClassData],
    backbone: &Backbone,
    data: &TrainingData,
    kept: Kept,
    patch_grid: [usize; 2],
) -> Result<Bundle> {
    let Kept {
        progress,
        centers,
        restarts,
    } = kept;
    let selected = progress.best.clone().ok_or(TrainError::NoEpoch)?;
    let selected = StateDict {
        tensors: selected,
        source: o.work.join("checkpoint.safetensors"),
    };
    let head = CrasHead::from_state_dict(&selected)?;
    let head_file = head_file(selected.tensors, &centers)
        .map_err(PathError::on("serialise the head", &o.out))?;
    let model = CrasModel {
        backbone,
        head: &head,
        centers: &centers,
        height: o.input.height,
        width: o.input.width,
        pre_dim: o.pre_dim,
        image_score: o.image_score,
        views: o.views.clone(),
    };
    let onnx = model.to_onnx(GraphOptions::default())?;
    let state = &progress.state;
    let selection = match (state.best_auroc, &o.val_defect_images) {
        (Some(a), Some(dir)) => format!(
            "epoch {} of {}: best image AUROC ({a:.4}) on {} held-out good images vs {} real defect images from {}",
            state.best_epoch.unwrap_or(0),
            o.epochs,
            data.val_good,
            data.val_labels.iter().filter(|&&l| l).count(),
            dir.display()
        ),
        (Some(a), None) => format!(
            "epoch {} of {}: best image AUROC ({a:.4}) on {} held-out good images vs the same images with synthetic defects ({} at strengths {:?})",
            state.best_epoch.unwrap_or(0),
            o.epochs,
            data.val_good,
            o.val_defects.names(),
            o.val_defect_strength
        ),
        (None, _) => format!("the last epoch ({}): no validation images", o.epochs),
    };
    tracing::info!("selected {selection}");
    let mut sources = BTreeMap::new();
    sources.insert(
        "backbone".to_string(),
        SourceFile {
            file: o
                .backbone_weights
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: data.weights_sha.clone(),
        },
    );
    let train_paths: Vec<PathBuf> = classes.iter().flat_map(|c| c.train_good.clone()).collect();
    let meta = BundleMeta {
        format_version: FORMAT_VERSION,
        classes: classes.iter().map(|c| c.name.clone()).collect(),
        input: o.input.clone(),
        backbone: o.backbone.name().to_string(),
        embed_dim: o.embed_dim,
        patch_grid,
        image_score: o.image_score,
        views: o.views.clone(),
        thresholds: BTreeMap::new(),
        provenance: Provenance {
            created_by: format!("cras {} train", env!("CARGO_PKG_VERSION")),
            created_at: crate::clock::unix_secs(),
            sources,
            notes: BTreeMap::new(),
            training: Some(TrainingRecord {
                dataset: o.data.display().to_string(),
                data_sha256: sha_of_sources(&train_paths, &o.data)?,
                train_images: data.per_class.clone(),
                validation_images: data.val_good,
                seed: o.seed,
                holdout_seed: (o.holdout_seed != o.seed).then_some(o.holdout_seed),
                options: recorded_options(o, state.noise_sigma),
                epochs: state.history.clone(),
                selected_epoch: state.best_epoch.unwrap_or(o.epochs),
                selection,
                restarts,
            }),
            added_classes: Vec::new(),
        },
        onnx_sha256: String::new(),
        model_sha256: String::new(),
        head_sha256: String::new(),
    };
    let bundle = Bundle::write(&o.out, meta, &onnx, Some(&head_file))?;
    tracing::info!(
        "bundle written to {} (model id {})",
        o.out.display(),
        bundle.model_id()
    );
    Ok(bundle)
}

/// `head.safetensors`: the selected epoch's weights under their CRAS-level names (the
/// scorer's BatchNorms unfolded) and the centers as `centers` [classes, patches, dim].
pub fn head_file(
    mut tensors: BTreeMap<String, crate::weights::Tensor>,
    centers: &Centers,
) -> std::io::Result<Vec<u8>> {
    tensors.insert(
        CENTERS_KEY.to_string(),
        crate::weights::Tensor::f32(
            vec![centers.classes, centers.patches, centers.dim],
            centers.data.clone(),
        ),
    );
    crate::weights::safetensors_bytes(&tensors)
}

/// The centers' name in `head.safetensors`.
pub const CENTERS_KEY: &str = "centers";

/// The training options as model.yaml records them; `sigma` is the noise level used.
fn recorded_options(o: &TrainOptions, sigma: Option<f64>) -> BTreeMap<String, String> {
    let relative = match o.noise {
        Noise::Relative(r) => r.to_string(),
        Noise::Absolute(_) => "-".into(),
    };
    let mut options: BTreeMap<String, String> = [
        ("recipe", o.recipe.clone()),
        ("epochs", o.epochs.to_string()),
        ("batch", o.batch.to_string()),
        ("adaptor_lr", o.adaptor_lr.to_string()),
        ("scorer_lr", o.scorer_lr.to_string()),
        (
            "noise_std",
            sigma.map_or_else(|| "-".into(), |s| s.to_string()),
        ),
        ("noise_relative", relative),
        ("noise_k", o.noise_k.to_string()),
        ("restarts", o.restarts.to_string()),
        ("val_fraction", o.val_fraction.to_string()),
        ("embed_dim", o.embed_dim.to_string()),
        ("pretrain_embed_dim", o.pre_dim.to_string()),
        ("device", o.device.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // The validation positives: the real images, or the painted defects' settings.
    let positives = match &o.val_defect_images {
        Some(dir) => vec![("val_defect_images", dir.display().to_string())],
        None => vec![
            (
                "val_defect_strength",
                o.val_defect_strength
                    .iter()
                    .map(f64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("val_defects", o.val_defects.names()),
        ],
    };
    options.extend(positives.into_iter().map(|(k, v)| (k.to_string(), v)));
    options
}

/// One hash over the training images' names (relative to the dataset root) and contents.
pub fn sha_of_sources(paths: &[PathBuf], root: &Path) -> std::result::Result<String, PathError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in paths {
        let rel = p.strip_prefix(root).unwrap_or(p);
        h.update(rel.to_string_lossy().as_bytes());
        h.update(sha256_file(p).map_err(PathError::on("read", p))?.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
