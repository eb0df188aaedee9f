//! A spec's `weights FORMAT for MODEL` mapping applied to a file: which of
//! the file's tensors holds which parameter slice, in which layout. Import
//! scatters each tensor into its slice; export gathers it back, so export
//! then import is the identity.

use super::{WeightFile, WeightsError};
use crate::tensor::Tensor;
use tessera_compiler::ir::Param;
use tessera_compiler::model::{MapRule, MapTarget, WeightMap};

/// One tensor of a mapped checkpoint: its name, its shape (outermost
/// first), and the parameter slice it holds.
#[derive(Debug, Clone)]
pub struct Placed<'a> {
    pub name: String,
    pub shape: Vec<u64>,
    pub rule: &'a MapRule,
    pub target: &'a MapTarget,
    /// The index along the parameter's `layer` dim, for stacked parameters.
    pub stack: Option<u64>,
}

/// Every tensor `map` names, one per layer for stacked parameters.
pub fn tensors<'a>(map: &'a WeightMap, params: &[Param]) -> Vec<Placed<'a>> {
    let mut out = Vec::new();
    for rule in &map.rules {
        let Some(t) = &rule.target else { continue };
        let p = &params[t.param];
        let shape: Vec<u64> = t.layout.iter().map(|g| g.iter().map(|part| part.size).product()).collect();
        match p.ty.dims.first().filter(|d| d.name == "layer") {
            Some(stack) => {
                for i in 0..stack.size {
                    // The checkpoint numbers the layers that hold the parameter.
                    let layer = if p.layers.len() as u64 == stack.size { p.layers[i as usize] } else { i };
                    out.push(Placed {
                        name: rule.name_at(Some(layer)),
                        shape: shape.clone(),
                        rule,
                        target: t,
                        stack: Some(i),
                    });
                }
            }
            None => out.push(Placed { name: rule.name_at(None), shape, rule, target: t, stack: None }),
        }
    }
    out
}

/// The layout of `t` as it reads a parameter: for each element of the
/// checkpoint tensor, in its order, the parameter offset, as sizes and
/// strides of an odometer plus a base offset.
fn walk(p: &Param, t: &MapTarget, stack: Option<u64>) -> (Vec<u64>, Vec<u64>, u64) {
    let dims = &p.ty.dims;
    let mut strides = vec![1u64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1].size;
    }
    let mut base = stack.map(|s| s * strides[0]).unwrap_or(0);
    for &(d, i) in &t.picks {
        base += i * strides[d];
    }
    let (mut sizes, mut steps) = (Vec::new(), Vec::new());
    for part in t.layout.iter().flatten() {
        let step = strides[part.dim] * part.inner;
        match part.rope {
            // Stored as two halves [h, p] of the pairs (2p + h) that `rope` rotates.
            true => {
                sizes.extend([2, part.size / 2]);
                steps.extend([step, 2 * step]);
            }
            false => {
                sizes.push(part.size);
                steps.push(step);
            }
        }
    }
    (sizes, steps, base)
}

/// Calls `f(k, offset)` for each element `k` of the checkpoint tensor.
fn each(sizes: &[u64], steps: &[u64], base: u64, mut f: impl FnMut(usize, usize)) {
    let n: u64 = sizes.iter().product();
    let mut idx = vec![0u64; sizes.len()];
    let mut off = base;
    for k in 0..n as usize {
        f(k, off as usize);
        for j in (0..sizes.len()).rev() {
            idx[j] += 1;
            off += steps[j];
            if idx[j] < sizes[j] {
                break;
            }
            off -= steps[j] * sizes[j];
            idx[j] = 0;
        }
    }
}

/// Scatter a checkpoint tensor's values into its parameter slice.
pub fn scatter(p: &Param, placed: &Placed, values: &[f32], into: &mut [f32]) {
    let (sizes, steps, base) = walk(p, placed.target, placed.stack);
    each(&sizes, &steps, base, |k, off| into[off] = values[k]);
}

