//! `cras rebuild`: a trained model's graph with other inference settings, no training.

use anyhow::Result;
use clap::Args;
use cras::backbone::BackboneSpec;
use cras::model::score::ImageScore;
use cras::model::views::Views;
use std::path::PathBuf;
use std::process::ExitCode;

/// The graph is written again from the bundle's trained head and centers with the views
/// or image score given, as a new bundle (the model given is not changed). Scores change
/// with either, so the new bundle has no thresholds: run `cras calibrate` on it.
#[derive(Args)]
pub struct RebuildArgs {
    /// The trained bundle (from `cras train` or `cras add-class`; it must hold
    /// head.safetensors).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Where the new bundle goes (a folder without a bundle).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The orientations each image is scored in, original first (original alone costs
    /// one pass of the model per image; each view one more), e.g. `original` or
    /// `original,rotate180`.
    #[arg(long, value_name = "VIEWS", value_parser = Views::parse)]
    pub views: Option<Views>,
    /// How the image score is taken: map-top:FRACTION or patch-max (see `cras train`).
    #[arg(long, value_name = "RULE", value_parser = ImageScore::parse)]
    pub image_score: Option<ImageScore>,
    /// The backbone weights the model was trained with, as NAME=PATH [default: the ones
    /// `cras setup --backbone NAME` installed]; checked against model.yaml's sha256.
    #[arg(long, value_name = "NAME[=PATH]", value_parser = cras::setup::backbone_spec)]
    pub backbone: Option<BackboneSpec>,
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

impl RebuildArgs {
    pub fn run(self) -> Result<ExitCode> {
        if self.views.is_none() && self.image_score.is_none() {
            anyhow::bail!("give --views or --image-score: nothing else changes in a rebuild");
        }
        let backbone = super::trained_backbone(&self.model, self.backbone)?;
        let bundle = cras::rebuild::run(&cras::rebuild::RebuildOptions {
            model: self.model.clone(),
            out: self.out.clone(),
            backbone_weights: backbone.weights,
            image_score: self.image_score,
            views: self.views,
            engine_options: self.runtime.options(8),
        })?;
        eprintln!(
            "rebuilt {} as {}: views {}, image score {}; it has no thresholds yet: \
             run `cras calibrate --model {} --data DIR` ({} is unchanged)",
            self.model.display(),
            self.out.display(),
            bundle.meta.views.label(),
            bundle.meta.image_score.label(),
            self.out.display(),
            self.model.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
