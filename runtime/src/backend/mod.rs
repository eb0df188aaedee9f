//! The backend boundary: what executes a lowered program
//! (`compiler::lower::Program`).
//!
//! A [`Backend`] owns a rank's memory (one allocation per region of the
//! program) and runs instructions on it: an IR op (a kernel), attention's
//! multi-output backward, the elementwise helpers of the step (accumulate,
//! scale, copy, zero, shards, norms), collectives and point-to-point
//! messages on a stream, and events between streams. [`run`] is the one
//! loop that walks a program and hands each instruction to its backend,
//! with the rank's communicator and the step's seed; the guard
//! (`skip_if_nonfinite`) is decided here, by reading the norm back.
//!
//! The CPU backend ([`cpu::Cpu`]) runs ops with the interpreter's kernels
//! (the `gemm` crate, the flash-style attention, the MoE kernels) on the
//! arena's bytes. The bucket collectives run in [`run`] for every backend
//! ([`collective`]): the communication stream's on a thread of their own,
//! beside the compute stream.

pub mod collective;
pub mod cpu;
pub mod cuda;
pub mod cuda_kernels;
pub mod interp;
pub mod jit;
pub mod native;
pub mod nvrtc;
pub mod rows;

use crate::comm::RankComm;
use std::collections::{HashSet, VecDeque};
use std::sync::mpsc;
use tessera_compiler::lower::{BufId, Buffer, Instr, Kind, Program, Stream};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rank {rank}, instruction {at} (`{name}`): {message}")]
pub struct BackendError {
    pub rank: u64,
    pub at: usize,
    pub name: &'static str,
    pub message: String,
}

/// Executes the instructions of one rank's lowered program.
pub trait Backend {
    /// Allocate the program's regions (bytes per region, in `Region::ALL` order), zeroed.
    fn alloc(&mut self, sizes: [u64; tessera_compiler::lower::Region::COUNT]) -> Result<(), String>;
    /// Get ready to run program `p` (compile its kernels), before its first run.
    fn prepare(&mut self, _p: &Program) -> Result<(), String> {
        Ok(())
    }
    /// Write a buffer's elements (f32; token ids as their values).
    fn upload(&mut self, buf: &Buffer, data: &[f32]) -> Result<(), String>;
    /// Read a buffer's elements.
    fn download(&self, buf: &Buffer) -> Result<Vec<f32>, String>;
    /// Whether every element of a buffer is finite (the update's guard, and
    /// the check of the weights after it), without copying it out.
    fn finite(&self, buf: &Buffer) -> Result<bool, String> {
        Ok(self.download(buf)?.iter().all(|x| x.is_finite()))
    }
    /// Run one instruction that is not a guard. `seed` is the step's random seed.
    fn execute<'c>(
        &mut self,
        p: &Program,
        ins: &Instr,
        comm: Option<&'c RankComm<'c>>,
        seed: u64,
    ) -> Result<(), String>;
}

/// What a run of a program reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunReport {
    /// Whether the guarded update ran (the norm was finite).
    pub updated: bool,
}

/// Run program `p` on `backend`: every instruction in order, the guard decided by the norm.
///
/// The compute stream runs on the calling thread. The communication
/// stream's collectives (the gradient buckets) run on a thread of their own
/// over the rank's stream channel: when the compute stream reaches one in
/// program order (its `wait` on the compute stream's event is then met), its
/// inputs are read and the call is handed over, and the compute stream goes
/// on; a compute `wait` on an event the communication stream recorded
/// blocks until the calls before it are done, then writes their outputs.
/// The verifier checks that no compute instruction touches a call's
/// buffers between the two, so the result is that of program order.
pub fn run<'c>(
    backend: &mut impl Backend,
    p: &Program,
    comm: Option<&'c RankComm<'c>>,
    seed: u64,
) -> Result<RunReport, BackendError> {
    let streamed = p.instrs.iter().any(|i| i.stream == Stream::Comm && matches!(i.kind, Kind::Collective { .. }));
    match comm.filter(|c| streamed && c.has_stream()) {
        None => walk(backend, p, comm, seed, None),
        Some(c) => std::thread::scope(|s| {
            let (jobs, inbox) = mpsc::channel::<Job>();
            let (done, results) = mpsc::channel::<Done>();
            s.spawn(move || serve(c, p, inbox, done));
            let mut stream = CommStream {
                jobs,
                results,
                reached: HashSet::new(),
                arrived: VecDeque::new(),
                posted: 0,
                reported: 0,
                inflight: HashSet::new(),
            };
            let out = walk(backend, p, comm, seed, Some(&mut stream));
            if let Err(e) = &out {
                // The stream's call in flight may wait for ranks that wait for this one: stop them all now.
                c.comm().abort(&e.to_string());
            }
            out
        }),
    }
}

