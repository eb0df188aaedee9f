//! Optimizer state and learning-rate schedules with warmup. The update
//! itself (clipping by global norm, then AdamW or SGD with momentum) is an
//! IR graph (`compiler::autodiff::update`) that the lowering puts in every
//! rank's program. Weight decay applies to matrices and embeddings, not to
//! biases and norm gains (`Param::decays`).

use crate::tensor::Tensor;
use tessera_compiler::autodiff::update::UpdateParam;
use tessera_compiler::config::{Amount, LrSchedule, Optimizer, StateRole, Train};
use tessera_compiler::ir::Param;

#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub optimizer: Optimizer,
    /// Per parameter, its state tensors as [`Optimizer::state`] gives them
    /// (AdamW's moments, SGD's momentum, Adafactor's factored moments).
    pub state: Vec<Vec<(StateRole, Tensor<f32>)>>,
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
    /// Overflows still allowed before the scale halves (`hysteresis`,
    /// restored each time the scale grows; 0 in checkpoints that predate it).
    #[serde(default)]
    pub hysteresis_left: u64,
}

impl LossScaler {
    pub fn new(s: &tessera_compiler::config::LossScaling) -> LossScaler {
        LossScaler { scale: s.initial, good_steps: 0, hysteresis_left: s.hysteresis }
    }

