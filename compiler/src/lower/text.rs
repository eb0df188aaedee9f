//! The lowered program's text form, and its parser: `parse(print(p)) == p`.
//!
//! ```text
//! program rank 1 {data = 1, tensor = 0}
//! regions {param = 33280, grad = 33280, optim = 66560, io = 2304, arena = 151552}
//! b3 = buffer param+0 : f32[vocab=64, embed=32] "w.0"
//! b21 = view b3 param+4096 : f32[embed=32, mlp=128] "w.2[1]"
//! b40 = buffer arena+512 : f32[batch=2, seq=16, embed=32]
//! b40 = embed(b3, b30)
//! b41 = dropout(b40) {p = 0.1, rng = 12}
//! b50, b51, b52 = attention_grads(b44, b45, b46, b49) {causal = true, dropout = 0.0, ..., which = [0, 1, 2]}
//! b4, b5 = bucket_all_reduce(b4, b5) {axis = data, op = sum} @comm
//! ```
//!
//! A buffer line declares a buffer (its region, absolute byte offset and
//! type); an instruction line names what it writes, the instruction, what
//! it reads, its attributes and, off the compute stream, `@stream`. The
//! attributes are the instruction's own fields, so every op of the IR
//! prints and parses by one rule.

use super::{BufId, Buffer, Instr, Kind, Program, Region, Stream};
use crate::ir::{DType, Dim, TensorType};
use serde_json::{Map, Value};
use std::fmt::Write;

pub fn print(p: &Program) -> String {
    let mut s = String::new();
    let coords: Vec<String> = p.coords.iter().map(|(a, c)| format!("{a} = {c}")).collect();
    let _ = writeln!(s, "program rank {} {{{}}}", p.rank, coords.join(", "));
    let regions: Vec<String> = Region::ALL.iter().zip(p.sizes).map(|(r, n)| format!("{} = {n}", r.name())).collect();
    let _ = writeln!(s, "regions {{{}}}", regions.join(", "));
    for (i, b) in p.buffers.iter().enumerate() {
        let _ = write!(s, "b{i} = ");
        match b.view_of {
            Some(v) => {
                let _ = write!(s, "view {v} ");
            }
            None => s.push_str("buffer "),
        }
        let _ = write!(s, "{}+{} : {}", b.region.name(), b.offset, b.ty);
        if !b.name.is_empty() {
            let _ = write!(s, " {}", Value::String(b.name.clone()));
        }
        s.push('\n');
    }
    for ins in &p.instrs {
        s += &instr_text(ins);
        s.push('\n');
    }
    s
}

fn list(bs: &[BufId]) -> String {
    bs.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
}

/// One instruction's line.
pub fn instr_text(ins: &Instr) -> String {
    let (name, attrs) = name_and_attrs(&ins.kind);
    let mut s = String::new();
    if !ins.outs.is_empty() {
        s += &format!("{} = ", list(&ins.outs));
    }
    s += &format!("{name}({})", list(&ins.ins));
    if !attrs.is_empty() {
        s += &format!(" {}", value_text(&Value::Object(attrs)));
    }
    if ins.stream == Stream::Comm {
        s += " @comm";
    }
    s
}

