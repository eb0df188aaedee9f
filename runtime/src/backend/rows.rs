//! Row kernels on the CPU: the passes of a row kernel
//! ([`tessera_compiler::kernel::rows`]) with the walk of each, and the
//! row reductions between them, in the IR's fixed order
//! (`exec::fast::sum`, which the unfused row functions share).

use super::interp::Nest;
use tessera_compiler::ir::ReduceOp;
use tessera_compiler::kernel::Kernel;
use tessera_compiler::kernel::rows::RowPlan;

/// A row kernel's passes, each with its loop nest as the walk sees it.
pub struct Plan {
    pub plan: RowPlan,
    pub nests: Vec<Nest>,
}

impl Plan {
    pub fn of(k: &Kernel) -> Result<Plan, String> {
        let plan = RowPlan::of(k)?;
        let nests = plan.passes.iter().map(|p| Nest::of(&p.kernel)).collect();
        Ok(Plan { plan, nests })
    }
}

/// Reduce each `len`-long row of `values` into `out`.
pub fn reduce(op: ReduceOp, values: &[f32], len: usize, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(values.chunks(len.max(1))) {
        *o = match op {
            ReduceOp::Max => crate::exec::fast::max(row),
            ReduceOp::Sum | ReduceOp::Mean => crate::exec::fast::sum(row),
        };
    }
}
