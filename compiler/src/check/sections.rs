//! The `parallel`, `train` and `infer` sections: a closed schema. Every key,
//! option and value kind is checked here; an unknown one gets a "did you mean".

use crate::config::*;
use crate::diag::{Diag, unknown_help};
use crate::syntax::ast::{Arg, BinOp, Entry, Expr, ExprKind, Section, UnOp};
use crate::syntax::span::Span;
use std::collections::HashMap;

pub const SECTIONS: &[&str] = &["parallel", "train", "infer"];
const PARALLEL_KEYS: &[&str] = &[
    "mesh",
    "layout",
    "world",
    "pipeline",
    "zero",
    "bucket",
    "sequence_parallel",
    "recompute",
    "precision",
    "experts",
];
const PIPELINE_KEYS: &[&str] = &["schedule", "microbatches", "virtual"];
const EXPERT_KEYS: &[&str] = &["count", "top_k", "capacity", "placement"];
const TRAIN_KEYS: &[&str] = &[
    "optimizer",
    "schedule",
    "batch",
    "batch_rampup",
    "micro_batch",
    "steps",
    "tokens",
    "clip",
    "precision",
    "device",
    "data",
    "eval_interval",
    "eval_steps",
    "save_interval",
    "log_interval",
    "val_fraction",
    "tokenizer",
    "seed",
    "nonfinite",
    "loss_scale",
    "loss_scale_window",
    "loss_scale_min",
    "loss_scale_hysteresis",
    "freeze",
    "lora",
];
const LORA_KEYS: &[&str] = &["rank", "alpha", "targets"];
const INFER_KEYS: &[&str] = &["max_batch", "max_len", "kv_cache", "sampling", "seed"];

/// Every section and subsection with its closed list of keys (`mesh` and
/// `layout` are open: axis and dim names).
pub fn schema() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("parallel", PARALLEL_KEYS),
        ("parallel.pipeline", PIPELINE_KEYS),
        ("parallel.experts", EXPERT_KEYS),
        ("train", TRAIN_KEYS),
        ("train.lora", LORA_KEYS),
        ("infer", INFER_KEYS),
    ]
}

/// Evaluates section values; model constants are in scope.
pub struct SectionEval<'a> {
    pub consts: &'a HashMap<String, f64>,
    pub diags: Vec<Diag>,
}

