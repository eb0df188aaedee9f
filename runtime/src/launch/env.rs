//! Which rank this process is, read from the environment its launcher set:
//! torchrun's (and `tessera launch`'s), Slurm's `srun`, or an MPI launcher's
//! (`mpirun` of Open MPI, MPICH or Intel MPI). One process with none of them
//! is a world of one.

use std::fmt;

/// This process's place in a multi-process world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes of this machine: which GPU it takes.
    pub local_rank: usize,
    pub local_world: usize,
    /// The launcher's node index (torchrun's `GROUP_RANK`, Slurm's
    /// `SLURM_NODEID`), where it gives one.
    pub node: Option<usize>,
    /// Where rank 0 hosts the store the ranks meet at. `None` under an MPI
    /// launcher that was not given one: MPI itself connects the ranks, and
    /// only what meets at the store (`tessera comm-check`) needs it.
    pub master_addr: Option<String>,
    pub master_port: u16,
    pub source: Source,
    /// Which attempt of a restarting job this is (torchelastic's
    /// `TORCHELASTIC_RESTART_COUNT`, which `tessera launch --max-restarts`
    /// sets too; 0 without it): ranks meet only ranks of their attempt.
    pub round: u64,
}

/// Which launcher's variables gave the placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
    /// `MASTER_PORT`: torchrun and `tessera launch`.
    Torchrun,
    /// `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_JOB_NODELIST`.
    Slurm,
    /// `OMPI_COMM_WORLD_*` (Open MPI) or `PMI_RANK`/`PMI_SIZE` (MPICH, Intel MPI).
    Mpi,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Torchrun => "from torchrun's RANK and WORLD_SIZE",
            Source::Slurm => "from Slurm's SLURM_PROCID and SLURM_NTASKS",
            Source::Mpi => "from the MPI launcher's variables",
        })
    }
}

/// The port rank 0's store listens on when the launcher names none
/// (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

/// A variable that is missing or malformed, named with what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EnvError {
    pub message: String,
}

fn err(message: impl Into<String>) -> EnvError {
    EnvError { message: message.into() }
}

/// The placement from this process's environment; `None` when no launcher
/// variable is set (a single process).
pub fn from_process_env() -> Result<Option<Placement>, EnvError> {
    from_env(|k| std::env::var(k).ok())
}

/// The placement from the variables `get` returns. torchrun's take
/// precedence (`tessera launch` under `srun` sets them for its children),
/// then Slurm's, then MPI's.
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Placement>, EnvError> {
    let vars = Vars { get: &get };
    let p = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
        torchrun(&vars)?
    } else if get("SLURM_PROCID").is_some() {
        slurm(&vars)?
    } else if get("OMPI_COMM_WORLD_RANK").is_some() || get("PMI_RANK").is_some() {
        mpi(&vars)?
    } else {
        return Ok(None);
    };
    if p.rank >= p.world {
        return Err(err(format!("rank {} is not below the world size {} ({})", p.rank, p.world, p.source)));
    }
    if p.local_rank >= p.local_world || p.local_world > p.world {
        return Err(err(format!(
            "local rank {} of {} processes on this machine does not fit a world of {} ({})",
            p.local_rank, p.local_world, p.world, p.source
        )));
    }
    Ok(Some(p))
}

struct Vars<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl Vars<'_> {
    fn opt(&self, k: &str) -> Option<String> {
        (self.get)(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
    }

    fn need(&self, k: &str, hint: &str) -> Result<String, EnvError> {
        self.opt(k).ok_or_else(|| err(format!("{k} is not set; {hint}")))
    }

    fn number(&self, k: &str, v: &str) -> Result<usize, EnvError> {
        v.parse::<usize>().map_err(|_| err(format!("{k}={v} is not a whole number")))
    }

    fn count(&self, k: &str, hint: &str) -> Result<usize, EnvError> {
        let v = self.need(k, hint)?;
        match self.number(k, &v)? {
            0 => Err(err(format!("{k}=0: a world has at least one process"))),
            n => Ok(n),
        }
    }

    fn index(&self, k: &str, hint: &str) -> Result<usize, EnvError> {
        let v = self.need(k, hint)?;
        self.number(k, &v)
    }

    fn port(&self) -> Result<u16, EnvError> {
        match self.opt("MASTER_PORT") {
            None => Ok(DEFAULT_PORT),
            Some(v) => match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(err(format!("MASTER_PORT={v} is not a TCP port (1 to 65535)"))),
            },
        }
    }
}

