//! How deep a spec may nest, checked before anything recurses over it.
//!
//! Every pass after the parser (evaluator, checker, printer) walks the AST
//! recursively, and so does pest over brackets. Two limits keep them within
//! a bounded stack: brackets are counted on the raw text before pest runs
//! ([`MAX_BRACKETS`]), and the depth of the built AST — operator chains,
//! calls, bodies, `else if` chains — is measured without recursion
//! ([`MAX_DEPTH`]). Exceeding either is a diagnostic at the span where it
//! happens. docs/reliability.md lists the limits.

use super::ast::*;
use super::span::{FileId, Span};
use crate::diag::Diag;

/// Brackets (`(`, `[`, `{`) open at once.
pub const MAX_BRACKETS: usize = 64;
/// Depth of the syntax tree: each operator, call, bracket, body and `else if`
/// adds one. A chain `a + b + c` of n terms is n − 1 deep.
pub const MAX_DEPTH: usize = 256;

/// The first bracket that opens more than [`MAX_BRACKETS`] deep, skipping
/// strings and comments.
pub fn check_brackets(file: FileId, text: &str) -> Result<(), Diag> {
    let b = text.as_bytes();
    let (mut i, mut depth) = (0, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 1;
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_BRACKETS {
                    return Err(Diag::error(format!("brackets nest more than {MAX_BRACKETS} deep"))
                        .at(Span::new(file, i, i + 1), format!("bracket {depth} is open here"))
                        .help("name intermediate values (`a = ...`) instead of nesting; see docs/reliability.md"));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// A node of the AST to visit, with its depth.
enum Node<'a> {
    Expr(&'a Expr),
    Body(&'a Body),
    Stmt(&'a Stmt),
    Type(&'a TypeExpr),
}

/// The first node of one expression (a `--set` value) deeper than [`MAX_DEPTH`].
pub fn check_expr_depth(e: &Expr) -> Result<(), Diag> {
    deepest(vec![(Node::Expr(e), 1)])
}

/// The first node deeper than [`MAX_DEPTH`], found with an explicit stack.
pub fn check_depth(file: &File) -> Result<(), Diag> {
    let mut stack: Vec<(Node, usize)> = Vec::new();
    for item in &file.items {
        match item {
            Item::Use(_) => {}
            Item::Block(b) => {
                for p in &b.params {
                    match p {
                        BlockParam::Tensor { ty, .. } => stack.push((Node::Type(ty), 1)),
                        BlockParam::Const { default, .. } => stack.push((Node::Expr(default), 1)),
                    }
                }
                if let Some(t) = &b.ret {
                    stack.push((Node::Type(t), 1));
                }
                stack.push((Node::Body(&b.body), 1));
            }
            Item::Model(m) => {
                if let Some((_, defs)) = &m.base {
                    stack.extend(defs.iter().map(|d| (Node::Expr(&d.value), 1)));
                }
                if let Some(b) = &m.body {
                    stack.push((Node::Body(b), 1));
                }
            }
            Item::Weights(w) => {
                if let Some(c) = &w.config {
                    section(c, 1, &mut stack);
                }
                stack.extend(w.rules.iter().flat_map(|r| r.picks.iter().map(|(_, e)| (Node::Expr(e), 1))));
                for r in &w.rules {
                    for g in r.layout.iter().flatten() {
                        if let LayoutGroup::Split { sizes, .. } = g {
                            stack.extend(sizes.iter().map(|e| (Node::Expr(e), 1)));
                        }
                    }
                }
            }
            Item::Section(s) => section(s, 1, &mut stack),
        }
    }
    deepest(stack)
}

fn deepest(mut stack: Vec<(Node, usize)>) -> Result<(), Diag> {
    while let Some((node, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            let span = match node {
                Node::Expr(e) => e.span,
                Node::Body(b) => b.span,
                Node::Stmt(s) => s.span(),
                Node::Type(t) => t.span,
            };
            return Err(Diag::error(format!("this nests more than {MAX_DEPTH} levels deep"))
                .at(span, "too deep")
                .help(
                    "split long chains of operators or nested calls into named steps \
                     (`a = ...` then `b = a + ...`); see docs/reliability.md",
                ));
        }
        let d = depth + 1;
        match node {
            Node::Expr(e) => match &e.kind {
                ExprKind::Number { .. } | ExprKind::Str(_) | ExprKind::Bool(_) | ExprKind::Name(_) => {}
                ExprKind::Unary(_, a) | ExprKind::Paren(a) | ExprKind::Unit(a, _) => stack.push((Node::Expr(a), d)),
                ExprKind::Binary(_, a, b) => {
                    stack.push((Node::Expr(a), d));
                    stack.push((Node::Expr(b), d));
                }
                ExprKind::Call { args, .. } => {
                    for a in args {
                        match a {
                            Arg::Pos(x) | Arg::Kw(_, x) => stack.push((Node::Expr(x), d)),
                            Arg::DimMap { .. } => {}
                        }
                    }
                }
                ExprKind::Tuple(xs) | ExprKind::List(xs) => stack.extend(xs.iter().map(|x| (Node::Expr(x), d))),
                ExprKind::Repeat { count, body, .. } => {
                    stack.push((Node::Expr(count), d));
                    stack.push((Node::Body(body), d));
                }
            },
            Node::Body(b) => stack.extend(b.stmts.iter().map(|s| (Node::Stmt(s), d))),
            Node::Stmt(s) => match s {
                Stmt::Dims(defs, _) => stack.extend(defs.iter().map(|x| (Node::Expr(&x.value), d))),
                Stmt::Input { ty, .. } => stack.push((Node::Type(ty), d)),
                Stmt::Param { ty, init, .. } => {
                    stack.push((Node::Type(ty), d));
                    if let Some(i) = init {
                        stack.push((Node::Expr(i), d));
                    }
                }
                Stmt::Return(e, _) | Stmt::Accum { value: e, .. } | Stmt::Assign { value: e, .. } => {
                    stack.push((Node::Expr(e), d))
                }
                Stmt::If { cond, then, otherwise, .. } => {
                    stack.push((Node::Expr(cond), d));
                    stack.push((Node::Body(then), d));
                    if let Some(o) = otherwise {
                        stack.push((Node::Body(o), d));
                    }
                }
            },
            Node::Type(t) => {
                for e in &t.dims {
                    if let DimEntry::Named { size: Some(x), .. } = e {
                        stack.push((Node::Expr(x), d));
                    }
                }
            }
        }
    }
    Ok(())
}

fn section<'a>(s: &'a Section, depth: usize, stack: &mut Vec<(Node<'a>, usize)>) {
    for e in &s.entries {
        match e {
            Entry::Value { value, .. } => stack.push((Node::Expr(value), depth + 1)),
            // Sections nest only as deep as their brackets allow.
            Entry::Sub(sub) => section(sub, depth + 1, stack),
            Entry::Rule { .. } => {}
        }
    }
}
