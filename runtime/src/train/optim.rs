//! Optimizer state and learning-rate schedules with warmup. The update
//! itself (clipping by global norm, then AdamW or SGD with momentum) is an
//! IR graph (`compiler::autodiff::update`) that the lowering puts in every
//! rank's program. Weight decay applies to matrices and embeddings, not to
//! biases and norm gains (`Param::decays`).

use crate::tensor::Tensor;
use tessera_compiler::autodiff::update::UpdateParam;
use tessera_compiler::config::{Amount, LrSchedule, Optimizer, Train};
use tessera_compiler::ir::Param;

#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub optimizer: Optimizer,
    /// First moments (AdamW) or momentum buffers (SGD).
    pub m: Vec<Tensor<f32>>,
    /// Second moments (AdamW).
    pub v: Vec<Tensor<f32>>,
    /// The dynamic loss scale (`precision = fp16`).
    pub scaler: Option<LossScaler>,
    /// Steps whose update was skipped (an overflow under loss scaling, or
    /// `nonfinite = skip`): Adam's bias correction counts only the others.
    pub skipped: u64,
}

/// Where dynamic loss scaling stands (`precision = fp16`); saved with the
/// optimizer state, so that a resumed run scales as the run would have.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    /// The scale of the next step.
    pub scale: f64,
    /// Steps in a row whose gradients were finite.
    pub good_steps: u64,
}

impl LossScaler {
    pub fn new(s: &tessera_compiler::config::LossScaling) -> LossScaler {
        LossScaler { scale: s.initial, good_steps: 0 }
    }

    /// After a step at `self.scale`: its gradients overflowed (the step was
    /// skipped; the scale halves) or not (`window` good steps in a row
    /// double it). `Err` with the scale when it would fall below 1: then
    /// the gradients are not finite at any scale worth using.
    pub fn update(&mut self, overflowed: bool, window: u64) -> Result<(), f64> {
        if overflowed {
            self.good_steps = 0;
            if self.scale / 2.0 < 1.0 {
                return Err(self.scale);
            }
            self.scale /= 2.0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= window {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        }
        Ok(())
    }
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
        OptimizerState {
            optimizer: optimizer.clone(),
            m: params.iter().map(zeros).collect(),
            v,
            scaler: None,
            skipped: 0,
        }
    }
}

fn steps_of(a: Amount, tokens_per_step: u64) -> f64 {
    match a {
        Amount::Steps(s) => s,
        Amount::Tokens(t) => t / tokens_per_step.max(1) as f64,
    }
}

/// The learning rate of update `step` (from 0): linear warmup, then constant,
/// linear or cosine decay to `min × peak` over `decay` (default: the run),
/// or the inverse square root of the step (the peak × √(warmup / (step + 1))).
pub fn learning_rate(train: &Train, step: u64, tokens_per_step: u64, run_steps: u64) -> f64 {
    let peak = train.optimizer.lr();
    let s = step as f64;
    if let LrSchedule::InverseSqrt { warmup, linear_warmup } = &train.schedule {
        let warmup = steps_of(*warmup, tokens_per_step);
        return match s < warmup {
            true if *linear_warmup => peak * (s + 1.0) / warmup,
            true => peak,
            false => peak * (warmup.max(1.0) / (s + 1.0)).sqrt(),
        };
    }
    let (warmup, decay, min, kind) = match &train.schedule {
        LrSchedule::InverseSqrt { .. } => unreachable!("returned above"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_compiler::config::{Amount, LrSchedule};

    fn train(schedule: LrSchedule) -> Train {
        let mut sources = tessera_compiler::SourceMap::new();
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../specs/tiny/gpt.spec"));
        let m = tessera_compiler::check_path(&mut sources, path, &Default::default()).expect("the tiny GPT checks");
        Train { schedule, ..m.train.expect("a train section") }
    }

    /// Inverse square root: linear warmup to the peak at the last warmup
    /// step (or the peak held through it), then the peak × √(warmup /
    /// (step + 1)): half the peak at four times the warmup, a tenth at a
    /// hundred times.
    #[test]
    fn inverse_sqrt_warms_up_then_decays_as_one_over_the_root_of_the_step() {
        let t = train(LrSchedule::InverseSqrt { warmup: Amount::Steps(100.0), linear_warmup: true });
        let peak = t.optimizer.lr();
        let lr = |step| learning_rate(&t, step, 1, 1_000_000);
        assert!((lr(0) - peak / 100.0).abs() < 1e-15 * peak);
        assert!((lr(49) - peak / 2.0).abs() < 1e-12 * peak);
        assert!((lr(99) - peak).abs() < 1e-12 * peak);
        assert!((lr(399) - peak / 2.0).abs() < 1e-12 * peak);
        assert!((lr(9_999) - peak / 10.0).abs() < 1e-12 * peak);
        // Warmup in tokens: 6,400 tokens of 64 a step are the same 100 steps.
        let tokens = train(LrSchedule::InverseSqrt { warmup: Amount::Tokens(6_400.0), linear_warmup: true });
        assert_eq!(learning_rate(&tokens, 399, 64, 1), lr(399));
        // T5's and Switch's form holds the peak through the warmup.
        let held = train(LrSchedule::InverseSqrt { warmup: Amount::Steps(100.0), linear_warmup: false });
        assert_eq!(learning_rate(&held, 0, 1, 1), peak);
        assert_eq!(learning_rate(&held, 99, 1, 1), peak);
        assert_eq!(learning_rate(&held, 399, 1, 1), lr(399));
    }
}
