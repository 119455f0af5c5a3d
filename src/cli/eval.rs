//! `cras eval`: metrics per class on a test split, and an HTML report.

use super::EngineArgs;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct EvalArgs {
    /// Model bundle directory.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Dataset root in MVTec layout (<class>/test/<kind>/*, <class>/ground_truth/...).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Report folder (metrics.json, index.html, overlays).
    #[arg(long, value_name = "DIR")]
    pub report: PathBuf,
    /// Classes to evaluate, comma separated [default: all the model's classes]
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Images per engine call.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl EvalArgs {
    pub fn run(self) -> Result<ExitCode> {
        let r = cras::eval::run(&cras::eval::EvalOptions {
            model: self.model,
            data: self.data,
            report: self.report.clone(),
            classes: self.classes,
            batch: self.batch.max(1),
            engine: self.engine.engine,
            engine_options: self.engine.options(self.batch.max(1)),
        })?;
        print!("{}", r.text_table());
        eprintln!(
            "report written to {}",
            self.report.join("index.html").display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
