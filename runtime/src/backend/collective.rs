//! A lowered program's bucket collectives (`Kind::Collective`) on a
//! communicator: how a bucket's buffers become one call's values and the
//! call's result becomes its outputs, the same for every backend and for
//! both streams. Backends only read the inputs and write the outputs
//! ([`super::Backend::download`], [`super::Backend::upload`]).

use crate::comm::{self, CommError, Communicator, Group};
use tessera_compiler::ir::ReduceOp;
use tessera_compiler::lower::Collective;

/// Run bucket collective `op` on `group`: `inputs` are the elements of its
/// input buffers, `outs` the element counts of its output buffers; the
/// result is each output's elements.
pub fn perform(
    c: &mut dyn Communicator,
    group: &Group,
    op: &Collective,
    inputs: &[Vec<f32>],
    outs: &[usize],
) -> Result<Vec<Vec<f32>>, CommError> {
    let n = group.ranks.len();
    let rank = c.rank();
    let usage = |message: String| CommError::Usage { rank, message };
    match op {
        Collective::AllReduce { op } => {
            let op = match op {
                ReduceOp::Sum => comm::ReduceOp::Sum,
                ReduceOp::Mean => comm::ReduceOp::Mean,
                ReduceOp::Max => comm::ReduceOp::Max,
            };
            let mut data: Vec<f32> = inputs.concat();
            c.all_reduce(group, &mut data, op)?;
            split(&data, outs).ok_or_else(|| usage(format!("an all-reduce of {} values into {outs:?}", data.len())))
        }
        Collective::ReduceScatter => {
            // Each input's flat elements, padded to the group size, in rank-chunk order.
            if inputs.len() != outs.len() {
                return Err(usage(format!("a reduce-scatter of {} inputs into {} outputs", inputs.len(), outs.len())));
            }
            let mut send = Vec::with_capacity(outs.iter().sum::<usize>() * n);
            for r in 0..n {
                for (x, &per) in inputs.iter().zip(outs) {
                    send.extend((r * per..(r + 1) * per).map(|j| x.get(j).copied().unwrap_or(0.0)));
                }
            }
            let mut out = vec![0f32; send.len() / n.max(1)];
            c.reduce_scatter(group, &send, &mut out, comm::ReduceOp::Sum)?;
            split(&out, outs).ok_or_else(|| usage(format!("a reduce-scatter of {} values into {outs:?}", out.len())))
        }
        Collective::AllGather => {
            let input: Vec<f32> = inputs.concat();
            let mut all = vec![0f32; input.len() * n];
            c.all_gather(group, &input, &mut all)?;
            // Output k is input k of every member, in group order (cut to the output's size).
            let mut at = 0;
            let mut result = Vec::with_capacity(outs.len());
            for (k, &size) in outs.iter().enumerate() {
                let per = inputs.get(k).map_or(0, Vec::len);
                let mut whole = Vec::with_capacity(per * n);
                for member in all.chunks(input.len().max(1)) {
                    whole.extend_from_slice(&member[at..at + per]);
                }
                if whole.len() < size {
                    return Err(usage(format!("an all-gather of {} values into an output of {size}", whole.len())));
                }
                whole.truncate(size);
                result.push(whole);
                at += per;
            }
            Ok(result)
        }
    }
}

/// `data` cut into consecutive pieces of `sizes` elements, if it holds exactly that many.
fn split(data: &[f32], sizes: &[usize]) -> Option<Vec<Vec<f32>>> {
    if data.len() != sizes.iter().sum::<usize>() {
        return None;
    }
    let mut at = 0;
    Some(
        sizes
            .iter()
            .map(|&n| {
                at += n;
                data[at - n..at].to_vec()
            })
            .collect(),
    )
}
