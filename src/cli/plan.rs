//! `tessera plan`: the rank map, memory and communication per rank, the
//! predicted step on a device profile, and the layout search.

use super::{SpecArgs, bytes_text, human, load_with, memory_table, mesh_text};
use serde_json::json;
use std::process::ExitCode;
use tessera_compiler::cost::{self, memory};
use tessera_compiler::{Model, Options, SourceMap};

/// One mesh axis of the rank map: (axis, stride, [(coordinate, [(dim, slice held)])]).
type AxisMap = (String, u64, Vec<(u64, Vec<(String, String)>)>);

/// One rank's communication per step: (rank, [(collective, axis, calls, elements)]).
type RankVolume = (u64, Vec<(String, String, u64, u64)>);

/// The rank map: for each mesh axis, the slice of each dim laid out on it
/// that each coordinate holds.
fn rank_map(m: &Model, mesh: &tessera_compiler::parallel::Mesh) -> Vec<AxisMap> {
    let mut out = Vec::new();
    for (axis, n) in &mesh.order {
        let mut coords = Vec::new();
        for c in 0..*n {
            let mut dims = Vec::new();
            for (d, a) in &m.parallel.layout {
                if a != axis {
                    continue;
                }
                let text = match d.as_str() {
                    "batch" => {
                        let mb = m.micro_batch;
                        let per = m.train.as_ref().map(|t| t.batch).unwrap_or(mb) / n.max(&1);
                        format!("sequences [{}..{}] of each step", c * per, (c + 1) * per)
                    }
                    "layer" => {
                        let layers = m.stacks.first().map(|s| s.layers).unwrap_or(0);
                        let v = m.parallel.chunks_per_stage();
                        let held: Vec<u64> = (0..layers)
                            .filter(|&l| {
                                tessera_compiler::parallel::pipeline::chunk_of_layer(n * v, layers, l) % n == c
                            })
                            .collect();
                        tessera_compiler::ir::indices_text(&held)
                    }
                    _ => match m.const_value(d) {
                        Some(size) => tessera_compiler::ir::indices_text(&mesh.held(d, size as u64, axis, c)),
                        None => continue,
                    },
                };
                dims.push((d.clone(), text));
            }
            coords.push((c, dims));
        }
        let stride: u64 = mesh.order.iter().skip_while(|(a, _)| a != axis).skip(1).map(|(_, s)| s).product();
        out.push((axis.clone(), stride, coords));
    }
    out
}

/// The search's findings, for `plan` to print before the winner's plan.
struct Found<'a> {
    search: &'a tessera_compiler::cost::search::Search,
    seconds: f64,
    top: usize,
    /// Where the spec's own layout ranks (0-based), if it was among the candidates.
    own: Option<usize>,
}

/// Is this candidate the spec's own layout?
fn is_own(base: &Model, c: &tessera_compiler::cost::search::Candidate) -> bool {
    let p = &base.parallel;
    let l = &c.layout;
    let experts_on_data = base.expert_dim().and_then(|d| p.axis_of(d)).is_some_and(|a| Some(a) == p.data_axis());
    l.mesh.iter().all(|(a, n)| p.axis_size(a) == *n)
        && p.world() == l.mesh.iter().map(|(_, n)| n).product::<u64>()
        && l.zero == p.zero
        && l.micro_batch == base.micro_batch
        && l.schedule == p.pipeline.schedule
        && l.virtual_stages == p.chunks_per_stage()
        && l.recompute == p.recompute
        && (l.expert > 1) == experts_on_data
}

