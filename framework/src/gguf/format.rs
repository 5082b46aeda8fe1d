//! The GGUF v3 container (ggml docs/gguf.md): header, typed metadata, tensor infos, then the
//! tensor data, each tensor aligned to `general.alignment` and laid out in info order (ggml's
//! reader insists on that order). Little-endian throughout.
//!
//! Writing streams one tensor at a time, so a model is never held twice in memory; reading
//! parses the header of a memory-mapped file and checks every size and offset against the file's
//! length before any tensor is touched.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::quant::GgmlType;
use crate::io::atomic_write;

const MAGIC: u32 = 0x4655_4747; // "GGUF"
const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u32 = 32;

/// The metadata of a file: keys and values, in file order.
pub type Metadata = Vec<(String, Value)>;

/// A metadata value. Arrays carry their element type so that empty arrays can be written.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
        .into_iter()
        .find(|t| *t as u32 == id)
    }
}

impl Value {
    pub fn kind(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    pub fn as_u32(&self) -> Option<u32> {
        match self {
            Value::U32(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        match self {
            Value::U8(v) => out.write_all(&v.to_le_bytes()),
            Value::I8(v) => out.write_all(&v.to_le_bytes()),
            Value::U16(v) => out.write_all(&v.to_le_bytes()),
            Value::I16(v) => out.write_all(&v.to_le_bytes()),
            Value::U32(v) => out.write_all(&v.to_le_bytes()),
            Value::I32(v) => out.write_all(&v.to_le_bytes()),
            Value::F32(v) => out.write_all(&v.to_le_bytes()),
            Value::Bool(v) => out.write_all(&[u8::from(*v)]),
            Value::String(s) => write_string(out, s),
            Value::Array(kind, items) => {
                out.write_all(&(*kind as u32).to_le_bytes())?;
                out.write_all(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|item| item.write(out))
            }
            Value::U64(v) => out.write_all(&v.to_le_bytes()),
            Value::I64(v) => out.write_all(&v.to_le_bytes()),
            Value::F64(v) => out.write_all(&v.to_le_bytes()),
        }
    }
}

fn write_string(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

/// A tensor's name, shape in ggml order (`dims[0]` is the contiguous axis: a row-major
/// `[rows, cols]` matrix is `[cols, rows]`) and storage type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of this tensor's data; an error when rows do not fill whole blocks.
    pub fn bytes(&self) -> Result<usize> {
        let row = self.dims.first().copied().unwrap_or(1) as usize;
        if !row.is_multiple_of(self.ty.block_size()) {
            return Err(Error::Data(format!(
                "tensor {}: rows of {row} values cannot be stored as {} (blocks of {})",
                self.name,
                self.ty.name(),
                self.ty.block_size()
            )));
        }
        self.ty.bytes_for(self.elements() as usize)
    }
}

/// `general.alignment`, or the default when absent; the offending value when it is not a
/// power-of-two u32.
fn alignment(metadata: &[(String, Value)]) -> std::result::Result<u32, String> {
    match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, Value::U32(a))) if a.is_power_of_two() => Ok(*a),
        Some((_, other)) => Err(format!("{other:?}")),
    }
}

fn padding(offset: u64, alignment: u64) -> u64 {
    offset.next_multiple_of(alignment) - offset
}

/// Writes a GGUF v3 file at `path` (temporary file + rename). `tensor_data(i)` produces the bytes
/// of `tensors[i]` when its turn comes, so only one tensor is in memory at a time.
/// `general.alignment`, when present in `metadata`, must be a power-of-two u32.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorInfo],
    mut tensor_data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let alignment = alignment(metadata)
        .map_err(|got| Error::config("general.alignment", got, "a power of two stored as u32"))?;
    let sizes = tensors
        .iter()
        .map(|t| {
            if t.name.len() > 63 || t.dims.is_empty() || t.dims.len() > 4 {
                return Err(Error::Data(format!(
                    "tensor {:?}: GGUF allows names of at most 63 bytes and 1 to 4 dimensions",
                    t.name
                )));
            }
            t.bytes()
        })
        .collect::<Result<Vec<_>>>()?;

    let mut failure = None;
    let result = atomic_write(path, |file| {
        let mut out = Counting {
            inner: BufWriter::with_capacity(1 << 20, file),
            written: 0,
        };
        let mut header = Vec::new();
        header.extend(MAGIC.to_le_bytes());
        header.extend(VERSION.to_le_bytes());
        header.extend((tensors.len() as u64).to_le_bytes());
        header.extend((metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            write_string(&mut header, key)?;
            header.extend((value.kind() as u32).to_le_bytes());
            value.write(&mut header)?;
        }
        let mut offset = 0u64;
        for (info, size) in tensors.iter().zip(&sizes) {
            write_string(&mut header, &info.name)?;
            header.extend((info.dims.len() as u32).to_le_bytes());
            info.dims
                .iter()
                .for_each(|d| header.extend(d.to_le_bytes()));
            header.extend(info.ty.id().to_le_bytes());
            header.extend(offset.to_le_bytes());
            offset += *size as u64;
            offset += padding(offset, u64::from(alignment));
        }
        out.write_all(&header)?;
        let zeros = vec![0u8; alignment as usize];
        let pad = padding(out.written, u64::from(alignment)) as usize;
        out.write_all(&zeros[..pad])?;
        for (i, size) in sizes.iter().enumerate() {
            let data = match tensor_data(i) {
                Ok(data) if data.len() == *size => data,
                Ok(data) => {
                    failure = Some(Error::Data(format!(
                        "tensor {}: {} bytes of data, its type and shape need {size}",
                        tensors[i].name,
                        data.len()
                    )));
                    return Err(std::io::Error::other("tensor data of the wrong size"));
                }
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("tensor data failed"));
                }
            };
            out.write_all(&data)?;
            let pad = padding(out.written, u64::from(alignment)) as usize;
            out.write_all(&zeros[..pad])?;
        }
        out.flush()
    });
    match failure {
        Some(e) => Err(e),
        None => result,
    }
}

