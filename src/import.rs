//! `cras import-reference`: turns a model trained with the authors' PyTorch code
//! (`ckpt_best_*.pth` + `center.pth` + the backbone weights it used) into a bundle.

use crate::backbone::{Backbone, BackboneSpec};
use crate::engine::{EngineKind, EngineOptions};
use crate::model::bundle::{
    Bundle, BundleMeta, FORMAT_VERSION, Provenance, SourceFile, sha256_file,
};
use crate::model::graph::{CrasModel, GraphOptions, bn_replay_graph};
use crate::model::head::{Centers, CrasHead};
use crate::path_error::PathError;
use crate::preprocess::InputSpec;
use crate::tool_error::{Result, ToolError};
use crate::weights::StateDict;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The provenance note that records whether the reference's train-mode BatchNorm pass
/// was replayed on the backbone (`"true"` / `"false"`); `add-class` replays it again.
pub const BN_REPLAY_NOTE: &str = "bn_train_pass_replayed";

pub struct ImportOptions {
    pub backbone: BackboneSpec,
    pub checkpoint: PathBuf,
    pub centers: PathBuf,
    pub classes: Vec<String>,
    pub out: PathBuf,
    pub input: InputSpec,
    /// Per-stage pooled width; None = the embedding width (the reference's default use).
    pub pre_dim: Option<usize>,
    pub replay_bn_quirk: bool,
    pub engine: EngineKind,
    pub engine_options: EngineOptions,
}

/// Replays the reference's single train-mode forward pass on an all-ones image
/// (no normalisation) and updates every BatchNorm's running statistics the way PyTorch
/// does. The reference's `CRAS.load` makes this pass before centers are computed, so its
/// released checkpoints belong to a backbone altered this way.
pub fn replay_train_mode_pass(
    backbone: &mut Backbone,
    height: usize,
    width: usize,
    engine: EngineKind,
    opts: &EngineOptions,
) -> Result<()> {
    if backbone.kind.is_lite() {
        tracing::warn!(
            "EfficientNet's train-mode pass also applies random drop-connect, which cannot be \
             replayed; statistics are replayed without it, so they only approximate the reference's"
        );
    }
    let replay = bn_replay_graph(backbone, height, width)?;
    let mut eng = engine.load(
        &replay.onnx,
        &EngineOptions {
            batch: 1,
            ..opts.clone()
        },
    )?;
    let ones = vec![1.0f32; 3 * height * width];
    let outs = eng.run(&ones, [1, 3, height, width])?;
    let get = |name: &str| -> Result<Vec<f32>> {
        outs.iter()
            .find(|t| t.name == name)
            .and_then(|t| t.f32())
            .map(<[f32]>::to_vec)
            .ok_or_else(|| {
                ToolError::Engine(crate::engine::EngineError::Output(format!(
                    "BatchNorm replay {name}"
                )))
            })
    };
    let mut stats = Vec::new();
    for (key, count) in replay.layers {
        stats.push((
            key.clone(),
            get(&format!("{key}.mean"))?,
            get(&format!("{key}.var"))?,
            count,
        ));
    }
    backbone.apply_batch_stats(&stats);
    Ok(())
}

fn source(path: &Path) -> Result<SourceFile> {
    Ok(SourceFile {
        file: path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: sha256_file(path).map_err(PathError::on("read", path))?,
    })
}

pub fn import_reference(opts: &ImportOptions) -> Result<Bundle> {
    if opts.input.resize < opts.input.height {
        return Err(ToolError::Options(format!(
            "--resize ({}) must be at least --image-size ({})",
            opts.input.resize, opts.input.height
        )));
    }
    tracing::info!(
        "reading backbone {} from {}",
        opts.backbone.kind.name(),
        opts.backbone.weights.display()
    );
    let mut backbone = Backbone::load(opts.backbone.kind, &opts.backbone.weights)?;
    tracing::info!("reading checkpoint {}", opts.checkpoint.display());
    let checkpoint = StateDict::load(&opts.checkpoint)?;
    let head = CrasHead::from_state_dict(&checkpoint)?;
    tracing::info!("reading centers {}", opts.centers.display());
    let centers = Centers::load(&opts.centers)?;
    if centers.classes != opts.classes.len() {
        return Err(ToolError::Options(format!(
            "{} holds centers for {} classes but --classes names {} ({}); give one name per class, in training order",
            opts.centers.display(),
            centers.classes,
            opts.classes.len(),
            opts.classes.join(",")
        )));
    }
    let (h, w) = (opts.input.height, opts.input.width);
    if opts.replay_bn_quirk {
        tracing::info!("replaying the reference's train-mode BatchNorm pass on an all-ones image");
        replay_train_mode_pass(&mut backbone, h, w, opts.engine, &opts.engine_options)?;
    }
    let model = CrasModel {
        backbone: &backbone,
        head: &head,
        centers: &centers,
        height: h,
        width: w,
        pre_dim: opts.pre_dim.unwrap_or(head.embed_dim),
        image_score: crate::model::score::ImageScore::PatchMax,
        views: Default::default(),
    };
    tracing::info!("writing the ONNX graph");
    let onnx = model.to_onnx(GraphOptions::default())?;
    let ((ha, wa), _) = backbone.stage_sizes(h, w);
    let mut sources = BTreeMap::new();
    sources.insert("backbone".to_string(), source(&opts.backbone.weights)?);
    sources.insert("checkpoint".to_string(), source(&opts.checkpoint)?);
    sources.insert("centers".to_string(), source(&opts.centers)?);
    let mut notes = BTreeMap::new();
    notes.insert(BN_REPLAY_NOTE.to_string(), opts.replay_bn_quirk.to_string());
    notes.insert("pretrain_embed_dim".to_string(), model.pre_dim.to_string());
    let meta = BundleMeta {
        format_version: FORMAT_VERSION,
        classes: opts.classes.clone(),
        input: opts.input.clone(),
        backbone: backbone.kind.name().to_string(),
        embed_dim: head.embed_dim,
        patch_grid: [ha, wa],
        image_score: crate::model::score::ImageScore::PatchMax,
        views: Default::default(),
        thresholds: BTreeMap::new(),
        provenance: Provenance {
            created_by: format!("cras {} import-reference", env!("CARGO_PKG_VERSION")),
            created_at: crate::clock::unix_secs(),
            sources,
            notes,
            training: None,
            added_classes: Vec::new(),
        },
        onnx_sha256: String::new(),
        model_sha256: String::new(),
        head_sha256: String::new(),
    };
    // The head as `cras train` stores it (adaptor and scorer under their state-dict
    // names, BatchNorms unfolded, and the centers), so `cras add-class` works on
    // imported models too.
    let head_tensors = checkpoint
        .tensors
        .into_iter()
        .filter(|(k, _)| k.starts_with("pre_projection.") || k.starts_with("discriminator."))
        .collect();
    let head_file = crate::train::head_file(head_tensors, &centers)
        .map_err(PathError::on("serialise the head", &opts.out))?;
    let bundle = Bundle::write(&opts.out, meta, &onnx, Some(&head_file))?;
    tracing::info!(
        "bundle written to {} (model id {})",
        opts.out.display(),
        bundle.model_id()
    );
    Ok(bundle)
}
