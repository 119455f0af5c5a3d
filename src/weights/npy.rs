//! NumPy `.npy` (format v1/v2, little-endian, C order): read f32/f16/f64/i64/i32 arrays,
//! write f32 arrays (anomaly maps).

use super::{Malformed, Tensor, TensorData};
use std::io::Write;
use std::path::Path;

/// The most dimensions an array may have (NumPy's own limit is 64; cras reads maps,
/// centers and weights of at most 4).
const MAX_DIMS: usize = 32;

pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(r) = rest.strip_prefix('(') {
        return r.find(')').map(|e| &r[..e]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

pub fn read(bytes: &[u8]) -> Result<Tensor, Malformed> {
    if !bytes.starts_with(b"\x93NUMPY") || bytes.len() < 10 {
        return Err("not a .npy file".into());
    }
    let major = bytes[6];
    let (hlen, hstart) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(Malformed(format!("unsupported .npy version {v}"))),
    };
    let header = std::str::from_utf8(
        bytes
            .get(hstart..hstart + hlen)
            .ok_or("truncated .npy header")?,
    )
    .map_err(|_| "bad .npy header")?;
    let descr = header_value(header, "descr").ok_or("no descr in .npy header")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if header_value(header, "fortran_order") != Some("False") {
        return Err("Fortran-order .npy is not supported".into());
    }
    let shape: Vec<usize> = header_value(header, "shape")
        .ok_or("no shape in .npy header")?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| "bad shape in .npy header"))
        .collect::<Result<_, _>>()?;
    if shape.len() > MAX_DIMS {
        return Err(Malformed(format!(
            ".npy array has {} dimensions, more than {MAX_DIMS}",
            shape.len()
        )));
    }
    let n = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or("the .npy shape's element count overflows")?;
    let body = &bytes[hstart + hlen..];
    // Every element read is in the file: nothing is allocated for data that is not there.
    let need = |es: usize| -> Result<&[u8], Malformed> {
        n.checked_mul(es)
            .and_then(|len| body.get(..len))
            .ok_or_else(|| {
                Malformed(format!(
                    "truncated .npy data: {} bytes for {n} elements of {es}",
                    body.len()
                ))
            })
    };
    let data = match descr {
        "<f4" => TensorData::F32(
            need(4)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        "<f2" => TensorData::F32(
            need(2)?
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        "<f8" => TensorData::F32(
            need(8)?
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    f64::from_le_bytes(a) as f32
                })
                .collect(),
        ),
        "<i8" => TensorData::I64(
            need(8)?
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::from_le_bytes(a)
                })
                .collect(),
        ),
        "<i4" => TensorData::I64(
            need(4)?
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        ),
        d => return Err(Malformed(format!("unsupported .npy dtype {d}"))),
    };
    Ok(Tensor { shape, data })
}

/// Reads a `.npy` file from disk.
pub fn read_file(path: &Path) -> Result<Tensor, Malformed> {
    let bytes = std::fs::read(path)
        .map_err(|e| Malformed(format!("cannot read {}: {e}", path.display())))?;
    read(&bytes).map_err(|e| Malformed(format!("{}: {e}", path.display())))
}

/// Reads an f64 (`<f8`) `.npy` exactly (f64 arrays are otherwise narrowed to f32).
pub fn read_f64_file(path: &Path) -> Result<Vec<f64>, Malformed> {
    let bytes = std::fs::read(path)
        .map_err(|e| Malformed(format!("cannot read {}: {e}", path.display())))?;
    // Validates the header (and the data length) first.
    let t = read(&bytes).map_err(|e| Malformed(format!("{}: {e}", path.display())))?;
    let n = t.numel();
    if bytes[6] != 1 {
        return Err(Malformed(format!(
            "{}: only .npy version 1 is read as float64",
            path.display()
        )));
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let body = &bytes[10 + hlen..];
    if body.len() != n * 8 {
        return Err(Malformed(format!(
            "{}: not a float64 array",
            path.display()
        )));
    }
    Ok(body
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            f64::from_le_bytes(a)
        })
        .collect())
}

/// Writes a float32 array in `.npy` v1 format.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> std::io::Result<()> {
    let shape_str = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Pad so that the data starts at a multiple of 64 bytes, newline-terminated.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.33325195);
        assert_eq!(f16_to_f32(0x0001), 5.9604645e-8);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }

    fn header(shape: &str) -> Vec<u8> {
        let h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n");
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b
    }

    #[test]
    fn shapes_that_overflow_or_overreach_are_errors() {
        let e = read(&header("(4294967296, 4294967296, 4294967296)"))
            .unwrap_err()
            .0;
        assert!(e.contains("overflows"), "{e}");
        // 2^62 elements of 4 bytes: the byte count overflows, not just the count.
        let e = read(&header("(4611686018427387904,)")).unwrap_err().0;
        assert!(e.contains("truncated .npy data: 0 bytes"), "{e}");
        let mut b = header("(1000000, 1000000)");
        b.extend_from_slice(&[0u8; 16]);
        let e = read(&b).unwrap_err().0;
        assert!(e.contains("truncated .npy data: 16 bytes"), "{e}");
        let e = read(&header(&format!("({})", vec!["1"; 40].join(", "))))
            .unwrap_err()
            .0;
        assert!(e.contains("40 dimensions"), "{e}");
        let e = read(&header("(-3,)")).unwrap_err().0;
        assert!(e.contains("bad shape"), "{e}");
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        let t = read_file(&p).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data, TensorData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]));
        let bytes = std::fs::read(&p).unwrap();
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
    }
}
