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

use super::{BufId, Buffer, Instr, Kind, Phase, Program, Region, Stream};
pub use crate::ir::attrs::ParseError;
use crate::ir::attrs::{Cursor, lines, op_attrs, op_from, record_text};
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
    let mut phases = p.phases.iter().peekable();
    for (i, ins) in p.instrs.iter().enumerate() {
        while let Some(ph) = phases.next_if(|ph| ph.at as usize <= i) {
            let _ = writeln!(s, "phase {}", Value::String(ph.name.clone()));
        }
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
    let mut s = String::new();
    if !ins.outs.is_empty() {
        s += &format!("{} = ", list(&ins.outs));
    }
    if let Kind::Kernel { kernel } = &ins.kind {
        return s + &format!("kernel({}) {}", list(&ins.ins), kernel_text(kernel));
    }
    let (name, attrs) = name_and_attrs(&ins.kind);
    s += &format!("{name}({})", list(&ins.ins));
    if !attrs.is_empty() {
        s += &format!(" {}", record_text(&attrs));
    }
    if ins.stream == Stream::Comm {
        s += " @comm";
    }
    s
}

/// An instruction's printed name and attributes: an IR op as the graph IR
/// prints it; a bucket collective by its collective; the rest by kind.
fn name_and_attrs(k: &Kind) -> (String, Map<String, Value>) {
    match k {
        Kind::Op { op, rng, accumulate, rows } => {
            let (name, mut attrs) = op_attrs(op);
            if let Some(r) = rng {
                attrs.insert("rng".into(), Value::from(*r));
            }
            if *accumulate {
                attrs.insert("accumulate".into(), Value::Bool(true));
            }
            if *rows {
                attrs.insert("rows".into(), Value::Bool(true));
            }
            (name.to_string(), attrs)
        }
        Kind::At { op, dim } => {
            let (name, mut attrs) = op_attrs(op);
            attrs.insert("at".into(), Value::String(dim.clone()));
            (name.to_string(), attrs)
        }
        Kind::AttentionGrads { op, which, rng } => {
            let (_, mut attrs) = op_attrs(op);
            attrs.insert("which".into(), Value::from(which.clone()));
            if let Some(r) = rng {
                attrs.insert("rng".into(), Value::from(*r));
            }
            (k.name().to_string(), attrs)
        }
        _ => {
            let Value::Object(mut o) = serde_json::to_value(k).expect("kinds serialize") else {
                unreachable!("a tagged enum")
            };
            let kind = take_tag(&mut o, "kind");
            if kind != "collective" {
                return (kind, o);
            }
            let Some(Value::Object(mut c)) = o.remove("op") else { unreachable!("a collective") };
            let name = take_tag(&mut c, "collective");
            let mut attrs = Map::new();
            attrs.insert("axis".into(), o.remove("axis").unwrap_or(Value::Null));
            attrs.extend(c);
            (name, attrs)
        }
    }
}

fn take_tag(o: &mut Map<String, Value>, key: &str) -> String {
    match o.remove(key) {
        Some(Value::String(s)) => s,
        _ => unreachable!("tagged enums carry their tag"),
    }
}

