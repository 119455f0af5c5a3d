//! Frozen CNN backbones read from PyTorch weight files and written into the ONNX graph,
//! truncated after their stride-16 stage. Each backbone yields two feature maps:
//! stage A (stride 8) and stage B (stride 16).

mod efficientnet;
mod resnet;

use crate::onnx::{BatchNormParams, GraphBuilder};
use crate::weights::{StateDict, WeightsError};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    WideResnet50_2,
    Resnet18,
    Resnet50,
    EfficientnetLite0,
    EfficientnetLite1,
    EfficientnetLite2,
}

impl BackboneKind {
    pub const ALL: [BackboneKind; 6] = [
        BackboneKind::WideResnet50_2,
        BackboneKind::Resnet18,
        BackboneKind::Resnet50,
        BackboneKind::EfficientnetLite0,
        BackboneKind::EfficientnetLite1,
        BackboneKind::EfficientnetLite2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackboneKind::WideResnet50_2 => "wide_resnet50_2",
            BackboneKind::Resnet18 => "resnet18",
            BackboneKind::Resnet50 => "resnet50",
            BackboneKind::EfficientnetLite0 => "efficientnet_lite0",
            BackboneKind::EfficientnetLite1 => "efficientnet_lite1",
            BackboneKind::EfficientnetLite2 => "efficientnet_lite2",
        }
    }

    /// The EfficientNet-Lite shape, for the Lite backbones.
    fn lite(self) -> Option<&'static efficientnet::Variant> {
        match self {
            BackboneKind::EfficientnetLite0 => Some(&efficientnet::LITE0),
            BackboneKind::EfficientnetLite1 => Some(&efficientnet::LITE1),
            BackboneKind::EfficientnetLite2 => Some(&efficientnet::LITE2),
            _ => None,
        }
    }

    /// Whether this is one of the EfficientNet-Lite backbones.
    pub fn is_lite(self) -> bool {
        self.lite().is_some()
    }

    pub fn parse(s: &str) -> Result<Self, BackboneSpecError> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| BackboneSpecError::Unknown(s.to_string()))
    }

    /// The embedding width D a model on this backbone gets unless told otherwise: the
    /// paper's 1536 for the ResNets; 384 for the Lite models, whose two stages have
    /// 152-168 channels, so a wider embedding would only repeat them.
    pub fn default_embed_dim(self) -> usize {
        if self.is_lite() { 384 } else { 1536 }
    }

    /// The input scaling the backbone's pretrained weights were trained with: TF-Lite's
    /// (pixel - 127) / 128 for EfficientNet-Lite, ImageNet's mean/std for the ResNets.
    pub fn native_normalization(self) -> crate::preprocess::Normalization {
        if self.is_lite() {
            crate::preprocess::Normalization::Tflite
        } else {
            crate::preprocess::Normalization::Imagenet
        }
    }

    /// BatchNorm momentum of the original training code (used to replay the reference's
    /// train-mode pass): torchvision 0.1, EfficientNet (TF port) 0.01.
    pub fn bn_momentum(self) -> f64 {
        if self.is_lite() { 0.01 } else { 0.1 }
    }
}

/// Why a backbone name or `NAME=PATH` was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackboneSpecError {
    #[error("unknown backbone `{0}`; known: {known}", known = BackboneKind::ALL.map(|k| k.name()).join(", "))]
    Unknown(String),
    #[error("expected NAME=PATH (e.g. efficientnet_lite0=weights.pth), got `{0}`")]
    NoPath(String),
    #[error(
        "{0}: give the weights as NAME=PATH (only the efficientnet_lite backbones have installable weights)"
    )]
    NotInstallable(String),
}

/// `NAME=PATH` as given on the command line.
#[derive(Debug, Clone)]
pub struct BackboneSpec {
    pub kind: BackboneKind,
    pub weights: PathBuf,
}

impl std::str::FromStr for BackboneSpec {
    type Err = BackboneSpecError;
    fn from_str(s: &str) -> Result<Self, BackboneSpecError> {
        let (name, path) = s
            .split_once('=')
            .ok_or_else(|| BackboneSpecError::NoPath(s.to_string()))?;
        Ok(BackboneSpec {
            kind: BackboneKind::parse(name)?,
            weights: PathBuf::from(path),
        })
    }
}

