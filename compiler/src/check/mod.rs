//! The checker: spec text → checked [`Model`], or diagnostics.
//!
//! Order: load files → apply `--set` overrides → pick the model and resolve
//! its variant chain → evaluate constants → validate sections → walk the
//! body (shapes, params, costs) → validate the layout → check memory.

mod arith;
mod blocks;
mod layout;
mod lora;
pub mod ops;
pub mod program;
pub mod sections;
mod walk;
mod weights;

pub use crate::parallel::mesh::MAX_WORLD;

use crate::config::{Parallel, Precision};
use crate::diag::{Diag, Diags, unknown_help};
use crate::model::*;
use crate::syntax::ast::{self, Entry, Expr, ExprKind, Ident, Section, Stmt};
use crate::syntax::span::{SourceMap, Span};
use program::{Origin, Program};
use std::collections::HashMap;
use std::path::Path;

/// What to check, beyond the file itself.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--set path=value` overrides, as typed.
    pub overrides: Vec<String>,
    /// Which model of the file to check (default: the last one).
    pub model: Option<String>,
    /// Force the size of `batch` (sequences per microbatch), e.g. 1 for sampling.
    pub micro_batch: Option<u64>,
}

/// Check a spec file on disk.
pub fn check_path(sources: &mut SourceMap, path: &Path, opts: &Options) -> Result<Model, Diags> {
    let text = read_spec(path)?;
    let canon = path.canonicalize().unwrap_or(path.to_path_buf());
    check_source(sources, &path.to_string_lossy(), text, Origin::Path(canon), opts)
}

/// The text of a spec file, or a diagnostic that says why it cannot be read.
pub fn read_spec(path: &Path) -> Result<String, Diags> {
    let bytes = std::fs::read(path).map_err(|e| {
        let help = match e.kind() {
            std::io::ErrorKind::NotFound => "check the path",
            std::io::ErrorKind::PermissionDenied => "check the file's permissions",
            std::io::ErrorKind::IsADirectory => "pass a .spec file, not a folder",
            _ => "check the path and permissions",
        };
        Diags::from(Diag::error(format!("cannot read `{}`: {e}", path.display())).help(help))
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Diags::from(
            Diag::error(format!("`{}` is not UTF-8 text: byte {at} (line {line}) is not valid UTF-8", path.display()))
                .help("a spec is a UTF-8 text file; is this the right file? If it is, save it as UTF-8"),
        )
    })
}

/// Check spec text; `use` resolves from `dir`.
pub fn check_text(sources: &mut SourceMap, name: &str, text: &str, dir: &Path, opts: &Options) -> Result<Model, Diags> {
    check_source(sources, name, text.to_string(), Origin::Text(dir.to_path_buf()), opts)
}

/// Check a spec embedded in a program: `files` holds the root spec first,
/// then every file it uses, each by the path it was read from (as
/// [`SourceMap::paths`] lists them after [`check_path`]); `use` resolves
/// among them only, never on this machine's disk.
pub fn check_embedded(sources: &mut SourceMap, files: &[(&str, &str)], opts: &Options) -> Result<Model, Diags> {
    let Some(&(root, text)) = files.first() else {
        return Err(Diags::from(Diag::error("no embedded spec to check")));
    };
    let set: std::rc::Rc<[(std::path::PathBuf, String)]> =
        files.iter().map(|&(p, t)| (std::path::PathBuf::from(p), t.to_string())).collect();
    let origin = Origin::Embedded(set, root.into());
    check_source(sources, root, text.to_string(), origin, opts)
}