fn torchrun(v: &Vars) -> Result<Placement, EnvError> {
    let hint = "torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together; set them all, or launch \
                with `tessera launch --nproc-per-node N -- ...`";
    let rank = v.index("RANK", hint)?;
    let world = v.count("WORLD_SIZE", hint)?;
    let master_addr = v.need("MASTER_ADDR", hint)?;
    let master_port = match v.opt("MASTER_PORT") {
        Some(_) => v.port()?,
        None => return Err(err(format!("MASTER_PORT is not set; {hint}"))),
    };
    // Without LOCAL_RANK the world is taken to be one machine's.
    let local_rank = match v.opt("LOCAL_RANK") {
        Some(s) => v.number("LOCAL_RANK", &s)?,
        None => rank,
    };
    let local_world = match v.opt("LOCAL_WORLD_SIZE") {
        Some(s) => v.number("LOCAL_WORLD_SIZE", &s)?,
        None if v.opt("LOCAL_RANK").is_none() => world,
        None => {
            return Err(err(format!(
                "LOCAL_RANK is set but LOCAL_WORLD_SIZE is not; {hint} (and LOCAL_RANK, LOCAL_WORLD_SIZE)"
            )));
        }
    };
    let node = match v.opt("GROUP_RANK") {
        Some(n) => Some(v.number("GROUP_RANK", &n)?),
        None => None,
    };
    Ok(Placement {
        rank,
        world,
        local_rank,
        local_world,
        node,
        master_addr: Some(master_addr),
        master_port,
        source: Source::Torchrun,
        round: match v.opt("TORCHELASTIC_RESTART_COUNT") {
            Some(n) => v.number("TORCHELASTIC_RESTART_COUNT", &n)? as u64,
            None => 0,
        },
    })
}

fn slurm(v: &Vars) -> Result<Placement, EnvError> {
    let hint = "srun sets it for each task; run the command under `srun`";
    let rank = v.index("SLURM_PROCID", hint)?;
    let world = match v.opt("SLURM_NTASKS") {
        Some(_) => v.count("SLURM_NTASKS", hint)?,
        None => v.count("SLURM_NPROCS", hint)?,
    };
    let local_rank = v.index("SLURM_LOCALID", hint)?;
    let node = match v.opt("SLURM_NODEID") {
        Some(n) => Some(v.number("SLURM_NODEID", &n)?),
        None => None,
    };
    let local_world = match (v.opt("SLURM_TASKS_PER_NODE"), node) {
        (Some(per_node), Some(node)) => tasks_on_node(&per_node, node).ok_or_else(|| {
            err(format!("SLURM_TASKS_PER_NODE={per_node} names no task count for node {node} (SLURM_NODEID)"))
        })?,
        _ => v.count("SLURM_NTASKS_PER_NODE", "set it, or SLURM_TASKS_PER_NODE and SLURM_NODEID, as srun does")?,
    };
    let master_addr = match v.opt("MASTER_ADDR") {
        Some(a) => a,
        None => {
            let list = match v.opt("SLURM_JOB_NODELIST") {
                Some(l) => l,
                None => {
                    v.need("SLURM_NODELIST", "Slurm sets SLURM_JOB_NODELIST; or set MASTER_ADDR to the first node")?
                }
            };
            first_host(&list)
                .ok_or_else(|| err(format!("cannot read a host from SLURM_JOB_NODELIST={list}; set MASTER_ADDR")))?
        }
    };
    Ok(Placement {
        rank,
        world,
        local_rank,
        local_world,
        node,
        master_addr: Some(master_addr),
        master_port: v.port()?,
        source: Source::Slurm,
        round: 0,
    })
}

fn mpi(v: &Vars) -> Result<Placement, EnvError> {
    let (rank, world, local_rank, local_world) = if v.opt("OMPI_COMM_WORLD_RANK").is_some() {
        let hint = "Open MPI's mpirun sets it";
        (
            v.index("OMPI_COMM_WORLD_RANK", hint)?,
            v.count("OMPI_COMM_WORLD_SIZE", hint)?,
            v.index("OMPI_COMM_WORLD_LOCAL_RANK", hint)?,
            v.count("OMPI_COMM_WORLD_LOCAL_SIZE", hint)?,
        )
    } else {
        let hint = "MPICH's and Intel MPI's mpirun set it";
        let rank = v.index("PMI_RANK", hint)?;
        let world = v.count("PMI_SIZE", hint)?;
        match v.opt("MPI_LOCALRANKID") {
            Some(l) => (rank, world, v.number("MPI_LOCALRANKID", &l)?, v.count("MPI_LOCALNRANKS", hint)?),
            None => (rank, world, rank, world),
        }
    };
    let master_addr = v.opt("MASTER_ADDR");
    Ok(Placement {
        rank,
        world,
        local_rank,
        local_world,
        node: None,
        master_addr,
        master_port: v.port()?,
        source: Source::Mpi,
        round: 0,
    })
}

