//! `tessera launch` (this machine's ranks as processes, as torchrun starts
//! them), `tessera comm-check` (the ranks meet, agree and pass barriers),
//! and a launched `train`'s world of processes (MPI's), checked against the
//! spec's mesh before anything runs.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tessera_runtime::comm::ProcessWorld;
use tessera_runtime::launch::{self, Placement, Source, agent};

/// How long ranks being stopped get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

/// The subcommands a launched rank may run.
const RANK_COMMANDS: &[&str] = &["train", "bench", "comm-check"];

/// Start `nproc` ranks of node `node_rank` of `nnodes` running `command`.
pub fn run(
    nproc: u64,
    nnodes: u64,
    node_rank: u64,
    master: Option<String>,
    max_restarts: u64,
    command: Vec<OsString>,
) -> ExitCode {
    let first = command.first().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    if !RANK_COMMANDS.contains(&first.as_str()) {
        let hint = match first.as_str() {
            "tessera" => "leave out `tessera`: `tessera launch --nproc-per-node 4 -- train FILE`".to_string(),
            _ => format!("each rank runs a tessera command: one of {}", RANK_COMMANDS.join(", ")),
        };
        eprintln!("error: `{first}` cannot be launched: {hint}");
        return ExitCode::from(2);
    }
    let (master_addr, master_port) = match master.as_deref().map(parse_master) {
        None => ("127.0.0.1".to_string(), None),
        Some(Ok((a, p))) => (a, Some(p)),
        Some(Err(e)) => {
            eprintln!("error: --master {}: {e}", master.unwrap_or_default());
            return ExitCode::from(2);
        }
    };
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find this program's path to start the ranks with: {e}");
            return ExitCode::from(1);
        }
    };
    let l = agent::Launch {
        nproc_per_node: nproc as usize,
        nnodes: nnodes as usize,
        node_rank: node_rank as usize,
        master_addr,
        master_port,
        program,
        args: command,
        grace: GRACE,
        max_restarts: max_restarts as usize,
    };
    match agent::run(&l) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `HOST:PORT` (an IPv6 host in brackets: `[::1]:29500`).
fn parse_master(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s.rsplit_once(':').ok_or("expected HOST:PORT, e.g. node01:29500")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("expected HOST:PORT, e.g. node01:29500".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_string(), p)),
        _ => Err(format!("`{port}` is not a TCP port (1 to 65535)")),
    }
}

/// This process's place from its launcher's variables; `Err` with the exit
/// code after printing what is wrong.
fn placement() -> Result<Option<Placement>, ExitCode> {
    launch::env::from_process_env().map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    })
}

/// The mesh's ranks against the launched processes: a world of one
/// process runs as usual; more must match the mesh, or the run stops at
/// once saying which is which.
fn launched(mesh: (u64, &str)) -> Result<Option<Placement>, ExitCode> {
    let Some(p) = placement()? else { return Ok(None) };
    if p.world == 1 {
        return Ok(None);
    }
    let (ranks, text) = mesh;
    if ranks != p.world as u64 {
        eprintln!(
            "error: {} processes were launched ({}), but the spec's mesh ({text}) has {ranks} ranks: launch {ranks}, \
             or change the mesh with --set parallel.mesh.AXIS=N",
            p.world, p.source
        );
        return Err(ExitCode::from(1));
    }
    Ok(Some(p))
}

/// `bench` under a launcher: it times one process, whose ranks are threads.
pub fn single_process(mesh: (u64, &str)) -> Result<(), ExitCode> {
    match launched(mesh)? {
        None => Ok(()),
        Some(p) => {
            eprintln!(
                "error: this process is rank {} of {} ({}), but `tessera bench` times one process (the mesh's \
                 ranks as threads); run it without a launcher, or time `tessera train` under mpirun",
                p.rank, p.world, p.source
            );
            Err(ExitCode::from(1))
        }
    }
}

/// `train` under a launcher: this process's rank in the world of processes
/// (`None`: one process, whose ranks are threads). Ranks that `mpirun`
/// starts talk through MPI; ranks that torchrun, `tessera launch` or `srun`
/// start meet at rank 0's store and talk over TCP.
pub fn process_world(mesh: (u64, &str), timeout: Duration) -> Result<Option<ProcessWorld>, ExitCode> {
    let Some(p) = launched(mesh)? else { return Ok(None) };
    match p.source {
        Source::Mpi => mpi_world(&p, timeout),
        Source::Torchrun | Source::Slurm => {
            let tcp = tessera_runtime::comm::tcp::Tcp::connect(&p, timeout).map_err(|e| {
                eprintln!("error: rank {} of {} ({}): {e}", p.rank, p.world, p.source);
                ExitCode::from(1)
            })?;
            Ok(Some(ProcessWorld::new(Box::new(tcp), "TCP", p.local_world)))
        }
    }
}

