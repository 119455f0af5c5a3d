//! Reading a graph's signature back: the names and dimensions of its inputs and outputs,
//! from the protobuf wire format, so a bundle's sizes can be checked against its graph
//! without loading an engine. Walks only the fields on the path
//! ModelProto.graph -> GraphProto.input/output -> ValueInfoProto.type -> tensor_type.shape;
//! everything else is skipped. Lengths are checked; nesting is fixed by that path.

/// One graph input or output: its name and dimensions (None where symbolic).
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    pub name: String,
    pub dims: Vec<Option<i64>>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
}

impl Signature {
    pub fn input(&self, name: &str) -> Option<&Port> {
        self.inputs.iter().find(|p| p.name == name)
    }
    pub fn output(&self, name: &str) -> Option<&Port> {
        self.outputs.iter().find(|p| p.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("not a readable ONNX model: {0}")]
pub struct DecodeError(&'static str);

/// A field's payload, as the wire format gives it.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one message, in order.
struct Fields<'a> {
    buf: &'a [u8],
}

fn varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let (&b, rest) = buf
            .split_first()
            .ok_or(DecodeError("ends inside a number"))?;
        *buf = rest;
        if shift == 63 && b > 1 {
            return Err(DecodeError("a number longer than 64 bits"));
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError("a number longer than 64 bits"))
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Wire<'a>), DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let field = (|| {
            let key = varint(&mut self.buf)?;
            let skip = |buf: &mut &'a [u8], n: usize| -> Result<&'a [u8], DecodeError> {
                if buf.len() < n {
                    return Err(DecodeError("a field runs past the end"));
                }
                let (head, rest) = buf.split_at(n);
                *buf = rest;
                Ok(head)
            };
            let wire = match key & 7 {
                0 => Wire::Varint(varint(&mut self.buf)?),
                1 => {
                    skip(&mut self.buf, 8)?;
                    Wire::Fixed
                }
                2 => {
                    let n = usize::try_from(varint(&mut self.buf)?)
                        .map_err(|_| DecodeError("a field runs past the end"))?;
                    Wire::Bytes(skip(&mut self.buf, n)?)
                }
                5 => {
                    skip(&mut self.buf, 4)?;
                    Wire::Fixed
                }
                _ => return Err(DecodeError("an unknown wire type")),
            };
            Ok((key >> 3, wire))
        })();
        if field.is_err() {
            self.buf = &[];
        }
        Some(field)
    }
}

fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf }
}

/// The length-delimited fields numbered `number` of a message.
fn messages(buf: &[u8], number: u64) -> impl Iterator<Item = Result<&[u8], DecodeError>> {
    fields(buf).filter_map(move |f| match f {
        Ok((n, Wire::Bytes(b))) if n == number => Some(Ok(b)),
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    })
}

/// The inputs and outputs of an ONNX model's main graph.
pub fn read(model: &[u8]) -> Result<Signature, DecodeError> {
    let mut signature = Signature::default();
    for graph in messages(model, 7) {
        let graph = graph?;
        for (number, ports) in [(11, &mut signature.inputs), (12, &mut signature.outputs)] {
            for value_info in messages(graph, number) {
                ports.push(port(value_info?)?);
            }
        }
    }
    Ok(signature)
}

/// ValueInfoProto: name = 1, type = 2 (TypeProto: tensor_type = 1 (shape = 2
/// (TensorShapeProto: dim = 1 (Dimension: dim_value = 1, dim_param = 2)))).
fn port(value_info: &[u8]) -> Result<Port, DecodeError> {
    let mut port = Port {
        name: String::new(),
        dims: Vec::new(),
    };
    for f in fields(value_info) {
        match f? {
            (1, Wire::Bytes(name)) => port.name = String::from_utf8_lossy(name).into_owned(),
            (2, Wire::Bytes(ty)) => {
                for tensor in messages(ty, 1) {
                    for shape in messages(tensor?, 2) {
                        for dim in messages(shape?, 1) {
                            port.dims.push(dim_value(dim?)?);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(port)
}

fn dim_value(dim: &[u8]) -> Result<Option<i64>, DecodeError> {
    let mut value = None;
    for f in fields(dim) {
        if let (1, Wire::Varint(v)) = f? {
            value = Some(v as i64);
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{Dim, ElemType, GraphBuilder};

    #[test]
    fn reads_back_what_the_builder_wrote() {
        let mut g = GraphBuilder::new();
        let x = g.input(
            "image",
            ElemType::F32,
            vec![
                Dim::Sym("N"),
                Dim::Fixed(3),
                Dim::Fixed(224),
                Dim::Fixed(200),
            ],
        );
        let y = g.relu(&x);
        g.output(&y, "out", ElemType::F32, vec![Dim::Sym("N"), Dim::Fixed(3)]);
        let s = read(&g.to_bytes("g", "test")).unwrap();
        assert_eq!(
            s.input("image").unwrap().dims,
            vec![None, Some(3), Some(224), Some(200)]
        );
        assert_eq!(s.output("out").unwrap().dims, vec![None, Some(3)]);
        assert!(s.output("image").is_none());
    }

    #[test]
    fn truncated_or_garbage_bytes_are_errors() {
        let mut g = GraphBuilder::new();
        g.input("image", ElemType::F32, vec![Dim::Fixed(1)]);
        let bytes = g.to_bytes("g", "test");
        for cut in 1..bytes.len() {
            // Never a panic; an error or a shorter signature.
            let _ = read(&bytes[..cut]);
        }
        assert!(read(&[0x3a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(read(&[0xff; 12]).is_err());
    }
}
