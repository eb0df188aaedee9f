//! The lowered program: every rank of every layout lowers, verifies, prints
//! and parses back to itself; the verifier names what a broken program
//! gets wrong; the arena is the planned peak and the checker's memory
//! estimate stays near it.

mod common;

use tessera::compiler::driver::compile;
use tessera::compiler::ir::Op;
use tessera::compiler::lower::text::{parse, print};
use tessera::compiler::lower::verify::verify;
use tessera::compiler::lower::{BufId, Kind, Program, Region, Stream};

use common::{DP2, GPT, GPT2, GPT2_TINY, MOE, PP2, TP2, with};

/// The layouts lowered here: every kind of step the sharding pass writes.
fn layouts() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (GPT, vec![]),
        (GPT, DP2.to_vec()),
        (GPT, with(DP2, &["parallel.zero=1"])),
        (GPT, with(DP2, &["parallel.zero=2"])),
        (GPT, with(DP2, &["parallel.zero=3"])),
        (GPT, with(TP2, &["parallel.sequence_parallel=true"])),
        (GPT, with(TP2, &["parallel.layout.vocab=tensor"])),
        (GPT, with(PP2, &["parallel.pipeline.schedule=gpipe"])),
        (GPT, with(PP2, &["parallel.pipeline.schedule=1f1b"])),
        (GPT, with(PP2, &["parallel.pipeline.schedule=1f1b", "parallel.recompute=full"])),
        (
            GPT,
            with(PP2, &["parallel.pipeline.schedule=interleaved_1f1b", "parallel.pipeline.virtual=2", "dims.layers=4"]),
        ),
        (GPT, with(&with(DP2, TP2), &with(PP2, &["parallel.pipeline.schedule=1f1b", "train.batch=8"]))),
        (MOE, vec!["parallel.mesh.data=1"]),
        (MOE, vec!["parallel.mesh.data=2"]),
        (MOE, vec!["parallel.mesh.data=2", "parallel.zero=3"]),
        (MOE, vec!["parallel.mesh.data=1", "parallel.mesh.expert=2", "parallel.layout.expert=expert"]),
        ("specs/tiny/bert.spec", vec![]),
        ("specs/tiny/vit.spec", vec![]),
        ("specs/tiny/shakespeare.spec", vec![]),
        // bf16: master weights, bf16 gathers under ZeRO, bf16 activations between stages.
        (GPT, with(DP2, &["parallel.zero=1", "train.precision=bf16"])),
        (GPT, with(DP2, &["parallel.zero=3", "train.precision=bf16"])),
        (GPT, with(PP2, &["parallel.pipeline.schedule=1f1b", "train.precision=bf16"])),
        (MOE, vec!["parallel.mesh.data=2", "train.precision=bf16"]),
        // Dropout, fused into kernels with its random stream.
        (GPT2, GPT2_TINY.to_vec()),
        // Small buckets, issued during the backward pass: a tensor-parallel
        // partial gradient is summed over `tensor`, then over `data`, on one stream.
        (GPT, with(DP2, &["parallel.bucket=8Ki"])),
        (GPT, with(DP2, &["parallel.bucket=8Ki", "parallel.zero=2"])),
        (GPT, with(&with(DP2, TP2), &["parallel.bucket=8Ki", "parallel.sequence_parallel=true"])),
        (GPT, with(&with(DP2, PP2), &["parallel.bucket=8Ki", "parallel.pipeline.schedule=1f1b", "train.batch=8"])),
    ]
}

/// Each gradient bucket goes to the communication stream right after the
/// backward pass writes its gradients for the last time, in the order they
/// become ready,
/// and the compute stream joins them all before anything reads a gradient.
#[test]
fn buckets_are_issued_during_the_backward_pass() {
    let m = common::check_ok(GPT, &with(DP2, &["parallel.bucket=8Ki"]));
    let c = compile(&m).expect("compiles");
    for p in &c.programs {
        let calls: Vec<usize> = (0..p.instrs.len())
            .filter(|&i| matches!(p.instrs[i].kind, Kind::Collective { .. }) && p.instrs[i].stream == Stream::Comm)
            .collect();
        assert!(calls.len() >= 4, "rank {}: 8Ki-element buckets of the tiny GPT: {} calls", p.rank, calls.len());
        let reduction = p.phases.iter().find(|ph| ph.name == "gradient reduction").expect("a reduction phase").at;
        // Buffers by their bytes (a stacked gradient goes out layer by layer).
        let meet = |a: BufId, b: BufId| {
            let (x, y) = (p.buffer(a), p.buffer(b));
            x.region == y.region && x.offset < y.offset + y.ty.bytes() && y.offset < x.offset + x.ty.bytes()
        };
        for (n, &i) in calls.iter().enumerate() {
            assert!(i < reduction as usize, "rank {}: bucket {n} is issued in the backward pass", p.rank);
            let mine = &p.instrs[i].ins;
            let writes = |j: usize| {
                p.instrs[j].stream == Stream::Compute
                    && p.instrs[j].outs.iter().any(|b| mine.iter().any(|m| meet(*m, *b)))
            };
            // Issued after the last write of its gradients, and behind the event recorded right after it.
            let last = (0..i).rev().find(|&j| writes(j)).expect("written");
            assert!((last + 1..reduction as usize).all(|j| !writes(j)), "rank {}: bucket {n}", p.rank);
            let compute_between =
                (last + 1..i).filter(|&j| p.instrs[j].stream == Stream::Compute).map(|j| p.instrs[j].kind.name());
            assert!(
                compute_between.clone().all(|k| k == "record"),
                "rank {}: bucket {n} waits for {:?}",
                p.rank,
                compute_between.collect::<Vec<_>>()
            );
            let elems: u64 = mine.iter().map(|b| p.buffer(*b).ty.numel()).sum();
            assert!(elems <= 8 * 1024 || mine.len() == 1, "rank {}: bucket {n} holds {elems} elements", p.rank);
        }
        // The first bucket overlaps real work: kernels of the backward pass run after it is issued.
        let work = (calls[0]..reduction as usize)
            .filter(|&j| {
                matches!(p.instrs[j].kind, Kind::Op { .. } | Kind::Kernel { .. } | Kind::AttentionGrads { .. })
            })
            .count();
        assert!(work >= 10, "rank {}: {work} compute instructions overlap the first bucket", p.rank);
    }
}