/// An instruction's printed name and attributes: an IR op by its own tag
/// and fields; a bucket collective by its collective; the rest by kind.
fn name_and_attrs(k: &Kind) -> (String, Map<String, Value>) {
    let Value::Object(mut o) = serde_json::to_value(k).expect("kinds serialize") else { unreachable!("a tagged enum") };
    let kind = take_tag(&mut o, "kind");
    match kind.as_str() {
        "op" => {
            let Some(Value::Object(mut op)) = o.remove("op") else { unreachable!("an op") };
            let name = take_tag(&mut op, "kind");
            for key in ["rng", "accumulate"] {
                if let Some(r) = o.remove(key).filter(|r| !r.is_null()) {
                    op.insert(key.into(), r);
                }
            }
            (name, op)
        }
        "attention_grads" => {
            let Some(Value::Object(mut op)) = o.remove("op") else { unreachable!("an op") };
            take_tag(&mut op, "kind");
            op.remove("which");
            op.insert("which".into(), o.remove("which").unwrap_or(Value::Null));
            if let Some(r) = o.remove("rng").filter(|r| !r.is_null()) {
                op.insert("rng".into(), r);
            }
            (kind, op)
        }
        "collective" => {
            let Some(Value::Object(mut c)) = o.remove("op") else { unreachable!("a collective") };
            let name = take_tag(&mut c, "collective");
            let mut attrs = Map::new();
            attrs.insert("axis".into(), o.remove("axis").unwrap_or(Value::Null));
            attrs.extend(c);
            (name, attrs)
        }
        _ => (kind, o),
    }
}

fn take_tag(o: &mut Map<String, Value>, key: &str) -> String {
    match o.remove(key) {
        Some(Value::String(s)) => s,
        _ => unreachable!("tagged enums carry their tag"),
    }
}

fn is_word(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && !matches!(s, "true" | "false" | "none")
}

