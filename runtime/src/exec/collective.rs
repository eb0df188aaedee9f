//! The collective ops of per-rank programs (`all_reduce`, `all_gather`,
//! `reduce_scatter`, `all_to_all`) and `select`, over a rank's
//! [`RankComm`]. Values cross the communicator as f32 (the precision of
//! training); each op lays its dim out as the flat buffers of the
//! [`Communicator`](crate::comm::Communicator) calls need.

use crate::comm::{self, RankComm};
use crate::tensor::{Real, Tensor, r};
use tessera_compiler::ir::Dim;
use tessera_compiler::ir::ReduceOp;

fn to_f32<T: Real>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32().unwrap_or(f32::NAN)).collect()
}

fn from_f32<T: Real>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| r::<T>(v as f64)).collect()
}

/// (elements before `dim`, size of `dim`, elements after `dim`).
fn around(dims: &[Dim], dim: &str) -> Result<(usize, usize, usize), String> {
    let at = dims.iter().position(|d| d.name == dim).ok_or_else(|| format!("no dim `{dim}`"))?;
    let outer = dims[..at].iter().map(|d| d.size as usize).product();
    let inner = dims[at + 1..].iter().map(|d| d.size as usize).product();
    Ok((outer, dims[at].size as usize, inner))
}

/// The slices `indices` of `dim`, in that order.
pub fn select<T: Real>(x: &Tensor<T>, dim: &str, indices: &[u64]) -> Result<Tensor<T>, String> {
    let (outer, n, inner) = around(&x.dims, dim)?;
    if let Some(i) = indices.iter().find(|&&i| i as usize >= n) {
        return Err(format!("index {i} out of range for `{dim}` of size {n}"));
    }
    let mut data = Vec::with_capacity(outer * indices.len() * inner);
    for o in 0..outer {
        for &i in indices {
            let at = (o * n + i as usize) * inner;
            data.extend_from_slice(&x.data[at..at + inner]);
        }
    }
    let dims = x.dims.iter().map(|d| if d.name == dim { Dim::new(dim, indices.len() as u64) } else { d.clone() });
    Ok(Tensor { dims: dims.collect(), data })
}

/// Tensors equal in every dim but `dim`, concatenated along it.
fn concat<T: Real>(parts: &[Tensor<T>], dim: &str) -> Result<Tensor<T>, String> {
    let first = parts.first().ok_or("nothing to concatenate")?;
    let (outer, _, inner) = around(&first.dims, dim)?;
    let sizes: Vec<usize> = parts.iter().map(|p| around(&p.dims, dim).map(|(_, n, _)| n)).collect::<Result<_, _>>()?;
    let total: usize = sizes.iter().sum();
    let mut data = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (p, &n) in parts.iter().zip(&sizes) {
            data.extend_from_slice(&p.data[o * n * inner..(o + 1) * n * inner]);
        }
    }
    let dims = first.dims.iter().map(|d| if d.name == dim { Dim::new(dim, total as u64) } else { d.clone() });
    Ok(Tensor { dims: dims.collect(), data })
}

fn comm_err(e: comm::CommError) -> String {
    e.to_string()
}

pub fn all_reduce<T: Real>(c: &RankComm, x: &Tensor<T>, axis: &str, op: ReduceOp) -> Result<Tensor<T>, String> {
    let mut buf = to_f32(&x.data);
    let op = match op {
        ReduceOp::Sum => comm::ReduceOp::Sum,
        ReduceOp::Mean => comm::ReduceOp::Mean,
        ReduceOp::Max => comm::ReduceOp::Max,
    };
    c.with("all_reduce", axis, |comm, group| comm.all_reduce(group, &mut buf, op)).map_err(comm_err)?;
    Ok(Tensor { dims: x.dims.clone(), data: from_f32(&buf) })
}

