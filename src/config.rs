//! The daemon's configuration (`config.yaml`): every key documented in the shipped
//! `config.yaml`, unknown keys rejected, and a `validate` step that checks everything
//! knowable before start (files exist, names are unique and topic-safe, the model loads,
//! templates take the given parameters) so nothing fails later for a knowable reason.
//! YAML is read with serde-saphyr.

use crate::engine::EngineKind;
use crate::model::bundle::{Bundle, ClassThresholds};
use crate::pipeline_template::PipelineTemplate;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
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

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Bundle directory (model.onnx + model.yaml).
    pub bundle: PathBuf,
    #[serde(default = "default_engine")]
    pub engine: EngineKind,
    /// libonnxruntime.so (default: ORT_DYLIB_PATH, else the `cras setup` library).
    #[serde(default)]
    pub ort_lib: Option<PathBuf>,
    /// Inference threads (default: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Per-class threshold overrides (else the bundle's calibrated ones).
    #[serde(default)]
    pub thresholds: BTreeMap<String, ClassThresholds>,
}

fn default_engine() -> EngineKind {
    EngineKind::Onnxruntime
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// Camera id: letters, digits, `-` and `_` (it becomes an MQTT topic level).
    pub id: String,
    /// Template name in the pipelines folder.
    pub pipeline: String,
    /// Template parameters.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Product class: `auto` (the model chooses per frame) or one of the model's classes.
    #[serde(default = "default_class")]
    pub class: String,
    /// Frames per second taken from this camera at most.
    #[serde(default = "default_max_fps")]
    pub max_fps: f64,
    /// Seconds without a frame after which the camera counts as lost and its pipeline is
    /// rebuilt; 0 turns the check off (hardware-triggered cameras with long pauses).
    #[serde(default = "default_stall")]
    pub stall_timeout_s: f64,
}

fn default_stall() -> f64 {
    10.0
}

fn default_class() -> String {
    "auto".into()
}
fn default_max_fps() -> f64 {
    5.0
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Frames per engine call at most (across cameras).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long the first frame of a batch waits for more, in milliseconds.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
}