/// What the compute thread posts to the communication stream's thread.
enum Job {
    /// Bucket collective instruction `at`, with its inputs.
    Call { at: usize, inputs: Vec<Input> },
    /// The stream reached event `record`.
    Record(u32),
}

/// A call's input: its elements as the compute stream left them, or the
/// output of an earlier call of the stream that the compute stream has not
/// joined yet (the stream runs in order: the later call reads what the
/// earlier one wrote).
enum Input {
    Staged(Vec<f32>),
    Stream(BufId),
}

/// What the communication stream's thread reports, in order.
enum Done {
    Call { at: usize, result: Result<Vec<Vec<f32>>, String> },
    Record(u32),
}

/// The compute thread's side of the communication stream.
struct CommStream {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Done>,
    /// Events the communication stream has reached.
    reached: HashSet<u32>,
    /// Calls done whose outputs are not written yet.
    arrived: VecDeque<(usize, Vec<Vec<f32>>)>,
    /// Calls posted, and calls reported done.
    posted: usize,
    reported: usize,
    /// Outputs of calls posted whose values are not written yet.
    inflight: HashSet<BufId>,
}

impl CommStream {
    /// File one report; a failed call is the run's error.
    fn file(&mut self, d: Done, p: &Program) -> Result<(), BackendError> {
        match d {
            Done::Record(e) => {
                self.reached.insert(e);
                Ok(())
            }
            Done::Call { at, result: Ok(outs) } => {
                self.reported += 1;
                self.arrived.push_back((at, outs));
                Ok(())
            }
            Done::Call { at, result: Err(message) } => {
                Err(BackendError { rank: p.rank, at, name: p.instrs[at].kind.name(), message })
            }
        }
    }

    /// File what has arrived, without waiting.
    fn poll(&mut self, p: &Program) -> Result<(), BackendError> {
        while let Ok(d) = self.results.try_recv() {
            self.file(d, p)?;
        }
        Ok(())
    }

    /// Post a call.
    fn post(&mut self, job: Job) -> Result<(), String> {
        self.posted += matches!(job, Job::Call { .. }) as usize;
        self.jobs.send(job).map_err(|_| "the communication stream's thread stopped".to_string())
    }

    /// Wait until the stream reaches `event` (`None`: until every call
    /// posted is done), then write the outputs of the calls done.
    fn wait(&mut self, event: Option<u32>, backend: &mut impl Backend, p: &Program) -> Result<(), BackendError> {
        loop {
            self.poll(p)?;
            let met = match event {
                Some(e) => self.reached.contains(&e),
                None => self.reported == self.posted,
            };
            if met {
                break;
            }
            match self.results.recv() {
                Ok(d) => self.file(d, p)?,
                Err(_) => {
                    return Err(BackendError {
                        rank: p.rank,
                        at: p.instrs.len(),
                        name: "wait",
                        message: "the communication stream's thread stopped".into(),
                    });
                }
            }
        }
        while let Some((at, outs)) = self.arrived.pop_front() {
            let ins = &p.instrs[at];
            for (b, v) in ins.outs.iter().zip(outs) {
                self.inflight.remove(b);
                backend.upload(p.buffer(*b), &v).map_err(|message| BackendError {
                    rank: p.rank,
                    at,
                    name: ins.kind.name(),
                    message,
                })?;
            }
        }
        Ok(())
    }
}

