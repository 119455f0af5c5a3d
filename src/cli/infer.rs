//! `cras infer`: a bundle on image files, one JSON line per image.

use super::EngineArgs;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct InferArgs {
    /// Model bundle directory (model.onnx + model.yaml).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Write <name>.map.npy and <name>.overlay.png here, keeping the inputs' relative folders.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Images per engine call.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Image files (PNG, JPEG, BMP, TIFF).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
}

impl InferArgs {
    pub fn run(self) -> Result<ExitCode> {
        let failures = cras::infer::run(&cras::infer::InferOptions {
            model: self.model,
            engine: self.engine.engine,
            engine_options: self.engine.options(self.batch),
            out: self.out,
            images: self.images,
            batch: self.batch,
        })?;
        if failures > 0 {
            eprintln!("cras: {failures} image(s) failed; see the error lines above");
            return Ok(ExitCode::from(1));
        }
        Ok(ExitCode::SUCCESS)
    }
}
