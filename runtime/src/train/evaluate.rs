//! Evaluation as a lowered program: the model's forward pass on one device
//! (`Training::eval`), dropout off, run on the CPU backend from the
//! logical weights. The validation loss of any layout is this one program's,
//! so it is comparable across layouts.

use crate::backend::{
    self, Backend,
    cpu::{Cpu, Engine},
};
use crate::tensor::Tensor;
use tessera_compiler::driver::Training;
use tessera_compiler::lower::{Bound, BufId, Program};

pub struct Evaluator {
    program: Program,
    cpu: Cpu,
    /// Model input `i`'s buffer (`None`: the forward pass does not read it).
    inputs: Vec<Option<BufId>>,
    /// Parameter `k`'s weights (`None`: the forward pass does not read them).
    weights: Vec<Option<BufId>>,
    loss: BufId,
}

impl Evaluator {
    /// Allocate the regions of `t`'s evaluation program.
    pub fn new(t: &Training, engine: Engine) -> Result<Evaluator, String> {
        let program = t.eval.clone();
        let mut cpu = Cpu::with_engine(engine);
        cpu.alloc(program.sizes)?;
        cpu.prepare(&program)?;
        let inputs = (0..t.step.inputs.len()).map(|i| program.bound(Bound::Input(i, 0))).collect();
        let weights = (0..t.step.params.len()).map(|k| program.bound(Bound::Weight(k))).collect();
        let loss = program.bound(Bound::Loss).ok_or("the evaluation program has no `loss` buffer")?;
        Ok(Evaluator { program, cpu, inputs, weights, loss })
    }

    /// Take the logical weights `params`.
    pub fn load(&mut self, params: &[Tensor<f32>]) -> Result<(), String> {
        for (w, t) in self.weights.iter().zip(params) {
            if let Some(w) = w {
                self.cpu.upload(self.program.buffer(*w), &t.data)?;
            }
        }
        Ok(())
    }

    /// The loss of one microbatch at the loaded weights.
    pub fn loss(&mut self, inputs: &[Tensor<f32>]) -> Result<f64, String> {
        for (b, x) in self.inputs.iter().zip(inputs) {
            if let Some(b) = b {
                self.cpu.upload(self.program.buffer(*b), &x.data)?;
            }
        }
        backend::run(&mut self.cpu, &self.program, None, 0).map_err(|e| e.to_string())?;
        Ok(self.cpu.download(self.program.buffer(self.loss))?[0] as f64)
    }
}
