//! `weights FORMAT for MODEL { ... }`: a model's mapping to a published
//! checkpoint's tensor names and layouts, checked against the model's
//! parameters so that loading can only fail on the file, never on the spec.
//!
//! A rule names one tensor of the checkpoint and the parameter slice it
//! holds: `"model.layers.{layer}.self_attn.q_proj.weight" =
//! layers.llama_layer.gqa_attention.wq [(heads, rope(head_dim)), embed]`.
//! The layout lists the checkpoint's dims outermost first, each a group of
//! the parameter's dims; it defaults to the parameter's own order. Every
//! parameter slice is held by one tensor at most; a parameter that no rule
//! names is not in the checkpoint.

use super::sections::SectionEval;
use crate::diag::{Diag, unknown_help};
use crate::model::{MapRule, MapTarget, Param, Part, WeightMap};
use crate::syntax::ast::{Entry, Expr, ExprKind, Ident, LayoutGroup, Section, WeightRule, WeightsDef};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// The mapping of each format that applies to the model `chain[0]`: its
/// own, else that of the nearest model it is a variant of.
pub fn mappings(
    defs: &[std::rc::Rc<WeightsDef>],
    chain: &[String],
    models: &HashMap<String, std::rc::Rc<crate::syntax::ast::ModelDef>>,
    params: &[Param],
    ev: &mut SectionEval,
) -> Vec<WeightMap> {
    for d in defs {
        for model in d.models.iter().filter(|x| !models.contains_key(&x.name)) {
            let help = unknown_help("model", &model.name, models.keys().map(String::as_str));
            ev.diags.push(
                Diag::error(format!("`weights {} for {}` names no model", d.format.name, model.name))
                    .at(model.span, "no such model")
                    .help(format!("{help} (models from other files need `use`)")),
            );
        }
    }
    let mut out: Vec<WeightMap> = Vec::new();
    for m in chain {
        for d in defs.iter().filter(|d| d.models.iter().any(|x| &x.name == m)) {
            if out.iter().any(|o| o.format == d.format.name) {
                continue;
            }
            if let Some(map) = mapping(d, m, params, ev) {
                out.push(map);
            }
        }
    }
    out
}

fn mapping(d: &WeightsDef, model: &str, params: &[Param], ev: &mut SectionEval) -> Option<WeightMap> {
    let before = ev.diags.len();
    let config = match &d.config {
        Some(c) => object(c, ev),
        None => serde_json::Map::new(),
    };
    let mut rules = Vec::new();
    let mut seen: HashMap<&str, &WeightRule> = HashMap::new();
    for r in &d.rules {
        if let Some(first) = seen.insert(&r.name, r) {
            ev.diags.push(
                Diag::error(format!("tensor `{}` is mapped twice", r.name))
                    .at(r.name_span, "again")
                    .also(first.name_span, "first here")
                    .help("map each tensor of the checkpoint once"),
            );
            continue;
        }
        if let Some(rule) = rule(r, params, ev) {
            rules.push(rule);
        }
    }
    coverage(d, model, &rules, params, ev);
    if ev.diags.len() > before {
        return None;
    }
    Some(WeightMap { format: d.format.name.clone(), model: model.to_string(), config, rules })
}