impl SectionEval<'_> {
    fn err(&mut self, d: Diag) {
        self.diags.push(d);
    }

    pub fn num(&mut self, e: &Expr) -> Option<f64> {
        let v = match &e.kind {
            ExprKind::Number { value, .. } => *value,
            ExprKind::Paren(x) => self.num(x)?,
            ExprKind::Name(n) if n.starts_with(|c: char| c.is_ascii_digit()) => {
                self.err(Diag::error(format!("`{n}` is not a number")).at(e.span, "not a number").help(
                    "numbers are digits with an optional exponent and suffix: K, M, B, T (decimal) or Ki, Mi, Gi (binary), e.g. `2K`, `1.5B`, `4Mi`",
                ));
                return None;
            }
            ExprKind::Name(n) => match self.consts.get(n) {
                Some(v) => *v,
                None => {
                    let mut names: Vec<&str> =
                        self.consts.keys().map(String::as_str).filter(|k| *k != "dropless").collect();
                    names.sort();
                    let help = unknown_help("constant", n, names.iter().copied());
                    self.err(
                        Diag::error(format!("expected a number, found `{n}`"))
                            .at(e.span, "not a number or model constant")
                            .help(help),
                    );
                    return None;
                }
            },
            ExprKind::Unary(UnOp::Neg, x) => -self.num(x)?,
            ExprKind::Binary(op, a, b) => {
                let (x, y) = (self.num(a)?, self.num(b)?);
                match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div if y != 0.0 => x / y,
                    BinOp::Pow => x.powf(y),
                    BinOp::Rem if y != 0.0 => x.rem_euclid(y),
                    BinOp::Div | BinOp::Rem => {
                        let divisor = crate::syntax::printer::expr(b);
                        self.err(
                            Diag::error(format!("division by zero: `{divisor}` is 0"))
                                .at(b.span, "this is 0")
                                .also(e.span, "in this division")
                                .help(format!(
                                    "give `{divisor}` a value other than 0 (check the dims it uses, `--set` overrides included)"
                                )),
                        );
                        return None;
                    }
                    _ => {
                        self.err(
                            Diag::error(format!("`{}` is not allowed here", op.symbol()))
                                .at(e.span, "invalid arithmetic")
                                .help("use + - * / % ** on numbers"),
                        );
                        return None;
                    }
                }
            }
            ExprKind::Call { name, args } if matches!(name.name.as_str(), "sqrt" | "log" | "exp" | "min" | "max") => {
                let mut xs = Vec::new();
                for a in args {
                    let Arg::Pos(x) = a else {
                        self.err(
                            Diag::error("keyword argument in arithmetic").at(a.span(), "here").help("pass numbers"),
                        );
                        return None;
                    };
                    xs.push(self.num(x)?);
                }
                match (name.name.as_str(), xs.as_slice()) {
                    ("sqrt", [x]) => x.sqrt(),
                    ("log", [x]) => x.ln(),
                    ("exp", [x]) => x.exp(),
                    ("min", [_, ..]) => xs.iter().copied().fold(f64::INFINITY, f64::min),
                    ("max", [_, ..]) => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    _ => {
                        self.err(
                            Diag::error(format!("wrong arguments to `{}`", name.name))
                                .at(e.span, "here")
                                .help("sqrt, log and exp take one number; min and max several"),
                        );
                        return None;
                    }
                }
            }
            ExprKind::Unit(x, u) => {
                self.err(
                    Diag::error(format!("unit `{u}` is not expected here"))
                        .at(e.span, "unexpected unit")
                        .help("give a plain number"),
                );
                return self.num(x);
            }
            _ => {
                self.err(
                    Diag::error("expected a number")
                        .at(e.span, "not a number")
                        .help("give a number, a model constant, or arithmetic on them"),
                );
                return None;
            }
        };
        if !v.is_finite() {
            self.err(
                Diag::error("this value is not a finite number").at(e.span, "not finite").help("check the arithmetic"),
            );
            return None;
        }
        Some(v)
    }

    pub fn count(&mut self, e: &Expr, what: &str) -> Option<u64> {
        let v = self.num(e)?;
        if v.fract() != 0.0 || !(1.0..=1e12).contains(&v) {
            self.err(
                Diag::error(format!("`{what}` must be a positive whole number, got {v}"))
                    .at(e.span, "not a positive whole number")
                    .help(format!("give `{what}` a value like 1, 2, 8")),
            );
            return None;
        }
        Some(v as u64)
    }

    fn nonneg(&mut self, e: &Expr, what: &str) -> Option<f64> {
        let v = self.num(e)?;
        if v < 0.0 {
            self.err(
                Diag::error(format!("`{what}` must not be negative, got {v}"))
                    .at(e.span, "negative")
                    .help(format!("give `{what}` a value ≥ 0")),
            );
            return None;
        }
        Some(v)
    }

    fn word(&mut self, e: &Expr, what: &str, options: &[&str]) -> Option<String> {
        match &e.kind {
            ExprKind::Name(n) if options.contains(&n.as_str()) => Some(n.clone()),
            ExprKind::Name(n) => {
                let help = unknown_help(what, n, options.iter().copied());
                self.err(Diag::error(format!("unknown {what} `{n}`")).at(e.span, format!("not a {what}")).help(help));
                None
            }
            _ => {
                self.err(Diag::error(format!("expected a {what}")).at(e.span, "not a name").help(unknown_help(
                    what,
                    "",
                    options.iter().copied(),
                )));
                None
            }
        }
    }

    fn boolean(&mut self, e: &Expr, what: &str) -> Option<bool> {
        match &e.kind {
            ExprKind::Bool(b) => Some(*b),
            _ => {
                self.err(
                    Diag::error(format!("`{what}` must be true or false"))
                        .at(e.span, "not a boolean")
                        .help(format!("{what} = true")),
                );
                None
            }
        }
    }

    fn string(&mut self, e: &Expr, what: &str) -> Option<String> {
        match &e.kind {
            ExprKind::Str(s) => Some(s.clone()),
            _ => {
                self.err(
                    Diag::error(format!("`{what}` must be a string"))
                        .at(e.span, "not a string")
                        .help(format!("{what} = \"data/input.txt\"")),
                );
                None
            }
        }
    }

    fn precision(&mut self, e: &Expr) -> Option<Precision> {
        let w = self.word(e, "precision", &["fp32", "bf16", "fp16", "f32", "f16"])?;
        Precision::parse(&w)
    }

    /// An amount with a unit: `375M tokens`, `2000 steps` (plain numbers are steps).
    fn amount(&mut self, e: &Expr) -> Option<Amount> {
        match &e.kind {
            ExprKind::Unit(x, u) => {
                let v = self.nonneg(x, "amount")?;
                match u.as_str() {
                    "tokens" => Some(Amount::Tokens(v)),
                    "steps" => Some(Amount::Steps(v)),
                    other => {
                        self.err(
                            Diag::error(format!("unit `{other}` is not an amount of training"))
                                .at(e.span, "wrong unit")
                                .help("use `steps` or `tokens`"),
                        );
                        None
                    }
                }
            }
            _ => self.nonneg(e, "amount").map(Amount::Steps),
        }
    }
}

/// Check a section's keys against a closed list; returns the entries by key.
/// `lora { rank = 8, alpha = 16, targets = ["*.wq", "*.wv"] }`.
fn lora(ev: &mut SectionEval, e: &Entry) -> Option<Lora> {
    let Entry::Sub(sub) = e else {
        ev.err(
            Diag::error("`lora` is a subsection")
                .at(e.span(), "a value")
                .help("lora { rank = 8, alpha = 16, targets = [\"*.wq\", \"*.wv\"] }"),
        );
        return None;
    };
    let (mut rank, mut alpha, mut targets) = (None, None, None);
    for (k, e) in keyed(ev, sub, LORA_KEYS) {
        let Some(v) = value(ev, e, k) else { continue };
        match k {
            "rank" => rank = ev.count(v, "rank"),
            "alpha" => alpha = ev.nonneg(v, "alpha"),
            _ => targets = patterns(ev, v, "targets"),
        }
    }
    let Some(targets) = targets else {
        ev.err(
            Diag::error("`lora` names no `targets`").at(sub.name.span, "which parameters get adapters?").help(
                "targets = [\"*.wq\", \"*.wv\"] (patterns of parameter paths; `tessera inspect SPEC` lists them)",
            ),
        );
        return None;
    };
    let rank = rank?;
    Some(Lora { rank, alpha: alpha.unwrap_or(rank as f64), targets })
}

