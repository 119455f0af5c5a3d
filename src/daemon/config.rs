//! The daemon's configuration (`config.yaml`): every key documented in the shipped
//! `config.yaml`, unknown keys rejected. Each section belongs to the stage that uses it
//! and is validated there (cameras in `capture`, model and batching in `inference`,
//! mqtt in `publish::connection`, spool in `publish::spool`, http in `http`, rtsp in
//! `operator::config`, evidence in `evidence`);
//! [`Config::validate`] runs them all, for `check-config` and `cras run` alike, so a
//! configuration that passes the check does not fail at start for a knowable reason.
//! YAML is read with serde-saphyr.

use super::capture::config::{CameraConfig, CameraPipeline};
use super::http::HttpConfig;
use super::inference::{BatchingConfig, ModelConfig};
use super::publish::connection::MqttConfig;
use super::publish::spool::SpoolConfig;
use crate::model::bundle::Bundle;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device: DeviceConfig,
    pub model: ModelConfig,
    pub cameras: Vec<CameraConfig>,
    #[serde(default)]
    pub batching: BatchingConfig,
    pub mqtt: MqttConfig,
    pub spool: SpoolConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub rtsp: super::operator::config::RtspConfig,
    #[serde(default)]
    pub evidence: super::evidence::EvidenceConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Site name, part of every MQTT topic.
    pub site: String,
    /// Device id, part of every MQTT topic.
    pub id: String,
}

impl DeviceConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        for (key, value) in [("device.site", &self.site), ("device.id", &self.id)] {
            if !topic_safe(value) {
                return Err(Invalid::new(
                    key,
                    "use 1 to 64 letters, digits, `-` and `_` (it is an MQTT topic level)",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// tracing filter, e.g. `info` or `info,cras::capture=debug`.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl LoggingConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map_err(|e| Invalid::new("logging.level", e.to_string()))?;
        Ok(())
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: default_level(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// A section's finding: the key (as written in the file) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{key}`: {reason}")]
pub struct Invalid {
    pub key: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// `value` within `[lo, hi]`, else an [`Invalid`] that names the range (not the value,
/// which may be anything). A float that is not a number is never within. Every number in
/// the configuration is bounded here, so no arithmetic on it after validation can
/// overflow (an `Instant` plus a duration, a rate's reciprocal, a byte count).
pub fn within<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    lo: T,
    hi: T,
    unit: &str,
) -> Result<(), Invalid> {
    if value >= lo && value <= hi {
        Ok(())
    } else {
        Err(Invalid::new(
            key,
            format!("must be from {lo} to {hi}{unit}"),
        ))
    }
}

/// Longest device, site and camera id: they are topic levels and metric labels.
pub const MAX_ID_LEN: usize = 64;

/// `text` with the password of every `scheme://user:password@host` URL in it replaced by
/// `***`: pipelines, URLs and GStreamer's messages about them are shown (check-config,
/// logs, camera states in `health`) without the secrets they may carry.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the first `/`, whitespace or quote.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(userinfo_end), Some(colon)) if colon < userinfo_end => {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                out.push_str(&authority[userinfo_end..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Resolves the folder `dir` against `base`, creates it and proves it writable (the
/// spool's and the evidence store's folders): `key` names it in the error.
pub fn writable_dir(key: &str, base: &Path, dir: &mut PathBuf) -> Result<(), Invalid> {
    *dir = resolve(base, dir);
    let shown = dir.display();
    std::fs::create_dir_all(&*dir)
        .map_err(|e| Invalid::new(key, format!("cannot create {shown}: {e}")))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"")
        .map_err(|e| Invalid::new(key, format!("{shown} is not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// `p` taken from the config file's folder `base` if it is relative.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Whether `s` can be one MQTT topic level and a metric label: letters, digits, `-`, `_`,
/// at most [`MAX_ID_LEN`] of them.
pub fn topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A checked configuration with what validation loaded.
#[derive(Clone)]
pub struct ValidConfig {
    pub config: Config,
    pub bundle: Bundle,
    /// Rendered capture pipeline per camera id.
    pub pipelines: BTreeMap<String, CameraPipeline>,
    pub password: Option<String>,
    /// Operator-view viewers (user -> password); empty without a credentials file.
    pub rtsp_credentials: BTreeMap<String, String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::path_error::read_text_limited(path, crate::path_error::limits::TEXT)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        Config::parse(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses configuration text (nothing is checked yet; see [`Config::validate`]).
    pub fn parse(text: &str) -> Result<Config, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks everything knowable before start, section by section. Relative paths are
    /// taken from the config file's folder; `templates` holds the capture templates.
    pub fn validate(mut self, path: &Path, templates: &Path) -> Result<ValidConfig, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let found = |e: Invalid| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: e.key,
            reason: e.reason,
        };
        self.device.validate().map_err(found)?;
        let bundle = self.model.validate(base).map_err(found)?;
        let pipelines =
            super::capture::config::validate(&self.cameras, &bundle.meta.classes, templates)
                .map_err(found)?;
        self.batching.validate().map_err(found)?;
        let password = self.mqtt.validate(base).map_err(found)?;
        self.spool.validate(base).map_err(found)?;
        self.http.validate().map_err(found)?;
        let rtsp_credentials = self.rtsp.validate(base).map_err(found)?;
        self.evidence.validate(base).map_err(found)?;
        self.logging.validate().map_err(found)?;
        Ok(ValidConfig {
            config: self,
            bundle,
            pipelines,
            password,
            rtsp_credentials,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_redacted_and_nothing_else() {
        let text = r#"rtspsrc location=rtsp://op:s3cret@10.0.0.2:554/s1 latency=200 ! x location="rtsp://a:b@h/y z""#;
        let r = redact_credentials(text);
        assert_eq!(
            r,
            r#"rtspsrc location=rtsp://op:***@10.0.0.2:554/s1 latency=200 ! x location="rtsp://a:***@h/y z""#
        );
        for plain in [
            "mqtt://127.0.0.1:1883",
            "rtsp://cam@host/x",
            "no url here",
            "file:///data/x.png",
            "",
        ] {
            assert_eq!(redact_credentials(plain), plain);
        }
        // A password with `@` or `:` in it is hidden whole.
        assert_eq!(
            redact_credentials("mqtt://u:p@ss:w@broker:1883"),
            "mqtt://u:***@broker:1883"
        );
    }
}
