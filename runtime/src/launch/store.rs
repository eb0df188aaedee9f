//! The TCP store the ranks of a multi-process run meet at, as torch's
//! `TCPStore`: rank 0 hosts it at `MASTER_ADDR:MASTER_PORT`, every rank
//! (rank 0 too) connects, says which rank it is, and then sets, gets and
//! adds keys and waits at barriers. It carries what a transport needs before
//! it exists (NCCL's unique id) and nothing per step.
//!
//! The store also watches the ranks: a rank whose connection closes before
//! it said goodbye has died (exited, crashed or been killed), and every call
//! of every other rank, waiting or new, fails naming it. A wait that lasts
//! longer than the timeout fails naming the ranks or key it waited for; a
//! store whose host (rank 0) dies fails every call saying so. Nothing waits
//! forever.
//!
//! The wire format is private to this file: a request is an op byte, a key,
//! a value and two numbers; a reply is a status byte, a payload and a number.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Keys and values larger than these are refused (a stray client, e.g. an
/// HTTP probe of the port, is cut off rather than allocated for).
const MAX_KEY: usize = 4 << 10;
const MAX_VALUE: usize = 64 << 20;
/// How long a new connection has to say which rank it is.
const HELLO_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "rank {rank}: cannot reach the store at {addr} after {waited_s} s ({why}); rank 0 hosts it: check that rank 0 \
         has started and that MASTER_ADDR and MASTER_PORT name its machine and port"
    )]
    Unreachable { rank: usize, addr: String, waited_s: u64, why: String },
    #[error(
        "rank 0: cannot host the store on port {port}: {why}; pick a free port (MASTER_PORT, or `tessera launch \
         --master-port`)"
    )]
    Host { port: u16, why: String },
    #[error("rank {rank}: `{op}` of the {world} ranks timed out after {waited_ms} ms waiting for {waiting}")]
    Timeout { rank: usize, op: String, world: usize, waited_ms: u64, waiting: String },
    #[error("rank {rank} stopped in `{op}`: rank {lost} ({who}) {reason}")]
    Lost { rank: usize, op: String, lost: usize, who: String, reason: String },
    #[error(
        "rank {rank}: the store at {addr}, which rank 0 hosts, closed the connection during `{op}`: rank 0 has exited \
         or was killed"
    )]
    HostGone { rank: usize, addr: String, op: String },
    #[error("rank {rank}: the store refused `{op}`: {message}")]
    Refused { rank: usize, op: String, message: String },
    /// The placement names no store to meet at.
    #[error("{0}")]
    Setup(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Hello = 1,
    Set = 2,
    Get = 3,
    Add = 4,
    Wait = 5,
    Bye = 6,
    Abort = 7,
}

impl Op {
    fn from(b: u8) -> Option<Op> {
        [Op::Hello, Op::Set, Op::Get, Op::Add, Op::Wait, Op::Bye, Op::Abort].into_iter().find(|o| *o as u8 == b)
    }
}

const OK: u8 = 0;
const TIMED_OUT: u8 = 1;
const LOST: u8 = 2;
const REFUSED: u8 = 3;

struct Request {
    op: Op,
    key: String,
    value: Vec<u8>,
    a: i64,
    b: u64,
}

struct Reply {
    status: u8,
    payload: Vec<u8>,
    n: i64,
}

fn write_bytes(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    w.write_all(&(b.len() as u32).to_le_bytes())?;
    w.write_all(b)
}

fn read_bytes(r: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{len} bytes is over {max}")));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

impl Request {
    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&[self.op as u8])?;
        write_bytes(w, self.key.as_bytes())?;
        write_bytes(w, &self.value)?;
        w.write_all(&self.a.to_le_bytes())?;
        w.write_all(&self.b.to_le_bytes())?;
        w.flush()
    }

    fn read(r: &mut impl Read) -> std::io::Result<Request> {
        let mut op = [0u8; 1];
        r.read_exact(&mut op)?;
        let op = Op::from(op[0]).ok_or_else(|| invalid("not a store request"))?;
        let key = String::from_utf8(read_bytes(r, MAX_KEY)?).map_err(|_| invalid("a key that is not UTF-8"))?;
        let value = read_bytes(r, MAX_VALUE)?;
        let a = read_u64(r)? as i64;
        let b = read_u64(r)?;
        Ok(Request { op, key, value, a, b })
    }
}