/// The communication stream's thread: run each posted call on the stream
/// channel, in order; after a failure, fail the rest without calling.
fn serve(c: &RankComm<'_>, p: &Program, jobs: mpsc::Receiver<Job>, done: mpsc::Sender<Done>) {
    let mut failed = false;
    // Outputs of earlier calls that later calls read.
    let kept = read_by_later_calls(p);
    let mut held: std::collections::HashMap<BufId, Vec<f32>> = std::collections::HashMap::new();
    for job in jobs {
        let report = match job {
            Job::Record(e) => Done::Record(e),
            Job::Call { at, inputs } => {
                let ins = &p.instrs[at];
                let inputs: Result<Vec<Vec<f32>>, String> = inputs
                    .into_iter()
                    .map(|x| match x {
                        Input::Staged(v) => Ok(v),
                        Input::Stream(b) => held.get(&b).cloned().ok_or_else(|| {
                            format!("reads `{}`, which an earlier call of the stream was to write", p.buffer(b).name)
                        }),
                    })
                    .collect();
                let result = match (failed, inputs, &ins.kind) {
                    (true, _, _) => Err("an earlier call on the communication stream failed".to_string()),
                    (false, Err(e), _) => Err(e),
                    (false, Ok(inputs), Kind::Collective { axis, op }) => c
                        .with_stream_channel(ins.kind.name(), axis, |comm, g| {
                            collective::perform(comm, g, op, &inputs, &out_sizes(p, ins))
                        })
                        .map_err(|e| e.to_string()),
                    (false, Ok(_), _) => Err("the communication stream runs collectives only".to_string()),
                };
                failed |= result.is_err();
                if let (true, Ok(values)) = (kept.contains(&at), &result) {
                    for (b, v) in ins.outs.iter().zip(values) {
                        held.insert(*b, v.clone());
                    }
                }
                Done::Call { at, result }
            }
        };
        if done.send(report).is_err() {
            return;
        }
    }
}

/// The communication stream's calls whose outputs a later call of the
/// stream reads (a partial gradient summed over the tensor axis, then over
/// the data axis).
fn read_by_later_calls(p: &Program) -> HashSet<usize> {
    let calls: Vec<usize> = (0..p.instrs.len())
        .filter(|&i| p.instrs[i].stream == Stream::Comm && matches!(p.instrs[i].kind, Kind::Collective { .. }))
        .collect();
    calls
        .iter()
        .enumerate()
        .filter(|&(n, &i)| calls[n + 1..].iter().any(|&j| p.instrs[j].ins.iter().any(|b| p.instrs[i].outs.contains(b))))
        .map(|(_, &i)| i)
        .collect()
}

/// The element counts of a collective's outputs.
fn out_sizes(p: &Program, ins: &Instr) -> Vec<usize> {
    ins.outs.iter().map(|b| p.buffer(*b).ty.numel() as usize).collect()
}

