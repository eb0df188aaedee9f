//! Optimizer state, learning-rate schedules with warmup, and the global
//! gradient norm. The update itself (clipping by global norm, then AdamW or
//! SGD with momentum) is an IR graph (`compiler::autodiff::update`) that the
//! interpreter runs. Weight decay applies to matrices and embeddings, not to
//! biases and norm gains (`Param::decays`).

use crate::tensor::Tensor;
use tessera_compiler::autodiff::update::{UpdateParam, update_graph};
use tessera_compiler::config::{Amount, LrSchedule, Optimizer, Train};
use tessera_compiler::model::Param;

#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub optimizer: Optimizer,
    /// First moments (AdamW) or momentum buffers (SGD).
    pub m: Vec<Tensor<f32>>,
    /// Second moments (AdamW).
    pub v: Vec<Tensor<f32>>,
    /// The update graph, built on first use (per clipping setting and
    /// whether the norm is given).
    graph: Option<((Option<f64>, bool), tessera_compiler::ir::Graph)>,
}

impl OptimizerState {
    pub fn new(params: &[Param], optimizer: &Optimizer) -> OptimizerState {
        let shapes: Vec<_> = params.iter().map(UpdateParam::of).collect();
        Self::for_shapes(&shapes, optimizer)
    }

    /// State for tensors of these shapes (a rank's shards of the parameters).
    pub fn for_shapes(params: &[UpdateParam], optimizer: &Optimizer) -> OptimizerState {
        let zeros = |p: &UpdateParam| Tensor::zeros(&p.dims);
        let v = match optimizer {
            Optimizer::Adamw { .. } => params.iter().map(zeros).collect(),
            Optimizer::Sgd { .. } => Vec::new(),
        };
        OptimizerState { optimizer: optimizer.clone(), m: params.iter().map(zeros).collect(), v, graph: None }
    }

    /// Apply one update with learning rate `lr` (`t` counts updates from 1),
    /// clipping the gradients' global norm to `clip` first, by running the
    /// update graph.
    pub fn update(
        &mut self,
        params: &mut [Tensor<f32>],
        grads: &[Tensor<f32>],
        meta: &[Param],
        lr: f64,
        t: u64,
        clip: Option<f64>,
    ) {
        let shapes: Vec<_> = meta.iter().map(UpdateParam::of).collect();
        self.update_with(params, grads, &shapes, lr, t, clip, None)
    }

    /// [`update`](Self::update) on tensors of these shapes; `sumsq`, when
    /// given, is the global sum of squared gradients that clipping uses (a
    /// rank holds only its shards, so the sum comes from every rank).
    #[allow(clippy::too_many_arguments)]
    pub fn update_with(
        &mut self,
        params: &mut [Tensor<f32>],
        grads: &[Tensor<f32>],
        shapes: &[UpdateParam],
        lr: f64,
        t: u64,
        clip: Option<f64>,
        sumsq: Option<f64>,
    ) {
        let key = (clip, sumsq.is_some());
        if self.graph.as_ref().is_none_or(|(k, _)| *k != key) {
            self.graph = Some((key, update_graph(shapes, &self.optimizer, clip, sumsq.is_some())));
        }
        let (b1, b2) = match self.optimizer {
            Optimizer::Adamw { beta1, beta2, .. } => (beta1, beta2),
            Optimizer::Sgd { .. } => (0.0, 0.0),
        };
        let hyper = Tensor {
            dims: vec![tessera_compiler::model::Dim::new("hyper", 3)],
            data: vec![lr as f32, (1.0 - b1.powi(t as i32)) as f32, (1.0 - b2.powi(t as i32)) as f32],
        };
        // The parameters and moments move into the update and come back new.
        let mut inputs = Vec::with_capacity(4 * params.len() + 1);
        for (k, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let dims = p.dims.clone();
            inputs.push(std::mem::take(p));
            inputs.push(g.clone());
            inputs.push(std::mem::take(&mut self.m[k]));
            inputs.push(self.v.get_mut(k).map(std::mem::take).unwrap_or_else(|| Tensor::zeros(&dims)));
        }
        inputs.push(hyper);
        if let Some(s) = sumsq {
            inputs.push(Tensor::scalar(s as f32));
        }
        let graph = &self.graph.as_ref().expect("built above").1;
        let name = |kind: &str, k: usize| graph.output(&format!("{kind}.{k}")).expect("update output");
        let needed: Vec<_> = (0..params.len())
            .flat_map(|k| {
                let v = (!self.v.is_empty()).then(|| name("v", k));
                [Some(name("param", k)), Some(name("m", k)), v].into_iter().flatten()
            })
            .collect();
        let mut vals = crate::exec::Interpreter { graph, params: &[], dropout: None, comm: None }
            .run_owned(inputs, &[], Some(&needed))
            .expect("the update graph runs on tensors of the parameters' own types");
        // Move each output out, unless another name still needs the same value.
        let mut left: std::collections::HashMap<usize, usize> = Default::default();
        for id in &needed {
            *left.entry(id.index()).or_default() += 1;
        }
        let mut out = |kind: &str, k: usize| {
            let i = name(kind, k).index();
            let n = left.get_mut(&i).expect("a needed output");
            *n -= 1;
            if *n == 0 { std::mem::take(&mut vals[i]) } else { vals[i].clone() }
        };
        for (k, p) in params.iter_mut().enumerate() {
            *p = out("param", k);
            self.m[k] = out("m", k);
            if !self.v.is_empty() {
                self.v[k] = out("v", k);
            }
        }
    }
}

/// The global L2 norm of the gradients.
pub fn global_norm(grads: &[Tensor<f32>]) -> f64 {
    // f64 sums over 8 lanes per tensor (vectorizes), then across tensors.
    let sq = |g: &Tensor<f32>| {
        let mut acc = [0f64; 8];
        let chunks = g.data.chunks_exact(8);
        let rest: f64 = chunks.remainder().iter().map(|x| (*x as f64) * (*x as f64)).sum();
        for c in chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += (*x as f64) * (*x as f64);
            }
        }
        acc.iter().sum::<f64>() + rest
    };
    grads.iter().map(sq).sum::<f64>().sqrt()
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