#[test]
fn every_layout_lowers_verifies_and_round_trips() {
    for (spec, o) in layouts() {
        let m = common::check_ok(spec, &o);
        let c = compile(&m).unwrap_or_else(|e| panic!("{spec} {o:?}: {e}"));
        assert_eq!(c.programs.len() as u64, c.mesh.world());
        for p in &c.programs {
            verify(p).unwrap_or_else(|e| panic!("{spec} {o:?}: {e}"));
            // Origins (spans) are not part of the text form.
            let p = &p.without_origins();
            let text = print(p);
            let back = parse(&text).unwrap_or_else(|e| panic!("{spec} {o:?} rank {}: {e}", p.rank));
            if back != *p {
                let b = (0..p.buffers.len()).find(|&i| back.buffers.get(i) != Some(&p.buffers[i]));
                let i = (0..p.instrs.len()).find(|&i| back.instrs.get(i) != Some(&p.instrs[i]));
                panic!(
                    "{spec} {o:?} rank {}: the parsed program differs from the printed one: buffer {b:?} {:?} vs {:?}, instruction {i:?} {:?} vs {:?}",
                    p.rank,
                    b.map(|b| &p.buffers[b]),
                    b.and_then(|b| back.buffers.get(b)),
                    i.map(|i| &p.instrs[i]),
                    i.and_then(|i| back.instrs.get(i))
                );
            }
            assert_eq!(print(&back), text);
            // Every parameter has its weights, gradient and optimizer state where it is held.
            for (k, shard) in c.ranks[p.rank as usize].params.iter().enumerate() {
                for name in [format!("w.{k}"), format!("g.{k}"), format!("m.{k}")] {
                    assert_eq!(p.named(&name).is_some(), shard.held, "{spec} {o:?} rank {}: `{name}`", p.rank);
                }
            }
            assert!(p.arena_bytes() > 0);
        }
        eprintln!(
            "{spec} {o:?}: {} ranks, rank 0: {} instructions, {} buffers, arena {} B",
            c.programs.len(),
            c.programs[0].instrs.len(),
            c.programs[0].buffers.len(),
            c.programs[0].arena_bytes()
        );
    }
}

