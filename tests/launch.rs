//! Ranks as processes, without a GPU: `tessera launch` starts ranks that
//! meet at rank 0's TCP store, agree on an id and pass barriers; ranks
//! started by hand from torchrun's or Slurm's variables do the same; a rank
//! that dies or never comes is named by the others, and no process is left.

mod common;

use common::{children_of, free_port, text};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// Wait for `child` to exit, at most `within`; kill it and fail if it does not.
fn finish(mut child: Child, within: Duration) -> Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > within {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {within:?}:\n{}\n{}", text(&out.stdout), text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The lines `child` prints on stdout, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// Read lines until `n` of them contain `needle`; every line read.
fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while seen.iter().filter(|l: &&String| l.contains(needle)).count() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("waited for {n} lines with `{needle}`; got:\n{}", seen.join("\n")),
        }
    }
    seen
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only a running or sleeping process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn kill9(pid: u32) {
    let ok = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(ok.success());
}

#[test]
fn four_launched_ranks_meet_agree_on_an_id_and_pass_barriers() {
    let out = Command::new(TESSERA)
        .args(["launch", "--nproc-per-node", "4", "--", "comm-check", "--rounds", "5"])
        .output()
        .unwrap();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    let mut ids = Vec::new();
    for r in 0..4 {
        let line = so
            .lines()
            .find(|l| l.starts_with(&format!("[rank {r}] rank {r} of 4: local rank {r} of 4 on ")))
            .unwrap_or_else(|| panic!("no line of rank {r} in\n{so}"));
        ids.push(line.rsplit_once("run id ").unwrap().1.to_string());
    }
    assert_eq!(ids[0].len(), 32, "16 random bytes in hex: {}", ids[0]);
    assert!(ids.iter().all(|i| *i == ids[0]), "every rank has rank 0's id: {ids:?}");
    let ok = so.lines().find(|l| l.starts_with("[rank 0] comm-check ok: 4 ranks")).expect(&so);
    assert!(ok.contains(&ids[0]) && ok.contains("5 barriers"), "{ok}");
}

#[test]
fn a_killed_rank_stops_the_launch_and_no_process_is_left() {
    let mut launcher = Command::new(TESSERA)
        .args(["launch", "--nproc-per-node", "4", "--", "comm-check", "--rounds", "1", "--hold", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut launcher);
    wait_for(&rx, "comm-check ok", 1);
    let ranks = children_of(launcher.id());
    assert_eq!(ranks.len(), 4, "{ranks:?}");
    let victim = ranks.iter().find(|(_, r)| r.as_deref() == Some("2")).expect("rank 2").0;
    kill9(victim);
    let out = finish(launcher, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("error: rank 2 (pid {victim}) was killed by signal 9 (SIGKILL); stopped the other 3")),
        "{err}"
    );
    for (pid, rank) in ranks {
        assert!(!alive(pid), "rank {rank:?} (pid {pid}) outlived the launch");
    }
}

/// Start `world` ranks by hand (as srun does) with the variables `vars(rank)`.
fn by_hand(
    ranks: impl Iterator<Item = usize>,
    vars: impl Fn(usize) -> Vec<(String, String)>,
    args: &[&str],
) -> Vec<Child> {
    ranks
        .map(|r| {
            let mut c = Command::new(TESSERA);
            c.arg("comm-check").args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
            for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
                c.env_remove(k);
            }
            c.envs(vars(r)).spawn().unwrap()
        })
        .collect()
}

