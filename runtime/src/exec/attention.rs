//! Attention forward and backward, flash-style: scores exist only for a block
//! of at most `BLOCK` queries at a time (per thread), and the backward pass
//! recomputes them. The products are GEMMs on strided views of q, k and v (no
//! transposes). Work is split across threads by (lead index, kv head), so
//! grouped-query heads that share a key/value head accumulate in one thread.

use super::kernels::gemm_strided;
use crate::tensor::{Real, Tensor, View, aligned_strides, for_each_offset};
use tessera_compiler::ir::Dim;
use tessera_compiler::ir::{Op, RelPos};

const BLOCK: usize = 64;

pub struct Attn<'a, T> {
    pub q: View<'a, T>,
    pub k: View<'a, T>,
    pub v: View<'a, T>,
    pub mask: Option<View<'a, T>>,
    pub causal: bool,
    pub window: Option<u64>,
    /// Dropout on the probabilities: (p, seed, forward node). Element
    /// (l, h, i, j) is dropped when `uniform(seed, node, index)` < p, so the
    /// backward pass regenerates the forward mask without storing it.
    pub dropout: Option<(f64, u64, u64)>,
    /// T5 relative-position bias: the table `[buckets, heads]` and max_distance.
    pub t5: Option<(View<'a, T>, f64)>,
    /// Transformer-XL relative attention.
    pub xl: Option<Xl<'a, T>>,
}

/// Transformer-XL's position terms (Dai et al. 2019): the raw score of query
/// i and key j is (q_i + u)·k_j + (q_i + v)·r_δ with δ = i − j (query
/// position minus key position, in the keys' frame); terms with δ outside
/// [0, kv_seq) are 0 (only keys after the query, masked when causal).
#[derive(Clone, Copy)]
pub struct Xl<'a, T> {
    /// `[kv_seq, heads, head_dim]`: the projected sinusoid of each distance.
    pub r: View<'a, T>,
    /// The content and position biases `[heads, head_dim]`, or none.
    pub uv: Option<(View<'a, T>, View<'a, T>)>,
}

impl<'a, T> Attn<'a, T> {
    /// The attention of an `attention` or `attention_grad` op over its
    /// operands: q, k, v, then the mask (when masked), then the T5 table or
    /// Transformer-XL's r (and u, v when it has biases). `dropout` is the
    /// step's seed in training (`None`: dropout is the identity); `node` the
    /// forward node whose index seeds the mask. `None` for other ops.
    pub fn of(op: &Op, x: &[View<'a, T>], dropout: Option<u64>, node: usize) -> Option<Attn<'a, T>> {
        let (causal, masked, window, p, t5, xl) = match op {
            Op::Attention { causal, dropout, mask, rel, window } => {
                let (t5, xl) = match rel {
                    RelPos::None => (None, None),
                    RelPos::T5 { max_distance } => (Some(*max_distance), None),
                    RelPos::Xl { biases } => (None, Some(*biases)),
                };
                (*causal, *mask, *window, *dropout, t5, xl)
            }
            Op::AttentionGrad { causal, mask, window, dropout, t5, xl, .. } => {
                (*causal, *mask, *window, *dropout, *t5, *xl)
            }
            _ => return None,
        };
        let extra = 3 + usize::from(masked);
        Some(Attn {
            q: x[0],
            k: x[1],
            v: x[2],
            mask: masked.then(|| x[3]),
            causal,
            window,
            dropout: dropout.filter(|_| p > 0.0).map(|seed| (p, seed, node as u64)),
            t5: t5.map(|md| (x[extra], md)),
            xl: xl.map(|biases| Xl { r: x[extra], uv: biases.then(|| (x[extra + 1], x[extra + 2])) }),
        })
    }
}

/// T5's bucket of relative position `rel` = key − query (Raffel et al.,
/// `_relative_position_bucket`): half the buckets per direction when
/// bidirectional; exact below half the buckets, then logarithmic up to
/// `max_distance`.
pub fn t5_bucket(rel: i64, bidirectional: bool, buckets: usize, max_distance: f64) -> usize {
    let (mut n, mut base) = (buckets as i64, 0i64);
    let mut r = rel;
    if bidirectional {
        n /= 2;
        if r > 0 {
            base += n;
        }
        r = r.abs();
    } else {
        r = -r.min(0);
    }
    let exact = (n / 2).max(1);
    let b = if r < exact {
        r
    } else {
        let large = exact as f64
            + ((r as f64 / exact as f64).ln() / (max_distance / exact as f64).ln() * (n - exact) as f64).floor();
        (large as i64).min(n - 1)
    };
    (base + b).clamp(0, buckets as i64 - 1) as usize
}

#[derive(Clone, Copy)]
struct Shape {
    l: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    dv: usize,
}

/// A pointer that may cross threads; every use writes a region no other thread touches.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: see the type's doc; the data outlives the scoped threads.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so closures capture the whole `Shared`).
    fn get(&self) -> *mut T {
        self.0
    }
}

/// dst (m×n, row stride `drs`) (+)= lhs (m×k) · rhs (k×n), all strided, on
/// this thread (attention already splits its work over the threads).
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    drs: usize,
    accumulate: bool,
    lhs: *const T,
    lrs: usize,
    lcs: usize,
    rhs: *const T,
    rrs: usize,
    rcs: usize,
) {
    // SAFETY: callers pass pointers and strides that stay inside their buffers.
    unsafe { gemm_strided((m, n, k), dst, drs, accumulate, (lhs, lrs, lcs), (rhs, rrs, rcs), T::one(), false) }
}

