//! The collective check: before anything runs, every group's ranks must
//! issue the same collectives (op, shape, dtype) in the same order, and the
//! order across groups must not deadlock. It replays all ranks' programs
//! together: a collective completes when every member of its group has
//! reached it; a mismatch or a state where no rank can move is an error that
//! names the rank, the op and what differs.

use super::{Mesh, RankProgram, StepCollective};
use crate::ir::Op;

/// One collective as a rank issues it.
#[derive(Debug, Clone, PartialEq)]
pub struct Issued {
    /// The op's name and attributes (`all_reduce {axis = tensor, op = sum}`).
    pub op: String,
    pub axis: String,
    /// The global ranks of the group, in group order.
    pub group: Vec<u64>,
    /// The local input type (or element count of a step collective).
    pub shape: String,
    /// Where it comes from: `%42` in the rank's program, or `step`.
    pub at: String,
    /// Point to point: (from, to, tag); `op` is `send` or `recv`.
    pub peer: Option<(u64, u64, u64)>,
    /// Elements of the input (its payload).
    pub elems: u64,
}

fn graph_issued(g: &crate::ir::Graph, rank: u64, mesh: &Mesh, at: &str, out: &mut Vec<Issued>) {
    graph_range_issued(g, 0..g.len(), rank, mesh, at, out)
}

fn graph_range_issued(
    g: &crate::ir::Graph,
    range: std::ops::Range<usize>,
    rank: u64,
    mesh: &Mesh,
    at: &str,
    out: &mut Vec<Issued>,
) {
    for (i, n) in g.nodes.iter().enumerate().take(range.end).skip(range.start) {
        let Some(axis) = n.op.collective_axis() else { continue };
        let mut op = n.op.name().to_string();
        match &n.op {
            Op::AllReduce { op: r, .. } => op += &format!(" {r:?}").to_lowercase(),
            Op::AllGather { dim, .. } | Op::ReduceScatter { dim, .. } => op += &format!(" {dim}"),
            Op::AllToAll { split, concat, .. } => op += &format!(" {split}->{concat}"),
            _ => {}
        }
        let shape = n.inputs.first().map(|x| g.ty(*x).to_string()).unwrap_or_default();
        out.push(Issued {
            op,
            axis: axis.to_string(),
            group: mesh.group(rank, axis),
            shape,
            at: format!("{at}%{i}"),
            peer: None,
            elems: n.inputs.first().map(|x| g.ty(*x).numel()).unwrap_or(0),
        });
    }
}

fn p2p(send: bool, from: u64, to: u64, tag: u64, ty: &crate::model::TensorType, at: String) -> Issued {
    Issued {
        elems: ty.numel(),
        op: if send { "send" } else { "recv" }.into(),
        axis: "pipeline".into(),
        group: vec![from, to],
        shape: ty.to_string(),
        at,
        peer: Some((from, to, tag)),
    }
}

/// The tag of a shared parameter's gradient exchange.
pub fn shared_tag(param: usize) -> u64 {
    (1 << 62) | param as u64
}

/// The collectives of one rank's program, in issue order.
pub fn issued(p: &RankProgram, mesh: &Mesh) -> Vec<Issued> {
    let mut out = Vec::new();
    step_issued(p, mesh, &p.prologue, &mut out);
    match &p.stage {
        None => {
            for k in 0..p.micro {
                let at = if p.micro > 1 { format!("micro {k} ") } else { String::new() };
                graph_issued(&p.graph, p.rank, mesh, &at, &mut out);
            }
        }
        Some(sp) => {
            let me = p.rank;
            for a in &sp.schedule {
                match *a {
                    super::pipeline::Action::Forward { chunk, micro } => {
                        let c = sp.chunk(chunk);
                        let at = format!("F{chunk}.{micro} ");
                        boundary_issued(sp, c, me, micro, Flow::Incoming, &at, &mut out);
                        match c.split {
                            Some(k) => graph_range_issued(&c.backward, 0..k, me, mesh, &at, &mut out),
                            None => graph_issued(&c.forward, me, mesh, &at, &mut out),
                        }
                        boundary_issued(sp, c, me, micro, Flow::Outgoing, &at, &mut out);
                    }
                    super::pipeline::Action::Backward { chunk, micro } => {
                        let c = sp.chunk(chunk);
                        let at = format!("B{chunk}.{micro} ");
                        boundary_issued(sp, c, me, micro, Flow::GradIn, &at, &mut out);
                        let from = c.split.unwrap_or(0);
                        graph_range_issued(&c.backward, from..c.backward.len(), me, mesh, &at, &mut out);
                        boundary_issued(sp, c, me, micro, Flow::GradOut, &at, &mut out);
                    }
                }
            }
        }
    }
    step_issued(p, mesh, &p.step, &mut out);
    out
}

