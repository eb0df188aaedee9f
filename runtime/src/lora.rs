//! LoRA adapters folded into their weights (`tessera merge`, and `tessera
//! export` of a run with adapters): W ← W + (alpha / rank) · A·B, layer by
//! layer for stacked weights, A·B permuted from (A's input dims, B's output
//! dims) to W's own dim order.

use crate::tensor::Tensor;
use tessera_compiler::Model;
use tessera_compiler::ir::Param;

/// The model's parameters without its adapters: the weights a merged
/// checkpoint holds.
pub fn base_params(m: &Model) -> Vec<Param> {
    m.params.iter().filter(|p| p.adapter_of.is_none()).cloned().collect()
}

/// The weights of [`base_params`] with every adapter pair folded in;
/// `weights` are the model's logical weights, adapters included.
pub fn merged(m: &Model, weights: &[Tensor<f32>]) -> Result<Vec<Tensor<f32>>, String> {
    if weights.len() != m.params.len() {
        return Err(format!("{} tensors for {} parameters", weights.len(), m.params.len()));
    }
    let scale = m.train.as_ref().and_then(|t| t.lora.as_ref()).map(|l| l.alpha / l.rank as f64);
    let mut out: Vec<Tensor<f32>> = Vec::new();
    for (k, p) in m.params.iter().enumerate() {
        if p.adapter_of.is_some() {
            continue;
        }
        let mut w = weights[k].clone();
        let pair: Vec<usize> = (0..m.params.len()).filter(|&j| m.params[j].adapter_of == Some(k)).collect();
        if let [a, b] = pair[..] {
            let scale = scale.ok_or("adapters without `train.lora`")?;
            fold(&mut w, p, (&m.params[a], &weights[a]), (&m.params[b], &weights[b]), scale)?;
        }
        out.push(w);
    }
    Ok(out)
}

/// W += scale · A·B for one adapted weight.
fn fold(
    w: &mut Tensor<f32>,
    p: &Param,
    a: (&Param, &Tensor<f32>),
    b: (&Param, &Tensor<f32>),
    scale: f64,
) -> Result<(), String> {
    let dims = &p.ty.dims;
    let stacked = dims.first().is_some_and(|d| d.name == "layer");
    let own = |t: &Param| -> Vec<(String, u64)> {
        t.ty.dims.iter().filter(|d| d.name != "layer").map(|d| (d.name.clone(), d.size)).collect()
    };
    let (ad, bd) = (own(a.0), own(b.0));
    let rank = ad.last().ok_or("an adapter without dims")?.1 as usize;
    let input: Vec<(String, u64)> = ad[..ad.len() - 1].to_vec();
    let output: Vec<(String, u64)> = bd[1..].to_vec();
    let (ni, no) =
        (input.iter().map(|d| d.1).product::<u64>() as usize, output.iter().map(|d| d.1).product::<u64>() as usize);
    // Strides of W's own dims, to place A·B's (input..., output...) elements.
    let mut stride = vec![1u64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * dims[i + 1].size;
    }
    let at = |name: &str| -> Result<u64, String> {
        dims.iter().position(|d| d.name == name).map(|i| stride[i]).ok_or(format!("`{}` has no dim `{name}`", p.path))
    };
    let steps: Vec<(u64, u64)> =
        input.iter().chain(&output).map(|(n, s)| at(n).map(|st| (*s, st))).collect::<Result<_, _>>()?;
    let layers = if stacked { dims[0].size as usize } else { 1 };
    let (per_a, per_b, per_w) = (ni * rank, rank * no, (w.data.len() / layers));
    for l in 0..layers {
        let (aa, bb) = (&a.1.data[l * per_a..(l + 1) * per_a], &b.1.data[l * per_b..(l + 1) * per_b]);
        for i in 0..ni {
            for o in 0..no {
                let mut s = 0f64;
                for r in 0..rank {
                    s += aa[i * rank + r] as f64 * bb[r * no + o] as f64;
                }
                // The element (i, o) of A·B as W's offset: i and o unravelled over their dims.
                let (mut off, mut rest) = (0u64, (i * no + o) as u64);
                for &(size, st) in steps.iter().rev() {
                    off += (rest % size) * st;
                    rest /= size;
                }
                let e = &mut w.data[l * per_w + off as usize];
                *e = (*e as f64 + scale * s) as f32;
            }
        }
    }
    Ok(())
}
