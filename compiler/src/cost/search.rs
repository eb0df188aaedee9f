//! Layout search: every way to lay a spec out on N GPUs of one kind, the
//! ones that cannot run dropped (with counts by reason), the rest ranked by
//! predicted step time.
//!
//! The search keeps the spec's layout rules — which dims go on its data,
//! tensor and pipeline axes, sequence parallelism, where experts go — and
//! varies the sizes: tensor degree (up to the GPUs of one node), pipeline
//! degree, data degree (the rest of the world), expert degree (experts on
//! the data axis, or every expert on every rank), ZeRO stage, microbatch
//! size, pipeline schedule (1F1B, GPipe, interleaved with 2 or 4 chunks)
//! and recompute (none, selective, full). A spec with no tensor axis gets
//! Megatron's rules (`heads`, `kv_heads`, `mlp`, and `vocab` where it
//! divides); with no pipeline axis, `layer -> pipeline`.
//!
//! Each tensor degree (and data degree, when experts sit on the data axis)
//! is checked once by the real checker, so every rule the checker enforces
//! (heads, kv heads, MLP and vocabulary divisible, expert placement) rejects
//! candidates with its own message. Pipeline, data, ZeRO, schedule,
//! recompute and microbatch size change no per-rank shape, so those
//! candidates are priced from the same checked model by
//! [`time::estimate_for`] and [`super::memory::worst_for`].

use super::time;
use crate::config::{Parallel, Recompute, Schedule};
use crate::device::Device;
use crate::model::Model;
use crate::parallel::mesh::MAX_WORLD;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// One layout the search considered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layout {
    /// Axis name to size, in rank order (outermost first).
    pub mesh: Vec<(String, u64)>,
    /// The layout rules the search wrote, as `--set` overrides.
    #[serde(skip)]
    pub rules: Vec<String>,
    /// Expert-parallel degree: the data degree when experts are laid out on
    /// the data axis, 1 when every rank holds every expert.
    pub expert: u64,
    pub zero: u8,
    pub micro_batch: u64,
    pub schedule: Schedule,
    pub virtual_stages: u64,
    pub recompute: Recompute,
}

impl Layout {
    /// The `--set` overrides that write this layout into the spec.
    pub fn overrides(&self) -> Vec<String> {
        let mut o: Vec<String> = self.mesh.iter().map(|(a, n)| format!("parallel.mesh.{a}={n}")).collect();
        o.extend(self.rules.iter().cloned());
        o.push(format!("parallel.zero={}", self.zero));
        o.push(format!("train.micro_batch={}", self.micro_batch));
        o.push(format!("parallel.pipeline.schedule={}", self.schedule.name()));
        o.push(format!("parallel.pipeline.virtual={}", self.virtual_stages));
        o.push(format!("parallel.recompute={}", self.recompute.name()));
        o
    }

    /// `data 8 × tensor 8 × pipeline 16, 1f1b, mb 1, zero 1, recompute full`.
    pub fn text(&self) -> String {
        let mut mesh: Vec<String> = self.mesh.iter().filter(|(_, n)| *n > 1).map(|(a, n)| format!("{a} {n}")).collect();
        if mesh.is_empty() {
            mesh.push("one GPU".into());
        }
        let schedule = match self.schedule {
            Schedule::Interleaved1f1b => format!("interleaved×{}", self.virtual_stages),
            s => s.name().to_string(),
        };
        let experts = if self.expert > 1 { format!(" (expert {})", self.expert) } else { String::new() };
        format!(
            "{}{experts}, {schedule}, mb {}, zero {}, recompute {}",
            mesh.join(" × "),
            self.micro_batch,
            self.zero,
            self.recompute.name()
        )
    }
}

/// A layout that fits, with its prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub layout: Layout,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    pub tflops_per_gpu: f64,
    pub mfu: f64,
    pub memory_max_bytes: u64,
    pub memory_max_rank: u64,
}