fn check_source(
    sources: &mut SourceMap,
    name: &str,
    text: String,
    origin: Origin,
    opts: &Options,
) -> Result<Model, Diags> {
    let mut prog = program::load(sources, name, text, origin)?;
    let mut diags = Diags::default();
    let overrides = parse_overrides(sources, &opts.overrides, &mut diags);
    if !diags.is_empty() {
        return Err(diags);
    }
    let mut dim_sets: Vec<(Ident, Expr)> = Vec::new();
    for o in overrides {
        match o.path[0].name.as_str() {
            "dims" if o.path.len() == 2 => dim_sets.push((o.path[1].clone(), o.value)),
            "dims" => diags.push(
                Diag::error("`--set dims.NAME=value` sets one dim")
                    .at(o.span, "expected `dims.NAME`")
                    .help("for example `--set dims.embed=1024`"),
            ),
            s if sections::SECTIONS.contains(&s) => apply_section_override(&mut prog.sections, &o),
            other => {
                let mut keys = vec!["dims"];
                keys.extend(sections::SECTIONS);
                let help = unknown_help("section", other, keys.iter().copied());
                diags.push(
                    Diag::error(format!("unknown override path `{other}`"))
                        .at(o.path[0].span, "not a section")
                        .help(help),
                );
            }
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let model = check_program(&prog, opts.model.as_deref(), dim_sets, opts.micro_batch)?;
    Ok(model)
}

// ---------------------------------------------------------------- overrides

struct Override {
    path: Vec<Ident>,
    value: Expr,
    span: Span,
}

fn parse_overrides(sources: &mut SourceMap, raw: &[String], diags: &mut Diags) -> Vec<Override> {
    let mut out = Vec::new();
    for r in raw {
        let id = sources.add("--set", r.clone());
        let whole = Span::new(id, 0, r.len());
        let Some(eq) = r.find('=') else {
            diags.push(
                Diag::error(format!("override `{r}` has no `=`"))
                    .at(whole, "expected `path=value`")
                    .help("for example `--set parallel.mesh.tensor=4`"),
            );
            continue;
        };
        let mut path = Vec::new();
        let mut at = 0;
        let mut ok = true;
        for seg in r[..eq].split('.') {
            let span = Span::new(id, at, at + seg.len());
            at += seg.len() + 1;
            let valid = !seg.is_empty()
                && seg.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                diags.push(
                    Diag::error(format!("`{seg}` is not a valid name in an override path"))
                        .at(span, "bad path segment")
                        .help("paths are dotted names like `train.batch`"),
                );
                ok = false;
                break;
            }
            path.push(Ident { name: seg.to_string(), span });
        }
        if !ok {
            continue;
        }
        let text = &r[eq + 1..];
        let vid = sources.add(format!("--set {}", &r[..eq]), text.to_string());
        match crate::syntax::parse_value(vid, text) {
            Ok(value) => out.push(Override { path, value, span: whole }),
            Err(d) => diags.push(d),
        }
    }
    out
}

fn apply_section_override(sections: &mut Vec<Section>, o: &Override) {
    let top = &o.path[0];
    let idx = match sections.iter().position(|s| s.name.name == top.name) {
        Some(i) => i,
        None => {
            sections.push(Section { name: top.clone(), entries: Vec::new(), span: o.span });
            sections.len() - 1
        }
    };
    let mut sec = &mut sections[idx];
    for (i, seg) in o.path.iter().enumerate().skip(1) {
        let last = i == o.path.len() - 1;
        if last {
            let is_layout = sec.name.name == "layout";
            // `--set parallel.layout.DIM=none` removes the rule: DIM is replicated.
            if is_layout && matches!(&o.value.kind, ExprKind::Name(n) if n == "none") {
                sec.entries.retain(|e| e.key().name != seg.name);
                return;
            }
            let entry = if is_layout {
                match &o.value.kind {
                    ExprKind::Name(axis) => Entry::Rule {
                        dim: seg.clone(),
                        axis: Ident { name: axis.clone(), span: o.value.span },
                        span: o.span,
                    },
                    _ => Entry::Value { key: seg.clone(), value: o.value.clone(), span: o.span },
                }
            } else {
                Entry::Value { key: seg.clone(), value: o.value.clone(), span: o.span }
            };
            match sec.entries.iter().position(|e| e.key().name == seg.name) {
                Some(j) => sec.entries[j] = entry,
                None => sec.entries.push(entry),
            }
            return;
        }
        let j = match sec.entries.iter().position(|e| e.key().name == seg.name) {
            Some(j) if matches!(sec.entries[j], Entry::Sub(_)) => j,
            Some(j) => {
                sec.entries[j] = Entry::Sub(Section { name: seg.clone(), entries: Vec::new(), span: o.span });
                j
            }
            None => {
                sec.entries.push(Entry::Sub(Section { name: seg.clone(), entries: Vec::new(), span: o.span }));
                sec.entries.len() - 1
            }
        };
        let Entry::Sub(next) = &mut sec.entries[j] else { unreachable!("just made a subsection") };
        sec = next;
    }
    // A path of one segment (`--set train=...`) replaces nothing.
}

// ---------------------------------------------------------------- the model

fn check_program(
    prog: &Program,
    want: Option<&str>,
    dim_sets: Vec<(Ident, Expr)>,
    force_micro: Option<u64>,
) -> Result<Model, Diags> {
    let whole_sets = dim_sets.clone();
    let name = match want {
        Some(w) => {
            if !prog.models.contains_key(w) {
                let help = unknown_help("model", w, prog.models.keys().map(String::as_str));
                return Err(Diag::error(format!("no model `{w}` in this spec")).help(help).into());
            }
            w.to_string()
        }
        None => match prog.root_models.last() {
            Some(m) => m.clone(),
            None => {
                let mut d = Diag::error("this spec defines no model")
                    .help("add `model NAME { ... }`, or a variant `model b = a with { ... }`");
                if let Some(s) = prog.sections.first() {
                    d = d.at(s.name.span, "sections configure a model, but there is none");
                }
                return Err(d.into());
            }
        },
    };
    // Resolve the variant chain: base first, then each variant's overrides.
    let mut chain = Vec::new();
    let mut cur = prog.models[&name].clone();
    let body = loop {
        if chain.iter().any(|m: &std::rc::Rc<ast::ModelDef>| m.name.name == cur.name.name) {
            return Err(Diag::error(format!("model `{}` is a variant of itself", cur.name.name))
                .at(cur.name.span, "cyclic `with`")
                .help("a variant must start from a model with a body")
                .into());
        }
        chain.push(cur.clone());
        match (&cur.base, &cur.body) {
            (_, Some(b)) => break b.clone(),
            (Some((base, _)), None) => match prog.models.get(&base.name) {
                Some(m) => cur = m.clone(),
                None => {
                    let help = unknown_help("model", &base.name, prog.models.keys().map(String::as_str));
                    return Err(Diag::error(format!("unknown base model `{}`", base.name))
                        .at(base.span, "no such model")
                        .help(format!("{help} (models from other files need `use`)"))
                        .into());
                }
            },
            (None, None) => unreachable!("grammar: a model has a body or a base"),
        }
    };
    let mut overrides: Vec<(Ident, Expr)> = Vec::new();
    for m in chain.iter().rev() {
        if let Some((_, o)) = &m.base {
            overrides.extend(o.iter().map(|d| (d.name.clone(), d.value.clone())));
        }
    }
    // Expert settings in the parallel section configure the model's constants.
    if let Some(ps) = prog.sections.iter().find(|s| s.name.name == "parallel") {
        for e in &ps.entries {
            if let Entry::Sub(x) = e
                && x.name.name == "experts"
            {
                for xe in &x.entries {
                    if let Entry::Value { key, value, .. } = xe
                        && let Some((_, c)) = sections::EXPERT_CONSTS.iter().find(|(k, _)| *k == key.name)
                    {
                        overrides.push((Ident { name: c.to_string(), span: key.span }, value.clone()));
                    }
                }
            }
        }
    }
    overrides.extend(dim_sets);

    let mut diags = Diags::default();
    // Constants in declaration order, overrides substituted.
    let mut defs: Vec<(Ident, Expr)> = Vec::new();
    let mut def_at: HashMap<String, usize> = HashMap::new();
    for s in &body.stmts {
        if let Stmt::Dims(ds, _) = s {
            for d in ds {
                if let Some(&i) = def_at.get(&d.name.name) {
                    diags.push(
                        Diag::error(format!("dim `{}` is defined twice", d.name.name))
                            .at(d.name.span, "again")
                            .also(defs[i].0.span, "first defined here")
                            .help("define each dim once"),
                    );
                    continue;
                }
                def_at.insert(d.name.name.clone(), defs.len());
                defs.push((d.name.clone(), d.value.clone()));
            }
        }
    }
    for (name, value) in overrides {
        match def_at.get(&name.name) {
            Some(&i) => defs[i].1 = value,
            None => {
                let help = unknown_help("dim", &name.name, defs.iter().map(|(n, _)| n.name.as_str()));
                diags.push(
                    Diag::error(format!("cannot override `{}`: the model has no such dim", name.name))
                        .at(name.span, "unknown dim")
                        .help(help),
                );
            }
        }
    }
    let mut consts: HashMap<String, f64> = HashMap::new();
    consts.insert("dropless".into(), 0.0);
    let mut ordered: Vec<(String, f64)> = Vec::new();
    let mut failed: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (name, value) in &defs {
        if ["layer", "batch", "slot", "dropless"].contains(&name.name.as_str()) && name.name != "batch" {
            diags.push(Diag::error(format!("`{}` is a reserved dim name", name.name)).at(name.span, "reserved").help("`layer` stacks repeated params, `slot` holds routed tokens, `dropless` is a capacity; choose another name"));
            continue;
        }
        // A dim that uses one that failed is not reported again: the first error says it.
        if mentions(value, &failed) {
            failed.insert(name.name.clone());
            continue;
        }
        let mut ev = sections::SectionEval { consts: &consts, diags: Vec::new() };
        let v = ev.num(value);
        let errs = ev.diags;
        if !errs.is_empty() {
            diags.0.extend(errs);
            failed.insert(name.name.clone());
            continue;
        }
        if let Some(v) = v {
            consts.insert(name.name.clone(), v);
            ordered.push((name.name.clone(), v));
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }

    // Sections.
    let mut ev = sections::SectionEval { consts: &consts, diags: Vec::new() };
    let mut seen_sections: HashMap<&str, Span> = HashMap::new();
    for s in &prog.sections {
        if !sections::SECTIONS.contains(&s.name.name.as_str()) {
            let help = unknown_help("section", &s.name.name, sections::SECTIONS.iter().copied());
            ev.diags.push(
                Diag::error(format!("unknown section `{}`", s.name.name)).at(s.name.span, "not a section").help(help),
            );
        } else if let Some(first) = seen_sections.insert(&s.name.name, s.name.span) {
            ev.diags.push(
                Diag::error(format!("section `{}` appears twice", s.name.name))
                    .at(s.name.span, "again")
                    .also(first, "first here")
                    .help("merge the two sections"),
            );
        }
    }
    let find = |n: &str| prog.sections.iter().find(|s| s.name.name == n);
    let (mut parallel, pspans) = sections::parallel(&mut ev, find("parallel"));
    let seq = consts.get("seq").copied().unwrap_or(1.0).max(1.0) as u64;
    let train = find("train").and_then(|s| sections::train(&mut ev, s, seq));
    let infer = find("infer").and_then(|s| sections::infer(&mut ev, s));
    diags.0.extend(ev.diags);
    if !diags.is_empty() {
        return Err(diags);
    }

    // The microbatch: sequences per microbatch per data-parallel rank.
    let micro = match force_micro {
        Some(b) => b.max(1),
        None => layout::micro_batch(&mut parallel, train.as_ref(), &pspans, &mut diags),
    };
    if !consts.contains_key("batch") {
        ordered.push(("batch".into(), micro as f64));
    }
    let precision = train.as_ref().map(|t| t.precision).or(parallel.precision).unwrap_or(Precision::Fp32);
    let mut w = walk::Walker::new(prog, ordered.clone(), &parallel, precision.bytes());
    w.const_spans = defs
        .iter()
        .map(|(n, e)| (n.name.clone(), n.span.to(e.span)))
        .filter(|(_, s)| s.file == body.span.file)
        .collect();
    let mut frame = walk::Frame::default();
    w.body(&mut frame, &body.stmts);
    diags.0.append(&mut w.diags);
    if !diags.is_empty() {
        return Err(diags);
    }
    w.outputs.retain(|(n, _)| !n.is_empty());
    // Expert weights: parameters whose leading dim (after `layer`) is a routed
    // expert dim. (A router has the expert dim last and serves every token.)
    for p in w.params.iter_mut() {
        let lead = p.ty.dims.iter().find(|d| d.name != "layer");
        if let Some(d) = lead
            && let Some(&(count, top_k)) = w.expert_dims.get(&d.name)
        {
            p.expert = Some(ExpertDim { dim: d.name.clone(), count, top_k });
        }
    }
    // Parameter placement relative to the layers.
    for (p, ph) in w.params.iter_mut().zip(&w.param_phases) {
        if p.placement != Placement::Layers {
            p.placement = match (ph[0], ph[2]) {
                (true, true) => Placement::Both,
                (false, true) => Placement::Last,
                _ => Placement::First,
            };
        }
    }
    if train.is_some() {
        match w.outputs.iter().find(|(n, _)| n == "loss") {
            None => diags.push(
                Diag::error(format!("model `{}` has a `train` section but defines no `loss`", name))
                    .at(prog.models[&name].name.span, "nothing to train on")
                    .help("define a scalar `loss`, e.g. `loss = cross_entropy(logits, targets)`"),
            ),
            Some((_, t)) if !t.dims.is_empty() => diags.push(
                Diag::error(format!("`loss` must be a scalar, but it is {t}"))
                    .at(prog.models[&name].name.span, "in this model")
                    .help("reduce it with `mean(...)` over its dims"),
            ),
            _ => {}
        }
    }
    let tokens_per_sample = consts.get("seq").map(|v| *v as u64).unwrap_or_else(|| {
        w.inputs
            .first()
            .map(|i| i.ty.dims.iter().filter(|d| d.name != "batch").map(|d| d.size).fold(1u64, u64::saturating_mul))
            .unwrap_or(1)
    });
    let warnings = unused_params(&w.graph, &w.params);
    if let Some(t) = &train {
        let at = find("train").map(|s| s.name.span).unwrap_or_default();
        lora::apply(&mut w.graph, &mut w.params, t, at, &mut diags.0);
    }
    let names: Vec<String> = chain.iter().map(|m| m.name.name.clone()).collect();
    let mut wev = sections::SectionEval { consts: &consts, diags: Vec::new() };
    let weights = weights::mappings(&prog.weights, &names, &prog.models, &w.params, &mut wev);
    diags.0.extend(wev.diags);
    let mut model = Model {
        warnings,
        name: name.clone(),
        consts: ordered,
        inputs: w.inputs,
        params: w.params,
        outputs: w.outputs,
        routings: w.routings,
        stacks: w.stacks,
        tokens_per_sample: tokens_per_sample.max(1),
        micro_batch: micro,
        cost: w.cost,
        graph: w.graph,
        value_dims: w.value_dims,
        parallel,
        train,
        infer,
        weights,
        train_span: find("train").map(|s| s.name.span).or(pspans.section).unwrap_or_default(),
        whole_batch: None,
    };
    layout::validate(&model, &pspans, &mut diags);
    // A run's own microbatches (not a size forced for sampling or a search).
    if force_micro.is_none() {
        layout::batch_mixing(&model, &mut diags);
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let dp = model.parallel.data().max(1);
    // Examples that meet across the batch, which one data rank's microbatch
    // alone would change the meaning of (the per-rank programs gather the
    // batch or all-reduce the statistics; evaluation on one device needs
    // the whole group's microbatch).
    if force_micro.is_none() && dp > 1 && !model.examples_meet().is_empty() {
        let mut whole = check_program(prog, want, whole_sets, Some(model.micro_batch * dp))?;
        whole.parallel = crate::config::Parallel::default();
        model.whole_batch = Some(Box::new(whole));
    }
    Ok(model)
}

/// A warning for each declared parameter that nothing reads: it would be
/// counted, initialized, stored and updated for nothing.
fn unused_params(g: &crate::ir::Graph, params: &[Param]) -> Vec<Diag> {
    let mut read = vec![false; g.nodes.len()];
    for n in &g.nodes {
        for v in &n.inputs {
            read[v.index()] = true;
        }
    }
    for (_, v) in &g.outputs {
        read[v.index()] = true;
    }
    let mut used = vec![false; params.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        if let crate::ir::Op::Param { index, .. } = n.op
            && read[i]
        {
            used[index] = true;
        }
    }
    params
        .iter()
        .zip(used)
        .filter(|(_, u)| !u)
        .map(|(p, _)| {
            Diag::warning(format!("parameter `{}` is declared but nothing uses it", p.path))
                .at(p.span, format!("{} parameters that nothing reads", p.ty.numel()))
                .help("use it in the model, or delete the declaration (it is still counted, stored and updated)")
        })
        .collect()
}

/// Whether an expression uses any of `names`.
fn mentions(e: &Expr, names: &std::collections::HashSet<String>) -> bool {
    if names.is_empty() {
        return false;
    }
    match &e.kind {
        ExprKind::Name(n) => names.contains(n),
        ExprKind::Unary(_, a) | ExprKind::Paren(a) | ExprKind::Unit(a, _) => mentions(a, names),
        ExprKind::Binary(_, a, b) => mentions(a, names) || mentions(b, names),
        ExprKind::Call { args, .. } => args.iter().any(|a| match a {
            ast::Arg::Pos(x) | ast::Arg::Kw(_, x) => mentions(x, names),
            ast::Arg::DimMap { .. } => false,
        }),
        ExprKind::Tuple(xs) | ExprKind::List(xs) => xs.iter().any(|x| mentions(x, names)),
        _ => false,
    }
}

/// The layout axis sizes a value is split by; exposed for `inspect`.
pub fn split_of(p: &Parallel, dim: &str) -> u64 {
    p.split_of(dim)
}