/// Parse a program's text form.
pub fn parse(text: &str) -> Result<Program, ParseError> {
    let mut p = Program {
        rank: 0,
        coords: Vec::new(),
        sizes: [0; Region::COUNT],
        buffers: Vec::new(),
        instrs: Vec::new(),
        phases: Vec::new(),
    };
    let mut seen_header = false;
    for (n, line) in lines(text) {
        let fail = |message: String| ParseError { line: n, message };
        let mut c = Cursor::new(line);
        if let Some(rest) = line.strip_prefix("program rank ") {
            let mut c = Cursor::new(rest);
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
        if let Some(rest) = line.strip_prefix("phase ") {
            let name: String = serde_json::from_str(rest.trim())
                .map_err(|_| fail("a phase is named by a quoted string: `phase \"F0 mb1\"`".into()))?;
            let at = p.instrs.len() as u32;
            if p.phases.last().is_some_and(|ph| ph.at == at) {
                return Err(fail("two phases start at the same instruction".into()));
            }
            p.phases.push(Phase { at, name });
            continue;
        }
        if let Some(rest) = line.strip_prefix("regions ") {
            let mut c = Cursor::new(rest);
            for (k, v) in c.record().map_err(fail)? {
                let r = Region::from_name(&k).ok_or_else(|| fail(format!("unknown region `{k}`")))?;
                p.sizes[r.index()] = v.as_u64().ok_or_else(|| fail("a region size is a whole number".into()))?;
            }
            continue;
        }
        let outs = outs(&mut c).map_err(fail)?;
        let word = c.word().map_err(fail)?;
        match word.as_str() {
            "buffer" | "view" => {
                let [b] = outs[..] else { return Err(fail("a buffer line declares one buffer".into())) };
                if b.index() != p.buffers.len() {
                    return Err(fail(format!("expected b{} next, found {b}", p.buffers.len())));
                }
                let view_of = if word == "view" { Some(BufId(c.id("b").map_err(fail)?)) } else { None };
                let buffer = buffer(&mut c, view_of).map_err(fail)?;
                p.buffers.push(buffer);
            }
            "kernel" => {
                let ins: Vec<BufId> = c.ids("b").map_err(fail)?.into_iter().map(BufId).collect();
                let args: Vec<&Buffer> = ins
                    .iter()
                    .chain(&outs)
                    .map(|b| p.buffers.get(b.index()).ok_or_else(|| fail(format!("{b} is not declared"))))
                    .collect::<Result<_, _>>()?;
                let kernel = kernel_parse(&mut c, &args, ins.len()).map_err(fail)?;
                c.end().map_err(fail)?;
                p.instrs.push(Instr::new(Kind::Kernel { kernel }, ins, outs, Stream::Compute));
            }
            name => {
                let ins = c.ids("b").map_err(fail)?.into_iter().map(BufId).collect();
                let attrs = if c.peek() == Some('{') { c.record().map_err(fail)? } else { Map::new() };
                let stream = if c.eat("@comm") { Stream::Comm } else { Stream::Compute };
                c.end().map_err(fail)?;
                let kind = kind_of(name, attrs).map_err(fail)?;
                p.instrs.push(Instr::new(kind, ins, outs, stream));
            }
        }
    }
    Ok(p)
}

/// The inverse of [`name_and_attrs`].
fn kind_of(name: &str, mut attrs: Map<String, Value>) -> Result<Kind, String> {
    let word = |v: &str| Value::String(v.to_string());
    let rng = |attrs: &mut Map<String, Value>| -> Result<Option<u64>, String> {
        match attrs.remove("rng") {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("`rng` is a whole number, found {v}")),
        }
    };
    match name {
        "bucket_all_reduce" | "bucket_all_gather" | "bucket_reduce_scatter" => {
            let mut o = Map::new();
            o.insert("kind".into(), word("collective"));
            o.insert("axis".into(), attrs.remove("axis").unwrap_or(Value::Null));
            attrs.insert("collective".into(), word(name));
            o.insert("op".into(), Value::Object(attrs));
            serde_json::from_value(Value::Object(o)).map_err(|e| format!("`{name}`: {e}"))
        }
        "attention_grads" => {
            let rng = rng(&mut attrs)?;
            let which: Vec<u8> = serde_json::from_value(attrs.remove("which").unwrap_or(Value::Null))
                .map_err(|e| format!("`which`: {e}"))?;
            attrs.insert("which".into(), Value::from(which.first().copied().unwrap_or(0)));
            Ok(Kind::AttentionGrads { op: op_from("attention_grad", attrs)?, which, rng })
        }
        _ if KINDS.contains(&name) => {
            attrs.insert("kind".into(), word(name));
            serde_json::from_value(Value::Object(attrs)).map_err(|e| format!("`{name}`: {e}"))
        }
        _ if attrs.contains_key("at") => {
            let dim = match attrs.remove("at") {
                Some(Value::String(d)) => d,
                v => return Err(format!("`at` names the sequence dim, found {v:?}")),
            };
            Ok(Kind::At { op: op_from(name, attrs)?, dim })
        }
        _ => {
            let rng = rng(&mut attrs)?;
            let mut flag = |key: &str| match attrs.remove(key) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(b),
                Some(v) => Err(format!("`{key}` is true or false, found {v}")),
            };
            let (accumulate, rows) = (flag("accumulate")?, flag("rows")?);
            Ok(Kind::Op { op: op_from(name, attrs)?, rng, accumulate, rows })
        }
    }
}

