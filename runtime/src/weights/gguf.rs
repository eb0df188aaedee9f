//! GGUF, llama.cpp's weights format (version 2 and 3): a header of typed
//! key-value metadata and tensor descriptors, then the tensors' data, each
//! at an aligned offset. Tensors of type F32, F16, BF16, Q8_0, Q4_0 and
//! Q4_1 are dequantized to f32 on load, block by block, as ggml's reference
//! `dequantize_row_*` does; any other type is listed but not loaded.

use super::{Format, Place, TensorInfo, WeightFile, WeightsError};
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml's tensor types: (id, name, elements per block, bytes per block).
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (30, "BF16", 1, 2),
];

/// Reads the header's little-endian fields, naming what it was reading when the file ends.
struct Header<R> {
    r: R,
}

impl<R: Read> Header<R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| format!("the file ends inside the header, reading {what}"))?;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u64(what)?;
        if n > 1 << 26 {
            return Err(format!("a string of {n} bytes, reading {what}: the header is damaged"));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|_| format!("the file ends inside the header, reading {what}"))?;
        String::from_utf8(b).map_err(|_| format!("{what} is not UTF-8"))
    }
    fn value(&mut self, ty: u32, what: &str) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U64(self.bytes::<1>(what)?[0] as u64),
            1 => Value::I64(self.bytes::<1>(what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.bytes(what)?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.bytes(what)?) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(i32::from_le_bytes(self.bytes(what)?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.bytes(what)?) as f64),
            7 => Value::Bool(self.bytes::<1>(what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                let item = self.u32(what)?;
                let n = self.u64(what)?;
                if n > 1 << 26 {
                    return Err(format!("an array of {n} items, reading {what}: the header is damaged"));
                }
                Value::Array((0..n).map(|_| self.value(item, what)).collect::<Result<_, _>>()?)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
            other => return Err(format!("{what} has value type {other}, which GGUF does not define")),
        })
    }
}

/// Open a GGUF file: its metadata and tensor descriptors.
pub(super) fn open(path: &Path) -> Result<WeightFile, WeightsError> {
    let fail = |m: String| WeightsError::new(path, m);
    let f = std::fs::File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
    let size = f.metadata().map_err(|e| fail(e.to_string()))?.len();
    let mut h = Header { r: BufReader::new(f) };
    let magic = h.bytes::<4>("the magic number").map_err(fail)?;
    if &magic != b"GGUF" {
        return Err(fail("not a GGUF file (it does not start with `GGUF`)".into()));
    }
    let version = h.u32("the version").map_err(fail)?;
    if !(2..=3).contains(&version) {
        return Err(fail(format!("GGUF version {version}; Tessera reads versions 2 and 3")));
    }
    let tensors = h.u64("the tensor count").map_err(fail)?;
    let kvs = h.u64("the metadata count").map_err(fail)?;
    if tensors > 1 << 20 || kvs > 1 << 20 {
        return Err(fail(format!("{tensors} tensors and {kvs} metadata entries: the header is damaged")));
    }
    let mut w = WeightFile::empty(path, Format::Gguf);
    w.files.push(path.to_path_buf());
    for _ in 0..kvs {
        let key = h.string("a metadata key").map_err(fail)?;
        let ty = h.u32(&key).map_err(fail)?;
        let v = h.value(ty, &key).map_err(fail)?;
        w.metadata.insert(key, v);
    }
    let mut infos = Vec::new();
    for _ in 0..tensors {
        let name = h.string("a tensor name").map_err(fail)?;
        let dims = h.u32(&name).map_err(fail)?;
        if dims > 8 {
            return Err(fail(format!("tensor `{name}` has {dims} dims: the header is damaged")));
        }
        let mut shape: Vec<u64> = (0..dims).map(|_| h.u64(&name)).collect::<Result<_, _>>().map_err(fail)?;
        shape.reverse();
        let ty = h.u32(&name).map_err(fail)?;
        let offset = h.u64(&name).map_err(fail)?;
        infos.push((name, shape, ty, offset));
    }
    let align = w.metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32).max(1);
    let header_end = h.r.stream_position().map_err(|e| fail(e.to_string()))?;
    let data = header_end.div_ceil(align) * align;
    for (name, shape, ty, offset) in infos {
        let numel: u64 = shape.iter().product();
        let (dtype, len) = match TYPES.iter().find(|t| t.0 == ty) {
            Some(&(_, n, block, bytes)) => {
                if !numel.is_multiple_of(block) {
                    return Err(fail(format!("tensor `{name}` of {numel} {n} values is not whole blocks of {block}")));
                }
                (n.to_string(), numel / block * bytes)
            }
            None => (format!("type {ty}"), 0),
        };
        let at = data + offset;
        if at + len > size {
            return Err(fail(format!(
                "tensor `{name}` ({dtype}, {shape:?}) needs bytes {at}..{} but the file has {size}: it is cut short",
                at + len
            )));
        }
        w.add(TensorInfo { name, shape, dtype }, Place { file: 0, offset: at, len })?;
    }
    Ok(w)
}

/// `n` values of ggml type `dtype` from `bytes`, as f32.
pub(super) fn dequantize(dtype: &str, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let blocks = |size: usize| -> Result<std::slice::ChunksExact<'_, u8>, String> {
        if bytes.len() != n / 32 * size || !n.is_multiple_of(32) {
            return Err(format!("{} bytes for {n} {dtype} values", bytes.len()));
        }
        Ok(bytes.chunks_exact(size))
    };
    let mut out = Vec::with_capacity(n);
    match dtype {
        "F32" | "F16" | "BF16" => return super::floats(dtype, bytes, n),
        "Q8_0" => {
            for b in blocks(34)? {
                let d = f16(&b[..2]);
                out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        "Q4_0" => {
            for b in blocks(18)? {
                let d = f16(&b[..2]);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| ((q & 0xf) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        "Q4_1" => {
            for b in blocks(20)? {
                let (d, m) = (f16(&b[..2]), f16(&b[2..4]));
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| (q & 0xf) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        other => {
            return Err(format!(
                "its type {other} is not one Tessera dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1): convert the \
                 file with llama.cpp's `llama-quantize` to one of those"
            ));
        }
    }
    Ok(out)
}