/// Each instruction kind of a step appears where the layout needs it.
#[test]
fn the_step_is_in_the_program() {
    let names = |p: &Program| p.instrs.iter().map(|i| i.kind.name()).collect::<Vec<_>>();
    let count = |p: &Program, n: &str| names(p).iter().filter(|x| **x == n).count();
    let m = common::check_ok(GPT, &with(DP2, &["parallel.zero=2"]));
    let c = compile(&m).expect("compiles");
    let p = &c.programs[0];
    assert!(count(p, "bucket_reduce_scatter") >= 1, "{:?}", names(p));
    assert!(count(p, "bucket_all_gather") >= 1);
    assert_eq!(count(p, "skip_if_nonfinite"), 1);
    // The update is fused: each parameter's two moments and its step in kernels, all under the guard.
    let guard = p.instrs.iter().position(|i| matches!(i.kind, Kind::SkipIfNonFinite { .. })).expect("a guard");
    let Kind::SkipIfNonFinite { count: guarded } = p.instrs[guard].kind else { unreachable!() };
    let fused_ops = |ins: &[tessera::compiler::lower::Instr], name: &str| {
        ins.iter()
            .filter_map(|i| match &i.kind {
                Kind::Kernel { kernel } => Some(kernel.ops.iter().filter(|o| *o == name).count()),
                _ => None,
            })
            .sum::<usize>()
    };
    let update = &p.instrs[guard + 1..guard + 1 + guarded as usize];
    assert_eq!(fused_ops(update, "adam_step"), m.params.len(), "one AdamW step per parameter");
    assert_eq!(fused_ops(update, "adam_moment"), 2 * m.params.len());
    assert_eq!(count(p, "adam_step"), 0, "no unfused update is left");
    // The gradient bucket waits for the backward pass and the update for the bucket.
    let pos = |n: &str| names(p).iter().position(|x| *x == n).expect(n);
    assert!(pos("wait") < pos("bucket_reduce_scatter"));
    // One microbatch per data rank of the 8-sequence batch at micro_batch 2... each has its own inputs.
    let micro = c.ranks[0].micro as usize;
    assert_eq!((0..micro).filter(|j| p.named(&format!("x0.mb{j}")).is_some()).count(), micro);

    // A pipeline stage sends and receives, in its schedule's order.
    let m = common::check_ok(GPT, &with(PP2, &["parallel.pipeline.schedule=1f1b"]));
    let c = compile(&m).expect("compiles");
    for p in &c.programs {
        assert_eq!(
            count(p, "send"),
            count(p, "recv"),
            "rank {}: every activation sent has a gradient received",
            p.rank
        );
        assert!(count(p, "send") >= 4, "rank {}: 4 microbatches cross the stage boundary", p.rank);
    }
    // Attention's backward is one instruction with three outputs.
    let m = common::check_ok(GPT, &[]);
    let p = &compile(&m).expect("compiles").programs[0];
    let grads: Vec<_> = p.instrs.iter().filter(|i| matches!(i.kind, Kind::AttentionGrads { .. })).collect();
    assert!(!grads.is_empty());
    assert!(grads.iter().all(|i| i.outs.len() == 3), "dq, dk and dv from one pass");
}

/// Break a program on purpose: the verifier names the instruction or buffer and the mismatch.
#[test]
fn the_verifier_names_what_is_wrong() {
    let m = common::check_ok(GPT, &[]);
    let good = compile(&m).expect("compiles").programs.remove(0);
    let expect = |p: Program, what: &str, message: &str| {
        let e = verify(&p).expect_err("a broken program");
        let s = e.to_string();
        assert!(s.contains(what) && s.contains(message), "expected `{what}` / `{message}` in: {s}");
    };
    let at = |n: &str| good.instrs.iter().position(|i| i.kind.name() == n).expect(n);

    // A matmul that contracts nothing: its output type is not the buffer's.
    let mut p = good.clone();
    let i = at("matmul");
    let out = p.instrs[i].outs[0];
    p.instrs[i].kind = Kind::Op { op: Op::MatMul { contract: vec![] }, rng: None, accumulate: false, rows: false };
    expect(p, &format!("instruction {i}: matmul"), "should produce");
    // An operand that does not exist.
    let mut p = good.clone();
    p.instrs[i].ins[0] = BufId(1 << 30);
    expect(p, &format!("instruction {i}: matmul"), "is not a buffer");
    // A temporary read before anything writes it.
    let mut p = good.clone();
    let j = p.instrs.iter().position(|x| x.kind.name() == "embed").expect("embed");
    let k = p.instrs.iter().position(|x| x.ins.contains(&p.instrs[j].outs[0])).expect("a reader");
    p.instrs.swap(j, k);
    expect(p, "instruction", "before anything writes it");
    // Two live temporaries in the same bytes.
    let mut p = good.clone();
    let a = p.instrs[i].ins.iter().copied().find(|b| p.buffer(*b).region == Region::Arena).expect("an arena operand");
    let a = p.root(a);
    let out = p.root(out);
    let (from, to) = (p.buffers[out.index()].offset, p.buffers[a.index()].offset);
    for b in 0..p.buffers.len() {
        if p.root(BufId(b as u32)) == out {
            p.buffers[b].offset = p.buffers[b].offset - from + to;
        }
    }
    expect(p, "instruction", "overlaps");
    // A buffer outside its region.
    let mut p = good.clone();
    let w = p.named("w.0").expect("w.0");
    p.buffers[w.index()].offset = p.region_bytes(Region::Param);
    expect(p, &format!("{w}"), "outside the param region");
    // A wait for an event nobody recorded.
    let mut p = good.clone();
    p.instrs.insert(
        0,
        tessera::compiler::lower::Instr::new(
            Kind::Wait { event: 99 },
            vec![],
            vec![],
            tessera::compiler::lower::Stream::Comm,
        ),
    );
    expect(p, "instruction 0: wait", "never recorded");
    // A fused kernel that would read past the end of an argument.
    let mut p = good.clone();
    let k = p.instrs.iter().position(|x| x.kind.name() == "kernel").expect("a fused kernel");
    if let Kind::Kernel { kernel } = &mut p.instrs[k].kind {
        kernel.strides[0].iter_mut().for_each(|s| *s *= 2);
    }
    expect(p, &format!("instruction {k}: kernel"), "read past its end");
    // Cross-entropy's row kernel: a per-row output must hold a value the same
    // along the row, and a kernel stores floating values only.
    let ce = p_ce(&good);
    let mut p = good.clone();
    if let Kind::Kernel { kernel } = &mut p.instrs[ce].kind {
        kernel.stores[0].1 = 0; // the logits themselves, which vary along the row
    }
    expect(p, &format!("instruction {ce}: kernel"), "varies along the row");
    let mut p = good.clone();
    let row_losses = p.instrs[ce].outs[0];
    p.buffers[row_losses.index()].ty.dtype = tessera::compiler::ir::DType::I32;
    expect(p, &format!("instruction {ce}: kernel"), "store floating values");
    // A decode step: a cache write along a dim the cache lacks, positions
    // that are not an i32[batch], block tables of another batch, and
    // attention whose queries outrun the positions its blocks hold.
    let mut gm = common::check_ok(GPT, &["train.micro_batch=1"]);
    gm.micro_batch = 1;
    let step = tessera::compiler::driver::compile_one_sequence(&gm, Default::default())
        .expect("compiles")
        .paged
        .expect("the tiny GPT decodes")
        .steps
        .remove(0)
        .1;
    let at = |n: &str| step.instrs.iter().position(|i| i.kind.name() == n).expect(n);
    let mut p = step.clone();
    let w = at("cache_write");
    p.instrs[w].kind = Kind::CacheWrite { dim: "embed".into() };
    expect(p, &format!("instruction {w}: cache_write"), "does not go into the paged cache");
    let mut p = step.clone();
    let blocks = p.instrs[w].ins[2];
    p.buffers[blocks.index()].ty.dims[0].size = 2;
    expect(p, &format!("instruction {w}: cache_write"), "not an i32[batch, kv_table]");
    let mut p = step.clone();
    let r = at("rows_at");
    let pos = p.instrs[r].ins[1];
    p.buffers[pos.index()].ty = tessera::compiler::ir::TensorType::scalar(tessera::compiler::ir::DType::F32);
    expect(p, &format!("instruction {r}: rows_at"), "not an i32[batch]");
    let mut p = step.clone();
    let a = at("attention");
    let mut short = p.buffer(p.instrs[a].ins[1]).clone();
    short.ty.dims.iter_mut().filter(|d| d.name == "seq").for_each(|d| d.size = 0);
    p.buffers.push(short);
    p.instrs[a].ins[1] = BufId(p.buffers.len() as u32 - 1);
    expect(p, &format!("instruction {a}: attention"), "whose block tables reach fewer positions");
    // The parser rejects what it cannot read, with the line.
    let text = print(&good).replacen("matmul(", "matmull(", 1);
    let Err(e) = parse(&text) else { panic!("`matmull` is not an op") };
    assert!(e.to_string().contains("matmull") && e.to_string().starts_with("line "), "{e}");
}