impl Reply {
    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&[self.status])?;
        write_bytes(w, &self.payload)?;
        w.write_all(&self.n.to_le_bytes())?;
        w.flush()
    }

    fn read(r: &mut impl Read) -> std::io::Result<Reply> {
        let mut status = [0u8; 1];
        r.read_exact(&mut status)?;
        let payload = read_bytes(r, MAX_VALUE)?;
        let n = read_u64(r)? as i64;
        Ok(Reply { status: status[0], payload, n })
    }

    fn ok(payload: Vec<u8>, n: i64) -> Reply {
        Reply { status: OK, payload, n }
    }

    fn refused(message: String) -> Reply {
        Reply { status: REFUSED, payload: message.into_bytes(), n: 0 }
    }
}

/// What the store holds and knows of the ranks.
#[derive(Default)]
struct State {
    keys: HashMap<String, Vec<u8>>,
    /// Each rank that said hello, with who it is (`pid N on HOST`).
    joined: BTreeMap<usize, String>,
    /// Ranks that said goodbye.
    left: BTreeSet<usize>,
    /// Ranks whose connection is open.
    open: BTreeSet<usize>,
    /// The first rank whose connection closed without a goodbye, and how.
    lost: Option<(usize, String)>,
}

struct Hub {
    world: usize,
    /// The attempt of the job this store serves (torchelastic's restart
    /// count): ranks of another attempt are turned away.
    round: u64,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// Every open connection by number, to cut them when the server stops.
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait (at most until `deadline`) until `done` holds; `Err` with the
    /// lost rank's reply if a rank is lost first, `Ok(false)` on timeout.
    /// `waiter`, the connection waited for, is watched meanwhile: its rank
    /// is lost if it closes (a rank killed while it waits says nothing).
    fn wait_until(
        &self,
        deadline: Instant,
        waiter: Option<(usize, &TcpStream)>,
        mut done: impl FnMut(&State) -> bool,
    ) -> Result<bool, Reply> {
        let mut st = self.lock();
        loop {
            if let Some((rank, conn)) = waiter
                && let Some(how) = closed(conn)
            {
                st.lost.get_or_insert((rank, how));
                self.changed.notify_all();
            }
            // A wait already satisfied succeeds even after a loss (the lost
            // rank had done its part); the next call reports the loss.
            if done(&st) {
                return Ok(true);
            }
            if let Some(lost) = lost_reply(&st) {
                return Err(lost);
            }
            let now = Instant::now();
            if now >= deadline || self.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let nap = if waiter.is_some() { WATCH.min(deadline - now) } else { deadline - now };
            st = self.changed.wait_timeout(st, nap).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Wait (at most until `deadline`) until no rank but the host holds a
    /// connection: every other rank has gone, after its last reply.
    fn wait_for_others_to_go(&self, deadline: Instant) {
        let mut st = self.lock();
        while st.open.iter().any(|&r| r != 0) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Record that `rank`'s connection ended without a goodbye.
    fn lose(&self, rank: usize, how: String) {
        let mut st = self.lock();
        if !st.left.contains(&rank) && !self.stop.load(Ordering::Relaxed) {
            st.lost.get_or_insert((rank, how));
        }
        drop(st);
        self.changed.notify_all();
    }
}

/// How often a waiting connection is checked for having closed.
const WATCH: Duration = Duration::from_millis(100);

/// Whether `conn` has closed (its process died): how, or `None` while open.
/// A waiting rank sends nothing, so a readable byte count of 0 is the end.
fn closed(conn: &TcpStream) -> Option<String> {
    if conn.set_nonblocking(true).is_err() {
        return None;
    }
    let mut b = [0u8; 1];
    let r = conn.peek(&mut b);
    let _ = conn.set_nonblocking(false);
    match r {
        Ok(0) => Some(GONE.to_string()),
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::Interrupted => {
            Some(format!("is gone: its connection to the store broke: {e}"))
        }
        _ => None,
    }
}

/// Why a rank is lost when its connection closes without a goodbye.
const GONE: &str = "is gone: its connection to the store closed before it finished: it exited or was killed";

fn lost_reply(st: &State) -> Option<Reply> {
    st.lost.as_ref().map(|(rank, reason)| {
        let who = st.joined.get(rank).cloned().unwrap_or_default();
        Reply { status: LOST, payload: format!("{who}\n{reason}").into_bytes(), n: *rank as i64 }
    })
}

/// Rank 0's side: the listening socket and a thread per connection.
struct Server {
    hub: Arc<Hub>,
    port: u16,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    fn start(port: u16, world: usize, round: u64) -> Result<Server, StoreError> {
        let listener =
            TcpListener::bind(("0.0.0.0", port)).map_err(|e| StoreError::Host { port, why: e.to_string() })?;
        let port = listener.local_addr().map_err(|e| StoreError::Host { port, why: e.to_string() })?.port();
        let hub = Arc::new(Hub {
            world,
            round,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let h = hub.clone();
        let accept = std::thread::Builder::new()
            .name("tessera-store".into())
            .spawn(move || {
                for (n, conn) in listener.incoming().enumerate() {
                    if h.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let Ok(c) = conn.try_clone() else { continue };
                    h.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(n as u64, c);
                    let h = h.clone();
                    let _ = std::thread::Builder::new().name("tessera-store-conn".into()).spawn(move || {
                        serve(&h, conn);
                        if let Some(c) = h.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&(n as u64)) {
                            let _ = c.shutdown(Shutdown::Both);
                        }
                    });
                }
            })
            .map_err(|e| StoreError::Host { port, why: format!("cannot start its thread: {e}") })?;
        Ok(Server { hub, port, accept: Some(accept) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.hub.stop.store(true, Ordering::Relaxed);
        self.hub.changed.notify_all();
        // Wake the accept loop, then cut every connection: their ranks see
        // that the host is gone.
        let _ = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], self.port)), Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, c) in self.hub.conns.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// How a refusal for another attempt of the job begins: the joining rank
/// waits for the store of its own attempt instead of failing.
const OTHER_ROUND: &str = "another attempt: ";

/// One connection: a hello, then requests until goodbye or until it closes.
fn serve(hub: &Hub, conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(HELLO_WITHIN));
    let Ok(read) = conn.try_clone() else { return };
    let mut r = BufReader::new(read);
    let mut w = BufWriter::new(conn);
    let rank = match Request::read(&mut r) {
        Ok(Request { op: Op::Hello, key, a, b, value }) => {
            let (rank, world) = (a as usize, b as usize);
            let round = value.get(..8).map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap_or([0; 8])));
            let mut st = hub.lock();
            let refuse = if round != hub.round {
                Some(format!(
                    "{OTHER_ROUND}rank {rank} is of attempt {round} of the job, this store of attempt {}",
                    hub.round
                ))
            } else if world != hub.world {
                Some(format!(
                    "rank {rank} was started for a world of {world} ranks, rank 0 for {}: every rank needs the same \
                     WORLD_SIZE",
                    hub.world
                ))
            } else if rank >= hub.world {
                Some(format!("rank {rank} is not below the world size {}", hub.world))
            } else {
                st.joined.get(&rank).map(|other| {
                    format!("rank {rank} has joined already ({other}): two processes were given the same rank")
                })
            };
            if let Some(message) = refuse {
                drop(st);
                let _ = Reply::refused(message).write(&mut w);
                return;
            }
            st.joined.insert(rank, key);
            drop(st);
            hub.changed.notify_all();
            if Reply::ok(Vec::new(), 0).write(&mut w).is_err() {
                return;
            }
            rank
        }
        _ => return,
    };
    let _ = w.get_ref().set_read_timeout(None);
    hub.lock().open.insert(rank);
    requests(hub, rank, &mut r, &mut w);
    hub.lock().open.remove(&rank);
    hub.changed.notify_all();
}

/// Serve `rank`'s requests until its goodbye or until its connection ends.
fn requests(hub: &Hub, rank: usize, r: &mut BufReader<TcpStream>, w: &mut BufWriter<TcpStream>) {
    loop {
        let req = match Request::read(r) {
            Ok(q) => q,
            Err(e) => {
                let how = match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => GONE.to_string(),
                    _ => format!("is gone: its connection to the store broke: {e}"),
                };
                hub.lose(rank, how);
                return;
            }
        };
        let bye = req.op == Op::Bye;
        // A reply that cannot be written ends the connection: the next
        // read fails and the rank is lost.
        let _ = handle(hub, rank, req, w.get_ref()).write(w);
        if bye {
            // Only after the reply: the host waits for every goodbye before
            // it stops, so no rank loses the store while it says goodbye.
            hub.lock().left.insert(rank);
            hub.changed.notify_all();
            return;
        }
    }
}