/// Walk the program on the compute thread (see [`run`]).
fn walk<'c>(
    backend: &mut impl Backend,
    p: &Program,
    comm: Option<&'c RankComm<'c>>,
    seed: u64,
    mut stream: Option<&mut CommStream>,
) -> Result<RunReport, BackendError> {
    let mut at = 0;
    let mut updated = true;
    // Events recorded on the communication stream.
    let mut comm_events: HashSet<u32> = HashSet::new();
    // When tracing: the phase open now (its name, its start) and the next phase's index.
    let tracing = comm.filter(|c| c.trace.is_some());
    let mut phase: Option<(&str, std::time::Instant)> = None;
    let mut next_phase = 0;
    let mut profile = std::env::var_os("TESSERA_PROFILE").map(|_| std::collections::BTreeMap::new());
    while at < p.instrs.len() {
        if let Some(c) = tracing
            && let Some(ph) = p.phases.get(next_phase).filter(|ph| ph.at as usize == at)
        {
            if let Some((name, t0)) = phase.take() {
                c.record("compute", name, t0);
            }
            phase = Some((&ph.name, std::time::Instant::now()));
            next_phase += 1;
        }
        let t0 = profile.is_some().then(std::time::Instant::now);
        let ins = &p.instrs[at];
        let fail = |message: String| BackendError { rank: p.rank, at, name: ins.kind.name(), message };
        if let Some(s) = stream.as_deref_mut() {
            s.poll(p)?;
        }
        match (&ins.kind, ins.stream) {
            (Kind::SkipIfNonFinite { count }, _) => {
                if !backend.finite(p.buffer(ins.ins[0])).map_err(fail)? {
                    updated = false;
                    at += *count as usize;
                }
            }
            (Kind::Collective { .. }, Stream::Comm) => {
                let s = stream
                    .as_deref_mut()
                    .ok_or_else(|| fail("a communication-stream collective needs the rank's stream channel".into()))?;
                let inputs = ins
                    .ins
                    .iter()
                    .map(|b| match s.inflight.contains(b) {
                        true => Ok(Input::Stream(*b)),
                        false => backend.download(p.buffer(*b)).map(Input::Staged),
                    })
                    .collect::<Result<_, _>>()
                    .map_err(fail)?;
                s.inflight.extend(ins.outs.iter().copied());
                s.post(Job::Call { at, inputs }).map_err(fail)?;
            }
            (Kind::Record { event }, Stream::Comm) => {
                comm_events.insert(*event);
                if let Some(s) = stream.as_deref_mut() {
                    s.post(Job::Record(*event)).map_err(fail)?;
                }
            }
            // The compute stream is here: every event it recorded before is met.
            (Kind::Wait { .. }, Stream::Comm) => {}
            (Kind::Wait { event }, Stream::Compute) if comm_events.contains(event) => {
                if let Some(s) = stream.as_deref_mut() {
                    s.wait(Some(*event), backend, p)?;
                }
            }
            (Kind::Collective { axis, op }, Stream::Compute) => {
                let c = comm.ok_or_else(|| fail("a collective needs the rank's communicator".into()))?;
                let inputs: Vec<Vec<f32>> =
                    ins.ins.iter().map(|b| backend.download(p.buffer(*b))).collect::<Result<_, _>>().map_err(fail)?;
                let outs = out_sizes(p, ins);
                let result = c
                    .with(ins.kind.name(), axis, |comm, g| collective::perform(comm, g, op, &inputs, &outs))
                    .map_err(|e| fail(e.to_string()))?;
                for (b, v) in ins.outs.iter().zip(result) {
                    backend.upload(p.buffer(*b), &v).map_err(fail)?;
                }
            }
            _ => backend.execute(p, ins, comm, seed).map_err(fail)?,
        }
        if let (Some(t), Some(t0)) = (profile.as_mut(), t0) {
            let e: &mut (f64, usize) = t.entry(profile_key(ins)).or_default();
            e.0 += t0.elapsed().as_secs_f64();
            e.1 += 1;
        }
        at += 1;
    }
    // A program ends with its streams joined; whatever is still in flight lands now.
    if let Some(s) = stream {
        s.wait(None, backend, p)?;
    }
    if let (Some(c), Some((name, t0))) = (tracing, phase) {
        c.record("compute", name, t0);
    }
    if let Some(t) = profile {
        let mut rows: Vec<_> = t.into_iter().collect();
        rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
        for (name, (t, n)) in rows {
            eprintln!("profile rank {} {name:<24} {:>9.2} ms  {n:>5} instructions", p.rank, t * 1e3);
        }
    }
    Ok(RunReport { updated })
}

