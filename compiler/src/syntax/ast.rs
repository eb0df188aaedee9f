//! The abstract syntax tree of one `.spec` file.
//!
//! Every node carries a [`Span`] into its source file. The AST is what the
//! text says, nothing more: names are unresolved and constants unevaluated.

use super::span::Span;

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Use(Use),
    Block(BlockDef),
    Model(ModelDef),
    Weights(WeightsDef),
    Section(Section),
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Use(u) => u.span,
            Item::Block(b) => b.span,
            Item::Model(m) => m.span,
            Item::Weights(w) => w.span,
            Item::Section(s) => s.span,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Use {
    pub path: String,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockDef {
    pub name: Ident,
    pub params: Vec<BlockParam>,
    pub ret: Option<TypeExpr>,
    pub body: Body,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BlockParam {
    /// A tensor input: `x: f32[batch, seq, embed]`.
    Tensor { name: Ident, ty: TypeExpr },
    /// A constant with a default: `causal = true`.
    Const { name: Ident, default: Expr },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelDef {
    pub name: Ident,
    /// `model b = a with { ... }`: the base model and the overridden dims.
    pub base: Option<(Ident, Vec<DimDef>)>,
    pub body: Option<Body>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DimDef {
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TypeExpr {
    pub dtype: Option<(DType, Span)>,
    pub dims: Vec<DimEntry>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DimEntry {
    /// `...`: any number of leading dims (block signatures only).
    Ellipsis(Span),
    /// `embed`, or `qkv = 3` which also declares a local dim.
    Named { name: Ident, size: Option<Expr> },
}

pub use crate::ir::types::DType;

#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    Dims(Vec<DimDef>, Span),
    Input { name: Ident, ty: TypeExpr, span: Span },
    Param { name: Ident, ty: TypeExpr, init: Option<Expr>, span: Span },
    Return(Expr, Span),
    If { cond: Expr, then: Body, otherwise: Option<Body>, span: Span },
    Accum { name: Ident, value: Expr, span: Span },
    Assign { names: Vec<Ident>, value: Expr, span: Span },
}

impl Stmt {
    pub fn span(&self) -> Span {
        match self {
            Stmt::Dims(_, s)
            | Stmt::Input { span: s, .. }
            | Stmt::Param { span: s, .. }
            | Stmt::Return(_, s)
            | Stmt::If { span: s, .. }
            | Stmt::Accum { span: s, .. }
            | Stmt::Assign { span: s, .. } => *s,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Pow,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    MatMul,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Pow => "**",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::MatMul => "@",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }

    /// Binding power, higher binds tighter (used by the printer to place parentheses).
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 3,
            BinOp::Add | BinOp::Sub => 4,
            BinOp::Mul | BinOp::Div | BinOp::Rem | BinOp::MatMul => 5,
            BinOp::Pow => 7,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

impl UnOp {
    /// Binding power of `-x` and `!x`: tighter than `*`, looser than `**`
    /// (`-2 ** 2` is `-(2 ** 2)`), on [`BinOp::precedence`]'s scale.
    pub const PRECEDENCE: u8 = 6;
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// A number literal; `text` keeps the spelling (suffix included) for the printer.
    Number {
        value: f64,
        text: String,
    },
    Str(String),
    Bool(bool),
    Name(String),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call {
        name: Ident,
        args: Vec<Arg>,
    },
    Tuple(Vec<Expr>),
    List(Vec<Expr>),
    Paren(Box<Expr>),
    Repeat {
        count: Box<Expr>,
        label: Option<Ident>,
        body: Body,
    },
    /// A value with a unit word: `375M tokens`, `1536 sequences` (section values and keyword arguments).
    Unit(Box<Expr>, String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Pos(Expr),
    Kw(Ident, Expr),
    /// `a -> b`, `[a, b] -> c`, `c -> [a, b]`.
    DimMap {
        from: Vec<Ident>,
        to: Vec<Ident>,
        from_list: bool,
        to_list: bool,
        span: Span,
    },
}

impl Arg {
    pub fn span(&self) -> Span {
        match self {
            Arg::Pos(e) => e.span,
            Arg::Kw(k, e) => k.span.to(e.span),
            Arg::DimMap { span, .. } => *span,
        }
    }
}

/// `weights FORMAT for MODEL { config { ... } "name" = path[picks] [layout] ... }`:
/// how a model's parameters map to a published checkpoint's tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsDef {
    /// The checkpoint format this mapping names (`hf`, `gguf`, ...).
    pub format: Ident,
    /// The models it maps (`for a, b`): their parameters share the paths it names.
    pub models: Vec<Ident>,
    /// `config { key = value }`: the checkpoint's `config.json`.
    pub config: Option<Section>,
    pub rules: Vec<WeightRule>,
    pub span: Span,
}

/// `"h.{layer}.attn.c_attn.weight" = layers.gpt_layer.self_attention.wqkv [embed, (qkv, heads, head_dim)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightRule {
    /// The checkpoint's tensor name, without quotes; `{layer}` stands for a
    /// stacked parameter's layer index.
    pub name: String,
    pub name_span: Span,
    /// The parameter path; `_` alone: the tensor is not a parameter (ignored).
    pub path: Vec<Ident>,
    /// `[dim = index, ...]`: the slice of the parameter this tensor holds.
    pub picks: Vec<(Ident, Expr)>,
    /// The checkpoint tensor's dims, outermost first.
    pub layout: Option<Vec<LayoutGroup>>,
    pub span: Span,
}

/// One or more dims of a checkpoint tensor's layout.
#[derive(Debug, Clone, PartialEq)]
pub enum LayoutGroup {
    /// One checkpoint dim: a dim of the parameter, or a group `(a, b)` of
    /// them flattened outermost first; `rope(d)` marks a rotary dim stored
    /// as two halves (Hugging Face's LLaMA layout).
    Dims(Vec<LayoutAtom>),
    /// `1`: a checkpoint dim of size 1 the parameter does not have.
    Unit(Span),
    /// `d: (a, b, c)`: one dim of the parameter stored as several
    /// checkpoint dims of those sizes, outermost first (a convolution's
    /// `[out, channels, kh, kw]` for a flat patch dim).
    Split { dim: Ident, sizes: Vec<Expr> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayoutAtom {
    pub dim: Ident,
    pub rope: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub name: Ident,
    pub entries: Vec<Entry>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// `key = value` (the value may carry a unit: `375M tokens`).
    Value { key: Ident, value: Expr, span: Span },
    /// `key { ... }`.
    Sub(Section),
    /// `dim -> axis` (layout rules).
    Rule { dim: Ident, axis: Ident, span: Span },
}

impl Entry {
    pub fn span(&self) -> Span {
        match self {
            Entry::Value { span, .. } | Entry::Rule { span, .. } => *span,
            Entry::Sub(s) => s.span,
        }
    }

    pub fn key(&self) -> &Ident {
        match self {
            Entry::Value { key, .. } => key,
            Entry::Sub(s) => &s.name,
            Entry::Rule { dim, .. } => dim,
        }
    }
}