/// The reply to one request.
fn handle(hub: &Hub, rank: usize, req: Request, conn: &TcpStream) -> Reply {
    let deadline = Instant::now() + Duration::from_millis(req.b);
    match req.op {
        Op::Hello => Reply::refused(format!("rank {rank} said hello twice")),
        Op::Bye => Reply::ok(Vec::new(), 0),
        Op::Abort => {
            hub.lose(rank, format!("failed: {}", String::from_utf8_lossy(&req.value)));
            Reply::ok(Vec::new(), 0)
        }
        Op::Set => {
            let mut st = hub.lock();
            match lost_reply(&st) {
                Some(lost) => lost,
                None => {
                    st.keys.insert(req.key, req.value);
                    drop(st);
                    hub.changed.notify_all();
                    Reply::ok(Vec::new(), 0)
                }
            }
        }
        Op::Add => {
            let mut st = hub.lock();
            match lost_reply(&st) {
                Some(lost) => lost,
                None => {
                    let slot = st.keys.entry(req.key).or_insert_with(|| 0i64.to_le_bytes().to_vec());
                    let old = slot.as_slice().try_into().map(i64::from_le_bytes).unwrap_or(0);
                    let new = old.wrapping_add(req.a);
                    *slot = new.to_le_bytes().to_vec();
                    drop(st);
                    hub.changed.notify_all();
                    Reply::ok(Vec::new(), new)
                }
            }
        }
        Op::Get => match hub.wait_until(deadline, Some((rank, conn)), |st| st.keys.contains_key(&req.key)) {
            Err(lost) => lost,
            Ok(true) => Reply::ok(hub.lock().keys.get(&req.key).cloned().unwrap_or_default(), 0),
            Ok(false) => Reply { status: TIMED_OUT, payload: req.key.into_bytes(), n: 0 },
        },
        Op::Wait => {
            let keys: Vec<String> = String::from_utf8_lossy(&req.value).lines().map(str::to_string).collect();
            match hub.wait_until(deadline, Some((rank, conn)), |st| keys.iter().all(|k| st.keys.contains_key(k))) {
                Err(lost) => lost,
                Ok(true) => Reply::ok(Vec::new(), 0),
                Ok(false) => {
                    let st = hub.lock();
                    let missing: Vec<&str> =
                        keys.iter().filter(|k| !st.keys.contains_key(*k)).map(String::as_str).collect();
                    Reply { status: TIMED_OUT, payload: missing.join("\n").into_bytes(), n: 0 }
                }
            }
        }
    }
}