/// How BatchNorm layers are written into the graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BnMode {
    /// Running statistics (inference).
    Eval,
    /// Batch statistics, with the statistics exposed (replaying a train-mode pass).
    Train,
}

/// Batch statistics of one BatchNorm layer in a train-mode graph.
pub struct BnStat {
    /// State-dict prefix of the layer, e.g. `layer1.0.bn1`.
    pub key: String,
    pub mean: String,
    pub var: String,
    /// Values per channel the statistics were taken over (N*H*W).
    pub count: usize,
}

pub struct BackboneOutputs {
    pub stage_a: String,
    pub stage_b: String,
    pub bn_stats: Vec<BnStat>,
    /// Multiply-accumulates of the convolutions for one image.
    pub macs: u64,
}

/// A backbone whose weights passed validation.
#[derive(Debug, Clone)]
pub struct Backbone {
    pub kind: BackboneKind,
    pub weights: StateDict,
}

/// Spatial size after a convolution-like op (floor mode).
pub(crate) fn conv_out(size: usize, k: usize, stride: usize, pad_total: usize) -> usize {
    (size + pad_total - k) / stride + 1
}

impl Backbone {
    /// Reads and validates a weights file: every key the architecture needs must be
    /// present with the right shape, and no key may be foreign to it.
    pub fn load(kind: BackboneKind, path: &Path) -> Result<Backbone, WeightsError> {
        let weights = StateDict::load(path)?;
        Self::from_state_dict(kind, weights)
    }

    pub fn from_state_dict(
        kind: BackboneKind,
        weights: StateDict,
    ) -> Result<Backbone, WeightsError> {
        let expected = Self::expected_keys(kind);
        for (key, shape) in &expected {
            let found = weights.shape(key)?;
            let classifier = key.starts_with("fc.") || key.starts_with("_fc.");
            // A fine-tuned classifier may have any number of classes: it is never used.
            let ok = if classifier {
                found.len() == shape.len() && found[1..] == shape[1..]
            } else {
                found == shape.as_slice()
            };
            if !ok {
                return Err(WeightsError::WrongShape {
                    path: weights.source.clone(),
                    key: key.clone(),
                    found: found.to_vec(),
                    expected: shape.clone(),
                });
            }
        }
        let known = |k: &str| {
            expected.iter().any(|(e, _)| e == k)
                || (k.ends_with(".num_batches_tracked")
                    && expected.iter().any(|(e, _)| {
                        e.strip_suffix(".running_mean") == k.strip_suffix(".num_batches_tracked")
                    }))
        };
        weights.reject_unknown(&known, kind.name())?;
        Ok(Backbone { kind, weights })
    }

    /// Every (key, shape) the architecture's state dict holds (BatchNorm counters aside).
    pub fn expected_keys(kind: BackboneKind) -> Vec<(String, Vec<usize>)> {
        match kind.lite() {
            Some(v) => efficientnet::expected_keys(v),
            None => resnet::expected_keys(kind),
        }
    }

    /// Channels of stage A (stride 8) and stage B (stride 16).
    pub fn stage_channels(&self) -> (usize, usize) {
        match (self.kind.lite(), self.kind) {
            (Some(v), _) => v.stage_channels(),
            (None, BackboneKind::Resnet18) => (128, 256),
            (None, _) => (512, 1024),
        }
    }

    /// Spatial sizes (h, w) of stage A and stage B for an input of h x w.
    pub fn stage_sizes(&self, h: usize, w: usize) -> ((usize, usize), (usize, usize)) {
        match self.kind.lite() {
            Some(v) => efficientnet::stage_sizes(v, h, w),
            None => resnet::stage_sizes(h, w),
        }
    }

    pub(crate) fn bn(&self, prefix: &str, c: usize) -> Result<BatchNormParams, WeightsError> {
        let eps = if self.kind.is_lite() { 1e-3 } else { 1e-5 };
        Ok(BatchNormParams {
            weight: self
                .weights
                .get(&format!("{prefix}.weight"), &[c])?
                .to_vec(),
            bias: self.weights.get(&format!("{prefix}.bias"), &[c])?.to_vec(),
            running_mean: self
                .weights
                .get(&format!("{prefix}.running_mean"), &[c])?
                .to_vec(),
            running_var: self
                .weights
                .get(&format!("{prefix}.running_var"), &[c])?
                .to_vec(),
            eps,
        })
    }

