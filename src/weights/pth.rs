//! PyTorch `torch.save` files: the zip format (torch >= 1.6) and the legacy
//! concatenated-pickle format (as shipped by many older pretrained-weight packages).
//!
//! Nested dicts are flattened with `.` (so a checkpoint `{'discriminator': {...}}` gives
//! `discriminator.body...`); a file holding one bare tensor gives the key `""`.
//! Non-tensor leaves (epochs, strings, ...) are ignored.

use super::pickle::{self, Value};
use super::{Malformed, Tensor, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;

/// Element type of a torch storage, from its pickled class name.
#[derive(Debug, Clone, Copy)]
enum StorageType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageType {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
    fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F64 | Self::F16 | Self::BF16)
    }
    fn read_f32(self, b: &[u8]) -> f32 {
        match self {
            Self::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Self::F64 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[..8]);
                f64::from_le_bytes(a) as f32
            }
            Self::F16 => super::npy::f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            Self::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
            _ => self.read_i64(b) as f32,
        }
    }
    fn read_i64(self, b: &[u8]) -> i64 {
        match self {
            Self::I64 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[..8]);
                i64::from_le_bytes(a)
            }
            Self::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            Self::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            Self::I8 => b[0] as i8 as i64,
            Self::U8 | Self::Bool => b[0] as i64,
            _ => self.read_f32(b) as i64,
        }
    }
}

struct StorageRef {
    dtype: StorageType,
    key: String,
}

fn storage_ref(pid: &Value) -> Result<StorageRef, Malformed> {
    let Value::Tuple(items) = pid else {
        return Err("storage id is not a tuple".into());
    };
    if items.first().and_then(Value::as_str) != Some("storage") || items.len() < 3 {
        return Err("unknown persistent id (not a torch storage)".into());
    }
    let dtype = match &items[1] {
        Value::Global(_, name) => StorageType::from_name(name)
            .ok_or_else(|| Malformed(format!("unsupported storage type {name}")))?,
        _ => return Err("storage type is not a class reference".into()),
    };
    let key = items[2]
        .as_str()
        .ok_or("storage key is not a string")?
        .to_string();
    Ok(StorageRef { dtype, key })
}

/// Converts a pickled `_rebuild_tensor_v2(storage, offset, size, stride, ...)` into a
/// dense row-major tensor, fetching bytes through `storage`.
fn rebuild_tensor(
    args: &[Value],
    storage: &dyn Fn(&StorageRef) -> Result<Vec<u8>, Malformed>,
) -> Result<Tensor, Malformed> {
    let pid = match args.first() {
        Some(Value::Persistent(p)) => p,
        _ => return Err("tensor without storage".into()),
    };
    let sref = storage_ref(pid)?;
    let offset = args.get(1).and_then(Value::as_int).ok_or("bad offset")? as usize;
    let ints = |v: Option<&Value>| -> Result<Vec<usize>, Malformed> {
        match v {
            Some(Value::Tuple(t)) => t
                .iter()
                .map(|x| {
                    x.as_int()
                        .filter(|i| *i >= 0)
                        .map(|i| i as usize)
                        .ok_or_else(|| Malformed::from("bad size/stride"))
                })
                .collect(),
            _ => Err("size/stride is not a tuple".into()),
        }
    };
    let shape = ints(args.get(2))?;
    let stride = ints(args.get(3))?;
    if shape.len() != stride.len() {
        return Err("size and stride differ in length".into());
    }
    let bytes = storage(&sref)?;
    let es = sref.dtype.size();
    let numel: usize = shape.iter().product();
    // Element index in the storage for each row-major position.
    let mut idx = vec![0usize; shape.len()];
    let mut positions = Vec::with_capacity(numel);
    for _ in 0..numel {
        let p = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
        if (p + 1) * es > bytes.len() {
            return Err(Malformed(format!(
                "tensor reaches past the end of storage {}",
                sref.key
            )));
        }
        positions.push(p);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    let data = if sref.dtype.is_float() {
        TensorData::F32(
            positions
                .iter()
                .map(|p| sref.dtype.read_f32(&bytes[p * es..]))
                .collect(),
        )
    } else {
        TensorData::I64(
            positions
                .iter()
                .map(|p| sref.dtype.read_i64(&bytes[p * es..]))
                .collect(),
        )
    };
    Ok(Tensor { shape, data })
}

fn flatten(
    prefix: &str,
    v: &Value,
    storage: &dyn Fn(&StorageRef) -> Result<Vec<u8>, Malformed>,
    out: &mut BTreeMap<String, Tensor>,
) -> Result<(), Malformed> {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Dict(items) => {
            for (k, v) in items {
                let k = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                flatten(&join(&k), v, storage, out)?;
            }
        }
        Value::Call {
            func, args, items, ..
        } => match func.as_ref() {
            Value::Global(m, n) if m == "collections" && n == "OrderedDict" => {
                flatten(prefix, &Value::Dict(items.clone()), storage, out)?;
            }
            Value::Global(m, n) if m == "torch._utils" && n == "_rebuild_tensor_v2" => {
                let t = rebuild_tensor(args, storage)
                    .map_err(|e| Malformed(format!("`{prefix}`: {e}")))?;
                out.insert(prefix.to_string(), t);
            }
            Value::Global(m, n) if m == "torch._utils" && n == "_rebuild_parameter" => {
                if let Some(inner) = args.first() {
                    flatten(prefix, inner, storage, out)?;
                }
            }
            Value::Global(m, n) if m == "torch._utils" => {
                return Err(Malformed(format!(
                    "`{prefix}`: tensors stored with {m}.{n} are not supported (save a plain state_dict)"
                )));
            }
            _ => {}
        },
        _ => {}
    }
    Ok(())
}

