//! The attribute syntax both text forms share (the graph IR and the lowered
//! program): an op prints as its name and its own fields, and parses back
//! by the same rule, so every op of the IR round-trips without code of its own.
//!
//! Values: numbers as JSON writes them (they read back exactly), bare words
//! for names, `[a, b]` lists (`[a..b]` for a run of three or more
//! consecutive whole numbers), `{k = v}` records, `none` for an absent
//! option (omitted from a record). An op's name folds in the field it
//! implies: `exp` is `unary {op = exp}`, `add` is `binary {op = add}`, `sum`
//! / `mean` / `amax` a reduction, `log_softmax` a softmax with `log = true`.

use super::{DType, Dim, Op, TensorType, UnaryOp};
use serde_json::{Map, Value};

/// An op's printed name and attributes.
pub fn op_attrs(op: &Op) -> (&'static str, Map<String, Value>) {
    let Value::Object(mut o) = serde_json::to_value(op).expect("ops serialize") else { unreachable!("a tagged enum") };
    o.remove("kind");
    match op {
        Op::Unary { .. } | Op::Binary { .. } | Op::Reduce { .. } => {
            o.remove("op");
        }
        Op::Softmax { .. } => {
            o.remove("log");
        }
        Op::Attention { rel: super::RelPos::None, .. } => {
            o.remove("rel");
        }
        _ => {}
    }
    o.retain(|_, v| !v.is_null());
    (op.name(), o)
}

/// The op named `name` with attributes `attrs` (the inverse of [`op_attrs`]).
pub fn op_from(name: &str, mut attrs: Map<String, Value>) -> Result<Op, String> {
    let word = |s: &str| Value::String(s.to_string());
    let kind = if UnaryOp::from_name(name).is_some() {
        attrs.insert("op".into(), word(name));
        "unary"
    } else if ["add", "sub", "mul", "div"].contains(&name) {
        attrs.insert("op".into(), word(name));
        "binary"
    } else if let Some(op) = match name {
        "sum" => Some("sum"),
        "mean" => Some("mean"),
        "amax" => Some("max"),
        _ => None,
    } {
        attrs.insert("op".into(), word(op));
        "reduce"
    } else if name == "softmax" || name == "log_softmax" {
        attrs.insert("log".into(), Value::Bool(name == "log_softmax"));
        "softmax"
    } else if name == "matmul" {
        "mat_mul"
    } else {
        name
    };
    attrs.insert("kind".into(), word(kind));
    let op: Op = serde_json::from_value(Value::Object(attrs)).map_err(|e| format!("`{name}`: {e}"))?;
    // Only names an op prints as are read: `unary {op = exp}` is written `exp`.
    if op.name() != name {
        return Err(format!("`{name}` is written `{}`", op.name()));
    }
    Ok(op)
}

fn is_word(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && !matches!(s, "true" | "false" | "none")
}

/// A run of three or more consecutive whole numbers.
fn run(xs: &[Value]) -> Option<(u64, u64)> {
    let ns: Vec<u64> = xs.iter().map(Value::as_u64).collect::<Option<_>>()?;
    (ns.len() > 2 && ns.windows(2).all(|w| w[1] == w[0] + 1)).then(|| (ns[0], ns[ns.len() - 1] + 1))
}

pub fn value_text(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if is_word(s) => s.clone(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(xs) => match run(xs) {
            Some((a, b)) => format!("[{a}..{b}]"),
            None => format!("[{}]", xs.iter().map(value_text).collect::<Vec<_>>().join(", ")),
        },
        Value::Object(o) => record_text(o),
    }
}

/// `{k = v, ...}`.
pub fn record_text(o: &Map<String, Value>) -> String {
    format!("{{{}}}", o.iter().map(|(k, v)| format!("{k} = {}", value_text(v))).collect::<Vec<_>>().join(", "))
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// The lines of a text form that hold something: (line number, text without
/// its `// comment`, trimmed).
pub fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, raw)| (i + 1, raw.split("//").next().unwrap_or("").trim()))
        .filter(|(_, line)| !line.is_empty())
}

