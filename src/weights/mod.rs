//! Weight files: PyTorch `.pth` (zip and legacy formats), safetensors and `.npy`,
//! read into plain named tensors ([`StateDict`]).

pub mod npy;
pub mod pickle;
pub mod pth;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A dense tensor read from a weights file, converted to f32 (integers kept as i64).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Tensor {
            shape,
            data: TensorData::F32(data),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The values as f32, or None for an integer tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            TensorData::I64(_) => None,
        }
    }
}

/// Named tensors, as in a PyTorch `state_dict()`; ordered by name.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
    /// Where the tensors came from, for error messages.
    pub source: PathBuf,
}

/// What is wrong inside a weights file: the parsers' finding, before the path is known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

impl From<String> for Malformed {
    fn from(s: String) -> Malformed {
        Malformed(s)
    }
}

impl From<&str> for Malformed {
    fn from(s: &str) -> Malformed {
        Malformed(s.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable weights file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        key: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: unexpected tensor `{key}` (not part of {what}); is this the right file?")]
    UnknownKey {
        path: PathBuf,
        key: String,
        what: String,
    },
    #[error("{path}: tensor `{key}` holds integers, expected floating point")]
    NotFloat { path: PathBuf, key: String },
}

impl StateDict {
    /// Reads `.pth`/`.pt` (PyTorch zip or legacy), `.safetensors` or `.npy` (one tensor,
    /// keyed by the file stem), chosen by content rather than by extension.
    pub fn load(path: &Path) -> Result<StateDict, WeightsError> {
        let bytes = read_bounded(path)?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tensors = parse(&bytes, &stem).map_err(|reason| WeightsError::Format {
            path: path.to_path_buf(),
            reason: reason.0,
        })?;
        Ok(StateDict {
            tensors,
            source: path.to_path_buf(),
        })
    }

    /// The f32 tensor under `key`, checked against `shape`.
    pub fn get(&self, key: &str, shape: &[usize]) -> Result<&[f32], WeightsError> {
        let t = self
            .tensors
            .get(key)
            .ok_or_else(|| WeightsError::MissingKey {
                path: self.source.clone(),
                key: key.to_string(),
            })?;
        if t.shape != shape {
            return Err(WeightsError::WrongShape {
                path: self.source.clone(),
                key: key.to_string(),
                found: t.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        t.as_f32().ok_or_else(|| WeightsError::NotFloat {
            path: self.source.clone(),
            key: key.to_string(),
        })
    }

    /// The shape of `key`, or a missing-key error.
    pub fn shape(&self, key: &str) -> Result<&[usize], WeightsError> {
        self.tensors
            .get(key)
            .map(|t| t.shape.as_slice())
            .ok_or_else(|| WeightsError::MissingKey {
                path: self.source.clone(),
                key: key.to_string(),
            })
    }

    /// Checks that every key is known, naming the first one that is not.
    pub fn reject_unknown(
        &self,
        known: &dyn Fn(&str) -> bool,
        what: &str,
    ) -> Result<(), WeightsError> {
        match self.tensors.keys().find(|k| !known(k)) {
            Some(k) => Err(WeightsError::UnknownKey {
                path: self.source.clone(),
                key: k.clone(),
                what: what.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The tensors whose names start with `prefix`, with the prefix removed.
    pub fn strip_prefix(&self, prefix: &str) -> StateDict {
        StateDict {
            tensors: self
                .tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
                .collect(),
            source: self.source.clone(),
        }
    }
}

/// The tensors of a weights file's bytes, the format chosen by content; a lone `.npy`
/// array is named `stem`.
pub fn parse(bytes: &[u8], stem: &str) -> Result<BTreeMap<String, Tensor>, Malformed> {
    if bytes.starts_with(b"PK") {
        pth::load_zip(bytes)
    } else if bytes.starts_with(b"\x80") {
        pth::load_legacy(bytes)
    } else if bytes.starts_with(b"\x93NUMPY") {
        Ok(BTreeMap::from([(stem.to_string(), npy::read(bytes)?)]))
    } else {
        load_safetensors(bytes).map_err(|e| {
            Malformed(format!(
                "neither a PyTorch .pth, a .npy nor a safetensors file ({e})"
            ))
        })
    }
}

/// The largest weights file read (the biggest backbone cras knows is ~0.5 GB).
const MAX_FILE_BYTES: u64 = 4 << 30;

/// Reads a whole weights file, refusing one larger than [`MAX_FILE_BYTES`] (a device,
/// or a file that keeps growing, included).
fn read_bounded(path: &Path) -> Result<Vec<u8>, WeightsError> {
    use std::io::Read;
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(WeightsError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "larger than {MAX_FILE_BYTES} bytes, more than any weights file cras reads"
            ),
        });
    }
    Ok(bytes)
}

fn load_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, String> {
    use safetensors::{Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let tensor_data = match view.dtype() {
            Dtype::F32 => TensorData::F32(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::F16 => TensorData::F32(
                data.chunks_exact(2)
                    .map(|c| npy::f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            Dtype::BF16 => TensorData::F32(
                data.chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
            ),
            Dtype::F64 => TensorData::F32(
                data.chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        f64::from_le_bytes(a) as f32
                    })
                    .collect(),
            ),
            Dtype::I64 => TensorData::I64(
                data.chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        i64::from_le_bytes(a)
                    })
                    .collect(),
            ),
            other => return Err(format!("tensor `{name}` has unsupported dtype {other:?}")),
        };
        out.insert(
            name,
            Tensor {
                shape,
                data: tensor_data,
            },
        );
    }
    Ok(out)
}

/// Writes f32 tensors as a safetensors file (used for head/backbone exports and tests).
pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, safetensors_bytes(tensors)?)
}

/// Tensors in the safetensors format, in memory.
pub fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>) -> std::io::Result<Vec<u8>> {
    use safetensors::{Dtype, tensor::TensorView};
    let mut bufs: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    for (k, t) in tensors {
        let (dtype, bytes) = match &t.data {
            TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        bufs.push((k.clone(), t.shape.clone(), dtype, bytes));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(k, s, d, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| std::io::Error::other(e.to_string()))
}
