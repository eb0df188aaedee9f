//! `tessera launch`: start this machine's ranks as processes, as torchrun
//! does, and watch them. Each rank is this same program, run with the
//! arguments given and torchrun's variables (`RANK`, `LOCAL_RANK`,
//! `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`); its output lines come through prefixed `[rank N]`.
//!
//! When a rank fails (a non-zero exit, or a signal), the launcher stops the
//! others (SIGTERM, then SIGKILL after a grace period) and reports the failed
//! rank with its last lines of error output; with `max_restarts`, it then
//! starts every rank again (torchelastic's restarts), up to that many times. Ranks die with the launcher
//! (`PR_SET_PDEATHSIG`), so a killed launcher leaves no process behind.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to launch, and where the ranks meet.
#[derive(Debug, Clone)]
pub struct Launch {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    /// Node 0's address, where rank 0 hosts the store.
    pub master_addr: String,
    /// The store's port; `None` picks a free one (one node only).
    pub master_port: Option<u16>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// How long a rank being stopped gets between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Restart every rank of this node this many times at most after a
    /// failure, as torchelastic does; each attempt's ranks see
    /// `TORCHELASTIC_RESTART_COUNT` (0 first), meet only ranks of the same
    /// attempt at the store, and `tessera train` resumes from its run
    /// folder's last complete checkpoint. Across nodes, a failure on one
    /// node fails the ranks of the others (their peer is gone), so every
    /// node's launcher restarts, and the attempts meet again.
    pub max_restarts: usize,
}

/// How many error lines of a failed rank the report keeps.
const TAIL: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot start rank {rank}: {why}")]
    Spawn { rank: usize, why: String },
    #[error("{}", failed_text(.rank, .pid, .status, .tail, .stopped))]
    Failed { rank: usize, pid: u32, status: String, tail: Vec<String>, stopped: usize },
    #[error("stopped by {signal}: the {ranks} ranks were stopped too")]
    Interrupted { signal: String, ranks: usize },
}

fn failed_text(rank: &usize, pid: &u32, status: &str, tail: &[String], stopped: &usize) -> String {
    let mut s = format!("rank {rank} (pid {pid}) {status}; stopped the other {stopped} running ranks");
    if !tail.is_empty() {
        s.push_str(&format!("\nrank {rank}'s last error output:"));
        for l in tail {
            s.push_str(&format!("\n  {l}"));
        }
    }
    s
}

impl LaunchError {
    /// The exit code `tessera launch` ends with: 1 for a failed rank or a
    /// usage error, 128 + the signal when interrupted (as a shell does).
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Interrupted { signal, .. } if signal == "SIGINT" => 130,
            LaunchError::Interrupted { .. } => 143,
            _ => 1,
        }
    }
}

/// "exited with code 1", "was killed by signal 9 (SIGKILL)".
pub fn status_text(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        _ => "ended".into(),
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// The signal the launcher itself received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
}

/// One running rank.
struct Rank {
    rank: usize,
    pid: u32,
    /// Set once the reaper has collected the exit: until then `pid` is ours
    /// and safe to signal.
    status: Option<ExitStatus>,
    tail: Arc<Mutex<VecDeque<String>>>,
    pumps: Vec<JoinHandle<()>>,
}

/// An exit the reaper collected: the pid and how it ended.
type Exit = (u32, ExitStatus);

/// Collect every child's exit in the order they happen (a blocking
/// `waitpid`, so that the rank that failed first is reported first, not the
/// ranks that failed because of it), until no child is left.
fn reaper(tx: mpsc::Sender<Exit>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("tessera-launch-reap".into()).spawn(move || {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waits for any child of this process; writes `status`.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                let _ = tx.send((pid as u32, ExitStatus::from_raw(status)));
            } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return; // ECHILD: every child has been collected.
            }
        }
    })
}

