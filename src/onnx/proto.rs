//! Protobuf wire-format encoding (varints and length-delimited fields): the subset the
//! ONNX writer needs, and the ONNX messages built from it (nodes, tensors, value infos).

use super::{Attr, Dim, ElemType, InitData, Initializer, Node, ValueInfo};

pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Encoder { buf: Vec::new() }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }

    /// An int32/int64/enum field (negative values as 10-byte two's complement).
    pub fn int(&mut self, field: u32, v: i64) {
        self.tag(field, 0);
        self.varint(v as u64);
    }

    pub fn float(&mut self, field: u32, v: f32) {
        self.tag(field, 5);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(&mut self, field: u32, b: &[u8]) {
        self.tag(field, 2);
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    pub fn message(&mut self, field: u32, m: &[u8]) {
        self.bytes(field, m);
    }

    pub fn packed_ints(&mut self, field: u32, v: &[i64]) {
        let mut inner = Encoder::new();
        for x in v {
            inner.varint(*x as u64);
        }
        self.bytes(field, &inner.buf);
    }
}

/// A NodeProto.
pub(super) fn encode_node(n: &Node) -> Vec<u8> {
    let mut e = Encoder::new();
    for i in &n.inputs {
        e.string(1, i);
    }
    for o in &n.outputs {
        e.string(2, o);
    }
    e.string(3, &n.name);
    e.string(4, &n.op);
    for (name, a) in &n.attrs {
        let mut ae = Encoder::new();
        ae.string(1, name);
        match a {
            Attr::Float(f) => {
                ae.float(2, *f);
                ae.int(20, 1);
            }
            Attr::Int(i) => {
                ae.int(3, *i);
                ae.int(20, 2);
            }
            Attr::Str(s) => {
                ae.bytes(4, s.as_bytes());
                ae.int(20, 3);
            }
            Attr::Ints(v) => {
                ae.packed_ints(8, v);
                ae.int(20, 7);
            }
        }
        e.message(5, &ae.into_bytes());
    }
    e.into_bytes()
}

/// A TensorProto with its data as raw little-endian bytes.
pub(super) fn encode_tensor(t: &Initializer) -> Vec<u8> {
    let mut e = Encoder::new();
    e.packed_ints(1, &t.dims);
    // Field 2: element type; 8: name; 9: raw_data, little-endian.
    let (elem, raw) = match &t.data {
        InitData::F32(v) => (ElemType::F32, le_bytes(v, f32::to_le_bytes)),
        InitData::I64(v) => (ElemType::I64, le_bytes(v, i64::to_le_bytes)),
    };
    e.int(2, elem as i64);
    e.string(8, &t.name);
    e.bytes(9, &raw);
    e.into_bytes()
}

/// The values' bytes one after another, each as `to_le` writes it.
fn le_bytes<T: Copy, const N: usize>(values: &[T], to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(values.len() * N);
    for &x in values {
        raw.extend_from_slice(&to_le(x));
    }
    raw
}

/// A ValueInfoProto (name and tensor type with its shape).
pub(super) fn encode_value_info(v: &ValueInfo) -> Vec<u8> {
    let mut shape = Encoder::new();
    for d in &v.dims {
        let mut de = Encoder::new();
        match d {
            Dim::Fixed(n) => de.int(1, *n),
            Dim::Sym(s) => de.string(2, s),
        }
        shape.message(1, &de.into_bytes());
    }
    let mut tensor = Encoder::new();
    tensor.int(1, v.elem as i64);
    tensor.message(2, &shape.into_bytes());
    let mut ty = Encoder::new();
    ty.message(1, &tensor.into_bytes());
    let mut e = Encoder::new();
    e.string(1, &v.name);
    e.message(2, &ty.into_bytes());
    e.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_varints_and_fields_like_protoc() {
        let mut e = Encoder::new();
        e.int(1, 150);
        assert_eq!(e.into_bytes(), vec![0x08, 0x96, 0x01]);
        let mut e = Encoder::new();
        e.string(2, "testing");
        assert_eq!(e.into_bytes(), b"\x12\x07testing".to_vec());
        let mut e = Encoder::new();
        e.int(3, -1);
        assert_eq!(e.into_bytes().len(), 11);
    }
}
