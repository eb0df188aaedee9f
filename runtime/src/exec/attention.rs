//! Attention forward and backward, one query row at a time: the only score
//! storage is one row of `kv_seq` probabilities, recomputed in the backward
//! pass as flash attention does. Grouped-query attention maps query head `h`
//! to key/value head `h / (heads / kv_heads)`.

use crate::tensor::{Real, Tensor, aligned_strides, for_each_offset, r};
use tessera_compiler::model::Dim;

pub struct Attn<'a, T> {
    pub q: &'a Tensor<T>,
    pub k: &'a Tensor<T>,
    pub v: &'a Tensor<T>,
    pub mask: Option<&'a Tensor<T>>,
    pub causal: bool,
    pub window: Option<u64>,
}

struct Shape {
    l: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    dv: usize,
}

impl<T: Real> Attn<'_, T> {
    fn shape(&self) -> Shape {
        let (q, k, v) = (&self.q.dims, &self.k.dims, &self.v.dims);
        let n = q.len();
        let m = k.len();
        Shape {
            l: q[..n - 3].iter().map(|d| d.size as usize).product(),
            sq: q[n - 3].size as usize,
            hq: q[n - 2].size as usize,
            d: q[n - 1].size as usize,
            sk: k[m - 3].size as usize,
            hk: k[m - 2].size as usize,
            dv: v[m - 1].size as usize,
        }
    }

    /// Mask offsets: one base per lead index, then strides for (query, key, head).
    fn mask_index(&self) -> Option<(Vec<usize>, [usize; 3])> {
        let m = self.mask?;
        let n = self.q.dims.len();
        let lead: Vec<Dim> = self.q.dims[..n - 3].to_vec();
        let mut bases = Vec::new();
        for_each_offset(&lead, &aligned_strides(&m.dims, &lead), |o| bases.push(o));
        let kdims = &self.k.dims;
        let names = [self.q.dims[n - 3].clone(), kdims[kdims.len() - 3].clone(), self.q.dims[n - 2].clone()];
        let s = aligned_strides(&m.dims, &names);
        // In self-attention queries and keys share the dim name; a mask's
        // `seq` then means the key position (a padding mask).
        let q_stride = if names[0].name == names[1].name { 0 } else { s[0] };
        Some((bases, [q_stride, s[1], s[2]]))
    }

    /// Probabilities of query row (l, i, h) over the keys, or None if all are masked.
    fn row(
        &self,
        s: &Shape,
        mi: &Option<(Vec<usize>, [usize; 3])>,
        l: usize,
        i: usize,
        h: usize,
        p: &mut [f64],
    ) -> bool {
        let scale = 1.0 / (s.d as f64).sqrt();
        let hk = h / (s.hq / s.hk).max(1);
        let shift = s.sk as i64 - s.sq as i64;
        let qo = ((l * s.sq + i) * s.hq + h) * s.d;
        let mut max = f64::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate() {
            let end = i as i64 + shift;
            let mut ok = !self.causal || j as i64 <= end;
            if let Some(w) = self.window {
                ok &= j as i64 > end - w as i64;
            }
            if let (Some(m), Some((bases, st))) = (self.mask, mi) {
                ok &= m.data[bases[l] + i * st[0] + j * st[1] + h * st[2]] != T::zero();
            }
            if !ok {
                *pj = f64::NEG_INFINITY;
                continue;
            }
            let ko = ((l * s.sk + j) * s.hk + hk) * s.d;
            let mut dot = 0.0;
            for c in 0..s.d {
                dot += self.q.data[qo + c].to_f64().unwrap_or(0.0) * self.k.data[ko + c].to_f64().unwrap_or(0.0);
            }
            *pj = dot * scale;
            max = max.max(*pj);
        }
        if max == f64::NEG_INFINITY {
            return false;
        }
        let mut sum = 0.0;
        for pj in p.iter_mut() {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        for pj in p.iter_mut() {
            *pj /= sum;
        }
        true
    }

    pub fn forward(&self, out_dims: &[Dim]) -> Tensor<T> {
        let s = self.shape();
        let mi = self.mask_index();
        let mut out = Tensor::zeros(out_dims);
        let mut p = vec![0.0; s.sk];
        let group = (s.hq / s.hk).max(1);
        for l in 0..s.l {
            for i in 0..s.sq {
                for h in 0..s.hq {
                    if !self.row(&s, &mi, l, i, h, &mut p) {
                        continue;
                    }
                    let oo = ((l * s.sq + i) * s.hq + h) * s.dv;
                    for (j, pj) in p.iter().enumerate() {
                        let vo = ((l * s.sk + j) * s.hk + h / group) * s.dv;
                        for c in 0..s.dv {
                            out.data[oo + c] += r::<T>(*pj) * self.v.data[vo + c];
                        }
                    }
                }
            }
        }
        out
    }

    /// The gradient with respect to q (`which` = 0), k (1) or v (2).
    pub fn backward(&self, g: &Tensor<T>, which: u8) -> Tensor<T> {
        let s = self.shape();
        let mi = self.mask_index();
        let scale = 1.0 / (s.d as f64).sqrt();
        let group = (s.hq / s.hk).max(1);
        let dims = match which {
            0 => &self.q.dims,
            1 => &self.k.dims,
            _ => &self.v.dims,
        };
        let mut out = vec![0.0f64; dims.iter().map(|d| d.size as usize).product()];
        let f = |t: &Tensor<T>, i: usize| t.data[i].to_f64().unwrap_or(0.0);
        let mut p = vec![0.0; s.sk];
        let mut o = vec![0.0; s.dv];
        for l in 0..s.l {
            for i in 0..s.sq {
                for h in 0..s.hq {
                    if !self.row(&s, &mi, l, i, h, &mut p) {
                        continue;
                    }
                    let hk = h / group;
                    let go = ((l * s.sq + i) * s.hq + h) * s.dv;
                    // o_i and D_i = dO_i · o_i
                    o.iter_mut().for_each(|x| *x = 0.0);
                    for (j, pj) in p.iter().enumerate() {
                        let vo = ((l * s.sk + j) * s.hk + hk) * s.dv;
                        for (c, oc) in o.iter_mut().enumerate() {
                            *oc += pj * f(self.v, vo + c);
                        }
                    }
                    let dd: f64 = (0..s.dv).map(|c| f(g, go + c) * o[c]).sum();
                    let qo = ((l * s.sq + i) * s.hq + h) * s.d;
                    for (j, pj) in p.iter().enumerate() {
                        if *pj == 0.0 {
                            continue;
                        }
                        let vo = ((l * s.sk + j) * s.hk + hk) * s.dv;
                        let ko = ((l * s.sk + j) * s.hk + hk) * s.d;
                        if which == 2 {
                            for c in 0..s.dv {
                                out[vo + c] += pj * f(g, go + c);
                            }
                            continue;
                        }
                        let dp: f64 = (0..s.dv).map(|c| f(g, go + c) * f(self.v, vo + c)).sum();
                        let ds = pj * (dp - dd) * scale;
                        for c in 0..s.d {
                            if which == 0 {
                                out[qo + c] += ds * f(self.k, ko + c);
                            } else {
                                out[ko + c] += ds * f(self.q, qo + c);
                            }
                        }
                    }
                }
            }
        }
        Tensor { dims: dims.clone(), data: out.into_iter().map(r).collect() }
    }
}
