//! Reader for files written by `torch.save`: the zip format (torch ≥ 1.6) and the legacy
//! format that torchvision's older checkpoints still use (e.g. the 2019 COCO Faster R-CNN).
//!
//! Both hold a pickle whose tensors point at storages by key; the zip format keeps each storage
//! as an archive entry, the legacy format appends them after the pickle. The pickle machine
//! here understands the opcodes that `torch.save` of a state_dict emits (protocol 2, plus the
//! protocol 4 framing) and nothing that would run code: classes are only recognised by name.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use tch::{Kind, Tensor};

/// A tensor the pickle described, whose bytes are read afterwards.
#[derive(Clone, Debug)]
struct TensorRef {
    storage: String,
    kind: Kind,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Clone, Debug)]
enum Value {
    None,
    /// A bool, float or bytes value: never needed for a state dict, only kept in place.
    Scalar,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String),
    /// (storage key, element kind) from a persistent id.
    Storage(String, Kind),
    Tensor(TensorRef),
    /// Something this reader does not model (big ints, unknown objects).
    Opaque,
    /// The legacy format's magic number, a 10-byte int.
    LegacyMagic,
    Mark,
}

const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Containers nested deeper are refused: values are cloned and dropped recursively, and a
/// pickle nests one level per two bytes (200,000 nested lists overflowed the stack; reproducer
/// in fuzz/artifacts/checkpoint/). A training checkpoint with optimizer state nests about five
/// deep.
const MAX_DEPTH: usize = 32;

/// Bytes of values that the memo and DUP may copy: 16 MiB plus 64 per pickle byte (a state
/// dict copies a few hundred bytes per tensor). Copies are real here, not shared references,
/// so without a bound a value fetched twice into a tuple and memoized again doubles every 5
/// bytes (a "billion laughs": 40 doublings in 246 bytes ran for minutes; reproducer in
/// fuzz/artifacts/checkpoint/).
const COPY_BYTES_MIN: usize = 16 << 20;
const COPY_BYTES_PER_BYTE: usize = 64;

/// Named tensors from the bytes of a `torch.save` file.
pub fn load_torch_file(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    if bytes.starts_with(b"PK\x03\x04") {
        load_zip(bytes)
    } else if bytes.len() > 2 && bytes[0] == 0x80 {
        load_legacy(bytes)
    } else {
        Err("not a PyTorch checkpoint (neither zip nor legacy pickle format)".into())
    }
}

fn load_zip(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
    if names.iter().any(|n| n.ends_with("/constants.pkl")) {
        return Err(
            "this is a TorchScript archive; save `model.state_dict()` with torch.save instead"
                .into(),
        );
    }
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or("zip file without data.pkl: not a torch.save checkpoint")?
        .clone();
    let root = pkl.trim_end_matches("data.pkl").to_owned();
    let value = Machine::new(&read_entry(&mut zip, &pkl, bytes.len())?).run()?;
    let mut storages = HashMap::new();
    for t in collect_tensors(&value)? {
        if !storages.contains_key(&t.1.storage) {
            let data = read_entry(
                &mut zip,
                &format!("{root}data/{}", t.1.storage),
                bytes.len(),
            )?;
            storages.insert(t.1.storage.clone(), data);
        }
    }
    materialize(value, &storages)
}

/// `file_len` caps the buffer reserved up front: the size an entry declares is only a claim
/// (a 228-byte zip claiming 4 GB reserved that much before reading a byte; reproducer in
/// fuzz/artifacts/checkpoint/).
fn read_entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    file_len: usize,
) -> Result<Vec<u8>, String> {
    let mut entry = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    let declared = usize::try_from(entry.size()).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(declared.min(file_len));
    entry
        .read_to_end(&mut out)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(out)
}

/// Legacy layout: magic pickle, protocol pickle, sys-info pickle, the object pickle, the sorted
/// storage keys pickle, then each storage as an i64 element count and its raw bytes.
fn load_legacy(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let mut pos = 0;
    let mut next = |what: &str| -> Result<Value, String> {
        let mut m = Machine::new(&bytes[pos..]);
        let v = m.run().map_err(|e| format!("{what}: {e}"))?;
        pos += m.pos;
        Ok(v)
    };
    let magic = next("magic number")?;
    if !matches!(magic, Value::LegacyMagic) {
        return Err("not a PyTorch checkpoint (bad magic number)".into());
    }
    next("protocol version")?;
    next("system info")?;
    let value = next("tensors")?;
    let Value::List(keys) = next("storage keys")? else {
        return Err("storage key list missing".into());
    };
    let sizes = element_sizes(&value)?;
    let mut storages = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err("storage key is not a string".into());
        };
        let elem = *sizes
            .get(&key)
            .ok_or_else(|| format!("storage {key} is not used by any tensor"))?;
        let count = bytes
            .get(pos..pos + 8)
            .ok_or("file ends inside storage data")?;
        let count = i64::from_le_bytes(count.try_into().map_err(|_| "short count")?);
        // The count is the file's word: negative or past the end of the file is an error, not
        // an overflow (found by fuzzing: count * elem overflowed).
        let data = usize::try_from(count)
            .ok()
            .and_then(|count| count.checked_mul(elem))
            .and_then(|len| bytes.get(pos + 8..(pos + 8).checked_add(len)?))
            .ok_or("file ends inside storage data")?;
        let len = data.len();
        storages.insert(key, data.to_vec());
        pos += 8 + len;
    }
    materialize(value, &storages)
}

