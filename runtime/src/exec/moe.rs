//! Mixture-of-experts kernels.
//!
//! A routing is a *gates* tensor `[tokens..., expert]`: each token's top-k
//! router probabilities, zero elsewhere and where the expert was full.
//! `top_k` fills experts in priority order (every token's first choice, then
//! every token's second, ...) up to the slot count. Dispatch and combine find
//! each kept (token, expert) pair's slot from the gates alone by one
//! canonical rule — passes over each token's kept experts in gate order —
//! so the two always agree.

use crate::tensor::{Real, Tensor, View, r};
use tessera_compiler::ir::Dim;

/// Token count, expert count and the gates as rows `[t][e]`.
fn rows<T: Real>(gates: View<'_, T>) -> (usize, usize) {
    let e = gates.dims.last().map(|d| d.size as usize).unwrap_or(1);
    (gates.numel() / e.max(1), e)
}

/// The kept experts of each token, best gate first (ties: lower expert id).
fn ranked<T: Real>(vals: &[T], e: usize, keep: impl Fn(T) -> bool) -> Vec<Vec<usize>> {
    vals.chunks(e)
        .map(|row| {
            let mut ids: Vec<usize> = (0..e).filter(|&j| keep(row[j])).collect();
            ids.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
            ids
        })
        .collect()
}

/// A routing's slots, shared by the kernels that need them.
type Slots = std::rc::Rc<Vec<Vec<(usize, usize)>>>;

thread_local! {
    /// Recent routings of this thread by content: (gates as f64 bits, capacity, slots).
    /// Dispatch, combine and their gradients read the same gates up to five
    /// times per layer; the cache computes the slots once.
    static ROUTES: std::cell::RefCell<Vec<(Vec<u64>, usize, Slots)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `slots`, from this thread's cache when the same gates were routed recently.
fn cached_slots<T: Real>(gates: View<'_, T>, capacity: usize) -> Slots {
    let key: Vec<u64> = gates.data.iter().map(|g| g.to_f64().unwrap_or(f64::NAN).to_bits()).collect();
    ROUTES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, _, s)) = cache.iter().find(|(k, c, _)| *c == capacity && *k == key) {
            return s.clone();
        }
        let s = std::rc::Rc::new(slots(gates, capacity));
        if cache.len() >= 16 {
            cache.remove(0);
        }
        cache.push((key, capacity, s.clone()));
        s
    })
}

/// Slot of every kept (token, expert) pair: `slots[t]` lists (expert, slot).
pub fn slots<T: Real>(gates: View<'_, T>, capacity: usize) -> Vec<Vec<(usize, usize)>> {
    let (t, e) = rows(gates);
    let kept = ranked(gates.data, e, |g| g != T::zero());
    let k = kept.iter().map(Vec::len).max().unwrap_or(0);
    let mut count = vec![0usize; e];
    let mut out = vec![Vec::new(); t];
    for rank in 0..k {
        for (tok, experts) in kept.iter().enumerate() {
            if let Some(&ex) = experts.get(rank)
                && count[ex] < capacity
            {
                out[tok].push((ex, count[ex]));
                count[ex] += 1;
            }
        }
    }
    out
}

/// Filled slots per expert (slots fill from 0 up, so these are prefixes).
pub fn slot_counts<T: Real>(gates: View<'_, T>, capacity: usize, experts: usize) -> Vec<usize> {
    let mut counts = vec![0; experts];
    for &(ex, _) in cached_slots(gates, capacity).iter().flatten() {
        counts[ex] += 1;
    }
    counts
}

/// Gates from router probabilities: top-k per token, then capacity in priority order.
pub fn top_k<T: Real>(probs: &Tensor<T>, k: usize, capacity: usize) -> Tensor<T> {
    let (t, e) = rows(probs.view());
    let choice = ranked(&probs.data, e, |_| true);
    let mut count = vec![0usize; e];
    let mut gates = Tensor::zeros(&probs.dims);
    for rank in 0..k.min(e) {
        for (tok, ranked) in choice.iter().enumerate().take(t) {
            let ex = ranked[rank];
            if count[ex] < capacity {
                count[ex] += 1;
                gates.data[tok * e + ex] = probs.data[tok * e + ex];
            }
        }
    }
    gates
}

