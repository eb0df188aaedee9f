//! Convolutions and pooling over named spatial dims: an `unfold` of the
//! windows (im2col), then a contraction with the kernel (`conv`) or a
//! reduction over the window (`max_pool`, `avg_pool`).

use super::Args;
use crate::check::walk::{Frame, TVal, Val, Walker};
use crate::diag::Diag;
use crate::ir::{Op, ReduceOp, Windows, unfolded};
use crate::model::{Dim, OpCost, TensorType};
use crate::syntax::ast::{Expr, ExprKind, Ident};
use crate::syntax::span::Span;

/// Stride, padding and dilation of a window.
struct Slide {
    stride: u64,
    padding: u64,
    dilation: u64,
}

impl Walker<'_> {
    /// `conv(x, w, [h, width] -> [oh, ow], window = [kh, kw], stride, padding, dilation, per = [g])`.
    pub(super) fn conv(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(x) = self.float_tensor(frame, a.pos[0], "conv") else {
            return Val::Poison;
        };
        let Some(w) = self.float_tensor(frame, a.pos[1], "conv") else {
            return Val::Poison;
        };
        let Some((over, into_names)) =
            self.spatial(frame, a, &x, span, "conv(x, w, [h, width] -> [oh, ow], window = [kh, kw])")
        else {
            return Val::Poison;
        };
        let Some(win) = a.kw.get("window") else {
            return self.err(
                Diag::error("`conv` needs `window`: the kernel's dims that slide over the spatial ones")
                    .at(span, "no window")
                    .help("write `window = [kh, kw]`, dims of the kernel, one per spatial dim"),
            );
        };
        let Some(window) = self.dim_list(frame, win, &w, "window") else {
            return Val::Poison;
        };
        if window.len() != over.len() {
            return self.err(
                Diag::error(format!("{} window dims for {} spatial dims", window.len(), over.len()))
                    .at(win.span, "one per spatial dim")
                    .help("name one kernel dim per dim the window slides over"),
            );
        }
        let per = match a.kw.get("per") {
            Some(e) => match self.dim_list(frame, e, &w, "per") {
                Some(p) => p,
                None => return Val::Poison,
            },
            None => Vec::new(),
        };
        for d in &per {
            if !x.ty.has(&d.name) {
                return self.err(
                    Diag::error(format!("`per` dim `{}` is not a dim of the input {}", d.name, x.ty))
                        .at(span, "in this `conv`")
                        .help("`per` names dims of both the input and the kernel that are not summed (groups, depthwise channels)"),
                );
            }
        }
        let Some(slide) = self.slide(frame, a, 1) else {
            return Val::Poison;
        };
        let Some(u) = self.unfold(frame, &x, &over, &into_names, &window, &slide, 0.0, span) else {
            return Val::Poison;
        };
        // Order the windows for the contraction: other dims, `per` dims, the
        // output positions, then the summed dims (input channels, window).
        let summed: Vec<&Dim> =
            x.ty.dims.iter().filter(|d| w.ty.has(&d.name) && !per.contains(d) && !over.contains(d)).collect();
        let positions = u_spatial(&u, &over, &x);
        let mut order: Vec<Dim> =
            u.ty.dims.iter().filter(|d| !w.ty.has(&d.name) && !positions.contains(d)).cloned().collect();
        order.extend(per.iter().cloned());
        order.extend(positions);
        order.extend(summed.iter().map(|d| (*d).clone()));
        order.extend(window.iter().cloned());
        let u = if order != u.ty.dims {
            let ty = TensorType::new(u.ty.dtype, order);
            TVal { id: self.emit(Op::Permute, vec![u.id], ty.clone(), span).id, ty, param: None }
        } else {
            u
        };
        let unfolded_size = self.act_size(&u.ty);
        let out = self.matmul(u, w, a.pos[0].span, a.pos[1].span, span);
        // A convolution keeps its input for the backward pass, not the windows.
        let fix = self.act_size(&x.ty) - unfolded_size;
        self.add_cost(OpCost { act_none: fix, act_selective: fix, ..OpCost::default() });
        out
    }

    /// `max_pool(x, [h, width] -> [oh, ow], size, stride = size, padding)`, and `avg_pool`.
    pub(super) fn pool(&mut self, frame: &mut Frame, a: &Args, max: bool, span: Span) -> Val {
        let name = if max { "max_pool" } else { "avg_pool" };
        let Some(x) = self.float_tensor(frame, a.pos[0], name) else {
            return Val::Poison;
        };
        let usage = format!("{name}(x, [h, width] -> [oh, ow], size = 3, stride = 2, padding = 1)");
        let Some((over, into_names)) = self.spatial(frame, a, &x, span, &usage) else {
            return Val::Poison;
        };
        let Some(size) = a.kw.get("size") else {
            return self.err(
                Diag::error(format!("`{name}` needs `size`, the window's width"))
                    .at(span, "no size")
                    .help(format!("write `{usage}`")),
            );
        };
        let Some(k) = self.whole(frame, size, "size", 1) else {
            return Val::Poison;
        };
        let Some(slide) = self.slide(frame, a, k) else {
            return Val::Poison;
        };
        if slide.padding * 2 > k {
            return self.err(
                Diag::error(format!("padding {} is more than half the window {k}", slide.padding))
                    .at(span, "too much padding")
                    .help("pad at most half the window, as PyTorch requires"),
            );
        }
        let window: Vec<Dim> = over.iter().map(|d| Dim::new(format!("{}_window", d.name), k)).collect();
        // Max pooling pads with the lowest number (never the maximum), averaging with zeros.
        let fill = if max { f64::MIN } else { 0.0 };
        let Some(u) = self.unfold(frame, &x, &over, &into_names, &window, &slide, fill, span) else {
            return Val::Poison;
        };
        if max {
            // The backward pass needs the input and the maxima (as cuDNN keeps them).
            self.save(&x.ty);
        }
        let op = if max { ReduceOp::Max } else { ReduceOp::Mean };
        let dims: Vec<Dim> = u.ty.dims.iter().filter(|d| !window.contains(d)).cloned().collect();
        let out = TensorType::new(x.ty.dtype, dims);
        let reduced = window.iter().map(|d| d.name.clone()).collect();
        Val::Tensor(self.emit(Op::Reduce { op, dims: reduced }, vec![u.id], out, span))
    }

    /// `slice(x, d -> part, start = s, size = n)`: positions s .. s + n of `d`
    /// as the dim `part` (declared, or new with `size`).
    pub(super) fn slice(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(x) = self.tensor(frame, a.pos[0]) else {
            return Val::Poison;
        };
        let usage = "write `slice(x, seq -> prefix, start = 0, size = 16)`";
        let [(from, to, false, false, mspan)] = a.maps.as_slice() else {
            return self.err(
                Diag::error("`slice` takes one dim and the dim its slice becomes")
                    .at(span, "no `d -> part`")
                    .help(usage),
            );
        };
        let (Some(f), Some(t)) = (from.first(), to.first()) else {
            return self.err(Diag::error("`slice` maps one dim to one dim").at(*mspan, "here").help(usage));
        };
        let Some(d) = self.dim_in(frame, &f.name, f.span, &x.ty) else {
            return Val::Poison;
        };
        let (Some(start), Some(size)) = (self.whole_kw(frame, a, "start", 0), self.whole_kw(frame, a, "size", 1))
        else {
            return Val::Poison;
        };
        let start = start.unwrap_or(0);
        let declared = self
            .bound(frame, &t.name)
            .or_else(|| frame.local_dims.get(&t.name).cloned())
            .or_else(|| self.model_const(&t.name).and_then(|_| self.dim(frame, &t.name, t.span)));
        let part = match (declared, size) {
            (Some(p), Some(n)) if p.size != n => {
                return self.err(
                    Diag::error(format!("`{}` is {}, but the slice takes {n}", p.name, p.size))
                        .at(t.span, "size mismatch")
                        .help("drop `size`, or slice into a new name"),
                );
            }
            (Some(p), _) => p,
            (None, Some(n)) => {
                let p = Dim::new(&t.name, n);
                frame.local_dims.insert(p.name.clone(), p.clone());
                p
            }
            (None, None) => {
                return self.err(
                    Diag::error(format!("the slice's size is unknown: `{}` is not a declared dim", t.name))
                        .at(t.span, "new name")
                        .help("give `size = n`, or slice into a declared dim"),
                );
            }
        };
        if start.saturating_add(part.size) > d.size {
            return self.err(
                Diag::error(format!(
                    "positions {start}..{} are outside `{}` of size {}",
                    start.saturating_add(part.size),
                    d.name,
                    d.size
                ))
                .at(span, "out of range")
                .help("slice within the dim"),
            );
        }
        if part.name != d.name && x.ty.has(&part.name) {
            return self.err(
                Diag::error(format!("`{}` is already a dim of {}", part.name, x.ty))
                    .at(t.span, "duplicate")
                    .help("slice into a new name"),
            );
        }
        let dims = x.ty.dims.iter().map(|o| if o.name == d.name { part.clone() } else { o.clone() }).collect();
        let op = Op::Slice { dim: d.name.clone(), start, to: part.name.clone() };
        Val::Tensor(self.emit(op, vec![x.id], TensorType::new(x.ty.dtype, dims), span))
    }

    /// The spatial dims of `x` and the names of the positions they become: `[h, width] -> [oh, ow]`.
    fn spatial(
        &mut self,
        frame: &mut Frame,
        a: &Args,
        x: &TVal,
        span: Span,
        usage: &str,
    ) -> Option<(Vec<Dim>, Vec<Ident>)> {
        let [(from, to, _, _, mspan)] = a.maps.as_slice() else {
            self.err(
                Diag::error("the spatial dims and their outputs are missing")
                    .at(span, "no `[h, width] -> [oh, ow]`")
                    .help(format!("write `{usage}`")),
            );
            return None;
        };
        if from.len() != to.len() || from.is_empty() || from.len() > 3 {
            self.err(
                Diag::error(format!("{} spatial dims map to {} outputs", from.len(), to.len()))
                    .at(*mspan, "one output per spatial dim, 1 to 3 of them")
                    .help(format!("write `{usage}`")),
            );
            return None;
        }
        let mut over = Vec::new();
        for f in from.iter() {
            over.push(self.dim_in(frame, &f.name, f.span, &x.ty)?);
        }
        Some((over, to.to_vec()))
    }

    /// Dims of `t` named in a list `[a, b]`.
    fn dim_list(&mut self, frame: &mut Frame, e: &Expr, t: &TVal, what: &str) -> Option<Vec<Dim>> {
        let ExprKind::List(items) = &e.kind else {
            self.err(
                Diag::error(format!("`{what}` must be a list of dims"))
                    .at(e.span, "not a list")
                    .help(format!("write `{what} = [kh, kw]`")),
            );
            return None;
        };
        items.iter().map(|i| self.dim_of(frame, i, &t.ty)).collect()
    }

    /// Keyword `key` if given, a whole number of at least `min`; `None` after an error.
    pub(super) fn whole_kw(&mut self, frame: &mut Frame, a: &Args, key: &str, min: u64) -> Option<Option<u64>> {
        match a.kw.get(key) {
            Some(e) => self.whole(frame, e, key, min).map(Some),
            None => Some(None),
        }
    }

    /// A whole-number keyword of at least `min`.
    pub(super) fn whole(&mut self, frame: &mut Frame, e: &Expr, what: &str, min: u64) -> Option<u64> {
        let v = self.eval_const(frame, e)?;
        if v.fract() != 0.0 || v < min as f64 || v > 1e12 {
            self.err(
                Diag::error(format!("`{what}` must be a whole number from {min}, got {v}"))
                    .at(e.span, "not a whole number")
                    .help(format!("for example `{what} = {}`", min.max(1))),
            );
            return None;
        }
        Some(v as u64)
    }

    fn slide(&mut self, frame: &mut Frame, a: &Args, stride: u64) -> Option<Slide> {
        let mut s = Slide { stride, padding: 0, dilation: 1 };
        for (key, min) in [("stride", 1), ("padding", 0), ("dilation", 1)] {
            if let Some(v) = self.whole_kw(frame, a, key, min)? {
                match key {
                    "stride" => s.stride = v,
                    "padding" => s.padding = v,
                    _ => s.dilation = v,
                }
            }
        }
        Some(s)
    }

    /// Emit the `unfold` of `x`'s windows, declaring the output position dims.
    #[allow(clippy::too_many_arguments)]
    fn unfold(
        &mut self,
        frame: &mut Frame,
        x: &TVal,
        over: &[Dim],
        into: &[Ident],
        window: &[Dim],
        s: &Slide,
        fill: f64,
        span: Span,
    ) -> Option<TVal> {
        let mut outs = Vec::new();
        for ((d, name), k) in over.iter().zip(into).zip(window) {
            let Some(n) = unfolded(d.size, k.size, s.stride, s.padding, s.dilation) else {
                self.err(
                    Diag::error(format!(
                        "a window of {} (dilation {}) does not fit `{}` = {} with padding {}",
                        k.size, s.dilation, d.name, d.size, s.padding
                    ))
                    .at(span, "window larger than the padded input")
                    .help("use a smaller window or dilation, or more padding"),
                );
                return None;
            };
            outs.push(self.position_dim(frame, name, n)?);
        }
        let mut dims: Vec<Dim> =
            x.ty.dims
                .iter()
                .map(|d| over.iter().position(|o| o == d).map_or_else(|| d.clone(), |i| outs[i].clone()))
                .collect();
        dims.extend(window.iter().cloned());
        let names = |ds: &[Dim]| ds.iter().map(|d| d.name.clone()).collect();
        let windows = Windows {
            over: names(over),
            into: names(&outs),
            window: names(window),
            stride: s.stride,
            padding: s.padding,
            dilation: s.dilation,
        };
        let op = Op::Unfold { windows, fill };
        let ty = TensorType::new(x.ty.dtype, dims);
        let id = self.emit(op, vec![x.id], ty.clone(), span).id;
        Some(TVal { id, ty, param: None })
    }

    /// An output position dim: a declared dim of that size, or a new one.
    fn position_dim(&mut self, frame: &mut Frame, name: &Ident, size: u64) -> Option<Dim> {
        let known = match self.bound(frame, &name.name).or_else(|| frame.local_dims.get(&name.name).cloned()) {
            Some(d) => Some(d),
            None => self.model_const(&name.name).and_then(|_| self.dim(frame, &name.name, name.span)),
        };
        match known {
            Some(d) if d.size != size => {
                self.err(
                    Diag::error(format!("`{}` is {}, but the windows take {size} positions", d.name, d.size))
                        .at(name.span, "size mismatch")
                        .help(format!("use a new name, or a dim of size {size}")),
                );
                None
            }
            Some(d) => Some(d),
            None => {
                let d = Dim::new(&name.name, size);
                frame.local_dims.insert(d.name.clone(), d.clone());
                Some(d)
            }
        }
    }
}

/// The output position dims of an unfolded `x`, in `over`'s order.
fn u_spatial(u: &TVal, over: &[Dim], x: &TVal) -> Vec<Dim> {
    // Unfold keeps x's dim order with each spatial dim replaced in place.
    x.ty.dims.iter().enumerate().filter(|(_, d)| over.contains(d)).map(|(i, _)| u.ty.dims[i].clone()).collect()
}
