//! `cras add-class`: a new product class in a trained model, without training.

use anyhow::Result;
use clap::Args;
use cras::backbone::BackboneSpec;
use std::path::PathBuf;
use std::process::ExitCode;

/// The class's centers come from its good images (`<data>/<class>/train/good`) under the
/// trained adaptor; its thresholds from a seeded hold-out of the same images (as
/// `cras calibrate` sets them). The adaptor, the scorer and every other class stay as
/// they were, and the result is a new bundle: the model given is not changed.
#[derive(Args)]
pub struct AddClassArgs {
    /// The trained bundle (from `cras train`; it must hold head.safetensors).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Dataset root in MVTec layout holding the new class's folder.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// The new class's name: its folder under --data.
    #[arg(long, value_name = "NAME")]
    pub class: String,
    /// Where the new bundle goes [default: <model>+<class>, beside the model]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The backbone weights the model was trained with, as NAME=PATH [default: the ones
    /// `cras setup --backbone NAME` installed]; checked against model.yaml's sha256.
    #[arg(long, value_name = "NAME[=PATH]", value_parser = cras::setup::backbone_spec)]
    pub backbone: Option<BackboneSpec>,
    /// Fraction of the class's good images held out for its thresholds.
    #[arg(long, default_value_t = 0.1)]
    pub holdout_fraction: f64,
    /// Its thresholds follow `cras calibrate`'s rule, over the held-out images.
    #[command(flatten)]
    pub rule: super::calibrate::ThresholdRule,
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

impl AddClassArgs {
    pub fn run(self) -> Result<ExitCode> {
        if !(self.holdout_fraction > 0.0 && self.holdout_fraction < 1.0) {
            anyhow::bail!(
                "--holdout-fraction {}: give a fraction in (0, 1)",
                self.holdout_fraction
            );
        }
        let backbone = super::trained_backbone(&self.model, self.backbone)?;
        let out = self.out.clone().unwrap_or_else(|| {
            let mut name = self.model.as_os_str().to_owned();
            name.push(format!("+{}", self.class));
            PathBuf::from(name)
        });
        let added = cras::add_class::run(&cras::add_class::AddClassOptions {
            model: self.model.clone(),
            data: self.data,
            class: self.class.clone(),
            out: out.clone(),
            backbone_weights: backbone.weights,
            holdout_fraction: self.holdout_fraction,
            quantile: self.rule.quantile,
            pixel_quantile: self.rule.pixel_quantile,
            margin: self.rule.margin,
            engine_options: self.runtime.options(8),
        })?;
        let r = &added.record;
        eprintln!(
            "{}: centers from {} good images; image threshold {}, pixel threshold {} from {} held out, \
             {} of which the model assigns to `{}`; {:.1} s",
            r.class,
            r.center_images,
            added.thresholds.image,
            added.thresholds.pixel.unwrap_or(f32::NAN),
            r.holdout_images,
            r.holdout_chosen,
            r.class,
            r.seconds
        );
        if r.holdout_chosen * 10 < r.holdout_images * 9 {
            eprintln!(
                "warning: the model takes {} of {} held-out `{}` images for another class; \
                 its centers are close to another class's, so those images are judged against \
                 the wrong class: train with all classes instead",
                r.holdout_images - r.holdout_chosen,
                r.holdout_images,
                r.class
            );
        }
        eprintln!(
            "new bundle with {} classes written to {} ({} is unchanged)",
            added.bundle.meta.classes.len(),
            out.display(),
            self.model.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