/// The number of tasks on node `node` from Slurm's compressed
/// `SLURM_TASKS_PER_NODE`: `4(x2),3` is 4, 4, 3.
pub fn tasks_on_node(per_node: &str, node: usize) -> Option<usize> {
    let mut seen = 0;
    for part in per_node.split(',') {
        let (count, times) = match part.split_once("(x") {
            Some((c, rest)) => (c, rest.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (part, 1),
        };
        let count = count.trim().parse::<usize>().ok()?;
        if node < seen + times {
            return Some(count);
        }
        seen += times;
    }
    None
}

/// The first host of a Slurm host list: `gpu[07-09,12],login1` gives
/// `gpu07`; `rack[1-2]-n[01-04]` gives `rack1-n01` (each bracket takes its
/// first value, zero padding kept).
pub fn first_host(list: &str) -> Option<String> {
    // The first item at bracket depth 0.
    let mut depth = 0i32;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let item = list[..end].trim();
    let mut host = String::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = open + rest[open..].find(']')?;
        let first = rest[open + 1..close].split(',').next()?.split('-').next()?.trim();
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        host.push_str(first);
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return None;
    }
    host.push_str(rest);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn place(vars: &[(&str, &str)]) -> Result<Option<Placement>, EnvError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn none_is_a_single_process() {
        assert_eq!(place(&[("HOME", "/root")]), Ok(None));
    }

    #[test]
    fn torchrun_variables() {
        let p = place(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node01"),
            ("MASTER_PORT", "29400"),
            ("GROUP_RANK", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank, p.local_world, p.node), (5, 8, 1, 4, Some(1)));
        assert_eq!(
            (p.master_addr.as_deref().unwrap_or(""), p.master_port, p.source),
            ("node01", 29400, Source::Torchrun)
        );
        // torchrun wins over the Slurm variables of the srun that started it.
        let p = place(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
            ("SLURM_PROCID", "0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.local_rank, p.local_world, p.source), (3, 3, 4, Source::Torchrun));
    }

    #[test]
    fn torchrun_mistakes_name_the_variable() {
        let e = place(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.message.starts_with("MASTER_ADDR is not set") && e.message.contains("tessera launch"), "{e}");
        let e = place(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.message.contains("rank 4 is not below the world size 4"), "{e}");
        let e = place(&[("RANK", "x"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err();
        assert_eq!(e.message, "RANK=x is not a whole number");
        let e =
            place(&[("RANK", "0"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")]).unwrap_err();
        assert!(e.message.contains("MASTER_PORT=70000 is not a TCP port"), "{e}");
        let e = place(&[("RANK", "0"), ("WORLD_SIZE", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "9")]).unwrap_err();
        assert!(e.message.contains("WORLD_SIZE=0"), "{e}");
    }

    #[test]
    fn slurm_variables() {
        let p = place(&[
            ("SLURM_PROCID", "6"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_NODEID", "1"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank, p.local_world, p.node), (6, 8, 2, 4, Some(1)));
        assert_eq!(
            (p.master_addr.as_deref().unwrap_or(""), p.master_port, p.source),
            ("gpu07", DEFAULT_PORT, Source::Slurm)
        );
        // MASTER_ADDR and MASTER_PORT override the node list and the default port.
        let p = place(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NTASKS_PER_NODE", "2"),
            ("SLURM_JOB_NODELIST", "a,b"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "12345"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((p.master_addr.as_deref().unwrap_or(""), p.master_port, p.local_world), ("10.0.0.1", 12345, 2));
        let e = place(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")]).unwrap_err();
        assert!(e.message.contains("SLURM_NTASKS_PER_NODE"), "{e}");
    }

    #[test]
    fn mpi_variables() {
        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ];
        let p = place(&ompi).unwrap().unwrap();
        assert_eq!(p.master_addr, None, "MPI connects its ranks without a store");
        let mut with_addr = ompi.to_vec();
        with_addr.push(("MASTER_ADDR", "n0"));
        let p = place(&with_addr).unwrap().unwrap();
        assert_eq!((p.rank, p.world, p.local_rank, p.local_world, p.source), (3, 4, 1, 2, Source::Mpi));
        assert_eq!(p.master_addr.as_deref(), Some("n0"));
        let p = place(&[("PMI_RANK", "2"), ("PMI_SIZE", "3"), ("MASTER_ADDR", "n0")]).unwrap().unwrap();
        assert_eq!((p.rank, p.world, p.local_rank, p.local_world), (2, 3, 2, 3));
    }

    #[test]
    fn slurm_task_counts() {
        assert_eq!(tasks_on_node("4(x2),3", 0), Some(4));
        assert_eq!(tasks_on_node("4(x2),3", 1), Some(4));
        assert_eq!(tasks_on_node("4(x2),3", 2), Some(3));
        assert_eq!(tasks_on_node("4(x2),3", 3), None);
        assert_eq!(tasks_on_node("2", 0), Some(2));
        assert_eq!(tasks_on_node("x", 0), None);
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(first_host("node01").as_deref(), Some("node01"));
        assert_eq!(first_host("gpu[07-09,12],login1").as_deref(), Some("gpu07"));
        assert_eq!(first_host("gpu[12,07-09]").as_deref(), Some("gpu12"));
        assert_eq!(first_host("rack[1-2]-n[01-04],x").as_deref(), Some("rack1-n01"));
        assert_eq!(first_host("a,b[1-3]").as_deref(), Some("a"));
        assert_eq!(first_host("bad[x-y]"), None);
        assert_eq!(first_host("bad[1-2"), None);
        assert_eq!(first_host(""), None);
    }
}