/// What a search found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Search {
    pub world: u64,
    pub device: String,
    /// Layouts considered.
    pub considered: usize,
    /// Rejected layouts, counted by reason.
    pub rejected: BTreeMap<String, usize>,
    /// Every layout that fits, fastest first (ties: less memory first).
    pub candidates: Vec<Candidate>,
}

/// The spec's axes for each role, and the layout rules the search writes.
struct Roles {
    data: String,
    tensor: String,
    pipeline: String,
    /// Dims on the tensor axis: (dim, only when it divides).
    tensor_dims: Vec<(String, bool)>,
    /// Axes of the spec's mesh with no role: set to 1.
    others: Vec<String>,
    /// Experts are laid out on the data axis (so the data degree changes shapes).
    /// The model's expert dim, if it routes tokens to experts.
    expert_dim: Option<String>,
}

fn roles(m: &Model) -> Roles {
    let p = &m.parallel;
    let data = p.data_axis().unwrap_or("data").to_string();
    let tensor = p.axis_of("heads").or_else(|| p.axis_of("mlp")).unwrap_or("tensor").to_string();
    let pipeline = p.axis_of("layer").unwrap_or("pipeline").to_string();
    let mut tensor_dims: Vec<(String, bool)> =
        p.layout.iter().filter(|(_, a)| *a == tensor).map(|(d, _)| (d.clone(), false)).collect();
    if tensor_dims.is_empty() {
        // Megatron's dims by their conventional names, a tower's included
        // (`text_heads`, `image_mlp`: the names blocks are passed, docs/language.md).
        let megatron = |d: &str| {
            ["heads", "kv_heads", "mlp"].iter().any(|n| d == *n || d.strip_suffix(n).is_some_and(|p| p.ends_with('_')))
        };
        for (d, _) in &m.consts {
            if megatron(d) {
                tensor_dims.push((d.clone(), false));
            }
        }
        if m.const_value("vocab").is_some() {
            tensor_dims.push(("vocab".to_string(), true));
        }
    }
    let others =
        p.mesh.iter().map(|(a, _)| a.clone()).filter(|a| *a != data && *a != tensor && *a != pipeline).collect();
    let expert_dim = m.expert_dim().map(str::to_string);
    Roles { data, tensor, pipeline, tensor_dims, others, expert_dim }
}

/// The divisors of `n`, ascending, from its prime factors (`n` is at most
/// [`MAX_WORLD`], so trial division stops at 1,024).
fn divisors(n: u64) -> Vec<u64> {
    let mut factors: Vec<(u64, u32)> = Vec::new();
    let (mut rest, mut p) = (n, 2u64);
    while p.saturating_mul(p) <= rest {
        let mut k = 0;
        while rest.is_multiple_of(p) {
            rest /= p;
            k += 1;
        }
        if k > 0 {
            factors.push((p, k));
        }
        p += 1;
    }
    if rest > 1 {
        factors.push((rest, 1));
    }
    let mut out = vec![1u64];
    for (p, k) in factors {
        let before = out.clone();
        let mut pk = 1u64;
        for _ in 0..k {
            pk *= p;
            out.extend(before.iter().map(|d| d * pk));
        }
    }
    out.sort_unstable();
    out
}

