//! Text → AST. Parse errors become diagnostics that point at the exact token
//! and say what was expected.

use super::ast::*;
use super::span::{FileId, Span};
use crate::diag::Diag;
use pest::Parser as _;
use pest::iterators::Pair;
use std::cell::RefCell;

#[derive(pest_derive::Parser)]
#[grammar = "syntax/spec.pest"]
struct SpecParser;

/// Parse a whole `.spec` file.
pub fn parse_file(file: FileId, text: &str) -> Result<File, Diag> {
    super::limits::check_brackets(file, text)?;
    let mut pairs = SpecParser::parse(Rule::file, text).map_err(|e| parse_error(file, text, e))?;
    let Some(root) = pairs.next() else {
        return Ok(File { items: Vec::new() });
    };
    let b = Builder { file, too_deep: RefCell::new(None) };
    let mut items = Vec::new();
    for p in root.into_inner() {
        match p.as_rule() {
            Rule::use_item => items.push(Item::Use(b.use_item(p))),
            Rule::block_def => items.push(Item::Block(b.block_def(p))),
            Rule::model_def => items.push(Item::Model(b.model_def(p))),
            Rule::weights_def => items.push(Item::Weights(b.weights_def(p))),
            Rule::section => items.push(Item::Section(b.section(p))),
            _ => {}
        }
    }
    if let Some(d) = b.too_deep.into_inner() {
        return Err(d);
    }
    let f = File { items };
    super::limits::check_depth(&f)?;
    Ok(f)
}

/// Parse one expression (used for `--set key=value` values).
pub fn parse_value(file: FileId, text: &str) -> Result<Expr, Diag> {
    let wrapped = format!("v={text}");
    super::limits::check_brackets(file, text)?;
    let mut pairs =
        SpecParser::parse(Rule::key_value, &wrapped).map_err(|e| parse_error(file, text, shift_error(e, 2)))?;
    let b = Builder { file, too_deep: RefCell::new(None) };
    let kv = pairs.next().expect("key_value matched");
    let full = kv.as_str().len();
    if full != text.len() + 2 {
        let at = full.saturating_sub(2);
        return Err(Diag::error("unexpected text after the value")
            .at(Span::new(file, at, text.len()), "not part of the value")
            .help(
                "a value is one expression, e.g. `--set dims.embed=1024` or `--set parallel.pipeline.schedule=1f1b`",
            ));
    }
    let mut inner = kv.into_inner();
    inner.next(); // key
    let mut value = b.value(inner.next().expect("value"));
    if let Some(d) = b.too_deep.into_inner() {
        return Err(d);
    }
    super::limits::check_expr_depth(&value)?;
    let shift = |s: Span| Span::new(file, s.start.saturating_sub(2), s.end.saturating_sub(2));
    shift_spans(&mut value, &shift);
    Ok(value)
}

fn shift_spans(e: &mut Expr, f: &dyn Fn(Span) -> Span) {
    e.span = f(e.span);
    match &mut e.kind {
        ExprKind::Unary(_, a) | ExprKind::Paren(a) | ExprKind::Unit(a, _) => shift_spans(a, f),
        ExprKind::Binary(_, a, b) => {
            shift_spans(a, f);
            shift_spans(b, f);
        }
        ExprKind::Call { name, args } => {
            name.span = f(name.span);
            for a in args {
                match a {
                    Arg::Pos(e) => shift_spans(e, f),
                    Arg::Kw(k, e) => {
                        k.span = f(k.span);
                        shift_spans(e, f)
                    }
                    Arg::DimMap { span, .. } => *span = f(*span),
                }
            }
        }
        ExprKind::Tuple(xs) | ExprKind::List(xs) => xs.iter_mut().for_each(|x| shift_spans(x, f)),
        _ => {}
    }
}

