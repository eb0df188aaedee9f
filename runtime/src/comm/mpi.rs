//! The MPI communicator: ranks as processes started by `mpirun` (or by
//! `srun` where Slurm's MPI plugin starts them), each running one rank's
//! program; Open MPI, MPICH or any MPI-3 library moves the values.
//!
//! MPI lives on progress threads of its own, one per channel: the compute
//! stream's initialises MPI (threading level `multiple`), splits the world
//! into the mesh's groups, and duplicates each communicator for the
//! communication stream's channel, whose thread
//! ([`Communicator::comm_stream`]) runs its calls on those duplicates. Each
//! thread runs the calls its channel posts, in the order they were posted,
//! so a gradient bucket's all-reduce is in flight while the compute
//! stream's collectives run: non-blocking for the rank, on a progress
//! thread of its own. The posting thread waits for a call's result at
//! most the timeout: a collective that waits longer fails with the rank, the
//! op, the group and the step, as the in-process communicator's does (MPI
//! cannot say which members are missing). Sends are MPI's immediate sends,
//! completed later, so that two ranks that send to each other before they
//! receive cannot deadlock, as with the in-process mailboxes.
//!
//! A rank that fails calls [`Communicator::abort`]: its message is printed,
//! and MPI_Abort ends every process of the job, as Open MPI's launcher
//! reports.

use super::{CommError, Communicator, Group, ReduceOp, sizes};
use mpi::Threading;
use mpi::datatype::{Partition, PartitionMut};
use mpi::request::StaticScope;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as Communicator2;
use mpi::traits::*;
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

/// One call, posted to the progress thread with its data.
enum Call {
    AllReduce {
        data: Vec<f32>,
        op: ReduceOp,
    },
    ReduceScatter {
        data: Vec<f32>,
        chunk: usize,
        op: ReduceOp,
    },
    AllGather {
        data: Vec<f32>,
    },
    AllToAll {
        data: Vec<f32>,
        counts: Vec<usize>,
    },
    Broadcast {
        data: Vec<f32>,
        root: usize,
    },
    Send {
        to: usize,
        tag: u64,
        data: Vec<f32>,
    },
    Recv {
        from: usize,
        tag: u64,
    },
    Barrier,
    /// Split the world into the groups along each mesh axis (every process
    /// posts the same axes, in the same order), and duplicate them all for
    /// the communication stream's channel.
    Split {
        groups: Vec<Group>,
    },
    /// Start the communication stream's progress thread on the duplicates.
    Stream,
    /// End the communication stream's progress thread (at exit).
    Stop,
}

type Reply = Result<(Vec<f32>, Vec<usize>), String>;

struct Job {
    ranks: Vec<usize>,
    call: Call,
    reply: mpsc::SyncSender<Reply>,
}

/// One channel's MPI communicators: the world's and each mesh group's.
struct Comms {
    world: SimpleCommunicator,
    groups: HashMap<Vec<usize>, SimpleCommunicator>,
}

/// Communicators handed to the thread that alone uses them from then on.
struct Owned(Comms);

// SAFETY: MPI runs at threading level `multiple`, where any thread may call
// MPI with any handle; each `Comms` is used by one thread at a time (the
// compute channel's thread, or the communication stream's after the move).
unsafe impl Send for Owned {}

/// This process's rank in an MPI world.
pub struct Mpi {
    rank: usize,
    size: usize,
    step: u64,
    timeout: Duration,
    jobs: Option<mpsc::Sender<Job>>,
    /// The compute channel's progress thread (owns MPI); `None` on the
    /// communication stream's channel, whose thread the former ends.
    thread: Option<std::thread::JoinHandle<()>>,
    /// Where the communication stream's channel posts its calls (the
    /// compute channel's handle, for [`Communicator::comm_stream`]).
    stream: Option<mpsc::Sender<Job>>,
    /// A call that timed out or a rank that aborted: the progress thread may
    /// be stuck in MPI, so every later call fails at once and nothing waits
    /// for it at exit.
    broken: Option<CommError>,
}