/// A reader over one line of a text form.
pub struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(s: &'a str) -> Cursor<'a> {
        Cursor { s, at: 0 }
    }
    pub fn rest(&self) -> &'a str {
        &self.s[self.at..]
    }
    /// Where the cursor is, to go back to with [`reset`](Self::reset).
    pub fn mark(&self) -> usize {
        self.at
    }
    pub fn reset(&mut self, at: usize) {
        self.at = at;
    }
    fn skip(&mut self) {
        let r = self.rest();
        self.at += r.len() - r.trim_start().len();
    }
    pub fn peek(&mut self) -> Option<char> {
        self.skip();
        self.rest().chars().next()
    }
    pub fn eat(&mut self, t: &str) -> bool {
        self.skip();
        if self.rest().starts_with(t) {
            self.at += t.len();
            true
        } else {
            false
        }
    }
    pub fn expect(&mut self, t: &str) -> Result<(), String> {
        if self.eat(t) { Ok(()) } else { Err(format!("expected `{t}` at `{}`", self.rest())) }
    }
    pub fn end(&mut self) -> Result<(), String> {
        self.skip();
        if self.rest().is_empty() { Ok(()) } else { Err(format!("unexpected `{}`", self.rest())) }
    }
    pub fn word(&mut self) -> Result<String, String> {
        self.skip();
        let r = self.rest();
        let n = r.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(r.len());
        if n == 0 {
            return Err(format!("expected a name at `{r}`"));
        }
        self.at += n;
        Ok(r[..n].to_string())
    }
    pub fn number(&mut self) -> Result<u64, String> {
        let w = self.word()?;
        w.parse().map_err(|_| format!("expected a whole number, found `{w}`"))
    }
    /// `name` then a number: `%12`, `b7`.
    pub fn id(&mut self, prefix: &str) -> Result<u32, String> {
        self.skip();
        if !self.rest().starts_with(prefix) {
            return Err(format!("expected `{prefix}N` at `{}`", self.rest()));
        }
        self.at += prefix.len();
        let w = self.word()?;
        w.parse().map_err(|_| format!("expected `{prefix}N`, found `{prefix}{w}`"))
    }
    /// `(a, b, ...)` of ids with `prefix`.
    pub fn ids(&mut self, prefix: &str) -> Result<Vec<u32>, String> {
        self.expect("(")?;
        let mut out = Vec::new();
        if self.eat(")") {
            return Ok(out);
        }
        loop {
            out.push(self.id(prefix)?);
            if self.eat(")") {
                return Ok(out);
            }
            self.expect(",")?;
        }
    }
    /// `f32[a=1, b=2]`.
    pub fn ty(&mut self) -> Result<TensorType, String> {
        let d = self.word()?;
        let dtype = DType::parse(&d).ok_or_else(|| format!("unknown dtype `{d}`"))?;
        Ok(TensorType::new(dtype, self.dims()?))
    }

    /// `[a=1, b=2]`.
    pub fn dims(&mut self) -> Result<Vec<Dim>, String> {
        self.expect("[")?;
        let mut dims = Vec::new();
        if self.eat("]") {
            return Ok(dims);
        }
        loop {
            let name = self.word()?;
            self.expect("=")?;
            dims.push(Dim::new(name, self.number()?));
            if self.eat("]") {
                return Ok(dims);
            }
            self.expect(",")?;
        }
    }
    /// `{k = v, ...}`.
    pub fn record(&mut self) -> Result<Map<String, Value>, String> {
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
    pub fn value(&mut self) -> Result<Value, String> {
        match self.peek() {
            Some('{') => Ok(Value::Object(self.record()?)),
            Some('[') => {
                self.expect("[")?;
                let mut xs = Vec::new();
                if self.eat("]") {
                    return Ok(Value::Array(xs));
                }
                loop {
                    let x = self.value()?;
                    if self.eat("..") {
                        // `[a..b]`: the whole numbers a, a + 1, ..., b − 1.
                        let (a, b) = (x.as_u64().ok_or("a range of whole numbers")?, self.number()?);
                        self.expect("]")?;
                        return Ok(Value::Array((a..b).map(Value::from).collect()));
                    }
                    xs.push(x);
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
                // A number ends before `..` (a range) and at anything not part of a number.
                let mut n = r.find(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c))).unwrap_or(r.len());
                if let Some(dots) = r[..n].find("..") {
                    n = dots;
                }
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
