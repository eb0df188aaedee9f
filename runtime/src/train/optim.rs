//! Optimizers (AdamW, SGD with momentum), learning-rate schedules with
//! warmup, and gradient clipping by global norm.
//!
//! Weight decay applies to matrices and embeddings (parameters with two or
//! more dims besides `layer`), not to biases and norm gains (GPT-2/nanoGPT).

use crate::tensor::Tensor;
use tessera_compiler::config::{Amount, LrSchedule, Optimizer, Train};
use tessera_compiler::model::Param;

#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub optimizer: Optimizer,
    /// First moments (AdamW) or momentum buffers (SGD).
    pub m: Vec<Tensor<f32>>,
    /// Second moments (AdamW).
    pub v: Vec<Tensor<f32>>,
}

fn decays(p: &Param) -> bool {
    p.ty.dims.iter().filter(|d| d.name != "layer").count() >= 2
}

impl OptimizerState {
    pub fn new(params: &[Param], optimizer: &Optimizer) -> OptimizerState {
        let zeros = |p: &Param| Tensor::zeros(&p.ty.dims);
        let v = match optimizer {
            Optimizer::Adamw { .. } => params.iter().map(zeros).collect(),
            Optimizer::Sgd { .. } => Vec::new(),
        };
        OptimizerState { optimizer: optimizer.clone(), m: params.iter().map(zeros).collect(), v }
    }

    /// Apply one update with learning rate `lr`; `t` counts updates from 1.
    pub fn update(&mut self, params: &mut [Tensor<f32>], grads: &[Tensor<f32>], meta: &[Param], lr: f64, t: u64) {
        match self.optimizer.clone() {
            Optimizer::Adamw { beta1, beta2, eps, weight_decay, .. } => {
                let bc1 = 1.0 - beta1.powi(t as i32);
                let bc2 = 1.0 - beta2.powi(t as i32);
                for k in 0..params.len() {
                    let wd = if decays(&meta[k]) { weight_decay } else { 0.0 };
                    let (p, g, m, v) = (&mut params[k].data, &grads[k].data, &mut self.m[k].data, &mut self.v[k].data);
                    for i in 0..p.len() {
                        let gi = g[i] as f64;
                        let mi = beta1 * m[i] as f64 + (1.0 - beta1) * gi;
                        let vi = beta2 * v[i] as f64 + (1.0 - beta2) * gi * gi;
                        m[i] = mi as f32;
                        v[i] = vi as f32;
                        let upd = (mi / bc1) / ((vi / bc2).sqrt() + eps) + wd * p[i] as f64;
                        p[i] = (p[i] as f64 - lr * upd) as f32;
                    }
                }
            }
            Optimizer::Sgd { momentum, weight_decay, nesterov, .. } => {
                for k in 0..params.len() {
                    let wd = if decays(&meta[k]) { weight_decay } else { 0.0 };
                    let (p, g, m) = (&mut params[k].data, &grads[k].data, &mut self.m[k].data);
                    for i in 0..p.len() {
                        let gi = g[i] as f64 + wd * p[i] as f64;
                        let buf = momentum * m[i] as f64 + gi;
                        m[i] = buf as f32;
                        let d = if nesterov {
                            gi + momentum * buf
                        } else if momentum > 0.0 {
                            buf
                        } else {
                            gi
                        };
                        p[i] = (p[i] as f64 - lr * d) as f32;
                    }
                }
            }
        }
    }
}

/// Scale gradients so their global L2 norm is at most `clip`; returns the norm before clipping.
pub fn clip(grads: &mut [Tensor<f32>], clip: Option<f64>) -> f64 {
    let norm = grads.iter().flat_map(|g| g.data.iter()).map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    if let Some(c) = clip
        && norm > c
        && norm > 0.0
    {
        let s = (c / norm) as f32;
        for g in grads.iter_mut() {
            g.data.iter_mut().for_each(|x| *x *= s);
        }
    }
    norm
}

fn steps_of(a: Amount, tokens_per_step: u64) -> f64 {
    match a {
        Amount::Steps(s) => s,
        Amount::Tokens(t) => t / tokens_per_step.max(1) as f64,
    }
}

/// The learning rate of update `step` (from 0): linear warmup, then constant,
/// linear or cosine decay to `min × peak` over `decay` (default: the run).
pub fn learning_rate(train: &Train, step: u64, tokens_per_step: u64, run_steps: u64) -> f64 {
    let peak = train.optimizer.lr();
    let s = step as f64;
    let (warmup, decay, min, kind) = match &train.schedule {
        LrSchedule::Constant { warmup } => (steps_of(*warmup, tokens_per_step), None, 1.0, 0),
        LrSchedule::Linear { warmup, decay, min } => (steps_of(*warmup, tokens_per_step), *decay, *min, 1),
        LrSchedule::Cosine { warmup, decay, min } => (steps_of(*warmup, tokens_per_step), *decay, *min, 2),
    };
    if s < warmup {
        return peak * (s + 1.0) / warmup.max(1.0);
    }
    if kind == 0 {
        return peak;
    }
    let total = decay.map(|d| steps_of(d, tokens_per_step)).unwrap_or(run_steps as f64).max(warmup + 1.0);
    let frac = ((s - warmup) / (total - warmup)).clamp(0.0, 1.0);
    let shape = if kind == 1 { 1.0 - frac } else { 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()) };
    peak * (min + (1.0 - min) * shape)
}