impl Mpi {
    /// Initialise MPI on a progress thread; collectives fail after waiting
    /// `timeout`. Fails where MPI is initialised already or cannot start
    /// (no launcher's environment that the library understands).
    pub fn init(timeout: Duration) -> Result<Mpi, String> {
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (stream_tx, stream_rx) = mpsc::channel::<Job>();
        let stop = stream_tx.clone();
        let thread = std::thread::Builder::new()
            .name("mpi-progress".into())
            .spawn(move || progress(jobs_rx, ready_tx, stream_rx, stop))
            .map_err(|e| format!("cannot start MPI's progress thread: {e}"))?;
        let (rank, size) =
            ready_rx.recv().map_err(|_| "MPI's progress thread stopped while initialising MPI".to_string())??;
        Ok(Mpi {
            rank,
            size,
            step: 0,
            timeout,
            jobs: Some(jobs_tx),
            thread: Some(thread),
            stream: Some(stream_tx),
            broken: None,
        })
    }

    /// Post `call` on `ranks` and wait for its result (at most the timeout).
    fn call(&mut self, op: &'static str, what: String, ranks: &[usize], call: Call) -> Done {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let job = Job { ranks: ranks.to_vec(), call, reply: tx };
        let posted = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !posted {
            return Err(self.usage("MPI's progress thread has stopped".into()));
        }
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(message)) => Err(self.usage(message)),
            Err(_) => {
                let e = CommError::Timeout {
                    rank: self.rank,
                    op,
                    group: what,
                    step: self.step,
                    waited_ms: self.timeout.as_millis() as u64,
                    missing: vec![],
                };
                self.broken = Some(e.clone());
                Err(e)
            }
        }
    }

    fn usage(&self, message: String) -> CommError {
        CommError::Usage { rank: self.rank, message }
    }

    /// Check that this rank is a member of `group`.
    fn member(&self, group: &Group, op: &str) -> Result<(), CommError> {
        match group.index_of(self.rank) {
            Some(_) => Ok(()),
            None => Err(self.usage(format!("`{op}` on the {group}, which does not contain this rank"))),
        }
    }
}

