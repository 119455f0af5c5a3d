//! A small, safe pickle interpreter: just enough of Python's pickle protocols 2-5 to
//! read PyTorch checkpoints (`torch.save` of tensors, dicts and OrderedDicts).
//!
//! Nothing is executed: `GLOBAL`/`REDUCE` build inert [`Value::Call`] records that the
//! PyTorch layer above interprets for the few callables it knows.
//!
//! Hostile files: every object lives in one arena ([`Pickle`]) and containers hold
//! [`Id`]s into it, so the memo, `DUP` and a memo get share an object as Python does
//! instead of copying it (a "memo bomb" costs one index per reference); nothing here
//! recurses, so no nesting depth can overflow the stack; the number of objects is capped
//! at [`MAX_OBJECTS`]. Every object costs at least one byte of input, so memory stays
//! proportional to the file.

use std::collections::HashMap;

/// The most objects one pickle may create. A checkpoint of the largest backbone cras
/// knows holds a few thousand; the cap only stops crafted files.
pub const MAX_OBJECTS: usize = 1 << 22;

/// An object in a [`Pickle`]'s arena. Only the interpreter makes them, so every `Id` a
/// `Pickle` hands out is valid for that pickle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id(u32);

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// Insertion-ordered key/value pairs (dict and OrderedDict alike).
    Dict(Vec<(Id, Id)>),
    /// `module.name` reference produced by GLOBAL / STACK_GLOBAL.
    Global(String, String),
    /// `callable(*args)` produced by REDUCE / NEWOBJ.
    Call(Box<Call>),
    /// A persistent id (BINPERSID): how torch refers to tensor storages.
    Persistent(Id),
    /// An integer wider than 64 bits (little-endian two's complement bytes).
    BigInt(Vec<u8>),
}

/// A REDUCE / NEWOBJ record, with the BUILD state if any and the key/value pairs
/// SETITEM(S) added (how an OrderedDict carries its entries).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub func: Id,
    /// The argument tuple.
    pub args: Id,
    pub state: Option<Id>,
    pub items: Vec<(Id, Id)>,
}

/// One parsed pickle: its objects and the one it returned.
#[derive(Debug)]
pub struct Pickle {
    objects: Vec<Value>,
    root: Id,
}

impl Pickle {
    pub fn root(&self) -> Id {
        self.root
    }
    pub fn get(&self, id: Id) -> &Value {
        // Ids are only made by `Machine::alloc`, as indices into this very arena.
        &self.objects[id.0 as usize]
    }
    /// Every object the pickle made, in creation order.
    pub fn objects(&self) -> &[Value] {
        &self.objects
    }
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    pub fn tuple(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Value::Tuple(items) => Some(items),
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
    #[error("pickle creates more than {MAX_OBJECTS} objects (a crafted file?)")]
    TooManyObjects,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    objects: Vec<Value>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

/// Parses one pickle starting at `data[0]`; returns it and the number of bytes used.
pub fn load(data: &[u8]) -> Result<(Pickle, usize), PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        objects: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = m.run()?;
    let used = m.pos;
    Ok((
        Pickle {
            objects: m.objects,
            root,
        },
        used,
    ))
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).ok_or(PickleError::Truncated)?;
        let s = self.data.get(self.pos..end).ok_or(PickleError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A 64-bit length prefix as a byte count (checked against the data by `take`).
    fn len(n: u64) -> Result<usize, PickleError> {
        usize::try_from(n).map_err(|_| PickleError::Truncated)
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated)?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn alloc(&mut self, v: Value) -> Result<Id, PickleError> {
        if self.objects.len() >= MAX_OBJECTS {
            return Err(PickleError::TooManyObjects);
        }
        let id = Id(self.objects.len() as u32);
        self.objects.push(v);
        Ok(id)
    }
    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        let id = self.alloc(v)?;
        self.stack.push(id);
        Ok(())
    }
    fn pop(&mut self) -> Result<Id, PickleError> {
        self.stack
            .pop()
            .ok_or(PickleError::Malformed(self.pos, "stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or(PickleError::Malformed(self.pos, "MARK missing"))?;
        if mark > self.stack.len() {
            return Err(PickleError::Malformed(self.pos, "MARK beyond stack"));
        }
        Ok(self.stack.split_off(mark))
    }
    fn top(&self) -> Result<Id, PickleError> {
        self.stack
            .last()
            .copied()
            .ok_or(PickleError::Malformed(self.pos, "stack underflow"))
    }
    /// The object on top of the stack, to be changed in place (seen through the memo too).
    fn top_mut(&mut self) -> Result<&mut Value, PickleError> {
        let id = self.top()?;
        Ok(&mut self.objects[id.0 as usize])
    }
    fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let b = self.take(n)?;
        Ok(Value::Str(String::from_utf8_lossy(b).into_owned()))
    }
    fn bytes(&mut self, n: usize) -> Result<Value, PickleError> {
        Ok(Value::Bytes(self.take(n)?.to_vec()))
    }
    fn memo_get(&mut self, k: u64) -> Result<(), PickleError> {
        let id = *self
            .memo
            .get(&k)
            .ok_or(PickleError::Malformed(self.pos, "memo key missing"))?;
        self.stack.push(id);
        Ok(())
    }
    fn memo_put(&mut self, k: u64) -> Result<(), PickleError> {
        let id = self.top()?;
        self.memo.insert(k, id);
        Ok(())
    }
    fn set_items(&mut self, items: Vec<Id>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(PickleError::Malformed(self.pos, "odd SETITEMS"));
        }
        let pos = self.pos;
        let dict = match self.top_mut()? {
            Value::Dict(d) => d,
            // OrderedDict() is a REDUCE of the OrderedDict global: it behaves like a dict.
            Value::Call(call) => &mut call.items,
            _ => return Err(PickleError::Malformed(pos, "SETITEMS on non-dict")),
        };
        dict.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
        Ok(())
    }
    fn tuple(&mut self, n: usize) -> Result<(), PickleError> {
        if self.stack.len() < n {
            return Err(PickleError::Malformed(self.pos, "stack underflow"));
        }
        let items = self.stack.split_off(self.stack.len() - n);
        self.push(Value::Tuple(items))
    }