/// The arena is what the liveness plan places, and the checker's estimate
/// of a rank's memory (weights, gradients, optimizer, activations) stays
/// within 10% of the lowered program's regions.
#[test]
fn the_arena_matches_the_checker_estimate() {
    let specs = [GPT, MOE, "specs/tiny/bert.spec", "specs/tiny/vit.spec", "specs/tiny/shakespeare.spec"];
    for (spec, precision) in specs.iter().map(|s| (*s, "fp32")).chain([(GPT, "bf16"), (MOE, "bf16")]) {
        // The CPU runtime's attention recomputes its scores in the backward
        // pass (flash-style): what `recompute = selective` prices.
        let p = format!("train.precision={precision}");
        let m = common::check_ok(spec, &["parallel.recompute=selective", "parallel.mesh.data=1", &p]);
        let p = &compile(&m).expect("compiles").programs[0];
        let est = tessera::compiler::cost::memory::memory_per_rank(&m)[0];
        let lowered = p.region_bytes(Region::Param)
            + p.region_bytes(Region::Grad)
            + p.region_bytes(Region::Optim)
            + p.arena_bytes();
        let rel = (lowered as f64 - est.total as f64).abs() / lowered as f64;
        eprintln!(
            "{spec} {precision}: lowered {:.2} MiB (arena {:.2} MiB) vs estimate {:.2} MiB: {:.1}%",
            lowered as f64 / 1048576.0,
            p.arena_bytes() as f64 / 1048576.0,
            est.total as f64 / 1048576.0,
            rel * 100.0
        );
        assert!(rel <= 0.10, "{spec}: the estimate {} is {:.1}% from the lowered {lowered}", est.total, rel * 100.0);
    }
}

