//! `cras check-config`: validates a daemon configuration without starting anything.

use anyhow::Result;
use clap::Args;
use cras::daemon::capture::template::templates_dir;
use cras::daemon::config::redact_credentials;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct CheckConfigArgs {
    /// The configuration file (YAML).
    pub file: PathBuf,
    /// Folder of capture pipeline templates [default: `pipelines` beside the file, else /usr/share/cras/pipelines]
    #[arg(long, value_name = "DIR")]
    pub pipelines: Option<PathBuf>,
}

impl CheckConfigArgs {
    pub fn run(self) -> Result<ExitCode> {
        let dir = templates_dir(self.pipelines, &self.file);
        let v = cras::daemon::config::Config::load(&self.file)?.validate(&self.file, &dir)?;
        println!(
            "{}: OK: device {}/{}, model {} ({} classes, engine {}), {} camera(s), broker {}{}",
            self.file.display(),
            v.config.device.site,
            v.config.device.id,
            v.bundle.model_id(),
            v.bundle.meta.classes.len(),
            v.config.model.engine.name(),
            v.config.cameras.len(),
            redact_credentials(&v.config.mqtt.url),
            if v.password.is_some() {
                " (password set)"
            } else {
                ""
            }
        );
        for (cam, p) in &v.pipelines {
            println!("  {cam}: {}", redact_credentials(&p.text));
        }
        Ok(ExitCode::SUCCESS)
    }
}
