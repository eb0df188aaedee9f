//! The TCP communicator: ranks as processes that torchrun, `tessera
//! launch` or `srun` start, on one machine or many, with no MPI. The ranks
//! meet at rank 0's store (`launch::rendezvous`), publish a listening
//! address each, and connect every pair once. The role Gloo plays for
//! PyTorch's CPU ranks.
//!
//! Each connection has a reader thread that files incoming messages by
//! (sender, collective or tag) in this rank's inbox, so a send never waits
//! for its receiver. Collectives are star-shaped within their group: the
//! reductions are summed at the group's first member in group order, the
//! order of the in-process communicator, so a run over TCP gives the bits of
//! the same run on threads. That costs the first member n − 1 receives per
//! reduction: fine for CPU ranks, not an algorithm for GPU-sized buffers
//! (which NCCL's rings and trees are for).
//!
//! Failures: a wait longer than the timeout names the rank it waited for; a
//! rank whose connection closes (it exited or was killed) is named at once
//! by every rank that waits for it; a rank that fails sends its message to
//! every other, whose calls then fail with it.

use super::{CommError, Communicator, Group, ReduceOp, sizes};
use crate::launch::{Placement, Store, rendezvous};
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a message is for: a collective's (group, sequence number in that
/// group), or a point-to-point tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// `group` names the ranks and the channel ([`group_key`]).
    Collective {
        group: u64,
        seq: u64,
    },
    Tag {
        tag: u64,
        channel: u64,
    },
}

const DATA_COLLECTIVE: u8 = 1;
const DATA_TAG: u8 = 2;
const ABORT: u8 = 3;
const BYE: u8 = 4;

