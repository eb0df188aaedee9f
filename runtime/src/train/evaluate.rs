//! Evaluation as a lowered program: the model's forward pass on one device
//! (`driver::compile_eval`), dropout off, run on the CPU backend from the
//! logical weights. The validation loss of any layout is this one program's,
//! so it is comparable across layouts.

use crate::backend::{
    self, Backend,
    cpu::{Cpu, Engine},
};
use crate::tensor::Tensor;
use tessera_compiler::Model;
use tessera_compiler::autodiff::Backward;
use tessera_compiler::driver::{self, Passes};
use tessera_compiler::lower::{BufId, Program};

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
    /// Compile `m`'s evaluation program and allocate its regions.
    pub fn new(m: &Model, backward: &Backward, engine: Engine) -> Result<Evaluator, String> {
        let program = driver::compile_eval(m, backward, Passes::default()).map_err(|e| e.to_string())?;
        let mut cpu = Cpu::with_engine(engine);
        cpu.alloc(program.sizes)?;
        cpu.prepare(&program)?;
        let inputs = (0..m.inputs.len()).map(|i| program.named(&format!("x{i}.mb0"))).collect();
        let weights = (0..m.params.len()).map(|k| program.named(&format!("w.{k}"))).collect();
        let loss = program.named("loss").ok_or("the evaluation program has no `loss` buffer")?;
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