/// The profile's row of an instruction: its kind, or its op's name.
fn profile_key(ins: &Instr) -> String {
    match &ins.kind {
        Kind::Op { op, .. } => op.name().to_string(),
        Kind::AttentionGrads { .. } => "attention_grads".into(),
        Kind::Kernel { kernel } => format!("kernel[{}]", kernel.ops.join(",")),
        k => k.name().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{CommError, Communicator, Group, ReduceOp};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// Rank 0 of two: its compute channel's `send` marks that the compute
    /// stream got there; its stream channel's `all_reduce` waits for that
    /// mark (at most 5 s), then doubles the values (the peer's are the same).
    struct Fake {
        sent: Arc<(Mutex<bool>, Condvar)>,
        stream: bool,
    }

    impl Communicator for Fake {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn set_step(&mut self, _: u64) {}
        fn comm_stream(&mut self) -> Result<Box<dyn Communicator>, CommError> {
            Ok(Box::new(Fake { sent: self.sent.clone(), stream: true }))
        }
        fn all_reduce(&mut self, _: &Group, buf: &mut [f32], _: ReduceOp) -> Result<(), CommError> {
            assert!(self.stream, "the bucket runs on the stream channel");
            let (lock, cv) = &*self.sent;
            let (sent, _) = cv.wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(5), |s| !*s).unwrap();
            if !*sent {
                return Err(CommError::Usage {
                    rank: 0,
                    message: "the compute stream never got past the issue".into(),
                });
            }
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn send(&mut self, _: usize, _: u64, _: &[f32]) -> Result<(), CommError> {
            assert!(!self.stream, "point to point runs on the compute channel");
            *self.sent.0.lock().unwrap() = true;
            self.sent.1.notify_all();
            Ok(())
        }
        fn reduce_scatter(&mut self, _: &Group, _: &[f32], _: &mut [f32], _: ReduceOp) -> Result<(), CommError> {
            unreachable!()
        }
        fn all_gather(&mut self, _: &Group, _: &[f32], _: &mut [f32]) -> Result<(), CommError> {
            unreachable!()
        }
        fn all_to_all(&mut self, _: &Group, _: &[f32], _: &[usize]) -> Result<(Vec<f32>, Vec<usize>), CommError> {
            unreachable!()
        }
        fn broadcast(&mut self, _: &Group, _: usize, _: &mut [f32]) -> Result<(), CommError> {
            unreachable!()
        }
        fn recv(&mut self, _: usize, _: u64, _: &mut [f32]) -> Result<(), CommError> {
            unreachable!()
        }
        fn barrier(&mut self, _: &Group) -> Result<(), CommError> {
            unreachable!()
        }
        fn synchronize(&mut self) -> Result<(), CommError> {
            Ok(())
        }
        fn abort(&mut self, _: &str) {}
    }

    const PROGRAM: &str = r#"program rank 0 {data = 0}
regions {param = 0, grad = 16, optim = 0, io = 20, arena = 0, cache = 0}
b0 = buffer grad+0 : f32[n=4] "g.0"
b1 = buffer io+0 : f32[n=1] "x"
b2 = buffer io+4 : f32[n=4] "y"
record() {event = 0}
wait() {event = 0} @comm
b0 = bucket_all_reduce(b0) {axis = data, op = sum} @comm
send(b1) {peer = 1, tag = 7}
record() {event = 1} @comm
wait() {event = 1}
b2 = copy(b0)
"#;

    /// The bucket's all-reduce runs while the compute stream goes on: it
    /// finishes only once the compute stream has passed the `send` after
    /// it, which a run of both streams in program order never would; the
    /// join then writes its result before the copy reads it.
    #[test]
    fn the_communication_stream_runs_beside_the_compute_stream() {
        let p = tessera_compiler::lower::text::parse(PROGRAM).expect("parses");
        tessera_compiler::lower::verify::verify(&p).expect("verifies");
        let mut backend = cpu::Cpu::new();
        backend.alloc(p.sizes).unwrap();
        backend.upload(p.buffer(BufId(0)), &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let sent = Arc::new((Mutex::new(false), Condvar::new()));
        let mut comm = Fake { sent, stream: false };
        let mut stream = comm.comm_stream().unwrap();
        let order = vec![("data".to_string(), 2u64)];
        let rc = RankComm::new(&mut comm, &order).with_stream(&mut *stream);
        run(&mut backend, &p, Some(&rc), 0).expect("runs");
        assert_eq!(backend.download(p.buffer(BufId(2))).unwrap(), vec![2.0, 4.0, 6.0, 8.0]);
    }

    /// A compute instruction that writes a bucket's gradient between its
    /// issue and its join is rejected before anything runs.
    #[test]
    fn a_write_to_a_bucket_in_flight_is_rejected() {
        let racy = PROGRAM.replace("send(b1) {peer = 1, tag = 7}", "b0 = copy(b2)");
        let p = tessera_compiler::lower::text::parse(&racy).expect("parses");
        let e = tessera_compiler::lower::verify::verify(&p).unwrap_err().to_string();
        assert!(
            e.contains("instruction 3: copy: writes `g.0` while the communication stream's `bucket_all_reduce`"),
            "{e}"
        );
    }
}