fn shift_error(e: pest::error::Error<Rule>, by: usize) -> pest::error::Error<Rule> {
    use pest::error::InputLocation;
    let mut e = e;
    e.location = match e.location {
        InputLocation::Pos(p) => InputLocation::Pos(p.saturating_sub(by)),
        InputLocation::Span((a, b)) => InputLocation::Span((a.saturating_sub(by), b.saturating_sub(by))),
    };
    e
}

fn rule_name(r: &Rule) -> Option<&'static str> {
    Some(match r {
        Rule::EOI => "end of file",
        Rule::ident => "a name",
        Rule::number | Rule::tag => "a number",
        Rule::value => "a value",
        Rule::string => "a string",
        Rule::expr | Rule::paren | Rule::call | Rule::list | Rule::boolean | Rule::repeat_expr => "an expression",
        Rule::type_expr => "a type like `f32[batch, seq]`",
        Rule::dtype => "a dtype (f32, bf16, f16, i32, i64, bool)",
        Rule::use_item => "`use`",
        Rule::block_def => "`block`",
        Rule::model_def => "`model`",
        Rule::section => "a section (`parallel {`, `train {`, `infer {`)",
        Rule::weights_def | Rule::weights_kw => "`weights`",
        Rule::for_kw => "`for`",
        Rule::weight_rule => "a rule `\"tensor name\" = parameter.path`",
        Rule::weights_config | Rule::config_kw => "`config {`",
        Rule::param_path => "a parameter path",
        Rule::dim_picks | Rule::dim_pick => "`[dim = index]`",
        Rule::weight_layout
        | Rule::layout_group
        | Rule::layout_atom
        | Rule::rope_atom
        | Rule::rope_kw
        | Rule::layout_split
        | Rule::unit_dim => "a layout like `[(heads, head_dim), embed]`",
        Rule::body => "`{`",
        Rule::dims_stmt => "`dims`",
        Rule::input_stmt => "`input`",
        Rule::param_stmt => "`param`",
        Rule::return_stmt => "`return`",
        Rule::if_stmt => "`if`",
        Rule::assign_stmt | Rule::accum_stmt => "a statement",
        Rule::entry | Rule::key_value | Rule::subsection | Rule::layout_rule => "an entry `key = value`",
        Rule::unit => "a unit (tokens, sequences, samples, steps)",
        Rule::dim_entry | Rule::ellipsis => "a dim name",
        Rule::kwarg | Rule::dim_map | Rule::dim_group => "an argument",
        Rule::block_param => "a block parameter",
        Rule::dim_def => "`name = value`",
        Rule::model_variant => "`=` or `{`",
        Rule::pow
        | Rule::add
        | Rule::sub
        | Rule::mul
        | Rule::div
        | Rule::rem
        | Rule::matmul
        | Rule::eq
        | Rule::ne
        | Rule::le
        | Rule::ge
        | Rule::lt
        | Rule::gt
        | Rule::and
        | Rule::or => "an operator",
        Rule::neg | Rule::not => "an expression",
        _ => return None,
    })
}

fn parse_error(file: FileId, text: &str, e: pest::error::Error<Rule>) -> Diag {
    use pest::error::{ErrorVariant, InputLocation};
    let pos = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((a, _)) => a,
    };
    let pos = pos.min(text.len());
    // Point at the whole offending token, not just its first byte.
    let rest = &text[pos..];
    let tok_len = if rest.is_empty() {
        0
    } else {
        let first = rest.chars().next().map(|c| c.len_utf8()).unwrap_or(1);
        let word = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if word > 0 { word } else { first }
    };
    let found = if rest.is_empty() { "end of file".to_string() } else { format!("`{}`", &rest[..tok_len]) };
    let mut expected: Vec<&str> = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => positives.iter().filter_map(rule_name).collect(),
        ErrorVariant::CustomError { .. } => Vec::new(),
    };
    expected.sort();
    expected.dedup();
    let what = match expected.len() {
        0 => "unexpected input".to_string(),
        1 => format!("expected {}", expected[0]),
        _ => {
            let (last, init) = expected.split_last().expect("non-empty");
            format!("expected {} or {}", init.join(", "), last)
        }
    };
    let top_level = ["parallel", "train", "infer", "model", "block", "use"];
    let word = &rest[..tok_len];
    let help = if top_level.contains(&word) && expected.iter().any(|e| e.contains("statement")) {
        format!("is a `}}` missing before `{word}`? Every `{{` of the model or block above must be closed")
    } else if rest.starts_with('}') || rest.is_empty() {
        "check that every `{`, `(` and `[` before this point is closed, and that no entry is missing its value"
            .to_string()
    } else if expected.contains(&"a name") && rest.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        format!("{found} is a reserved word; choose another name")
    } else {
        "see docs/language.md for the syntax".to_string()
    };
    Diag::error(format!("syntax error: {what}, found {found}")).at(Span::new(file, pos, pos + tok_len), what).help(help)
}

