//! The trained part of CRAS: the feature adaptor, the scorer (discriminator) with its
//! BatchNorms folded into the Linears, and the per-class center banks.

use crate::weights::{StateDict, WeightsError};
use std::path::Path;

/// One scorer layer after folding: y = LeakyReLU_0.2(W x + b).
#[derive(Debug, Clone)]
pub struct ScorerLayer {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub out: usize,
    pub inp: usize,
}

#[derive(Debug, Clone)]
pub struct CrasHead {
    /// Embedding width D.
    pub embed_dim: usize,
    /// Adaptor Linear(D, D): weight [D, D] (PyTorch layout) and bias [D].
    pub adaptor_weight: Vec<f32>,
    pub adaptor_bias: Vec<f32>,
    pub hidden: Vec<ScorerLayer>,
    /// Final Linear(h, 1, bias=False) before the sigmoid.
    pub tail: Vec<f32>,
}

const BN1D_EPS: f64 = 1e-5;

impl CrasHead {
    /// Every (key, shape) of the paper's head at width `d` (adaptor D -> D; scorer
    /// 2D -> D -> D/2 -> 1), as CRAS-level state-dict names.
    pub fn expected_keys(d: usize) -> Vec<(String, Vec<usize>)> {
        let mut keys = vec![
            ("pre_projection.layers.0fc.weight".to_string(), vec![d, d]),
            ("pre_projection.layers.0fc.bias".to_string(), vec![d]),
        ];
        for (i, (out, inp)) in [(d, 2 * d), (d / 2, d)].into_iter().enumerate() {
            let p = format!("discriminator.body.block{}", i + 1);
            keys.push((format!("{p}.0.weight"), vec![out, inp]));
            keys.push((format!("{p}.0.bias"), vec![out]));
            for s in ["weight", "bias", "running_mean", "running_var"] {
                keys.push((format!("{p}.1.{s}"), vec![out]));
            }
        }
        keys.push(("discriminator.tail.0.weight".to_string(), vec![1, d / 2]));
        keys
    }

    /// Reads the head from CRAS-level names: `pre_projection.layers.0fc.*` and
    /// `discriminator.body.block{i}.{0,1}.*`, `discriminator.tail.0.weight`. A reference
    /// checkpoint (`ckpt_best_*.pth`: {discriminator, pre_projection}) flattens to these.
    pub fn from_state_dict(sd: &StateDict) -> Result<CrasHead, WeightsError> {
        let wkey = "pre_projection.layers.0fc.weight";
        let shape = sd.shape(wkey)?.to_vec();
        if shape.len() != 2 || shape[0] != shape[1] {
            return Err(WeightsError::WrongShape {
                path: sd.source.clone(),
                key: wkey.into(),
                found: shape,
                expected: vec![0, 0],
            });
        }
        let d = shape[0];
        let adaptor_weight = sd.get(wkey, &[d, d])?.to_vec();
        let adaptor_bias = sd.get("pre_projection.layers.0fc.bias", &[d])?.to_vec();
        let mut hidden = Vec::new();
        let mut inp = 2 * d;
        let mut i = 1;
        while sd
            .tensors
            .contains_key(&format!("discriminator.body.block{i}.0.weight"))
        {
            let p = format!("discriminator.body.block{i}");
            let out = *sd.shape(&format!("{p}.0.weight"))?.first().unwrap_or(&0);
            let w = sd.get(&format!("{p}.0.weight"), &[out, inp])?;
            let b = sd.get(&format!("{p}.0.bias"), &[out])?;
            let gamma = sd.get(&format!("{p}.1.weight"), &[out])?;
            let beta = sd.get(&format!("{p}.1.bias"), &[out])?;
            let mean = sd.get(&format!("{p}.1.running_mean"), &[out])?;
            let var = sd.get(&format!("{p}.1.running_var"), &[out])?;
            let mut weight = vec![0f32; out * inp];
            let mut bias = vec![0f32; out];
            for o in 0..out {
                let scale = gamma[o] as f64 / (var[o] as f64 + BN1D_EPS).sqrt();
                for k in 0..inp {
                    weight[o * inp + k] = (w[o * inp + k] as f64 * scale) as f32;
                }
                bias[o] = ((b[o] as f64 - mean[o] as f64) * scale + beta[o] as f64) as f32;
            }
            hidden.push(ScorerLayer {
                weight,
                bias,
                out,
                inp,
            });
            inp = out;
            i += 1;
        }
        if hidden.is_empty() {
            return Err(WeightsError::MissingKey {
                path: sd.source.clone(),
                key: "discriminator.body.block1.0.weight".into(),
            });
        }
        let tail = sd.get("discriminator.tail.0.weight", &[1, inp])?.to_vec();
        let n_hidden = hidden.len();
        let known = |k: &str| {
            k.starts_with("pre_projection.layers.0fc.")
                && matches!(k.rsplit('.').next(), Some("weight" | "bias"))
                || k == "discriminator.tail.0.weight"
                || (1..=n_hidden).any(|i| {
                    k.strip_prefix(&format!("discriminator.body.block{i}."))
                        .is_some_and(|r| {
                            matches!(
                                r,
                                "0.weight"
                                    | "0.bias"
                                    | "1.weight"
                                    | "1.bias"
                                    | "1.running_mean"
                                    | "1.running_var"
                                    | "1.num_batches_tracked"
                            )
                        })
                })
        };
        sd.reject_unknown(
            &known,
            "a CRAS head (pre_projection with one layer, discriminator)",
        )?;
        Ok(CrasHead {
            embed_dim: d,
            adaptor_weight,
            adaptor_bias,
            hidden,
            tail,
        })
    }
}

/// Per-class center banks [C, P, D].
#[derive(Debug, Clone)]
pub struct Centers {
    pub classes: usize,
    pub patches: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Centers {
    /// Reads `center.pth` (a bare tensor, as the reference saves it) or a `.npy`.
    pub fn load(path: &Path) -> Result<Centers, WeightsError> {
        let sd = StateDict::load(path)?;
        if sd.tensors.len() != 1 {
            return Err(WeightsError::Format {
                path: path.to_path_buf(),
                reason: format!(
                    "expected one [classes, patches, dim] tensor, found {} tensors",
                    sd.tensors.len()
                ),
            });
        }
        let (key, t) = sd
            .tensors
            .iter()
            .next()
            .ok_or_else(|| WeightsError::Format {
                path: path.to_path_buf(),
                reason: "no tensor".into(),
            })?;
        if t.shape.len() != 3 {
            return Err(WeightsError::WrongShape {
                path: path.to_path_buf(),
                key: key.clone(),
                found: t.shape.clone(),
                expected: vec![0, 0, 0],
            });
        }
        let data = t.as_f32().ok_or_else(|| WeightsError::NotFloat {
            path: path.to_path_buf(),
            key: key.clone(),
        })?;
        Ok(Centers {
            classes: t.shape[0],
            patches: t.shape[1],
            dim: t.shape[2],
            data: data.to_vec(),
        })
    }
}
