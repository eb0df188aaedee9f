//! Layout validation: the mesh against the model. World size, divisibility
//! of every laid-out dim, one axis per tensor dim, schedule preconditions,
//! expert placement coverage, and memory per rank against the device.

use super::sections::ParallelSpans;
use crate::config::{ExpertPlacement, Parallel, Schedule, Train};
use crate::diag::{Diag, Diags, unknown_help};
use crate::model::Model;
use crate::parallel::mesh::MAX_WORLD;
use crate::syntax::span::Span;

pub(crate) fn divisors(n: u64) -> Vec<u64> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut i = 1;
    while i * i <= n {
        if n.is_multiple_of(i) {
            small.push(i);
            if i * i != n {
                large.push(n / i);
            }
        }
        i += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

fn legal(n: u64) -> String {
    let d = divisors(n);
    let shown: Vec<String> = d.iter().take(16).map(|x| x.to_string()).collect();
    if d.len() > 16 { format!("{}, ...", shown.join(", ")) } else { shown.join(", ") }
}

fn anchor(spans: &ParallelSpans) -> Span {
    spans.section.unwrap_or_default()
}

/// Sequences per microbatch per data-parallel rank.
///
/// With `micro_batch` given and no explicit `microbatches`, the microbatch
/// count is derived (batch / (data × micro_batch)), as Megatron does.
pub(super) fn micro_batch(p: &mut Parallel, train: Option<&Train>, spans: &ParallelSpans, diags: &mut Diags) -> u64 {
    let Some(t) = train else { return 1 };
    let mb = micro_batch_of(p, t, spans, diags);
    // Each step of a batch ramp-up is whole microbatches on every data rank.
    let unit = p.data().max(1).saturating_mul(mb);
    if let Some(r) = &t.rampup
        && (r.start % unit != 0 || r.increment % unit != 0)
    {
        diags.push(
            Diag::error(format!(
                "the batch ramp-up (start {}, increment {}) is not in whole steps of data {} × micro_batch {mb}",
                r.start,
                r.increment,
                p.data().max(1)
            ))
            .at(anchor(spans), "a ramp-up batch does not split evenly")
            .help(format!("make `start` and `increment` multiples of {unit} sequences")),
        );
    } else if let Some(r) = &t.rampup
        && p.stages() > 1
    {
        // Every batch of the ramp-up runs the pipeline's schedule.
        let (first, step, stages) = (r.start / unit, r.increment / unit, p.stages());
        let interleaved = p.pipeline.schedule == Schedule::Interleaved1f1b;
        let fits = match p.pipeline.schedule {
            Schedule::Gpipe => true,
            _ => first >= stages && (!interleaved || (first % stages == 0 && step % stages == 0)),
        };
        if !fits {
            diags.push(
                Diag::error(format!(
                    "the batch ramp-up's steps of {first} + k·{step} microbatches do not run {} over {stages} stages",
                    p.pipeline.schedule.name()
                ))
                .at(anchor(spans), "a ramp-up batch the pipeline cannot schedule")
                .help(format!(
                    "start the ramp-up at {} sequences or more{}",
                    stages * unit,
                    if interleaved {
                        format!(", with an increment that is a multiple of {}", stages * unit)
                    } else {
                        String::new()
                    }
                )),
            );
        }
    }
    mb
}

fn micro_batch_of(p: &mut Parallel, t: &Train, spans: &ParallelSpans, diags: &mut Diags) -> u64 {
    let dp = p.data().max(1);
    // Point at the data axis (what usually changed), else at the section.
    let data_span = p.data_axis().and_then(|a| spans.mesh.get(a)).copied().unwrap_or(anchor(spans));
    let m = p.pipeline.microbatches.max(1);
    match t.micro_batch {
        Some(mb) => {
            if !t.batch.is_multiple_of(dp.saturating_mul(mb)) {
                diags.push(
                    Diag::error(format!("global batch {} is not divisible by data {dp} × micro_batch {mb}", t.batch))
                        .at(data_span, "batch does not split evenly")
                        .help(format!("use a global batch that is a multiple of {}", dp.saturating_mul(mb))),
                );
            } else if spans.microbatches.is_none() {
                p.pipeline.microbatches = t.batch / dp.saturating_mul(mb);
            } else if t.batch / (dp.saturating_mul(mb)) != m {
                diags.push(
                    Diag::error(format!(
                        "pipeline microbatches = {m}, but batch {} / (data {dp} × micro_batch {mb}) = {}",
                        t.batch,
                        t.batch / (dp.saturating_mul(mb))
                    ))
                    .at(spans.microbatches.unwrap_or(anchor(spans)), "inconsistent microbatch count")
                    .help("drop `microbatches` (it follows from batch / (data × micro_batch)), or make the two agree"),
                );
            }
            mb
        }
        None => {
            if !t.batch.is_multiple_of(dp.saturating_mul(m)) {
                let legal_m: Vec<String> =
                    divisors(t.batch / dp.min(t.batch).max(1)).into_iter().take(12).map(|x| x.to_string()).collect();
                diags.push(
                    Diag::error(format!("global batch {} is not divisible by data {dp} × microbatches {m}", t.batch))
                        .at(spans.microbatches.unwrap_or(data_span), "batch does not split evenly")
                        .help(format!(
                            "choose a batch that is a multiple of {}, or microbatches from: {}",
                            dp.saturating_mul(m),
                            legal_m.join(", ")
                        )),
                );
                1
            } else {
                t.batch / (dp.saturating_mul(m))
            }
        }
    }
}

pub(super) fn validate(m: &Model, spans: &ParallelSpans, diags: &mut Diags) {
    let p = &m.parallel;
    let at = anchor(spans);
    let world = p.world();
    if let Some((w, s)) = spans.world
        && w != world
    {
        let axes: Vec<String> = p.mesh.iter().map(|(a, n)| format!("{a} {n}")).collect();
        diags.push(
            Diag::error(format!("the mesh has {world} ranks ({}), but world = {w}", axes.join(" × ")))
                .at(s, "world size")
                .help("the product of the mesh axes must equal the world size"),
        );
    }
    if world > MAX_WORLD {
        diags.push(
            Diag::error(format!("the mesh has {world} ranks, more than any cluster Tessera plans for ({MAX_WORLD})"))
                .at(at, "mesh too large")
                .help("check the mesh axis sizes"),
        );
        return;
    }
    if p.zero > 0
        && let Some(t) = &m.train
        && matches!(t.optimizer, crate::config::Optimizer::Adafactor { .. })
    {
        diags.push(
            Diag::error(format!("ZeRO stage {} cannot shard Adafactor's state", p.zero))
                .at(spans.zero.unwrap_or(at), "ZeRO shards flat slices of each parameter")
                .note(
                    "Adafactor keeps a matrix's second moment as its row and column means, which a flat slice cuts across",
                )
                .help("set `zero = 0`: Adafactor's state is already about 1/rows of AdamW's; or use adamw"),
        );
    }
    let axes: Vec<&str> = p.mesh.iter().map(|(a, _)| a.as_str()).collect();
    let mut dim_names: Vec<&str> = m.consts.iter().map(|(n, _)| n.as_str()).collect();
    dim_names.extend(["layer", "batch"]);
    for (d, a) in &p.layout {
        let span = spans.rules.get(d).copied().unwrap_or(at);
        if !axes.contains(&a.as_str()) {
            let help = unknown_help("mesh axis", a, axes.iter().copied());
            diags.push(
                Diag::error(format!("layout maps `{d}` to `{a}`, which is not a mesh axis"))
                    .at(span, "unknown axis")
                    .help(help),
            );
            continue;
        }
        if !dim_names.contains(&d.as_str()) && !m.value_dims.iter().any(|(ds, _)| ds.iter().any(|x| x == d)) {
            let help = unknown_help("dim", d, dim_names.iter().copied());
            diags.push(
                Diag::error(format!("layout names `{d}`, which is not a dim of the model"))
                    .at(span, "unknown dim")
                    .help(help),
            );
            continue;
        }
        let n = p.axis_size(a);
        if d == "layer" || d == "batch" {
            continue;
        }
        // A model dim, or a dim a block declares on a parameter (`qkv = 3`).
        let size = m
            .const_value(d)
            .map(|x| x as u64)
            .or_else(|| m.params.iter().flat_map(|q| q.ty.dims.iter()).find(|x| x.name == *d).map(|x| x.size));
        if let Some(size) = size
            && !size.is_multiple_of(n)
        {
            diags.push(
                Diag::error(format!("`{d}` = {size} is not divisible by the `{a}` axis of size {n}"))
                    .at(span, "uneven split")
                    .help(format!("legal `{a}` degrees for `{d}`: {}", legal(size))),
            );
        }
    }
    // Every axis with more than one rank must split something.
    for (a, n) in &p.mesh {
        if *n > 1 && !p.layout.iter().any(|(_, x)| x == a) {
            let s = spans.mesh.get(a).copied().unwrap_or(at);
            let others = p.mesh.iter().map(|(x, _)| x.as_str()).filter(|x| x != a);
            if let Some(similar) = crate::diag::suggest(a, others) {
                diags.push(
                    Diag::error(format!("mesh axis `{a}` ({n} ranks) is used by no layout rule"))
                        .at(s, "a new axis")
                        .help(format!("did you mean `{similar}`?")),
                );
                continue;
            }
            diags.push(
                Diag::error(format!("mesh axis `{a}` ({n} ranks) is used by no layout rule"))
                    .at(s, "every rank along it would compute the same thing")
                    .help(format!("map a dim to it, e.g. `batch -> {a}` for data parallelism, or set its size to 1")),
            );
        }
    }
    // A tensor never maps two of its dims onto one axis.
    let mut reported = std::collections::HashSet::new();
    let param_dims = m
        .params
        .iter()
        .map(|p| (p.ty.dims.iter().map(|d| d.name.clone()).collect::<Vec<_>>(), p.span, Some(p.path.as_str())));
    // Routing values (router logits, dispatched tokens) carry both token dims
    // and the expert dim: the all-to-all moves them between the two layouts,
    // so only parameters and the other values are held to one split per axis.
    let routed: Vec<&str> = m.routings.iter().map(|r| r.expert_dim.as_str()).collect();
    let value_dims = m
        .value_dims
        .iter()
        .filter(|(d, _)| !d.iter().any(|x| routed.contains(&x.as_str())))
        .map(|(d, s)| (d.clone(), *s, None));
    for (dims, span, path) in param_dims.chain(value_dims) {
        let mut by_axis: Vec<(&str, &str)> = Vec::new();
        for d in &dims {
            if let Some(a) = p.axis_of(d) {
                if let Some((other, _)) = by_axis.iter().find(|(_, x)| *x == a) {
                    let (x, y) = if *other < d.as_str() {
                        (other.to_string(), d.clone())
                    } else {
                        (d.clone(), other.to_string())
                    };
                    let key = (x, y, a.to_string());
                    if reported.insert(key) {
                        let what = path.map(|p| format!("param `{p}`")).unwrap_or_else(|| "a value".into());
                        diags.push(
                            Diag::error(format!("{what} maps two dims, `{other}` and `{d}`, onto the `{a}` axis"))
                                .at(span, format!("[{}]", dims.join(", ")))
                                .also(spans.rules.get(d).copied().unwrap_or(at), "this rule")
                                .also(spans.rules.get(*other).copied().unwrap_or(at), "and this one")
                                .help(format!(
                                    "a tensor can be split along `{a}` only once; map one of them to another axis"
                                )),
                        );
                    }
                }
                by_axis.push((d.as_str(), a));
            }
        }
    }
    // Pipeline preconditions.
    let stages = p.stages();
    let v = p.pipeline.virtual_stages;
    let mb = p.pipeline.microbatches;
    let sched_span = spans.schedule.unwrap_or(at);
    if stages > 1 {
        if m.stacks.is_empty() {
            diags.push(
                Diag::error("`layer` is laid out on a pipeline axis, but the model has no `repeat`")
                    .at(spans.rules.get("layer").copied().unwrap_or(at), "nothing to split")
                    .help("pipeline parallelism splits repeated layers; remove the rule"),
            );
        }
        for s in &m.stacks {
            if s.layers % (stages.saturating_mul(v)) != 0 {
                let what = if v > 1 { format!("{stages} stages × {v} virtual") } else { format!("{stages} stages") };
                let legal_stages: Vec<String> = divisors(s.layers)
                    .into_iter()
                    .filter(|&d| s.layers % d.saturating_mul(v) == 0)
                    .map(|x| x.to_string())
                    .take(16)
                    .collect();
                let help = if legal_stages.is_empty() {
                    format!(
                        "{v} virtual stages do not divide {} layers; use a `virtual` that does, or `schedule = 1f1b`",
                        s.layers
                    )
                } else {
                    format!(
                        "legal pipeline degrees for {} layers{}: {}",
                        s.layers,
                        if v > 1 { format!(" with {v} virtual stages") } else { String::new() },
                        legal_stages.join(", ")
                    )
                };
                diags.push(
                    Diag::error(format!("{} layers of `{}` do not divide into {what}", s.layers, s.label))
                        .at(spans.rules.get("layer").copied().unwrap_or(at), "uneven pipeline")
                        .help(help),
                );
            }
        }
        match p.pipeline.schedule {
            Schedule::OneFOneB | Schedule::Interleaved1f1b if mb < stages => {
                diags.push(
                    Diag::error(format!(
                        "{} needs at least as many microbatches as stages: {mb} < {stages}",
                        p.pipeline.schedule.name()
                    ))
                    .at(spans.microbatches.unwrap_or(sched_span), "too few microbatches")
                    .help(format!("set `microbatches` to {stages} or more, or use `schedule = gpipe`")),
                );
            }
            Schedule::Interleaved1f1b if v < 2 => diags.push(
                Diag::error("interleaved_1f1b needs `virtual` of 2 or more")
                    .at(sched_span, "no virtual stages")
                    .help("set `virtual = 2` (model chunks per stage), or use `schedule = 1f1b`"),
            ),
            Schedule::Interleaved1f1b if !mb.is_multiple_of(stages) => diags.push(
                Diag::error(format!("interleaved_1f1b needs microbatches divisible by the {stages} stages, got {mb}"))
                    .at(spans.microbatches.unwrap_or(sched_span), "uneven")
                    .help(format!("use a multiple of {stages}")),
            ),
            _ => {}
        }
    }
    if v > 1 && p.pipeline.schedule != Schedule::Interleaved1f1b {
        diags.push(
            Diag::error(format!(
                "`virtual = {v}` only applies to interleaved_1f1b, but the schedule is {}",
                p.pipeline.schedule.name()
            ))
            .at(spans.virtual_stages.unwrap_or(sched_span), "virtual stages unused")
            .help("set `schedule = interleaved_1f1b`, or remove `virtual`"),
        );
    }
    if p.sequence_parallel && p.axis_of("heads").or_else(|| p.axis_of("mlp")).is_none() {
        diags.push(
            Diag::error("sequence parallelism needs tensor parallelism")
                .at(spans.sequence_parallel.unwrap_or(at), "no tensor-parallel axis")
                .help("map `heads` (and `mlp`) to an axis, e.g. `heads -> tensor`"),
        );
    }
    // Experts.
    if let Some(x) = &p.experts {
        let Some(r) = m.routings.first() else {
            diags.push(
                Diag::error("`experts` is configured, but the model routes no tokens")
                    .at(spans.placement.unwrap_or(at), "no `top_k` in the model")
                    .help("remove the `experts` settings, or add an MoE block"),
            );
            return;
        };
        let e = r.experts;
        let axis = p.axis_of(&r.expert_dim);
        let n = axis.map(|a| p.axis_size(a)).unwrap_or(1);
        let pspan = spans.placement.unwrap_or(at);
        match &x.placement {
            ExpertPlacement::Explicit { ranks } => {
                if ranks.len() as u64 != n {
                    let a = axis.unwrap_or("(none)");
                    diags.push(
                        Diag::error(format!(
                            "placement lists {} ranks, but experts are split over `{a}` of size {n}",
                            ranks.len()
                        ))
                        .at(pspan, "wrong number of ranks")
                        .help(format!("give one list of experts for each of the {n} ranks")),
                    );
                }
                let mut count: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
                let mut out_of_range = Vec::new();
                for id in ranks.iter().flatten() {
                    if *id < e {
                        *count.entry(*id).or_default() += 1;
                    } else {
                        out_of_range.push(*id);
                    }
                }
                let dup: Vec<String> = count.iter().filter(|(_, c)| **c > 1).map(|(i, _)| i.to_string()).collect();
                let absent = e - count.len() as u64;
                let missing: Vec<String> = if absent == 0 {
                    Vec::new()
                } else {
                    let listed: Vec<String> =
                        (0..e).filter(|i| !count.contains_key(i)).take(16).map(|i| i.to_string()).collect();
                    if absent > 16 { vec![format!("{} ... ({absent} in all)", listed.join(", "))] } else { listed }
                };
                if !missing.is_empty() || !dup.is_empty() || !out_of_range.is_empty() {
                    let mut parts = Vec::new();
                    if !missing.is_empty() {
                        parts.push(format!("missing {}", missing.join(", ")));
                    }
                    if !dup.is_empty() {
                        parts.push(format!("placed more than once {}", dup.join(", ")));
                    }
                    if !out_of_range.is_empty() {
                        parts.push(format!(
                            "not experts (0..{}) {}",
                            e - 1,
                            out_of_range.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
                        ));
                    }
                    diags.push(
                        Diag::error(format!(
                            "the placement must hold each of the {e} experts exactly once: {}",
                            parts.join("; ")
                        ))
                        .at(pspan, "incomplete placement")
                        .help("list every expert id from 0 once across the ranks"),
                    );
                }
            }
            _ => {
                if e % n != 0 {
                    diags.push(
                        Diag::error(format!("{e} experts do not split evenly over {n} ranks"))
                            .at(pspan, "uneven placement")
                            .help(format!("use an expert-parallel degree from: {}", legal(e))),
                    );
                }
            }
        }
    }
}

/// The batch-mixing ops of a run refused with a diagnostic each
/// ([`Model::batch_mixing`] is the rule).
pub(super) fn batch_mixing(m: &Model, diags: &mut Diags) {
    let Some(t) = &m.train else { return };
    let dp = m.parallel.data().max(1);
    for crate::model::BatchMixing { node: i, what, .. } in m.batch_mixing(m.micro_batch, dp, m.parallel.stages()) {
        let why = if m.micro_batch * dp < t.batch {
            format!("gradient accumulation runs microbatches of {} sequences", m.micro_batch)
        } else if m.parallel.stages() > 1 {
            "the pipeline runs it per microbatch".to_string()
        } else {
            format!("data parallelism ({dp} ranks) gives each rank microbatches of {} sequences", m.micro_batch)
        };
        diags.push(
            Diag::error(format!(
                "`{}` {what}, which means the global batch of {} sequences; {why}, and each would see only its own",
                m.graph.nodes[i].op.name(),
                t.batch
            ))
            .at(m.graph.span(crate::ir::ValueId(i as u32)), "mixes examples across the batch")
            .help(format!(
                "train on one microbatch of the whole batch (`micro_batch = {}` on one data rank), or, for a \
                 contrastive `rename` of the batch or batch statistics (`sum`, `mean` over `batch`), one \
                 microbatch per data rank without a pipeline (the batch is gathered, or the statistics \
                 all-reduced, over the data axis); other batch-mixing ops are not gathered yet",
                t.batch
            )),
        );
    }
}