#[cfg(feature = "mpi")]
fn mpi_world(p: &Placement, timeout: Duration) -> Result<Option<ProcessWorld>, ExitCode> {
    use tessera_runtime::comm::mpi::Mpi;
    let mpi = Mpi::init(timeout).map_err(|e| {
        eprintln!("error: rank {} of {} ({}): cannot start MPI: {e}", p.rank, p.world, p.source);
        ExitCode::from(1)
    })?;
    use tessera_runtime::comm::Communicator as _;
    if mpi.world_size() != p.world || mpi.rank() != p.rank {
        eprintln!(
            "error: the launcher says rank {} of {} ({}), but MPI says rank {} of {}: under srun, start the ranks \
             with Slurm's MPI plugin (`srun --mpi=pmix`) so that MPI sees the job's tasks",
            p.rank,
            p.world,
            p.source,
            mpi.rank(),
            mpi.world_size()
        );
        return Err(ExitCode::from(1));
    }
    Ok(Some(ProcessWorld::new(Box::new(mpi), "MPI", p.local_world)))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world(p: &Placement, _timeout: Duration) -> Result<Option<ProcessWorld>, ExitCode> {
    eprintln!(
        "error: this process is rank {} of {} ({}), but this tessera was built without MPI: build it with \
         `cargo build --release --features mpi` (needs an MPI library, e.g. Debian's libopenmpi-dev, and \
         libclang), or run one process: it runs the mesh's ranks as threads",
        p.rank, p.world, p.source
    );
    Err(ExitCode::from(1))
}

/// Stop a run after an error: the message, and with a world of processes
/// every other rank with it (MPI_Abort ends the job).
pub fn stop(world: Option<&ProcessWorld>, message: &str) -> ExitCode {
    eprintln!("error: {message}");
    if let Some(w) = world {
        let text = format!("rank {}: {message}", w.rank());
        w.lock().abort(&text);
    }
    ExitCode::from(1)
}

/// Meet the other ranks at the store, agree on a run id, check the
/// placement (every rank has the id; no two ranks of a machine share a
/// local rank; each machine runs its LOCAL_WORLD_SIZE ranks), time
/// `rounds` barriers, then stay connected `hold` seconds.
pub fn comm_check(rounds: u64, timeout: u64, hold: u64) -> ExitCode {
    let p = match placement() {
        Ok(Some(p)) => p,
        Ok(None) => {
            println!(
                "comm-check: one process (no RANK/WORLD_SIZE, SLURM_PROCID or OMPI_COMM_WORLD_RANK): nothing to \
                 check; run it under `tessera launch --nproc-per-node N`, torchrun, srun or mpirun"
            );
            return ExitCode::SUCCESS;
        }
        Err(code) => return code,
    };
    match check(&p, rounds, Duration::from_secs(timeout), Duration::from_secs(hold)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(p: &Placement, rounds: u64, timeout: Duration, hold: Duration) -> Result<(), String> {
    let mut store = launch::rendezvous(p, timeout).map_err(|e| e.to_string())?;
    match checks(&mut store, p, rounds, hold) {
        Ok(()) => store.close().map_err(|e| e.to_string()),
        Err(e) => {
            // The others stop with this rank's message, not a bare "gone".
            store.abort(&e);
            Err(e)
        }
    }
}

fn checks(store: &mut launch::Store, p: &Placement, rounds: u64, hold: Duration) -> Result<(), String> {
    let id = launch::agree(store, "run-id", || launch::random_bytes(16)).map_err(|e| e.to_string())?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let host = launch::store::hostname();
    // Two launcher nodes on one machine (a multi-node rehearsal over the
    // loopback) are two nodes for the placement check.
    let node = match p.node {
        Some(n) => format!("{host} (node {n})"),
        None => host.clone(),
    };
    println!(
        "rank {} of {}: local rank {} of {} on {host} (pid {}), store {}, run id {id}",
        p.rank,
        p.world,
        p.local_rank,
        p.local_world,
        std::process::id(),
        store.addr()
    );
    let me = format!("{id} {} {} {node}", p.local_rank, p.local_world);
    store.set(&format!("who/{}", p.rank), me.as_bytes()).map_err(|e| e.to_string())?;
    if p.rank == 0 {
        let mut who = Vec::new();
        for r in 0..p.world {
            let v = store.get(&format!("who/{r}")).map_err(|e| e.to_string())?;
            who.push(String::from_utf8_lossy(&v).into_owned());
        }
        placement_problems(&who).map_err(|e| format!("rank 0: {e}"))?;
    }
    let mut times = Vec::new();
    for k in 0..rounds {
        let t0 = Instant::now();
        store.barrier(&format!("round-{k}")).map_err(|e| e.to_string())?;
        times.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    if p.rank == 0 {
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
        let max = times.last().copied().unwrap_or(0.0);
        println!(
            "comm-check ok: {} ranks ({}) met at {}; run id {id}; {rounds} barriers: median {median:.0} µs, max \
             {max:.0} µs",
            p.world,
            p.source,
            store.addr()
        );
    }
    store.hold(hold).map_err(|e| e.to_string())?;
    store.barrier("done").map_err(|e| e.to_string())
}

/// What is wrong with the ranks' reports (`ID LOCAL_RANK LOCAL_WORLD HOST`,
/// by rank): a rank with another run id, two ranks of one machine with one
/// local rank (they would take one GPU), or a machine whose rank count is
/// not the LOCAL_WORLD_SIZE its ranks were told.
fn placement_problems(who: &[String]) -> Result<(), String> {
    use std::collections::BTreeMap;
    let mut hosts: BTreeMap<&str, BTreeMap<usize, Vec<usize>>> = BTreeMap::new();
    let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
    let id0 = who.first().and_then(|w| w.split(' ').next()).unwrap_or("");
    for (rank, w) in who.iter().enumerate() {
        let f: Vec<&str> = w.splitn(4, ' ').collect();
        let [id, local, size, host] = f[..] else { return Err(format!("rank {rank} sent `{w}`")) };
        if id != id0 {
            return Err(format!("rank {rank} has run id {id}, rank 0 {id0}: the ranks did not meet at one store"));
        }
        let local = local.parse::<usize>().map_err(|_| format!("rank {rank} sent `{w}`"))?;
        hosts.entry(host).or_default().entry(local).or_default().push(rank);
        sizes.insert(host, size.parse::<usize>().map_err(|_| format!("rank {rank} sent `{w}`"))?);
    }
    for (host, locals) in &hosts {
        if let Some((local, ranks)) = locals.iter().find(|(_, r)| r.len() > 1) {
            return Err(format!(
                "ranks {ranks:?} on {host} all have local rank {local}: they would share one GPU; check LOCAL_RANK \
                 (SLURM_LOCALID under srun)"
            ));
        }
        let n: usize = locals.values().map(Vec::len).sum();
        if n != sizes[host] {
            return Err(format!(
                "{host} runs {n} ranks but they were told LOCAL_WORLD_SIZE={}: check the launcher's per-node count",
                sizes[host]
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addresses() {
        assert_eq!(parse_master("node01:29500"), Ok(("node01".into(), 29500)));
        assert_eq!(parse_master("[::1]:7"), Ok(("::1".into(), 7)));
        assert!(parse_master("node01").unwrap_err().contains("HOST:PORT"));
        assert!(parse_master("h:0").unwrap_err().contains("not a TCP port"));
        assert!(parse_master(":80").is_err());
    }

    #[test]
    fn placements_that_would_share_a_gpu_are_found() {
        let ok = ["i 0 2 a", "i 1 2 a", "i 0 2 b", "i 1 2 b"].map(String::from);
        assert_eq!(placement_problems(&ok), Ok(()));
        let shared = ["i 0 2 a", "i 0 2 a"].map(String::from);
        assert!(placement_problems(&shared).unwrap_err().contains("ranks [0, 1] on a all have local rank 0"));
        let short = ["i 0 4 a", "i 1 4 a"].map(String::from);
        assert!(
            placement_problems(&short).unwrap_err().contains("a runs 2 ranks but they were told LOCAL_WORLD_SIZE=4")
        );
        let other = ["i 0 2 a", "j 1 2 a"].map(String::from);
        assert!(placement_problems(&other).unwrap_err().contains("rank 1 has run id j"));
    }
}
