//! `cras engine prepare`: the TensorRT engine built and checked ahead of time.

use super::RuntimeArgs;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct EngineCmd {
    #[command(subcommand)]
    command: EngineCommand,
}

#[derive(Subcommand)]
enum EngineCommand {
    /// Build the model's TensorRT engine into the engine cache (minutes the first time),
    /// check it against the CPU engine on the given images and record the differences.
    /// `cras run` with `model.provider: tensorrt` then loads it in seconds (docs/gpu.md).
    Prepare(PrepareArgs),
}

#[derive(Args)]
struct PrepareArgs {
    /// Model bundle directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Images to check the engine on: files, or folders of PNG/JPEG/BMP/TIFF files.
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    images: Vec<PathBuf>,
    /// The daemon's batching.max_batch (part of the cache key: use the same value).
    #[arg(long, default_value_t = 4)]
    max_batch: usize,
    /// Half precision; kept only if it passes the same check as fp32.
    #[arg(long)]
    fp16: bool,
    /// CUDA device.
    #[arg(long, default_value_t = 0)]
    device: u32,
    /// TensorRT builder workspace, MiB.
    #[arg(long, default_value_t = 1024)]
    workspace_mib: u64,
    /// TensorRT builder optimisation level (0-5).
    #[arg(long, default_value_t = 3)]
    builder_level: u8,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

impl EngineCmd {
    pub fn run(self) -> Result<ExitCode> {
        match self.command {
            EngineCommand::Prepare(a) => a.run(),
        }
    }
}

/// `paths`, with each folder replaced by its image files (sorted).
fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                f.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                    ["png", "jpg", "jpeg", "bmp", "tif", "tiff"]
                        .contains(&x.to_ascii_lowercase().as_str())
                })
            })
            .collect();
        files.sort();
        out.extend(files);
    }
    Ok(out)
}

impl PrepareArgs {
    fn run(self) -> Result<ExitCode> {
        let prepared = cras::prepare_engine::run(&cras::prepare_engine::PrepareOptions {
            model: self.model,
            images: image_files(&self.images)?,
            max_batch: self.max_batch,
            gpu: cras::engine::GpuOptions {
                device: self.device,
                policy: cras::engine::Policy::Require,
                fp16: self.fp16,
                workspace_mib: self.workspace_mib,
                builder_level: self.builder_level,
            },
            engine_options: self.runtime.options(self.max_batch),
        })?;
        eprintln!(
            "engine ready in {} (built in {:.0} s)",
            prepared.cache_dir.display(),
            prepared.check.build_seconds
        );
        Ok(ExitCode::SUCCESS)
    }
}
