//! Collective communication between ranks (issue #4).
//!
//! [`Communicator`] is what a rank's program calls: all-reduce,
//! reduce-scatter, all-gather, all-to-all with uneven splits, send and
//! receive, and barriers, each within a [`Group`] of ranks (one per mesh
//! axis slice). [`Local`] implements it in process, one thread per rank, for
//! the CPU runtime's simulated ranks; [`tcp::Tcp`] connects processes that
//! torchrun, `tessera launch` or `srun` start, and `mpi::Mpi` (the `mpi`
//! feature) those that `mpirun` starts. An NCCL implementation will implement
//! the same trait: there a call enqueues on the rank's stream and returns, and
//! errors surface at [`Communicator::synchronize`]. The in-process one
//! completes each call before returning, so `synchronize` has nothing to do.
//!
//! No call hangs. A collective that waits longer than the timeout fails with
//! an error naming the rank, the collective, the group and the step. A rank
//! that fails or panics aborts the world, and every rank's next or current
//! call returns that rank's error.

mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod tcp;

pub use local::{Local, World};

/// How a collective combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

/// A set of ranks that run a collective together, in their order within
/// the group (e.g. the `tensor` slice of a mesh that holds one rank).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group {
    /// The mesh axis (or axes) the group spans, for messages: `tensor`, `data`.
    pub axis: String,
    /// Global ranks, in group order.
    pub ranks: Vec<usize>,
}

impl Group {
    pub fn new(axis: impl Into<String>, ranks: Vec<usize>) -> Self {
        Group { axis: axis.into(), ranks }
    }

    /// This rank's index within the group.
    pub fn index_of(&self, rank: usize) -> Option<usize> {
        self.ranks.iter().position(|&r| r == rank)
    }
}

/// The group of `rank` along mesh `axis`: the ranks that share every other
/// coordinate, in order along `axis`. `order` is the rank numbering, outermost
/// axis first, as `compiler::parallel::mesh::rank_order` gives it (pipeline,
/// data, ..., tensor innermost), so these are the groups `tessera inspect`'s
/// rank map shows.
pub fn group_along(order: &[(String, u64)], rank: usize, axis: &str) -> Option<Group> {
    use tessera_compiler::parallel::mesh::coords;
    let at = order.iter().position(|(a, _)| a == axis)?;
    let stride: u64 = order[at + 1..].iter().map(|(_, s)| *s).product();
    let c = coords(order, rank as u64);
    let base = rank as u64 - c[at] * stride;
    Some(Group::new(axis, (0..order[at].1).map(|k| (base + k * stride) as usize).collect()))
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} group {:?}", self.axis, self.ranks)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: `{op}` on the {group} timed out after {waited_ms} ms at step {step}{}", waiting_for(missing))]
    Timeout { rank: usize, op: &'static str, group: String, step: u64, waited_ms: u64, missing: Vec<usize> },
    #[error("rank {rank}: `{op}` on the {group} at step {step} does not match rank {other}'s `{other_op}`: {detail}")]
    Mismatch {
        rank: usize,
        op: &'static str,
        group: String,
        step: u64,
        other: usize,
        other_op: &'static str,
        detail: String,
    },
    #[error("rank {rank} stopped: rank {failed} failed at step {step}: {message}")]
    Aborted { rank: usize, failed: usize, step: u64, message: String },
    #[error("rank {rank}: {message}")]
    Usage { rank: usize, message: String },
}

/// The sizes a call's buffers must have, checked the same way by every
/// communicator: `Err` says what does not fit.
pub mod sizes {
    use super::Group;

    pub fn reduce_scatter(group: &Group, input: usize, out: usize) -> Result<(), String> {
        let n = group.ranks.len();
        match input == out * n {
            true => Ok(()),
            false => {
                Err(format!("reduce_scatter on the {group}: input of {input} values is not {n} × the output's {out}"))
            }
        }
    }

    pub fn all_gather(group: &Group, input: usize, out: usize) -> Result<(), String> {
        let n = group.ranks.len();
        match out == input * n {
            true => Ok(()),
            false => Err(format!("all_gather on the {group}: output of {out} values is not {n} × the input's {input}")),
        }
    }

    pub fn all_to_all(group: &Group, send: usize, counts: &[usize]) -> Result<(), String> {
        let n = group.ranks.len();
        let total: usize = counts.iter().sum();
        match counts.len() == n && total == send {
            true => Ok(()),
            false => Err(format!(
                "all_to_all on the {group}: {} counts summing to {total} for {n} members and {send} values",
                counts.len()
            )),
        }
    }

    pub fn broadcast(group: &Group, root: usize) -> Result<(), String> {
        let n = group.ranks.len();
        match root < n {
            true => Ok(()),
            false => Err(format!("broadcast on the {group} from member {root} of {n}")),
        }
    }
}