/// A string or a list of strings: patterns of parameter paths.
fn patterns(ev: &mut SectionEval, v: &Expr, what: &str) -> Option<Vec<String>> {
    let one = |ev: &mut SectionEval, e: &Expr| match &e.kind {
        ExprKind::Str(s) if !s.is_empty() => Some(s.clone()),
        _ => {
            ev.err(
                Diag::error(format!("`{what}` takes patterns of parameter paths, as strings"))
                    .at(e.span, "not a string")
                    .help(format!("{what} = [\"wte\", \"layers.*.wq\"] (`*` stands for any text)")),
            );
            None
        }
    };
    match &v.kind {
        ExprKind::List(xs) => xs.iter().map(|x| one(ev, x)).collect(),
        _ => one(ev, v).map(|s| vec![s]),
    }
}

fn keyed<'e>(ev: &mut SectionEval, s: &'e Section, keys: &[&str]) -> Vec<(&'e str, &'e Entry)> {
    let mut out: Vec<(&str, &Entry)> = Vec::new();
    for e in &s.entries {
        let k = e.key();
        if !keys.contains(&k.name.as_str()) {
            let help = unknown_help("key", &k.name, keys.iter().copied());
            let where_ = format!("`{}`", s.name.name);
            ev.err(Diag::error(format!("unknown key `{}` in {where_}", k.name)).at(k.span, "unknown key").help(help));
            continue;
        }
        if let Some((_, first)) = out.iter().find(|(n, _)| *n == k.name) {
            ev.err(
                Diag::error(format!("`{}` is set twice", k.name))
                    .at(k.span, "second setting")
                    .also(first.span(), "first set here")
                    .help("remove one of them"),
            );
            continue;
        }
        out.push((k.name.as_str(), e));
    }
    out
}

fn value<'e>(ev: &mut SectionEval, e: &'e Entry, key: &str) -> Option<&'e Expr> {
    match e {
        Entry::Value { value, .. } => Some(value),
        other => {
            ev.err(
                Diag::error(format!("`{key}` takes a value"))
                    .at(other.span(), "expected `key = value`")
                    .help(format!("write `{key} = ...`")),
            );
            None
        }
    }
}

fn sub<'e>(ev: &mut SectionEval, e: &'e Entry, key: &str) -> Option<&'e Section> {
    match e {
        Entry::Sub(s) => Some(s),
        other => {
            ev.err(
                Diag::error(format!("`{key}` is a group of settings"))
                    .at(other.span(), "expected `{ ... }`")
                    .help(format!("write `{key} {{ ... }}`")),
            );
            None
        }
    }
}

/// Spans of parallel settings, for layout diagnostics.
#[derive(Default, Clone)]
pub struct ParallelSpans {
    pub section: Option<Span>,
    pub mesh: HashMap<String, Span>,
    pub rules: HashMap<String, Span>,
    pub world: Option<(u64, Span)>,
    pub schedule: Option<Span>,
    pub microbatches: Option<Span>,
    pub virtual_stages: Option<Span>,
    pub placement: Option<Span>,
    pub sequence_parallel: Option<Span>,
    pub zero: Option<Span>,
}