/// `precision = bf16`: the weights and the activations are bf16 (the
/// arena about half of f32's), the gradients, the optimizer state and the
/// master weights f32, and the update casts the master weights to the
/// weights. fp16, which would need loss scaling, is refused with a reason.
#[test]
fn bf16_programs_store_weights_and_activations_in_bf16() {
    use tessera::compiler::ir::DType;
    let layouts: [&[&str]; 3] = [&[], &["parallel.zero=1"], &["parallel.zero=3"]];
    for zero in layouts {
        let sets = if zero.is_empty() { vec![] } else { with(DP2, zero) };
        let lower = |precision: &'static str| {
            let m = common::check_ok(GPT, &with(&sets, &[precision]));
            compile(&m).expect("compiles").programs.remove(0)
        };
        let (b, f) = (lower("train.precision=bf16"), lower("train.precision=fp32"));
        let ratio = b.arena_bytes() as f64 / f.arena_bytes() as f64;
        assert!((0.45..=0.55).contains(&ratio), "{sets:?}: the bf16 arena is {ratio:.3} of f32's");
        let dtype = |p: &Program, name: &str| p.named(name).map(|x| p.buffer(x).ty.dtype);
        let (mut params, mut casts) = (0, 0);
        while let Some(w) = dtype(&b, &format!("w.{params}")) {
            let k = params;
            assert_eq!(w, DType::Bf16, "{sets:?}: w.{k}");
            assert_eq!(dtype(&b, &format!("g.{k}")), Some(DType::F32), "{sets:?}: g.{k}");
            assert_eq!(dtype(&b, &format!("m.{k}")), Some(DType::F32), "{sets:?}: m.{k}");
            let master = b.named(&format!("master.{k}")).expect("master weights");
            assert_eq!(b.buffer(master).ty.dtype, DType::F32);
            assert_eq!(b.buffer(master).region, Region::Optim);
            assert!(f.named(&format!("master.{k}")).is_none(), "f32 weights need no master copy");
            casts += b.instrs.iter().filter(|i| matches!(i.kind, Kind::Copy) && i.ins == [master]).count();
            params += 1;
        }
        assert!(params > 0);
        assert_eq!(casts, params, "{sets:?}: one cast of each master to its weights");
        // The floating tensors the microbatches' instructions write in the arena are bf16 (the parameters'
        // gradients go straight into their f32 buffers).
        let update = b.phases.iter().find(|ph| ph.name == "optimizer update").expect("an update").at as usize;
        let written: std::collections::BTreeSet<BufId> = b.instrs[..update]
            .iter()
            .flat_map(|i| i.outs.iter().copied())
            .filter(|&x| {
                let t = &b.buffer(x).ty;
                b.buffer(x).region == Region::Arena && t.dtype.is_float() && t.numel() > 1
            })
            .collect();
        // (A parameter's partial gradients, added into its f32 gradient, are f32 too: a tied embedding's.)
        let into_grads = |x: BufId| {
            b.instrs
                .iter()
                .filter(|i| i.ins.contains(&x))
                .all(|i| i.outs.iter().all(|o| b.buffer(*o).region == Region::Grad))
        };
        // (Cross-entropy's per-row losses, summed into the f32 loss, are f32: they are accumulations.)
        let row_losses = |x: BufId| {
            b.instrs.iter().any(|i| {
                i.outs.contains(&x) && matches!(&i.kind, Kind::Kernel { kernel } if kernel.ops == ["cross_entropy"])
            })
        };
        let wide: Vec<_> = written
            .iter()
            .filter(|&&x| b.buffer(x).ty.dtype != DType::Bf16 && !into_grads(x) && !row_losses(x))
            .collect();
        assert!(!written.is_empty() && wide.is_empty(), "{sets:?}: f32 temporaries {wide:?}");
    }
    // fp16 stores as bf16 does, in f16, and scales the loss: the backward
    // pass's seed is the `loss_scale` buffer, and every gradient is divided
    // by it before the norm. (fp32 and bf16 read the same buffer, as 1.)
    let m = common::check_ok(GPT, &["train.precision=fp16"]);
    let h = &compile(&m).expect("fp16 lowers").programs[0];
    assert_eq!(h.named("w.0").map(|x| h.buffer(x).ty.dtype), Some(DType::F16));
    let scale = h.bound(tessera::compiler::lower::Bound::LossScale).expect("a loss scale");
    let norm = h.phases.iter().find(|ph| ph.name == "global norm").expect("a norm").at as usize;
    let unscaled: Vec<BufId> = h.instrs[norm..]
        .iter()
        .filter(|i| i.ins.contains(&scale))
        .flat_map(|i| i.outs.iter().copied())
        .filter(|&x| h.buffer(x).region == Region::Grad)
        .collect();
    let grads = (0..).take_while(|k| h.named(&format!("g.{k}")).is_some()).count();
    assert_eq!(unscaled.len(), grads, "every gradient is unscaled once, before the norm");
    let f = &compile(&common::check_ok(GPT, &[])).expect("lowers").programs[0];
    let seed = f.bound(tessera::compiler::lower::Bound::LossScale).expect("a loss scale");
    assert!(f.instrs.iter().any(|i| i.ins.contains(&seed)), "the seed reads it");
    assert!(
        !f.instrs.iter().any(|i| i.ins.contains(&seed) && i.outs.iter().any(|o| f.buffer(*o).region == Region::Grad)),
        "fp32 divides no gradient"
    );
}