fn element_sizes(value: &Value) -> Result<HashMap<String, usize>, String> {
    Ok(collect_tensors(value)?
        .into_iter()
        .map(|(_, t)| (t.storage.clone(), t.kind.elt_size_in_bytes()))
        .collect())
}

/// The state dict inside the pickled object: the object itself, or the `model` /
/// `state_dict` entry of a training checkpoint.
fn state_dict_entries(value: &Value) -> Result<&[(Value, Value)], String> {
    let Value::Dict(items) = value else {
        return Err("checkpoint is not a dict of tensors".into());
    };
    for wrapper in ["model", "state_dict", "model_state_dict"] {
        let inner = items
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == wrapper));
        if let Some((_, v @ Value::Dict(_))) = inner {
            return state_dict_entries(v);
        }
    }
    Ok(items)
}

fn collect_tensors(value: &Value) -> Result<Vec<(String, &TensorRef)>, String> {
    let mut out = Vec::new();
    for (k, v) in state_dict_entries(value)? {
        if let (Value::Str(name), Value::Tensor(t)) = (k, v) {
            out.push((name.clone(), t));
        }
    }
    Ok(out)
}

fn materialize(
    value: Value,
    storages: &HashMap<String, Vec<u8>>,
) -> Result<Vec<(String, Tensor)>, String> {
    let mut out = Vec::new();
    for (name, t) in collect_tensors(&value)? {
        let data = storages
            .get(&t.storage)
            .ok_or_else(|| format!("{name}: storage {} missing", t.storage))?;
        let elems = (data.len() / t.kind.elt_size_in_bytes()) as i64;
        // A view may repeat storage elements (stride 0, as `expand` makes), and `contiguous`
        // below would allocate all of them: `torch.zeros(1).expand(2**33)` saved in 358 bytes
        // asked for 32 GiB (reproducers in fuzz/artifacts/checkpoint/). A state dict's
        // tensors never hold more elements than their storage.
        let numel = t
            .size
            .iter()
            .try_fold(1i64, |n, &d| if d < 0 { None } else { n.checked_mul(d) });
        if numel.is_none_or(|n| n > elems) {
            return Err(format!(
                "{name}: size {:?} does not fit its storage of {elems} elements",
                t.size
            ));
        }
        let flat =
            Tensor::f_from_data_size(data, &[elems], t.kind).map_err(|e| format!("{name}: {e}"))?;
        let view = flat
            .f_as_strided(t.size.as_slice(), t.stride.as_slice(), Some(t.offset))
            .map_err(|e| format!("{name}: {e}"))?;
        out.push((name, view.contiguous()));
    }
    if out.is_empty() {
        return Err("checkpoint holds no tensors".into());
    }
    Ok(out)
}

fn storage_kind(class: &str) -> Result<Kind, String> {
    Ok(match class.rsplit('.').next().unwrap_or(class) {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => return Err(format!("unsupported storage type {other}")),
    })
}