/// A chunk's point-to-point messages at one step of the schedule.
#[derive(Clone, Copy)]
enum Flow {
    /// Forward: receive the values from earlier chunks.
    Incoming,
    /// Forward: send values on to later chunks.
    Outgoing,
    /// Backward: receive the gradients of the values sent on.
    GradIn,
    /// Backward: send the gradients of the values received.
    GradOut,
}

fn boundary_issued(
    sp: &super::StageProgram,
    c: &super::ChunkProgram,
    me: u64,
    micro: u64,
    flow: Flow,
    at: &str,
    out: &mut Vec<Issued>,
) {
    let kind = u64::from(matches!(flow, Flow::GradIn | Flow::GradOut));
    match flow {
        Flow::Incoming | Flow::GradOut => {
            let n_model = c.params.len() - c.incoming.len();
            for (j, (v, _, st)) in c.incoming.iter().enumerate() {
                if *st == sp.stage {
                    continue;
                }
                let (ty, peer, tag) =
                    (&c.params[n_model + j].ty, sp.stage_ranks[*st as usize], sp.tag(kind, micro, *v));
                let send = matches!(flow, Flow::GradOut);
                let (from, to) = if send { (me, peer) } else { (peer, me) };
                out.push(p2p(send, from, to, tag, ty, at.to_string()));
            }
        }
        Flow::Outgoing | Flow::GradIn => {
            for (j, (v, readers)) in c.outgoing.iter().enumerate() {
                for (_, st) in readers.iter().filter(|(_, st)| *st != sp.stage) {
                    let (ty, peer, tag) =
                        (c.sends_graph().ty(c.sends[j]), sp.stage_ranks[*st as usize], sp.tag(kind, micro, *v));
                    let send = matches!(flow, Flow::Outgoing);
                    let (from, to) = if send { (me, peer) } else { (peer, me) };
                    out.push(p2p(send, from, to, tag, ty, at.to_string()));
                }
            }
        }
    }
}