impl<T: Real> Attn<'_, T> {
    fn shape(&self) -> Shape {
        let (q, k, v) = (&self.q.dims, &self.k.dims, &self.v.dims);
        let (n, m) = (q.len(), k.len());
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
        for_each_offset(&lead, &aligned_strides(m.dims, &lead), |o| bases.push(o));
        let kdims = &self.k.dims;
        let names = [self.q.dims[n - 3].clone(), kdims[kdims.len() - 3].clone(), self.q.dims[n - 2].clone()];
        let s = aligned_strides(m.dims, &names);
        // In self-attention queries and keys share the dim name; a mask's
        // `seq` then means the key position (a padding mask).
        let q_stride = if names[0].name == names[1].name { 0 } else { s[0] };
        Some((bases, [q_stride, s[1], s[2]]))
    }

    /// Scores → probabilities for queries [i0, i0 + rows) of (l, h), in `p`
    /// (rows × sk, row stride sk). Returns `kend`: under a causal mask no
    /// query of the block sees keys from `kend` on, so only columns
    /// [0, kend) are computed and callers contract over those alone (half the
    /// work of causal attention). Fully masked rows become zeros.
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        s: &Shape,
        mi: &Option<(Vec<usize>, [usize; 3])>,
        l: usize,
        h: usize,
        i0: usize,
        rows: usize,
        p: &mut [T],
        bias: Option<&[usize]>,
    ) -> usize {
        let hk = h / (s.hq / s.hk).max(1);
        let scale = T::one() / T::from(s.d).unwrap_or_else(T::one).sqrt();
        let shift = s.sk as i64 - s.sq as i64;
        let kend = if self.causal { (i0 as i64 + rows as i64 + shift).clamp(0, s.sk as i64) as usize } else { s.sk };
        // SAFETY: q rows i0.. of head h and k rows of head hk lie inside q and k.
        unsafe {
            mm(
                rows,
                kend,
                s.d,
                p.as_mut_ptr(),
                s.sk,
                false,
                self.q.data.as_ptr().add(((l * s.sq + i0) * s.hq + h) * s.d),
                s.hq * s.d,
                1,
                self.k.data.as_ptr().add((l * s.sk * s.hk + hk) * s.d),
                1,
                s.hk * s.d,
            );
        }
        if let Some(xl) = self.xl {
            let d = s.d;
            let sr = xl.r.dims[0].size as i64;
            for r in 0..rows {
                let qi = &self.q.data[((l * s.sq + i0 + r) * s.hq + h) * d..][..d];
                let qend = i0 as i64 + r as i64 + shift;
                for (j, x) in p[r * s.sk..r * s.sk + kend].iter_mut().enumerate() {
                    let mut add = T::zero();
                    if let Some((u, _)) = xl.uv {
                        let kj = &self.k.data[((l * s.sk + j) * s.hk + hk) * d..][..d];
                        add += super::fast::dot(&u.data[h * d..(h + 1) * d], kj);
                    }
                    let dist = qend - j as i64;
                    if (0..sr).contains(&dist) {
                        let rd = &xl.r.data[(dist as usize * s.hq + h) * d..][..d];
                        add += super::fast::dot(qi, rd);
                        if let Some((_, v)) = xl.uv {
                            add += super::fast::dot(&v.data[h * d..(h + 1) * d], rd);
                        }
                    }
                    *x += add;
                }
            }
        }
        let (zero, neg) = (T::zero(), T::neg_infinity());
        for r in 0..rows {
            let i = i0 + r;
            let row = &mut p[r * s.sk..r * s.sk + kend];
            // Keys [lo, hi) are visible to query i (causal and window limits).
            let end = i as i64 + shift;
            let hi = if self.causal { (end + 1).clamp(0, kend as i64) as usize } else { kend };
            let lo = self.window.map_or(0, |w| (end - w as i64 + 1).clamp(0, hi as i64) as usize);
            let live = &mut row[lo..hi];
            if let (Some(m), Some((bases, st))) = (self.mask, mi) {
                for (jj, x) in live.iter_mut().enumerate() {
                    let keep = m.data[bases[l] + i * st[0] + (lo + jj) * st[1] + h * st[2]] != zero;
                    *x = if keep { *x * scale } else { neg };
                }
            } else {
                live.iter_mut().for_each(|x| *x = *x * scale);
            }
            // T5: + table[bucket(j − i), h], `bias` indexed by j − i + sq − 1.
            if let (Some(buckets), Some((table, _))) = (bias, self.t5) {
                for (jj, x) in live.iter_mut().enumerate() {
                    *x += table.data[buckets[lo + jj + s.sq - 1 - i] * s.hq + h];
                }
            }
            let max = super::fast::max(live);
            if max == neg {
                row.fill(zero);
                continue;
            }
            live.iter_mut().for_each(|x| *x = (*x - max).exp_fast());
            let inv = T::one() / super::fast::sum(live);
            live.iter_mut().for_each(|x| *x = *x * inv);
            row[..lo].fill(zero);
            row[hi..].fill(zero);
        }
        kend
    }

    /// Scale the probabilities of rows [i0, i0 + rows) of (l, h) by the
    /// dropout mask: 0 where dropped, 1/(1 − p) where kept.
    #[allow(clippy::too_many_arguments)]
    fn drop_mask(&self, s: &Shape, l: usize, h: usize, i0: usize, rows: usize, kend: usize, p: &mut [T]) {
        let Some((rate, seed, node)) = self.dropout else { return };
        let keep = T::one() / (T::one() - crate::tensor::r::<T>(rate));
        for r in 0..rows {
            let base = ((l * s.hq + h) * s.sq + i0 + r) * s.sk;
            for (j, x) in p[r * s.sk..r * s.sk + kend].iter_mut().enumerate() {
                let u = super::kernels::uniform(seed, node, (base + j) as u64);
                *x = if u < rate { T::zero() } else { *x * keep };
            }
        }
    }

    /// T5 buckets of every relative position j − i, indexed by j − i + sq − 1.
    fn t5_buckets(&self, s: &Shape) -> Option<Vec<usize>> {
        let (table, max_distance) = self.t5?;
        let n = table.dims[0].size as usize;
        Some(
            (0..s.sq + s.sk - 1)
                .map(|k| t5_bucket(k as i64 - (s.sq as i64 - 1), !self.causal, n, max_distance))
                .collect(),
        )
    }

    /// Run `f(l, hk)` for every lead index and kv head, over the kernel
    /// threads: rayon's pool, whose threads (and their GEMM buffers) stay
    /// warm between calls, where a thread spawned per call starts cold.
    fn parallel(&self, s: &Shape, f: impl Fn(usize, usize) + Sync) {
        use rayon::prelude::*;
        let items = s.l * s.hk;
        let threads = super::threads().min(items).max(1);
        let run = |t: usize| {
            for item in (t..items).step_by(threads) {
                f(item / s.hk, item % s.hk);
            }
        };
        if threads == 1 {
            run(0);
        } else {
            (0..threads).into_par_iter().for_each(run);
        }
    }

    pub fn forward(&self, out_dims: &[Dim]) -> Tensor<T> {
        let mut out: Tensor<T> = Tensor::zeros(out_dims);
        self.forward_into(&mut out.data);
        out
    }

    /// [`Attn::forward`] into `out` (the output's elements, row-major).
    pub fn forward_into(&self, out: &mut [T]) {
        let s = self.shape();
        let mi = self.mask_index();
        let buckets = self.t5_buckets(&s);
        out.fill(T::zero());
        let dst = Shared(out.as_mut_ptr());
        let group = (s.hq / s.hk).max(1);
        self.parallel(&s, |l, hk| {
            let mut p = vec![T::zero(); BLOCK.min(s.sq) * s.sk];
            for h in hk * group..(hk + 1) * group {
                for i0 in (0..s.sq).step_by(BLOCK) {
                    let rows = BLOCK.min(s.sq - i0);
                    let kend = self.probs(&s, &mi, l, h, i0, rows, &mut p, buckets.as_deref());
                    self.drop_mask(&s, l, h, i0, rows, kend, &mut p);
                    // SAFETY: this thread alone writes out[l, i0.., h, :].
                    unsafe {
                        mm(
                            rows,
                            s.dv,
                            kend,
                            dst.get().add(((l * s.sq + i0) * s.hq + h) * s.dv),
                            s.hq * s.dv,
                            false,
                            p.as_ptr(),
                            s.sk,
                            1,
                            self.v.data.as_ptr().add((l * s.sk * s.hk + hk) * s.dv),
                            s.hk * s.dv,
                            1,
                        );
                    }
                }
            }
        });
    }

    /// The gradients with respect to q, k and v (and the T5 table), in one pass.
    pub fn backward(&self, g: View<'_, T>) -> Vec<Tensor<T>> {
        let mut dq: Tensor<T> = Tensor::zeros(self.q.dims);
        let mut dk: Tensor<T> = Tensor::zeros(self.k.dims);
        let mut dv: Tensor<T> = Tensor::zeros(self.v.dims);
        let extra = self.backward_into(g, &mut dq.data, &mut dk.data, &mut dv.data);
        [dq, dk, dv].into_iter().chain(extra).collect()
    }

    /// [`Attn::backward`] with dq, dk and dv written into the slices given
    /// (each its operand's elements, row-major); returns the other
    /// gradients (the T5 table, Transformer-XL's terms).
    pub fn backward_into(&self, g: View<'_, T>, dq: &mut [T], dk: &mut [T], dv: &mut [T]) -> Vec<Tensor<T>> {
        let s = self.shape();
        let mi = self.mask_index();
        let buckets = self.t5_buckets(&s);
        // Σ of the score gradients per (bucket, head), merged from every item.
        let dtable = std::sync::Mutex::new(self.t5.map(|(t, _)| vec![T::zero(); t.numel()]));
        // Transformer-XL: dr, du, dv summed over every item.
        let xl_zeros = || {
            self.xl.map(|x| (vec![T::zero(); x.r.numel()], vec![T::zero(); s.hq * s.d], vec![T::zero(); s.hq * s.d]))
        };
        let xl_acc = std::sync::Mutex::new(xl_zeros());
        let scale = T::one() / T::from(s.d).unwrap_or_else(T::one).sqrt();
        let group = (s.hq / s.hk).max(1);
        assert!(
            dq.len() == self.q.numel() && dk.len() == self.k.numel() && dv.len() == self.v.numel(),
            "attention gradients of their operands' sizes"
        );
        for d in [&mut *dq, &mut *dk, &mut *dv] {
            d.fill(T::zero());
        }
        let (pq, pk, pv) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
        self.parallel(&s, |l, hk| {
            let mut local = self.t5.map(|(t, _)| vec![T::zero(); t.numel()]);
            let mut xl_local = xl_zeros();
            let n = BLOCK.min(s.sq) * s.sk;
            let (mut p, mut dp) = (vec![T::zero(); n], vec![T::zero(); n]);
            // P ∘ mask / (1 − p) under dropout (what multiplied V), else P itself.
            let mut pd = if self.dropout.is_some() { vec![T::zero(); n] } else { Vec::new() };
            let kp = self.k.data.as_ptr();
            let vp = self.v.data.as_ptr();
            for h in hk * group..(hk + 1) * group {
                for i0 in (0..s.sq).step_by(BLOCK) {
                    let rows = BLOCK.min(s.sq - i0);
                    let kend = self.probs(&s, &mi, l, h, i0, rows, &mut p, buckets.as_deref());
                    if self.dropout.is_some() {
                        pd.copy_from_slice(&p);
                        self.drop_mask(&s, l, h, i0, rows, kend, &mut pd);
                    }
                    let pv_lhs = if self.dropout.is_some() { pd.as_ptr() } else { p.as_ptr() };
                    let go = g.data.as_ptr().wrapping_add(((l * s.sq + i0) * s.hq + h) * s.dv);
                    let qo = self.q.data.as_ptr().wrapping_add(((l * s.sq + i0) * s.hq + h) * s.d);
                    let ko = (l * s.sk * s.hk + hk) * s.d;
                    let vo = (l * s.sk * s.hk + hk) * s.dv;
                    // SAFETY: every view below stays inside its tensor; this thread alone
                    // writes dq[l, i0.., h, :] and dk/dv[l, :, hk, :].
                    unsafe {
                        // dV += Pᵀ · dO
                        mm(kend, s.dv, rows, pv.get().add(vo), s.hk * s.dv, true, pv_lhs, 1, s.sk, go, s.hq * s.dv, 1);
                        // dP = dO · Vᵀ
                        mm(
                            rows,
                            kend,
                            s.dv,
                            dp.as_mut_ptr(),
                            s.sk,
                            false,
                            go,
                            s.hq * s.dv,
                            1,
                            vp.add(vo),
                            1,
                            s.hk * s.dv,
                        );
                    }
                    // Through dropout: dP = (dO · Vᵀ) ∘ mask / (1 − p).
                    self.drop_mask(&s, l, h, i0, rows, kend, &mut dp);
                    // dS = P ∘ (dP − rowsum(P ∘ dP)) · scale
                    for r in 0..rows {
                        let (pr, dr) = (&p[r * s.sk..r * s.sk + kend], &mut dp[r * s.sk..r * s.sk + kend]);
                        let dd = super::fast::dot(pr, dr);
                        for (a, b) in pr.iter().zip(dr.iter_mut()) {
                            *b = *a * (*b - dd) * scale;
                        }
                        // T5 table: Σ dS per bucket (dS · scale here; divided out below).
                        if let (Some(loc), Some(bk)) = (local.as_mut(), buckets.as_deref()) {
                            let i = i0 + r;
                            for (j, v) in dr.iter().enumerate() {
                                loc[bk[j + s.sq - 1 - i] * s.hq + h] += *v;
                            }
                        }
                    }
                    unsafe {
                        // dQ = dS · K
                        let dqo = ((l * s.sq + i0) * s.hq + h) * s.d;
                        mm(
                            rows,
                            s.d,
                            kend,
                            pq.get().add(dqo),
                            s.hq * s.d,
                            false,
                            dp.as_ptr(),
                            s.sk,
                            1,
                            kp.add(ko),
                            s.hk * s.d,
                            1,
                        );
                        // dK += dSᵀ · Q
                        mm(
                            kend,
                            s.d,
                            rows,
                            pk.get().add(ko),
                            s.hk * s.d,
                            true,
                            dp.as_ptr(),
                            1,
                            s.sk,
                            qo,
                            s.hq * s.d,
                            1,
                        );
                    }
                    // Transformer-XL terms; dS here is the gradient of the raw score.
                    if let (Some(xl), Some((lr, lu, lv))) = (self.xl, xl_local.as_mut()) {
                        let d = s.d;
                        let sr = xl.r.dims[0].size as i64;
                        let shift = s.sk as i64 - s.sq as i64;
                        for r in 0..rows {
                            let i = i0 + r;
                            let qi = &self.q.data[((l * s.sq + i) * s.hq + h) * d..][..d];
                            let dqo = ((l * s.sq + i) * s.hq + h) * d;
                            for j in 0..kend {
                                let ds = dp[r * s.sk + j];
                                if ds == T::zero() {
                                    continue;
                                }
                                let kj = &self.k.data[((l * s.sk + j) * s.hk + hk) * d..][..d];
                                if let Some((u, _)) = xl.uv {
                                    // SAFETY: this thread alone writes dk[l, :, hk, :].
                                    let dkj =
                                        unsafe { std::slice::from_raw_parts_mut(pk.get().add(ko + j * s.hk * d), d) };
                                    for (o, x) in dkj.iter_mut().zip(&u.data[h * d..(h + 1) * d]) {
                                        *o += ds * *x;
                                    }
                                    for (o, x) in lu[h * d..(h + 1) * d].iter_mut().zip(kj) {
                                        *o += ds * *x;
                                    }
                                }
                                let dist = i as i64 + shift - j as i64;
                                if !(0..sr).contains(&dist) {
                                    continue;
                                }
                                let at = (dist as usize * s.hq + h) * d;
                                let rd = &xl.r.data[at..at + d];
                                // SAFETY: this thread alone writes dq[l, i, h, :].
                                let dqi = unsafe { std::slice::from_raw_parts_mut(pq.get().add(dqo), d) };
                                for (o, x) in dqi.iter_mut().zip(rd) {
                                    *o += ds * *x;
                                }
                                let vh = xl.uv.map(|(_, v)| &v.data[h * d..(h + 1) * d]);
                                for (c, o) in lr[at..at + d].iter_mut().enumerate() {
                                    *o += ds * (qi[c] + vh.map_or(T::zero(), |v| v[c]));
                                }
                                if xl.uv.is_some() {
                                    for (o, x) in lv[h * d..(h + 1) * d].iter_mut().zip(rd) {
                                        *o += ds * *x;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if let Some(loc) = xl_local {
                let mut guard = xl_acc.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((ar, au, av)) = guard.as_mut() {
                    ar.iter_mut().zip(&loc.0).for_each(|(a, b)| *a += *b);
                    au.iter_mut().zip(&loc.1).for_each(|(a, b)| *a += *b);
                    av.iter_mut().zip(&loc.2).for_each(|(a, b)| *a += *b);
                }
            }
            if let Some(loc) = local {
                let mut guard = dtable.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(acc) = guard.as_mut() {
                    acc.iter_mut().zip(&loc).for_each(|(a, b)| *a += *b);
                }
            }
        });
        let mut out = Vec::new();
        if let (Some(data), Some((table, _))) = (dtable.into_inner().unwrap_or_else(|e| e.into_inner()), self.t5) {
            let inv = T::one() / scale;
            out.push(Tensor { dims: table.dims.to_vec(), data: data.into_iter().map(|v| v * inv).collect() });
        }
        if let (Some((dr, du, dvb)), Some(xl)) = (xl_acc.into_inner().unwrap_or_else(|e| e.into_inner()), self.xl) {
            // dS above is the gradient of the raw score, which holds these terms.
            out.push(Tensor { dims: xl.r.dims.to_vec(), data: dr });
            if let Some((u, v)) = xl.uv {
                out.push(Tensor { dims: u.dims.to_vec(), data: du });
                out.push(Tensor { dims: v.dims.to_vec(), data: dvb });
            }
        }
        out
    }
}