/// A call's result on the rank's side.
type Done = Result<(Vec<f32>, Vec<usize>), CommError>;

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    fn comm_stream(&mut self) -> Result<Box<dyn Communicator>, CommError> {
        let Some(stream) = self.stream.clone() else {
            return Err(self.usage("the communication stream's channel has no channel of its own".into()));
        };
        let world: Vec<usize> = (0..self.size).collect();
        self.call("comm_stream", "world".into(), &world, Call::Stream)?;
        Ok(Box::new(Mpi {
            rank: self.rank,
            size: self.size,
            step: self.step,
            timeout: self.timeout,
            jobs: Some(stream),
            thread: None,
            stream: None,
            broken: None,
        }))
    }

    fn split_mesh(&mut self, groups: &[Group]) -> Result<(), CommError> {
        let world: Vec<usize> = (0..self.size).collect();
        self.call("split", "world".into(), &world, Call::Split { groups: groups.to_vec() }).map(|_| ())
    }

    fn all_reduce(&mut self, group: &Group, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.member(group, "all_reduce")?;
        let (out, _) =
            self.call("all_reduce", group.to_string(), &group.ranks, Call::AllReduce { data: buf.to_vec(), op })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter(&mut self, group: &Group, input: &[f32], out: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.member(group, "reduce_scatter")?;
        sizes::reduce_scatter(group, input.len(), out.len()).map_err(|m| self.usage(m))?;
        let call = Call::ReduceScatter { data: input.to_vec(), chunk: out.len(), op };
        let (mine, _) = self.call("reduce_scatter", group.to_string(), &group.ranks, call)?;
        out.copy_from_slice(&mine);
        Ok(())
    }

    fn all_gather(&mut self, group: &Group, input: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        self.member(group, "all_gather")?;
        sizes::all_gather(group, input.len(), out.len()).map_err(|m| self.usage(m))?;
        let (all, _) =
            self.call("all_gather", group.to_string(), &group.ranks, Call::AllGather { data: input.to_vec() })?;
        out.copy_from_slice(&all);
        Ok(())
    }

    fn all_to_all(
        &mut self,
        group: &Group,
        send: &[f32],
        counts: &[usize],
    ) -> Result<(Vec<f32>, Vec<usize>), CommError> {
        self.member(group, "all_to_all")?;
        sizes::all_to_all(group, send.len(), counts).map_err(|m| self.usage(m))?;
        let call = Call::AllToAll { data: send.to_vec(), counts: counts.to_vec() };
        self.call("all_to_all", group.to_string(), &group.ranks, call)
    }

    fn broadcast(&mut self, group: &Group, root: usize, buf: &mut [f32]) -> Result<(), CommError> {
        self.member(group, "broadcast")?;
        sizes::broadcast(group, root).map_err(|m| self.usage(m))?;
        let (out, _) =
            self.call("broadcast", group.to_string(), &group.ranks, Call::Broadcast { data: buf.to_vec(), root })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn send(&mut self, to: usize, tag: u64, data: &[f32]) -> Result<(), CommError> {
        if to >= self.size {
            return Err(self.usage(format!("send to rank {to} of {}", self.size)));
        }
        let what = format!("pair ({} → {to}), tag {tag}", self.rank);
        self.call("send", what, &[], Call::Send { to, tag, data: data.to_vec() }).map(|_| ())
    }

    fn recv(&mut self, from: usize, tag: u64, out: &mut [f32]) -> Result<(), CommError> {
        if from >= self.size {
            return Err(self.usage(format!("receive from rank {from} of {}", self.size)));
        }
        let what = format!("pair ({from} → {}), tag {tag}", self.rank);
        let (data, _) = self.call("recv", what, &[], Call::Recv { from, tag })?;
        if data.len() != out.len() {
            return Err(super::recv_mismatch(self.rank, self.step, from, tag, out.len(), data.len()));
        }
        out.copy_from_slice(&data);
        Ok(())
    }

    fn barrier(&mut self, group: &Group) -> Result<(), CommError> {
        self.member(group, "barrier")?;
        self.call("barrier", group.to_string(), &group.ranks, Call::Barrier).map(|_| ())
    }

    fn synchronize(&mut self) -> Result<(), CommError> {
        self.broken.clone().map_or(Ok(()), Err)
    }

    fn abort(&mut self, message: &str) {
        if self.broken.is_none() {
            self.broken = Some(CommError::Aborted {
                rank: self.rank,
                failed: self.rank,
                step: self.step,
                message: message.into(),
            });
        }
        // MPI_Abort ends every process of the job, this one included, and
        // may be called from any thread at level `multiple`: a progress
        // thread stuck in a call does not hold it up. The message goes first.
        eprintln!("rank {}: {message}\nrank {}: aborting every rank of the MPI job", self.rank, self.rank);
        mpi::topology::SimpleCommunicator::world().abort(1);
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // A healthy world finalises MPI; a broken one must not wait for a
        // thread that may be stuck in a call.
        if self.broken.is_some() {
            return;
        }
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// MPI's tags are at least 0..=32767 (MPI_TAG_UB): a program's 64-bit tag
/// folded into that range. Messages between one pair keep their order in
/// MPI, so two tags that fold alike still match in program order.
fn mpi_tag(tag: u64) -> i32 {
    let mut t = tag;
    let mut folded = 0u64;
    while t != 0 {
        folded ^= t & 0x7fff;
        t >>= 15;
    }
    folded as i32
}

/// Sends in flight: the request and the buffer it reads, freed once it completes.
struct Sending {
    request: mpi::request::Request<'static, [f32], StaticScope>,
    buffer: *mut [f32],
}

impl Sending {
    /// Whether it completed (and its buffer was freed).
    fn done(self) -> Option<Sending> {
        match self.request.test() {
            Ok(_) => {
                // SAFETY: `buffer` came from `Box::leak` in `send`, and the
                // send that read it has completed.
                drop(unsafe { Box::from_raw(self.buffer) });
                None
            }
            Err(request) => Some(Sending { request, buffer: self.buffer }),
        }
    }

    fn wait(self) {
        self.request.wait();
        // SAFETY: as in `done`: the send has completed.
        drop(unsafe { Box::from_raw(self.buffer) });
    }
}

/// The compute channel's progress thread: initialise MPI, serve the
/// compute channel's calls, then end the communication stream's thread and
/// finalise MPI.
fn progress(
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::SyncSender<Result<(usize, usize), String>>,
    stream: mpsc::Receiver<Job>,
    stop: mpsc::Sender<Job>,
) {
    let Some((universe, level)) = mpi::initialize_with_threading(Threading::Multiple) else {
        let _ = ready.send(Err("MPI is initialised already in this process".into()));
        return;
    };
    if level != Threading::Multiple {
        let _ = ready.send(Err(format!(
            "this MPI library gives threading level {level:?}, but each of a rank's two streams has a progress \
             thread of its own, which needs `Multiple` (MPI_THREAD_MULTIPLE): use an Open MPI or MPICH built with \
             thread support (Debian's and Ubuntu's are)"
        )));
        return;
    }
    let world = universe.world();
    let _ = ready.send(Ok((world.rank() as usize, world.size() as usize)));
    let mut control = Control { spare: None, stream: Some(stream), thread: None };
    serve(Comms { world, groups: HashMap::new() }, jobs, Some(&mut control));
    if let Some(t) = control.thread.take() {
        let (tx, _rx) = mpsc::sync_channel(1);
        let _ = stop.send(Job { ranks: vec![], call: Call::Stop, reply: tx });
        let _ = t.join();
    }
    drop(control);
    drop(universe);
}

/// What only the compute channel's thread holds: the communication
/// stream's communicators until its thread starts, and that thread.
struct Control {
    spare: Option<Comms>,
    stream: Option<mpsc::Receiver<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Run one channel's calls on its communicators, in the order posted, until
/// its handle is dropped (or told to stop).
fn serve(mut comms: Comms, jobs: mpsc::Receiver<Job>, mut control: Option<&mut Control>) {
    let size = comms.world.size() as usize;
    let mut sending: Vec<Sending> = Vec::new();
    while let Ok(job) = jobs.recv() {
        let everyone = job.ranks.len() == size && job.ranks.iter().enumerate().all(|(i, &r)| i == r);
        let reply = match (job.call, control.as_deref_mut()) {
            (Call::Stop, _) => break,
            (Call::Split { groups }, Some(c)) => split(&mut comms, &groups).map(|spare| {
                c.spare = Some(spare);
                (vec![], vec![])
            }),
            (Call::Stream, Some(c)) => start_stream(c),
            (Call::Split { .. } | Call::Stream, None) => {
                Err("the communication stream's channel cannot split the world or start channels".into())
            }
            (Call::Send { to, tag, data }, _) => {
                let buffer: &'static mut [f32] = Box::leak(data.into_boxed_slice());
                let raw: *mut [f32] = buffer;
                // SAFETY: the leaked buffer lives until `Sending` frees it after completion.
                let request = comms.world.process_at_rank(to as i32).immediate_send_with_tag(
                    StaticScope,
                    unsafe { &*raw },
                    mpi_tag(tag),
                );
                sending.push(Sending { request, buffer: raw });
                Ok((vec![], vec![]))
            }
            (Call::Recv { from, tag }, _) => {
                let peer = comms.world.process_at_rank(from as i32);
                let status = peer.probe_with_tag(mpi_tag(tag));
                let count = status.count(f32::equivalent_datatype()).max(0) as usize;
                let mut buf = vec![0f32; count];
                peer.receive_into_with_tag(&mut buf[..], mpi_tag(tag));
                Ok((buf, vec![]))
            }
            (call, _) => match (everyone, comms.groups.get(&job.ranks)) {
                (true, _) => Ok(collective(&comms.world, call)),
                (false, Some(c)) => Ok(collective(c, call)),
                (false, None) => Err(format!(
                    "no MPI communicator for the group of ranks {:?}: the mesh's groups are split when the ranks \
                     start",
                    job.ranks
                )),
            },
        };
        sending = sending.into_iter().filter_map(Sending::done).collect();
        let _ = job.reply.send(reply);
    }
    for s in sending {
        s.wait();
    }
}

/// Start the communication stream's progress thread on the duplicated communicators.
fn start_stream(c: &mut Control) -> Reply {
    if c.thread.is_some() {
        return Ok((vec![], vec![]));
    }
    let Some(comms) = c.spare.take() else {
        return Err("the communication stream's channel needs the mesh's groups: split the world first".into());
    };
    let Some(jobs) = c.stream.take() else {
        return Err("the communication stream's channel was started and ended already".into());
    };
    let owned = Owned(comms);
    let thread = std::thread::Builder::new().name("mpi-progress-comm".into()).spawn(move || {
        let owned = owned;
        serve(owned.0, jobs, None)
    });
    match thread {
        Ok(t) => {
            c.thread = Some(t);
            Ok((vec![], vec![]))
        }
        Err(e) => Err(format!("cannot start the communication stream's progress thread: {e}")),
    }
}

/// One communicator per group of `groups` that holds this rank, made by
/// splitting the world once per axis (every process splits for every axis),
/// into `comms`; the result is a duplicate of the world and of each group
/// for the communication stream's channel.
fn split(comms: &mut Comms, groups: &[Group]) -> Result<Comms, String> {
    let world = &comms.world;
    let me = world.rank() as usize;
    let mut spare = Comms { world: world.duplicate(), groups: HashMap::new() };
    for g in groups {
        let Some(index) = g.index_of(me) else {
            return Err(format!("rank {me} is not in its own {g}"));
        };
        // Members of one group share its first rank: the colour.
        let color = mpi::topology::Color::with_value(g.ranks[0] as i32);
        let Some(c) = world.split_by_color_with_key(color, index as i32) else {
            return Err(format!("MPI could not split the world into the {g}"));
        };
        if c.size() as usize != g.ranks.len() {
            return Err(format!(
                "the {g} holds {} ranks under MPI but {} in the mesh: every process must split the same axes",
                c.size(),
                g.ranks.len()
            ));
        }
        spare.groups.insert(g.ranks.clone(), c.duplicate());
        comms.groups.insert(g.ranks.clone(), c);
    }
    Ok(spare)
}

fn system_op(op: ReduceOp) -> mpi::collective::SystemOperation {
    use mpi::collective::SystemOperation;
    match op {
        ReduceOp::Sum | ReduceOp::Mean => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
        ReduceOp::Min => SystemOperation::min(),
    }
}

/// Run collective `call` on `comm` (the group's communicator), blocking.
fn collective(comm: &impl Communicator2, call: Call) -> (Vec<f32>, Vec<usize>) {
    let n = comm.size() as usize;
    let mean = |v: &mut Vec<f32>, op: ReduceOp| {
        if op == ReduceOp::Mean {
            v.iter_mut().for_each(|x| *x /= n as f32);
        }
    };
    match call {
        Call::AllReduce { data, op } => {
            let mut out = vec![0f32; data.len()];
            comm.all_reduce_into(&data[..], &mut out[..], system_op(op));
            mean(&mut out, op);
            (out, vec![])
        }
        Call::ReduceScatter { data, chunk, op } => {
            let mut out = vec![0f32; chunk];
            if chunk > 0 {
                comm.reduce_scatter_block_into(&data[..], &mut out[..], system_op(op));
            }
            mean(&mut out, op);
            (out, vec![])
        }
        Call::AllGather { data } => {
            let mut out = vec![0f32; data.len() * n];
            comm.all_gather_into(&data[..], &mut out[..]);
            (out, vec![])
        }
        Call::Broadcast { mut data, root } => {
            comm.process_at_rank(root as i32).broadcast_into(&mut data[..]);
            (data, vec![])
        }
        Call::AllToAll { data, counts } => {
            let send_counts: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
            let mut recv_counts = vec![0i32; n];
            comm.all_to_all_into(&send_counts[..], &mut recv_counts[..]);
            let displs = |c: &[i32]| -> Vec<i32> {
                c.iter()
                    .scan(0i32, |at, &x| {
                        let d = *at;
                        *at += x;
                        Some(d)
                    })
                    .collect()
            };
            let (sd, rd) = (displs(&send_counts), displs(&recv_counts));
            let total: i32 = recv_counts.iter().sum();
            let mut out = vec![0f32; total as usize];
            {
                let send = Partition::new(&data[..], &send_counts[..], &sd[..]);
                let mut recv = PartitionMut::new(&mut out[..], &recv_counts[..], &rd[..]);
                comm.all_to_all_varcount_into(&send, &mut recv);
            }
            (out, recv_counts.iter().map(|&c| c as usize).collect())
        }
        Call::Barrier => {
            comm.barrier();
            (vec![], vec![])
        }
        Call::Send { .. } | Call::Recv { .. } | Call::Split { .. } | Call::Stream | Call::Stop => {
            unreachable!("point-to-point calls, splits and channels are not collectives")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mpi_tag;

    #[test]
    fn tags_fold_into_mpi_range() {
        for t in [0u64, 1, 32767, 32768, 1 << 62, (1 << 62) | 5, u64::MAX] {
            assert!((0..=32767).contains(&mpi_tag(t)), "{t}");
        }
        assert_eq!(mpi_tag(7), 7);
        assert_ne!(mpi_tag((1 << 62) | 1), mpi_tag((1 << 62) | 2));
    }
}