fn slurm(world: usize, port: u16) -> impl Fn(usize) -> Vec<(String, String)> {
    move |r| {
        [
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_NTASKS", world.to_string()),
            ("SLURM_LOCALID", r.to_string()),
            ("SLURM_NODEID", "0".into()),
            ("SLURM_TASKS_PER_NODE", world.to_string()),
            ("SLURM_JOB_NODELIST", "localhost".into()),
            ("MASTER_PORT", port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Start 4 ranks as srun would, wait until they hold, SIGKILL rank
/// `victim`; the others' exit codes and error output, by rank, and the
/// victim's pid.
fn srun_and_kill(victim: usize) -> (Vec<(usize, Option<i32>, String)>, u32) {
    let port = free_port();
    let mut ranks = by_hand(0..4, slurm(4, port), &["--rounds", "1", "--hold", "120"]);
    let rxs: Vec<_> = ranks.iter_mut().map(lines_of).collect();
    for (r, rx) in rxs.iter().enumerate() {
        wait_for(rx, &format!("rank {r} of 4: local rank {r} of 4"), 1);
    }
    // Every rank has passed the barriers and holds; rank 0's summary says
    // where they met: the first host of SLURM_JOB_NODELIST.
    let summary = wait_for(&rxs[0], "comm-check ok", 1);
    let met = format!("from Slurm's SLURM_PROCID and SLURM_NTASKS) met at localhost:{port}");
    assert!(summary.iter().any(|l| l.contains(&met)), "{summary:?}");
    let pid = ranks[victim].id();
    kill9(pid);
    let mut others = Vec::new();
    for (r, child) in ranks.into_iter().enumerate() {
        let out = finish(child, Duration::from_secs(30));
        if r != victim {
            others.push((r, out.status.code(), text(&out.stderr)));
        }
    }
    (others, pid)
}

#[test]
fn ranks_started_by_srun_stop_naming_a_rank_that_dies() {
    let (others, victim) = srun_and_kill(2);
    for (r, code, err) in others {
        assert_eq!(code, Some(1), "rank {r}: {err}");
        // In `hold`, or in the last barrier if the kill came first.
        assert!(err.contains(&format!("rank {r} stopped in `")), "rank {r}: {err}");
        assert!(err.contains(&format!("`: rank 2 (pid {victim} on ")), "rank {r}: {err}");
        assert!(err.contains("exited or was killed"), "{err}");
    }
}

#[test]
fn ranks_stop_naming_the_store_when_rank_0_dies() {
    let (others, _) = srun_and_kill(0);
    for (r, code, err) in others {
        assert_eq!(code, Some(1), "rank {r}: {err}");
        assert!(err.contains(&format!("rank {r}: the store at localhost:")), "rank {r}: {err}");
        assert!(err.contains("which rank 0 hosts, closed the connection during `"), "{err}");
        assert!(err.contains("`: rank 0 has exited or was killed"), "{err}");
    }
}

#[test]
fn a_rank_that_never_comes_is_named_when_the_others_time_out() {
    let port = free_port();
    let torchrun = |r: usize| {
        [
            ("RANK", r.to_string()),
            ("WORLD_SIZE", "3".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    // Ranks 0 and 2 start; rank 1 never does.
    let ranks = by_hand([0, 2].into_iter(), torchrun, &["--timeout", "2"]);
    for (r, child) in [0, 2].into_iter().zip(ranks) {
        let out = finish(child, Duration::from_secs(30));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        // Either it timed out itself, or the other rank timed out first and
        // its failure, relayed through the store, says the same.
        assert!(err.starts_with(&format!("error: rank {r}")), "{err}");
        assert!(
            err.contains("`barrier join` of the 3 ranks timed out after 2000 ms waiting for ranks [1] to arrive"),
            "{err}"
        );
    }
}

#[test]
fn two_launches_meet_as_two_nodes() {
    let master = format!("127.0.0.1:{}", free_port());
    let nodes: Vec<Child> = (0..2)
        .map(|node| {
            Command::new(TESSERA)
                .args(["launch", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", &node.to_string()])
                .args(["--master", &master, "--", "comm-check", "--rounds", "3"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = nodes.into_iter().map(|n| finish(n, Duration::from_secs(60))).collect();
    for (node, out) in outs.iter().enumerate() {
        let so = text(&out.stdout);
        assert!(out.status.success(), "node {node}: {so}\n{}", text(&out.stderr));
        for local in 0..2 {
            let r = node * 2 + local;
            assert!(so.contains(&format!("[rank {r}] rank {r} of 4: local rank {local} of 2 on ")), "{so}");
        }
    }
    assert!(
        text(&outs[0].stdout)
            .contains("comm-check ok: 4 ranks (from torchrun's RANK and WORLD_SIZE) met at 127.0.0.1:")
    );
}

#[test]
fn launch_mistakes_say_what_to_do() {
    let run = |args: &[&str]| {
        let o = Command::new(TESSERA).args(args).output().unwrap();
        (o.status.code(), text(&o.stderr))
    };
    let (code, err) = run(&["launch", "--nproc-per-node", "2", "--", "tessera", "train", "x.spec"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("leave out `tessera`: `tessera launch --nproc-per-node 4 -- train FILE`"), "{err}");
    let (code, err) = run(&["launch", "--nproc-per-node", "2", "--", "fmt", "x.spec"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("`fmt` cannot be launched: each rank runs a tessera command: one of train, bench, comm-check"),
        "{err}"
    );
    let (code, err) = run(&["launch", "--nproc-per-node", "2", "--nnodes", "2", "--", "comm-check"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--nnodes above 1 needs --master HOST:PORT"), "{err}");
    let (code, err) = run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "2",
        "--master",
        "h:1",
        "--",
        "comm-check",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--node-rank 2 is not below --nnodes 2"), "{err}");
    let (code, err) = run(&["launch", "--nproc-per-node", "2", "--master", "nohost", "--", "comm-check"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--master nohost: expected HOST:PORT"), "{err}");
    let (code, err) = run(&["launch", "--nproc-per-node", "0", "--", "comm-check"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected a whole number 1 or more"), "{err}");
    // A rank that fails on its own is reported with its last error lines.
    let (code, err) = run(&["launch", "--nproc-per-node", "2", "--", "train", "no/such.spec"]);
    assert_eq!(code, Some(1));
    // Both ranks fail alike; whichever exits first is reported.
    assert!(err.contains("exited with code 1; stopped the other"), "{err}");
    assert!(err.contains("'s last error output:\n  error: cannot read `no/such.spec`"), "{err}");
}

#[test]
fn train_under_a_launcher_stops_saying_what_is_missing() {
    let port = free_port().to_string();
    let train = |world: &str, set: &[&str]| {
        let o = Command::new(TESSERA)
            .args(["train", "specs/tiny/gpt.spec", "--steps", "1", "--collective-timeout", "2"])
            .args(set)
            .env("RANK", "0")
            .env("WORLD_SIZE", world)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .output()
            .unwrap();
        (o.status.code(), text(&o.stderr))
    };
    let (code, err) = train("2", &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("2 processes were launched (from torchrun's RANK and WORLD_SIZE), but the spec's mesh"),
        "{err}"
    );
    // A matching mesh, but rank 1 never comes: rank 0 names it after the timeout.
    let (code, err) = train("2", &["--set", "parallel.mesh.data=2", "--set", "parallel.layout.batch=data"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("timed out after 2000 ms waiting for ranks [1] to arrive"), "{err}");
    let (code, err) = train("x", &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("WORLD_SIZE=x is not a whole number"), "{err}");
}
