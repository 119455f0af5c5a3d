//! `cras import-reference`: a bundle from the authors' reference checkpoint files.

use super::EngineArgs;
use anyhow::Result;
use clap::Args;
use cras::backbone::BackboneSpec;
use cras::preprocess::{InputSpec, Normalization};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct ImportArgs {
    /// Backbone as NAME=WEIGHTS (wide_resnet50_2, resnet18, resnet50, efficientnet_lite0/1/2;
    /// .pth or .safetensors state dict with the original key names), or NAME alone for
    /// weights `cras setup --backbone NAME` installed.
    #[arg(long, value_name = "NAME[=PATH]", value_parser = cras::setup::backbone_spec)]
    pub backbone: BackboneSpec,
    /// The reference's ckpt_best_*.pth ({discriminator, pre_projection}), or a
    /// safetensors file with CRAS-level names.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// The reference's center.pth ([classes, patches, dim] tensor), or a .npy.
    #[arg(long, value_name = "FILE")]
    pub centers: PathBuf,
    /// Class names in the order the model was trained with, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub classes: Vec<String>,
    /// Output bundle directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Network input size (square crop).
    #[arg(long, default_value_t = 288)]
    pub image_size: usize,
    /// The shorter side is resized to this before the centre crop.
    #[arg(long, default_value_t = 329)]
    pub resize: usize,
    /// Per-stage pooled width (the reference's pretrain_embed_dimension) [default: the embedding width]
    #[arg(long)]
    pub pretrain_embed_dim: Option<usize>,
    /// Do not replay the reference's train-mode BatchNorm pass (use for backbones already
    /// in eval state, e.g. models made with `cras train`).
    #[arg(long)]
    pub no_bn_replay: bool,
    /// Input normalisation recorded in the bundle.
    #[arg(long, value_enum, default_value = "imagenet")]
    pub normalization: Normalization,
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl ImportArgs {
    pub fn run(self) -> Result<ExitCode> {
        let opts = cras::import::ImportOptions {
            backbone: self.backbone,
            checkpoint: self.checkpoint,
            centers: self.centers,
            classes: self.classes,
            out: self.out,
            input: InputSpec::square(self.image_size, self.resize, self.normalization),
            pre_dim: self.pretrain_embed_dim,
            replay_bn_quirk: !self.no_bn_replay,
            engine: self.engine.engine,
            engine_options: self.engine.options(1),
        };
        cras::import::import_reference(&opts)?;
        Ok(ExitCode::SUCCESS)
    }
}