    fn run(&mut self) -> Result<Id, PickleError> {
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
                    Some(v) => self.push(v)?,
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
            b'G' => Value::Float(f64::from_be_bytes(self.array()?)),
            b'X' | b'T' => {
                let n = self.u32()? as u64;
                let n = Self::len(n)?;
                self.string(n)?
            }
            0x8c | b'U' => {
                let n = self.u8()? as usize;
                self.string(n)?
            }
            0x8d => {
                let n = self.u64()?;
                let n = Self::len(n)?;
                self.string(n)?
            }
            b'C' => {
                let n = self.u8()? as usize;
                self.bytes(n)?
            }
            b'B' => {
                let n = self.u32()? as u64;
                let n = Self::len(n)?;
                self.bytes(n)?
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
                self.push(Value::Tuple(items))?
            }
            0x85 => self.tuple(1)?,
            0x86 => self.tuple(2)?,
            0x87 => self.tuple(3)?,
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
                self.push(Value::Global(module, name))?
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let global = match (
                    &self.objects[module.0 as usize],
                    &self.objects[name.0 as usize],
                ) {
                    (Value::Str(m), Value::Str(n)) => Value::Global(m.clone(), n.clone()),
                    _ => return Err(PickleError::Malformed(at, "STACK_GLOBAL needs strings")),
                };
                self.push(global)?
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let func = self.pop()?;
                if !matches!(self.objects[args.0 as usize], Value::Tuple(_)) {
                    return Err(PickleError::Malformed(at, "REDUCE args not a tuple"));
                }
                self.push(Value::Call(Box::new(Call {
                    func,
                    args,
                    state: None,
                    items: Vec::new(),
                })))?
            }
            b'b' => {
                let st = self.pop()?;
                if let Value::Call(call) = self.top_mut()? {
                    call.state = Some(st);
                }
                // BUILD on plain containers carries no data torch needs.
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push(Value::Persistent(pid))?
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
                match self.top_mut()? {
                    Value::List(l) => l.push(v),
                    _ => return Err(PickleError::Malformed(at, "APPEND on non-list")),
                }
            }
            b'e' => {
                let items = self.pop_mark()?;
                match self.top_mut()? {
                    Value::List(l) => l.extend(items),
                    _ => return Err(PickleError::Malformed(at, "APPENDS on non-list")),
                }
            }
            b'0' => {
                self.pop()?;
            }
            b'2' => {
                let id = self.top()?;
                self.stack.push(id)
            }
            _ => return Err(PickleError::UnsupportedOpcode(op, at)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