/// `[tokens..., d...]` → `[expert, slot, d...]`.
pub fn dispatch<T: Real>(gates: View<'_, T>, x: View<'_, T>, out: &[Dim]) -> Tensor<T> {
    let mut y = Tensor::zeros(out);
    dispatch_into(gates, x, out, &mut y.data);
    y
}

/// [`dispatch`] into `y` (zeroed first), a backend's own buffer.
pub fn dispatch_into<T: Real>(gates: View<'_, T>, x: View<'_, T>, out: &[Dim], y: &mut [T]) {
    let cap = out[1].size as usize;
    let width: usize = out[2..].iter().map(|d| d.size as usize).product();
    y.fill(T::zero());
    for (tok, pairs) in cached_slots(gates, cap).iter().enumerate() {
        for &(ex, s) in pairs {
            let dst = (ex * cap + s) * width;
            y[dst..dst + width].copy_from_slice(&x.data[tok * width..(tok + 1) * width]);
        }
    }
}

/// d tokens of dispatch: each token sums its slots' gradients.
pub fn dispatch_grad<T: Real>(gates: View<'_, T>, g: View<'_, T>, out: &[Dim]) -> Tensor<T> {
    let mut dx = Tensor::zeros(out);
    dispatch_grad_into(gates, g, &mut dx.data);
    dx
}

/// [`dispatch_grad`] into `dx` (zeroed first), a backend's own buffer.
pub fn dispatch_grad_into<T: Real>(gates: View<'_, T>, g: View<'_, T>, dx: &mut [T]) {
    let cap = g.dims[1].size as usize;
    let width: usize = g.dims[2..].iter().map(|d| d.size as usize).product();
    dx.fill(T::zero());
    for (tok, pairs) in cached_slots(gates, cap).iter().enumerate() {
        for &(ex, s) in pairs {
            let src = (ex * cap + s) * width;
            for j in 0..width {
                dx[tok * width + j] += g.data[src + j];
            }
        }
    }
}

/// `[expert, slot, d...]` → `[tokens..., d...]`, weighted by the gates.
pub fn combine<T: Real>(gates: View<'_, T>, y: View<'_, T>, out: &[Dim]) -> Tensor<T> {
    let mut o = Tensor::zeros(out);
    combine_into(gates, y, &mut o.data);
    o
}

/// [`combine`] into `o` (zeroed first), a backend's own buffer.
pub fn combine_into<T: Real>(gates: View<'_, T>, y: View<'_, T>, o: &mut [T]) {
    let (_, e) = rows(gates);
    let cap = y.dims[1].size as usize;
    let width: usize = y.dims[2..].iter().map(|d| d.size as usize).product();
    o.fill(T::zero());
    for (tok, pairs) in cached_slots(gates, cap).iter().enumerate() {
        for &(ex, s) in pairs {
            let w = gates.data[tok * e + ex];
            let src = (ex * cap + s) * width;
            for j in 0..width {
                o[tok * width + j] += w * y.data[src + j];
            }
        }
    }
}

/// d expert outputs of combine.
pub fn combine_grad_y<T: Real>(gates: View<'_, T>, g: View<'_, T>, out: &[Dim]) -> Tensor<T> {
    let mut dy = Tensor::zeros(out);
    combine_grad_y_into(gates, g, out, &mut dy.data);
    dy
}

/// [`combine_grad_y`] into `dy` (zeroed first), a backend's own buffer.
pub fn combine_grad_y_into<T: Real>(gates: View<'_, T>, g: View<'_, T>, out: &[Dim], dy: &mut [T]) {
    let (_, e) = rows(gates);
    let cap = out[1].size as usize;
    let width: usize = out[2..].iter().map(|d| d.size as usize).product();
    dy.fill(T::zero());
    for (tok, pairs) in cached_slots(gates, cap).iter().enumerate() {
        for &(ex, s) in pairs {
            let w = gates.data[tok * e + ex];
            let dst = (ex * cap + s) * width;
            for j in 0..width {
                dy[dst + j] = w * g.data[tok * width + j];
            }
        }
    }
}