/// One rank's connection to the store (and, on rank 0, the store itself).
pub struct Store {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    rank: usize,
    world: usize,
    addr: String,
    timeout: Duration,
    server: Option<Server>,
    closed: bool,
}

impl Store {
    /// Join the store of a world of `world` ranks at `host:port` as `rank`:
    /// rank 0 starts it (listening on every interface) and connects to
    /// itself; the others connect, retrying until `timeout` while rank 0
    /// starts. Every wait of this handle is bounded by `timeout`.
    pub fn join(host: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<Store, StoreError> {
        Store::join_round(host, port, rank, world, 0, timeout)
    }

    /// [`Store::join`] for attempt `round` of a job that restarts (as
    /// torchelastic's rendezvous rounds): a store of another attempt (the
    /// previous one's rank 0, still going down) turns this rank away, or
    /// closes on it as it goes down, and it tries again until its own
    /// attempt's store is up or `timeout` passes.
    pub fn join_round(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        round: u64,
        timeout: Duration,
    ) -> Result<Store, StoreError> {
        let t0 = Instant::now();
        loop {
            match Store::join_once(host, port, rank, world, round, timeout) {
                Err(StoreError::Refused { message, .. })
                    if message.starts_with(OTHER_ROUND) && t0.elapsed() < timeout =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                // A restart that reached the previous attempt's store as it
                // went down (its rank 0 failing too): try again for this
                // attempt's store.
                Err(StoreError::HostGone { .. }) if round > 0 && t0.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(StoreError::Refused { rank, op, message }) => {
                    let message = message.strip_prefix(OTHER_ROUND).unwrap_or(&message).to_string();
                    return Err(StoreError::Refused { rank, op, message });
                }
                other => return other,
            }
        }
    }

    fn join_once(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        round: u64,
        timeout: Duration,
    ) -> Result<Store, StoreError> {
        let server = if rank == 0 { Some(Server::start(port, world, round)?) } else { None };
        // Rank 0 reaches its own store on the loopback.
        let (host, port, shown) = match &server {
            Some(s) => ("127.0.0.1", s.port, format!("{host}:{}", s.port)),
            None => (host, port, format!("{host}:{port}")),
        };
        let addr = format!("{host}:{port}");
        let t0 = Instant::now();
        let conn = loop {
            let tried = addr.to_socket_addrs().map_err(|e| e.to_string()).and_then(|mut a| {
                let a = a.next().ok_or_else(|| format!("`{host}` resolves to no address"))?;
                TcpStream::connect_timeout(&a, Duration::from_secs(5)).map_err(|e| e.to_string())
            });
            match tried {
                Ok(c) => break c,
                Err(why) if t0.elapsed() >= timeout => {
                    return Err(StoreError::Unreachable { rank, addr, waited_s: t0.elapsed().as_secs(), why });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let _ = conn.set_nodelay(true);
        let read = conn.try_clone().map_err(|e| StoreError::Unreachable {
            rank,
            addr: addr.clone(),
            waited_s: 0,
            why: e.to_string(),
        })?;
        let mut store = Store {
            r: BufReader::new(read),
            w: BufWriter::new(conn),
            rank,
            world,
            addr: shown,
            timeout,
            server,
            closed: false,
        };
        let who = format!("pid {} on {}", std::process::id(), hostname());
        let hello =
            Request { op: Op::Hello, key: who, value: round.to_le_bytes().to_vec(), a: rank as i64, b: world as u64 };
        store.call("join", hello)?;
        Ok(store)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// `MASTER_ADDR:port`: where the ranks meet.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The address this rank reaches the store from: one the other ranks
    /// can reach it at too (IPv6 in brackets, ready for `:port`).
    pub fn local_ip(&self) -> Result<String, std::io::Error> {
        let ip = self.w.get_ref().local_addr()?.ip();
        Ok(match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        })
    }

    fn call(&mut self, op: &str, req: Request) -> Result<Reply, StoreError> {
        // The server bounds its waits by the request's own deadline; the
        // socket's bound catches a host that stopped answering at all.
        let _ = self.w.get_ref().set_read_timeout(Some(Duration::from_millis(req.b) + Duration::from_secs(30)));
        let gone = || StoreError::HostGone { rank: self.rank, addr: self.addr.clone(), op: op.to_string() };
        req.write(&mut self.w).map_err(|_| gone())?;
        let reply = Reply::read(&mut self.r).map_err(|_| gone())?;
        match reply.status {
            OK => Ok(reply),
            TIMED_OUT => Err(StoreError::Timeout {
                rank: self.rank,
                op: op.to_string(),
                world: self.world,
                waited_ms: req.b,
                waiting: String::from_utf8_lossy(&reply.payload).into_owned(),
            }),
            LOST => {
                let text = String::from_utf8_lossy(&reply.payload).into_owned();
                let (who, reason) = text.split_once('\n').unwrap_or(("", &text));
                Err(StoreError::Lost {
                    rank: self.rank,
                    op: op.to_string(),
                    lost: reply.n as usize,
                    who: who.to_string(),
                    reason: reason.to_string(),
                })
            }
            _ => Err(StoreError::Refused {
                rank: self.rank,
                op: op.to_string(),
                message: String::from_utf8_lossy(&reply.payload).into_owned(),
            }),
        }
    }

    fn ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.set_in(&format!("set {key}"), key, value)
    }

    /// `set`, as part of the call named `op` (for messages).
    fn set_in(&mut self, op: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let req = Request { op: Op::Set, key: key.into(), value: value.to_vec(), a: 0, b: 0 };
        self.call(op, req).map(drop)
    }

    /// The value of `key`, waiting until some rank sets it.
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        let req = Request { op: Op::Get, key: key.into(), value: Vec::new(), a: 0, b: self.ms() };
        self.call(&format!("get {key}"), req).map(|r| r.payload).map_err(|e| match e {
            StoreError::Timeout { rank, op, world, waited_ms, .. } => {
                StoreError::Timeout { rank, op, world, waited_ms, waiting: format!("a rank to set `{key}`") }
            }
            e => e,
        })
    }

    /// Add `delta` to the counter `key` (0 when unset); its new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let req = Request { op: Op::Add, key: key.into(), value: Vec::new(), a: delta, b: 0 };
        self.call(&format!("add {key}"), req).map(|r| r.n)
    }

    /// Wait until every key of `keys` is set, for at most `within`; the
    /// keys still unset when it times out.
    fn wait_keys(&mut self, op: &str, keys: &[String], within: Duration) -> Result<(), (StoreError, Vec<String>)> {
        let value = keys.join("\n").into_bytes();
        let req = Request { op: Op::Wait, key: String::new(), value, a: 0, b: within.as_millis() as u64 };
        match self.call(op, req) {
            Ok(_) => Ok(()),
            Err(StoreError::Timeout { rank, op, world, waited_ms, waiting }) => {
                let missing: Vec<String> = waiting.lines().map(str::to_string).collect();
                Err((StoreError::Timeout { rank, op, world, waited_ms, waiting }, missing))
            }
            Err(e) => Err((e, Vec::new())),
        }
    }

    /// Every rank waits here until all have arrived. Times out naming the
    /// ranks that did not arrive; fails at once, naming it, if a rank is lost.
    pub fn barrier(&mut self, name: &str) -> Result<(), StoreError> {
        let op = format!("barrier {name}");
        self.set_in(&op, &format!("barrier/{name}/{}", self.rank), &[])?;
        let keys: Vec<String> = (0..self.world).map(|r| format!("barrier/{name}/{r}")).collect();
        self.wait_keys(&op, &keys, self.timeout).map_err(|(e, missing)| match e {
            StoreError::Timeout { rank, op, world, waited_ms, .. } => {
                let ranks: Vec<&str> = missing.iter().filter_map(|k| k.rsplit('/').next()).collect();
                let waiting = format!("ranks [{}] to arrive", ranks.join(", "));
                StoreError::Timeout { rank, op, world, waited_ms, waiting }
            }
            e => e,
        })
    }

    /// Stay connected for `d`, returning early with the error if a rank is
    /// lost meanwhile (to hold ranks together while watching them).
    pub fn hold(&mut self, d: Duration) -> Result<(), StoreError> {
        match self.wait_keys("hold", &[format!("hold/never/{}", self.rank)], d) {
            Ok(()) | Err((StoreError::Timeout { .. }, _)) => Ok(()),
            Err((e, _)) => Err(e),
        }
    }

    /// Say goodbye: this rank has finished and its connection closing is not
    /// a failure. On rank 0 (the host), first wait until every other rank
    /// has said goodbye or is lost, at most the timeout, so that no rank
    /// loses the store in its last calls.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.closed = true;
        let req = Request { op: Op::Bye, key: String::new(), value: Vec::new(), a: 0, b: 0 };
        self.call("close", req)?;
        if let Some(server) = &self.server {
            let hub = &server.hub;
            let world = hub.world;
            let done = hub.wait_until(Instant::now() + self.timeout, None, |st| st.left.len() == world);
            if let Ok(false) = done {
                let st = hub.lock();
                let open: Vec<String> = (0..world).filter(|r| !st.left.contains(r)).map(|r| r.to_string()).collect();
                return Err(StoreError::Timeout {
                    rank: 0,
                    op: "close".into(),
                    world,
                    waited_ms: self.ms(),
                    waiting: format!("ranks [{}] to finish", open.join(", ")),
                });
            }
        }
        Ok(())
    }
}