fn step_issued(p: &RankProgram, mesh: &Mesh, list: &[StepCollective], out: &mut Vec<Issued>) {
    for c in list {
        let axes: Vec<String> = match c {
            StepCollective::NormAllReduce { axes, .. } => axes.clone(),
            _ => vec![c.axis_label()],
        };
        let elems = match c {
            StepCollective::GradAllReduce { elems, .. }
            | StepCollective::GradReduceScatter { elems, .. }
            | StepCollective::ParamAllGather { elems, .. } => *elems,
            StepCollective::NormAllReduce { params, .. } => params.len() as u64,
            StepCollective::SharedGradSum { param, stages } => {
                let ty = &p.params[*param].local.ty;
                let ranks = &p.stage.as_ref().expect("a pipeline program").stage_ranks;
                let mine = p.stage.as_ref().expect("a pipeline program").stage;
                let tag = shared_tag(*param);
                for &t in stages.iter().filter(|&&t| t != mine) {
                    out.push(p2p(true, p.rank, ranks[t as usize], tag, ty, "step".into()));
                }
                for &t in stages.iter().filter(|&&t| t != mine) {
                    out.push(p2p(false, ranks[t as usize], p.rank, tag, ty, "step".into()));
                }
                continue;
            }
        };
        for axis in axes {
            out.push(Issued {
                op: c.name().to_string(),
                group: mesh.group(p.rank, &axis),
                axis,
                shape: format!("f32[{elems}]"),
                at: "step".into(),
                peer: None,
                elems,
            });
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckError {
    #[error(
        "rank {rank}: collective #{index} `{}` on {} at {} (the {} group {:?}) does not match rank {other}'s `{}` on {} at {}",
        mine.op, mine.shape, mine.at, mine.axis, mine.group, theirs.op, theirs.shape, theirs.at
    )]
    Mismatch { rank: u64, index: usize, mine: Box<Issued>, other: u64, theirs: Box<Issued> },
    #[error("rank {rank}: collective #{index} `{}` at {} on the {} group {:?} would wait forever: {why}", mine.op, mine.at, mine.axis, mine.group)]
    Deadlock { rank: u64, index: usize, mine: Box<Issued>, why: String },
}

/// Check that `programs` (one per rank, in rank order) agree.
pub fn check(programs: &[RankProgram], mesh: &Mesh) -> Result<(), CheckError> {
    let lists: Vec<Vec<Issued>> = programs.iter().map(|p| issued(p, mesh)).collect();
    check_lists(&lists)
}

/// [`check`] on the issued collectives directly.
pub fn check_lists(lists: &[Vec<Issued>]) -> Result<(), CheckError> {
    let mut pc = vec![0usize; lists.len()];
    // Sends complete at once (buffered); a receive waits for its send.
    let mut sent: std::collections::HashMap<(u64, u64, u64), std::collections::VecDeque<Issued>> = Default::default();
    loop {
        let mut moved = false;
        for r in 0..lists.len() {
            let Some(c) = lists[r].get(pc[r]) else { continue };
            if let Some(key) = c.peer {
                if c.op == "send" {
                    sent.entry(key).or_default().push_back(c.clone());
                    pc[r] += 1;
                    moved = true;
                } else if let Some(s) = sent.get_mut(&key).and_then(|q| q.pop_front()) {
                    if s.shape != c.shape {
                        return Err(CheckError::Mismatch {
                            rank: r as u64,
                            index: pc[r],
                            mine: Box::new(c.clone()),
                            other: key.0,
                            theirs: Box::new(s),
                        });
                    }
                    pc[r] += 1;
                    moved = true;
                }
                continue;
            }
            // Every member must be at a collective of this same group.
            let ready = c.group.iter().all(|&m| {
                lists.get(m as usize).and_then(|l| l.get(pc[m as usize])).is_some_and(|x| x.group == c.group)
            });
            if !ready {
                continue;
            }
            for &m in &c.group {
                let x = &lists[m as usize][pc[m as usize]];
                if x.op != c.op || x.shape != c.shape || x.axis != c.axis {
                    return Err(CheckError::Mismatch {
                        rank: r as u64,
                        index: pc[r],
                        mine: Box::new(c.clone()),
                        other: m,
                        theirs: Box::new(x.clone()),
                    });
                }
            }
            for &m in &c.group {
                pc[m as usize] += 1;
            }
            moved = true;
        }
        if pc.iter().zip(lists).all(|(p, l)| *p == l.len()) {
            return Ok(());
        }
        if !moved {
            let r = (0..lists.len()).find(|&r| pc[r] < lists[r].len()).expect("someone is not done");
            let c = &lists[r][pc[r]];
            if let Some((from, _, tag)) = c.peer {
                return Err(CheckError::Deadlock {
                    rank: r as u64,
                    index: pc[r],
                    mine: Box::new(c.clone()),
                    why: format!("rank {from} never sends tag {tag} here"),
                });
            }
            let why: Vec<String> = c
                .group
                .iter()
                .filter(|&&m| m as usize != r)
                .map(|&m| match lists.get(m as usize).and_then(|l| l.get(pc[m as usize])) {
                    None => format!("rank {m} has no collective left"),
                    Some(x) => format!("rank {m} waits at `{}` on the {} group {:?} ({})", x.op, x.axis, x.group, x.at),
                })
                .collect();
            return Err(CheckError::Deadlock {
                rank: r as u64,
                index: pc[r],
                mine: Box::new(c.clone()),
                why: why.join("; "),
            });
        }
    }
}

/// Per-step communication of one rank: (op, axis) → (calls, elements).
pub fn volume(issued: &[Issued]) -> Vec<(String, String, u64, u64)> {
    let mut by: std::collections::BTreeMap<(String, String), (u64, u64)> = Default::default();
    for c in issued {
        let op = c.op.split_whitespace().next().unwrap_or("").to_string();
        let e = by.entry((op, c.axis.clone())).or_default();
        e.0 += 1;
        e.1 += c.elems;
    }
    by.into_iter().map(|((op, axis), (n, e))| (op, axis, n, e)).collect()
}