struct Builder {
    file: FileId,
    /// The first expression whose operators nest deeper than
    /// [`super::limits::MAX_DEPTH`]; building stops there.
    too_deep: RefCell<Option<Diag>>,
}

/// An operator waiting on the operator stack of [`Builder::expr`].
enum PendingOp {
    Prefix(UnOp, Span),
    Infix(BinOp),
}

impl PendingOp {
    fn power(&self) -> u8 {
        match self {
            PendingOp::Prefix(..) => UnOp::PRECEDENCE,
            PendingOp::Infix(b) => b.precedence(),
        }
    }
}

impl Builder {
    /// The span of a node without the whitespace and comments that pest
    /// leaves at its end (a repetition that fails keeps the skipped trivia).
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, s.start(), s.start() + trimmed_len(p.as_str()))
    }

    fn ident(&self, p: Pair<Rule>) -> Ident {
        Ident { name: p.as_str().to_string(), span: self.span(&p) }
    }

    fn use_item(&self, p: Pair<Rule>) -> Use {
        let span = self.span(&p);
        let path = p.into_inner().next().map(|x| x.as_str().to_string()).unwrap_or_default();
        Use { path, span }
    }

    fn block_def(&self, p: Pair<Rule>) -> BlockDef {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("name"));
        let mut params = Vec::new();
        let mut ret = None;
        let mut body = None;
        for q in it {
            match q.as_rule() {
                Rule::block_params => {
                    for bp in q.into_inner() {
                        let mut bi = bp.into_inner();
                        let pname = self.ident(bi.next().expect("param name"));
                        let rest = bi.next().expect("param type or default");
                        params.push(match rest.as_rule() {
                            Rule::type_expr => BlockParam::Tensor { name: pname, ty: self.type_expr(rest) },
                            _ => BlockParam::Const { name: pname, default: self.expr(rest) },
                        });
                    }
                }
                Rule::type_expr => ret = Some(self.type_expr(q)),
                Rule::body => body = Some(self.body(q)),
                _ => {}
            }
        }
        BlockDef { name, params, ret, body: body.expect("block body"), span }
    }

    fn model_def(&self, p: Pair<Rule>) -> ModelDef {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("name"));
        let next = it.next().expect("model body or variant");
        match next.as_rule() {
            Rule::model_variant => {
                let mut vi = next.into_inner();
                let base = self.ident(vi.next().expect("base"));
                let overrides = vi.next().expect("overrides").into_inner().map(|d| self.dim_def(d)).collect();
                ModelDef { name, base: Some((base, overrides)), body: None, span }
            }
            _ => ModelDef { name, base: None, body: Some(self.body(next)), span },
        }
    }

    fn dim_def(&self, p: Pair<Rule>) -> DimDef {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("name"));
        let value = self.expr(it.next().expect("value"));
        DimDef { name, value, span }
    }

    fn weights_def(&self, p: Pair<Rule>) -> WeightsDef {
        let span = self.span(&p);
        let mut it = p.into_inner().filter(|q| !matches!(q.as_rule(), Rule::weights_kw | Rule::for_kw));
        let format = self.ident(it.next().expect("format"));
        let (mut models, mut config, mut rules) = (Vec::new(), None, Vec::new());
        for q in it {
            match q.as_rule() {
                Rule::ident => models.push(self.ident(q)),
                Rule::weights_config => {
                    let span = self.span(&q);
                    let mut qi = q.into_inner();
                    let kw = qi.next().expect("config");
                    let name = Ident { name: "config".into(), span: self.span(&kw) };
                    config = Some(Section { name, entries: self.entries(qi.next().expect("entries")), span });
                }
                _ => rules.push(self.weight_rule(q)),
            }
        }
        WeightsDef { format, models, config, rules, span }
    }

    fn weight_rule(&self, p: Pair<Rule>) -> WeightRule {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let s = it.next().expect("name");
        let name_span = self.span(&s);
        let name = s.as_str().trim_matches('"').to_string();
        let path = it.next().expect("path").into_inner().map(|i| self.ident(i)).collect();
        let (mut picks, mut layout) = (Vec::new(), None);
        for q in it {
            match q.as_rule() {
                Rule::dim_picks => {
                    for pick in q.into_inner() {
                        let mut pi = pick.into_inner();
                        let dim = self.ident(pi.next().expect("dim"));
                        picks.push((dim, self.expr(pi.next().expect("index"))));
                    }
                }
                _ => {
                    let groups = q.into_inner().map(|g| self.layout_group(g)).collect();
                    layout = Some(groups);
                }
            }
        }
        WeightRule { name, name_span, path, picks, layout, span }
    }

    fn layout_group(&self, g: Pair<Rule>) -> LayoutGroup {
        let span = self.span(&g);
        let mut inner = g.into_inner().peekable();
        match inner.peek().map(|x| x.as_rule()) {
            Some(Rule::unit_dim) => LayoutGroup::Unit(span),
            Some(Rule::layout_split) => {
                let mut it = inner.next().expect("split").into_inner();
                let dim = self.ident(it.next().expect("dim"));
                LayoutGroup::Split { dim, sizes: it.map(|e| self.expr(e)).collect() }
            }
            _ => LayoutGroup::Dims(
                inner
                    .map(|a| {
                        let inner = a.into_inner().next().expect("atom");
                        match inner.as_rule() {
                            Rule::rope_atom => {
                                let d = inner.into_inner().find(|x| x.as_rule() == Rule::ident);
                                LayoutAtom { dim: self.ident(d.expect("rope dim")), rope: true }
                            }
                            _ => LayoutAtom { dim: self.ident(inner), rope: false },
                        }
                    })
                    .collect(),
            ),
        }
    }

    fn section(&self, p: Pair<Rule>) -> Section {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("name"));
        let entries = self.entries(it.next().expect("entries"));
        Section { name, entries, span }
    }

    fn entries(&self, p: Pair<Rule>) -> Vec<Entry> {
        p.into_inner()
            .map(|e| {
                let inner = e.into_inner().next().expect("entry");
                let span = self.span(&inner);
                match inner.as_rule() {
                    Rule::subsection => Entry::Sub(self.section(inner)),
                    Rule::layout_rule => {
                        let mut it = inner.into_inner();
                        let dim = self.ident(it.next().expect("dim"));
                        let axis = self.ident(it.next().expect("axis"));
                        Entry::Rule { dim, axis, span }
                    }
                    _ => {
                        let mut it = inner.into_inner();
                        let key = self.ident(it.next().expect("key"));
                        let value = self.value(it.next().expect("value"));
                        Entry::Value { key, value, span }
                    }
                }
            })
            .collect()
    }

    fn type_expr(&self, p: Pair<Rule>) -> TypeExpr {
        let span = self.span(&p);
        let mut dtype = None;
        let mut dims = Vec::new();
        for q in p.into_inner() {
            match q.as_rule() {
                Rule::dtype => dtype = Some((DType::parse(q.as_str()).expect("grammar dtype"), self.span(&q))),
                Rule::dim_entry => {
                    let inner = q.into_inner().collect::<Vec<_>>();
                    match inner.first().map(|x| x.as_rule()) {
                        Some(Rule::ellipsis) => dims.push(DimEntry::Ellipsis(self.span(&inner[0]))),
                        _ => {
                            let mut it = inner.into_iter();
                            let name = self.ident(it.next().expect("dim"));
                            let size = it.next().map(|e| self.expr(e));
                            dims.push(DimEntry::Named { name, size });
                        }
                    }
                }
                _ => {}
            }
        }
        TypeExpr { dtype, dims, span }
    }

    fn body(&self, p: Pair<Rule>) -> Body {
        let span = self.span(&p);
        Body { stmts: p.into_inner().map(|s| self.stmt(s)).collect(), span }
    }

    fn stmt(&self, p: Pair<Rule>) -> Stmt {
        let span = self.span(&p);
        let rule = p.as_rule();
        let mut it = p.into_inner();
        match rule {
            Rule::dims_stmt => Stmt::Dims(it.map(|d| self.dim_def(d)).collect(), span),
            Rule::input_stmt => {
                let name = self.ident(it.next().expect("name"));
                let ty = self.type_expr(it.next().expect("type"));
                Stmt::Input { name, ty, span }
            }
            Rule::param_stmt => {
                let name = self.ident(it.next().expect("name"));
                let ty = self.type_expr(it.next().expect("type"));
                let init = it.next().map(|e| self.expr(e));
                Stmt::Param { name, ty, init, span }
            }
            Rule::return_stmt => Stmt::Return(self.expr(it.next().expect("expr")), span),
            Rule::if_stmt => {
                // `if a {} else if b {} else {}` nests as `if a {} else { if b {} else {} }`,
                // built from the last branch back.
                let cond = self.expr(it.next().expect("cond"));
                let then = self.body(it.next().expect("then"));
                let mut branches = Vec::new();
                let mut last = None;
                for q in it {
                    match q.as_rule() {
                        Rule::else_if => {
                            let whole = self.span(&q);
                            // The nested statement starts at its `if`, after `else`.
                            let at_if = q.as_str()[4..].find("if").map(|k| k + 4).unwrap_or(0);
                            let whole = Span::new(self.file, whole.start + at_if, whole.end);
                            let mut e = q.into_inner();
                            let c = self.expr(e.next().expect("cond"));
                            let b = self.body(e.next().expect("body"));
                            branches.push((c, b, whole));
                        }
                        _ => last = Some(self.body(q)),
                    }
                }
                let mut otherwise = last;
                let end = otherwise.as_ref().map(|b| b.span.end).or(branches.last().map(|(_, _, at)| at.end));
                while let Some((c, b, at)) = branches.pop() {
                    let span = Span::new(self.file, at.start, end.unwrap_or(at.end));
                    let s = Stmt::If { cond: c, then: b, otherwise: otherwise.take(), span };
                    otherwise = Some(Body { span: s.span(), stmts: vec![s] });
                }
                Stmt::If { cond, then, otherwise, span }
            }
            Rule::accum_stmt => {
                let name = self.ident(it.next().expect("name"));
                let value = self.expr(it.next().expect("value"));
                Stmt::Accum { name, value, span }
            }
            _ => {
                let mut names = Vec::new();
                let mut value = None;
                for q in it {
                    match q.as_rule() {
                        Rule::ident => names.push(self.ident(q)),
                        _ => value = Some(self.expr(q)),
                    }
                }
                Stmt::Assign { names, value: value.expect("assign value"), span }
            }
        }
    }

    /// `expr [unit]`.
    fn value(&self, p: Pair<Rule>) -> Expr {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let e = self.expr(it.next().expect("expr"));
        match it.next() {
            Some(u) => Expr { kind: ExprKind::Unit(Box::new(e), u.as_str().to_string()), span },
            None => e,
        }
    }

    /// Operator precedence by shunting-yard, with explicit stacks: a chain of
    /// 10⁴ operators must not recurse 10⁴ deep.
    fn expr(&self, p: Pair<Rule>) -> Expr {
        debug_assert_eq!(p.as_rule(), Rule::expr);
        let whole = self.span(&p);
        let mut operands: Vec<(Expr, usize)> = Vec::new();
        let mut ops: Vec<PendingOp> = Vec::new();
        for q in p.into_inner() {
            let infix = match q.as_rule() {
                Rule::neg => {
                    ops.push(PendingOp::Prefix(UnOp::Neg, self.span(&q)));
                    continue;
                }
                Rule::not => {
                    ops.push(PendingOp::Prefix(UnOp::Not, self.span(&q)));
                    continue;
                }
                Rule::pow => BinOp::Pow,
                Rule::add => BinOp::Add,
                Rule::sub => BinOp::Sub,
                Rule::mul => BinOp::Mul,
                Rule::div => BinOp::Div,
                Rule::rem => BinOp::Rem,
                Rule::matmul => BinOp::MatMul,
                Rule::eq => BinOp::Eq,
                Rule::ne => BinOp::Ne,
                Rule::lt => BinOp::Lt,
                Rule::le => BinOp::Le,
                Rule::gt => BinOp::Gt,
                Rule::ge => BinOp::Ge,
                Rule::and => BinOp::And,
                Rule::or => BinOp::Or,
                _ => {
                    operands.push((self.primary(q), 1));
                    continue;
                }
            };
            let p = infix.precedence();
            // `**` is right-associative; the others associate left.
            while ops.last().is_some_and(|top| top.power() > p || (top.power() == p && infix != BinOp::Pow)) {
                let top = ops.pop().expect("checked");
                if !self.apply(top, &mut operands, whole) {
                    return Expr { kind: ExprKind::Name(String::new()), span: whole };
                }
            }
            ops.push(PendingOp::Infix(infix));
        }
        while let Some(top) = ops.pop() {
            if !self.apply(top, &mut operands, whole) {
                return Expr { kind: ExprKind::Name(String::new()), span: whole };
            }
        }
        operands.pop().map(|(e, _)| e).unwrap_or(Expr { kind: ExprKind::Name(String::new()), span: whole })
    }

    /// Pop an operator's operands and push its node; false once the
    /// expression is deeper than the limit (recorded in `too_deep`).
    fn apply(&self, op: PendingOp, operands: &mut Vec<(Expr, usize)>, whole: Span) -> bool {
        let (node, depth) = match op {
            PendingOp::Prefix(u, at) => {
                let Some((rhs, d)) = operands.pop() else { return false };
                let span = at.to(rhs.span);
                (Expr { kind: ExprKind::Unary(u, Box::new(rhs)), span }, d + 1)
            }
            PendingOp::Infix(b) => {
                let (Some((rhs, dr)), Some((lhs, dl))) = (operands.pop(), operands.pop()) else { return false };
                let span = lhs.span.to(rhs.span);
                (Expr { kind: ExprKind::Binary(b, Box::new(lhs), Box::new(rhs)), span }, dl.max(dr) + 1)
            }
        };
        if depth > super::limits::MAX_DEPTH {
            let mut slot = self.too_deep.borrow_mut();
            if slot.is_none() {
                *slot = Some(
                    Diag::error(format!("this expression nests more than {} operators deep", super::limits::MAX_DEPTH))
                        .at(whole, "too deep")
                        .also(node.span, "the limit is reached here")
                        .help(
                            "split the chain into named steps (`a = ...` then `b = a + ...`); see docs/reliability.md",
                        ),
                );
            }
            return false;
        }
        operands.push((node, depth));
        true
    }

    fn primary(&self, p: Pair<Rule>) -> Expr {
        let span = self.span(&p);
        let kind = match p.as_rule() {
            Rule::number => {
                let text = p.as_str().to_string();
                ExprKind::Number { value: number_value(&text), text }
            }
            Rule::string => {
                let s = p.as_str();
                ExprKind::Str(s[1..s.len() - 1].to_string())
            }
            Rule::boolean => ExprKind::Bool(p.as_str() == "true"),
            Rule::ident | Rule::tag => ExprKind::Name(p.as_str().to_string()),
            Rule::expr => return self.expr(p),
            Rule::paren => {
                let mut xs: Vec<Expr> = p.into_inner().map(|e| self.expr(e)).collect();
                if xs.len() == 1 { ExprKind::Paren(Box::new(xs.remove(0))) } else { ExprKind::Tuple(xs) }
            }
            Rule::list => ExprKind::List(p.into_inner().map(|e| self.expr(e)).collect()),
            Rule::repeat_expr => {
                let mut count = None;
                let mut label = None;
                let mut body = None;
                for q in p.into_inner() {
                    match q.as_rule() {
                        Rule::expr => count = Some(self.expr(q)),
                        Rule::ident => label = Some(self.ident(q)),
                        _ => body = Some(self.body(q)),
                    }
                }
                ExprKind::Repeat {
                    count: Box::new(count.expect("repeat count")),
                    label,
                    body: body.expect("repeat body"),
                }
            }
            Rule::call => {
                let mut it = p.into_inner();
                let name = self.ident(it.next().expect("callee"));
                let args = it.map(|a| self.arg(a)).collect();
                ExprKind::Call { name, args }
            }
            r => unreachable!("primary rule {r:?}"),
        };
        Expr { kind, span }
    }

    fn arg(&self, p: Pair<Rule>) -> Arg {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::kwarg => {
                let mut it = p.into_inner();
                let k = self.ident(it.next().expect("key"));
                Arg::Kw(k, self.value(it.next().expect("value")))
            }
            Rule::dim_map => {
                let mut it = p.into_inner();
                let g = |q: Pair<Rule>| -> (Vec<Ident>, bool) {
                    let is_list = q.as_str().trim_start().starts_with('[');
                    (q.into_inner().map(|i| self.ident(i)).collect(), is_list)
                };
                let (from, from_list) = g(it.next().expect("from"));
                let (to, to_list) = g(it.next().expect("to"));
                Arg::DimMap { from, to, from_list, to_list, span }
            }
            _ => Arg::Pos(self.expr(p)),
        }
    }
}