/// Every pass's output parses back from its text, and, broken on purpose one node at a time: a node whose
/// type is wrong (another dtype, a dim of another size, an extra dim) is
/// caught at that node, and the error names its op. Covers the checker's
/// forward graphs, autodiff's backward graphs, the sharding pass's rank
/// graphs (tensor, sequence, vocabulary, expert and pipeline layouts) and
/// the optimizer's update graph.
#[test]
fn the_ir_verifier_catches_a_wrong_type_in_every_op() {
    use std::collections::BTreeSet;
    use tessera::compiler::ir::{DType, Dim, Graph, verify};
    let mut graphs: Vec<(String, Graph)> = Vec::new();
    let specs: Vec<(&str, Vec<&'static str>)> = vec![
        (GPT, with(TP2, &["parallel.sequence_parallel=true", "parallel.layout.vocab=tensor"])),
        (GPT, with(PP2, &["parallel.pipeline.schedule=1f1b"])),
        (MOE, vec!["parallel.mesh.data=2"]),
        (MOE, vec!["parallel.mesh.data=1", "parallel.mesh.expert=2", "parallel.layout.expert=expert"]),
        (MOE, with(&["parallel.mesh.data=1"], TP2)),
        ("specs/tiny/bert.spec", vec![]),
        ("specs/tiny/vit.spec", vec![]),
        ("specs/tiny/shakespeare.spec", vec![]),
        ("specs/models/switch-base.spec", vec!["parallel.mesh.data=1", "dims.layers=2", "dims.seq=8", "train.batch=2"]),
        (
            "specs/models/gopher-280b.spec",
            vec!["dims.layers=1", "dims.seq=8", "dims.embed=64", "dims.heads=2", "dims.vocab=64"],
        ),
        (
            "specs/models/gpt2-small.spec",
            vec!["dims.layers=1", "dims.seq=8", "dims.embed=64", "dims.heads=2", "dims.vocab=64"],
        ),
        (
            "specs/models/llama2-7b.spec",
            vec![
                "dims.layers=1",
                "dims.seq=8",
                "dims.embed=64",
                "dims.heads=2",
                "dims.kv_heads=2",
                "dims.head_dim=32",
                "dims.mlp=128",
                "dims.vocab=64",
            ],
        ),
        (
            "specs/models/mixtral-8x7b.spec",
            vec![
                "dims.layers=1",
                "dims.seq=8",
                "dims.embed=64",
                "dims.heads=8",
                "dims.kv_heads=8",
                "dims.head_dim=8",
                "dims.mlp=64",
                "dims.vocab=64",
            ],
        ),
        ("tests/specs/attention_from_primitives.spec", vec![]),
    ];
    for (spec, o) in &specs {
        let m = common::check_ok(spec, o);
        graphs.push((format!("{spec} forward"), m.graph.clone()));
        let Ok(c) = tessera::compiler::driver::compile_ranks(&m, Some(&[0])) else { continue };
        graphs.push((format!("{spec} backward"), c.backward.graph.clone()));
        let r = &c.ranks[0];
        match &r.stage {
            None => graphs.push((format!("{spec} {o:?} rank 0"), r.graph.clone())),
            Some(sp) => {
                for ch in &sp.chunks {
                    graphs.push((format!("{spec} {o:?} chunk {}", ch.chunk), ch.backward.clone()));
                }
            }
        }
        let opt = m.train.as_ref().expect("trains").optimizer.clone();
        graphs.push((
            format!("{spec} update"),
            tessera::compiler::autodiff::update::optimizer_update(&m.params, &opt, Some(1.0)),
        ));
    }
    let mut covered = BTreeSet::new();
    for (name, g) in &graphs {
        verify(g).unwrap_or_else(|e| panic!("{name}: {e}"));
        // The text form parses back to the same nodes and outputs.
        let back = tessera::compiler::ir::parse(&g.to_text()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            back.nodes == g.nodes && back.outputs == g.outputs,
            "{name}: the graph's text does not parse back to it"
        );
        for i in 0..g.len() {
            let op = g.nodes[i].op.name();
            if matches!(op, "input" | "param" | "sinusoid") {
                continue; // typed by the model
            }
            let ty = g.nodes[i].ty.clone();
            let mut wrong = vec![ty.clone(), ty.clone(), ty.clone()];
            wrong[0].dtype = if ty.dtype == DType::F32 { DType::F16 } else { DType::F32 };
            if let Some(d) = wrong[1].dims.first_mut() {
                d.size += 1;
            }
            wrong[2].dims.push(Dim::new("wrong", 3));
            let caught = wrong.into_iter().filter(|w| *w != ty).any(|w| {
                let mut bad = g.clone();
                bad.nodes[i].ty = w;
                // (A scalar's dtype is its attribute's: a wrong one is caught where it is read.)
                match verify(&bad) {
                    Err(e) if e.value.index() == i => {
                        assert!(e.message.contains(op), "{name}: the error does not name `{op}`: {e}");
                        true
                    }
                    _ => false,
                }
            });
            assert!(caught, "{name}: a wrong type at %{i} ({op}) passes the verifier");
            // The op kind: its variant's name.
            let kind = format!("{:?}", g.nodes[i].op);
            covered.insert(kind.split([' ', '{', '(']).next().unwrap_or("").to_string());
        }
    }
    eprintln!("{} op kinds checked: {covered:?}", covered.len());
    assert!(covered.len() >= 50, "only {} of the IR's op kinds appear in the graphs: {covered:?}", covered.len());
}