pub fn parallel(ev: &mut SectionEval, s: Option<&Section>) -> (Parallel, ParallelSpans) {
    let mut p = Parallel::default();
    let mut spans = ParallelSpans::default();
    let Some(s) = s else { return (p, spans) };
    spans.section = Some(s.name.span);
    let mut schedule_given = false;
    for (k, e) in keyed(ev, s, PARALLEL_KEYS) {
        match k {
            "mesh" => {
                let Some(m) = sub(ev, e, k) else { continue };
                for me in &m.entries {
                    let Entry::Value { key, value, .. } = me else {
                        ev.err(
                            Diag::error("mesh entries are `axis = size`")
                                .at(me.span(), "here")
                                .help("mesh { data = 8, tensor = 8, pipeline = 16 }"),
                        );
                        continue;
                    };
                    if p.mesh.iter().any(|(a, _)| a == &key.name) {
                        ev.err(
                            Diag::error(format!("mesh axis `{}` is declared twice", key.name))
                                .at(key.span, "again")
                                .help("declare each axis once"),
                        );
                        continue;
                    }
                    if let Some(n) = ev.count(value, &format!("mesh.{}", key.name)) {
                        p.mesh.push((key.name.clone(), n));
                        spans.mesh.insert(key.name.clone(), key.span);
                    }
                }
            }
            "layout" => {
                let Some(l) = sub(ev, e, k) else { continue };
                for le in &l.entries {
                    match le {
                        Entry::Rule { dim, axis, span } => {
                            if let Some(old) = spans.rules.get(&dim.name) {
                                ev.err(
                                    Diag::error(format!("dim `{}` is laid out twice", dim.name))
                                        .at(*span, "second rule")
                                        .also(*old, "first rule")
                                        .help("a dim maps to at most one mesh axis"),
                                );
                                continue;
                            }
                            p.layout.push((dim.name.clone(), axis.name.clone()));
                            spans.rules.insert(dim.name.clone(), *span);
                        }
                        Entry::Value { key, value: Expr { kind: ExprKind::Name(axis), .. }, span } => {
                            // `dim = axis` (what `--set parallel.layout.heads=tensor` writes).
                            p.layout.push((key.name.clone(), axis.clone()));
                            spans.rules.insert(key.name.clone(), *span);
                        }
                        other => ev.err(
                            Diag::error("layout entries are `dim -> axis`")
                                .at(other.span(), "here")
                                .help("layout { heads -> tensor, batch -> data }"),
                        ),
                    }
                }
            }
            "world" => {
                if let Some(v) = value(ev, e, k)
                    && let Some(n) = ev.count(v, "world")
                {
                    spans.world = Some((n, v.span));
                }
            }
            "pipeline" => {
                let Some(ps) = sub(ev, e, k) else { continue };
                for (pk, pe) in keyed(ev, ps, PIPELINE_KEYS) {
                    let Some(v) = value(ev, pe, pk) else { continue };
                    match pk {
                        "schedule" => {
                            if let Some(w) = ev.word(v, "schedule", Schedule::NAMES) {
                                p.pipeline.schedule = Schedule::parse(&w).expect("listed");
                                schedule_given = true;
                                spans.schedule = Some(v.span);
                            }
                        }
                        "microbatches" => {
                            if let Some(n) = ev.count(v, "microbatches") {
                                p.pipeline.microbatches = n;
                                spans.microbatches = Some(v.span);
                            }
                        }
                        _ => {
                            if let Some(n) = ev.count(v, "virtual") {
                                p.pipeline.virtual_stages = n;
                                spans.virtual_stages = Some(v.span);
                            }
                        }
                    }
                }
            }
            "zero" => {
                if let Some(v) = value(ev, e, k)
                    && let Some(z) = ev.num(v)
                {
                    if ![0.0, 1.0, 2.0, 3.0].contains(&z) {
                        ev.err(
                            Diag::error(format!("ZeRO stage must be 0, 1, 2 or 3, got {z}"))
                                .at(v.span, "no such stage")
                                .help("1 shards optimizer states, 2 also gradients, 3 also parameters"),
                        );
                    } else {
                        p.zero = z as u8;
                        spans.zero = Some(v.span);
                    }
                }
            }
            "bucket" => {
                if let Some(v) = value(ev, e, k)
                    && let Some(n) = ev.count(v, "bucket")
                {
                    p.bucket = n;
                }
            }
            "sequence_parallel" => {
                if let Some(v) = value(ev, e, k)
                    && let Some(b) = ev.boolean(v, k)
                {
                    p.sequence_parallel = b;
                    spans.sequence_parallel = Some(v.span);
                }
            }
            "recompute" => {
                if let Some(v) = value(ev, e, k)
                    && let Some(w) = ev.word(v, "recompute policy", Recompute::NAMES)
                {
                    p.recompute = Recompute::parse(&w).expect("listed");
                }
            }
            "precision" => {
                if let Some(v) = value(ev, e, k) {
                    p.precision = ev.precision(v);
                }
            }
            _ => {
                // experts: count/top_k/capacity were applied to the model's dims already.
                let Some(xs) = sub(ev, e, k) else { continue };
                for (xk, xe) in keyed(ev, xs, EXPERT_KEYS) {
                    if xk != "placement" {
                        continue;
                    }
                    let Some(v) = value(ev, xe, xk) else { continue };
                    spans.placement = Some(v.span);
                    let placement = match &v.kind {
                        ExprKind::List(ranks) => {
                            let mut out = Vec::new();
                            for r in ranks {
                                let ExprKind::List(ids) = &r.kind else {
                                    ev.err(
                                        Diag::error("explicit placement lists the experts of each rank")
                                            .at(r.span, "expected a list")
                                            .help("placement = [[0, 1], [2, 3]]"),
                                    );
                                    continue;
                                };
                                let mut rank = Vec::new();
                                for id in ids {
                                    if let Some(n) = ev.num(id) {
                                        if n.fract() != 0.0 || n < 0.0 {
                                            ev.err(
                                                Diag::error(format!("expert id {n} is not a whole number ≥ 0"))
                                                    .at(id.span, "bad id")
                                                    .help("experts are numbered from 0"),
                                            );
                                        } else {
                                            rank.push(n as u64);
                                        }
                                    }
                                }
                                out.push(rank);
                            }
                            Some(ExpertPlacement::Explicit { ranks: out })
                        }
                        _ => ev.word(v, "placement", &["blocked", "round_robin"]).map(|w| {
                            if w == "blocked" { ExpertPlacement::Blocked } else { ExpertPlacement::RoundRobin }
                        }),
                    };
                    if let Some(pl) = placement {
                        p.experts = Some(Experts { placement: pl });
                    }
                }
                if p.experts.is_none() {
                    p.experts = Some(Experts { placement: ExpertPlacement::Blocked });
                }
            }
        }
    }
    if !schedule_given && p.pipeline.virtual_stages > 1 {
        p.pipeline.schedule = Schedule::Interleaved1f1b;
    }
    (p, spans)
}

/// The expert settings that configure model constants: key → model constant.
pub const EXPERT_CONSTS: &[(&str, &str)] = &[("count", "expert"), ("top_k", "top_k"), ("capacity", "capacity")];

