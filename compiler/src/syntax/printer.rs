//! AST → canonical text (`tessera fmt`).
//!
//! Comments are not in the AST; the printer takes them from the source and
//! puts each one back before the item, statement or entry that follows it,
//! or at the end of the line it trailed.

use super::ast::*;

/// A comment of the source: its byte offset, its line and its text.
#[derive(Debug, Clone)]
struct Comment {
    start: usize,
    line: usize,
    text: String,
}

fn comments_of(src: &str) -> Vec<Comment> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        match b[i] {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                    i += 1;
                }
                i += 1;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = src[i..].find('\n').map(|e| i + e).unwrap_or(b.len());
                out.push(Comment { start: i, line, text: src[i..end].trim_end().to_string() });
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = src[i + 2..].find("*/").map(|e| i + 2 + e + 2).unwrap_or(b.len());
                out.push(Comment { start: i, line, text: src[i..end].to_string() });
                line += src[i..end].matches('\n').count();
                i = end;
            }
            _ => i += 1,
        }
    }
    out
}

/// Print a parsed file canonically. `src` is the text it was parsed from
/// (for its comments); pass "" to print without comments.
pub fn print_file(file: &File, src: &str) -> String {
    let newlines = src.bytes().enumerate().filter(|&(_, b)| b == b'\n').map(|(i, _)| i).collect();
    let mut p = Printer { out: String::new(), indent: 0, src, newlines, comments: comments_of(src), next: 0 };
    let mut prev_kind: Option<u8> = None;
    for item in &file.items {
        let kind = match item {
            Item::Use(_) => 0,
            _ => 1,
        };
        if let Some(pk) = prev_kind
            && (pk != 0 || kind != 0)
        {
            p.out.push('\n');
        }
        prev_kind = Some(kind);
        p.leading(item.span().start);
        match item {
            Item::Use(u) => p.line(&format!("use {}", u.path)),
            Item::Block(b) => p.block(b),
            Item::Model(m) => p.model(m),
            Item::Weights(w) => p.weights(w),
            Item::Section(s) => p.section(s),
        }
        p.trailing(item.span().end);
    }
    p.leading(usize::MAX);
    p.out
}

struct Printer<'a> {
    out: String,
    indent: usize,
    src: &'a str,
    /// Byte offsets of the source's newlines, to find a line without rescanning.
    newlines: Vec<usize>,
    comments: Vec<Comment>,
    next: usize,
}