/// Counts the bytes written, for the alignment padding.
struct Counting<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The parsed header of a GGUF file: metadata and tensor infos with absolute data offsets.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<(TensorInfo, u64)>,
    pub alignment: u32,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The bytes of tensor `i` within `file` (the whole file's bytes).
    pub fn tensor_bytes<'f>(&self, file: &'f [u8], i: usize) -> Result<&'f [u8]> {
        let (info, start) = &self.tensors[i];
        let end = *start as usize + info.bytes()?;
        Ok(&file[*start as usize..end])
    }
}

/// Reads the header of a GGUF file held in `bytes`, checking that every tensor lies inside it.
/// `origin` names the file in errors.
pub fn read_header(bytes: &[u8], origin: &Path) -> Result<GgufHeader> {
    let mut r = Reader {
        bytes,
        at: 0,
        origin,
    };
    let magic = r.u32()?;
    if magic != MAGIC {
        return Err(r.error(format!(
            "not a GGUF file (magic {magic:#010x}, expected {MAGIC:#010x} \"GGUF\")"
        )));
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(r.error(format!("GGUF version {version}; only version 3 is read")));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    // Each entry takes at least 8 bytes, so counts beyond the file's size are corrupt.
    for (what, n) in [("tensors", n_tensors), ("metadata entries", n_kv)] {
        if n > bytes.len() as u64 / 8 {
            return Err(r.error(format!("claims {n} {what}, more than the file can hold")));
        }
    }
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let key = r.string()?;
        let kind = r.u32()?;
        let value = r.value(kind, 0)?;
        metadata.push((key, value));
    }
    let alignment = alignment(&metadata).map_err(|got| {
        r.error(format!(
            "general.alignment is {got}; expected a power of two stored as u32"
        ))
    })?;
    let mut infos = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if !(1..=4).contains(&n_dims) {
            return Err(r.error(format!(
                "tensor {name}: {n_dims} dimensions (1 to 4 allowed)"
            )));
        }
        let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
        let type_id = r.u32()?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| {
            r.error(format!(
                "tensor {name}: ggml type {type_id} is not one this reader knows"
            ))
        })?;
        let offset = r.u64()?;
        infos.push((TensorInfo { name, dims, ty }, offset));
    }
    let data_start = r.at as u64 + padding(r.at as u64, u64::from(alignment));
    let mut tensors = Vec::with_capacity(infos.len());
    for (info, offset) in infos {
        let elements = info
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= bytes.len() as u64 * 2)
            .ok_or_else(|| {
                r.error(format!(
                    "tensor {}: shape {:?} is too large",
                    info.name, info.dims
                ))
            })?;
        let size = info.bytes().map_err(|e| r.error(e.to_string()))? as u64;
        let start = data_start + offset;
        if offset % u64::from(alignment) != 0 || start + size > bytes.len() as u64 {
            return Err(r.error(format!(
                "tensor {} ({} values of {}) at data offset {offset} does not fit in the file \
                 ({} bytes) or is not aligned to {alignment}",
                info.name,
                elements,
                info.ty.name(),
                bytes.len()
            )));
        }
        tensors.push((info, start));
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    origin: &'a Path,
}

impl Reader<'_> {
    fn error(&self, message: String) -> Error {
        Error::file(self.origin, format!("{message} (at byte {})", self.at))
    }

    fn take(&mut self, n: u64) -> Result<&[u8]> {
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(self.error(format!("truncated: {n} more bytes expected")));
        }
        let slice = &self.bytes[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let raw = self.take(len)?.to_vec();
        String::from_utf8(raw).map_err(|_| self.error("a string is not valid UTF-8".into()))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value> {
        let kind = ValueType::from_id(kind)
            .ok_or_else(|| self.error(format!("unknown metadata value type {kind}")))?;
        Ok(match kind {
            ValueType::U8 => Value::U8(self.array::<1>()?[0]),
            ValueType::I8 => Value::I8(self.array::<1>()?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.error(format!("a bool holds {b}, not 0 or 1"))),
            },
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => {
                if depth > 4 {
                    return Err(self.error("arrays nested deeper than 4".into()));
                }
                let elem = self.u32()?;
                let elem_kind = ValueType::from_id(elem)
                    .ok_or_else(|| self.error(format!("unknown array element type {elem}")))?;
                let count = self.u64()?;
                if count > (self.bytes.len() - self.at) as u64 {
                    return Err(self.error(format!("truncated: an array of {count} elements")));
                }
                let items = (0..count)
                    .map(|_| self.value(elem, depth + 1))
                    .collect::<Result<Vec<_>>>()?;
                Value::Array(elem_kind, items)
            }
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
        })
    }
}