/// A replicated weight's gradient that is a partial sum over the tensor axis
/// (LayerNorm gains, biases after row-parallel matmuls and the embedding
/// under sequence parallelism) is accumulated over the microbatches and
/// summed once per step, as Megatron does: the tensor-axis traffic of the
/// weight gradients does not grow with the number of microbatches.
#[test]
fn partial_gradients_are_summed_once_per_step() {
    use tessera::compiler::parallel::{self, check};
    let tensor_grads = |micro: &'static str| {
        let m = common::check_ok(GPT, &with(TP2, &["parallel.sequence_parallel=true", "train.batch=8", micro]));
        let c = compile(&m).expect("compiles");
        let v = check::volume(&check::issued(&c.ranks[0], &c.mesh));
        let grads: Vec<_> =
            v.iter().filter(|(op, axis, _, _)| op == "grad_all_reduce" && axis == "tensor").cloned().collect();
        let per_micro: u64 =
            v.iter().filter(|(op, axis, _, _)| op == "all_reduce" && axis == "tensor").map(|x| x.3).sum();
        // The step collective lists the parameters whose gradients are partial.
        let params: Vec<usize> = c.ranks[0]
            .step
            .iter()
            .filter_map(|s| match s {
                parallel::StepCollective::GradAllReduce { axis, params, .. } if axis == "tensor" => {
                    Some(params.clone())
                }
                _ => None,
            })
            .flatten()
            .collect();
        (grads, per_micro, params, m)
    };
    let (one, per_one, params, m) = tensor_grads("train.micro_batch=8");
    let (eight, per_eight, params8, _) = tensor_grads("train.micro_batch=1");
    assert!(!one.is_empty(), "the tensor-parallel layout sums some gradients over the tensor axis once per step");
    assert_eq!(one, eight, "the once-per-step gradient sums do not depend on the microbatches");
    assert_eq!(params, params8);
    // In-graph tensor all-reduces (the forward's partial sums) are per microbatch, and none carries a weight gradient.
    assert!(per_eight <= 8 * per_one, "{per_eight} vs {per_one}");
    let names: Vec<&str> = params.iter().map(|&k| m.params[k].path.as_str()).collect();
    assert!(names.iter().any(|p| p.contains("wte")), "the tied embedding's gradient is one of them: {names:?}");
    assert!(names.iter().all(|p| !p.contains("wqkv") && !p.contains("w_in")), "split weights are not: {names:?}");
    eprintln!("summed over the tensor axis once per step: {names:?}");
}

/// Expert computation over filled slots (`lower::ragged`): in the tiny MoE's
/// step, dispatch and its transpose are the roots; the expert GEMMs and the
/// elementwise ops between them compute filled rows; the expert weight and
/// bias gradients sum filled slots. A ragged value a caller also needs in
/// full (here made a graph output) takes its whole chain back to full.
#[test]
fn expert_values_are_ragged_only_where_every_reader_allows() {
    use tessera::compiler::autodiff::differentiate;
    use tessera::compiler::lower::ragged::{Role, analyze};
    let m = common::check_ok(MOE, &["parallel.mesh.data=1"]);
    let bw = differentiate(&m.graph, m.graph.output("loss").expect("loss")).expect("differentiates");
    let g = &bw.graph;
    let roles = analyze(g);
    let count = |f: &dyn Fn(&Role) -> bool| roles.iter().filter(|r| f(r)).count();
    let named = |name: &str| (0..g.len()).filter(|&i| g.nodes[i].op.name() == name).collect::<Vec<_>>();
    let layers = named("dispatch").len();
    assert!(layers > 0);
    assert_eq!(count(&|r| matches!(r, Role::Root(_))), 2 * layers, "dispatch and combine_grad_y");
    for i in named("dispatch").into_iter().chain(named("combine_grad_y")) {
        assert!(matches!(roles[i], Role::Root(_)), "node {i}");
    }
    // Forward: x·w_in, bias, GELU, ·w_out, bias. Backward: two data gradients and GELU's.
    assert!(count(&|r| matches!(r, Role::Rows(_))) >= 8 * layers, "{roles:?}");
    // Two weight gradients and two bias gradients per layer.
    let contracts: Vec<usize> = (0..g.len()).filter(|&i| matches!(roles[i], Role::Contract(_))).collect();
    assert_eq!(contracts.len(), 4 * layers);
    assert!(contracts.iter().all(|&i| matches!(g.nodes[i].op, Op::Einsum | Op::Reduce { .. })));
    // Every counted node reads the gates of its own layer's dispatch.
    for r in &roles {
        if let Role::Rows(c) | Role::Contract(c) = r {
            assert!(named("dispatch").iter().any(|&d| g.nodes[d].inputs[0] == c.gates));
        }
    }

    // Make the first expert GEMM's output a graph output: it and what made it are computed in full.
    let first = (0..g.len()).find(|&i| matches!(g.nodes[i].op, Op::MatMul { .. }) && matches!(roles[i], Role::Rows(_)));
    let first = first.expect("an expert GEMM over filled rows");
    let mut probed = g.clone();
    probed.outputs.push(("probe".into(), tessera::compiler::ir::ValueId(first as u32)));
    let roles = analyze(&probed);
    assert_eq!(roles[first], Role::Full);
    let dispatch = probed.nodes[first].inputs.iter().find(|v| probed.nodes[v.index()].op.name() == "dispatch");
    assert_eq!(roles[dispatch.expect("reads dispatch").index()], Role::Full);
}