fn rule(r: &WeightRule, params: &[Param], ev: &mut SectionEval) -> Option<MapRule> {
    let path: Vec<&str> = r.path.iter().map(|i| i.name.as_str()).collect();
    let path = path.join(".");
    let span = r.path.first().map(|i| i.span.to(r.path.last().expect("non-empty").span)).unwrap_or(r.span);
    if path == "_" {
        if !r.picks.is_empty() || r.layout.is_some() {
            ev.diags.push(
                Diag::error(format!("tensor `{}` is ignored (`= _`) but given a slice or a layout", r.name))
                    .at(r.span, "here")
                    .help("an ignored tensor takes neither: write `\"name\" = _`"),
            );
            return None;
        }
        return Some(MapRule { name: r.name.clone(), target: None, span: r.span });
    }
    if r.name.contains('*') {
        ev.diags.push(
            Diag::error(format!("tensor name `{}` has a `*`, but it maps to a parameter", r.name))
                .at(r.name_span, "a pattern")
                .help("only ignored names (`= _`) may be patterns; name the tensor exactly"),
        );
        return None;
    }
    let Some(pi) = params.iter().position(|p| p.path == path) else {
        let help = unknown_help("parameter", &path, params.iter().map(|p| p.path.as_str()));
        ev.diags.push(
            Diag::error(format!("`{path}` is not a parameter of the model"))
                .at(span, "no such parameter")
                .help(format!("{help} (`tessera inspect SPEC` lists the parameter paths)")),
        );
        return None;
    };
    let p = &params[pi];
    let dims = &p.ty.dims;
    let stacked = dims.first().is_some_and(|d| d.name == "layer");
    let holes: Vec<&str> = r.name.match_indices('{').map(|(i, _)| &r.name[i..]).collect();
    let ok_holes = holes.iter().all(|h| h.starts_with("{layer}"));
    if !ok_holes || r.name.matches('}').count() != holes.len() {
        ev.diags.push(
            Diag::error(format!("tensor name `{}` has a placeholder other than `{{layer}}`", r.name))
                .at(r.name_span, "here")
                .help("`{layer}` stands for the layer index of a stacked parameter; no other placeholder exists"),
        );
        return None;
    }
    if stacked == holes.is_empty() {
        let d = match stacked {
            true => Diag::error(format!("`{path}` is stacked over `layer`, but `{}` has no `{{layer}}`", r.name))
                .at(r.name_span, "one name for every layer")
                .help("put `{layer}` where the checkpoint's name has the layer index, e.g. `h.{layer}.attn.c_attn.weight`"),
            false => Diag::error(format!("`{path}` is not stacked, but `{}` has a `{{layer}}`", r.name))
                .at(r.name_span, "a name per layer")
                .help("only parameters of a `repeat` have a layer index; name the tensor without `{layer}`"),
        };
        ev.diags.push(d);
        return None;
    }
    let dim_index = |name: &str| dims.iter().position(|d| d.name == name && d.name != "layer");
    let own: Vec<String> = dims.iter().filter(|d| d.name != "layer").map(|d| d.name.clone()).collect();
    let mut picks = Vec::new();
    for (dim, e) in &r.picks {
        let Some(di) = dim_index(&dim.name) else {
            let help = unknown_help("dim", &dim.name, own.iter().map(String::as_str));
            ev.diags.push(
                Diag::error(format!("`{path}` has no dim `{}`", dim.name))
                    .at(dim.span, format!("{} is {}", path, p.ty))
                    .help(help),
            );
            return None;
        };
        let size = dims[di].size;
        let v = ev.num(e)?;
        if v.fract() != 0.0 || v < 0.0 || v >= size as f64 {
            ev.diags.push(
                Diag::error(format!("index {v} is outside `{}` (size {size})", dim.name))
                    .at(e.span, "not an index of the dim")
                    .help(format!("pick a whole number from 0 to {}", size.saturating_sub(1))),
            );
            return None;
        }
        if picks.iter().any(|&(i, _)| i == di) {
            ev.diags.push(
                Diag::error(format!("dim `{}` is picked twice", dim.name))
                    .at(dim.span, "again")
                    .help("pick each dim once"),
            );
            return None;
        }
        picks.push((di, v as u64));
    }
    let free: Vec<usize> =
        (0..dims.len()).filter(|&i| dims[i].name != "layer" && !picks.iter().any(|&(d, _)| d == i)).collect();
    let whole = |di: usize, rope: bool| Part { dim: di, size: dims[di].size, inner: 1, rope };
    let layout: Vec<Vec<Part>> = match &r.layout {
        None => free.iter().map(|&i| vec![whole(i, false)]).collect(),
        Some(groups) => {
            let mut used: Vec<usize> = Vec::new();
            let mut out = Vec::new();
            // The parameter dim an atom names: one it holds, not yet listed.
            let mut take = |name: &Ident, ev: &mut SectionEval| -> Option<usize> {
                let Some(di) = dim_index(&name.name).filter(|i| free.contains(i)) else {
                    let what = match dim_index(&name.name) {
                        Some(_) => format!("dim `{}` is picked, so the tensor does not hold it", name.name),
                        None => format!("`{path}` has no dim `{}`", name.name),
                    };
                    let names: Vec<&str> = free.iter().map(|&i| dims[i].name.as_str()).collect();
                    ev.diags.push(
                        Diag::error(what)
                            .at(name.span, format!("{} is {}", path, p.ty))
                            .help(format!("the layout lists the dims {} once each", names.join(", "))),
                    );
                    return None;
                };
                if used.contains(&di) {
                    ev.diags.push(
                        Diag::error(format!("dim `{}` is in the layout twice", name.name))
                            .at(name.span, "again")
                            .help("list each dim of the parameter once"),
                    );
                    return None;
                }
                used.push(di);
                Some(di)
            };
            for g in groups {
                match g {
                    LayoutGroup::Unit(_) => out.push(Vec::new()),
                    LayoutGroup::Dims(atoms) => {
                        let mut group = Vec::new();
                        for a in atoms {
                            let di = take(&a.dim, ev)?;
                            if a.rope && !dims[di].size.is_multiple_of(2) {
                                ev.diags.push(
                                    Diag::error(format!(
                                        "`rope({})` splits the dim in halves, but its size {} is odd",
                                        a.dim.name, dims[di].size
                                    ))
                                    .at(a.dim.span, "odd size")
                                    .help("rotary dims have even sizes; is this the right dim?"),
                                );
                                return None;
                            }
                            group.push(whole(di, a.rope));
                        }
                        out.push(group);
                    }
                    LayoutGroup::Split { dim, sizes } => {
                        let di = take(dim, ev)?;
                        let mut vals = Vec::new();
                        for e in sizes {
                            vals.push(ev.count(e, "a split size")?);
                        }
                        let product: u64 = vals.iter().product();
                        if product != dims[di].size {
                            ev.diags.push(
                                Diag::error(format!(
                                    "`{}` has size {}, but its split into ({}) makes {product}",
                                    dim.name,
                                    dims[di].size,
                                    vals.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
                                ))
                                .at(dim.span, "the sizes do not multiply to the dim")
                                .help("the split's sizes are the checkpoint's dims for this one dim, outermost first"),
                            );
                            return None;
                        }
                        let mut inner = product;
                        for v in vals {
                            inner /= v;
                            out.push(vec![Part { dim: di, size: v, inner, rope: false }]);
                        }
                    }
                }
            }
            let missing: Vec<&str> =
                free.iter().filter(|i| !used.contains(i)).map(|&i| dims[i].name.as_str()).collect();
            if !missing.is_empty() {
                ev.diags.push(
                    Diag::error(format!("the layout of `{}` leaves out {}", r.name, missing.join(", ")))
                        .at(r.span, format!("{} is {}", path, p.ty))
                        .help("the layout lists every dim of the parameter (but `layer` and picked dims) once"),
                );
                return None;
            }
            out
        }
    };
    Some(MapRule { name: r.name.clone(), target: Some(MapTarget { param: pi, picks, layout }), span: r.span })
}