/// `tessera plan`: the spec's own layout (its data axis sized to `world`), or
/// with `search` every layout on `world` GPUs, ranked, and the winner's plan.
pub(super) fn command(
    spec: SpecArgs,
    json: bool,
    world: Option<u64>,
    device: Option<String>,
    search: bool,
    top: usize,
) -> ExitCode {
    use tessera_compiler::cost::search as layouts;
    use tessera_compiler::device as devices;
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let mut extra = Vec::new();
    if let Some(d) = &device {
        if devices::device(d).is_none() {
            let known: Vec<&str> = devices::devices().iter().map(|d| d.name.as_str()).collect();
            let problems = devices::errors();
            if !problems.is_empty() {
                return fail(format!(
                    "no device `{d}` is loaded, and some profiles in TESSERA_DEVICES did not load:\n{}\n  help: fix \
                     the profile (format: compiler/devices/*.toml, docs/language.md)",
                    problems.join("\n")
                ));
            }
            return fail(format!(
                "unknown device `{d}`; known: {} (add your own profile with TESSERA_DEVICES, see docs/language.md)",
                known.join(", ")
            ));
        }
        extra.push(format!("train.device={d}"));
    }
    if let Some(w) = world
        && (w == 0 || w > tessera_compiler::check::MAX_WORLD)
    {
        return fail(format!(
            "--world must be from 1 to {} GPUs, not {w} (the largest world Tessera plans for; docs/reliability.md)",
            tessera_compiler::check::MAX_WORLD
        ));
    }
    if !search {
        if let Some(w) = world {
            let probe = match load_with(&spec, &extra, true) {
                Ok(m) => m,
                Err(code) => return code,
            };
            let Some(data) = probe.parallel.data_axis().map(str::to_string) else {
                return fail("--world sizes the data axis, but the spec lays `batch` out on none; add `batch -> data` to its layout, or use --search".into());
            };
            let others = probe.parallel.world() / probe.parallel.data().max(1);
            if w == 0 || !w.is_multiple_of(others) {
                return fail(format!(
                    "--world {w} is not a multiple of the {others} ranks of the spec's other axes; pick a multiple, or use --search"
                ));
            }
            extra.push(format!("parallel.mesh.{data}={}", w / others));
        }
        let m = match load_with(&spec, &extra, false) {
            Ok(m) => m,
            Err(code) => return code,
        };
        return plan(&m, json, None);
    }
    let base = match load_with(&spec, &extra, true) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let world = world.unwrap_or(base.parallel.world());
    let Some(dev) = device.clone().or_else(|| base.train.as_ref().and_then(|t| t.device.clone())) else {
        return fail("--search needs a device: pass --device NAME or set `train.device`".into());
    };
    let Some(dev) = devices::device(&dev) else {
        return fail(format!("unknown device `{dev}`"));
    };
    let started = std::time::Instant::now();
    let recheck = |o: &[String], micro_batch: u64| -> Result<Model, String> {
        let mut sources = SourceMap::new();
        let mut overrides = spec.set.clone();
        overrides.extend(extra.iter().cloned());
        overrides.extend(o.iter().cloned());
        let opts = Options { overrides, model: spec.model.clone(), micro_batch: Some(micro_batch) };
        tessera_compiler::check_path(&mut sources, &spec.file, &opts)
            .map_err(|d| d.0.first().map(|d| d.message.clone()).unwrap_or_else(|| "does not check".into()))
    };
    let found = match layouts::search(&base, world, dev, recheck) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let seconds = started.elapsed().as_secs_f64();
    let Some(best) = found.candidates.first() else {
        if json {
            // The contract's object still, with no candidates.
            let v = json!({
                "model": base.name,
                "world": world,
                "device": dev.name,
                "search": search_json(&found, seconds),
                "candidates": [],
            });
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
        let why: Vec<String> = found.rejected.iter().map(|(r, n)| format!("  {n:>7}  {r}")).collect();
        return fail(format!(
            "none of the {} layouts of `{}` on {world} × {} fits:\n{}",
            found.considered,
            base.name,
            dev.name,
            why.join("\n")
        ));
    };
    // The winner, checked again by the full checker (its memory check included).
    let mut o = extra.clone();
    o.extend(best.layout.overrides());
    o.push(format!("train.device={}", dev.name));
    let m = match load_with(&spec, &o, false) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let own = found.candidates.iter().position(|c| is_own(&base, c));
    plan(&m, json, Some(Found { search: &found, seconds, top, own }))
}

fn plan(m: &Model, json: bool, found: Option<Found>) -> ExitCode {
    use std::fmt::Write;
    use tessera_compiler::parallel::{self, Mesh, check};
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let mesh = match Mesh::of(m) {
        Ok(x) => x,
        Err(e) => return fail(e.to_string()),
    };
    if m.graph.output("loss").is_none() {
        return fail(format!("`{}` has no `loss`: a plan is for training", m.name));
    }
    // Every rank's program when the world is small enough to check them all
    // (the driver cross-checks their collectives); else one rank per
    // pipeline stage (the others differ only in their slices).
    let world = mesh.world();
    let ranks: Vec<u64> = if world <= 64 {
        (0..world).collect()
    } else {
        match &mesh.pipeline_axis {
            Some(p) => mesh.group(0, p),
            None => vec![0],
        }
    };
    let all = ranks.len() as u64 == world;
    let passes = tessera_compiler::driver::Passes { lower: false, ..Default::default() };
    let programs: Vec<parallel::RankProgram> =
        match tessera_compiler::driver::compile_with(m, (!all).then_some(&ranks[..]), passes) {
            Ok(c) => c.ranks,
            Err(e) => return fail(e.to_string()),
        };
    let checked = if all && passes.verify {
        "checked: every group issues the same collectives in a deadlock-free order".to_string()
    } else if all {
        "not checked (TESSERA_VERIFY=0 turns the checks off)".to_string()
    } else {
        format!("not checked across all {world} ranks (programs of ranks {ranks:?} built)")
    };
    let bytes = m.train.as_ref().map(|t| t.precision.bytes()).unwrap_or(4);
    let volumes: Vec<RankVolume> = programs.iter().map(|p| (p.rank, check::volume(&check::issued(p, &mesh)))).collect();
    let map = rank_map(m, &mesh);
    let mem = memory::memory_per_rank(m);
    let estimate = match m.train.as_ref().and_then(|t| t.device.as_deref()).and_then(tessera_compiler::device::device) {
        Some(dev) => match cost::time::estimate(m, dev) {
            Ok(e) => Some(e),
            Err(e) => return fail(e),
        },
        None => None,
    };
    if json {
        let mut v = serde_json::json!({
            "model": m.name,
            "world": world,
            "mesh": m.parallel.mesh.iter().map(|(a, n)| (a.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "rank_order": mesh.order.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(),
            "rank_map": map.iter().map(|(axis, stride, coords)| serde_json::json!({
                "axis": axis,
                "stride": stride,
                "coords": coords.iter().map(|(c, dims)| serde_json::json!({
                    "coord": c,
                    "holds": dims.iter().map(|(d, t)| (d.clone(), serde_json::Value::String(t.clone()))).collect::<serde_json::Map<_, _>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "memory_per_rank": mem,
            "communication": volumes.iter().map(|(r, v)| serde_json::json!({
                "rank": r,
                "per_step": v.iter().map(|(op, axis, n, e)| serde_json::json!({
                    "collective": op, "axis": axis, "calls": n, "elements": e, "bytes": e * bytes,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "collective_check": checked,
        });
        if let Some(e) = &estimate {
            let o = v.as_object_mut().expect("object");
            o.insert("device".into(), json!(e.device));
            o.insert("step_time_s".into(), json!(e.step_time_s));
            o.insert("tokens_per_s".into(), json!(e.tokens_per_s));
            o.insert("tflops_per_gpu".into(), json!(e.tflops_per_gpu));
            o.insert("hardware_tflops_per_gpu".into(), json!(e.hardware_tflops_per_gpu));
            o.insert("mfu".into(), json!(e.mfu));
            o.insert("flop_convention".into(), json!(cost::FLOP_CONVENTION));
            o.insert("estimate".into(), serde_json::to_value(e).expect("json"));
        }
        if let Some(f) = &found {
            let o = v.as_object_mut().expect("object");
            let n = if f.top == 0 { f.search.candidates.len() } else { f.top };
            o.insert("search".into(), search_json(f.search, f.seconds));
            o.insert(
                "candidates".into(),
                json!(f.search.candidates.iter().take(n).map(candidate_json).collect::<Vec<_>>()),
            );
            o.insert("spec_layout_rank".into(), json!(f.own.map(|i| i + 1)));
        }
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return ExitCode::SUCCESS;
    }
    let mut s = String::new();
    if let Some(f) = &found {
        s += &search_text(f);
    }
    let _ = writeln!(s, "{}: mesh {} = {world} ranks", m.name, mesh_text(m));
    let _ = writeln!(s, "\nrank map (rank = Σ coordinate × stride)");
    for (axis, stride, coords) in &map {
        let _ = writeln!(s, "  {axis} (stride {stride})");
        for (c, dims) in coords.iter().take(16) {
            let held: Vec<String> = dims.iter().map(|(d, t)| format!("{d} {t}")).collect();
            let _ = writeln!(s, "    {axis}={c}: {}", if held.is_empty() { "-".into() } else { held.join(", ") });
        }
        if coords.len() > 16 {
            let _ = writeln!(s, "    ... ({} coordinates)", coords.len());
        }
    }
    s += &memory_table(m);
    let _ = writeln!(s, "\ncommunication per step ({} bytes per element)", bytes);
    let _ = writeln!(s, "  {:<6} {:<20} {:<10} {:>7} {:>12}", "rank", "collective", "axis", "calls", "bytes");
    let mut last: Option<&Vec<(String, String, u64, u64)>> = None;
    for (r, v) in &volumes {
        if last == Some(v) {
            continue;
        }
        last = Some(v);
        for (op, axis, n, e) in v {
            let _ = writeln!(s, "  {r:<6} {op:<20} {axis:<10} {n:>7} {:>12}", bytes_text(e * bytes));
        }
        if v.is_empty() {
            let _ = writeln!(s, "  {r:<6} (none)");
        }
    }
    let _ = writeln!(s, "  (ranks with the same figures as the rank above are left out)");
    let _ = writeln!(s, "\n{checked}");
    match &estimate {
        Some(e) => s += &estimate_text(e),
        None => s += "\n(no GPU profile for this spec: `--device NAME` predicts its step time)\n",
    }
    print!("{s}");
    ExitCode::SUCCESS
}

/// What a search considered, as `plan --search --json` prints it.
fn search_json(s: &tessera_compiler::cost::search::Search, seconds: f64) -> serde_json::Value {
    json!({
        "considered": s.considered,
        "fit": s.candidates.len(),
        "rejected": s.rejected,
        "seconds": seconds,
    })
}

/// One ranked layout, as `plan --search --json` prints it.
fn candidate_json(c: &tessera_compiler::cost::search::Candidate) -> serde_json::Value {
    let l = &c.layout;
    let mut layout: serde_json::Map<String, serde_json::Value> =
        l.mesh.iter().map(|(a, n)| (a.clone(), json!(n))).collect();
    layout.insert("expert".into(), json!(l.expert));
    layout.insert("schedule".into(), json!(l.schedule));
    layout.insert("virtual_stages".into(), json!(l.virtual_stages));
    layout.insert("micro_batch".into(), json!(l.micro_batch));
    layout.insert("zero".into(), json!(l.zero));
    layout.insert("recompute".into(), json!(l.recompute));
    json!({
        "layout": layout,
        "step_time_s": c.step_time_s,
        "tokens_per_s": c.tokens_per_s,
        "tflops_per_gpu": c.tflops_per_gpu,
        "mfu": c.mfu,
        "memory_max_bytes": c.memory_max_bytes,
        "memory_max_rank": c.memory_max_rank,
        "overrides": l.overrides(),
    })
}

/// The search's table: counts, rejections by reason, the best layouts.
fn search_text(f: &Found) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let r = f.search;
    let _ = writeln!(
        s,
        "searched {} layouts on {} × {} in {:.2} s: {} fit",
        r.considered,
        r.world,
        r.device,
        f.seconds,
        r.candidates.len()
    );
    if !r.rejected.is_empty() {
        let _ = writeln!(s, "rejected");
        let mut why: Vec<(&String, &usize)> = r.rejected.iter().collect();
        why.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (reason, n) in why {
            let _ = writeln!(s, "  {n:>7}  {reason}");
        }
    }
    let n = if f.top == 0 { r.candidates.len() } else { f.top.min(r.candidates.len()) };
    let _ = writeln!(s, "\nbest {n} by predicted step time");
    let _ = writeln!(
        s,
        "  {:>3}  {:<70} {:>9} {:>11} {:>8} {:>6} {:>9}",
        "#", "layout", "step s", "tokens/s", "TFLOP/s", "MFU", "mem GiB"
    );
    for (i, c) in r.candidates.iter().take(n).enumerate() {
        let _ = writeln!(
            s,
            "  {:>3}  {:<70} {:>9.3} {:>11} {:>8.1} {:>5.1}% {:>9.1}",
            i + 1,
            c.layout.text(),
            c.step_time_s,
            human(c.tokens_per_s),
            c.tflops_per_gpu,
            100.0 * c.mfu,
            c.memory_max_bytes as f64 / (1u64 << 30) as f64
        );
    }
    match f.own {
        Some(i) => {
            let c = &r.candidates[i];
            let _ = writeln!(
                s,
                "  the spec's own layout ranks #{} of {}: {:.3} s per step, {:.2}× the best",
                i + 1,
                r.candidates.len(),
                c.step_time_s,
                c.step_time_s / r.candidates[0].step_time_s
            );
        }
        None => {
            let _ = writeln!(s, "  the spec's own layout is not among them (another world size, or it does not fit)");
        }
    }
    let _ = writeln!(s, "\nthe best layout, checked again in full:\n");
    s
}

/// The predicted step, as `plan` and `inspect` print it.
pub(super) fn estimate_text(e: &tessera_compiler::cost::time::Estimate) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let b = &e.breakdown;
    let _ = writeln!(s, "\npredicted step on {} × {}", e.world, e.device);
    let _ = writeln!(
        s,
        "  step {:.3} s, {} tokens/s, {:.1} TFLOP/s per GPU, MFU {:.1}% of {:.0} TFLOP/s ({} microbatches of {})",
        e.step_time_s,
        human(e.tokens_per_s),
        e.tflops_per_gpu,
        100.0 * e.mfu,
        e.peak_tflops,
        e.microbatches,
        e.micro_batch
    );
    if e.hardware_tflops_per_gpu != e.tflops_per_gpu {
        let _ = writeln!(s, "  with recompute counted: {:.1} TFLOP/s per GPU", e.hardware_tflops_per_gpu);
    }
    let _ = writeln!(s, "  convention  {}", cost::FLOP_CONVENTION);
    let rows = [
        ("compute", b.compute),
        ("recompute", b.recompute),
        ("tensor-parallel collectives", b.tensor_comm),
        ("expert all-to-all", b.expert_comm),
        ("pipeline sends", b.pipeline_comm),
        ("pipeline bubble", b.bubble),
        ("data-parallel, exposed", b.data_comm_exposed),
        ("optimizer", b.optimizer),
    ];
    for (what, t) in rows {
        if t > 0.0 {
            let _ = writeln!(s, "  {what:<30} {t:>9.3} s  {:>5.1}%", 100.0 * t / e.step_time_s);
        }
    }
    if b.data_comm > b.data_comm_exposed {
        let _ = writeln!(
            s,
            "  (data-parallel total {:.3} s, {:.3} s of it hidden behind backward)",
            b.data_comm,
            b.data_comm - b.data_comm_exposed
        );
    }
    s
}