/// The instruction of `p` that is cross-entropy's row kernel.
fn p_ce(p: &Program) -> usize {
    p.instrs
        .iter()
        .position(|i| {
            matches!(&i.kind, Kind::Kernel { kernel }
                if kernel.ops == ["cross_entropy"] && kernel.body.contains(&tessera::compiler::kernel::Expr::Index))
        })
        .expect("cross-entropy's row kernel")
}

/// Cross-entropy and its gradient lower to kernels (no library call is
/// left), with or without an ignored class id and label smoothing; the text
/// form carries their positions along the row and comparisons back.
#[test]
fn cross_entropy_lowers_to_kernels() {
    for loss in ["cross_entropy(logits, targets)", "cross_entropy(logits, targets, label_smoothing = 0.1, ignore = 3)"]
    {
        let text = std::fs::read_to_string(GPT).expect("the tiny GPT").replace("cross_entropy(logits, targets)", loss);
        let dir = std::env::temp_dir().join(format!("tessera-ce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join("gpt.spec");
        std::fs::write(&path, text).expect("writes");
        let m = common::check_ok(path.to_str().expect("utf-8"), &[]);
        let p = compile(&m).expect("compiles").programs.remove(0);
        let names: Vec<&str> = p.instrs.iter().map(|i| i.kind.name()).collect();
        assert!(!names.iter().any(|n| n.starts_with("cross_entropy")), "{loss}: a library call is left: {names:?}");
        let ce = p_ce(&p);
        let text = print(&p);
        assert!(text.contains("index()") && text.contains("equal("), "{loss}");
        assert_eq!(print(&parse(&text).expect("parses")), text, "{loss}: print → parse → print");
        // The row kernel writes one loss per row (and, with `ignore`, whether the row counts).
        let outs = &p.instrs[ce].outs;
        assert_eq!(outs.len(), 1 + usize::from(loss.contains("ignore")), "{loss}");
        verify(&p).expect("verifies");
    }
}

/// Every instruction a spec expression computes names the spec lines it
/// comes from (its `origin`): the ops of a fused kernel, each parameter's
/// optimizer update (its declaration). Only what lowering adds on its own
/// has none: gradient buckets and their scaling, events, the gradient
/// norm, clipping and the learning rate all parameters share.
#[test]
fn instructions_name_the_spec_lines_they_come_from() {
    let own = [
        "accumulate",
        "add_scalars",
        "bucket_all_reduce",
        "clip_scale",
        "record",
        "scale",
        "skip_if_nonfinite",
        "sum_squares",
        "take",
        "wait",
        "zero",
    ];
    let cases = [(common::GPT, vec![]), (common::GPT, common::with(common::DP2, common::TP2)), (common::MOE, vec![])];
    for (spec, o) in cases {
        let (sources, m) = common::check(std::path::Path::new(spec), &o);
        let m = m.unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)));
        let c = compile(&m).unwrap_or_else(|e| panic!("{e}"));
        let mut quotes = Vec::new();
        for p in &c.programs {
            for ins in &p.instrs {
                let name = ins.kind.name();
                assert!(
                    !ins.origin.is_empty() || own.contains(&name),
                    "{spec} {o:?} rank {}: `{name}` has no origin: {}",
                    p.rank,
                    tessera::compiler::lower::text::instr_text(ins)
                );
                quotes.extend(ins.origin.iter().map(|s| sources.quote(*s)));
            }
        }
        // Spec lines, quoted: the model's own file and the spec library's blocks.
        assert!(quotes.iter().all(|q| q.contains(".spec:") && !q.ends_with("``")), "{quotes:?}");
        assert!(quotes.iter().any(|q| q.contains("std/") && q.contains("layer_norm(")), "{spec}: {quotes:?}");
        assert!(quotes.iter().any(|q| q.contains("param ")), "{spec}: an update names its parameter: {quotes:?}");
    }
}
