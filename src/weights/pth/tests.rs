//! Crafted checkpoints: each one a way a hostile or corrupt file could try to crash,
//! exhaust or fool the reader.

use super::*;

/// Writes protocol-2 pickles by hand, opcode by opcode.
struct Writer(Vec<u8>);

impl Writer {
    fn new() -> Writer {
        Writer(b"\x80\x02".to_vec())
    }
    fn op(mut self, bytes: &[u8]) -> Writer {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(mut self, s: &str) -> Writer {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(mut self, i: i64) -> Writer {
        self.0.extend_from_slice(&[0x8a, 8]);
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    fn global(self, module: &str, name: &str) -> Writer {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn ints(self, values: &[i64]) -> Writer {
        values.iter().fold(self.op(b"("), |w, &v| w.int(v)).op(b"t")
    }
    /// `_rebuild_tensor_v2(storage "0" of floats, offset, size, stride, False, {})`.
    fn tensor(self, offset: i64, size: &[i64], stride: &[i64]) -> Writer {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", "FloatStorage")
            .str("0")
            .str("cpu")
            .int(6)
            .op(b"tQ")
            .int(offset)
            .ints(size)
            .ints(stride)
            .op(b"\x89}tR")
    }
    fn end(self) -> Vec<u8> {
        self.op(b".").0
    }
}

/// A legacy-format file: magic, protocol, sys info, `root`, the key list ["0"], then
/// storage "0" as `count` followed by `data` as f32.
fn legacy(root: Vec<u8>, count: i64, data: &[f32]) -> Vec<u8> {
    let mut file = legacy_head(root);
    file.extend(Writer::new().op(b"]").str("0").op(b"a").end());
    file.extend_from_slice(&count.to_le_bytes());
    for v in data {
        file.extend_from_slice(&v.to_le_bytes());
    }
    file
}

/// A legacy-format file without storages.
fn legacy_bare(root: Vec<u8>) -> Vec<u8> {
    let mut file = legacy_head(root);
    file.extend(Writer::new().op(b"]").end());
    file
}

fn legacy_head(root: Vec<u8>) -> Vec<u8> {
    let mut magic = b"\x80\x02\x8a\x0a".to_vec();
    magic.extend_from_slice(&[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]);
    magic.push(b'.');
    let mut file = magic;
    file.extend(Writer::new().int(1001).end());
    file.extend(Writer::new().op(b"}").end());
    file.extend(root);
    file
}

const SIX: [f32; 6] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];

fn one_tensor(offset: i64, size: &[i64], stride: &[i64]) -> Vec<u8> {
    Writer::new()
        .op(b"}")
        .str("w")
        .tensor(offset, size, stride)
        .op(b"s")
        .end()
}

fn error_of(file: &[u8]) -> String {
    match load_legacy(file) {
        Ok(t) => panic!("accepted: {t:?}"),
        Err(e) => e.0,
    }
}

#[test]
fn a_strided_tensor_is_read_in_row_major_order() {
    // A 3x2 transposed view of storage [0..6) seen as 2x3.
    let t = load_legacy(&legacy(one_tensor(0, &[3, 2], &[1, 3]), 6, &SIX)).unwrap();
    assert_eq!(t["w"].shape, vec![3, 2]);
    assert_eq!(t["w"].as_f32().unwrap(), &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    // Offset 1, one row of 4.
    let t = load_legacy(&legacy(one_tensor(1, &[4], &[1]), 6, &SIX)).unwrap();
    assert_eq!(t["w"].as_f32().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn offsets_strides_and_sizes_are_checked() {
    let e = error_of(&legacy(one_tensor(-1, &[2], &[1]), 6, &SIX));
    assert!(e.contains("`w`") && e.contains("offset"), "{e}");
    let e = error_of(&legacy(one_tensor(0, &[2, -3], &[1, 1]), 6, &SIX));
    assert!(e.contains("negative"), "{e}");
    // Past the end by one.
    let e = error_of(&legacy(one_tensor(1, &[6], &[1]), 6, &SIX));
    assert!(e.contains("past the end"), "{e}");
    // Offset and stride that overflow a usize when added up.
    let e = error_of(&legacy(one_tensor(i64::MAX, &[3], &[i64::MAX]), 6, &SIX));
    assert!(e.contains("past the end"), "{e}");
    // 2^62 elements of a stride-0 view: counted before anything is allocated.
    let e = error_of(&legacy(
        one_tensor(0, &[1 << 31, 1 << 31], &[0, 0]),
        6,
        &SIX,
    ));
    assert!(e.contains("elements"), "{e}");
    let e = error_of(&legacy(
        one_tensor(0, &[1 << 40, 1 << 40], &[0, 0]),
        6,
        &SIX,
    ));
    assert!(e.contains("elements"), "{e}");
}

#[test]
fn legacy_storage_lengths_are_checked() {
    let root = one_tensor(0, &[2], &[1]);
    let e = error_of(&legacy(root.clone(), -1, &SIX));
    assert!(e.contains("impossible size"), "{e}");
    let e = error_of(&legacy(root.clone(), i64::MAX, &SIX));
    assert!(e.contains("impossible size"), "{e}");
    let e = error_of(&legacy(root, 1 << 40, &SIX));
    assert!(e.contains("truncated"), "{e}");
}

/// Dicts of two references to the dict below, 40 levels: 2^40 paths to one tensor.
#[test]
fn shared_dicts_cannot_multiply_the_walk() {
    let mut w = Writer::new()
        .op(b"}")
        .str("w")
        .tensor(0, &[2], &[1])
        .op(b"sq\x00");
    for level in 1..=40u8 {
        w = w.op(b"}(").str("a").op(&[b'h', level - 1]).str("b").op(&[
            b'h',
            level - 1,
            b'u',
            b'q',
            level,
        ]);
    }
    let e = error_of(&legacy(w.end(), 6, &SIX));
    assert!(e.contains("dict entries"), "{e}");
}

#[test]
fn nesting_is_bounded() {
    let mut w = Writer::new();
    for _ in 0..100 {
        w = w.op(b"}").str("k");
    }
    w = w.op(b"}");
    for _ in 0..100 {
        w = w.op(b"s");
    }
    let e = error_of(&legacy_bare(w.end()));
    assert!(e.contains("nested more than 64"), "{e}");
}

#[test]
fn code_is_never_called() {
    // os.system("...") as the root: an inert record, not a tensor.
    let root = Writer::new()
        .global("os", "system")
        .op(b"(")
        .str("touch /tmp/pwned")
        .op(b"tR")
        .end();
    assert_eq!(error_of(&legacy_bare(root)), "the file holds no tensors");
}

fn zip_with(name: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file(name, options).unwrap();
    zip.write_all(data).unwrap();
    zip.finish().unwrap();
    out.into_inner()
}

/// Sets the uncompressed size of the only entry, in its local header and in the
/// central directory, as a zip bomb would.
fn declare_size(zip: &mut [u8], size: u32) {
    let local = zip.windows(4).position(|w| w == b"PK\x03\x04").unwrap();
    zip[local + 22..local + 26].copy_from_slice(&size.to_le_bytes());
    let central = zip.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    zip[central + 24..central + 28].copy_from_slice(&size.to_le_bytes());
}

#[test]
fn zip_entries_never_inflate_past_what_they_declare() {
    // 64 MiB of zeros deflate to ~64 KiB; the entry claims 100 bytes.
    let mut file = zip_with("archive/data.pkl", &vec![0u8; 64 << 20]);
    assert!(file.len() < 1 << 20);
    declare_size(&mut file, 100);
    let e = load_zip(&file).unwrap_err().0;
    // (The zip reader notices first; `read_entry` would stop at 101 bytes either way.)
    assert!(e.contains("data.pkl") && e.contains("declared"), "{e}");
    // An honest header over the limit is refused before reading.
    let file = zip_with(
        "archive/data.pkl",
        &vec![0u8; (MAX_PICKLE_BYTES + 1) as usize],
    );
    let e = load_zip(&file).unwrap_err().0;
    assert!(e.contains("more than the 67108864"), "{e}");
}
