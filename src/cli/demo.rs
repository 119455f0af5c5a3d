//! `cras demo`: the daemon on a synthetic line, from nothing.

use anyhow::Result;
use clap::Args;
use cras::daemon::capture::template::templates_dir;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct DemoArgs {
    /// Folder for the demo's data, model, spool and config (kept; a rerun starts at once)
    #[arg(long, value_name = "DIR", default_value = "cras-demo")]
    pub dir: PathBuf,
    /// MQTT broker to publish to (the demo runs without one; alarms wait in the spool)
    #[arg(long, value_name = "URL", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Address of /metrics and /healthz
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub http: String,
    /// Training epochs for the demo model
    #[arg(long, default_value_t = 12)]
    pub epochs: usize,
    /// Frames per second the demo camera plays
    #[arg(long, default_value_t = 2)]
    pub fps: u32,
    /// Port of the operator's live view, rtsp://127.0.0.1:PORT/cam1 (0: off)
    #[arg(long, value_name = "PORT", default_value_t = 8554)]
    pub rtsp_port: u16,
    /// Prepare everything and validate the config, but do not start the daemon
    #[arg(long)]
    pub prepare_only: bool,
}

impl DemoArgs {
    pub fn run(self) -> Result<ExitCode> {
        let opts = cras::demo::DemoOptions {
            dir: self.dir,
            broker: self.broker,
            http: self.http,
            epochs: self.epochs.max(1),
            fps: self.fps.max(1),
            rtsp_port: self.rtsp_port,
        };
        let config = cras::demo::prepare(&opts)?;
        let pipelines = templates_dir(None, &config);
        let v = cras::daemon::config::Config::load(&config)?.validate(&config, &pipelines)?;
        eprintln!(
            "cras demo: config OK: model {} ({})",
            v.bundle.model_id(),
            v.bundle.meta.classes.join(", ")
        );
        if self.prepare_only {
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
}
