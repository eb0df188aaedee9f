//! Ranks as processes: where a process's rank comes from (`env`: torchrun's,
//! Slurm's or MPI's variables), where the ranks meet (`store`: a TCP store
//! rank 0 hosts at `MASTER_ADDR:MASTER_PORT`), and `tessera launch`
//! (`agent`: this machine's ranks started and watched as torchrun does).
//!
//! These carry no tensors. A transport between processes (NCCL's
//! communicator, MPI's) starts from what the ranks agree on here: NCCL's
//! unique id is created by rank 0 and shared through the store.

pub mod agent;
pub mod env;
pub mod store;

pub use env::{Placement, Source};
pub use store::{Store, StoreError};

use std::time::Duration;

/// Join the store of `p`'s world and wait until every rank has joined (a
/// rank that gives up tells the others why).
pub fn rendezvous(p: &Placement, timeout: Duration) -> Result<Store, StoreError> {
    let Some(host) = &p.master_addr else {
        return Err(StoreError::Setup(
            "MASTER_ADDR is not set; under mpirun the ranks meet at rank 0's host: pass it with `mpirun -x \
             MASTER_ADDR=HOST` (Open MPI) or `-genv MASTER_ADDR HOST` (MPICH)"
                .into(),
        ));
    };
    let mut store = Store::join_round(host, p.master_port, p.rank, p.world, p.round, timeout)?;
    match store.barrier("join") {
        Ok(()) => Ok(store),
        Err(e) => {
            store.abort(&e.to_string());
            Err(e)
        }
    }
}

/// The value every rank agrees on under `key`: rank 0 makes it (a
/// transport's unique id) and sets it, the others wait for it.
pub fn agree(store: &mut Store, key: &str, make: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if store.rank() == 0 {
        let v = make();
        store.set(key, &v)?;
        Ok(v)
    } else {
        store.get(key)
    }
}

/// `n` bytes from the operating system's random source (a run id).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: writes at most `n - filled` bytes into `b` from `filled`.
        let got = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if got <= 0 {
            // No getrandom (very old kernels): fall back to time and pid.
            let seed =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
                    ^ ((std::process::id() as u128) << 64);
            for (i, x) in b[filled..].iter_mut().enumerate() {
                *x = (seed >> ((i % 16) * 8)) as u8;
            }
            break;
        }
        filled += got as usize;
    }
    b
}