fn default_max_batch() -> usize {
    4
}
fn default_max_wait_ms() -> u64 {
    20
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch: default_max_batch(),
            max_wait_ms: default_max_wait_ms(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    pub client_id: String,
    /// Topics are `<topic_prefix>/<site>/<device>/...`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// QoS of alarms (1: at least once; 2 is not offered).
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (preferred), or...
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// ...the name of an environment variable holding it.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Per-frame `result` messages per second and camera; 0 turns them off.
    #[serde(default)]
    pub result_rate_hz: f64,
    /// Seconds between `health` messages.
    #[serde(default = "default_health")]
    pub health_interval_s: u64,
}

fn default_prefix() -> String {
    "cras".into()
}
fn default_qos() -> u8 {
    1
}
fn default_health() -> u64 {
    30
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Folder for alarms not yet acknowledged by the broker.
    pub dir: PathBuf,
    /// Bytes at most; when full the oldest alarms are evicted (counted and reported).
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: u64,
}

fn default_spool_bytes() -> u64 {
    100 * 1024 * 1024
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of /metrics and /healthz.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
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

/// A checked configuration with what validation loaded.
pub struct ValidConfig {
    pub config: Config,
    pub bundle: Bundle,
    /// Rendered capture pipeline per camera id.
    pub pipelines: BTreeMap<String, CameraPipeline>,
    pub password: Option<String>,
}

/// A camera's capture pipeline, rendered from its template.
#[derive(Debug, Clone)]
pub struct CameraPipeline {
    /// gst-launch text.
    pub text: String,
    /// A finite source (the template says `# finite`): end of stream ends the camera.
    pub finite: bool,
}

fn topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Checks everything knowable before start. Relative paths are taken from the
    /// config file's folder; `pipelines_dir` holds the capture templates.
    pub fn validate(
        mut self,
        path: &Path,
        pipelines_dir: &Path,
    ) -> Result<ValidConfig, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let resolve = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        if !topic_safe(&self.device.site) {
            return Err(bad(
                "device.site",
                "use letters, digits, `-` and `_` only (it is an MQTT topic level)".into(),
            ));
        }
        if !topic_safe(&self.device.id) {
            return Err(bad(
                "device.id",
                "use letters, digits, `-` and `_` only (it is an MQTT topic level)".into(),
            ));
        }
        self.model.bundle = resolve(&self.model.bundle);
        let bundle =
            Bundle::read(&self.model.bundle).map_err(|e| bad("model.bundle", e.to_string()))?;
        if self.model.threads == Some(0) {
            return Err(bad("model.threads", "must be at least 1".into()));
        }
        for (class, t) in &self.model.thresholds {
            if !bundle.meta.classes.contains(class) {
                return Err(bad(
                    &format!("model.thresholds.{class}"),
                    format!(
                        "not a class of the model ({})",
                        bundle.meta.classes.join(", ")
                    ),
                ));
            }
            if !t.image.is_finite() {
                return Err(bad(
                    &format!("model.thresholds.{class}.image"),
                    "must be a number".into(),
                ));
            }
        }
        // Every class the model can see needs an alarm threshold before the first frame.
        for class in &bundle.meta.classes {
            if !self.model.thresholds.contains_key(class)
                && !bundle.meta.thresholds.contains_key(class)
            {
                return Err(bad(
                    &format!("model.thresholds.{class}"),
                    format!(
                        "the model has no calibrated threshold for class `{class}`: run `cras calibrate --model {}` or set model.thresholds.{class}.image",
                        self.model.bundle.display()
                    ),
                ));
            }
        }
        if self.cameras.is_empty() {
            return Err(bad("cameras", "at least one camera is needed".into()));
        }
        let mut ids = BTreeSet::new();
        let mut pipelines = BTreeMap::new();
        for (i, cam) in self.cameras.iter().enumerate() {
            let key = |k: &str| format!("cameras[{i}].{k}");
            if !topic_safe(&cam.id) {
                return Err(bad(
                    &key("id"),
                    "use letters, digits, `-` and `_` only (it is an MQTT topic level)".into(),
                ));
            }
            if !ids.insert(cam.id.clone()) {
                return Err(bad(
                    &key("id"),
                    format!("`{}` is used by another camera", cam.id),
                ));
            }
            if cam.class != "auto" && !bundle.meta.classes.contains(&cam.class) {
                return Err(bad(
                    &key("class"),
                    format!(
                        "`{}` is neither `auto` nor a class of the model ({})",
                        cam.class,
                        bundle.meta.classes.join(", ")
                    ),
                ));
            }
            if !(cam.max_fps > 0.0 && cam.max_fps.is_finite()) {
                return Err(bad(
                    &key("max_fps"),
                    "must be a positive number of frames per second".into(),
                ));
            }
            if !(cam.stall_timeout_s >= 0.0 && cam.stall_timeout_s.is_finite()) {
                return Err(bad(
                    &key("stall_timeout_s"),
                    "must be 0 (off) or a positive number of seconds".into(),
                ));
            }
            let template = PipelineTemplate::load(pipelines_dir, &cam.pipeline)
                .map_err(|e| bad(&key("pipeline"), e.to_string()))?;
            let text = template
                .render(&cam.params)
                .map_err(|e| bad(&key("params"), e.to_string()))?;
            pipelines.insert(
                cam.id.clone(),
                CameraPipeline {
                    text,
                    finite: template.finite,
                },
            );
        }
        if self.batching.max_batch == 0 {
            return Err(bad("batching.max_batch", "must be at least 1".into()));
        }
        let m = &self.mqtt;
        let tls_url = m.url.starts_with("mqtts://");
        if !(m.url.starts_with("mqtt://") || tls_url)
            || m.url.split("://").nth(1).is_none_or(|h| h.is_empty())
        {
            return Err(bad(
                "mqtt.url",
                format!(
                    "`{}` is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]",
                    m.url
                ),
            ));
        }
        if m.client_id.is_empty() {
            return Err(bad("mqtt.client_id", "must not be empty".into()));
        }
        if m.qos != 1 {
            return Err(bad(
                "mqtt.qos",
                "alarms are sent with QoS 1 (at least once); set 1".into(),
            ));
        }
        if tls_url && m.tls.is_none() {
            return Err(bad("mqtt.tls", "an mqtts:// URL needs tls.ca".into()));
        }
        if let Some(tls) = &mut self.mqtt.tls {
            tls.ca = resolve(&tls.ca);
            if !tls.ca.is_file() {
                return Err(bad(
                    "mqtt.tls.ca",
                    format!("{} is not a readable file", tls.ca.display()),
                ));
            }
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => {
                    let (c, k) = (resolve(c), resolve(k));
                    for (name, p) in [("mqtt.tls.cert", &c), ("mqtt.tls.key", &k)] {
                        if !p.is_file() {
                            return Err(bad(
                                name,
                                format!("{} is not a readable file", p.display()),
                            ));
                        }
                    }
                    tls.cert = Some(c);
                    tls.key = Some(k);
                }
                (None, None) => {}
                _ => return Err(bad("mqtt.tls", "cert and key go together".into())),
            }
        }
        let m = &self.mqtt;
        let password = match (&m.password_file, &m.password_env) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "mqtt.password_file",
                    "give password_file or password_env, not both".into(),
                ));
            }
            (Some(f), None) => {
                let f = resolve(f);
                let p = std::fs::read_to_string(&f).map_err(|e| {
                    bad(
                        "mqtt.password_file",
                        format!("cannot read {}: {e}", f.display()),
                    )
                })?;
                Some(p.trim_end_matches(['\n', '\r']).to_string())
            }
            (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                bad(
                    "mqtt.password_env",
                    format!("environment variable `{var}` is not set"),
                )
            })?),
            (None, None) => None,
        };
        if password.is_some() && m.username.is_none() {
            return Err(bad("mqtt.username", "a password needs a username".into()));
        }
        if !(m.result_rate_hz >= 0.0 && m.result_rate_hz.is_finite()) {
            return Err(bad(
                "mqtt.result_rate_hz",
                "must be 0 (off) or a positive rate".into(),
            ));
        }
        if m.health_interval_s == 0 {
            return Err(bad("mqtt.health_interval_s", "must be at least 1".into()));
        }
        self.spool.dir = resolve(&self.spool.dir);
        std::fs::create_dir_all(&self.spool.dir).map_err(|e| {
            bad(
                "spool.dir",
                format!("cannot create {}: {e}", self.spool.dir.display()),
            )
        })?;
        let probe = self.spool.dir.join(".write-test");
        std::fs::write(&probe, b"").map_err(|e| {
            bad(
                "spool.dir",
                format!("{} is not writable: {e}", self.spool.dir.display()),
            )
        })?;
        let _ = std::fs::remove_file(&probe);
        if self.spool.max_bytes < 64 * 1024 {
            return Err(bad("spool.max_bytes", "must be at least 65536".into()));
        }
        self.http.listen.parse::<SocketAddr>().map_err(|_| {
            bad(
                "http.listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:9464",
                    self.http.listen
                ),
            )
        })?;
        tracing_subscriber::EnvFilter::try_new(&self.logging.level)
            .map_err(|e| bad("logging.level", e.to_string()))?;
        Ok(ValidConfig {
            config: self,
            bundle,
            pipelines,
            password,
        })
    }
}
