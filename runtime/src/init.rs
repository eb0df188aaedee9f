//! Parameter initialisation from the spec's initializers, seeded and
//! reproducible (the same seed gives the same weights on every machine).

use crate::exec::kernels::uniform;
use crate::tensor::{Real, Tensor, r};
use tessera_compiler::ir::{Init, Param};

/// A standard normal sample from two reproducible uniforms (Box-Muller).
fn normal(seed: u64, stream: u64, i: u64) -> f64 {
    let u1 = uniform(seed, stream, 2 * i).max(1e-300);
    let u2 = uniform(seed, stream, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Initialise every parameter; parameter `k` draws from stream `k`.
pub fn init_params<T: Real>(params: &[Param], seed: u64) -> Vec<Tensor<T>> {
    params.iter().enumerate().map(|(k, p)| init_param(p, k, seed)).collect()
}

/// Initialise parameter `k` alone (the same values as [`init_params`] gives it).
pub fn init_param<T: Real>(p: &Param, k: usize, seed: u64) -> Tensor<T> {
    let mut t = Tensor::zeros(&p.ty.dims);
    init_into(p, k, seed, &mut t.data);
    t
}

/// Write parameter `k`'s initial values (those of [`init_param`]) into
/// `out`, its elements in row-major order: a backend's own buffer, with no
/// copy of the parameter made on the way.
pub fn init_into<T: Real>(p: &Param, k: usize, seed: u64, out: &mut [T]) {
    let k = k as u64 + 1;
    let value = |i: usize| {
        let i = i as u64;
        r(match p.init {
            Init::Normal { std } => std * normal(seed, k, i),
            Init::TruncatedNormal { std } => {
                // Resample (deterministically) until within two standard deviations.
                let mut j = 0;
                loop {
                    let z = normal(seed, k ^ (j << 40), i);
                    if z.abs() <= 2.0 || j > 64 {
                        break std * z.clamp(-2.0, 2.0);
                    }
                    j += 1;
                }
            }
            Init::Uniform { low, high } => low + (high - low) * uniform(seed, k, i),
            Init::Zeros => 0.0,
            Init::Ones => 1.0,
            Init::Constant { value } => value,
        })
    };
    out.iter_mut().enumerate().for_each(|(i, o)| *o = value(i));
}