pub fn train(ev: &mut SectionEval, s: &Section, seq: u64) -> Option<Train> {
    let mut t = Train {
        optimizer: Optimizer::Adamw { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        schedule: LrSchedule::Constant { warmup: Amount::Steps(0.0) },
        batch: 1,
        micro_batch: None,
        length: None,
        clip: None,
        precision: Precision::Fp32,
        device: None,
        data: None,
        eval_interval: None,
        eval_steps: None,
        save_interval: None,
        log_interval: None,
        val_fraction: None,
        tokenizer: None,
        seed: 0,
        skip_nonfinite: false,
        loss_scale: Default::default(),
        freeze: Vec::new(),
        lora: None,
        rampup: None,
    };
    // Where loss scaling is set: it applies to `precision = fp16` only.
    let mut scaling_at = None;
    let before = ev.diags.len();
    let mut batch_given = false;
    let mut schedule_given = false;
    let mut rampup_at = None;
    for (k, e) in keyed(ev, s, TRAIN_KEYS) {
        if k == "lora" {
            t.lora = lora(ev, e);
            continue;
        }
        let Some(v) = value(ev, e, k) else { continue };
        match k {
            "optimizer" => {
                if let Some(o) = optimizer(ev, v) {
                    t.optimizer = o;
                }
            }
            "schedule" => {
                schedule_given = true;
                if let Some(sc) = lr_schedule(ev, v) {
                    t.schedule = sc;
                }
            }
            "batch" => {
                batch_given = true;
                if let Some(n) = sequences(ev, v, seq, "batch") {
                    t.batch = n;
                }
            }
            "batch_rampup" => {
                rampup_at = Some(v.span);
                t.rampup = rampup(ev, v, seq);
            }
            "micro_batch" => t.micro_batch = ev.count(v, k),
            "steps" => t.length = ev.count(v, k).map(|n| Amount::Steps(n as f64)),
            "tokens" => {
                let x = match &v.kind {
                    ExprKind::Unit(x, u) if u == "tokens" => x.as_ref(),
                    _ => v,
                };
                t.length = ev.nonneg(x, k).map(Amount::Tokens);
            }
            "clip" => t.clip = ev.nonneg(v, k),
            "precision" => {
                if let Some(p) = ev.precision(v) {
                    t.precision = p;
                }
            }
            "device" => {
                let names: Vec<&str> = crate::device::devices().iter().map(|d| d.name.as_str()).collect();
                t.device = ev.word(v, "device", &names);
                // A profile the user meant to add may have failed to load.
                let problems = crate::device::errors();
                if t.device.is_none() && !problems.is_empty() {
                    ev.err(
                        Diag::error("some device profiles in TESSERA_DEVICES did not load")
                            .at(v.span, "not a known device")
                            .note(problems.join("\n"))
                            .help("fix the profile files (format: compiler/devices/*.toml)"),
                    );
                }
            }
            "data" => t.data = ev.string(v, k),
            "eval_interval" => t.eval_interval = ev.count(v, k),
            "eval_steps" => t.eval_steps = ev.count(v, k),
            "save_interval" => t.save_interval = ev.count(v, k),
            "log_interval" => t.log_interval = ev.count(v, k),
            "val_fraction" => {
                if let Some(f) = ev.num(v) {
                    if f > 0.0 && f < 1.0 {
                        t.val_fraction = Some(f);
                    } else {
                        ev.err(
                            Diag::error(format!("`val_fraction` must be between 0 and 1, got {f}"))
                                .at(v.span, "out of range")
                                .help("for example 0.1"),
                        );
                    }
                }
            }
            "tokenizer" => {
                t.tokenizer = match &v.kind {
                    ExprKind::Str(path) if path.ends_with(".json") || path.ends_with(".gguf") => Some(path.clone()),
                    ExprKind::Str(path) => {
                        ev.err(
                            Diag::error(format!("`{path}` is neither a tokenizer.json nor a .gguf"))
                                .at(v.span, "a tokenizer file")
                                .help("give the path of a model's tokenizer.json or GGUF file, or `bytes` or `gpt2`"),
                        );
                        None
                    }
                    _ => ev.word(v, "tokenizer", &["bytes", "gpt2"]),
                }
            }
            "freeze" => t.freeze = patterns(ev, v, "freeze").unwrap_or_default(),
            "nonfinite" => t.skip_nonfinite = ev.word(v, "nonfinite", &["stop", "skip"]).as_deref() == Some("skip"),
            "loss_scale" => {
                scaling_at = Some(v.span);
                match ev.nonneg(v, k) {
                    Some(x) if x >= 1.0 => t.loss_scale.initial = x,
                    Some(x) => ev.err(
                        Diag::error(format!("`loss_scale` must be 1 or more, got {x}"))
                            .at(v.span, "too small")
                            .help("the usual start is 65536 (2^16); the scale halves on its own where it overflows"),
                    ),
                    None => {}
                }
            }
            "loss_scale_window" => {
                scaling_at = Some(v.span);
                if let Some(n) = ev.count(v, k) {
                    t.loss_scale.window = n;
                }
            }
            "loss_scale_min" => {
                scaling_at = Some(v.span);
                match ev.nonneg(v, k) {
                    Some(x) if x > 0.0 => t.loss_scale.min = x,
                    Some(x) => ev.err(
                        Diag::error(format!("`loss_scale_min` must be positive, got {x}"))
                            .at(v.span, "not positive")
                            .help("the default is 1; Megatron's is 1 as well"),
                    ),
                    None => {}
                }
            }
            "loss_scale_hysteresis" => {
                scaling_at = Some(v.span);
                if let Some(n) = ev.count(v, k) {
                    t.loss_scale.hysteresis = n;
                }
            }
            _ => t.seed = ev.nonneg(v, k).map(|x| x as u64).unwrap_or(0),
        }
    }
    if let Some(span) = scaling_at
        && t.precision != Precision::Fp16
    {
        ev.err(
            Diag::error("loss scaling applies to `precision = fp16` only")
                .at(span, "no loss is scaled in this run")
                .help("set `precision = fp16` in `train`, or remove the `loss_scale` settings"),
        );
    }
    if t.loss_scale.min > t.loss_scale.initial
        && let Some(span) = scaling_at
    {
        ev.err(
            Diag::error(format!(
                "`loss_scale_min` ({}) is above the first scale, `loss_scale` ({})",
                t.loss_scale.min, t.loss_scale.initial
            ))
            .at(span, "the scale would start below its floor")
            .help("lower `loss_scale_min`, or raise `loss_scale`"),
        );
    }
    if let Some((r, span)) = t.rampup.as_ref().zip(rampup_at)
        && (r.start >= t.batch || !(t.batch - r.start).is_multiple_of(r.increment))
    {
        ev.err(
            Diag::error(format!(
                "the batch ramp-up from {} by {} sequences does not end at the batch, {}",
                r.start, r.increment, t.batch
            ))
            .at(span, "does not reach the batch")
            .help("start below the batch, with batch − start a multiple of the increment (as Megatron requires)"),
        );
    }
    // Adafactor's relative step: min(10⁻², 1/√t) with the default lr.
    if matches!(t.optimizer, Optimizer::Adafactor { .. }) && !schedule_given {
        t.schedule = LrSchedule::InverseSqrt { warmup: Amount::Steps(10_000.0), linear_warmup: false };
    }
    if !batch_given {
        ev.err(
            Diag::error("the `train` section has no `batch`")
                .at(s.name.span, "global batch missing")
                .help("add `batch = 512 sequences` (or a batch in tokens)"),
        );
    }
    (ev.diags.len() == before).then_some(t)
}

/// A number of sequences: `N sequences` (or `samples`, or no unit), or `N
/// tokens` that are a whole number of `seq`-token sequences.
fn sequences(ev: &mut SectionEval, v: &Expr, seq: u64, what: &str) -> Option<u64> {
    let (x, unit) = match &v.kind {
        ExprKind::Unit(x, u) => (x.as_ref(), Some(u.as_str())),
        _ => (v, None),
    };
    let n = ev.count(x, what)?;
    match unit {
        None | Some("sequences" | "samples") => Some(n),
        Some("tokens") if n % seq == 0 => Some(n / seq),
        Some("tokens") => {
            ev.err(
                Diag::error(format!("{n} tokens are not a whole number of {seq}-token sequences"))
                    .at(v.span, "not divisible by the sequence length")
                    .help(format!("use a multiple of {seq} tokens, or give the {what} in sequences")),
            );
            None
        }
        Some(u) => {
            ev.err(
                Diag::error(format!("unit `{u}` is not an amount of sequences"))
                    .at(v.span, "wrong unit")
                    .help("use `sequences` or `tokens`"),
            );
            None
        }
    }
}

/// `rampup(start = 32 sequences, increment = 32 sequences, over = 4B tokens)`:
/// GPT-3's batch-size warm-up, as Megatron's `--rampup-batch-size`.
fn rampup(ev: &mut SectionEval, v: &Expr, seq: u64) -> Option<Rampup> {
    let args: &[Arg] = match &v.kind {
        ExprKind::Call { name, args } if name.name == "rampup" => args,
        _ => {
            ev.err(
                Diag::error("`batch_rampup` is `rampup(start, increment, over)`")
                    .at(v.span, "not a ramp-up")
                    .help("batch_rampup = rampup(start = 32 sequences, increment = 32 sequences, over = 4B tokens)"),
            );
            return None;
        }
    };
    let kw = kwargs(ev, args, &["start", "increment", "over"], "rampup");
    let mut get = |key: &str| match kw.get(key) {
        Some(e) => sequences(ev, e, seq, key),
        None => {
            ev.err(
                Diag::error(format!("`rampup` needs `{key}`"))
                    .at(v.span, "incomplete")
                    .help("rampup(start = 32 sequences, increment = 32 sequences, over = 4B tokens)"),
            );
            None
        }
    };
    let (start, increment, samples) = (get("start"), get("increment"), get("over"));
    Some(Rampup { start: start?, increment: increment?, samples: samples? })
}

fn kwargs<'e>(ev: &mut SectionEval, args: &'e [Arg], allowed: &[&str], what: &str) -> HashMap<&'e str, &'e Expr> {
    let mut out = HashMap::new();
    for a in args {
        match a {
            Arg::Kw(k, v) if allowed.contains(&k.name.as_str()) => {
                out.insert(k.name.as_str(), v);
            }
            Arg::Kw(k, _) => {
                let help = unknown_help("argument", &k.name, allowed.iter().copied());
                ev.err(
                    Diag::error(format!("`{what}` has no argument `{}`", k.name))
                        .at(k.span, "unknown argument")
                        .help(help),
                );
            }
            other => ev.err(
                Diag::error(format!("`{what}` takes keyword arguments"))
                    .at(other.span(), "positional argument")
                    .help(format!("write `{what}({} = ...)`", allowed[0])),
            ),
        }
    }
    out
}

