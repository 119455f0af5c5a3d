//! `cras run`: the inspection daemon, until SIGTERM or SIGINT.

use anyhow::Result;
use clap::Args;
use cras::daemon::capture::template::templates_dir;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct RunArgs {
    /// The configuration file (YAML; see the documented config.yaml).
    #[arg(long, value_name = "FILE", default_value = "/etc/cras/config.yaml")]
    pub config: PathBuf,
    /// Folder of capture pipeline templates [default: `pipelines` beside the config file, else /usr/share/cras/pipelines]
    #[arg(long, value_name = "DIR")]
    pub pipelines: Option<PathBuf>,
    /// Seconds a stop may spend delivering spooled alarms to the broker; what is left
    /// stays in the spool for the next start.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = cras::daemon::flush_timeout)]
    pub flush_timeout: std::time::Duration,
}

impl RunArgs {
    pub fn run(self) -> Result<ExitCode> {
        let pipelines = templates_dir(self.pipelines, &self.config);
        cras::daemon::run(&cras::daemon::RunOptions {
            config: self.config,
            pipelines,
            flush: self.flush_timeout,
        })?;
        Ok(ExitCode::SUCCESS)
    }
}
