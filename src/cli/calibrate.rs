//! `cras calibrate`: per-class alarm thresholds into model.yaml.

use super::EngineArgs;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// Thresholds from good images: Q_q + margin x (Q_q - median) of their scores' logit,
/// per class (image) and over their anomaly maps (pixel). The good images are the validation
/// hold-out recorded by `cras train`. With --with-defects: F1-optimal thresholds on the
/// labelled test images instead.
#[derive(Args)]
pub struct CalibrateArgs {
    /// Model bundle directory (its model.yaml is updated).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Dataset root in MVTec layout.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    #[command(flatten)]
    pub rule: ThresholdRule,
    /// Use the labelled test images (F1-optimal thresholds) instead of good images only.
    #[arg(long)]
    pub with_defects: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// The rule that sets thresholds from good images: Q_q + margin x (Q_q - median), taken
/// on the logit of the scores (room above good parts that score near 1.0).
#[derive(Args)]
pub struct ThresholdRule {
    /// Quantile of the good images' scores.
    #[arg(long, default_value_t = 0.99)]
    pub quantile: f64,
    /// Quantile of the good images' anomaly-map values (pixel threshold).
    #[arg(long, default_value_t = 0.999)]
    pub pixel_quantile: f64,
    /// Margin, in units of (quantile - median) of the good scores' logit.
    #[arg(long, default_value_t = 0.5)]
    pub margin: f64,
}

impl CalibrateArgs {
    pub fn run(self) -> Result<ExitCode> {
        let b = cras::calibrate::run(&cras::calibrate::CalibrateOptions {
            model: self.model.clone(),
            data: self.data,
            quantile: self.rule.quantile,
            pixel_quantile: self.rule.pixel_quantile,
            margin: self.rule.margin,
            with_defects: self.with_defects,
            engine: self.engine.engine,
            engine_options: self.engine.options(4),
        })?;
        eprintln!(
            "thresholds for {} classes written to {}",
            b.meta.thresholds.len(),
            self.model.join("model.yaml").display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
