//! `cras synth`: a seeded synthetic dataset in MVTec layout.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of product classes (1-4: stripes, checker, grain, dots).
    #[arg(long, default_value_t = 3)]
    pub classes: usize,
    /// Good training images per class.
    #[arg(long, default_value_t = 30)]
    pub train: usize,
    /// Good test images per class.
    #[arg(long, default_value_t = 10)]
    pub test_good: usize,
    /// Defective test images per class and defect type (scratch, spot, missing).
    #[arg(long, default_value_t = 5)]
    pub test_defect: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Random seed: the same seed writes the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SynthArgs {
    pub fn run(self) -> Result<ExitCode> {
        let names = cras::synth::generate(&cras::synth::SynthOptions {
            out: self.out.clone(),
            classes: self.classes,
            train: self.train,
            test_good: self.test_good,
            test_defect: self.test_defect,
            size: self.size,
            seed: self.seed,
        })?;
        eprintln!(
            "wrote classes {} to {}",
            names.join(","),
            self.out.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
