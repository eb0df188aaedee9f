//! The in-process communicator: one thread per rank, collectives meet in a
//! shared table under one lock, and waits are bounded by a timeout.

use super::{CommError, Communicator, Group, ReduceOp, sizes};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Ranks that share collectives: make one, then run a function on every rank.
#[derive(Clone)]
pub struct World {
    hub: Arc<Hub>,
}

struct Hub {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// The first failure: (rank, step, message).
    aborted: Option<(usize, u64, String)>,
    /// Collectives in flight, by (group ranks, channel, sequence number in
    /// that group on that channel).
    slots: HashMap<(Vec<usize>, u8, u64), Slot>,
    /// Point-to-point messages by (channel, from, to, tag), in send order.
    mail: HashMap<(u8, usize, usize, u64), VecDeque<Vec<f32>>>,
}

/// One collective call, as the group's members arrive.
struct Slot {
    op: &'static str,
    /// What every member must agree on (lengths, reduction), for mismatch errors.
    signature: String,
    first: usize,
    inputs: Vec<Option<(Vec<f32>, Vec<usize>)>>,
    /// Per member: its result, once everyone has arrived.
    results: Option<Vec<(Vec<f32>, Vec<usize>)>>,
    unread: usize,
}

impl World {
    /// `size` ranks whose collectives fail after waiting `timeout`.
    pub fn new(size: usize, timeout: Duration) -> World {
        World { hub: Arc::new(Hub { size, timeout, state: Mutex::new(State::default()), changed: Condvar::new() }) }
    }

    /// This rank's communicator.
    pub fn rank(&self, rank: usize) -> Local {
        Local { hub: self.hub.clone(), rank, step: 0, seq: HashMap::new(), channel: 0 }
    }

    /// Run `f` on every rank, each on its own thread. A rank that returns an
    /// error or panics aborts the others (their pending and next calls fail);
    /// the result is every rank's value, or the first failure.
    pub fn run<T: Send>(&self, f: impl Fn(&mut Local) -> Result<T, String> + Sync) -> Result<Vec<T>, String> {
        let results: Vec<Result<T, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..self.hub.size)
                .map(|r| {
                    let f = &f;
                    let mut comm = self.rank(r);
                    scope.spawn(move || {
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut comm)));
                        let out = match out {
                            Ok(v) => v,
                            Err(p) => {
                                let msg = p
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_else(|| "panicked".into());
                                Err(format!("panicked: {msg}"))
                            }
                        };
                        if let Err(e) = &out {
                            comm.abort(e);
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a rank thread died".into()))).collect()
        });
        // The root cause first: the failed rank's own error, not the aborts it caused.
        let failed = self.lock().aborted.clone();
        if let Some((rank, _, _)) = failed
            && let Some(Err(e)) = results.get(rank)
        {
            return Err(e.clone());
        }
        results.into_iter().collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.hub.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank's communicator in a [`World`].
pub struct Local {
    hub: Arc<Hub>,
    rank: usize,
    step: u64,
    /// Collectives issued so far per group: matches calls across ranks.
    seq: HashMap<Vec<usize>, u64>,
    /// 0: the compute stream's calls; 1: the communication stream's.
    channel: u8,
}

fn reduce(op: ReduceOp, acc: &mut [f32], x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a = match op {
            ReduceOp::Sum | ReduceOp::Mean => *a + *v,
            ReduceOp::Max => a.max(*v),
            ReduceOp::Min => a.min(*v),
        };
    }
}

impl Local {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.hub.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn aborted(&self, st: &State) -> Option<CommError> {
        st.aborted.as_ref().map(|(failed, step, message)| CommError::Aborted {
            rank: self.rank,
            failed: *failed,
            step: *step,
            message: message.clone(),
        })
    }

    /// An error this rank returns also stops every other rank.
    fn fail(&self, mut st: MutexGuard<'_, State>, e: CommError) -> CommError {
        if st.aborted.is_none() && !matches!(e, CommError::Aborted { .. }) {
            st.aborted = Some((self.rank, self.step, e.to_string()));
        }
        drop(st);
        self.hub.changed.notify_all();
        e
    }

    /// A call made wrongly (sizes that do not fit): an error that stops every rank.
    fn usage(&self, message: String) -> CommError {
        let st = self.lock();
        self.fail(st, CommError::Usage { rank: self.rank, message })
    }

