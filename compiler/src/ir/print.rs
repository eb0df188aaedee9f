//! The IR's text form, one node a line, and its parser (`parse(print(g))`
//! has the same nodes and outputs as `g`; spans are not part of the text):
//!
//! ```text
//! %7 = matmul(%5, %6) {contract = [embed]} : f32[batch=4, seq=64, vocab=256]
//! output loss = %9
//! ```
//!
//! Attributes follow [`super::attrs`], the syntax the lowered program shares.

pub use super::attrs::ParseError;
use super::attrs::{Cursor, lines, op_attrs, op_from, record_text};
use super::{Graph, ValueId};
use crate::syntax::span::Span;
use std::fmt::Write;

/// One node's text after `%i = `.
pub fn node_text(op: &super::Op, inputs: &[ValueId], ty: &super::TensorType) -> String {
    let (name, attrs) = op_attrs(op);
    let ins: Vec<String> = inputs.iter().map(|v| v.to_string()).collect();
    let attrs = if attrs.is_empty() { String::new() } else { format!(" {}", record_text(&attrs)) };
    format!("{name}({}){attrs} : {ty}", ins.join(", "))
}

pub(super) fn print(g: &Graph) -> String {
    let mut s = String::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let _ = writeln!(s, "%{i} = {}", node_text(&n.op, &n.inputs, &n.ty));
    }
    for (name, v) in &g.outputs {
        let _ = writeln!(s, "output {name} = {v}");
    }
    s
}

/// Parse a graph's text form. Comments (`// ...`) and blank lines are skipped.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut g = Graph::new();
    for (n, line) in lines(text) {
        let fail = |message: String| ParseError { line: n, message };
        let mut c = Cursor::new(line);
        if c.eat("output ") {
            let name = c.word().map_err(fail)?;
            c.expect("=").map_err(fail)?;
            let v = c.id("%").map_err(fail)?;
            c.end().map_err(fail)?;
            if v as usize >= g.len() {
                return Err(fail(format!("output `{name}` names %{v}, which is not a node")));
            }
            g.set_output(&name, ValueId(v));
            continue;
        }
        let id = c.id("%").map_err(fail)?;
        if id as usize != g.len() {
            return Err(fail(format!("expected %{} next, found %{id}", g.len())));
        }
        c.expect("=").map_err(fail)?;
        let name = c.word().map_err(fail)?;
        let ins = c.ids("%").map_err(fail)?;
        if let Some(v) = ins.iter().find(|&&v| v >= id) {
            return Err(fail(format!("%{v} is read before it is defined")));
        }
        let attrs = if c.peek() == Some('{') { c.record().map_err(fail)? } else { Default::default() };
        c.expect(":").map_err(fail)?;
        let ty = c.ty().map_err(fail)?;
        c.end().map_err(fail)?;
        let op = op_from(&name, attrs).map_err(fail)?;
        g.push(op, ins.into_iter().map(ValueId).collect(), ty, Span::default());
    }
    Ok(g)
}