/// Copy `from` line by line to the launcher's stdout or stderr, each line
/// prefixed with the rank; keep the last lines in `tail` if given.
fn pump(
    from: impl std::io::Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("tessera-launch-io".into()).spawn(move || {
        let mut r = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            let out = format!("{prefix}{text}\n");
            // A closed stdout or stderr of the launcher must not stop the rank.
            let _ = match to_stderr {
                true => std::io::stderr().lock().write_all(out.as_bytes()),
                false => std::io::stdout().lock().write_all(out.as_bytes()),
            };
            if let Some(t) = &tail {
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == TAIL {
                    t.pop_front();
                }
                t.push_back(text.to_string());
            }
        }
    })
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: sends a signal to a child this launcher started and has not reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A free TCP port on this machine (the OS picks it; a rank binds it soon after).
fn free_port() -> Result<u16, LaunchError> {
    std::net::TcpListener::bind(("0.0.0.0", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| LaunchError::Usage(format!("cannot find a free port for the store: {e}; pass --master HOST:PORT")))
}

/// Start the ranks of this node and wait for them, restarting them all
/// after a failed rank up to `l.max_restarts` times. `Ok` when every rank
/// of an attempt exits 0.
pub fn run(l: &Launch) -> Result<(), LaunchError> {
    let mut attempt = 0;
    loop {
        match run_once(l, attempt) {
            Err(e @ LaunchError::Failed { .. }) if attempt < l.max_restarts => {
                attempt += 1;
                eprintln!("tessera launch: {e}");
                eprintln!(
                    "tessera launch: restarting every rank (restart {attempt} of {}); `train` resumes from its last \
                     complete checkpoint",
                    l.max_restarts
                );
            }
            outcome => return outcome,
        }
    }
}

/// One attempt: start the ranks of this node and wait for them.
fn run_once(l: &Launch, attempt: usize) -> Result<(), LaunchError> {
    if l.node_rank >= l.nnodes {
        return Err(LaunchError::Usage(format!(
            "--node-rank {} is not below --nnodes {}: nodes are numbered from 0",
            l.node_rank, l.nnodes
        )));
    }
    let port = match (l.master_port, l.nnodes) {
        (Some(p), _) => p,
        (None, 1) => free_port()?,
        (None, _) => {
            return Err(LaunchError::Usage(
                "--nnodes above 1 needs --master HOST:PORT: node 0's address and a port free there, the same on \
                 every node"
                    .into(),
            ));
        }
    };
    let world = l.nproc_per_node * l.nnodes;
    RECEIVED.store(0, Ordering::SeqCst);
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut ranks: Vec<Rank> = Vec::new();
    let mut spawn_error = None;
    for local in 0..l.nproc_per_node {
        let rank = l.node_rank * l.nproc_per_node + local;
        match start(l, rank, local, world, port, attempt) {
            Ok(r) => ranks.push(r),
            Err(why) => {
                spawn_error = Some(LaunchError::Spawn { rank, why });
                break;
            }
        }
    }
    let (tx, exits) = mpsc::channel();
    let reap = reaper(tx);
    let outcome = match (spawn_error, reap) {
        (Some(e), _) => {
            stop(&mut ranks, &exits, l.grace);
            Err(e)
        }
        (None, Err(e)) => {
            stop(&mut ranks, &exits, Duration::ZERO);
            Err(LaunchError::Usage(format!("cannot start the thread that watches the ranks: {e}")))
        }
        (None, Ok(_)) => watch(&mut ranks, &exits, l.grace),
    };
    for r in &mut ranks {
        for p in r.pumps.drain(..) {
            let _ = p.join();
        }
    }
    outcome
}

fn start(l: &Launch, rank: usize, local: usize, world: usize, port: u16, attempt: usize) -> Result<Rank, String> {
    let mut cmd = Command::new(&l.program);
    cmd.args(&l.args)
        .env("TORCHELASTIC_RESTART_COUNT", attempt.to_string())
        .env("TORCHELASTIC_MAX_RESTARTS", l.max_restarts.to_string())
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", local.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_WORLD_SIZE", l.nproc_per_node.to_string())
        .env("GROUP_RANK", l.node_rank.to_string())
        .env("MASTER_ADDR", &l.master_addr)
        .env("MASTER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls: prctl,
    // getppid and raise.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The launcher may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", l.program.display()))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let prefix = format!("[rank {rank}] ");
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(pump(out, prefix.clone(), false, None).map_err(|e| e.to_string())?);
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(pump(err, prefix, true, Some(tail.clone())).map_err(|e| e.to_string())?);
    }
    // The reaper collects the exit; the `Child` handle is not waited on.
    Ok(Rank { rank, pid: child.id(), status: None, tail, pumps })
}

/// Record an exit the reaper collected; the index of its rank.
fn record(ranks: &mut [Rank], (pid, status): Exit) -> Option<usize> {
    let i = ranks.iter().position(|r| r.pid == pid && r.status.is_none())?;
    ranks[i].status = Some(status);
    Some(i)
}

/// Wait until all ranks exit 0, one fails, or the launcher is signalled.
fn watch(ranks: &mut [Rank], exits: &mpsc::Receiver<Exit>, grace: Duration) -> Result<(), LaunchError> {
    loop {
        if ranks.iter().all(|r| r.status.is_some()) {
            return Ok(());
        }
        let sig = RECEIVED.load(Ordering::SeqCst);
        if sig != 0 {
            let running = ranks.iter().filter(|r| r.status.is_none()).count();
            stop(ranks, exits, grace);
            return Err(LaunchError::Interrupted { signal: signal_name(sig), ranks: running });
        }
        let exit = match exits.recv_timeout(Duration::from_millis(50)) {
            Ok(e) => e,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let Some(i) = record(ranks, exit) else { continue };
        if exit.1.success() {
            continue;
        }
        // A Ctrl-C reaches the ranks too: report the interrupt, not them.
        if RECEIVED.load(Ordering::SeqCst) != 0 {
            continue;
        }
        let stopped = ranks.iter().filter(|r| r.status.is_none()).count();
        stop(ranks, exits, grace);
        let r = &mut ranks[i];
        for p in r.pumps.drain(..) {
            let _ = p.join();
        }
        let tail = r.tail.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        return Err(LaunchError::Failed { rank: r.rank, pid: r.pid, status: status_text(&exit.1), tail, stopped });
    }
}

/// Stop every running rank: SIGTERM, then SIGKILL after `grace`; wait until
/// the reaper has collected them all.
fn stop(ranks: &mut [Rank], exits: &mpsc::Receiver<Exit>, grace: Duration) {
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        for r in ranks.iter().filter(|r| r.status.is_none()) {
            signal(r.pid, sig);
        }
        // SIGKILL cannot be refused; the bound only guards a process stuck
        // in the kernel.
        let deadline = Instant::now() + if sig == libc::SIGTERM { grace } else { Duration::from_secs(30) };
        while ranks.iter().any(|r| r.status.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match exits.recv_timeout(left) {
                Ok(e) => {
                    record(ranks, e);
                }
                Err(_) => break,
            }
        }
    }
}
