//! Tensor storages: their element types, how a pickle names one, and where their bytes
//! come from (the zip format's entries or the legacy format's blobs).

use super::MAX_STORAGE_BYTES;
use crate::weights::Malformed;
use crate::weights::pickle::{Id, Pickle, Value};
use std::collections::HashMap;
use std::io::Read;

/// Element type of a torch storage, from its pickled class name.
#[derive(Debug, Clone, Copy)]
pub(super) enum StorageType {
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
    pub(super) fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
    pub(super) fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F64 | Self::F16 | Self::BF16)
    }
    pub(super) fn read_f32(self, b: &[u8]) -> f32 {
        match self {
            Self::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Self::F64 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[..8]);
                f64::from_le_bytes(a) as f32
            }
            Self::F16 => crate::weights::npy::f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            Self::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
            _ => self.read_i64(b) as f32,
        }
    }
    pub(super) fn read_i64(self, b: &[u8]) -> i64 {
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

pub(super) struct StorageRef {
    pub(super) dtype: StorageType,
    pub(super) key: String,
}

pub(super) fn storage_ref(p: &Pickle, pid: Id) -> Result<StorageRef, Malformed> {
    let items = p.tuple(pid).ok_or("storage id is not a tuple")?;
    if items.len() < 3 || p.str(items[0]) != Some("storage") {
        return Err("unknown persistent id (not a torch storage)".into());
    }
    let dtype = match p.get(items[1]) {
        Value::Global(_, name) => StorageType::from_name(name)
            .ok_or_else(|| Malformed(format!("unsupported storage type {name}")))?,
        _ => return Err("storage type is not a class reference".into()),
    };
    let key = p
        .str(items[2])
        .ok_or("storage key is not a string")?
        .to_string();
    Ok(StorageRef { dtype, key })
}

/// Where tensors' bytes come from: the zip format's `data/<key>` entries or the legacy
/// format's blobs after the pickles.
pub(super) trait Storages {
    fn bytes(&mut self, key: &str) -> Result<&[u8], Malformed>;
}

/// The legacy format's storages: slices of the file itself.
pub(super) struct Inline<'a>(pub(super) HashMap<String, &'a [u8]>);

impl Storages for Inline<'_> {
    fn bytes(&mut self, key: &str) -> Result<&[u8], Malformed> {
        self.0
            .get(key)
            .copied()
            .ok_or_else(|| Malformed(format!("storage {key} missing")))
    }
}

/// The zip format's storages, each decompressed once (tensors may share one) and all
/// together at most [`MAX_STORAGE_BYTES`].
pub(super) struct Zipped<'a> {
    pub(super) zip: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    pub(super) prefix: String,
    pub(super) read: HashMap<String, Vec<u8>>,
    pub(super) total: u64,
}

impl Storages for Zipped<'_> {
    fn bytes(&mut self, key: &str) -> Result<&[u8], Malformed> {
        if !self.read.contains_key(key) {
            let name = format!("{}data/{key}", self.prefix);
            let buf = read_entry(&mut self.zip, &name, MAX_STORAGE_BYTES - self.total)?;
            self.total += buf.len() as u64;
            self.read.insert(key.to_string(), buf);
        }
        self.read
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| Malformed(format!("storage {key} missing")))
    }
}

/// Reads one zip entry, refusing one that declares more than `limit` bytes; never
/// inflates more than it declared (a lying entry is an error, not a memory bomb).
pub(super) fn read_entry(
    zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, Malformed> {
    let entry = zip
        .by_name(name)
        .map_err(|e| Malformed(format!("{name} missing ({e})")))?;
    let declared = entry.size();
    if declared > limit {
        return Err(Malformed(format!(
            "{name} holds {declared} bytes, more than the {limit} a weights file may"
        )));
    }
    // Capacity grows with what actually inflates, not with what the header claims.
    let mut buf = Vec::with_capacity(declared.min(1 << 20) as usize);
    entry
        .take(declared + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Malformed(format!("cannot read {name}: {e}")))?;
    if buf.len() as u64 != declared {
        return Err(Malformed(format!(
            "{name} inflates to {} bytes, not the {declared} it declared (corrupt file)",
            buf.len()
        )));
    }
    Ok(buf)
}