    /// After a step at `self.scale`, as Megatron's `DynamicGradScaler`: its
    /// gradients overflowed (the step was skipped; the `hysteresis`-th
    /// overflow since the scale last grew halves it, not below `min`) or
    /// not (`window` good steps in a row double it and restore the
    /// hysteresis). `Err` with the scale when an overflow would halve a
    /// scale already at `min`: the gradients are not finite at any scale
    /// the run allows.
    pub fn update(&mut self, overflowed: bool, s: &tessera_compiler::config::LossScaling) -> Result<(), f64> {
        if overflowed {
            self.good_steps = 0;
            self.hysteresis_left = self.hysteresis_left.saturating_sub(1);
            if self.hysteresis_left == 0 {
                if self.scale <= s.min {
                    return Err(self.scale);
                }
                self.scale = (self.scale / 2.0).max(s.min);
            }
        } else {
            self.good_steps += 1;
            if self.good_steps >= s.window {
                self.scale *= 2.0;
                self.good_steps = 0;
                self.hysteresis_left = s.hysteresis;
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

    /// Zero state for tensors of these shapes (a rank's cuts of the parameters).
    pub fn for_shapes(params: &[UpdateParam], optimizer: &Optimizer) -> OptimizerState {
        let state = params
            .iter()
            .map(|p| p.state(optimizer).into_iter().map(|(role, dims)| (role, Tensor::zeros(&dims))).collect())
            .collect();
        OptimizerState { optimizer: optimizer.clone(), state, scaler: None, skipped: 0 }
    }

    /// Parameter `k`'s state tensor `role`, if it keeps one.
    pub fn get(&self, k: usize, role: StateRole) -> Option<&Tensor<f32>> {
        self.state.get(k)?.iter().find(|s| s.0 == role).map(|s| &s.1)
    }

    pub fn get_mut(&mut self, k: usize, role: StateRole) -> Option<&mut Tensor<f32>> {
        self.state.get_mut(k)?.iter_mut().find(|s| s.0 == role).map(|s| &mut s.1)
    }
}

/// An amount of training in steps: tokens are `seq`-token sequences, and
/// a batch ramp-up's smaller steps take more of them.
fn steps_of(a: Amount, train: &Train, seq: u64) -> f64 {
    match a {
        Amount::Steps(s) => s,
        Amount::Tokens(t) => train.steps_for(t / seq.max(1) as f64),
    }
}

/// The learning rate of update `step` (from 0): linear warmup, then constant,
/// linear or cosine decay to `min × peak` over `decay` (default: the run),
/// or the inverse square root of the step (the peak × √(warmup / (step + 1))).
/// Amounts in tokens count `seq`-token sequences, through the batch ramp-up.
pub fn learning_rate(train: &Train, step: u64, seq: u64, run_steps: u64) -> f64 {
    let peak = train.optimizer.lr();
    let s = step as f64;
    if let LrSchedule::InverseSqrt { warmup, linear_warmup } = &train.schedule {
        let warmup = steps_of(*warmup, train, seq);
        return match s < warmup {
            true if *linear_warmup => peak * ((s + 1.0) / warmup).min(1.0),
            true => peak,
            false => peak * (warmup.max(1.0) / (s + 1.0)).sqrt(),
        };
    }
    let (warmup, decay, min, kind) = match &train.schedule {
        LrSchedule::InverseSqrt { .. } => unreachable!("returned above"),
        LrSchedule::Constant { warmup } => (steps_of(*warmup, train, seq), None, 1.0, 0),
        LrSchedule::Linear { warmup, decay, min } => (steps_of(*warmup, train, seq), *decay, *min, 1),
        LrSchedule::Cosine { warmup, decay, min } => (steps_of(*warmup, train, seq), *decay, *min, 2),
    };
    if s < warmup {
        return peak * ((s + 1.0) / warmup.max(1.0)).min(1.0);
    }
    if kind == 0 {
        return peak;
    }
    let total = decay.map(|d| steps_of(d, train, seq)).unwrap_or(run_steps as f64).max(warmup + 1.0);
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
        // Warmup in tokens: 6,400 tokens of 64 a step (the batch of 8 sequences of 8) are the same 100 steps.
        let tokens = train(LrSchedule::InverseSqrt { warmup: Amount::Tokens(6_400.0), linear_warmup: true });
        assert_eq!(tokens.batch, 8);
        assert_eq!(learning_rate(&tokens, 399, 8, 1), lr(399));
        // T5's and Switch's form holds the peak through the warmup.
        let held = train(LrSchedule::InverseSqrt { warmup: Amount::Steps(100.0), linear_warmup: false });
        assert_eq!(learning_rate(&held, 0, 1, 1), peak);
        assert_eq!(learning_rate(&held, 99, 1, 1), peak);
        assert_eq!(learning_rate(&held, 399, 1, 1), lr(399));
    }

    /// The loss scaler's rule, by hand: hysteresis 1 (PyTorch's GradScaler)
    /// halves at every overflow; hysteresis 2 (Megatron's default) at the
    /// second since the scale last grew; never below the floor, and an
    /// overflow at the floor is an error.
    #[test]
    fn loss_scaler_follows_hysteresis_and_floor() {
        use tessera_compiler::config::LossScaling;
        let run = |s: LossScaling, flags: &[bool]| -> Vec<Result<f64, f64>> {
            let mut l = LossScaler::new(&s);
            flags.iter().map(|&o| l.update(o, &s).map(|_| l.scale)).collect()
        };
        let one = LossScaling { initial: 8.0, window: 2, min: 1.0, hysteresis: 1 };
        let (o, g) = (true, false);
        assert_eq!(run(one, &[o, g, g, o, o]), [Ok(4.0), Ok(4.0), Ok(8.0), Ok(4.0), Ok(2.0)]);
        let two = LossScaling { hysteresis: 2, ..one };
        // Two overflows halve; a third halves again; growth restores the hysteresis.
        assert_eq!(run(two, &[o, o, o, g, g, o, o]), [Ok(8.0), Ok(4.0), Ok(2.0), Ok(2.0), Ok(4.0), Ok(4.0), Ok(2.0)]);
        let floor = LossScaling { min: 2.0, ..one };
        assert_eq!(run(floor, &[o, o, o]), [Ok(4.0), Ok(2.0), Err(2.0)]);
    }

    /// Under a batch ramp-up, amounts in tokens are reached in more, smaller
    /// steps: a warmup of 24 sequences of 16 tokens ends within step 8 of
    /// batches 2, 2, 2, 2, 4, 4, 6, 6 (24 sequences after 7⅓ steps), not at
    /// step 3 of the full batch of 8.
    #[test]
    fn token_amounts_follow_the_batch_rampup() {
        let warmup = Amount::Tokens(24.0 * 16.0);
        let flat = train(LrSchedule::Linear { warmup, decay: Some(Amount::Steps(1000.0)), min: 0.0 });
        let ramp = Some(tessera_compiler::config::Rampup { start: 2, increment: 2, samples: 24 });
        let ramped = Train { rampup: ramp, ..flat.clone() };
        assert_eq!(ramped.batch, 8);
        assert_eq!((0..9).map(|s| ramped.batch_at(s).0).collect::<Vec<_>>(), [2, 2, 2, 2, 4, 4, 6, 6, 8]);
        assert!((ramped.steps_for(24.0) - (6.0 + 8.0 / 6.0)).abs() < 1e-12);
        let peak = flat.optimizer.lr();
        let (a, b) = (|s| learning_rate(&flat, s, 16, 1000), |s| learning_rate(&ramped, s, 16, 1000));
        assert_eq!(a(2), peak, "the full batch warms up in 3 steps");
        assert!((b(2) - peak * 3.0 / (6.0 + 8.0 / 6.0)).abs() < 1e-12 * peak);
        assert!(b(6) < peak && b(7) == peak, "the ramp-up's warmup ends in step 8");
    }
}