fn optimizer(ev: &mut SectionEval, v: &Expr) -> Option<Optimizer> {
    let (name, args): (&str, &[Arg]) = match &v.kind {
        ExprKind::Call { name, args } => (name.name.as_str(), args.as_slice()),
        ExprKind::Name(n) => (n.as_str(), &[]),
        _ => ("", &[]),
    };
    match name {
        "adamw" | "adam" => {
            let kw = kwargs(ev, args, &["lr", "betas", "eps", "weight_decay"], name);
            let lr = kw.get("lr").and_then(|e| ev.nonneg(e, "lr")).unwrap_or(3e-4);
            let (mut b1, mut b2) = (0.9, 0.999);
            if let Some(b) = kw.get("betas") {
                match &b.kind {
                    ExprKind::Tuple(xs) if xs.len() == 2 => {
                        b1 = ev.num(&xs[0]).unwrap_or(b1);
                        b2 = ev.num(&xs[1]).unwrap_or(b2);
                        for (x, e) in [(b1, &xs[0]), (b2, &xs[1])] {
                            if !(0.0..1.0).contains(&x) {
                                ev.err(
                                    Diag::error(format!("Adam beta {x} must be in [0, 1)"))
                                        .at(e.span, "out of range")
                                        .help("typical betas are (0.9, 0.95) or (0.9, 0.999)"),
                                );
                            }
                        }
                    }
                    _ => ev.err(Diag::error("`betas` is a pair").at(b.span, "not a pair").help("betas = (0.9, 0.95)")),
                }
            }
            let eps = kw.get("eps").and_then(|e| ev.nonneg(e, "eps")).unwrap_or(1e-8);
            let weight_decay = kw.get("weight_decay").and_then(|e| ev.nonneg(e, "weight_decay")).unwrap_or(0.0);
            Some(Optimizer::Adamw { lr, beta1: b1, beta2: b2, eps, weight_decay })
        }
        "sgd" => {
            let kw = kwargs(ev, args, &["lr", "momentum", "weight_decay", "nesterov"], name);
            let lr = kw.get("lr").and_then(|e| ev.nonneg(e, "lr")).unwrap_or(0.1);
            let momentum = kw.get("momentum").and_then(|e| ev.nonneg(e, "momentum")).unwrap_or(0.0);
            let weight_decay = kw.get("weight_decay").and_then(|e| ev.nonneg(e, "weight_decay")).unwrap_or(0.0);
            let nesterov = kw.get("nesterov").and_then(|e| ev.boolean(e, "nesterov")).unwrap_or(false);
            Some(Optimizer::Sgd { lr, momentum, weight_decay, nesterov })
        }
        "adafactor" => {
            let allowed = ["lr", "beta1", "decay", "eps", "clip", "scale_parameter", "weight_decay", "factor_min"];
            let kw = kwargs(ev, args, &allowed, name);
            let lr = kw.get("lr").and_then(|e| ev.nonneg(e, "lr")).unwrap_or(1e-2);
            let beta1 = kw.get("beta1").and_then(|e| ev.nonneg(e, "beta1")).unwrap_or(0.0);
            let decay = kw.get("decay").and_then(|e| ev.nonneg(e, "decay")).unwrap_or(0.8);
            let clip = kw.get("clip").and_then(|e| ev.nonneg(e, "clip")).unwrap_or(1.0);
            let (mut eps, mut eps_scale) = (1e-30, 1e-3);
            if let Some(e) = kw.get("eps") {
                match &e.kind {
                    ExprKind::Tuple(xs) if xs.len() == 2 => {
                        eps = ev.nonneg(&xs[0], "eps").unwrap_or(eps);
                        eps_scale = ev.nonneg(&xs[1], "eps").unwrap_or(eps_scale);
                    }
                    _ => ev.err(
                        Diag::error("Adafactor's `eps` is a pair: (added to g², least parameter scale)")
                            .at(e.span, "not a pair")
                            .help("eps = (1e-30, 1e-3)"),
                    ),
                }
            }
            let scale_parameter =
                kw.get("scale_parameter").and_then(|e| ev.boolean(e, "scale_parameter")).unwrap_or(true);
            let weight_decay = kw.get("weight_decay").and_then(|e| ev.nonneg(e, "weight_decay")).unwrap_or(0.0);
            let factor_min = kw.get("factor_min").and_then(|e| ev.count(e, "factor_min")).unwrap_or(128);
            for (key, x, ok) in [("beta1", beta1, beta1 < 1.0), ("decay", decay, decay > 0.0 && decay <= 1.0)] {
                if !ok {
                    ev.err(
                        Diag::error(format!("Adafactor's `{key}` = {x} is out of range"))
                            .at(kw[key].span, "out of range")
                            .help("beta1 is in [0, 1) (0: no first moment); decay in (0, 1] (T5: 0.8)"),
                    );
                }
            }
            if clip <= 0.0 {
                ev.err(
                    Diag::error("Adafactor's `clip` bounds the update's RMS and must be positive")
                        .at(kw["clip"].span, "not positive")
                        .help("clip = 1.0 (the paper's d)"),
                );
            }
            Some(Optimizer::Adafactor {
                lr,
                beta1,
                decay,
                eps,
                eps_scale,
                clip,
                scale_parameter,
                weight_decay,
                factor_min,
            })
        }
        other => {
            let help = unknown_help("optimizer", other, ["adamw", "sgd", "adafactor"]);
            ev.err(Diag::error(format!("unknown optimizer `{other}`")).at(v.span, "not an optimizer").help(help));
            None
        }
    }
}