/// Each parameter slice is held by one tensor at most: a parameter is named
/// whole once, or sliced by the same dims into distinct slices that cover it.
fn coverage(d: &WeightsDef, model: &str, rules: &[MapRule], params: &[Param], ev: &mut SectionEval) {
    let mut by_param: BTreeMap<usize, Vec<&MapRule>> = BTreeMap::new();
    for r in rules {
        if let Some(t) = &r.target {
            by_param.entry(t.param).or_default().push(r);
        }
    }
    for (pi, rs) in by_param {
        let p = &params[pi];
        // Each rule's slice: its picked dims and their indices, in dim order.
        let slices: Vec<(Vec<usize>, Vec<u64>)> = rs
            .iter()
            .map(|r| {
                let mut pk = r.target.as_ref().expect("mapped").picks.clone();
                pk.sort();
                pk.into_iter().unzip()
            })
            .collect();
        let first = &slices[0].0;
        if let Some(other) = slices.iter().position(|(dims, _)| dims != first) {
            ev.diags.push(
                Diag::error(format!("`{}` is sliced in two ways", p.path))
                    .at(rs[other].span, "these slices")
                    .also(rs[0].span, "and these")
                    .help("slice a parameter by the same dims in every rule, or name it whole once"),
            );
            continue;
        }
        let mut seen: HashMap<&[u64], usize> = HashMap::new();
        if let Some((a, b)) = slices.iter().enumerate().find_map(|(i, (_, key))| seen.insert(key, i).map(|a| (a, i))) {
            ev.diags.push(
                Diag::error(format!("two tensors hold the same slice of `{}`", p.path))
                    .at(rs[b].span, "this one")
                    .also(rs[a].span, "and this one")
                    .help("each slice of a parameter comes from one tensor; tied weights are one parameter named once"),
            );
            continue;
        }
        let whole: u64 = first.iter().map(|&i| p.ty.dims[i].size).product();
        if (slices.len() as u64) < whole {
            let names: Vec<String> =
                first.iter().map(|&i| format!("{}={}", p.ty.dims[i].name, p.ty.dims[i].size)).collect();
            ev.diags.push(
                Diag::error(format!(
                    "`weights {} for {}` maps {} of the {whole} slices of `{}` over {}",
                    d.format.name,
                    model,
                    slices.len(),
                    p.path,
                    names.join(", ")
                ))
                .at(rs[0].span, "slices")
                .help("map every slice, so that the parameter loads whole"),
            );
        }
    }
}

/// `config { ... }` as a JSON object.
fn object(s: &Section, ev: &mut SectionEval) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for e in &s.entries {
        match e {
            Entry::Value { key, value, .. } => {
                if let Some(v) = json(value, ev) {
                    out.insert(key.name.clone(), v);
                }
            }
            Entry::Sub(sub) => {
                out.insert(sub.name.name.clone(), Value::Object(object(sub, ev)));
            }
            Entry::Rule { span, .. } => ev.diags.push(
                Diag::error("`config` holds `key = value` entries, not layout rules")
                    .at(*span, "a rule")
                    .help("write the checkpoint's config.json keys: `hidden_size = embed`"),
            ),
        }
    }
    out
}

/// A config value: a string, a boolean, a list, or a number (a whole
/// number is written as an integer, as `config.json` files have them).
fn json(e: &Expr, ev: &mut SectionEval) -> Option<Value> {
    Some(match &e.kind {
        ExprKind::Str(s) => Value::String(s.clone()),
        ExprKind::Bool(b) => Value::Bool(*b),
        ExprKind::List(xs) | ExprKind::Tuple(xs) => {
            Value::Array(xs.iter().map(|x| json(x, ev)).collect::<Option<_>>()?)
        }
        ExprKind::Name(n) if n == "null" => Value::Null,
        _ => {
            let v = ev.num(e)?;
            if v.fract() == 0.0 && v.abs() < 9.0e15 { Value::from(v as i64) } else { Value::from(v) }
        }
    })
}
