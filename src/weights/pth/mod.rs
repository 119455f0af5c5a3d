//! PyTorch `torch.save` files: the zip format (torch >= 1.6) and the legacy
//! concatenated-pickle format (as shipped by many older pretrained-weight packages).
//!
//! Nested dicts are flattened with `.` (so a checkpoint `{'discriminator': {...}}` gives
//! `discriminator.body...`); a file holding one bare tensor gives the key `""`.
//! Non-tensor leaves (epochs, strings, ...) are ignored.

mod storage;
mod tensor;
#[cfg(test)]
mod tests;

use super::pickle::{self, Id, Pickle, Value};
use super::{Malformed, Tensor};
use std::collections::{BTreeMap, HashMap};
use storage::{Inline, Storages, Zipped, read_entry, storage_ref};
use tensor::rebuild_tensor;

/// The largest `data.pkl` read from a zip checkpoint (real ones are kilobytes).
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// The most bytes of storage read from one file, decompressed.
const MAX_STORAGE_BYTES: u64 = 2 << 30;
/// The most tensor elements one file may produce, all tensors together (1 GiB as f32).
const MAX_ELEMENTS: usize = 1 << 28;
/// The most dict entries visited while collecting tensors, and how deep they may nest.
const MAX_ENTRIES: usize = 1 << 18;
const MAX_DEPTH: usize = 64;
/// The longest tensor name (`a.b.c`) and the most dimensions of one tensor.
const MAX_NAME_LEN: usize = 512;
const MAX_DIMS: usize = 16;

/// The tensors reachable from the pickle's root, named by their dict keys joined with `.`.
/// Walks with an explicit work list: no recursion, bounded depth and entry count.
fn tensors(p: &Pickle, storages: &mut dyn Storages) -> Result<BTreeMap<String, Tensor>, Malformed> {
    let mut out = BTreeMap::new();
    let mut elements = 0usize;
    let mut entries = 0usize;
    let mut work = vec![(String::new(), p.root(), 0usize)];
    while let Some((prefix, id, depth)) = work.pop() {
        let Value::Call(call) = p.get(id) else {
            if let Value::Dict(items) = p.get(id) {
                push_entries(p, &prefix, items, depth, &mut work, &mut entries)?;
            }
            continue;
        };
        let Value::Global(module, name) = p.get(call.func) else {
            continue;
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => {
                push_entries(p, &prefix, &call.items, depth, &mut work, &mut entries)?
            }
            ("torch._utils", "_rebuild_tensor_v2") => {
                let t = rebuild_tensor(p, call.args, storages, &mut elements)
                    .map_err(|e| Malformed(format!("`{prefix}`: {e}")))?;
                out.insert(prefix, t);
            }
            ("torch._utils", "_rebuild_parameter") => {
                if let Some(&inner) = p.tuple(call.args).and_then(|a| a.first()) {
                    descend(&prefix, depth, &mut entries, 1)?;
                    work.push((prefix, inner, depth + 1));
                }
            }
            ("torch._utils", _) => {
                return Err(Malformed(format!(
                    "`{prefix}`: tensors stored with {module}.{name} are not supported (save a plain state_dict)"
                )));
            }
            _ => {}
        }
    }
    if out.is_empty() {
        return Err("the file holds no tensors".into());
    }
    Ok(out)
}

/// Counts `n` more entries one level below `depth`, against the depth and entry limits.
fn descend(prefix: &str, depth: usize, entries: &mut usize, n: usize) -> Result<(), Malformed> {
    if depth >= MAX_DEPTH {
        return Err(Malformed(format!(
            "`{prefix}`: dicts nested more than {MAX_DEPTH} deep (a crafted file?)"
        )));
    }
    *entries += n.max(1);
    if *entries > MAX_ENTRIES {
        return Err(Malformed(format!(
            "more than {MAX_ENTRIES} dict entries (a crafted file?)"
        )));
    }
    Ok(())
}

/// Queues a dict's entries under `prefix`, counting them against the limits.
fn push_entries(
    p: &Pickle,
    prefix: &str,
    items: &[(Id, Id)],
    depth: usize,
    work: &mut Vec<(String, Id, usize)>,
    entries: &mut usize,
) -> Result<(), Malformed> {
    descend(prefix, depth, entries, items.len())?;
    for &(k, v) in items.iter().rev() {
        let key = match p.get(k) {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            _ => continue,
        };
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        if name.len() > MAX_NAME_LEN {
            return Err(Malformed(format!(
                "a tensor name is longer than {MAX_NAME_LEN} bytes"
            )));
        }
        work.push((name, v, depth + 1));
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
    let pkl = read_entry(&mut zip, &pkl_name, MAX_PICKLE_BYTES)?;
    let (root, _) = pickle::load(&pkl).map_err(|e| Malformed(format!("{pkl_name}: {e}")))?;
    let mut storages = Zipped {
        zip,
        prefix,
        read: HashMap::new(),
        total: 0,
    };
    tensors(&root, &mut storages)
}

/// The legacy format's magic number, as the first pickle's (long) integer.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Legacy format: magic, protocol, sys-info and object pickles, a pickled list of storage
/// keys, then for each key an i64 element count followed by the raw elements.
pub fn load_legacy(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, Malformed> {
    let mut pos = 0usize;
    let mut next = |what: &str| -> Result<Pickle, Malformed> {
        let rest = bytes.get(pos..).unwrap_or_default();
        let (p, used) = pickle::load(rest).map_err(|e| Malformed(format!("{what}: {e}")))?;
        pos += used;
        Ok(p)
    };
    let magic = next("magic number")?;
    if !matches!(magic.get(magic.root()), Value::BigInt(b) if b[..] == LEGACY_MAGIC) {
        return Err("pickle without the PyTorch magic number: not a torch.save file".into());
    }
    let _protocol = next("protocol version")?;
    let _sys_info = next("sys info")?;
    let root = next("object")?;
    let list = next("storage keys")?;
    let Value::List(ids) = list.get(list.root()) else {
        return Err("storage key list missing".into());
    };
    let keys = ids
        .iter()
        .map(|&i| {
            list.str(i)
                .map(str::to_string)
                .ok_or("storage key not a string")
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Storage element sizes come from the object pickle's persistent ids.
    let sizes: HashMap<String, usize> = root
        .objects()
        .iter()
        .filter_map(|v| match v {
            Value::Persistent(pid) => storage_ref(&root, *pid).ok(),
            _ => None,
        })
        .map(|s| (s.key, s.dtype.size()))
        .collect();
    let mut blobs = HashMap::new();
    let truncated = "file ends inside the storage data (truncated download?)";
    for key in keys {
        let es = *sizes
            .get(&key)
            .ok_or_else(|| Malformed(format!("storage {key} is listed but never used")))?;
        let count = bytes.get(pos..pos + 8).ok_or(truncated)?;
        let n = i64::from_le_bytes(count.try_into().map_err(|_| truncated)?);
        pos += 8;
        let len = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(es))
            .ok_or_else(|| Malformed(format!("storage {key} has a negative or impossible size")))?;
        let end = pos
            .checked_add(len)
            .filter(|&end| end <= bytes.len())
            .ok_or(truncated)?;
        blobs.insert(key, &bytes[pos..end]);
        pos = end;
    }
    tensors(&root, &mut Inline(blobs))
}