/// The instruction kinds printed under their own name.
const KINDS: [&str; 15] = [
    "rows_at",
    "cache_write",
    "slot_counts",
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

/// `b1, b2 =` before an instruction, or nothing.
fn outs(c: &mut Cursor) -> Result<Vec<BufId>, String> {
    let save = c.mark();
    let mut outs = Vec::new();
    loop {
        let Ok(b) = c.id("b") else {
            c.reset(save);
            return Ok(Vec::new());
        };
        outs.push(BufId(b));
        if c.eat("=") {
            return Ok(outs);
        }
        if !c.eat(",") {
            c.reset(save);
            return Ok(Vec::new());
        }
    }
}

/// `region+offset : type ["name"]`.
fn buffer(c: &mut Cursor, view_of: Option<BufId>) -> Result<Buffer, String> {
    let r = c.word()?;
    let region = Region::from_name(&r).ok_or_else(|| format!("unknown region `{r}`"))?;
    c.expect("+")?;
    let offset = c.number()?;
    c.expect(":")?;
    let ty = c.ty()?;
    let name = if c.peek() == Some('"') {
        match c.value()? {
            Value::String(s) => s,
            _ => unreachable!("a quoted string"),
        }
    } else {
        String::new()
    };
    c.end()?;
    Ok(Buffer { ty, region, offset, view_of, name })
}

/// A kernel's text: its loop nest, its body as statements over values `vN`
/// and arguments `aN` (inputs, then outputs), and the ops it fused:
///
/// ```text
/// over [batch=2, seq=4, mlp=32] {v0 = a0; v1 = a1; v2 = add(v0, v1); v3 = gelu(v2); a2 = v2; a3 = v3} {ops = [add, gelu]}
/// ```
///
/// The strides are not printed: they follow from the arguments' types (a
/// dim an argument lacks is broadcast), as fusion makes them.
fn kernel_text(k: &crate::kernel::Kernel) -> String {
    use crate::kernel::Expr;
    let dims: Vec<String> = k.dims.iter().map(|d| format!("{}={}", d.name, d.size)).collect();
    let mut stmts: Vec<String> = k
        .body
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let rhs = match e {
                Expr::Load { arg } => format!("a{arg}"),
                Expr::Element { arg, index } => format!("a{arg}[{index}]"),
                Expr::Const { value } => Value::from(*value).to_string(),
                Expr::Unary { op, x } => format!("{}(v{x})", op.name()),
                Expr::UnaryGrad { op, x, g } => format!("{}_grad(v{x}, v{g})", op.name()),
                Expr::Binary { op, a, b } => format!("{}(v{a}, v{b})", op.name()),
                Expr::Pow { x, exp } => format!("pow(v{x}, {})", Value::from(*exp)),
                Expr::Dropout { x, p, rng } => format!("dropout(v{x}, {}, {rng})", Value::from(*p)),
                Expr::Round { x, dtype } => format!("round(v{x}, {})", dtype.name()),
                Expr::Reduce { x, op } => format!("row_{}(v{x})", op.name()),
                Expr::Index => "index()".to_string(),
                Expr::Equal { a, b } => format!("equal(v{a}, v{b})"),
            };
            format!("v{i} = {rhs}")
        })
        .collect();
    stmts.extend(k.stores.iter().map(|(a, v)| format!("a{a} = v{v}")));
    let ops: Vec<Value> = k.ops.iter().map(|o| Value::String(o.clone())).collect();
    let mut meta = Map::new();
    meta.insert("ops".into(), Value::Array(ops));
    if let Some(r) = k.rows {
        meta.insert("rows".into(), Value::from(r));
    }
    format!("over [{}] {{{}}} {}", dims.join(", "), stmts.join("; "), record_text(&meta))
}

