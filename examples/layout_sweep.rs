//! Which layouts of GPT-3 175B fit 1024 A100 80GB? Sweeps tensor × pipeline
//! degrees through the checker (data parallelism takes the rest of the world)
//! and prints each layout's verdict: fits (with the worst rank's memory) or
//! the first diagnostic. Run: `cargo run --release --example layout_sweep`.

use std::path::Path;
use tessera::compiler::{Options, SourceMap, check_path, cost::memory};

fn main() {
    let spec = Path::new("specs/models/gpt3-175b.spec");
    let world = 1024;
    println!("{:>6} {:>8} {:>6}  verdict", "tensor", "pipeline", "data");
    for tensor in [1, 2, 4, 8, 16] {
        for pipeline in [1, 2, 4, 8, 16, 32] {
            let data = world / (tensor * pipeline);
            let overrides = vec![
                format!("parallel.mesh.tensor={tensor}"),
                format!("parallel.mesh.pipeline={pipeline}"),
                format!("parallel.mesh.data={data}"),
            ];
            let mut sources = SourceMap::new();
            // The checker, then whether every rank fits `train.device` (as `tessera check` does).
            let checked = check_path(&mut sources, spec, &Options { overrides, model: None, micro_batch: None })
                .and_then(|m| tessera::compiler::driver::check_memory(&m).map(|()| m).map_err(Into::into));
            let verdict = match checked {
                Ok(m) => {
                    let (rank, worst) = memory::worst_rank(&memory::memory_per_rank(&m));
                    format!("fits: rank {rank} needs {:.1} GiB", worst.total as f64 / (1u64 << 30) as f64)
                }
                Err(d) => d.0.first().map(|d| d.message.clone()).unwrap_or_default(),
            };
            println!("{tensor:>6} {pipeline:>8} {data:>6}  {verdict}");
        }
    }
}
