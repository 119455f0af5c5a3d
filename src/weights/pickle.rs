//! A small, safe pickle interpreter: just enough of Python's pickle protocols 2-5 to
//! read PyTorch checkpoints (`torch.save` of tensors, dicts and OrderedDicts).
//!
//! Nothing is executed: `GLOBAL`/`REDUCE` build inert [`Value::Call`] records that the
//! PyTorch layer above interprets for the few callables it knows.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered key/value pairs (dict and OrderedDict alike).
    Dict(Vec<(Value, Value)>),
    /// `module.name` reference produced by GLOBAL / STACK_GLOBAL.
    Global(String, String),
    /// `callable(*args)` produced by REDUCE / NEWOBJ, with BUILD state if any and the
    /// key/value pairs SETITEM(S) added (how an OrderedDict carries its entries).
    Call {
        func: Box<Value>,
        args: Vec<Value>,
        state: Option<Box<Value>>,
        items: Vec<(Value, Value)>,
    },
    /// A persistent id (BINPERSID): how torch refers to tensor storages.
    Persistent(Box<Value>),
    /// An integer wider than 64 bits (little-endian two's complement bytes).
    BigInt(Vec<u8>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("pickle data ends early (truncated file?)")]
    Truncated,
    #[error("unsupported pickle opcode 0x{0:02x} at byte {1}")]
    UnsupportedOpcode(u8, usize),
    #[error("malformed pickle at byte {0}: {1}")]
    Malformed(usize, &'static str),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

/// Parses one pickle starting at `data[0]`; returns the value and the number of bytes used.
pub fn load(data: &[u8]) -> Result<(Value, usize), PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let v = m.run()?;
    Ok((v, m.pos))
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).ok_or(PickleError::Truncated)?;
        if end > self.data.len() {
            return Err(PickleError::Truncated);
        }
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        if self.pos >= self.data.len() {
            return Err(PickleError::Truncated);
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack
            .pop()
            .ok_or(PickleError::Malformed(self.pos, "stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or(PickleError::Malformed(self.pos, "MARK missing"))?;
        if mark > self.stack.len() {
            return Err(PickleError::Malformed(self.pos, "MARK beyond stack"));
        }
        Ok(self.stack.split_off(mark))
    }
    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .ok_or(PickleError::Malformed(pos, "stack underflow"))
    }
    fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let b = self.take(n)?;
        Ok(Value::Str(String::from_utf8_lossy(b).into_owned()))
    }
    fn memo_get(&mut self, k: u64) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&k)
            .cloned()
            .ok_or(PickleError::Malformed(self.pos, "memo key missing"))?;
        self.stack.push(v);
        Ok(())
    }
    fn memo_put(&mut self, k: u64) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        self.memo.insert(k, v);
        Ok(())
    }
    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(PickleError::Malformed(self.pos, "odd SETITEMS"));
        }
        let pos = self.pos;
        let target = self.top()?;
        let dict = match target {
            Value::Dict(d) => d,
            // OrderedDict() is a REDUCE of the OrderedDict global: it behaves like a dict.
            Value::Call { items, .. } => items,
            _ => return Err(PickleError::Malformed(pos, "SETITEMS on non-dict")),
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict.push((k, v));
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                _ => match self.literal(op)? {
                    Some(v) => self.stack.push(v),
                    None => self.structure(op, at)?,
                },
            }
        }
    }

    /// The value of an opcode that pushes a constant, a number, a string or bytes, or an
    /// empty container; None for any other opcode.
    fn literal(&mut self, op: u8) -> Result<Option<Value>, PickleError> {
        let v = match op {
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'K' => Value::Int(self.u8()? as i64),
            b'M' => Value::Int(self.u16()? as i64),
            b'J' => Value::Int(self.u32()? as i32 as i64),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes
                let n = self.u8()? as usize;
                let b = self.take(n)?;
                if n > 8 {
                    return Ok(Some(Value::BigInt(b.to_vec())));
                }
                let mut v: i64 = 0;
                for (i, byte) in b.iter().enumerate() {
                    v |= (*byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                Value::Int(v)
            }
            b'G' => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Value::Float(f64::from_be_bytes(a))
            }
            b'X' | b'T' => {
                let n = self.u32()? as usize;
                self.string(n)?
            }
            0x8c | b'U' => {
                let n = self.u8()? as usize;
                self.string(n)?
            }
            0x8d => {
                let n = self.u64()? as usize;
                self.string(n)?
            }
            b'C' => {
                let n = self.u8()? as usize;
                let b = self.take(n)?.to_vec();
                Value::Bytes(b)
            }
            b'B' => {
                let n = self.u32()? as usize;
                let b = self.take(n)?.to_vec();
                Value::Bytes(b)
            }
            b'}' => Value::Dict(Vec::new()),
            b']' => Value::List(Vec::new()),
            b')' => Value::Tuple(Vec::new()),
            _ => return Ok(None),
        };
        Ok(Some(v))
    }

    /// Opcodes that build on the stack: tuples, the memo, globals, calls, containers.
    fn structure(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        match op {
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items))
            }
            0x85 => {
                let a = self.pop()?;
                self.stack.push(Value::Tuple(vec![a]))
            }
            0x86 => {
                let b = self.pop()?;
                let a = self.pop()?;
                self.stack.push(Value::Tuple(vec![a, b]))
            }
            0x87 => {
                let c = self.pop()?;
                let b = self.pop()?;
                let a = self.pop()?;
                self.stack.push(Value::Tuple(vec![a, b, c]))
            }
            b'q' => {
                let k = self.u8()? as u64;
                self.memo_put(k)?
            }
            b'r' => {
                let k = self.u32()? as u64;
                self.memo_put(k)?
            }
            0x94 => {
                let k = self.memo.len() as u64;
                self.memo_put(k)?
            }
            b'h' => {
                let k = self.u8()? as u64;
                self.memo_get(k)?
            }
            b'j' => {
                let k = self.u32()? as u64;
                self.memo_get(k)?
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack.push(Value::Global(module, name))
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                    _ => return Err(PickleError::Malformed(at, "STACK_GLOBAL needs strings")),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let func = self.pop()?;
                let args = match args {
                    Value::Tuple(a) => a,
                    _ => return Err(PickleError::Malformed(at, "REDUCE args not a tuple")),
                };
                self.stack.push(Value::Call {
                    func: Box::new(func),
                    args,
                    state: None,
                    items: Vec::new(),
                })
            }
            b'b' => {
                let st = self.pop()?;
                match self.top()? {
                    Value::Call { state, .. } => *state = Some(Box::new(st)),
                    _ => { /* BUILD on plain containers carries no data torch needs */ }
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                self.stack.push(Value::Persistent(Box::new(pid)))
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?
            }
            b'a' => {
                let v = self.pop()?;
                match self.top()? {
                    Value::List(l) => l.push(v),
                    _ => return Err(PickleError::Malformed(at, "APPEND on non-list")),
                }
            }
            b'e' => {
                let items = self.pop_mark()?;
                match self.top()? {
                    Value::List(l) => l.extend(items),
                    _ => return Err(PickleError::Malformed(at, "APPENDS on non-list")),
                }
            }
            b'0' => {
                self.pop()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v)
            }
            _ => return Err(PickleError::UnsupportedOpcode(op, at)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protocol2_dict_with_long_and_tuple() {
        // pickle.dumps({'a': (1, -2, 70000), 'b': 2**40}, protocol=2)
        let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01J\xfe\xff\xff\xffJp\x11\x01\x00\x87q\x02X\x01\x00\x00\x00bq\x03\x8a\x06\x00\x00\x00\x00\x00\x01u.";
        let (v, used) = load(data).unwrap();
        assert_eq!(used, data.len());
        assert_eq!(
            v,
            Value::Dict(vec![
                (
                    Value::Str("a".into()),
                    Value::Tuple(vec![Value::Int(1), Value::Int(-2), Value::Int(70000)])
                ),
                (Value::Str("b".into()), Value::Int(1 << 40)),
            ])
        );
    }

    #[test]
    fn truncated_input_is_an_error() {
        let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00";
        assert!(matches!(load(data), Err(PickleError::Truncated)));
    }
}