/// The value of a number literal, count suffix applied (K, M, B, T decimal; Ki, Mi, Gi binary).
pub fn number_value(text: &str) -> f64 {
    let (digits, mult) = if let Some(d) = text.strip_suffix("Ki") {
        (d, 1024.0)
    } else if let Some(d) = text.strip_suffix("Mi") {
        (d, 1024.0 * 1024.0)
    } else if let Some(d) = text.strip_suffix("Gi") {
        (d, 1024.0 * 1024.0 * 1024.0)
    } else if let Some(d) = text.strip_suffix('K') {
        (d, 1e3)
    } else if let Some(d) = text.strip_suffix('M') {
        (d, 1e6)
    } else if let Some(d) = text.strip_suffix('B') {
        (d, 1e9)
    } else if let Some(d) = text.strip_suffix('T') {
        (d, 1e12)
    } else {
        (text, 1.0)
    };
    // The grammar only admits valid numbers; be safe anyway.
    digits.parse::<f64>().unwrap_or(f64::NAN) * mult
}

/// Length of `text` without trailing whitespace and comments.
fn trimmed_len(text: &str) -> usize {
    let mut s = text;
    loop {
        s = s.trim_end();
        if s.ends_with("*/")
            && let Some(i) = s.rfind("/*")
        {
            s = &s[..i];
            continue;
        }
        let line_start = s.rfind('\n').map(|i| i + 1).unwrap_or(0);
        match line_comment_start(&s[line_start..]) {
            Some(c) => s = &s[..line_start + c],
            None => return s.len(),
        }
    }
}