/// Search the layouts of `m` on `world` GPUs of `dev`. `recheck(o, mbs)`
/// checks the spec with extra `--set` overrides `o` and `mbs` sequences per
/// microbatch (and no memory check) and returns the checker's first error
/// on failure.
pub fn search(
    m: &Model,
    world: u64,
    dev: &Device,
    mut recheck: impl FnMut(&[String], u64) -> Result<Model, String>,
) -> Result<Search, String> {
    let train =
        m.train.as_ref().ok_or_else(|| format!("`{}` has no `train` section: a search is for training", m.name))?;
    let batch = train.batch;
    if world == 0 || world > MAX_WORLD {
        return Err(format!("--world must be from 1 to {MAX_WORLD} GPUs (docs/reliability.md), not {world}"));
    }
    let r = roles(m);
    let adafactor = matches!(train.optimizer, crate::config::Optimizer::Adafactor { .. });
    let layers = m.stacks.iter().map(|s| s.layers).min().unwrap_or(1);
    let gpn = dev.gpus_per_node.max(1) as u64;
    let mut rejected: BTreeMap<String, usize> = BTreeMap::new();
    let reject = |rejected: &mut BTreeMap<String, usize>, why: String, n: usize| *rejected.entry(why).or_default() += n;
    let mut checked: HashMap<(u64, u64, u64), Result<Model, String>> = HashMap::new();
    let mut candidates = Vec::new();
    let mut considered = 0usize;
    let schedules =
        [(Schedule::OneFOneB, 1), (Schedule::Gpipe, 1), (Schedule::Interleaved1f1b, 2), (Schedule::Interleaved1f1b, 4)];
    let recomputes = [Recompute::None, Recompute::Selective, Recompute::Full];
    let micro_batches = [1u64, 2, 4, 8];
    let mixes = !m.batch_mixing(1, 1, 1).is_empty();
    // (tensor, pipeline, experts on the data axis): the expert-parallel
    // degree is the data degree, or 1 with every expert on every rank.
    let mut meshes = Vec::new();
    for t in divisors(world) {
        for p in divisors(world / t) {
            if r.expert_dim.is_some() && world / (t * p) > 1 {
                meshes.push((t, p, true));
            }
            meshes.push((t, p, false));
        }
    }
    for (t, p, on_data) in meshes {
        let dp = world / (t * p);
        let scheds: &[(Schedule, u64)] = if p == 1 { &schedules[..1] } else { &schedules };
        // ZeRO shards flat slices, which Adafactor's factored moments cannot take (the checker says so).
        let zeros: &[u8] = if dp == 1 || adafactor { &[0] } else { &[0, 1, 2, 3] };
        let per = scheds.len() * zeros.len() * recomputes.len();
        // A model that relates examples across the batch (a contrastive
        // loss) also runs one microbatch of the whole batch per data rank.
        let mut mbs_list = micro_batches.to_vec();
        if mixes && batch.is_multiple_of(dp) && !mbs_list.contains(&(batch / dp)) {
            mbs_list.push(batch / dp);
        }
        let n = per * mbs_list.len();
        considered += n;
        if t > gpn {
            reject(&mut rejected, format!("tensor parallel across nodes (more than {gpn} GPUs per tensor group)"), n);
            continue;
        }
        if p > 1 && m.stacks.len() != 1 {
            let why = format!("pipeline parallelism needs one `repeat` of layers (the model has {})", m.stacks.len());
            reject(&mut rejected, why, n);
            continue;
        }
        let key = (t, if on_data { dp } else { 1 });
        let mut rules = vec![format!("parallel.layout.batch={}", r.data)];
        if m.stacks.len() == 1 {
            rules.push(format!("parallel.layout.layer={}", r.pipeline));
        }
        for (d, optional) in &r.tensor_dims {
            let divides = m.const_value(d).is_some_and(|v| (v as u64).is_multiple_of(t));
            if !optional || divides {
                rules.push(format!("parallel.layout.{d}={}", r.tensor));
            }
        }
        if let Some(e) = &r.expert_dim {
            rules.push(format!("parallel.layout.{e}={}", if on_data { r.data.as_str() } else { "none" }));
        }
        let overrides = {
            let mut o = vec![
                format!("parallel.mesh.{}={}", r.data, key.1),
                format!("parallel.mesh.{}={t}", r.tensor),
                format!("parallel.mesh.{}=1", r.pipeline),
                "parallel.pipeline.schedule=1f1b".into(),
                "parallel.pipeline.virtual=1".into(),
            ];
            o.extend(r.others.iter().map(|a| format!("parallel.mesh.{a}=1")));
            o.extend(rules.iter().cloned());
            o
        };
        let mut mesh = vec![(r.pipeline.clone(), p), (r.data.clone(), dp)];
        mesh.extend(r.others.iter().map(|a| (a.clone(), 1)));
        mesh.push((r.tensor.clone(), t));
        for &mbs in &mbs_list {
            if !batch.is_multiple_of(dp * mbs) {
                let why = format!("the batch ({batch}) does not split into microbatches over the data ranks");
                reject(&mut rejected, why, per);
                continue;
            }
            // Checked at this microbatch: the costs a layout is priced from
            // are the full re-check's (a pass's kernels and collective calls
            // do not grow with the microbatch; its FLOPs and bytes do).
            let base = checked.entry((key.0, key.1, mbs)).or_insert_with(|| recheck(&overrides, mbs));
            let base = match base {
                Ok(b) => b,
                Err(e) => {
                    reject(&mut rejected, e.clone(), per);
                    continue;
                }
            };
            let micro = batch / (dp * mbs);
            // Ops that relate examples across the batch, and what they need.
            let mixing = m.batch_mixing(mbs, dp, p).first().map(|mix| {
                let op = m.graph.nodes[mix.node].op.name();
                let needs = if mix.gathers {
                    "one microbatch per data rank and no pipeline"
                } else {
                    "the whole batch in one microbatch"
                };
                format!("`{op}` {}, which needs {needs}", mix.what)
            });
            for &(schedule, v) in scheds {
                for &zero in zeros {
                    for &recompute in &recomputes {
                        if !layers.is_multiple_of(p * v) {
                            reject(&mut rejected, "layers do not divide into stages × chunks".into(), 1);
                            continue;
                        }
                        if p > 1 && micro < p {
                            reject(&mut rejected, "fewer microbatches than pipeline stages".into(), 1);
                            continue;
                        }
                        if let Some(why) = &mixing {
                            reject(&mut rejected, why.clone(), 1);
                            continue;
                        }
                        if schedule == Schedule::Interleaved1f1b && !micro.is_multiple_of(p) {
                            let why = "interleaved 1F1B needs microbatches divisible by stages";
                            reject(&mut rejected, why.into(), 1);
                            continue;
                        }
                        let mut par: Parallel = base.parallel.clone();
                        par.mesh = mesh.clone();
                        par.zero = zero;
                        par.recompute = recompute;
                        par.pipeline.schedule = schedule;
                        par.pipeline.virtual_stages = v;
                        par.pipeline.microbatches = micro;
                        let e = match time::estimate_for(base, &par, mbs, batch, dev) {
                            Ok(e) => e,
                            Err(e) => {
                                reject(&mut rejected, e, 1);
                                continue;
                            }
                        };
                        if e.memory_max.total > dev.memory {
                            let why = format!("out of memory (a rank needs over {} GiB)", dev.memory >> 30);
                            reject(&mut rejected, why, 1);
                            continue;
                        }
                        candidates.push(Candidate {
                            layout: Layout {
                                mesh: mesh.clone(),
                                rules: rules.clone(),
                                expert: if on_data { dp } else { 1 },
                                zero,
                                micro_batch: mbs,
                                schedule,
                                virtual_stages: v,
                                recompute,
                            },
                            step_time_s: e.step_time_s,
                            tokens_per_s: e.tokens_per_s,
                            tflops_per_gpu: e.tflops_per_gpu,
                            mfu: e.mfu,
                            memory_max_bytes: e.memory_max.total,
                            memory_max_rank: e.memory_max_rank as u64,
                        });
                    }
                }
            }
        }
    }
    candidates
        .sort_by(|a, b| a.step_time_s.total_cmp(&b.step_time_s).then(a.memory_max_bytes.cmp(&b.memory_max_bytes)));
    Ok(Search { world, device: dev.name.clone(), considered, rejected, candidates })
}

#[cfg(test)]
mod tests {
    #[test]
    fn divisors_ascend() {
        assert_eq!(super::divisors(1), vec![1]);
        assert_eq!(super::divisors(12), vec![1, 2, 3, 4, 6, 12]);
        assert_eq!(super::divisors(49), vec![1, 7, 49]);
        assert_eq!(super::divisors(1_000_000_007), vec![1, 1_000_000_007]);
        assert_eq!(super::divisors(1 << 20).len(), 21);
        assert_eq!(super::divisors(720_720).len(), 240);
    }
}