impl Printer<'_> {
    fn line(&mut self, s: &str) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
        self.out.push_str(s);
        self.out.push('\n');
    }

    /// Emit comments that start before `pos` on their own lines.
    /// Blank lines between comments, and between a comment and the node after
    /// it, are kept (one at most).
    fn leading(&mut self, pos: usize) {
        let pos_line = self.line_of(pos);
        while self.next < self.comments.len() && self.comments[self.next].start < pos {
            let c = self.comments[self.next].clone();
            for l in c.text.lines() {
                self.line(l.trim());
            }
            self.next += 1;
            let last_line = c.line + c.text.matches('\n').count();
            let next_line = match self.comments.get(self.next) {
                Some(n) if n.start < pos => n.line,
                _ => pos_line,
            };
            if pos != usize::MAX && next_line > last_line + 1 {
                self.out.push('\n');
            }
        }
    }

    /// Append comments that start on the line where a node ends.
    fn trailing(&mut self, end: usize) {
        let end_line = self.line_of(end);
        while self.next < self.comments.len()
            && self.comments[self.next].line == end_line
            && self.comments[self.next].start >= end
            && !self.comments[self.next].text.contains('\n')
        {
            if self.out.ends_with('\n') {
                self.out.pop();
            }
            self.out.push_str("  ");
            self.out.push_str(&self.comments[self.next].text);
            self.out.push('\n');
            self.next += 1;
        }
    }

    fn block(&mut self, b: &BlockDef) {
        let params: Vec<String> = b
            .params
            .iter()
            .map(|p| match p {
                BlockParam::Tensor { name, ty } => format!("{}: {}", name.name, type_expr(ty)),
                BlockParam::Const { name, default } => format!("{} = {}", name.name, expr(default)),
            })
            .collect();
        let ret = b.ret.as_ref().map(|t| format!(" -> {}", type_expr(t))).unwrap_or_default();
        let one = format!("block {}({}){} {{", b.name.name, params.join(", "), ret);
        if self.indent * 2 + one.len() <= WIDTH || params.is_empty() {
            self.line(&one);
        } else {
            self.line(&format!("block {}(", b.name.name));
            self.indent += 1;
            for p in &params {
                self.line(&format!("{p},"));
            }
            self.indent -= 1;
            self.line(&format!("){ret} {{"));
        }
        self.body_stmts(&b.body);
        self.line("}");
    }

    fn model(&mut self, m: &ModelDef) {
        let head = match &m.base {
            Some((base, overrides)) => {
                let o: Vec<String> =
                    overrides.iter().map(|d| format!("{} = {}", d.name.name, expr(&d.value))).collect();
                match o.is_empty() {
                    true => format!("model {} = {} with {{}}", m.name.name, base.name),
                    false => format!("model {} = {} with {{ {} }}", m.name.name, base.name, o.join(", ")),
                }
            }
            None => format!("model {}", m.name.name),
        };
        match &m.body {
            Some(body) => {
                self.line(&format!("{head} {{"));
                self.body_stmts(body);
                self.line("}");
            }
            None => self.line(&head),
        }
    }

    fn body_stmts(&mut self, body: &Body) {
        self.indent += 1;
        for s in &body.stmts {
            self.stmt(s);
        }
        self.leading(body.span.end);
        self.indent -= 1;
    }

    fn stmt(&mut self, s: &Stmt) {
        self.leading(s.span().start);
        match s {
            Stmt::Dims(defs, _) => {
                let items: Vec<String> = defs.iter().map(|d| format!("{} = {}", d.name.name, expr(&d.value))).collect();
                let one = format!("dims {{ {} }}", items.join(", "));
                let inner_comments = defs.iter().any(|d| self.has_comments_in(d.span));
                if one.len() + self.indent * 2 <= WIDTH && !inner_comments {
                    self.line(&one);
                } else {
                    // Fill lines up to 100 columns; a comment forces one dim per line.
                    self.line("dims {");
                    self.indent += 1;
                    let width = WIDTH - self.indent * 2;
                    let mut cur = String::new();
                    for (k, d) in defs.iter().enumerate() {
                        let item = &items[k];
                        let last = k + 1 == defs.len();
                        let piece = if last { item.clone() } else { format!("{item},") };
                        if inner_comments {
                            self.leading(d.span.start);
                            self.line(&piece);
                            self.trailing(d.span.end);
                            continue;
                        }
                        if !cur.is_empty() && cur.len() + 1 + piece.len() > width {
                            self.line(&cur);
                            cur.clear();
                        }
                        if !cur.is_empty() {
                            cur.push(' ');
                        }
                        cur.push_str(&piece);
                    }
                    if !cur.is_empty() {
                        self.line(&cur);
                    }
                    self.indent -= 1;
                    self.line("}");
                }
            }
            Stmt::Input { name, ty, .. } => self.line(&format!("input {}: {}", name.name, type_expr(ty))),
            Stmt::Param { name, ty, init, .. } => {
                let init = init.as_ref().map(|e| format!(" init {}", expr(e))).unwrap_or_default();
                self.line(&format!("param {}: {}{}", name.name, type_expr(ty), init))
            }
            Stmt::Return(e, _) => self.expr_stmt("return ", e),
            Stmt::Accum { name, value, .. } => self.expr_stmt(&format!("{} += ", name.name), value),
            Stmt::Assign { names, value, .. } => {
                let lhs: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
                self.expr_stmt(&format!("{} = ", lhs.join(", ")), value)
            }
            Stmt::If { cond, then, otherwise, .. } => self.if_stmt("if", cond, then, otherwise.as_ref()),
        }
        if !matches!(s, Stmt::If { .. }) {
            self.trailing(s.span().end);
        }
    }

    fn if_stmt(&mut self, kw: &str, cond: &Expr, then: &Body, otherwise: Option<&Body>) {
        self.line(&format!("{kw} {} {{", expr(cond)));
        self.body_stmts(then);
        match otherwise {
            None => self.line("}"),
            Some(b) => match b.stmts.as_slice() {
                [Stmt::If { cond, then, otherwise, span }] if *span == b.span => {
                    self.if_stmt("} else if", cond, then, otherwise.as_ref())
                }
                _ => {
                    self.line("} else {");
                    self.body_stmts(b);
                    self.line("}");
                }
            },
        }
    }

    /// A statement whose value may hold a `repeat` body, printed as nested lines.
    fn expr_stmt(&mut self, prefix: &str, e: &Expr) {
        if let ExprKind::Repeat { count, label, body } = &e.kind {
            let label = label.as_ref().map(|l| format!(" as {}", l.name)).unwrap_or_default();
            self.line(&format!("{prefix}repeat {}{} {{", expr(count), label));
            self.body_stmts(body);
            self.line("}");
        } else {
            self.wrapped(prefix, e);
        }
    }

    /// `prefix` and an expression, on one line when it fits in [`WIDTH`]
    /// columns, else broken at its outermost calls, lists and operators.
    fn wrapped(&mut self, prefix: &str, e: &Expr) {
        let avail = WIDTH.saturating_sub(self.indent * 2);
        let lines = layout(e, avail.saturating_sub(prefix.len()), avail);
        for (i, l) in lines.iter().enumerate() {
            if i == 0 {
                self.line(&format!("{prefix}{l}"));
            } else {
                self.line(l);
            }
        }
    }

    fn section(&mut self, s: &Section) {
        self.line(&format!("{} {{", s.name.name));
        self.indent += 1;
        for e in &s.entries {
            self.leading(e.span().start);
            match e {
                Entry::Value { key, value, .. } => self.wrapped(&format!("{} = ", key.name), value),
                Entry::Rule { dim, axis, .. } => self.line(&format!("{} -> {}", dim.name, axis.name)),
                Entry::Sub(sub) => {
                    let one = one_line_section(sub);
                    match one {
                        Some(text) if text.len() + self.indent * 2 <= WIDTH && !self.has_comments_in(sub.span) => {
                            self.line(&text)
                        }
                        _ => self.section(sub),
                    }
                }
            }
            self.trailing(e.span().end);
        }
        self.leading(s.span.end);
        self.indent -= 1;
        self.line("}");
    }

    fn weights(&mut self, w: &WeightsDef) {
        let models: Vec<&str> = w.models.iter().map(|m| m.name.as_str()).collect();
        self.line(&format!("weights {} for {} {{", w.format.name, models.join(", ")));
        self.indent += 1;
        if let Some(c) = &w.config {
            self.leading(c.span.start);
            self.section(c);
        }
        for r in &w.rules {
            self.leading(r.span.start);
            self.line(&weight_rule(r));
            self.trailing(r.span.end);
        }
        self.leading(w.span.end);
        self.indent -= 1;
        self.line("}");
    }

    fn has_comments_in(&self, span: super::span::Span) -> bool {
        let rest = &self.comments[self.next..];
        let first = rest.partition_point(|c| c.start < span.start);
        rest.get(first).is_some_and(|c| c.start < span.end)
    }

    /// The 1-based line of a byte offset (the last line for offsets past the end).
    fn line_of(&self, pos: usize) -> usize {
        self.newlines.partition_point(|&n| n < pos.min(self.src.len())) + 1
    }
}