pub fn load_zip(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, Malformed> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| {
        Malformed(format!(
            "not a complete PyTorch zip archive ({e}); truncated download?"
        ))
    })?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or("zip archive without data.pkl: not a torch.save file")?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)
        .and_then(|mut f| f.read_to_end(&mut pkl).map_err(Into::into))
        .map_err(|e| Malformed(format!("cannot read {pkl_name}: {e}")))?;
    let (root, _) = pickle::load(&pkl).map_err(|e| Malformed(format!("{pkl_name}: {e}")))?;
    let zip = std::cell::RefCell::new(zip);
    let storage = |s: &StorageRef| -> Result<Vec<u8>, Malformed> {
        let name = format!("{prefix}data/{}", s.key);
        let mut z = zip.borrow_mut();
        let mut f = z
            .by_name(&name)
            .map_err(|e| Malformed(format!("storage {name} missing ({e})")))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| Malformed(format!("cannot read storage {name}: {e}")))?;
        Ok(buf)
    };
    let mut out = BTreeMap::new();
    flatten("", &root, &storage, &mut out)?;
    if out.is_empty() {
        return Err("the file holds no tensors".into());
    }
    Ok(out)
}

/// Legacy format: magic, protocol, sys-info and object pickles, a pickled list of storage
/// keys, then for each key an i64 element count followed by the raw elements.
pub fn load_legacy(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, Malformed> {
    let mut pos = 0usize;
    let mut next = |what: &str| -> Result<Value, Malformed> {
        let (v, used) =
            pickle::load(&bytes[pos..]).map_err(|e| Malformed(format!("{what}: {e}")))?;
        pos += used;
        Ok(v)
    };
    let magic = next("magic number")?;
    if magic
        != Value::BigInt(vec![
            0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
        ])
    {
        return Err("pickle without the PyTorch magic number: not a torch.save file".into());
    }
    let _protocol = next("protocol version")?;
    let _sys_info = next("sys info")?;
    let root = next("object")?;
    let keys = match next("storage keys")? {
        Value::List(k) => k
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or("storage key not a string")
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err("storage key list missing".into()),
    };
    // Storage element sizes come from the object pickle's persistent ids.
    let mut sizes: HashMap<String, usize> = HashMap::new();
    collect_storage_sizes(&root, &mut sizes);
    let mut blobs: HashMap<String, Vec<u8>> = HashMap::new();
    for key in keys {
        let es = *sizes
            .get(&key)
            .ok_or_else(|| Malformed(format!("storage {key} is listed but never used")))?;
        if pos + 8 > bytes.len() {
            return Err("file ends inside the storage data (truncated download?)".into());
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&bytes[pos..pos + 8]);
        let n = i64::from_le_bytes(a);
        pos += 8;
        let len = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(es))
            .ok_or("negative storage size")?;
        if pos + len > bytes.len() {
            return Err("file ends inside the storage data (truncated download?)".into());
        }
        blobs.insert(key, bytes[pos..pos + len].to_vec());
        pos += len;
    }
    let storage = |s: &StorageRef| -> Result<Vec<u8>, Malformed> {
        blobs
            .get(&s.key)
            .cloned()
            .ok_or_else(|| Malformed(format!("storage {} missing", s.key)))
    };
    let mut out = BTreeMap::new();
    flatten("", &root, &storage, &mut out)?;
    if out.is_empty() {
        return Err("the file holds no tensors".into());
    }
    Ok(out)
}

fn collect_storage_sizes(v: &Value, out: &mut HashMap<String, usize>) {
    match v {
        Value::Persistent(pid) => {
            if let Ok(s) = storage_ref(pid) {
                out.insert(s.key, s.dtype.size());
            }
        }
        Value::Dict(items) => items
            .iter()
            .for_each(|(_, v)| collect_storage_sizes(v, out)),
        Value::Tuple(items) | Value::List(items) => {
            items.iter().for_each(|v| collect_storage_sizes(v, out))
        }
        Value::Call { args, items, .. } => {
            args.iter().for_each(|v| collect_storage_sizes(v, out));
            items
                .iter()
                .for_each(|(_, v)| collect_storage_sizes(v, out));
        }
        _ => {}
    }
}