impl Store {
    /// Report this rank's failure: every other rank's call, waiting or new,
    /// fails with `message` (the first failure reported is the one all see).
    /// On rank 0, the store stays up (at most the timeout, or 10 s) until
    /// the other ranks have had the failure and gone.
    pub fn abort(mut self, message: &str) {
        self.closed = true;
        let req = Request { op: Op::Abort, key: String::new(), value: message.as_bytes().to_vec(), a: 0, b: 0 };
        let _ = self.call("abort", req);
        self.linger();
    }

    /// On rank 0, after a failure: keep the store up (at most the timeout,
    /// or 10 s) until the other ranks have had the news and gone.
    fn linger(&self) {
        if let Some(server) = &self.server {
            server.hub.wait_for_others_to_go(Instant::now() + self.timeout.min(Duration::from_secs(10)));
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Without `close` or `abort`, this rank's connection ends as a
        // failure: the store tells every other rank. The host keeps the
        // store up until they have had the news (bounded).
        if !self.closed {
            let _ = self.w.get_ref().shutdown(Shutdown::Both);
            self.linger();
        }
    }
}

/// This machine's host name (for messages), or `localhost`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for its length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match rc {
        0 if end > 0 => String::from_utf8_lossy(&buf[..end]).into_owned(),
        _ => "localhost".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(20);