pub fn all_gather<T: Real>(c: &RankComm, x: &Tensor<T>, axis: &str, dim: &str) -> Result<Tensor<T>, String> {
    let n = c.group(axis).map_err(comm_err)?.ranks.len();
    let input = to_f32(&x.data);
    let mut out = vec![0f32; input.len() * n];
    c.with("all_gather", axis, |comm, group| comm.all_gather(group, &input, &mut out)).map_err(comm_err)?;
    let parts: Vec<Tensor<T>> = out
        .chunks(input.len().max(1))
        .take(n)
        .map(|chunk| Tensor { dims: x.dims.clone(), data: from_f32(chunk) })
        .collect();
    concat(&parts, dim)
}

pub fn reduce_scatter<T: Real>(c: &RankComm, x: &Tensor<T>, axis: &str, dim: &str) -> Result<Tensor<T>, String> {
    let n = c.group(axis).map_err(comm_err)?.ranks.len();
    let (_, size, _) = around(&x.dims, dim)?;
    if size % n != 0 {
        return Err(format!("`{dim}` of size {size} does not split over {n} ranks"));
    }
    let chunk = size / n;
    // Member i's chunk of `dim`, contiguous, member after member.
    let mut input = Vec::with_capacity(x.numel());
    for i in 0..n {
        let idx: Vec<u64> = (i * chunk..(i + 1) * chunk).map(|k| k as u64).collect();
        input.extend(to_f32(&select(x, dim, &idx)?.data));
    }
    let mut out = vec![0f32; x.numel() / n.max(1)];
    c.with("reduce_scatter", axis, |comm, group| comm.reduce_scatter(group, &input, &mut out, comm::ReduceOp::Sum))
        .map_err(comm_err)?;
    let dims = x.dims.iter().map(|d| if d.name == dim { Dim::new(dim, chunk as u64) } else { d.clone() });
    Ok(Tensor { dims: dims.collect(), data: from_f32(&out) })
}

pub fn all_to_all<T: Real>(
    c: &RankComm,
    x: &Tensor<T>,
    axis: &str,
    split: &str,
    concat_dim: &str,
    chunks: &[Vec<u64>],
) -> Result<Tensor<T>, String> {
    let me = c.index(axis).map_err(comm_err)?;
    let mine = chunks.get(me).ok_or("no chunk for this rank")?.len() as u64;
    let mut send = Vec::with_capacity(x.numel());
    let mut counts = Vec::with_capacity(chunks.len());
    for idx in chunks {
        let part = select(x, split, idx)?;
        counts.push(part.numel());
        send.extend(to_f32(&part.data));
    }
    let (data, got) =
        c.with("all_to_all", axis, |comm, group| comm.all_to_all(group, &send, &counts)).map_err(comm_err)?;
    // Each sender's part has this rank's slices of `split` and its own share of `concat`.
    around(&x.dims, concat_dim)?;
    let unit: usize = x
        .dims
        .iter()
        .map(|d| match d.name.as_str() {
            n if n == split => mine as usize,
            n if n == concat_dim => 1,
            _ => d.size as usize,
        })
        .product();
    let mut parts = Vec::with_capacity(got.len());
    let mut at = 0;
    for n in got {
        let dims = x
            .dims
            .iter()
            .map(|d| match d.name.as_str() {
                s if s == split => Dim::new(split, mine),
                s if s == concat_dim => Dim::new(concat_dim, (n / unit.max(1)) as u64),
                _ => d.clone(),
            })
            .collect();
        parts.push(Tensor { dims, data: from_f32(&data[at..at + n]) });
        at += n;
    }
    concat(&parts, concat_dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_and_concat_are_inverse() {
        let x = Tensor::<f32> {
            dims: vec![Dim::new("a", 2), Dim::new("e", 4), Dim::new("b", 3)],
            data: (0..24).map(|v| v as f32).collect(),
        };
        let lo = select(&x, "e", &[0, 1]).unwrap();
        let hi = select(&x, "e", &[2, 3]).unwrap();
        assert_eq!(concat(&[lo, hi], "e").unwrap(), x);
        let odd = select(&x, "e", &[3, 1]).unwrap();
        assert_eq!(odd.data[..3], [9.0, 10.0, 11.0]);
        assert_eq!(odd.data[3..6], [3.0, 4.0, 5.0]);
    }
}
