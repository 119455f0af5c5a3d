//! `cras rebuild`: a trained bundle's graph written again with other inference
//! settings (the test-time views, the image score), from its trained head and centers,
//! as a new bundle. Nothing is trained: a line that cannot afford a view's cost, or
//! wants another image score, changes it in seconds. The scores change with either, so
//! the new bundle has no thresholds until `cras calibrate` sets them.
//!
//! Also the parts `cras add-class` shares: the backbone the model was trained with,
//! checked against model.yaml, and the stored centers.

use crate::backbone::{Backbone, BackboneKind};
use crate::engine::{EngineKind, EngineOptions};
use crate::model::bundle::{Bundle, YAML_FILE, sha256_file};
use crate::model::graph::CrasModel;
use crate::model::head::{Centers, CrasHead};
use crate::model::score::ImageScore;
use crate::model::views::Views;
use crate::path_error::PathError;
use crate::tool_error::{Result, ToolError};
use std::path::{Path, PathBuf};

pub struct RebuildOptions {
    pub model: PathBuf,
    pub out: PathBuf,
    pub backbone_weights: PathBuf,
    /// The new image score; the bundle's own when `None`.
    pub image_score: Option<ImageScore>,
    /// The new views; the bundle's own when `None`.
    pub views: Option<Views>,
    pub engine_options: EngineOptions,
}

/// The provenance note naming the bundle a rebuilt one came from.
pub const REBUILT_FROM_NOTE: &str = "rebuilt_from";

pub fn run(o: &RebuildOptions) -> Result<Bundle> {
    let old = Bundle::read(&o.model)?;
    check_out(&o.out, &o.model)?;
    let mut meta = old.meta.clone();
    if let Some(rule) = o.image_score {
        rule.check().map_err(ToolError::Options)?;
        meta.image_score = rule;
    }
    if let Some(views) = &o.views {
        meta.views = views.clone();
    }
    let backbone = trained_backbone(&old, &o.backbone_weights, &o.engine_options)?;
    let mut head_sd = old.read_head()?;
    let stored = head_sd.tensors.remove(crate::train::CENTERS_KEY);
    let (patches, d) = (meta.patch_grid[0] * meta.patch_grid[1], meta.embed_dim);
    let centers = Centers {
        classes: meta.classes.len(),
        patches,
        dim: d,
        data: head_centers(stored, [meta.classes.len(), patches, d], &old.dir)?,
    };
    let head = CrasHead::from_state_dict(&head_sd)?;
    let onnx = CrasModel {
        backbone: &backbone,
        head: &head,
        centers: &centers,
        height: meta.input.height,
        width: meta.input.width,
        pre_dim: recorded_pre_dim(&old),
        image_score: meta.image_score,
        views: meta.views.clone(),
    }
    .to_onnx(Default::default())?;
    // The head as read and checked, written out again with its centers.
    let head_bytes = crate::train::head_file(head_sd.tensors, &centers)
        .map_err(PathError::on("serialise the head", &o.out))?;
    meta.thresholds.clear();
    meta.provenance.notes.insert(
        REBUILT_FROM_NOTE.into(),
        format!(
            "{} (graph sha256 {})",
            old.dir.display(),
            &old.meta.onnx_sha256[..old.meta.onnx_sha256.len().min(12)]
        ),
    );
    Ok(Bundle::write(&o.out, meta, &onnx, Some(&head_bytes))?)
}

/// Refuses an output that would overwrite a bundle: a new version goes to a new folder.
pub(crate) fn check_out(out: &Path, model: &Path) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(out, model) || out.join(YAML_FILE).exists() {
        return Err(ToolError::Options(format!(
            "--out {}: a bundle is already there; the new version goes to a new folder, so \
             the model it came from stays as it is",
            out.display()
        )));
    }
    Ok(())
}

/// The backbone the bundle was trained with: the weights' sha256 checked against
/// model.yaml, and an imported model's train-mode BatchNorm pass replayed.
pub(crate) fn trained_backbone(
    old: &Bundle,
    weights: &Path,
    engine_options: &EngineOptions,
) -> Result<Backbone> {
    let meta = &old.meta;
    let kind = BackboneKind::parse(&meta.backbone)
        .map_err(|e| ToolError::Data(format!("{}: {e}", old.dir.display())))?;
    let weights_sha = sha256_file(weights).map_err(PathError::on("read", weights))?;
    match meta.provenance.sources.get("backbone") {
        Some(src) if src.sha256 == weights_sha => {}
        Some(src) => {
            return Err(ToolError::Options(format!(
                "{}: these backbone weights (sha256 {}) are not the ones the model was trained with \
                 ({}, sha256 {}); give those with --backbone {}=PATH",
                weights.display(),
                &weights_sha[..12],
                src.file,
                &src.sha256[..src.sha256.len().min(12)],
                meta.backbone
            )));
        }
        None => {
            return Err(ToolError::Data(format!(
                "{}: model.yaml records no backbone hash to check the weights against",
                old.dir.display()
            )));
        }
    }
    let mut backbone = Backbone::load(kind, weights)?;
    if meta
        .provenance
        .notes
        .get(crate::import::BN_REPLAY_NOTE)
        .map(String::as_str)
        == Some("true")
    {
        // An imported model whose backbone went through the reference's train-mode
        // pass: whatever is built from it must see the same backbone.
        crate::import::replay_train_mode_pass(
            &mut backbone,
            meta.input.height,
            meta.input.width,
            EngineKind::Onnxruntime,
            engine_options,
        )?;
    }
    Ok(backbone)
}

/// The per-stage pooled width the model was trained with.
pub(crate) fn recorded_pre_dim(b: &Bundle) -> usize {
    let p = &b.meta.provenance;
    p.training
        .as_ref()
        .and_then(|t| t.options.get("pretrain_embed_dim"))
        .or_else(|| p.notes.get("pretrain_embed_dim"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(b.meta.embed_dim)
}

/// The centers stored in `head.safetensors`, [classes, patches, dim].
pub(crate) fn head_centers(
    stored: Option<crate::weights::Tensor>,
    shape: [usize; 3],
    dir: &Path,
) -> Result<Vec<f32>> {
    let bad = |why: String| {
        ToolError::Data(format!(
            "{}: head.safetensors does not fit model.yaml: {why}",
            dir.display()
        ))
    };
    let t = stored.ok_or_else(|| bad(format!("no `{}` tensor", crate::train::CENTERS_KEY)))?;
    if t.shape != shape {
        return Err(bad(format!(
            "centers are {:?}, model.yaml says {shape:?}",
            t.shape
        )));
    }
    t.as_f32()
        .map(<[f32]>::to_vec)
        .ok_or_else(|| bad("the centers are not float32".into()))
}
