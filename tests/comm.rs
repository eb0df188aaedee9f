//! Collectives between simulated ranks: results against a serial reference,
//! uneven all-to-all, point to point, and the failure modes (timeout, a rank
//! that errors or panics, mismatched calls): every one ends, none hangs.

use std::time::{Duration, Instant};
use tessera::runtime::comm::{Communicator, Group, ReduceOp, World};

fn data(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (rank * 100 + i) as f32).collect()
}

#[test]
fn all_reduce_reduce_scatter_all_gather_match_the_serial_result() {
    let world = World::new(4, Duration::from_secs(10));
    let out = world
        .run(|c| {
            let all = Group::new("data", vec![0, 1, 2, 3]);
            // Two groups along another axis: {0, 2} and {1, 3}.
            let pair = Group::new("tensor", if c.rank() % 2 == 0 { vec![0, 2] } else { vec![1, 3] });
            let mut sum = data(c.rank(), 6);
            c.all_reduce(&all, &mut sum, ReduceOp::Sum).map_err(|e| e.to_string())?;
            let mut max = data(c.rank(), 3);
            c.all_reduce(&pair, &mut max, ReduceOp::Max).map_err(|e| e.to_string())?;
            let mut mine = vec![0.0; 2];
            c.reduce_scatter(&all, &data(c.rank(), 8), &mut mine, ReduceOp::Mean).map_err(|e| e.to_string())?;
            let mut gathered = vec![0.0; 8];
            c.all_gather(&all, &data(c.rank(), 2), &mut gathered).map_err(|e| e.to_string())?;
            c.barrier(&all).map_err(|e| e.to_string())?;
            Ok((sum, max, mine, gathered))
        })
        .expect("every rank succeeds");
    for (rank, (sum, max, mine, gathered)) in out.iter().enumerate() {
        let want_sum: Vec<f32> = (0..6).map(|i| (0..4).map(|r| (r * 100 + i) as f32).sum()).collect();
        assert_eq!(sum, &want_sum);
        let partner_max = if rank % 2 == 0 { 2 } else { 3 };
        assert_eq!(max, &data(partner_max, 3));
        let want_mine: Vec<f32> =
            (2 * rank..2 * rank + 2).map(|i| (0..4).map(|r| (r * 100 + i) as f32).sum::<f32>() / 4.0).collect();
        assert_eq!(mine, &want_mine);
        let want_gathered: Vec<f32> = (0..4).flat_map(|r| data(r, 2)).collect();
        assert_eq!(gathered, &want_gathered);
    }
}

#[test]
fn all_to_all_with_uneven_splits_and_point_to_point() {
    let world = World::new(3, Duration::from_secs(10));
    let out = world
        .run(|c| {
            let g = Group::new("expert", vec![0, 1, 2]);
            let r = c.rank();
            // Rank r sends (r + j) values to member j, each value 10·r + j.
            let counts: Vec<usize> = (0..3).map(|j| r + j).collect();
            let send: Vec<f32> = (0..3).flat_map(|j| std::iter::repeat_n((10 * r + j) as f32, r + j)).collect();
            let got = c.all_to_all(&g, &send, &counts).map_err(|e| e.to_string())?;
            // A ring of sends: r → r + 1.
            c.send((r + 1) % 3, 7, &[r as f32; 4]).map_err(|e| e.to_string())?;
            let mut buf = [0.0; 4];
            c.recv((r + 2) % 3, 7, &mut buf).map_err(|e| e.to_string())?;
            Ok((got, buf))
        })
        .expect("every rank succeeds");
    for (j, ((recv, counts), ring)) in out.iter().enumerate() {
        let want_counts: Vec<usize> = (0..3).map(|r| r + j).collect();
        assert_eq!(counts, &want_counts);
        let want: Vec<f32> = (0..3).flat_map(|r| std::iter::repeat_n((10 * r + j) as f32, r + j)).collect();
        assert_eq!(recv, &want);
        assert_eq!(ring, &[((j + 2) % 3) as f32; 4]);
    }
}