/// A pickle stack machine over one pickle, stopping at STOP.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// What copies may still take, see `COPY_BYTES_MIN`.
    copy_budget: usize,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            copy_budget: COPY_BYTES_MIN
                .saturating_add(data.len().saturating_mul(COPY_BYTES_PER_BYTE)),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        // Lengths come from the pickle (up to 2^64 - 1 for BINUNICODE8): pos + n must not
        // overflow (a panic with overflow checks on; reproducer in fuzz/artifacts/checkpoint/).
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.data.get(self.pos..end))
            .ok_or("pickle ends early")?;
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        self.take(N)?
            .try_into()
            .map_err(|_| "short read".to_string())
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated line")?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no mark")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn text(&mut self, n: usize) -> Result<Value, String> {
        Ok(Value::Str(
            String::from_utf8_lossy(self.take(n)?).into_owned(),
        ))
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            if op == b'.' {
                return self.pop();
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            0x80 => drop(self.u8()?),                      // PROTO
            0x95 => drop(self.take(8)?),                   // FRAME
            b'(' => self.stack.push(Value::Mark),          // MARK
            b'}' => self.stack.push(Value::Dict(vec![])),  // EMPTY_DICT
            b']' => self.stack.push(Value::List(vec![])),  // EMPTY_LIST
            b')' => self.stack.push(Value::Tuple(vec![])), // EMPTY_TUPLE
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Scalar),
            0x89 => self.stack.push(Value::Scalar),
            b'J' => {
                let v = i32::from_le_bytes(self.le()?);
                self.push_int(v as i64)
            }
            b'K' => {
                let v = self.u8()?;
                self.push_int(v as i64)
            }
            b'M' => {
                let v = u16::from_le_bytes(self.le()?);
                self.push_int(v as i64)
            }
            0x8a => self.long1()?,
            b'G' => {
                self.take(8)?;
                self.stack.push(Value::Scalar)
            }
            b'X' => self.str_op(|m| Ok(u32::from_le_bytes(m.le()?) as usize), true)?,
            0x8c => self.str_op(|m| Ok(m.u8()? as usize), true)?,
            0x8d => self.str_op(|m| Ok(u64::from_le_bytes(m.le()?) as usize), true)?,
            b'T' => self.str_op(|m| Ok(u32::from_le_bytes(m.le()?) as usize), true)?,
            b'U' => self.str_op(|m| Ok(m.u8()? as usize), true)?,
            b'B' => self.str_op(|m| Ok(u32::from_le_bytes(m.le()?) as usize), false)?,
            b'C' => self.str_op(|m| Ok(m.u8()? as usize), false)?,
            _ => return self.step_structure(op),
        }
        Ok(())
    }

    fn step_structure(&mut self, op: u8) -> Result<(), String> {
        match op {
            b't' => {
                let items = self.pop_mark()?;
                check_nesting(&items)?;
                self.stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let at = self
                    .stack
                    .len()
                    .checked_sub(n)
                    .ok_or("pickle stack underflow")?;
                let items = self.stack.split_off(at);
                check_nesting(&items)?;
                self.stack.push(Value::Tuple(items));
            }
            b'q' => {
                let k = self.u8()? as u32;
                self.memo_put(k)?
            }
            b'r' => {
                let k = u32::from_le_bytes(self.le()?);
                self.memo_put(k)?
            }
            0x94 => self.memo_put(self.memo.len() as u32)?,
            b'h' => {
                let k = self.u8()? as u32;
                self.memo_get(k)?
            }
            b'j' => {
                let k = u32::from_le_bytes(self.le()?);
                self.memo_get(k)?
            }
            b'0' => drop(self.pop()?),
            b'1' => drop(self.pop_mark()?),
            b'2' => {
                let top = self.stack.last().ok_or("empty stack")?;
                let copy = copy(top, &mut self.copy_budget)?;
                self.stack.push(copy);
            }
            b'c' => {
                let (module, name) = (self.line()?, self.line()?);
                self.stack.push(Value::Global(format!("{module}.{name}")));
            }
            0x93 => {
                let (name, module) = (self.pop()?, self.pop()?);
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err("bad STACK_GLOBAL".into());
                };
                self.stack.push(Value::Global(format!("{module}.{name}")));
            }
            b'Q' => {
                let pid = self.pop()?;
                self.stack.push(persistent_load(pid)?);
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.stack.push(reduce(callable, args)?);
            }
            b'b' => drop(self.pop()?), // BUILD: object state (e.g. _metadata) is not needed
            _ => return self.step_collections(op),
        }
        Ok(())
    }

    fn step_collections(&mut self, op: u8) -> Result<(), String> {
        match op {
            b's' => {
                let (v, k) = (self.pop()?, self.pop()?);
                self.dict_extend(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.dict_extend(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                self.list_extend(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.list_extend(items)?;
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
        }
        Ok(())
    }

    fn push_int(&mut self, v: i64) {
        self.stack.push(Value::Int(v));
    }

    fn long1(&mut self) -> Result<(), String> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        if n > 8 {
            let big = if b == LEGACY_MAGIC {
                Value::LegacyMagic
            } else {
                Value::Opaque
            };
            self.stack.push(big);
            return Ok(());
        }
        let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            [0xff; 8]
        } else {
            [0; 8]
        };
        buf[..n].copy_from_slice(b);
        self.push_int(i64::from_le_bytes(buf));
        Ok(())
    }

    fn str_op(
        &mut self,
        len: impl Fn(&mut Self) -> Result<usize, String>,
        text: bool,
    ) -> Result<(), String> {
        let n = len(self)?;
        let v = if text {
            self.text(n)?
        } else {
            self.take(n).map(|_| Value::Scalar)?
        };
        self.stack.push(v);
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        let top = self.stack.last().ok_or("empty stack")?;
        let top = copy(top, &mut self.copy_budget)?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), String> {
        let v = self.memo.get(&key).ok_or("bad memo reference")?;
        let v = copy(v, &mut self.copy_budget)?;
        self.stack.push(v);
        Ok(())
    }

    fn dict_extend(&mut self, items: Vec<Value>) -> Result<(), String> {
        check_nesting(&items)?;
        let Some(Value::Dict(d)) = self.stack.last_mut() else {
            return Err("SETITEMS on a non-dict".into());
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn list_extend(&mut self, items: Vec<Value>) -> Result<(), String> {
        check_nesting(&items)?;
        match self.stack.last_mut() {
            Some(Value::List(l)) => l.extend(items),
            Some(Value::Opaque) => {}
            _ => return Err("APPENDS on a non-list".into()),
        }
        Ok(())
    }
}

/// Bytes a clone of `v` takes; an error when `v` nests past `MAX_DEPTH` (counting from
/// `depth`) or the count passes `limit`, where the walk stops.
fn weight(v: &Value, depth: usize, limit: usize) -> Result<usize, String> {
    if depth > MAX_DEPTH {
        return Err(format!("pickle nests deeper than {MAX_DEPTH} levels"));
    }
    let mut total = std::mem::size_of::<Value>()
        + match v {
            Value::Str(s) | Value::Global(s) | Value::Storage(s, _) => s.len(),
            Value::Tensor(t) => t.storage.len() + 8 * (t.size.len() + t.stride.len()),
            _ => 0,
        };
    let over = || "pickle copies too much through its memo".to_string();
    let mut add = |item: &Value| -> Result<(), String> {
        total += weight(item, depth + 1, limit.checked_sub(total).ok_or_else(over)?)?;
        Ok(())
    };
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().try_for_each(&mut add)?,
        Value::Dict(items) => items.iter().try_for_each(|(k, v)| {
            add(k)?;
            add(v)
        })?,
        _ => {}
    }
    if total > limit {
        return Err(over());
    }
    Ok(total)
}

/// A clone of `v`, paid for from `budget`.
fn copy(v: &Value, budget: &mut usize) -> Result<Value, String> {
    *budget -= weight(v, 0, *budget)?;
    Ok(v.clone())
}

/// Refuses items that would nest too deep inside a new or extended container.
fn check_nesting(items: &[Value]) -> Result<(), String> {
    items
        .iter()
        .try_for_each(|v| weight(v, 1, usize::MAX).map(drop))
}

/// `('storage', storage_type, key, location, numel[, view_metadata])`.
fn persistent_load(pid: Value) -> Result<Value, String> {
    let Value::Tuple(items) = pid else {
        return Err("bad persistent id".into());
    };
    match (items.get(1), items.get(2)) {
        (Some(Value::Global(class)), Some(Value::Str(key))) => {
            Ok(Value::Storage(key.clone(), storage_kind(class)?))
        }
        _ => Err("persistent id is not a storage".into()),
    }
}

fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(name) = callable else {
        return Ok(Value::Opaque);
    };
    let Value::Tuple(args) = args else {
        return Ok(Value::Opaque);
    };
    match name.as_str() {
        "collections.OrderedDict" | "builtins.dict" => Ok(Value::Dict(vec![])),
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => rebuild_tensor(&args),
        "torch._utils._rebuild_parameter" => args
            .into_iter()
            .next()
            .ok_or_else(|| "empty parameter".into()),
        _ => Ok(Value::Opaque),
    }
}

fn rebuild_tensor(args: &[Value]) -> Result<Value, String> {
    let ints = |v: Option<&Value>| -> Result<Vec<i64>, String> {
        match v {
            Some(Value::Tuple(items)) => items
                .iter()
                .map(|x| {
                    if let Value::Int(i) = x {
                        Ok(*i)
                    } else {
                        Err("non-integer size".to_string())
                    }
                })
                .collect(),
            _ => Err("tensor size is not a tuple".into()),
        }
    };
    let (Some(Value::Storage(storage, kind)), Some(Value::Int(offset))) =
        (args.first(), args.get(1))
    else {
        return Err("tensor without storage".into());
    };
    Ok(Value::Tensor(TensorRef {
        storage: storage.clone(),
        kind: *kind,
        offset: *offset,
        size: ints(args.get(2))?,
        stride: ints(args.get(3))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(load_torch_file(b"hello").is_err());
        assert!(load_torch_file(&[0x80, 0x02, b'K']).is_err());
    }

    #[test]
    fn legacy_magic_is_a_big_int() {
        let mut pickle = vec![0x80, 0x02, 0x8a, 10];
        pickle.extend_from_slice(&LEGACY_MAGIC);
        pickle.push(b'.');
        assert!(matches!(
            Machine::new(&pickle).run(),
            Ok(Value::LegacyMagic)
        ));
    }
}
