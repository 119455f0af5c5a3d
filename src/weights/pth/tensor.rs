//! One tensor from `_rebuild_tensor_v2`: checked sizes, strides and offsets, then the
//! elements copied out of the storage in row-major order.

use super::storage::{Storages, storage_ref};
use super::{MAX_DIMS, MAX_ELEMENTS};
use crate::weights::pickle::{Id, Pickle, Value};
use crate::weights::{Malformed, Tensor, TensorData};

/// A tensor's size or stride tuple.
fn dims(p: &Pickle, v: Option<&Id>, what: &str) -> Result<Vec<usize>, Malformed> {
    let items = v
        .and_then(|&v| p.tuple(v))
        .ok_or_else(|| Malformed(format!("tensor {what} is not a tuple")))?;
    if items.len() > MAX_DIMS {
        return Err(Malformed(format!(
            "tensor {what} has {} dimensions, more than {MAX_DIMS}",
            items.len()
        )));
    }
    items
        .iter()
        .map(|&x| {
            p.int(x)
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| {
                    Malformed(format!(
                        "tensor {what} holds a negative or non-integer value"
                    ))
                })
        })
        .collect()
}

/// Converts a pickled `_rebuild_tensor_v2(storage, offset, size, stride, ...)` into a
/// dense row-major tensor. `elements` counts what the file produced so far.
pub(super) fn rebuild_tensor(
    p: &Pickle,
    args: Id,
    storages: &mut dyn Storages,
    elements: &mut usize,
) -> Result<Tensor, Malformed> {
    let args = p.tuple(args).ok_or("tensor arguments are not a tuple")?;
    let pid = match args.first().map(|&a| p.get(a)) {
        Some(Value::Persistent(pid)) => *pid,
        _ => return Err("tensor without storage".into()),
    };
    let sref = storage_ref(p, pid)?;
    let offset = args
        .get(1)
        .and_then(|&a| p.int(a))
        .and_then(|i| usize::try_from(i).ok())
        .ok_or("storage offset is not a non-negative integer")?;
    let shape = dims(p, args.get(2), "size")?;
    let stride = dims(p, args.get(3), "stride")?;
    if shape.len() != stride.len() {
        return Err("size and stride differ in length".into());
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS - *elements)
        .ok_or_else(|| Malformed(format!("more than {MAX_ELEMENTS} elements in all")))?;
    *elements += numel;
    let bytes = storages.bytes(&sref.key)?;
    let es = sref.dtype.size();
    // A tensor never holds more elements than its storage (a broadcast view would be
    // a few bytes of file that expand to gigabytes).
    if numel > bytes.len() / es {
        return Err(Malformed(format!(
            "tensor has {numel} elements, its storage {} only {} (save it with .contiguous())",
            sref.key,
            bytes.len() / es
        )));
    }
    if numel > 0 {
        // The farthest element, computed with checked arithmetic; every other is nearer,
        // so the positions below can neither overflow nor leave the storage.
        let last = shape.iter().zip(&stride).try_fold(offset, |at, (&d, &s)| {
            (d - 1).checked_mul(s).and_then(|x| at.checked_add(x))
        });
        if !matches!(last, Some(l) if l < bytes.len() / es) {
            return Err(Malformed(format!(
                "tensor reaches past the end of storage {}",
                sref.key
            )));
        }
    }
    let element = |at: usize| &bytes[at * es..(at + 1) * es];
    let positions = Positions::new(&shape, &stride, offset, numel);
    let data = if sref.dtype.is_float() {
        TensorData::F32(
            positions
                .map(|at| sref.dtype.read_f32(element(at)))
                .collect(),
        )
    } else {
        TensorData::I64(
            positions
                .map(|at| sref.dtype.read_i64(element(at)))
                .collect(),
        )
    };
    Ok(Tensor { shape, data })
}

/// Storage positions of a strided tensor's elements, in row-major order.
struct Positions<'a> {
    shape: &'a [usize],
    stride: &'a [usize],
    offset: usize,
    index: Vec<usize>,
    left: usize,
}

impl<'a> Positions<'a> {
    fn new(shape: &'a [usize], stride: &'a [usize], offset: usize, numel: usize) -> Self {
        Positions {
            shape,
            stride,
            offset,
            index: vec![0; shape.len()],
            left: numel,
        }
    }
}

impl Iterator for Positions<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.offset
            + self
                .index
                .iter()
                .zip(self.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        for d in (0..self.shape.len()).rev() {
            self.index[d] += 1;
            if self.index[d] < self.shape[d] {
                break;
            }
            self.index[d] = 0;
        }
        Some(at)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}