    /// `world` ranks on threads, each running `f`; rank 0 first picks a free port.
    fn world<R: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(Store) -> R + Send + Sync + 'static,
    ) -> Vec<Result<R, StoreError>> {
        let f = Arc::new(f);
        let port = free_port();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let f = f.clone();
                std::thread::spawn(move || Store::join("127.0.0.1", port, rank, world, timeout).map(|s| f(s)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn ranks_meet_share_a_value_and_pass_barriers() {
        let out = world(4, T, |mut s| {
            if s.rank() == 0 {
                s.set("id", b"0123456789abcdef").unwrap();
            }
            let id = s.get("id").unwrap();
            let n = s.add("count", 10).unwrap();
            s.barrier("a").unwrap();
            s.barrier("b").unwrap();
            let total = s.add("count", 0).unwrap();
            s.close().unwrap();
            (id, n, total)
        });
        let mut seen = Vec::new();
        for r in out {
            let (id, n, total) = r.unwrap();
            assert_eq!(id, b"0123456789abcdef");
            assert_eq!(total, 40, "every add landed before the barrier");
            seen.push(n);
        }
        seen.sort();
        assert_eq!(seen, vec![10, 20, 30, 40], "adds are atomic");
    }

    #[test]
    fn a_barrier_times_out_naming_the_ranks_that_did_not_arrive() {
        let out = world(3, Duration::from_millis(400), |mut s| {
            if s.rank() == 2 {
                // Never arrives, but stays connected until the others time out.
                std::thread::sleep(Duration::from_millis(1500));
                return Ok(());
            }
            let r = s.barrier("ready");
            if let Err(e) = &r {
                s.abort(&e.to_string());
            }
            r
        });
        for rank in [0, 1] {
            // Its own timeout, or the other's, relayed.
            let e = out[rank].as_ref().unwrap().as_ref().unwrap_err().to_string();
            assert!(e.starts_with(&format!("rank {rank}")), "{e}");
            assert!(
                e.contains("`barrier ready` of the 3 ranks timed out after 400 ms waiting for ranks [2] to arrive")
            );
        }
    }

    #[test]
    fn a_rank_that_dies_stops_the_others_naming_it() {
        let out = world(3, T, |mut s| {
            s.barrier("start").unwrap();
            if s.rank() == 1 {
                // Dies without saying goodbye.
                drop(s);
                return String::new();
            }
            let e = s.barrier("end").unwrap_err();
            if s.rank() == 0 {
                // Every later call fails the same way (asked of rank 0, whose
                // store outlives the others' connections).
                let again = s.set("x", b"y").unwrap_err();
                assert!(matches!(again, StoreError::Lost { lost: 1, .. }), "{again}");
            }
            // Dropped without a goodbye: the host stays up until rank 2 has heard.
            e.to_string()
        });
        for rank in [0, 2] {
            let e = out[rank].as_ref().unwrap();
            assert!(e.starts_with(&format!("rank {rank} stopped in `barrier end`: rank 1 (pid ")), "{e}");
            assert!(e.contains("exited or was killed"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_fails_stops_the_others_with_its_message() {
        let out = world(3, T, |mut s| {
            s.barrier("start").unwrap();
            if s.rank() == 2 {
                s.abort("rank 2: out of memory");
                return String::new();
            }
            let e = s.barrier("end").unwrap_err().to_string();
            s.abort(&e);
            e
        });
        for rank in [0, 1] {
            let e = out[rank].as_ref().unwrap();
            assert!(e.starts_with(&format!("rank {rank} stopped in `barrier end`: rank 2 (pid ")), "{e}");
            assert!(e.ends_with("failed: rank 2: out of memory"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_dies_while_waiting_is_noticed() {
        // Rank 1's connection is cut while the store serves its wait; rank 0
        // waits at a barrier rank 1 never reaches.
        let out = world(2, T, |mut s| {
            if s.rank() == 1 {
                let conn = s.w.get_ref().try_clone().unwrap();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    let _ = conn.shutdown(Shutdown::Both);
                });
                return s.get("nobody-sets-this").unwrap_err().to_string();
            }
            s.barrier("never").unwrap_err().to_string()
        });
        let e = out[0].as_ref().unwrap();
        assert!(e.starts_with("rank 0 stopped in `barrier never`: rank 1 (pid "), "{e}");
        assert!(e.contains("is gone: its connection to the store"), "{e}");
    }

    #[test]
    fn a_host_that_fails_stays_until_the_others_have_heard() {
        let port = free_port();
        let host = Store::join("127.0.0.1", port, 0, 2, T).unwrap();
        let mut other = Store::join("127.0.0.1", port, 1, 2, T).unwrap();
        let waiter = std::thread::spawn(move || other.barrier("x").unwrap_err());
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        drop(host);
        let e = waiter.join().unwrap();
        assert!(matches!(e, StoreError::Lost { rank: 1, lost: 0, .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "the host waited for rank 1 to go, not the full bound");
    }

    /// Both stores pass one barrier together.
    fn meet(host: &mut Store, one: &mut Store) {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| host.barrier("met"));
            let b = s.spawn(|| one.barrier("met"));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    }

    /// A rank of the next attempt of a restarting job is turned away by the
    /// previous attempt's store, waits, and meets its own attempt's store
    /// once that is up.
    #[test]
    fn ranks_meet_only_ranks_of_their_attempt() {
        let port = free_port();
        let old = Store::join_round("127.0.0.1", port, 0, 2, 0, T).unwrap();
        let e = Store::join_round("127.0.0.1", port, 1, 2, 1, Duration::from_millis(300)).err().unwrap().to_string();
        assert!(e.contains("rank 1 is of attempt 1 of the job, this store of attempt 0"), "{e}");
        // The next attempt's rank 1 starts first and waits; its rank 0 comes up after the old one is gone.
        let next = std::thread::spawn(move || Store::join_round("127.0.0.1", port, 1, 2, 1, T));
        std::thread::sleep(Duration::from_millis(300));
        old.abort("attempt 0 failed");
        let mut host = Store::join_round("127.0.0.1", port, 0, 2, 1, T).unwrap();
        let mut one = next.join().unwrap().expect("meets the store of its attempt");
        meet(&mut host, &mut one);
    }

    /// A rank of the next attempt that reaches the previous attempt's store
    /// as it goes down (the connection closes in the middle of joining)
    /// tries again and meets its own attempt's store.
    #[test]
    fn a_store_closing_during_a_restart_join_is_tried_again() {
        let port = free_port();
        // The dying store: it takes one connection and closes it unanswered.
        let dying = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let next = std::thread::spawn(move || Store::join_round("127.0.0.1", port, 1, 2, 1, T));
        let (conn, _) = dying.accept().unwrap();
        drop(conn);
        drop(dying);
        let mut host = Store::join_round("127.0.0.1", port, 0, 2, 1, T).unwrap();
        let mut one = next.join().unwrap().expect("tries again and meets the store of its attempt");
        meet(&mut host, &mut one);
    }

    #[test]
    fn wrong_joins_are_refused() {
        let port = free_port();
        let _host = Store::join("127.0.0.1", port, 0, 2, T).unwrap();
        let e = Store::join("127.0.0.1", port, 0, 2, T).err().unwrap();
        assert!(e.to_string().contains("cannot host the store on port"), "{e}");
        let e = Store::join("127.0.0.1", port, 1, 3, T).err().unwrap();
        assert!(e.to_string().contains("started for a world of 3 ranks, rank 0 for 2"), "{e}");
        let _one = Store::join("127.0.0.1", port, 1, 2, T).unwrap();
        let e = Store::join("127.0.0.1", port, 1, 2, T).err().unwrap();
        assert!(e.to_string().contains("two processes were given the same rank"), "{e}");
        // A stray client speaking another protocol is cut off, not served.
        let mut stray = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stray.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = stray.read_to_end(&mut buf);
        assert!(buf.is_empty());
    }

    #[test]
    fn no_store_is_reported_with_where_it_was_looked_for() {
        let port = free_port();
        let e = Store::join("127.0.0.1", port, 1, 2, Duration::from_millis(300)).err().unwrap().to_string();
        assert!(e.starts_with(&format!("rank 1: cannot reach the store at 127.0.0.1:{port} after 0 s")), "{e}");
        assert!(e.contains("MASTER_ADDR and MASTER_PORT"), "{e}");
    }

    #[test]
    fn a_get_times_out_naming_the_key() {
        let out = world(1, Duration::from_millis(200), |mut s| s.get("nobody-sets-this").unwrap_err().to_string());
        let e = out[0].as_ref().unwrap();
        assert!(e.ends_with("timed out after 200 ms waiting for a rank to set `nobody-sets-this`"), "{e}");
    }
}