fn lr_schedule(ev: &mut SectionEval, v: &Expr) -> Option<LrSchedule> {
    let (name, args): (&str, &[Arg]) = match &v.kind {
        ExprKind::Call { name, args } => (name.name.as_str(), args.as_slice()),
        ExprKind::Name(n) => (n.as_str(), &[]),
        _ => ("", &[]),
    };
    match name {
        "constant" => {
            let kw = kwargs(ev, args, &["warmup"], name);
            let warmup = kw.get("warmup").and_then(|e| ev.amount(e)).unwrap_or(Amount::Steps(0.0));
            Some(LrSchedule::Constant { warmup })
        }
        "inverse_sqrt" => {
            let kw = kwargs(ev, args, &["warmup", "linear_warmup"], name);
            let warmup = kw.get("warmup").and_then(|e| ev.amount(e)).unwrap_or(Amount::Steps(0.0));
            let linear_warmup = kw.get("linear_warmup").and_then(|e| ev.boolean(e, "linear_warmup")).unwrap_or(true);
            Some(LrSchedule::InverseSqrt { warmup, linear_warmup })
        }
        "linear" | "cosine" => {
            let kw = kwargs(ev, args, &["warmup", "decay", "min"], name);
            let warmup = kw.get("warmup").and_then(|e| ev.amount(e)).unwrap_or(Amount::Steps(0.0));
            let decay = kw.get("decay").and_then(|e| ev.amount(e));
            let min = kw.get("min").and_then(|e| ev.nonneg(e, "min")).unwrap_or(0.0);
            if min > 1.0 {
                ev.err(
                    Diag::error(format!("`min` is a fraction of the peak rate, got {min}"))
                        .at(v.span, "above 1")
                        .help("min = 0.1 decays to a tenth of the peak"),
                );
            }
            Some(if name == "linear" {
                LrSchedule::Linear { warmup, decay, min }
            } else {
                LrSchedule::Cosine { warmup, decay, min }
            })
        }
        other => {
            let help = unknown_help("schedule", other, ["constant", "linear", "cosine", "inverse_sqrt"]);
            ev.err(
                Diag::error(format!("unknown learning-rate schedule `{other}`"))
                    .at(v.span, "not a schedule")
                    .help(help),
            );
            None
        }
    }
}