/// Messages that arrived, and what happened to the peers.
#[derive(Default)]
struct Mail {
    queued: HashMap<(usize, Key), VecDeque<Vec<f32>>>,
    /// Peers whose connection ended, and why (`bye`: they finished).
    gone: HashMap<usize, Gone>,
    /// The first failure any rank reported: (rank, step, message).
    aborted: Option<(usize, u64, String)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Gone {
    Finished,
    Lost(String),
}

struct Inbox {
    mail: Mutex<Mail>,
    changed: Condvar,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Mail> {
        self.mail.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// This process's rank in a world connected over TCP.
pub struct Tcp {
    rank: usize,
    size: usize,
    step: u64,
    timeout: Duration,
    /// Writers to every other rank (`None` at this rank's own index),
    /// shared by both channels: a frame is written whole under its lock.
    peers: Arc<Vec<Option<Mutex<BufWriter<TcpStream>>>>>,
    inbox: Arc<Inbox>,
    /// Collectives issued so far per group.
    seq: HashMap<Vec<usize>, u64>,
    /// Kept open for the run: rank 0 hosts it, and closing it is the goodbye
    /// (the compute channel's; the communication stream's has none).
    store: Option<Store>,
    /// 0: the compute stream's calls; 1: the communication stream's.
    channel: u8,
    failed: bool,
    /// The call under way (op, group), for messages.
    doing: (&'static str, String),
}

/// A group's stable name on the wire, on one channel (FNV-1a over its
/// ranks and the channel).
fn group_key(ranks: &[usize], channel: u8) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &r in ranks {
        for b in (r as u64).to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h ^= channel as u64;
    h.wrapping_mul(0x100000001b3)
}

fn io_err(rank: usize, what: &str, e: impl std::fmt::Display) -> CommError {
    CommError::Usage { rank, message: format!("{what}: {e}") }
}

impl Tcp {
    /// Meet the other ranks of `p`'s world at its store and connect to every
    /// one of them; every wait is bounded by `timeout`.
    pub fn connect(p: &Placement, timeout: Duration) -> Result<Tcp, CommError> {
        let rank = p.rank;
        let mut store = rendezvous(p, timeout).map_err(|e| io_err(rank, "the ranks could not meet", e))?;
        let listener = TcpListener::bind(("0.0.0.0", 0)).map_err(|e| io_err(rank, "cannot listen for the ranks", e))?;
        let port = listener.local_addr().map_err(|e| io_err(rank, "cannot listen for the ranks", e))?.port();
        // Where the others reach this rank: rank 0 at the store's address;
        // the others at the address they reach the store from.
        let host = match rank {
            0 => p.master_addr.clone().unwrap_or_else(|| "127.0.0.1".into()),
            _ => store.local_ip().map_err(|e| io_err(rank, "cannot tell this rank's address", e))?,
        };
        let fail = |store: Store, e: CommError| {
            store.abort(&e.to_string());
            e
        };
        if let Err(e) = store.set(&format!("tcp/{rank}"), format!("{host}:{port}").as_bytes()) {
            return Err(fail(store, io_err(rank, "cannot publish this rank's address", e)));
        }
        let mut streams: Vec<Option<TcpStream>> = (0..p.world).map(|_| None).collect();
        // Connect to every lower rank, and accept every higher one.
        for (j, slot) in streams.iter_mut().enumerate().take(rank) {
            let addr = match store.get(&format!("tcp/{j}")) {
                Ok(a) => String::from_utf8_lossy(&a).into_owned(),
                Err(e) => return Err(fail(store, io_err(rank, &format!("rank {j} published no address"), e))),
            };
            match connect_to(&addr, rank, timeout) {
                Ok(s) => *slot = Some(s),
                Err(e) => return Err(fail(store, io_err(rank, &format!("cannot connect to rank {j} at {addr}"), e))),
            }
        }
        if let Err(e) = accept_from(&listener, rank, &mut streams, timeout) {
            return Err(fail(store, e));
        }
        let inbox = Arc::new(Inbox { mail: Mutex::new(Mail::default()), changed: Condvar::new() });
        let mut peers = Vec::with_capacity(p.world);
        for (j, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                peers.push(None);
                continue;
            };
            let _ = s.set_nodelay(true);
            let read = match s.try_clone() {
                Ok(r) => r,
                Err(e) => return Err(fail(store, io_err(rank, "cannot read from a rank", e))),
            };
            let inbox = inbox.clone();
            std::thread::Builder::new()
                .name(format!("tcp-rank-{j}"))
                .spawn(move || read_from(j, read, &inbox))
                .map_err(|e| io_err(rank, "cannot start a reader thread", e))?;
            peers.push(Some(Mutex::new(BufWriter::new(s))));
        }
        // Every rank holds every connection before anyone sends.
        if let Err(e) = store.barrier("tcp-connected") {
            return Err(fail(store, io_err(rank, "the ranks could not all connect", e)));
        }
        Ok(Tcp {
            rank,
            size: p.world,
            step: 0,
            timeout,
            peers: Arc::new(peers),
            inbox,
            seq: HashMap::new(),
            store: Some(store),
            channel: 0,
            failed: false,
            doing: ("connect", "world".into()),
        })
    }

    fn write(&self, to: usize, kind: u8, a: u64, b: u64, payload: &[u8]) -> Result<(), CommError> {
        let rank = self.rank;
        let Some(w) = self.peers.get(to).and_then(Option::as_ref) else {
            return Err(CommError::Usage { rank, message: format!("no connection to rank {to}") });
        };
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        let mut head = [0u8; 25];
        head[0] = kind;
        head[1..9].copy_from_slice(&a.to_le_bytes());
        head[9..17].copy_from_slice(&b.to_le_bytes());
        head[17..25].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let sent = w.write_all(&head).and_then(|_| w.write_all(payload)).and_then(|_| w.flush());
        sent.map_err(|e| {
            let (op, what) = &self.doing;
            self.lost(op, what, to, &Gone::Lost(closed(&e)))
        })
    }

    /// The error of a call on `what` whose peer `from` went away: the same
    /// words whether this rank noticed it sending or receiving.
    fn lost(&self, op: &str, what: &str, from: usize, gone: &Gone) -> CommError {
        let why = match gone {
            Gone::Finished => "has finished".to_string(),
            Gone::Lost(why) => format!("is gone ({why}): it exited or was killed"),
        };
        CommError::Usage {
            rank: self.rank,
            message: format!("`{op}` on the {what} at step {}: rank {from} {why}", self.step),
        }
    }

    fn send_to(&mut self, to: usize, key: Key, data: &[f32]) -> Result<(), CommError> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let (kind, a, b) = match key {
            Key::Collective { group, seq } => (DATA_COLLECTIVE, group, seq),
            Key::Tag { tag, channel } => (DATA_TAG, tag, channel),
        };
        self.write(to, kind, a, b, &bytes)
    }

    /// The next message from `from` under `key`, waiting at most the timeout.
    fn take(&mut self, from: usize, key: Key, op: &'static str, what: &str) -> Result<Vec<f32>, CommError> {
        let deadline = Instant::now() + self.timeout;
        let mut mail = self.inbox.lock();
        loop {
            if let Some((failed, step, message)) = &mail.aborted {
                return Err(CommError::Aborted {
                    rank: self.rank,
                    failed: *failed,
                    step: *step,
                    message: message.clone(),
                });
            }
            if let Some(m) = mail.queued.get_mut(&(from, key)).and_then(VecDeque::pop_front) {
                return Ok(m);
            }
            if let Some(gone) = mail.gone.get(&from) {
                let e = self.lost(op, what, from, gone);
                drop(mail);
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op,
                    group: what.to_string(),
                    step: self.step,
                    waited_ms: self.timeout.as_millis() as u64,
                    missing: vec![from],
                });
            }
            mail = self.inbox.changed.wait_timeout(mail, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The key of this rank's next collective on `group`, and its index there.
    fn next(&mut self, group: &Group, op: &'static str) -> Result<(Key, usize), CommError> {
        self.doing = (op, group.to_string());
        let me = group.index_of(self.rank).ok_or_else(|| CommError::Usage {
            rank: self.rank,
            message: format!("`{op}` on the {group}, which does not contain this rank"),
        })?;
        let s = self.seq.entry(group.ranks.clone()).or_insert(0);
        *s += 1;
        Ok((Key::Collective { group: group_key(&group.ranks, self.channel), seq: *s }, me))
    }

    fn usage(&self, message: String) -> CommError {
        CommError::Usage { rank: self.rank, message }
    }

    /// Every member's part, in group order, at the member that gathers.
    fn gather(&mut self, group: &Group, key: Key, mine: &[f32], op: &'static str) -> Result<Vec<Vec<f32>>, CommError> {
        let what = group.to_string();
        group
            .ranks
            .iter()
            .map(|&r| if r == self.rank { Ok(mine.to_vec()) } else { self.take(r, key, op, &what) })
            .collect()
    }
}

/// The in-process communicator's reduction: `parts[0]`, then each next part in order.
fn reduce_in_order(parts: &[Vec<f32>], op: ReduceOp) -> Vec<f32> {
    let mut acc = parts[0].clone();
    for x in &parts[1..] {
        for (a, v) in acc.iter_mut().zip(x) {
            *a = match op {
                ReduceOp::Sum | ReduceOp::Mean => *a + *v,
                ReduceOp::Max => a.max(*v),
                ReduceOp::Min => a.min(*v),
            };
        }
    }
    if op == ReduceOp::Mean {
        let n = parts.len() as f32;
        acc.iter_mut().for_each(|v| *v /= n);
    }
    acc
}

impl Communicator for Tcp {
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
        Ok(Box::new(Tcp {
            rank: self.rank,
            size: self.size,
            step: self.step,
            timeout: self.timeout,
            peers: self.peers.clone(),
            inbox: self.inbox.clone(),
            seq: HashMap::new(),
            store: None,
            channel: 1,
            failed: false,
            doing: ("connect", "world".into()),
        }))
    }

    fn all_reduce(&mut self, group: &Group, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let (key, me) = self.next(group, "all_reduce")?;
        let root = group.ranks[0];
        if me == 0 {
            let parts = self.gather(group, key, buf, "all_reduce")?;
            if let Some(p) = parts.iter().find(|p| p.len() != buf.len()) {
                return Err(self.usage(format!(
                    "all_reduce on the {group}: {} values here, {} from another member",
                    buf.len(),
                    p.len()
                )));
            }
            let out = reduce_in_order(&parts, op);
            for &r in &group.ranks[1..] {
                self.send_to(r, key, &out)?;
            }
            buf.copy_from_slice(&out);
        } else {
            self.send_to(root, key, buf)?;
            let out = self.take(root, key, "all_reduce", &group.to_string())?;
            if out.len() != buf.len() {
                return Err(self.usage(format!(
                    "all_reduce on the {group}: sent {} values, got {}",
                    buf.len(),
                    out.len()
                )));
            }
            buf.copy_from_slice(&out);
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, group: &Group, input: &[f32], out: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        sizes::reduce_scatter(group, input.len(), out.len()).map_err(|m| self.usage(m))?;
        let (key, me) = self.next(group, "reduce_scatter")?;
        let chunk = out.len();
        for (j, &r) in group.ranks.iter().enumerate() {
            if r != self.rank {
                self.send_to(r, key, &input[j * chunk..(j + 1) * chunk])?;
            }
        }
        let parts = self.gather(group, key, &input[me * chunk..(me + 1) * chunk], "reduce_scatter")?;
        if parts.iter().any(|p| p.len() != chunk) {
            return Err(self.usage(format!("reduce_scatter on the {group}: members sent chunks of other sizes")));
        }
        out.copy_from_slice(&reduce_in_order(&parts, op));
        Ok(())
    }

    fn all_gather(&mut self, group: &Group, input: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        sizes::all_gather(group, input.len(), out.len()).map_err(|m| self.usage(m))?;
        let (key, _) = self.next(group, "all_gather")?;
        for &r in &group.ranks {
            if r != self.rank {
                self.send_to(r, key, input)?;
            }
        }
        let parts = self.gather(group, key, input, "all_gather")?;
        if parts.iter().any(|p| p.len() != input.len()) {
            return Err(self.usage(format!("all_gather on the {group}: members sent parts of other sizes")));
        }
        for (dst, p) in out.chunks_mut(input.len().max(1)).zip(&parts) {
            dst.copy_from_slice(p);
        }
        Ok(())
    }

    fn all_to_all(
        &mut self,
        group: &Group,
        send: &[f32],
        counts: &[usize],
    ) -> Result<(Vec<f32>, Vec<usize>), CommError> {
        sizes::all_to_all(group, send.len(), counts).map_err(|m| self.usage(m))?;
        let (key, me) = self.next(group, "all_to_all")?;
        let mut at = 0;
        let mut mine = Vec::new();
        for (j, &r) in group.ranks.iter().enumerate() {
            let part = &send[at..at + counts[j]];
            at += counts[j];
            if j == me {
                mine = part.to_vec();
            } else {
                self.send_to(r, key, part)?;
            }
        }
        let parts = self.gather(group, key, &mine, "all_to_all")?;
        let got = parts.iter().map(Vec::len).collect();
        Ok((parts.concat(), got))
    }

    fn broadcast(&mut self, group: &Group, root: usize, buf: &mut [f32]) -> Result<(), CommError> {
        sizes::broadcast(group, root).map_err(|m| self.usage(m))?;
        let (key, me) = self.next(group, "broadcast")?;
        if me == root {
            for &r in &group.ranks {
                if r != self.rank {
                    self.send_to(r, key, buf)?;
                }
            }
        } else {
            let data = self.take(group.ranks[root], key, "broadcast", &group.to_string())?;
            if data.len() != buf.len() {
                return Err(self.usage(format!(
                    "broadcast on the {group}: expected {} values, got {}",
                    buf.len(),
                    data.len()
                )));
            }
            buf.copy_from_slice(&data);
        }
        Ok(())
    }

    fn send(&mut self, to: usize, tag: u64, data: &[f32]) -> Result<(), CommError> {
        if to >= self.size || to == self.rank {
            return Err(self.usage(format!("send to rank {to} from rank {} of {}", self.rank, self.size)));
        }
        self.doing = ("send", format!("pair ({} → {to}), tag {tag}", self.rank));
        self.send_to(to, Key::Tag { tag, channel: self.channel as u64 }, data)
    }

    fn recv(&mut self, from: usize, tag: u64, out: &mut [f32]) -> Result<(), CommError> {
        if from >= self.size || from == self.rank {
            return Err(self.usage(format!("receive from rank {from} at rank {} of {}", self.rank, self.size)));
        }
        let what = format!("pair ({from} → {}), tag {tag}", self.rank);
        let data = self.take(from, Key::Tag { tag, channel: self.channel as u64 }, "recv", &what)?;
        if data.len() != out.len() {
            return Err(super::recv_mismatch(self.rank, self.step, from, tag, out.len(), data.len()));
        }
        out.copy_from_slice(&data);
        Ok(())
    }

    fn barrier(&mut self, group: &Group) -> Result<(), CommError> {
        self.all_gather(group, &[], &mut [])
    }

    fn synchronize(&mut self) -> Result<(), CommError> {
        match &self.inbox.lock().aborted {
            Some((failed, step, message)) => {
                Err(CommError::Aborted { rank: self.rank, failed: *failed, step: *step, message: message.clone() })
            }
            None => Ok(()),
        }
    }

    fn abort(&mut self, message: &str) {
        if self.failed {
            return;
        }
        self.failed = true;
        {
            let mut mail = self.inbox.lock();
            if mail.aborted.is_none() {
                mail.aborted = Some((self.rank, self.step, message.to_string()));
            }
        }
        // The other channel's call, if one is waiting, fails now.
        self.inbox.changed.notify_all();
        for to in 0..self.size {
            if to != self.rank {
                let _ = self.write(to, ABORT, self.rank as u64, self.step, message.as_bytes());
            }
        }
        if let Some(store) = self.store.take() {
            store.abort(message);
        }
    }
}

impl Drop for Tcp {
    fn drop(&mut self) {
        // A rank that panicked has not finished: the others stop with its failure.
        if std::thread::panicking() {
            self.abort("panicked (its message is in its own output)");
            return;
        }
        // The communication stream's channel leaves the goodbye to the compute's.
        if self.failed || self.channel != 0 {
            return;
        }
        // Goodbye to every peer (their reader threads see it before the
        // connection closes), then to the store; rank 0 keeps it up until
        // every rank has said goodbye.
        for to in 0..self.size {
            if to != self.rank {
                let _ = self.write(to, BYE, 0, 0, &[]);
            }
        }
        if let Some(store) = self.store.take() {
            let _ = store.close();
        }
        for w in self.peers.iter().flatten() {
            let _ = w.lock().unwrap_or_else(|e| e.into_inner()).get_ref().shutdown(Shutdown::Write);
        }
    }
}

/// Connect to `addr` (retrying while the rank there starts listening), and say who this is.
fn connect_to(addr: &str, rank: usize, timeout: Duration) -> Result<TcpStream, String> {
    use std::net::ToSocketAddrs;
    let t0 = Instant::now();
    loop {
        let tried = addr.to_socket_addrs().map_err(|e| e.to_string()).and_then(|mut a| {
            let a = a.next().ok_or_else(|| format!("`{addr}` resolves to no address"))?;
            TcpStream::connect_timeout(&a, Duration::from_secs(5)).map_err(|e| e.to_string())
        });
        match tried {
            Ok(mut s) => {
                s.write_all(&(rank as u64).to_le_bytes()).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if t0.elapsed() >= timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Accept a connection from every rank above `rank`; each says which it is.
fn accept_from(
    listener: &TcpListener,
    rank: usize,
    streams: &mut [Option<TcpStream>],
    timeout: Duration,
) -> Result<(), CommError> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(|e| io_err(rank, "cannot listen for the ranks", e))?;
    while streams.iter().enumerate().any(|(j, s)| j > rank && s.is_none()) {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).map_err(|e| io_err(rank, "cannot accept a rank", e))?;
                let _ = s.set_read_timeout(Some(timeout));
                let mut who = [0u8; 8];
                s.read_exact(&mut who).map_err(|e| io_err(rank, "a rank connected but did not say who it is", e))?;
                let _ = s.set_read_timeout(None);
                let j = u64::from_le_bytes(who) as usize;
                match streams.get_mut(j) {
                    Some(slot @ None) if j > rank => *slot = Some(s),
                    _ => return Err(io_err(rank, "a connection", format!("rank {j} is not one this rank accepts"))),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (rank + 1..streams.len()).filter(|&j| streams[j].is_none()).collect();
                    return Err(io_err(rank, "connecting the ranks", format!("ranks {missing:?} never connected")));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err(rank, "cannot accept a rank", e)),
        }
    }
    Ok(())
}

/// Why a connection failed, in words: a peer that exited shows as a closed
/// connection whichever way the bytes were going.
fn closed(e: &std::io::Error) -> String {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e.kind() {
        UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted => "the connection closed".to_string(),
        _ => e.to_string(),
    }
}

/// A reader thread: file each message from rank `from` in the inbox until
/// the connection ends.
fn read_from(from: usize, stream: TcpStream, inbox: &Inbox) {
    let mut r = BufReader::new(stream);
    let why = loop {
        let mut head = [0u8; 25];
        if let Err(e) = r.read_exact(&mut head) {
            break closed(&e);
        }
        let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or([0; 8]));
        let (kind, a, b, len) = (head[0], word(1), word(9), word(17) as usize);
        let mut payload = vec![0u8; len];
        if let Err(e) = r.read_exact(&mut payload) {
            break closed(&e);
        }
        let mut mail = inbox.lock();
        match kind {
            DATA_COLLECTIVE | DATA_TAG => {
                let key = match kind {
                    DATA_TAG => Key::Tag { tag: a, channel: b },
                    _ => Key::Collective { group: a, seq: b },
                };
                let data = payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                mail.queued.entry((from, key)).or_default().push_back(data);
            }
            ABORT => {
                if mail.aborted.is_none() {
                    mail.aborted = Some((a as usize, b, String::from_utf8_lossy(&payload).into_owned()));
                }
            }
            BYE => {
                mail.gone.insert(from, Gone::Finished);
                drop(mail);
                inbox.changed.notify_all();
                return;
            }
            other => {
                mail.gone.insert(from, Gone::Lost(format!("it sent a message of unknown kind {other}")));
                drop(mail);
                inbox.changed.notify_all();
                return;
            }
        }
        drop(mail);
        inbox.changed.notify_all();
    };
    let mut mail = inbox.lock();
    mail.gone.entry(from).or_insert(Gone::Lost(why));
    drop(mail);
    inbox.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_follow_the_in_process_order() {
        let parts = vec![vec![1.0f32, 1e8], vec![1e-8, -1e8], vec![2.0, 3.0]];
        assert_eq!(reduce_in_order(&parts, ReduceOp::Sum), vec![(1.0f32 + 1e-8) + 2.0, (1e8f32 + -1e8) + 3.0]);
        assert_eq!(reduce_in_order(&parts, ReduceOp::Max), vec![2.0, 1e8]);
        assert_eq!(reduce_in_order(&parts, ReduceOp::Mean)[1], 1.0);
    }

    /// Two ranks of one world, connected over the loopback.
    fn pair() -> (Tcp, Tcp) {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
        let at = move |rank| Placement {
            rank,
            world: 2,
            local_rank: rank,
            local_world: 2,
            node: None,
            master_addr: Some("127.0.0.1".into()),
            master_port: port,
            source: crate::launch::Source::Torchrun,
            round: 0,
        };
        let t = Duration::from_secs(20);
        let one = std::thread::spawn(move || Tcp::connect(&at(1), t).unwrap());
        let zero = Tcp::connect(&at(0), t).unwrap();
        (zero, one.join().unwrap())
    }

    #[test]
    fn a_peer_lost_while_sending_is_named_as_while_receiving() {
        let (mut zero, mut one) = pair();
        zero.set_step(3);
        // Rank 1 goes without a goodbye, as a killed process does.
        one.failed = true;
        for w in one.peers.iter().flatten() {
            w.lock().unwrap().get_ref().shutdown(std::net::Shutdown::Both).unwrap();
        }
        drop(one);
        // The kernel takes the first writes; a later one meets the reset.
        let err = (0..200)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(10));
                zero.send(1, 7, &[1.0; 1024]).err()
            })
            .expect("a send to a closed peer fails");
        assert_eq!(
            err.to_string(),
            "rank 0: `send` on the pair (0 → 1), tag 7 at step 3: rank 1 is gone (the connection closed): it exited or was killed"
        );
        let mut buf = [0.0f32; 4];
        let err = zero.recv(1, 7, &mut buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rank 0: `recv` on the pair (1 → 0), tag 7 at step 3: rank 1 is gone (the connection closed): it exited or was killed"
        );
        zero.failed = true;
    }

    /// A rank whose thread panics holding its communicator is a failure
    /// to the others, not a rank that finished.
    #[test]
    fn a_panicking_rank_is_a_failure_not_a_goodbye() {
        let (mut zero, mut one) = pair();
        one.set_step(4);
        let panicked = std::thread::spawn(move || {
            let _held = one;
            panic!("a bug in rank 1");
        })
        .join();
        assert!(panicked.is_err());
        let mut buf = [0.0f32; 4];
        let err = zero.all_reduce(&Group::new("data", vec![0, 1]), &mut buf, ReduceOp::Sum).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rank 0 stopped: rank 1 failed at step 4: panicked (its message is in its own output)"
        );
        zero.failed = true;
    }

    #[test]
    fn group_keys_differ() {
        assert_ne!(group_key(&[0, 1], 0), group_key(&[1, 0], 0));
        assert_ne!(group_key(&[0, 2], 0), group_key(&[0, 1], 0));
        assert_ne!(group_key(&[0, 1], 0), group_key(&[0, 1], 1));
    }
}