    /// Writes the truncated backbone into `g`, reading from `x` ([N,3,H,W]).
    pub fn build(
        &self,
        g: &mut GraphBuilder,
        x: &str,
        h: usize,
        w: usize,
        mode: BnMode,
    ) -> Result<BackboneOutputs, WeightsError> {
        let mut ctx = BuildCtx {
            g,
            backbone: self,
            mode,
            stats: Vec::new(),
            macs: 0,
            conv_macs_per_position: 0,
        };
        let (a, b) = match self.kind.lite() {
            Some(v) => efficientnet::build(&mut ctx, v, x, h, w)?,
            None => resnet::build(&mut ctx, x, h, w)?,
        };
        Ok(BackboneOutputs {
            stage_a: a,
            stage_b: b,
            bn_stats: ctx.stats,
            macs: ctx.macs,
        })
    }

    /// Applies one train-mode pass's batch statistics to the running statistics, as
    /// PyTorch does: `r <- (1-m) r + m s`, with the unbiased variance `s * n/(n-1)`.
    pub fn apply_batch_stats(&mut self, stats: &[(String, Vec<f32>, Vec<f32>, usize)]) {
        let m = self.kind.bn_momentum();
        for (key, mean, var, n) in stats {
            let bessel = *n as f64 / (*n as f64 - 1.0);
            if let Some(t) = self.weights.tensors.get_mut(&format!("{key}.running_mean"))
                && let crate::weights::TensorData::F32(v) = &mut t.data
            {
                for (r, s) in v.iter_mut().zip(mean) {
                    *r = ((1.0 - m) * *r as f64 + m * *s as f64) as f32;
                }
            }
            if let Some(t) = self.weights.tensors.get_mut(&format!("{key}.running_var"))
                && let crate::weights::TensorData::F32(v) = &mut t.data
            {
                for (r, s) in v.iter_mut().zip(var) {
                    *r = ((1.0 - m) * *r as f64 + m * *s as f64 * bessel) as f32;
                }
            }
        }
    }
}

/// State shared by the per-architecture graph writers.
pub(crate) struct BuildCtx<'a> {
    pub g: &'a mut GraphBuilder,
    pub backbone: &'a Backbone,
    pub mode: BnMode,
    pub stats: Vec<BnStat>,
    pub macs: u64,
    /// MACs per output position of the last convolution; every convolution in these
    /// backbones is followed by its BatchNorm, which knows the output size and books it.
    conv_macs_per_position: u64,
}

impl BuildCtx<'_> {
    /// Convolution without bias from state-dict key `{prefix}.weight`.
    pub fn conv(
        &mut self,
        x: &str,
        prefix: &str,
        shape: [usize; 4],
        stride: usize,
        pads: [usize; 4],
        group: usize,
    ) -> Result<String, WeightsError> {
        let w = self
            .backbone
            .weights
            .get(&format!("{prefix}.weight"), &shape)?
            .to_vec();
        self.conv_macs_per_position = w.len() as u64;
        Ok(self.g.conv(x, w, shape, None, stride, pads, group))
    }

    /// BatchNorm `prefix` over `c` channels at spatial size hw (for the statistics count).
    pub fn bn(
        &mut self,
        x: &str,
        prefix: &str,
        c: usize,
        hw: (usize, usize),
    ) -> Result<String, WeightsError> {
        let p = self.backbone.bn(prefix, c)?;
        self.macs += std::mem::take(&mut self.conv_macs_per_position) * (hw.0 * hw.1) as u64;
        Ok(match self.mode {
            BnMode::Eval => self.g.batch_norm(x, &p),
            BnMode::Train => {
                let (y, mean, var) = self.g.batch_norm_train(x, &p);
                self.stats.push(BnStat {
                    key: prefix.to_string(),
                    mean,
                    var,
                    count: hw.0 * hw.1,
                });
                y
            }
        })
    }
}