pub fn infer(ev: &mut SectionEval, s: &Section) -> Option<Infer> {
    let mut inf =
        Infer { max_batch: 1, max_len: 0, kv_cache: KvCache::Contiguous, sampling: Sampling::Greedy, seed: 0 };
    let before = ev.diags.len();
    for (k, e) in keyed(ev, s, INFER_KEYS) {
        let Some(v) = value(ev, e, k) else { continue };
        match k {
            "max_batch" => inf.max_batch = ev.count(v, k).unwrap_or(1),
            "max_len" => inf.max_len = ev.count(v, k).unwrap_or(0),
            "seed" => inf.seed = ev.nonneg(v, k).map(|x| x as u64).unwrap_or(0),
            "kv_cache" => match &v.kind {
                ExprKind::Name(n) if n == "contiguous" => inf.kv_cache = KvCache::Contiguous,
                ExprKind::Call { name, args } if name.name == "paged" => match args.as_slice() {
                    [Arg::Pos(b)] => {
                        if let Some(n) = ev.count(b, "block") {
                            inf.kv_cache = KvCache::Paged { block: n }
                        }
                    }
                    _ => ev.err(
                        Diag::error("`paged` takes the block size in tokens")
                            .at(v.span, "here")
                            .help("kv_cache = paged(16)"),
                    ),
                },
                _ => {
                    let n = match &v.kind {
                        ExprKind::Name(n) => n.as_str(),
                        ExprKind::Call { name, .. } => name.name.as_str(),
                        _ => "",
                    };
                    let help = unknown_help("kv cache", n, ["contiguous", "paged"]);
                    ev.err(
                        Diag::error("unknown kv cache kind")
                            .at(v.span, "expected `contiguous` or `paged(block)`")
                            .help(help),
                    );
                }
            },
            _ => {
                if let Some(smp) = sampling(ev, v) {
                    inf.sampling = smp;
                }
            }
        }
    }
    (ev.diags.len() == before).then_some(inf)
}

fn sampling(ev: &mut SectionEval, v: &Expr) -> Option<Sampling> {
    let (name, args): (&str, &[Arg]) = match &v.kind {
        ExprKind::Call { name, args } => (name.name.as_str(), args.as_slice()),
        ExprKind::Name(n) => (n.as_str(), &[]),
        _ => ("", &[]),
    };
    let mut pos = Vec::new();
    let mut temperature = 1.0;
    for a in args {
        match a {
            Arg::Pos(e) => pos.push(e),
            Arg::Kw(k, e) if k.name == "temperature" => temperature = ev.nonneg(e, "temperature").unwrap_or(1.0),
            other => ev.err(
                Diag::error("unknown sampling argument")
                    .at(other.span(), "here")
                    .help("only `temperature = ...` is a keyword"),
            ),
        }
    }
    let one = |ev: &mut SectionEval, what: &str| -> Option<f64> {
        match pos.as_slice() {
            [e] => ev.num(e),
            _ => {
                ev.err(
                    Diag::error(format!("`{name}` takes one {what}"))
                        .at(v.span, "here")
                        .help("e.g. top_p(0.9, temperature = 0.8)"),
                );
                None
            }
        }
    };
    match name {
        "greedy" => Some(Sampling::Greedy),
        "temperature" => one(ev, "temperature").map(|t| Sampling::Temperature { temperature: t }),
        "top_k" => {
            let k = one(ev, "k")?;
            if k < 1.0 || k.fract() != 0.0 {
                ev.err(
                    Diag::error(format!("top_k needs a whole k ≥ 1, got {k}")).at(v.span, "bad k").help("top_k(40)"),
                );
                return None;
            }
            Some(Sampling::TopK { k: k as u64, temperature })
        }
        "top_p" => {
            let p = one(ev, "p")?;
            if !(p > 0.0 && p <= 1.0) {
                ev.err(Diag::error(format!("top_p needs 0 < p ≤ 1, got {p}")).at(v.span, "bad p").help("top_p(0.9)"));
                return None;
            }
            Some(Sampling::TopP { p, temperature })
        }
        other => {
            let help = unknown_help("sampling", other, ["greedy", "temperature", "top_k", "top_p"]);
            ev.err(Diag::error(format!("unknown sampling `{other}`")).at(v.span, "not a sampling method").help(help));
            None
        }
    }
}