/// An attribute value: numbers as JSON writes them (they read back exactly),
/// bare words for names, `[a, b]` lists and `{k = v}` records.
fn value_text(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if is_word(s) => s.clone(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(xs) => format!("[{}]", xs.iter().map(value_text).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => {
            format!("{{{}}}", o.iter().map(|(k, v)| format!("{k} = {}", value_text(v))).collect::<Vec<_>>().join(", "))
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Parse a program's text form.
pub fn parse(text: &str) -> Result<Program, ParseError> {
    let mut p = Program { rank: 0, coords: Vec::new(), sizes: [0; 5], buffers: Vec::new(), instrs: Vec::new() };
    let mut seen_header = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split("//").next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fail = |message: String| ParseError { line: i + 1, message };
        let mut c = Cursor { s: line, at: 0 };
        if let Some(rest) = line.strip_prefix("program rank ") {
            let mut c = Cursor { s: rest, at: 0 };
            p.rank = c.number().map_err(fail)?;
            // Coordinates in rank-numbering order (a record would sort them).
            c.expect("{").map_err(fail)?;
            while !c.eat("}") {
                let axis = c.word().map_err(fail)?;
                c.expect("=").map_err(fail)?;
                p.coords.push((axis, c.number().map_err(fail)?));
                if !c.eat(",") {
                    c.expect("}").map_err(fail)?;
                    break;
                }
            }
            seen_header = true;
            continue;
        }
        if !seen_header {
            return Err(fail("expected `program rank N {...}` first".into()));
        }
        if let Some(rest) = line.strip_prefix("regions ") {
            let mut c = Cursor { s: rest, at: 0 };
            for (k, v) in c.record().map_err(fail)? {
                let r = Region::from_name(&k).ok_or_else(|| fail(format!("unknown region `{k}`")))?;
                let at = Region::ALL.iter().position(|&x| x == r).expect("a region");
                p.sizes[at] = v.as_u64().ok_or_else(|| fail("a region size is a whole number".into()))?;
            }
            continue;
        }
        let outs = c.outs().map_err(fail)?;
        let word = c.word().map_err(fail)?;
        match word.as_str() {
            "buffer" | "view" => {
                let [b] = outs[..] else { return Err(fail("a buffer line declares one buffer".into())) };
                if b.index() != p.buffers.len() {
                    return Err(fail(format!("expected b{} next, found {b}", p.buffers.len())));
                }
                let view_of = if word == "view" { Some(c.buf().map_err(fail)?) } else { None };
                let buffer = c.buffer(view_of).map_err(fail)?;
                p.buffers.push(buffer);
            }
            name => {
                let ins = c.args().map_err(fail)?;
                let attrs = if c.peek() == Some('{') { c.record().map_err(fail)? } else { Map::new() };
                let stream = if c.eat("@comm") { Stream::Comm } else { Stream::Compute };
                c.end().map_err(fail)?;
                let kind = kind_of(name, attrs).map_err(fail)?;
                p.instrs.push(Instr { kind, ins, outs, stream });
            }
        }
    }
    Ok(p)
}

/// The inverse of [`name_and_attrs`].
fn kind_of(name: &str, mut attrs: Map<String, Value>) -> Result<Kind, String> {
    let tag = |o: &mut Map<String, Value>, key: &str, v: &str| {
        o.insert(key.to_string(), Value::String(v.to_string()));
    };
    let mut o = Map::new();
    match name {
        "bucket_all_reduce" | "bucket_all_gather" | "bucket_reduce_scatter" => {
            tag(&mut o, "kind", "collective");
            o.insert("axis".into(), attrs.remove("axis").unwrap_or(Value::Null));
            tag(&mut attrs, "collective", name);
            o.insert("op".into(), Value::Object(attrs));
        }
        "attention_grads" => {
            tag(&mut o, "kind", name);
            let which = attrs.remove("which").unwrap_or(Value::Null);
            o.insert("rng".into(), attrs.remove("rng").unwrap_or(Value::Null));
            tag(&mut attrs, "kind", "attention_grad");
            attrs.insert("which".into(), which.get(0).cloned().unwrap_or(Value::Null));
            o.insert("op".into(), Value::Object(attrs));
            o.insert("which".into(), which);
        }
        _ if KINDS.contains(&name) => {
            tag(&mut o, "kind", name);
            o.extend(attrs);
        }
        _ => {
            tag(&mut o, "kind", "op");
            o.insert("rng".into(), attrs.remove("rng").unwrap_or(Value::Null));
            if let Some(a) = attrs.remove("accumulate") {
                o.insert("accumulate".into(), a);
            }
            tag(&mut attrs, "kind", name);
            o.insert("op".into(), Value::Object(attrs));
        }
    }
    serde_json::from_value(Value::Object(o)).map_err(|e| format!("`{name}`: {e}"))
}

/// The instruction kinds printed under their own name.
const KINDS: [&str; 12] = [
    "skip_if_nonfinite",
    "accumulate",
    "scale",
    "zero",
    "copy",
    "flat_shard",
    "sum_squares",
    "add_scalars",
    "send",
    "recv",
    "record",
    "wait",
];

struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.at..]
    }
    fn skip(&mut self) {
        let r = self.rest();
        self.at += r.len() - r.trim_start().len();
    }
    fn peek(&mut self) -> Option<char> {
        self.skip();
        self.rest().chars().next()
    }
    fn eat(&mut self, t: &str) -> bool {
        self.skip();
        if self.rest().starts_with(t) {
            self.at += t.len();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, t: &str) -> Result<(), String> {
        if self.eat(t) { Ok(()) } else { Err(format!("expected `{t}` at `{}`", self.rest())) }
    }
    fn end(&mut self) -> Result<(), String> {
        self.skip();
        if self.rest().is_empty() { Ok(()) } else { Err(format!("unexpected `{}`", self.rest())) }
    }
    fn word(&mut self) -> Result<String, String> {
        self.skip();
        let r = self.rest();
        let n = r.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(r.len());
        if n == 0 {
            return Err(format!("expected a name at `{r}`"));
        }
        self.at += n;
        Ok(r[..n].to_string())
    }
    fn number(&mut self) -> Result<u64, String> {
        let w = self.word()?;
        w.parse().map_err(|_| format!("expected a whole number, found `{w}`"))
    }
    fn buf(&mut self) -> Result<BufId, String> {
        let w = self.word()?;
        w.strip_prefix('b')
            .and_then(|n| n.parse().ok())
            .map(BufId)
            .ok_or_else(|| format!("expected a buffer `bN`, found `{w}`"))
    }
    /// `b1, b2 =`, or nothing.
    fn outs(&mut self) -> Result<Vec<BufId>, String> {
        let save = self.at;
        let mut outs = Vec::new();
        loop {
            self.skip();
            if !self.rest().starts_with('b') || !self.rest()[1..].starts_with(|c: char| c.is_ascii_digit()) {
                self.at = save;
                return Ok(Vec::new());
            }
            outs.push(self.buf()?);
            if self.eat("=") {
                return Ok(outs);
            }
            if !self.eat(",") {
                self.at = save;
                return Ok(Vec::new());
            }
        }
    }
    fn args(&mut self) -> Result<Vec<BufId>, String> {
        self.expect("(")?;
        let mut out = Vec::new();
        if self.eat(")") {
            return Ok(out);
        }
        loop {
            out.push(self.buf()?);
            if self.eat(")") {
                return Ok(out);
            }
            self.expect(",")?;
        }
    }
    /// `region+offset : type ["name"]`.
    fn buffer(&mut self, view_of: Option<BufId>) -> Result<Buffer, String> {
        let r = self.word()?;
        let region = Region::from_name(&r).ok_or_else(|| format!("unknown region `{r}`"))?;
        self.expect("+")?;
        let offset = self.number()?;
        self.expect(":")?;
        let ty = self.ty()?;
        let name = if self.peek() == Some('"') {
            match self.value()? {
                Value::String(s) => s,
                _ => unreachable!("a quoted string"),
            }
        } else {
            String::new()
        };
        self.end()?;
        Ok(Buffer { ty, region, offset, view_of, name })
    }
    fn ty(&mut self) -> Result<TensorType, String> {
        let d = self.word()?;
        let dtype = DType::parse(&d).ok_or_else(|| format!("unknown dtype `{d}`"))?;
        self.expect("[")?;
        let mut dims = Vec::new();
        if !self.eat("]") {
            loop {
                let name = self.word()?;
                self.expect("=")?;
                dims.push(Dim::new(name, self.number()?));
                if self.eat("]") {
                    break;
                }
                self.expect(",")?;
            }
        }
        Ok(TensorType::new(dtype, dims))
    }
    fn record(&mut self) -> Result<Map<String, Value>, String> {
        self.expect("{")?;
        let mut o = Map::new();
        if self.eat("}") {
            return Ok(o);
        }
        loop {
            let k = self.word()?;
            self.expect("=")?;
            o.insert(k, self.value()?);
            if self.eat("}") {
                return Ok(o);
            }
            self.expect(",")?;
        }
    }
    fn value(&mut self) -> Result<Value, String> {
        match self.peek() {
            Some('{') => Ok(Value::Object(self.record()?)),
            Some('[') => {
                self.expect("[")?;
                let mut xs = Vec::new();
                if self.eat("]") {
                    return Ok(Value::Array(xs));
                }
                loop {
                    xs.push(self.value()?);
                    if self.eat("]") {
                        return Ok(Value::Array(xs));
                    }
                    self.expect(",")?;
                }
            }
            Some('"') => {
                // A JSON string: up to the first unescaped quote.
                let r = self.rest();
                let mut end = None;
                let mut escaped = false;
                for (i, ch) in r.char_indices().skip(1) {
                    match ch {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => {
                            end = Some(i);
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                let end = end.ok_or("an unterminated string")?;
                let v = serde_json::from_str(&r[..=end]).map_err(|e| e.to_string())?;
                self.at += end + 1;
                Ok(v)
            }
            Some(c) if c == '-' || c.is_ascii_digit() => {
                let r = self.rest();
                let n = r.find(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c))).unwrap_or(r.len());
                let v = serde_json::from_str(&r[..n]).map_err(|_| format!("expected a number, found `{}`", &r[..n]))?;
                self.at += n;
                Ok(v)
            }
            _ => {
                let w = self.word()?;
                Ok(match w.as_str() {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    "none" => Value::Null,
                    _ => Value::String(w),
                })
            }
        }
    }
}