/// The inverse of [`kernel_text`], given the argument buffers.
fn kernel_parse(c: &mut Cursor, args: &[&Buffer], inputs: usize) -> Result<crate::kernel::Kernel, String> {
    use crate::ir::{BinaryOp, UnaryOp};
    use crate::kernel::{Expr, Kernel};
    c.expect("over")?;
    let dims = c.dims()?;
    c.expect("{")?;
    let mut body = Vec::new();
    let mut stores = Vec::new();
    let operand = |c: &mut Cursor| -> Result<usize, String> { c.id("v").map(|v| v as usize) };
    let number =
        |c: &mut Cursor| -> Result<f64, String> { c.value()?.as_f64().ok_or_else(|| "expected a number".to_string()) };
    // `aN`: an argument (not an operation whose name starts with `a`).
    let at_arg = |c: &mut Cursor| {
        c.peek();
        let r = c.rest();
        r.starts_with('a') && r[1..].starts_with(|ch: char| ch.is_ascii_digit())
    };
    while !c.eat("}") {
        if at_arg(c) {
            let arg = c.id("a")? as usize;
            c.expect("=")?;
            stores.push((arg, operand(c)?));
        } else {
            let v = c.id("v")? as usize;
            if v != body.len() {
                return Err(format!("expected v{} next, found v{v}", body.len()));
            }
            c.expect("=")?;
            let e = match c.peek() {
                Some('a') if at_arg(c) => {
                    let arg = c.id("a")? as usize;
                    if c.eat("[") {
                        let index = c.number()?;
                        c.expect("]")?;
                        Expr::Element { arg, index }
                    } else {
                        Expr::Load { arg }
                    }
                }
                Some(ch) if ch == '-' || ch.is_ascii_digit() => Expr::Const { value: number(c)? },
                _ => {
                    let name = c.word()?;
                    c.expect("(")?;
                    // `index()` reads no value.
                    let x = if name == "index" { 0 } else { operand(c)? };
                    let e = if name == "index" {
                        Expr::Index
                    } else if name == "equal" {
                        c.expect(",")?;
                        Expr::Equal { a: x, b: operand(c)? }
                    } else if let Some(op) = name.strip_suffix("_grad").and_then(UnaryOp::from_name) {
                        c.expect(",")?;
                        Expr::UnaryGrad { op, x, g: operand(c)? }
                    } else if let Some(op) = UnaryOp::from_name(&name) {
                        Expr::Unary { op, x }
                    } else if name == "pow" {
                        c.expect(",")?;
                        Expr::Pow { x, exp: number(c)? }
                    } else if let Some(op) = name.strip_prefix("row_").and_then(crate::ir::ReduceOp::from_name) {
                        Expr::Reduce { x, op }
                    } else if name == "round" {
                        c.expect(",")?;
                        let d = c.word()?;
                        let dtype = crate::ir::DType::parse(&d).ok_or_else(|| format!("`{d}` is not a dtype"))?;
                        Expr::Round { x, dtype }
                    } else if name == "dropout" {
                        c.expect(",")?;
                        let p = number(c)?;
                        c.expect(",")?;
                        Expr::Dropout { x, p, rng: c.number()? }
                    } else {
                        let op = match name.as_str() {
                            "add" => BinaryOp::Add,
                            "sub" => BinaryOp::Sub,
                            "mul" => BinaryOp::Mul,
                            "div" => BinaryOp::Div,
                            other => return Err(format!("`{other}` is not a kernel operation")),
                        };
                        c.expect(",")?;
                        Expr::Binary { op, a: x, b: operand(c)? }
                    };
                    c.expect(")")?;
                    e
                }
            };
            body.push(e);
        }
        if !c.eat(";") {
            c.expect("}")?;
            break;
        }
    }
    let meta = c.record()?;
    let ops: Vec<String> = serde_json::from_value(meta.get("ops").cloned().unwrap_or(Value::Array(Vec::new())))
        .map_err(|e| format!("`ops`: {e}"))?;
    let rows = match meta.get("rows") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| format!("`rows` names an argument, found {v}"))? as usize),
    };
    let strides = args.iter().map(|b| crate::kernel::strides(&b.ty, &dims)).collect();
    let k = Kernel { dims, inputs, strides, body, stores, ops, rows };
    k.check()?;
    Ok(k)
}