    /// The meeting point of every collective: post this member's input, wait
    /// for the others, and take this member's part of the result, which
    /// `combine` computes once from all inputs in group order.
    fn collective(
        &mut self,
        group: &Group,
        op: &'static str,
        signature: String,
        input: (Vec<f32>, Vec<usize>),
        combine: impl FnOnce(&[(Vec<f32>, Vec<usize>)]) -> Vec<(Vec<f32>, Vec<usize>)>,
    ) -> Result<(Vec<f32>, Vec<usize>), CommError> {
        let Some(me) = group.index_of(self.rank) else {
            return Err(self.usage(format!("`{op}` on the {group}, which does not contain this rank")));
        };
        let seq = {
            let s = self.seq.entry(group.ranks.clone()).or_insert(0);
            *s += 1;
            *s
        };
        let key = (group.ranks.clone(), self.channel, seq);
        let n = group.ranks.len();
        let mut st = self.lock();
        if let Some(e) = self.aborted(&st) {
            return Err(e);
        }
        let slot = st.slots.entry(key.clone()).or_insert_with(|| Slot {
            op,
            signature: signature.clone(),
            first: self.rank,
            inputs: vec![None; n],
            results: None,
            unread: n,
        });
        if slot.op != op || slot.signature != signature {
            let e = CommError::Mismatch {
                rank: self.rank,
                op,
                group: group.to_string(),
                step: self.step,
                other: slot.first,
                other_op: slot.op,
                detail: format!("this rank: {signature}; rank {}: {}", slot.first, slot.signature),
            };
            return Err(self.fail(st, e));
        }
        slot.inputs[me] = Some(input);
        if slot.inputs.iter().all(Option::is_some) {
            let inputs: Vec<_> = slot.inputs.iter_mut().map(|x| x.take().unwrap_or_default()).collect();
            slot.results = Some(combine(&inputs));
            self.hub.changed.notify_all();
        }
        let deadline = Instant::now() + self.hub.timeout;
        loop {
            if let Some(e) = self.aborted(&st) {
                return Err(e);
            }
            let slot = st.slots.get_mut(&key).expect("a slot stays until all members read it");
            if let Some(results) = slot.results.as_mut() {
                let mine = std::mem::take(&mut results[me]);
                slot.unread -= 1;
                if slot.unread == 0 {
                    st.slots.remove(&key);
                }
                return Ok(mine);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing =
                    group.ranks.iter().zip(&slot.inputs).filter(|(_, x)| x.is_none()).map(|(r, _)| *r).collect();
                let e = CommError::Timeout {
                    rank: self.rank,
                    op,
                    group: group.to_string(),
                    step: self.step,
                    waited_ms: self.hub.timeout.as_millis() as u64,
                    missing,
                };
                return Err(self.fail(st, e));
            }
            st = self.hub.changed.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Communicator for Local {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.hub.size
    }

    fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    fn comm_stream(&mut self) -> Result<Box<dyn Communicator>, CommError> {
        Ok(Box::new(Local { hub: self.hub.clone(), rank: self.rank, step: self.step, seq: HashMap::new(), channel: 1 }))
    }

    fn all_reduce(&mut self, group: &Group, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let n = group.ranks.len();
        let sig = format!("{} f32 values, {op:?}", buf.len());
        let (out, _) = self.collective(group, "all_reduce", sig, (buf.to_vec(), vec![]), |ins| {
            let mut acc = ins[0].0.clone();
            for x in &ins[1..] {
                reduce(op, &mut acc, &x.0);
            }
            if op == ReduceOp::Mean {
                acc.iter_mut().for_each(|v| *v /= n as f32);
            }
            vec![(acc, vec![]); n]
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter(&mut self, group: &Group, input: &[f32], out: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let n = group.ranks.len();
        sizes::reduce_scatter(group, input.len(), out.len()).map_err(|m| self.usage(m))?;
        let chunk = out.len();
        let sig = format!("{} f32 values, {op:?}", input.len());
        let (mine, _) = self.collective(group, "reduce_scatter", sig, (input.to_vec(), vec![]), |ins| {
            let mut acc = ins[0].0.clone();
            for x in &ins[1..] {
                reduce(op, &mut acc, &x.0);
            }
            if op == ReduceOp::Mean {
                acc.iter_mut().for_each(|v| *v /= n as f32);
            }
            acc.chunks(chunk.max(1))
                .map(|c| (c.to_vec(), vec![]))
                .chain(std::iter::repeat_n((vec![], vec![]), n))
                .take(n)
                .collect()
        })?;
        out.copy_from_slice(&mine);
        Ok(())
    }

    fn all_gather(&mut self, group: &Group, input: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let n = group.ranks.len();
        sizes::all_gather(group, input.len(), out.len()).map_err(|m| self.usage(m))?;
        let sig = format!("{} f32 values", input.len());
        let (all, _) = self.collective(group, "all_gather", sig, (input.to_vec(), vec![]), |ins| {
            let cat: Vec<f32> = ins.iter().flat_map(|x| x.0.iter().copied()).collect();
            vec![(cat, vec![]); n]
        })?;
        out.copy_from_slice(&all);
        Ok(())
    }

    fn all_to_all(
        &mut self,
        group: &Group,
        send: &[f32],
        counts: &[usize],
    ) -> Result<(Vec<f32>, Vec<usize>), CommError> {
        let n = group.ranks.len();
        sizes::all_to_all(group, send.len(), counts).map_err(|m| self.usage(m))?;
        // Splits may differ per rank: only the group size must agree.
        let sig = format!("{n} members");
        self.collective(group, "all_to_all", sig, (send.to_vec(), counts.to_vec()), |ins| {
            (0..n)
                .map(|j| {
                    let mut data = Vec::new();
                    let mut got = Vec::with_capacity(n);
                    for (buf, cnt) in ins {
                        let start: usize = cnt[..j].iter().sum();
                        data.extend_from_slice(&buf[start..start + cnt[j]]);
                        got.push(cnt[j]);
                    }
                    (data, got)
                })
                .collect()
        })
    }

    fn broadcast(&mut self, group: &Group, root: usize, buf: &mut [f32]) -> Result<(), CommError> {
        let n = group.ranks.len();
        sizes::broadcast(group, root).map_err(|m| self.usage(m))?;
        let sig = format!("{} f32 values from member {root}", buf.len());
        let (out, _) = self.collective(group, "broadcast", sig, (buf.to_vec(), vec![]), |ins| {
            vec![(ins[root].0.clone(), vec![]); n]
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn send(&mut self, to: usize, tag: u64, data: &[f32]) -> Result<(), CommError> {
        let mut st = self.lock();
        if let Some(e) = self.aborted(&st) {
            return Err(e);
        }
        if to >= self.hub.size {
            drop(st);
            return Err(self.usage(format!("send to rank {to} of {}", self.hub.size)));
        }
        st.mail.entry((self.channel, self.rank, to, tag)).or_default().push_back(data.to_vec());
        drop(st);
        self.hub.changed.notify_all();
        Ok(())
    }

    fn recv(&mut self, from: usize, tag: u64, out: &mut [f32]) -> Result<(), CommError> {
        let deadline = Instant::now() + self.hub.timeout;
        let mut st = self.lock();
        loop {
            if let Some(e) = self.aborted(&st) {
                return Err(e);
            }
            if let Some(msg) = st.mail.get_mut(&(self.channel, from, self.rank, tag)).and_then(VecDeque::pop_front) {
                if msg.len() != out.len() {
                    let e = super::recv_mismatch(self.rank, self.step, from, tag, out.len(), msg.len());
                    return Err(self.fail(st, e));
                }
                out.copy_from_slice(&msg);
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let e = CommError::Timeout {
                    rank: self.rank,
                    op: "recv",
                    group: format!("pair ({from} → {}), tag {tag}", self.rank),
                    step: self.step,
                    waited_ms: self.hub.timeout.as_millis() as u64,
                    missing: vec![from],
                };
                return Err(self.fail(st, e));
            }
            st = self.hub.changed.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn barrier(&mut self, group: &Group) -> Result<(), CommError> {
        let n = group.ranks.len();
        self.collective(group, "barrier", String::new(), (vec![], vec![]), |_| vec![(vec![], vec![]); n]).map(|_| ())
    }

    fn synchronize(&mut self) -> Result<(), CommError> {
        let st = self.lock();
        self.aborted(&st).map_or(Ok(()), Err)
    }

    fn abort(&mut self, message: &str) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some((self.rank, self.step, message.to_string()));
        }
        drop(st);
        self.hub.changed.notify_all();
    }
}