#[test]
fn a_missing_rank_times_out_with_rank_collective_group_and_step() {
    let world = World::new(3, Duration::from_millis(200));
    let start = Instant::now();
    let err = world
        .run(|c| {
            c.set_step(41);
            let g = Group::new("data", vec![0, 1, 2]);
            if c.rank() == 2 {
                // Rank 2 never joins (a program that skips a collective).
                return Ok(());
            }
            let mut buf = [1.0; 3];
            c.all_reduce(&g, &mut buf, ReduceOp::Sum).map_err(|e| e.to_string())
        })
        .expect_err("the collective cannot complete");
    assert!(start.elapsed() < Duration::from_secs(5), "no hang");
    for part in ["all_reduce", "data group [0, 1, 2]", "step 41", "timed out", "[2]"] {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
    assert!(err.starts_with("rank 0") || err.starts_with("rank 1"), "{err}");
}

#[test]
fn a_failing_or_panicking_rank_stops_every_rank_with_its_error() {
    for panics in [false, true] {
        let world = World::new(4, Duration::from_secs(30));
        let start = Instant::now();
        let err = world
            .run(|c| {
                c.set_step(3);
                let g = Group::new("data", vec![0, 1, 2, 3]);
                if c.rank() == 1 {
                    if panics {
                        panic!("out of memory in the MLP");
                    }
                    return Err("out of memory in the MLP".to_string());
                }
                // The others wait in a collective rank 1 never joins.
                let mut buf = [0.0; 2];
                c.all_reduce(&g, &mut buf, ReduceOp::Sum).map_err(|e| e.to_string())
            })
            .expect_err("rank 1 fails");
        assert!(start.elapsed() < Duration::from_secs(5), "the others stop at once, not at the 30 s timeout");
        assert!(err.contains("out of memory in the MLP"), "{err}");
        if panics {
            assert!(err.contains("panicked"), "{err}");
        }
    }
}

#[test]
fn mismatched_collectives_are_reported_not_hung() {
    let world = World::new(2, Duration::from_secs(30));
    let start = Instant::now();
    let err = world
        .run(|c| {
            let g = Group::new("tensor", vec![0, 1]);
            let mut buf = vec![0.0; 4 + c.rank()];
            c.all_reduce(&g, &mut buf, ReduceOp::Sum).map_err(|e| e.to_string())
        })
        .expect_err("the shapes differ");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(err.contains("does not match"), "{err}");
    assert!(err.contains("4 f32 values") && err.contains("5 f32 values"), "{err}");
}

#[test]
fn groups_along_mesh_axes_follow_the_rank_map() {
    use tessera::runtime::comm::group_along;
    // pipeline 2 × data 2 × tensor 2: tensor innermost, pipeline outermost.
    let order: Vec<(String, u64)> = [("pipe", 2), ("data", 2), ("tensor", 2)].map(|(a, s)| (a.to_string(), s)).to_vec();
    assert_eq!(group_along(&order, 5, "tensor").expect("axis").ranks, vec![4, 5]);
    assert_eq!(group_along(&order, 5, "data").expect("axis").ranks, vec![5, 7]);
    assert_eq!(group_along(&order, 5, "pipe").expect("axis").ranks, vec![1, 5]);
    assert!(group_along(&order, 5, "expert").is_none());
    // Every rank is in exactly one group per axis, and the groups tile the world.
    for axis in ["pipe", "data", "tensor"] {
        let groups: std::collections::BTreeSet<Vec<usize>> =
            (0..8).map(|r| group_along(&order, r, axis).expect("axis").ranks).collect();
        assert_eq!(groups.len(), 4, "{axis}: 8 ranks in groups of 2");
        let mut members: Vec<usize> = groups.iter().flatten().copied().collect();
        members.sort_unstable();
        assert_eq!(members, (0..8).collect::<Vec<_>>(), "{axis}: each rank once");
    }
}