/// One rule of a `weights` mapping, as written.
pub fn weight_rule(r: &WeightRule) -> String {
    let path: Vec<&str> = r.path.iter().map(|i| i.name.as_str()).collect();
    let mut s = format!("\"{}\" = {}", r.name, path.join("."));
    if !r.picks.is_empty() {
        let picks: Vec<String> = r.picks.iter().map(|(d, e)| format!("{} = {}", d.name, expr(e))).collect();
        s += &format!("[{}]", picks.join(", "));
    }
    if let Some(groups) = &r.layout {
        let atom = |a: &LayoutAtom| if a.rope { format!("rope({})", a.dim.name) } else { a.dim.name.clone() };
        let groups: Vec<String> = groups
            .iter()
            .map(|g| match g {
                LayoutGroup::Dims(atoms) => match atoms.as_slice() {
                    [one] => atom(one),
                    _ => format!("({})", atoms.iter().map(atom).collect::<Vec<_>>().join(", ")),
                },
                LayoutGroup::Unit(_) => "1".to_string(),
                LayoutGroup::Split { dim, sizes } => {
                    format!("{}: ({})", dim.name, sizes.iter().map(expr).collect::<Vec<_>>().join(", "))
                }
            })
            .collect();
        s += &format!(" [{}]", groups.join(", "));
    }
    s
}

