//! Dense row-major tensors with named dims, generic over the element type
//! (f32 for training, f64 for the gradient checks), and the index machinery
//! every kernel shares: strides, transposes by name, broadcasting by name.

use num_traits::Float;
use std::fmt::Debug;
use tessera_compiler::ir::{Dim, TensorType};

/// The element types the interpreter computes in.
pub trait Real: Float + Default + Debug + Send + Sync + 'static + std::ops::AddAssign {
    /// e^x: a vectorizable polynomial within 2 ulp for f32, libm for f64 (the
    /// f64 runs are the finite-difference oracle, so they keep libm).
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
}
impl Real for f32 {
    #[inline(always)]
    fn exp_fast(self) -> Self {
        crate::exec::fast::exp_f32(self)
    }
}
impl Real for f64 {}

/// Convert a number into the element type (exact for the small integers ids and masks use).
pub fn r<T: Real>(x: f64) -> T {
    T::from(x).unwrap_or_else(T::nan)
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tensor<T> {
    pub dims: Vec<Dim>,
    pub data: Vec<T>,
}

/// A borrowed tensor: dims and row-major elements that live elsewhere (a
/// tensor's, or a buffer of a backend's arena), for kernels that only read
/// their operands.
#[derive(Debug)]
pub struct View<'a, T> {
    pub dims: &'a [Dim],
    pub data: &'a [T],
}

// (By hand: a derive would ask `T: Copy`, and a view copies only references.)
impl<T> Clone for View<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for View<'_, T> {}

impl<T> View<'_, T> {
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

impl<T> Tensor<T> {
    pub fn view(&self) -> View<'_, T> {
        View { dims: &self.dims, data: &self.data }
    }
}

impl<T: Real> Tensor<T> {
    /// Whether every element is finite (no NaN, no infinity).
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }

    pub fn zeros(dims: &[Dim]) -> Tensor<T> {
        let n = dims.iter().map(|d| d.size as usize).product();
        Tensor { dims: dims.to_vec(), data: vec![T::zero(); n] }
    }

    pub fn from_fn(dims: &[Dim], mut f: impl FnMut(usize) -> T) -> Tensor<T> {
        let n: usize = dims.iter().map(|d| d.size as usize).product();
        Tensor { dims: dims.to_vec(), data: (0..n).map(&mut f).collect() }
    }

    pub fn scalar(x: T) -> Tensor<T> {
        Tensor { dims: Vec::new(), data: vec![x] }
    }

    pub fn of_type(ty: &TensorType) -> Tensor<T> {
        Tensor::zeros(&ty.dims)
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.dims.iter().position(|d| d.name == name)
    }

    pub fn size(&self, name: &str) -> usize {
        self.dims.iter().find(|d| d.name == name).map(|d| d.size as usize).unwrap_or(1)
    }

    /// The same data in another dim order, borrowed when the order is already right.
    pub fn permuted(&self, order: &[Dim]) -> std::borrow::Cow<'_, Tensor<T>> {
        if order == self.dims.as_slice() {
            std::borrow::Cow::Borrowed(self)
        } else {
            std::borrow::Cow::Owned(self.permute(order))
        }
    }

    /// The same data in another dim order (a transpose by names).
    pub fn permute(&self, order: &[Dim]) -> Tensor<T> {
        if order == self.dims.as_slice() {
            return self.clone();
        }
        let strides = aligned_strides(&self.dims, order);
        let mut out = Vec::with_capacity(self.data.len());
        for_each_offset(order, &strides, |off| out.push(self.data[off]));
        Tensor { dims: order.to_vec(), data: out }
    }

    /// Reorder so that `last` dims come last (in the given order), others keep theirs.
    pub fn move_last(&self, last: &[&str]) -> Tensor<T> {
        let mut order: Vec<Dim> = self.dims.iter().filter(|d| !last.contains(&d.name.as_str())).cloned().collect();
        for l in last {
            if let Some(d) = self.dims.iter().find(|d| d.name == *l) {
                order.push(d.clone());
            }
        }
        self.permute(&order)
    }

    /// Broadcast (by name) to `dims`, which must include every dim of `self`.
    pub fn expand(&self, dims: &[Dim]) -> Tensor<T> {
        let strides = aligned_strides(&self.dims, dims);
        let mut out = Vec::with_capacity(dims.iter().map(|d| d.size as usize).product());
        for_each_offset(dims, &strides, |off| out.push(self.data[off]));
        Tensor { dims: dims.to_vec(), data: out }
    }

    /// Sum over the named dims.
    pub fn sum_over(&self, names: &[String]) -> Tensor<T> {
        let keep: Vec<Dim> = self.dims.iter().filter(|d| !names.contains(&d.name)).cloned().collect();
        let reduced: usize = self.dims.iter().filter(|d| names.contains(&d.name)).map(|d| d.size as usize).product();
        // The reduced dims one contiguous run of the layout (a bias gradient,
        // a sum over slots): out[o, i] = Σ_r x[o, r, i] over contiguous rows,
        // with no transpose.
        let first = self.dims.iter().position(|d| names.contains(&d.name));
        if let Some(f) = first
            && self.dims[f..f + names.len().min(self.dims.len() - f)].iter().all(|d| names.contains(&d.name))
            && names.len() <= self.dims.len() - f
        {
            let inner: usize = self.dims[f + names.len()..].iter().map(|d| d.size as usize).product();
            let outer: usize = self.dims[..f].iter().map(|d| d.size as usize).product();
            let mut out = vec![T::zero(); outer * inner];
            if inner > 0 && reduced > 0 {
                for (o, block) in out.chunks_mut(inner).zip(self.data.chunks(reduced * inner)) {
                    if inner == 1 {
                        o[0] = block.iter().fold(T::zero(), |a, b| a + *b);
                        continue;
                    }
                    for row in block.chunks(inner) {
                        for (o, v) in o.iter_mut().zip(row) {
                            *o += *v;
                        }
                    }
                }
            }
            return Tensor { dims: keep, data: out };
        }
        let last: Vec<&str> = names.iter().map(String::as_str).collect();
        let p = self.move_last(&last);
        let n: usize = keep.iter().map(|d| d.size as usize).product();
        let mut out = vec![T::zero(); n];
        for (i, o) in out.iter_mut().enumerate() {
            let mut s = T::zero();
            for v in &p.data[i * reduced..(i + 1) * reduced] {
                s += *v;
            }
            *o = s;
        }
        Tensor { dims: keep, data: out }
    }
}