/// Gather a checkpoint tensor's values from its parameter slice.
pub fn gather(p: &Param, placed: &Placed, from: &[f32]) -> Vec<f32> {
    let (sizes, steps, base) = walk(p, placed.target, placed.stack);
    let mut out = vec![0.0; sizes.iter().product::<u64>() as usize];
    each(&sizes, &steps, base, |k, off| out[k] = from[off]);
    out
}

/// How well `map` fits the file: how many of its tensors the file has.
pub fn fit(map: &WeightMap, params: &[Param], file: &WeightFile) -> usize {
    tensors(map, params).iter().filter(|t| file.get(&t.name).is_some()).count()
}

/// The parameters `map` fills from `file`; `None` for the parameters the
/// mapping does not name. Every name and shape is checked before any
/// tensor is read: a tensor the mapping names must be there with its
/// shape, and a tensor of the file must be named or ignored by it.
pub fn import(file: &WeightFile, map: &WeightMap, params: &[Param]) -> Result<Vec<Option<Tensor<f32>>>, WeightsError> {
    let fail = |m: String| WeightsError::new(file.path(), m);
    let wanted = tensors(map, params);
    let mut missing = Vec::new();
    for t in &wanted {
        match file.get(&t.name) {
            None => missing.push(t.name.as_str()),
            Some(have) if have.shape != t.shape => {
                let p = &params[t.target.param];
                return Err(fail(format!(
                    "tensor `{}` is {} {:?}, but the spec's `weights {} for {}` maps it to `{}` ({}) as {:?}",
                    t.name, have.dtype, have.shape, map.format, map.model, p.path, p.ty, t.shape
                )));
            }
            Some(_) => {}
        }
    }
    let named: std::collections::HashSet<&str> = wanted.iter().map(|w| w.name.as_str()).collect();
    let extra: Vec<&str> = file
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !named.contains(n) && !map.rules.iter().any(|r| r.ignores(n)))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        let mut m = format!("its tensors do not fit the spec's `weights {} for {}`:", map.format, map.model);
        if !missing.is_empty() {
            m += &format!(" {} tensor(s) the mapping names are missing ({})", missing.len(), list(&missing));
        }
        if !extra.is_empty() {
            m += &format!(
                "{} {} tensor(s) are not in the mapping ({})",
                if missing.is_empty() { "" } else { ";" },
                extra.len(),
                list(&extra)
            );
        }
        m += ". Is this the model the spec describes? A tensor that is no parameter can be ignored with \
              `\"name\" = _` in the mapping";
        return Err(fail(m));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; params.len()];
    for t in &wanted {
        let p = &params[t.target.param];
        let values = file.read(&t.name)?;
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(fail(format!("tensor `{}` holds a value that is not finite (element {i})", t.name)));
        }
        let data = out[t.target.param].get_or_insert_with(|| vec![0.0; p.ty.numel() as usize]);
        scatter(p, t, &values, data);
    }
    Ok(out.into_iter().zip(params).map(|(d, p)| d.map(|data| Tensor { dims: p.ty.dims.clone(), data })).collect())
}

/// The checkpoint tensors `map` names, gathered from the logical weights
/// `weights` of `params`: (name, shape, values), in the mapping's order.
pub fn export(map: &WeightMap, params: &[Param], weights: &[Tensor<f32>]) -> Vec<(String, Vec<u64>, Vec<f32>)> {
    tensors(map, params)
        .into_iter()
        .map(|t| {
            let values = gather(&params[t.target.param], &t, &weights[t.target.param].data);
            (t.name, t.shape, values)
        })
        .collect()
}

pub(super) fn list(v: &[&str]) -> String {
    let shown: Vec<String> = v.iter().take(4).map(|n| format!("`{n}`")).collect();
    let more = if v.len() > 4 { format!(" and {} more", v.len() - 4) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}