/// d gates of combine: <g[token], y[expert, slot]> for kept pairs.
pub fn combine_grad_gates<T: Real>(gates: View<'_, T>, y: View<'_, T>, g: View<'_, T>) -> Tensor<T> {
    let (_, e) = rows(gates);
    let cap = y.dims[1].size as usize;
    let width: usize = y.dims[2..].iter().map(|d| d.size as usize).product();
    let mut dg = Tensor::zeros(gates.dims);
    for (tok, pairs) in cached_slots(gates, cap).iter().enumerate() {
        for &(ex, s) in pairs {
            let src = (ex * cap + s) * width;
            let mut dot = T::zero();
            for j in 0..width {
                dot += g.data[tok * width + j] * y.data[src + j];
            }
            dg.data[tok * e + ex] = dot;
        }
    }
    dg
}

/// top-k's gradient: g where the gate is non-zero.
pub fn gate_mask<T: Real>(g: &Tensor<T>, gates: &Tensor<T>) -> Tensor<T> {
    let data = g.data.iter().zip(&gates.data).map(|(gv, w)| if *w != T::zero() { *gv } else { T::zero() }).collect();
    Tensor { dims: g.dims.clone(), data }
}

/// Share of the kept assignments that go to each expert.
fn load<T: Real>(gates: &Tensor<T>) -> Vec<f64> {
    let (_, e) = rows(gates.view());
    let mut f = vec![0.0; e];
    let mut total = 0.0;
    for row in gates.data.chunks(e) {
        for (j, w) in row.iter().enumerate() {
            if *w != T::zero() {
                f[j] += 1.0;
                total += 1.0;
            }
        }
    }
    f.iter().map(|x| if total > 0.0 { x / total } else { 0.0 }).collect()
}

/// Switch load balancing: E · Σ_e f_e · P_e, f_e the share of kept
/// assignments to e, P_e the mean router probability of e.
pub fn load_balance<T: Real>(gates: &Tensor<T>, probs: &Tensor<T>) -> T {
    let (t, e) = rows(probs.view());
    let f = load(gates);
    let mut p = vec![0.0; e];
    for row in probs.data.chunks(e) {
        for (pj, v) in p.iter_mut().zip(row) {
            *pj += v.to_f64().unwrap_or(0.0) / t as f64;
        }
    }
    r(e as f64 * f.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>())
}

pub fn load_balance_grad<T: Real>(gates: &Tensor<T>, probs: &Tensor<T>, g: T) -> Tensor<T> {
    let (t, e) = rows(probs.view());
    let f = load(gates);
    let gv = g.to_f64().unwrap_or(0.0);
    Tensor::from_fn(&probs.dims, |i| r(gv * e as f64 * f[i % e] / t as f64))
}

/// Router z-loss: mean over tokens of logsumexp(logits)².
pub fn z_loss<T: Real>(logits: &Tensor<T>) -> T {
    let (t, e) = rows(logits.view());
    let s: f64 = logits.data.chunks(e).map(|row| lse(row).powi(2)).sum();
    r(s / t.max(1) as f64)
}

fn lse<T: Real>(row: &[T]) -> f64 {
    let v: Vec<f64> = row.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect();
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

pub fn z_loss_grad<T: Real>(logits: &Tensor<T>, g: T) -> Tensor<T> {
    let (t, e) = rows(logits.view());
    let gv = g.to_f64().unwrap_or(0.0);
    let mut out = Tensor::zeros(&logits.dims);
    for (k, row) in logits.data.chunks(e).enumerate() {
        let l = lse(row);
        for (j, v) in row.iter().enumerate() {
            let sm = (v.to_f64().unwrap_or(0.0) - l).exp();
            out.data[k * e + j] = r(gv * 2.0 * l * sm / t as f64);
        }
    }
    out
}