/// Where a `//` comment starts on one line, outside string literals.
fn line_comment_start(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    let mut in_str = false;
    for i in 0..b.len() {
        match b[i] {
            b'"' => in_str = !in_str,
            b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr_of(src: &str) -> Expr {
        let text = format!("model m {{ x = {src} }}");
        let f = parse_file(FileId(0), &text).unwrap_or_else(|d| panic!("{src}: {}", d.message));
        let Item::Model(m) = &f.items[0] else { panic!("model") };
        let Stmt::Assign { value, .. } = &m.body.as_ref().expect("body").stmts[0] else { panic!("assign") };
        value.clone()
    }

    #[test]
    fn count_suffixes() {
        assert_eq!(number_value("2K"), 2e3);
        assert_eq!(number_value("375M"), 375e6);
        assert_eq!(number_value("1.5B"), 1.5e9);
        assert_eq!(number_value("2T"), 2e12);
        assert_eq!(number_value("4Ki"), 4096.0);
        assert_eq!(number_value("4Mi"), 4.0 * 1024.0 * 1024.0);
        assert_eq!(number_value("1e-5"), 1e-5);
    }

    #[test]
    fn precedence_and_associativity() {
        use crate::syntax::printer::expr as show;
        // `**` binds tighter than unary minus and is right-associative.
        let e = expr_of("-2 ** 3 ** 2");
        let ExprKind::Unary(UnOp::Neg, inner) = &e.kind else { panic!("{e:?}") };
        let ExprKind::Binary(BinOp::Pow, _, rhs) = &inner.kind else { panic!("{inner:?}") };
        assert!(matches!(rhs.kind, ExprKind::Binary(BinOp::Pow, ..)));
        // `@` and `*` share a level and associate left.
        let e = expr_of("a * b @ c + d");
        let ExprKind::Binary(BinOp::Add, l, _) = &e.kind else { panic!() };
        let ExprKind::Binary(BinOp::MatMul, ll, _) = &l.kind else { panic!() };
        assert!(matches!(ll.kind, ExprKind::Binary(BinOp::Mul, ..)));
        // Printing keeps the meaning with the fewest parentheses.
        assert_eq!(show(&expr_of("(a + b) * c")), "(a + b) * c");
        assert_eq!(show(&expr_of("layer % 2 == 1 && layer > 0")), "layer % 2 == 1 && layer > 0");
    }

    #[test]
    fn dim_maps_and_keywords() {
        let e = expr_of("merge(x, [heads, head_dim] -> embed)");
        let ExprKind::Call { args, .. } = &e.kind else { panic!() };
        assert!(matches!(&args[1], Arg::DimMap { from, from_list: true, to_list: false, .. } if from.len() == 2));
        let e = expr_of("attention(q, k, v, causal = true)");
        let ExprKind::Call { args, .. } = &e.kind else { panic!() };
        assert!(matches!(&args[3], Arg::Kw(k, _) if k.name == "causal"));
    }

    #[test]
    fn units_in_sections_and_tags() {
        let f = parse_file(
            FileId(0),
            "train { batch = 1536 sequences\n steps = 10 }\nparallel { pipeline { schedule = 1f1b } }",
        )
        .expect("parses");
        let Item::Section(s) = &f.items[0] else { panic!() };
        assert_eq!(s.entries.len(), 2, "a unit word does not swallow the next key");
        let Entry::Value { value, .. } = &s.entries[0] else { panic!() };
        assert!(matches!(&value.kind, ExprKind::Unit(_, u) if u == "sequences"));
    }

    #[test]
    fn parse_errors_point_at_the_token() {
        let src = "model m {\n  x = = 1\n}";
        let d = parse_file(FileId(0), src).expect_err("syntax error");
        let span = d.primary_span().expect("located");
        assert_eq!(&src[span.start..span.end], "=");
        assert_eq!(span.start, src.find("= =").unwrap() + 2);
        assert!(d.message.contains("expected an expression"), "{}", d.message);
    }

    #[test]
    fn spans_exclude_trailing_comments() {
        assert_eq!(trimmed_len("x = 1  // one\n  "), 5);
        assert_eq!(trimmed_len("s = \"a//b\""), 10);
        assert_eq!(trimmed_len("y /* c */ \n"), 1);
    }
}
