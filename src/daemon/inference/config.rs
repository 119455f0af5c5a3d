//! The `model:` and `batching:` sections of the daemon's configuration.

use super::super::config::{Invalid, resolve, within};
use crate::engine::{EngineKind, GpuOptions, Provider};
use crate::model::bundle::{Bundle, ClassThresholds};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    /// Where camera frames are resized and normalised.
    #[serde(default)]
    pub preprocess: Preprocess,
    /// onnxruntime's execution provider: cpu, cuda or tensorrt.
    #[serde(default)]
    pub provider: Provider,
    /// Device, policy (require | prefer) and TensorRT settings for a GPU provider.
    #[serde(default)]
    pub gpu: GpuOptions,
}

/// Where camera frames become the network's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    /// The fastest for the engine: `rust` on the CPU (measured faster there, and exact).
    #[default]
    Auto,
    /// In Rust, bit for bit as the reference's loader (Pillow + torchvision).
    Rust,
    /// The frames stage: frame bytes into onnxruntime, which resizes and normalises
    /// (no host-side work per frame; within two grey levels of `rust`).
    Graph,
}

fn default_engine() -> EngineKind {
    EngineKind::Onnxruntime
}

impl ModelConfig {
    /// Resolves the bundle path against `base`, reads the bundle, and checks that every
    /// class the model can see has an alarm threshold (an override here, else the
    /// bundle's calibrated one) before the first frame.
    pub fn validate(&mut self, base: &Path) -> Result<Bundle, Invalid> {
        self.bundle = resolve(base, &self.bundle);
        let bundle =
            Bundle::read(&self.bundle).map_err(|e| Invalid::new("model.bundle", e.to_string()))?;
        if let Some(threads) = self.threads {
            within("model.threads", threads, 1, 1024, "")?;
        }
        if self.preprocess == Preprocess::Graph && self.engine != EngineKind::Onnxruntime {
            return Err(Invalid::new(
                "model.preprocess",
                format!(
                    "`graph` needs the onnxruntime engine (this is `{}`); use `rust`",
                    self.engine.name()
                ),
            ));
        }
        if self.provider.is_gpu() && self.engine != EngineKind::Onnxruntime {
            return Err(Invalid::new(
                "model.provider",
                format!(
                    "`{}` runs on the onnxruntime engine (this is `{}`)",
                    self.provider.name(),
                    self.engine.name()
                ),
            ));
        }
        within("model.gpu.builder_level", self.gpu.builder_level, 0, 5, "")?;
        within(
            "model.gpu.workspace_mib",
            self.gpu.workspace_mib,
            16,
            1 << 20,
            " MiB",
        )?;
        let classes = &bundle.meta.classes;
        for (class, t) in &self.thresholds {
            if !classes.contains(class) {
                return Err(Invalid::new(
                    format!("model.thresholds.{class}"),
                    format!("not a class of the model ({})", classes.join(", ")),
                ));
            }
            if !t.image.is_finite() {
                return Err(Invalid::new(
                    format!("model.thresholds.{class}.image"),
                    "must be a number",
                ));
            }
        }
        for class in classes {
            if !self.thresholds.contains_key(class) && !bundle.meta.thresholds.contains_key(class) {
                return Err(Invalid::new(
                    format!("model.thresholds.{class}"),
                    format!(
                        "the model has no calibrated threshold for class `{class}`: run `cras calibrate --model {}` or set model.thresholds.{class}.image",
                        self.bundle.display()
                    ),
                ));
            }
        }
        Ok(bundle)
    }

    /// Whether frames go to the engine's frames stage.
    pub fn frames_stage(&self) -> bool {
        match self.preprocess {
            Preprocess::Graph => true,
            // On the CPU the Rust path is faster (docs/decisions.md, "The frames
            // stage"); on a GPU the stage keeps the resize off the host.
            Preprocess::Auto => self.provider.is_gpu(),
            Preprocess::Rust => false,
        }
    }

    /// The alarm threshold of each class of `bundle`: the override, else the calibrated.
    pub fn thresholds(&self, bundle: &Bundle) -> BTreeMap<String, ClassThresholds> {
        bundle
            .meta
            .classes
            .iter()
            .filter_map(|class| {
                self.thresholds
                    .get(class)
                    .or_else(|| bundle.meta.thresholds.get(class))
                    .map(|t| (class.clone(), t.clone()))
            })
            .collect()
    }
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

impl BatchingConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        within("batching.max_batch", self.max_batch, 1, 64, " frames")?;
        within("batching.max_wait_ms", self.max_wait_ms, 0, 10_000, " ms")
    }
}
