//! Protobuf wire-format encoding (varints and length-delimited fields): the subset the
//! ONNX writer needs.

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
