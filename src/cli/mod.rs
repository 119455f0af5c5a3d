//! The command line: one file per subcommand, each turning its arguments into the
//! library's options and calling it. Nothing here decides a domain rule; defaults that
//! carry meaning (an embedding width, where weights or templates live) come from the
//! library.

mod add_class;
mod calibrate;
mod check_config;
mod demo;
mod engine;
mod eval;
mod import;
mod infer;
mod rebuild;
mod run;
mod setup;
mod synth;
mod train;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use cras::engine::{EngineKind, EngineOptions, Provider};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cras",
    version,
    about = "Multi-class industrial anomaly detection with CRAS"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is needed at run time: the pinned onnxruntime library (always) and
    /// pretrained backbone weights (on request), verified by sha256.
    Setup(setup::SetupArgs),
    /// Build a model bundle from the authors' reference checkpoint files.
    ImportReference(import::ImportArgs),
    /// Run a model bundle on image files: one JSON line per image on stdout.
    Infer(infer::InferArgs),
    /// Train a multi-class model on good images (MVTec layout) and write a bundle.
    Train(Box<train::TrainArgs>),
    /// Write a synthetic, seeded dataset in MVTec layout (textures with defects and masks).
    Synth(synth::SynthArgs),
    /// Evaluate a bundle on a dataset's test split: metrics per class and an HTML report.
    Eval(eval::EvalArgs),
    /// Validate a daemon configuration file without starting anything.
    CheckConfig(check_config::CheckConfigArgs),
    /// Run the inspection daemon: cameras in, verdicts, MQTT alarms out (see config.yaml).
    /// SIGTERM/SIGINT stop it cleanly, SIGHUP reloads the configuration and model.
    Run(run::RunArgs),
    /// The daemon on a synthetic line, from nothing: installs the run-time assets, trains
    /// and calibrates a small model on `cras synth` images, writes a config and runs it.
    Demo(demo::DemoArgs),
    /// Add a product class to a trained model without retraining: its centers from its
    /// good images under the trained adaptor, its thresholds, a new bundle beside the old.
    AddClass(add_class::AddClassArgs),
    /// Write a trained model's graph again with other test-time views or image score, as a
    /// new bundle (no training; calibrate it afterwards).
    Rebuild(rebuild::RebuildArgs),
    /// Set per-class alarm thresholds in model.yaml (see docs/calibration in `cras calibrate --help`).
    Calibrate(calibrate::CalibrateArgs),
    /// GPU engines: `cras engine prepare` builds and checks a TensorRT engine ahead of time.
    Engine(engine::EngineCmd),
}

impl Cli {
    pub fn run(self) -> Result<ExitCode> {
        match self.command {
            Command::Setup(a) => a.run(),
            Command::ImportReference(a) => a.run(),
            Command::Infer(a) => a.run(),
            Command::Train(a) => a.run(),
            Command::Synth(a) => a.run(),
            Command::Eval(a) => a.run(),
            Command::CheckConfig(a) => a.run(),
            Command::Run(a) => a.run(),
            Command::Demo(a) => a.run(),
            Command::Calibrate(a) => a.run(),
            Command::AddClass(a) => a.run(),
            Command::Rebuild(a) => a.run(),
            Command::Engine(a) => a.run(),
        }
    }

    /// The daemon config's `logging.level`, for `cras run`.
    fn configured_log_level(&self) -> Option<String> {
        match &self.command {
            Command::Run(a) => cras::daemon::config::Config::load(&a.config)
                .ok()
                .map(|c| c.logging.level),
            _ => None,
        }
    }
}

/// The engine and its onnxruntime settings.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Inference engine.
    #[arg(long, value_enum, default_value = "onnxruntime")]
    pub engine: EngineKind,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl EngineArgs {
    pub fn options(&self, batch: usize) -> EngineOptions {
        self.runtime.options(batch)
    }
}

/// Where onnxruntime is and how many threads it may use.
#[derive(Args, Clone)]
pub struct RuntimeArgs {
    /// libonnxruntime.so to load [default: $ORT_DYLIB_PATH, else the library `cras setup` installed]
    #[arg(long, value_name = "FILE")]
    pub ort_lib: Option<PathBuf>,
    /// Threads per inference [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// onnxruntime's execution provider; a GPU one must work (no fallback here). A
    /// TensorRT engine is built on every run: `cras engine prepare` caches it for the
    /// daemon.
    #[arg(long, value_enum, default_value = "cpu")]
    pub provider: Provider,
}

impl RuntimeArgs {
    pub fn options(&self, batch: usize) -> EngineOptions {
        EngineOptions {
            ort_lib: self.ort_lib.clone(),
            threads: self.threads,
            batch,
            provider: self.provider,
            gpu: cras::engine::GpuOptions {
                policy: cras::engine::Policy::Require,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// Logs go to stderr. Under systemd (JOURNAL_STREAM set) journald adds the time and
/// colours are off. The filter: CRAS_LOG, else the daemon config's `logging.level`,
/// else `info`.
pub fn init_logging(cli: &Cli) {
    use std::io::IsTerminal;
    let configured = cli.configured_log_level();
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

/// The backbone weights a trained bundle needs: those given, or the ones `cras setup`
/// installed for the bundle's backbone.
fn trained_backbone(
    model: &Path,
    given: Option<cras::backbone::BackboneSpec>,
) -> Result<cras::backbone::BackboneSpec> {
    match given {
        Some(b) => Ok(b),
        None => {
            let meta = cras::model::bundle::Bundle::read(model)?.meta;
            cras::setup::backbone_spec(&meta.backbone)
                .with_context(|| format!("the backbone of {}", model.display()))
        }
    }
}