/// Row-major strides of `dims`.
pub fn strides(dims: &[Dim]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1].size as usize;
    }
    s
}

/// For each dim of `target`, the stride of that dim in a tensor laid out as
/// `src` (0 where `src` lacks it: broadcasting by name).
pub fn aligned_strides(src: &[Dim], target: &[Dim]) -> Vec<usize> {
    let s = strides(src);
    target.iter().map(|d| src.iter().position(|x| x.name == d.name).map(|i| s[i]).unwrap_or(0)).collect()
}

/// Visit every index of `dims` in row-major order, passing the offset given by `strides`.
pub fn for_each_offset(dims: &[Dim], strides: &[usize], mut f: impl FnMut(usize)) {
    let n: usize = dims.iter().map(|d| d.size as usize).product();
    if n == 0 {
        return;
    }
    if dims.is_empty() {
        f(0);
        return;
    }
    let sizes: Vec<usize> = dims.iter().map(|d| d.size as usize).collect();
    let last = dims.len() - 1;
    let (inner, inner_stride) = (sizes[last], strides[last]);
    let mut idx = vec![0usize; dims.len()];
    let mut base = 0usize;
    loop {
        let mut off = base;
        for _ in 0..inner {
            f(off);
            off += inner_stride;
        }
        // Advance the outer dims like an odometer.
        let mut k = last;
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            idx[k] += 1;
            base += strides[k];
            if idx[k] < sizes[k] {
                break;
            }
            base -= strides[k] * sizes[k];
            idx[k] = 0;
        }
    }
}

/// Visit every index of `dims`, passing the offsets into two tensors.
pub fn for_each_offset2(dims: &[Dim], sa: &[usize], sb: &[usize], mut f: impl FnMut(usize, usize)) {
    let n: usize = dims.iter().map(|d| d.size as usize).product();
    if n == 0 {
        return;
    }
    if dims.is_empty() {
        f(0, 0);
        return;
    }
    let sizes: Vec<usize> = dims.iter().map(|d| d.size as usize).collect();
    let last = dims.len() - 1;
    let mut idx = vec![0usize; dims.len()];
    let (mut ba, mut bb) = (0usize, 0usize);
    loop {
        let (mut oa, mut ob) = (ba, bb);
        for _ in 0..sizes[last] {
            f(oa, ob);
            oa += sa[last];
            ob += sb[last];
        }
        let mut k = last;
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            idx[k] += 1;
            ba += sa[k];
            bb += sb[k];
            if idx[k] < sizes[k] {
                break;
            }
            ba -= sa[k] * sizes[k];
            bb -= sb[k] * sizes[k];
            idx[k] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: &str, s: u64) -> Dim {
        Dim::new(n, s)
    }

    #[test]
    fn permute_and_back() {
        let t = Tensor::<f64>::from_fn(&[d("a", 2), d("b", 3), d("c", 4)], |i| i as f64);
        let p = t.permute(&[d("c", 4), d("a", 2), d("b", 3)]);
        // p[c=1, a=1, b=2] (offset 6 + 3 + 2) == t[a=1, b=2, c=1] (offset 12 + 8 + 1)
        let (p_off, t_off) = (6 + 3 + 2, 12 + 8 + 1);
        assert_eq!(p.data[p_off], t.data[t_off]);
        assert_eq!(p.permute(&t.dims), t);
    }

    #[test]
    fn expand_and_sum_are_adjoint_shapes() {
        let t = Tensor::<f64>::from_fn(&[d("b", 3)], |i| i as f64 + 1.0);
        let e = t.expand(&[d("a", 2), d("b", 3)]);
        assert_eq!(e.data, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        assert_eq!(e.sum_over(&["a".into()]).data, vec![2.0, 4.0, 6.0]);
    }
}