/// Columns a line may take (`tessera fmt`).
pub const WIDTH: usize = 100;

/// An expression as lines: the first follows whatever precedes it (with
/// `first` columns left), the others start at the statement's indent (with
/// `avail` columns) and carry their own relative indent. Calls, tuples and
/// lists that do not fit put one argument per line; a chain of one operator
/// fills its lines, each continuation starting with the operator. What
/// cannot break stays on one line.
fn layout(e: &Expr, first: usize, avail: usize) -> Vec<String> {
    let flat = expr(e);
    if flat.len() <= first {
        return vec![flat];
    }
    let indent = |lines: Vec<String>| lines.into_iter().map(|l| format!("  {l}")).collect::<Vec<_>>();
    let items = |open: String, parts: Vec<(String, &Expr)>, close: &str| -> Vec<String> {
        let mut out = vec![open];
        for (head, x) in parts {
            let inner = avail.saturating_sub(2);
            let mut l = layout(x, inner.saturating_sub(head.len() + 1), inner);
            l[0] = format!("{head}{}", l[0]);
            if let Some(last) = l.last_mut() {
                last.push(',');
            }
            out.extend(indent(l));
        }
        out.push(close.to_string());
        out
    };
    match &e.kind {
        ExprKind::Call { name, args } if !args.is_empty() => {
            let mut parts = Vec::new();
            for a in args {
                match a {
                    Arg::Pos(x) => parts.push((String::new(), x)),
                    Arg::Kw(k, x) => parts.push((format!("{} = ", k.name), x)),
                    // A dim map does not break; keep the call on one line.
                    Arg::DimMap { .. } => return vec![flat],
                }
            }
            items(format!("{}(", name.name), parts, ")")
        }
        ExprKind::Tuple(xs) => items("(".into(), xs.iter().map(|x| (String::new(), x)).collect(), ")"),
        ExprKind::List(xs) if !xs.is_empty() => items("[".into(), xs.iter().map(|x| (String::new(), x)).collect(), "]"),
        ExprKind::Binary(op, _, _) if *op != BinOp::Pow => {
            // The chain's operands, left to right: `a op b op c`.
            let mut operands = Vec::new();
            let mut cur = e;
            while let ExprKind::Binary(o, l, r) = &cur.kind
                && o == op
            {
                operands.push(r.as_ref());
                cur = l;
            }
            operands.push(cur);
            operands.reverse();
            // Filled: as many operands on a line as fit, each new line
            // starting with the operator.
            let p = op.precedence();
            let mut out = Vec::new();
            let mut cur = expr_prec(operands[0], p);
            for x in &operands[1..] {
                let piece = format!("{} {}", op.symbol(), expr_prec(x, p + 1));
                let room = if out.is_empty() { first } else { avail };
                if cur.len() + 1 + piece.len() > room {
                    out.push(std::mem::replace(&mut cur, format!("  {piece}")));
                } else {
                    cur = format!("{cur} {piece}");
                }
            }
            out.push(cur);
            out
        }
        _ => vec![flat],
    }
}

