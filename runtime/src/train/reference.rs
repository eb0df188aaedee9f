//! The reference step: the oracle the tests check the lowered programs
//! against, never a way to train. It evaluates the single-device backward
//! graph node by node on heap tensors (`exec::Interpreter`, no fusion, no
//! arena), sums each microbatch's gradients in microbatch order, takes the
//! global norm in f64 and runs the optimizer's update graph on whole
//! tensors. `tessera train` and `tessera bench` run lowered programs only
//! ([`super::ranks`]).

use super::optim::OptimizerState;
use crate::exec::{ExecError, Interpreter};
use crate::tensor::Tensor;
use tessera_compiler::autodiff::update::{UpdateParam, update_graph};
use tessera_compiler::driver::Compiled;
use tessera_compiler::ir::{Dim, Param};

/// The mean loss and the mean parameter gradients over `micro` microbatches
/// at weights `params` (the single-device backward graph of `c`); dropout
/// masks come from `dropout` as in the step.
pub fn gradients(
    c: &Compiled,
    params: &[Tensor<f32>],
    dropout: Option<u64>,
    micro: u64,
    inputs: &dyn Fn(u64) -> Vec<Tensor<f32>>,
) -> Result<(f64, Vec<Tensor<f32>>), ExecError> {
    let bw = &c.backward;
    let interp = Interpreter { graph: &bw.graph, params: &c.params, dropout, comm: None };
    // Only the loss and the gradients are read back.
    let needed: Vec<_> = std::iter::once(bw.loss).chain(bw.param_grads.iter().map(|g| g.grad)).collect();
    let mut loss = 0.0;
    let mut sum: Vec<Tensor<f32>> = Vec::new();
    for k in 0..micro.max(1) {
        let vals = interp.run_for(&inputs(k), params, Some(&needed))?;
        loss += vals[bw.loss.index()].data[0] as f64;
        let g = crate::exec::param_grads(&c.params, &bw.param_grads, &vals);
        if sum.is_empty() {
            sum = g;
        } else {
            for (a, b) in sum.iter_mut().zip(&g) {
                a.data.iter_mut().zip(&b.data).for_each(|(x, y)| *x += *y);
            }
        }
    }
    let n = micro.max(1);
    if n > 1 {
        let scale = 1.0 / n as f32;
        sum.iter_mut().for_each(|g| g.data.iter_mut().for_each(|x| *x *= scale));
    }
    Ok((loss / n as f64, sum))
}

/// The global L2 norm of the gradients (f64 sums).
pub fn global_norm(grads: &[Tensor<f32>]) -> f64 {
    grads.iter().flat_map(|g| &g.data).map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt()
}

/// One update of the logical `params` and `opt` with learning rate `lr`
/// (`t` counts updates from 1), clipping the global norm to `clip` first:
/// the update graph of `compiler::autodiff::update`, node by node.
#[allow(clippy::too_many_arguments)]
pub fn update(
    meta: &[Param],
    opt: &mut OptimizerState,
    params: &mut [Tensor<f32>],
    grads: &[Tensor<f32>],
    lr: f64,
    t: u64,
    clip: Option<f64>,
) {
    let shapes: Vec<_> = meta.iter().map(UpdateParam::of).collect();
    let update = update_graph(&shapes, &opt.optimizer, clip, false);
    let graph = &update.graph;
    let mut inputs = vec![Tensor::zeros(&[]); update.hyper + 1];
    for (k, (p, g)) in params.iter().zip(grads).enumerate() {
        let made = &update.outputs[k];
        inputs[made.input] = p.clone();
        inputs[made.input + 1] = g.clone();
        for &(role, i, _) in &made.state {
            inputs[i] = opt.get(k, role).expect("the state the optimizer keeps").clone();
        }
    }
    inputs[update.hyper] = Tensor { dims: vec![Dim::new("hyper", 3)], data: opt.optimizer.hyper(lr, t).to_vec() };
    let vals = Interpreter { graph, params: &[], dropout: None, comm: None }
        .run(&inputs, &[])
        .expect("the update graph runs on tensors of the parameters' own types");
    for (k, (p, made)) in params.iter_mut().zip(&update.outputs).enumerate() {
        *p = vals[made.weights.index()].clone();
        for &(role, _, v) in &made.state {
            *opt.get_mut(k, role).expect("kept") = vals[v.index()].clone();
        }
    }
}

/// What a reference step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub loss: f64,
    pub grad_norm: f64,
}

/// One whole training step on one device: [`gradients`], [`global_norm`]
/// and [`update`] with the norm clipped to `clip` (skipped when the norm is
/// not finite, as the program's guard does).
#[allow(clippy::too_many_arguments)]
pub fn step(
    c: &Compiled,
    clip: Option<f64>,
    params: &mut [Tensor<f32>],
    opt: &mut OptimizerState,
    dropout: Option<u64>,
    micro: u64,
    inputs: &dyn Fn(u64) -> Vec<Tensor<f32>>,
    lr: f64,
    t: u64,
) -> Result<Step, ExecError> {
    let (loss, grads) = gradients(c, params, dropout, micro, inputs)?;
    let grad_norm = global_norm(&grads);
    if grad_norm.is_finite() {
        update(&c.params, opt, params, &grads, lr, t, clip);
    }
    Ok(Step { loss, grad_norm })
}