/// A message of the wrong length for the receive that matched it (the
/// sender's `send` and this rank's `recv` disagree).
pub fn recv_mismatch(rank: usize, step: u64, from: usize, tag: u64, want: usize, got: usize) -> CommError {
    CommError::Mismatch {
        rank,
        op: "recv",
        group: format!("pair ({from} → {rank})"),
        step,
        other: from,
        other_op: "send",
        detail: format!("expected {want} values with tag {tag}, got {got}"),
    }
}

/// The ranks a timed-out call waited for, where the transport knows them
/// (MPI does not say which members have not arrived).
fn waiting_for(missing: &[usize]) -> String {
    match missing {
        [] => String::new(),
        m => format!(" (waiting for ranks {m:?})"),
    }
}

/// One rank's handle on the collectives of its world.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The training step, for error messages.
    fn set_step(&mut self, step: u64);
    /// Get ready for collectives on `groups`: this rank's group along each
    /// mesh axis, which every rank posts in the same axis order (a transport
    /// between processes makes its sub-communicators here).
    fn split_mesh(&mut self, _groups: &[Group]) -> Result<(), CommError> {
        Ok(())
    }

    /// This rank's channel for the program's communication stream: its
    /// calls match only the same channel's calls on the other ranks, with
    /// sequence numbers of their own, so a gradient bucket's all-reduce runs
    /// while the compute stream's collectives (tensor parallelism's) go on,
    /// as NCCL runs a communicator per stream. Both channels share one
    /// fate: a failure or an abort on either stops both. Made once, after
    /// [`Communicator::split_mesh`], and kept as long as this one: its
    /// sequence numbers go on from step to step.
    fn comm_stream(&mut self) -> Result<Box<dyn Communicator>, CommError>;

    /// Every rank of `group` ends with the reduction of all ranks' `buf`.
    fn all_reduce(&mut self, group: &Group, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// The reduction of all ranks' `input` (group size × `out.len()` long),
    /// of which group member i keeps chunk i in `out`.
    fn reduce_scatter(&mut self, group: &Group, input: &[f32], out: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// `out` (group size × `input.len()`) is every member's `input`, in group order.
    fn all_gather(&mut self, group: &Group, input: &[f32], out: &mut [f32]) -> Result<(), CommError>;
    /// Member i sends `send[offsets of counts[j]]` to member j; returns what
    /// each member sent here, concatenated in group order, and their counts.
    /// Counts may differ per pair (uneven splits, as expert dispatch needs).
    fn all_to_all(
        &mut self,
        group: &Group,
        send: &[f32],
        counts: &[usize],
    ) -> Result<(Vec<f32>, Vec<usize>), CommError>;
    /// Every member's `buf` ends as member `root`'s (a group index).
    fn broadcast(&mut self, group: &Group, root: usize, buf: &mut [f32]) -> Result<(), CommError>;
    /// Point to point, matched by (from, to, tag) in order.
    fn send(&mut self, to: usize, tag: u64, data: &[f32]) -> Result<(), CommError>;
    fn recv(&mut self, from: usize, tag: u64, out: &mut [f32]) -> Result<(), CommError>;
    fn barrier(&mut self, group: &Group) -> Result<(), CommError>;
    /// Wait for every call issued so far (a stream synchronize for NCCL).
    fn synchronize(&mut self) -> Result<(), CommError>;
    /// Report this rank's failure to every rank (their calls return it).
    fn abort(&mut self, message: &str);
}

/// This process's communicator in a world of processes (one rank each, as
/// `mpirun` starts them), shared by a run's steps and its gathers.
#[derive(Clone)]
pub struct ProcessWorld {
    comm: std::sync::Arc<std::sync::Mutex<Box<dyn Communicator>>>,
    /// The communication stream's channel, once the mesh's groups are split.
    stream: std::sync::Arc<std::sync::Mutex<Option<Box<dyn Communicator>>>>,
    /// What carries the values, for messages: `MPI`, `TCP`.
    pub transport: &'static str,
    rank: usize,
    size: usize,
    /// Processes on this machine: they share its cores.
    pub local_size: usize,
}

impl ProcessWorld {
    pub fn new(comm: Box<dyn Communicator>, transport: &'static str, local_size: usize) -> ProcessWorld {
        let (rank, size) = (comm.rank(), comm.world_size());
        ProcessWorld {
            comm: std::sync::Arc::new(std::sync::Mutex::new(comm)),
            stream: Default::default(),
            transport,
            rank,
            size,
            local_size,
        }
    }

    /// Split the world into this rank's `groups` (every process posts the
    /// same), and open the communication stream's channel on them.
    pub fn split_mesh(&self, groups: &[Group]) -> Result<(), CommError> {
        let mut comm = self.lock();
        comm.split_mesh(groups)?;
        let stream = comm.comm_stream()?;
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        Ok(())
    }

    /// The communication stream's channel (`None` before [`ProcessWorld::split_mesh`]).
    pub fn lock_stream(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Communicator>>> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Every rank of the world, as one group.
    pub fn everyone(&self) -> Group {
        Group::new("world", (0..self.size).collect())
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Communicator>> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for ProcessWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessWorld {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

/// A rank's communicator with its group along each mesh axis: what the
/// collective ops of a per-rank program run on. The compute stream's calls
/// go to `comm`; the communication stream's (the gradient buckets) to
/// `stream`, its channel ([`Communicator::comm_stream`]), from a thread of
/// their own while the compute stream goes on (`backend::run`).
pub struct RankComm<'a> {
    comm: std::sync::Mutex<&'a mut dyn Communicator>,
    stream: Option<std::sync::Mutex<&'a mut dyn Communicator>>,
    groups: std::collections::HashMap<String, Group>,
    rank: usize,
    /// Where calls are recorded as spans, when tracing.
    pub trace: Option<&'a crate::trace::Trace>,
}

impl<'a> RankComm<'a> {
    /// `order` is the rank numbering (`compiler::parallel::mesh::rank_order`).
    pub fn new(comm: &'a mut dyn Communicator, order: &[(String, u64)]) -> RankComm<'a> {
        let rank = comm.rank();
        let groups =
            order.iter().filter_map(|(axis, _)| Some((axis.clone(), group_along(order, rank, axis)?))).collect();
        RankComm { comm: std::sync::Mutex::new(comm), stream: None, groups, rank, trace: None }
    }

    /// The same, with the communication stream's channel.
    pub fn with_stream(mut self, stream: &'a mut dyn Communicator) -> RankComm<'a> {
        self.stream = Some(std::sync::Mutex::new(stream));
        self
    }

    /// Whether the communication stream has a channel of its own.
    pub fn has_stream(&self) -> bool {
        self.stream.is_some()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Run `f`, as a span named `name` on this rank's track when tracing.
    pub fn span<R>(&self, cat: &'static str, name: impl Into<String>, f: impl FnOnce() -> R) -> R {
        match self.trace {
            Some(t) => t.span(self.rank, cat, name, f),
            None => f(),
        }
    }

    /// Record a span named `name` from `t0` until now on this rank's track, when tracing.
    pub fn record(&self, cat: &'static str, name: impl Into<String>, t0: std::time::Instant) {
        if let Some(t) = self.trace {
            t.record(self.rank, cat, name, t0);
        }
    }

    pub fn group(&self, axis: &str) -> Result<&Group, CommError> {
        self.groups.get(axis).ok_or_else(|| CommError::Usage {
            rank: self.rank(),
            message: format!("the mesh has no axis `{axis}` for a collective to run on"),
        })
    }

    /// This rank's index within its group along `axis`.
    pub fn index(&self, axis: &str) -> Result<usize, CommError> {
        let rank = self.rank();
        self.group(axis)?
            .index_of(rank)
            .ok_or_else(|| CommError::Usage { rank, message: format!("not a member of its `{axis}` group") })
    }

    /// Run collective `op` (`f`) on the communicator with this rank's group along `axis`.
    pub fn with<R>(
        &self,
        op: &str,
        axis: &str,
        f: impl FnOnce(&mut dyn Communicator, &Group) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        self.call(&self.comm, false, op, axis, f)
    }

    /// Run collective `op` (`f`) on the communication stream's channel with
    /// this rank's group along `axis`, as a span on that stream's track.
    pub fn with_stream_channel<R>(
        &self,
        op: &str,
        axis: &str,
        f: impl FnOnce(&mut dyn Communicator, &Group) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        let stream = self.stream.as_ref().ok_or_else(|| CommError::Usage {
            rank: self.rank,
            message: "the communication stream has no channel of its own".into(),
        })?;
        self.call(stream, true, op, axis, f)
    }

    /// `f` on `channel` with this rank's group along `axis`, recorded (when
    /// tracing) on the rank's communication-stream track or its compute track.
    fn call<R>(
        &self,
        channel: &std::sync::Mutex<&'a mut dyn Communicator>,
        on_stream: bool,
        op: &str,
        axis: &str,
        f: impl FnOnce(&mut dyn Communicator, &Group) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        let group = self.group(axis)?;
        let t0 = std::time::Instant::now();
        let out = f(&mut **channel.lock().unwrap_or_else(|e| e.into_inner()), group);
        if let Some(t) = self.trace {
            t.record_on(self.rank, on_stream, "collective", format!("{op} {axis}"), t0);
        }
        out
    }

    /// The communicator itself (point-to-point, step numbers, abort).
    pub fn comm(&self) -> std::sync::MutexGuard<'_, &'a mut dyn Communicator> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }
}