fn one_line_section(s: &Section) -> Option<String> {
    let mut parts = Vec::new();
    for e in &s.entries {
        match e {
            Entry::Value { key, value, .. } => parts.push(format!("{} = {}", key.name, expr(value))),
            Entry::Rule { dim, axis, .. } => parts.push(format!("{} -> {}", dim.name, axis.name)),
            Entry::Sub(_) => return None,
        }
    }
    Some(format!("{} {{ {} }}", s.name.name, parts.join(", ")))
}

pub fn type_expr(t: &TypeExpr) -> String {
    let dims: Vec<String> = t
        .dims
        .iter()
        .map(|d| match d {
            DimEntry::Ellipsis(_) => "...".to_string(),
            DimEntry::Named { name, size: None } => name.name.clone(),
            DimEntry::Named { name, size: Some(e) } => format!("{} = {}", name.name, expr(e)),
        })
        .collect();
    let dt = t.dtype.map(|(d, _)| d.name()).unwrap_or("");
    format!("{dt}[{}]", dims.join(", "))
}

/// Print an expression on one line with the minimal parentheses the
/// precedence needs (source parentheses are kept).
pub fn expr(e: &Expr) -> String {
    expr_prec(e, 0)
}

fn expr_prec(e: &Expr, min: u8) -> String {
    match &e.kind {
        ExprKind::Number { text, .. } => text.clone(),
        ExprKind::Str(s) => format!("\"{s}\""),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::Name(n) => n.clone(),
        ExprKind::Unary(op, a) => {
            let sym = if *op == UnOp::Neg { "-" } else { "!" };
            let s = format!("{sym}{}", expr_prec(a, UnOp::PRECEDENCE));
            if min > UnOp::PRECEDENCE { format!("({s})") } else { s }
        }
        ExprKind::Binary(op, a, b) => {
            let p = op.precedence();
            // Left-associative except `**`.
            let (lp, rp) = if *op == BinOp::Pow { (p + 1, p) } else { (p, p + 1) };
            let s = format!("{} {} {}", expr_prec(a, lp), op.symbol(), expr_prec(b, rp));
            if p < min { format!("({s})") } else { s }
        }
        ExprKind::Call { name, args } => {
            let a: Vec<String> = args
                .iter()
                .map(|a| match a {
                    Arg::Pos(e) => expr(e),
                    Arg::Kw(k, e) => format!("{} = {}", k.name, expr(e)),
                    Arg::DimMap { from, to, from_list, to_list, .. } => {
                        let g = |xs: &Vec<Ident>, list: bool| {
                            let names: Vec<&str> = xs.iter().map(|i| i.name.as_str()).collect();
                            if list { format!("[{}]", names.join(", ")) } else { names.join(", ") }
                        };
                        format!("{} -> {}", g(from, *from_list), g(to, *to_list))
                    }
                })
                .collect();
            format!("{}({})", name.name, a.join(", "))
        }
        ExprKind::Tuple(xs) => format!("({})", xs.iter().map(expr).collect::<Vec<_>>().join(", ")),
        ExprKind::List(xs) => format!("[{}]", xs.iter().map(expr).collect::<Vec<_>>().join(", ")),
        ExprKind::Paren(a) => format!("({})", expr(a)),
        ExprKind::Unit(a, u) => format!("{} {u}", expr(a)),
        ExprKind::Repeat { count, label, body } => {
            // A repeat nested inside a larger expression: statements on one line
            // (statements need no separator, so this parses back the same).
            let label = label.as_ref().map(|l| format!(" as {}", l.name)).unwrap_or_default();
            let mut p =
                Printer { out: String::new(), indent: 0, src: "", newlines: Vec::new(), comments: Vec::new(), next: 0 };
            p.indent = 0;
            for s in &body.stmts {
                p.stmt(s);
            }
            let stmts: Vec<&str> = p.out.lines().map(str::trim).collect();
            format!("repeat {}{} {{ {} }}", expr(count), label, stmts.join(" "))
        }
    }
}
