//! Structural ops: split, merge, rename, concat, and ViT patch extraction.

use super::Args;
use crate::check::walk::{Frame, Val, Walker};
use crate::diag::Diag;
use crate::ir::Op;
use crate::model::{Dim, TensorType};
use crate::syntax::ast::ExprKind;
use crate::syntax::span::Span;

impl Walker<'_> {
    pub(super) fn split(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        if let Some(&(from, to, from_list, _, mspan)) = a.maps.first() {
            // split(x, d -> [a, b]): one dim into several.
            let Some(x) = self.tensor(frame, a.pos[0]) else {
                return Val::Poison;
            };
            if from.len() != 1 || from_list {
                return self.err(
                    Diag::error("`split` maps one dim to a list of dims")
                        .at(mspan, "here")
                        .help("write `split(x, embed -> [heads, head_dim])`"),
                );
            }
            let Some(src) = self.dim_in(frame, &from[0].name, from[0].span, &x.ty) else {
                return Val::Poison;
            };
            // One new name may be left for the split to size (`c -> [groups, width]`).
            let known = |w: &mut Self, frame: &Frame, n: &str| {
                w.bound(frame, n).is_some()
                    || frame.local_dims.contains_key(n)
                    || w.model_const(n).is_some()
                    || matches!(frame.consts.get(n), Some(Val::Num(_)))
            };
            let open: Vec<usize> = (0..to.len()).filter(|&i| !known(self, frame, &to[i].name)).collect();
            if open.len() == 1 {
                let mut rest = 1u64;
                for (i, t) in to.iter().enumerate() {
                    if i != open[0] {
                        let Some(d) = self.dim(frame, &t.name, t.span) else {
                            return Val::Poison;
                        };
                        rest = rest.saturating_mul(d.size);
                    }
                }
                if rest == 0 || !src.size.is_multiple_of(rest) {
                    return self.err(
                        Diag::error(format!("`{}` of size {} does not split by {rest}", src.name, src.size))
                            .at(mspan, "sizes do not divide")
                            .help("the other dims' sizes must divide the split dim's size"),
                    );
                }
                let t = &to[open[0]];
                frame.local_dims.insert(t.name.clone(), Dim::new(&t.name, src.size / rest));
            }
            let mut new = Vec::new();
            for t in to {
                let Some(d) = self.dim(frame, &t.name, t.span) else {
                    return Val::Poison;
                };
                if x.ty.has(&d.name) && d.name != src.name {
                    return self.err(
                        Diag::error(format!("`{}` is already a dim of {}", d.name, x.ty))
                            .at(t.span, "duplicate dim")
                            .help("split into new dim names"),
                    );
                }
                new.push(d);
            }
            let prod: u64 = new.iter().map(|d| d.size).fold(1u64, u64::saturating_mul);
            if prod != src.size {
                let sizes: Vec<String> = new.iter().map(|d| format!("{}={}", d.name, d.size)).collect();
                return self.err(
                    Diag::error(format!(
                        "cannot split `{}` of size {} into {} (product {prod})",
                        src.name,
                        src.size,
                        sizes.join(" × ")
                    ))
                    .at(mspan, "sizes do not multiply out")
                    .help("the new dims' sizes must multiply to the split dim's size"),
                );
            }
            let mut dims = Vec::new();
            for d in &x.ty.dims {
                if d.name == src.name {
                    dims.extend(new.iter().cloned());
                } else {
                    dims.push(d.clone());
                }
            }
            let op = Op::SplitDim { dim: src.name.clone(), into: new.iter().map(|d| d.name.clone()).collect() };
            return Val::Tensor(self.emit(op, vec![x.id], TensorType::new(x.ty.dtype, dims), span));
        }
        // split(x, qkv): unbind along a dim into a tuple.
        let Some(x) = self.tensor(frame, a.pos[0]) else {
            return Val::Poison;
        };
        let Some(d) = self.dim_of(frame, a.pos[1], &x.ty) else {
            return Val::Poison;
        };
        if d.size > 64 {
            return self.err(
                Diag::error(format!("`split(x, {})` would make {} values", d.name, d.size))
                    .at(span, "too many parts")
                    .help("unbinding is for small dims like `qkv = 3`; to reshape a dim write `split(x, d -> [a, b])`"),
            );
        }
        let dims: Vec<Dim> = x.ty.dims.iter().filter(|o| o.name != d.name).cloned().collect();
        let part = TensorType::new(x.ty.dtype, dims);
        Val::Tuple(
            (0..d.size)
                .map(|i| {
                    Val::Tensor(self.emit(Op::Take { dim: d.name.clone(), index: i }, vec![x.id], part.clone(), span))
                })
                .collect(),
        )
    }

    pub(super) fn merge(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(x) = self.tensor(frame, a.pos[0]) else {
            return Val::Poison;
        };
        let Some(&(from, to, _, to_list, mspan)) = a.maps.first() else {
            return self.err(
                Diag::error("`merge` needs a mapping")
                    .at(a.pos[0].span, "here")
                    .help("write `merge(x, [heads, head_dim] -> embed)`"),
            );
        };
        if to.len() != 1 || to_list {
            return self.err(
                Diag::error("`merge` maps a list of dims to one dim")
                    .at(mspan, "here")
                    .help("write `merge(x, [heads, head_dim] -> embed)`"),
            );
        }
        let mut src = Vec::new();
        for f in from {
            let Some(d) = self.dim_in(frame, &f.name, f.span, &x.ty) else {
                return Val::Poison;
            };
            src.push(d);
        }
        let prod: u64 = src.iter().map(|d| d.size).fold(1u64, u64::saturating_mul);
        // A new name takes the merged size.
        let name = &to[0].name;
        let declared = self.bound(frame, name).is_some()
            || frame.local_dims.contains_key(name)
            || self.model_const(name).is_some()
            || matches!(frame.consts.get(name), Some(Val::Num(_)));
        if !declared {
            frame.local_dims.insert(name.clone(), Dim::new(name, prod));
        }
        let Some(target) = self.dim(frame, &to[0].name, to[0].span) else {
            return Val::Poison;
        };
        if prod != target.size {
            return self.err(
                Diag::error(format!(
                    "cannot merge dims of total size {prod} into `{}` of size {}",
                    target.name, target.size
                ))
                .at(mspan, "sizes do not multiply out")
                .help("the merged dims' sizes must multiply to the target dim's size"),
            );
        }
        // Merged dims must be adjacent and in order.
        let first = x.ty.dims.iter().position(|d| d.name == src[0].name).expect("present");
        let adjacent = src.iter().enumerate().all(|(i, s)| x.ty.dims.get(first + i).map(|d| &d.name) == Some(&s.name));
        if !adjacent {
            return self.err(
                Diag::error(format!("`merge` needs adjacent dims in order, but {x} has them elsewhere", x = x.ty))
                    .at(mspan, "not adjacent")
                    .help("list the dims in the order they appear in the tensor"),
            );
        }
        if x.ty.has(&target.name) && !src.iter().any(|s| s.name == target.name) {
            return self.err(
                Diag::error(format!("`{}` is already a dim of {}", target.name, x.ty))
                    .at(to[0].span, "duplicate")
                    .help("merge into a new name"),
            );
        }
        let mut dims = x.ty.dims[..first].to_vec();
        dims.push(target.clone());
        dims.extend(x.ty.dims[first + src.len()..].iter().cloned());
        let op = Op::MergeDims { dims: src.iter().map(|d| d.name.clone()).collect(), into: target.name.clone() };
        Val::Tensor(self.emit(op, vec![x.id], TensorType::new(x.ty.dtype, dims), span))
    }

    pub(super) fn rename(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(x) = self.tensor(frame, a.pos[0]) else {
            return Val::Poison;
        };
        if a.pos.len() > 1 || a.maps.is_empty() {
            return self.err(
                Diag::error("`rename` takes a tensor and mappings")
                    .at(a.pos[0].span, "here")
                    .help("write `rename(x, seq -> kv_seq)`"),
            );
        }
        let mut dims = x.ty.dims.clone();
        let (mut renamed_from, mut renamed_to) = (Vec::new(), Vec::new());
        for &(from, to, fl, tl, mspan) in &a.maps {
            if from.len() != 1 || to.len() != 1 || fl || tl {
                return self.err(
                    Diag::error("`rename` maps one dim to one dim")
                        .at(mspan, "here")
                        .help("write `rename(x, seq -> kv_seq)`"),
                );
            }
            let Some(src) = self.dim_in(frame, &from[0].name, from[0].span, &x.ty) else {
                return Val::Poison;
            };
            // The new name takes its size from the old dim unless it is declared.
            let new = match self.model_const(&to[0].name) {
                Some(_) => match self.dim(frame, &to[0].name, to[0].span) {
                    Some(d) => d,
                    None => return Val::Poison,
                },
                None => match self.bound(frame, &to[0].name).or_else(|| frame.local_dims.get(&to[0].name).cloned()) {
                    Some(d) => d,
                    None => {
                        // A new name: declared in this scope with the renamed dim's size.
                        let d = Dim::new(&to[0].name, src.size);
                        frame.local_dims.insert(d.name.clone(), d.clone());
                        d
                    }
                },
            };
            if new.size != src.size {
                return self.err(
                    Diag::error(format!(
                        "cannot rename `{}` (size {}) to `{}` (size {})",
                        src.name, src.size, new.name, new.size
                    ))
                    .at(mspan, "sizes differ")
                    .help("rename keeps the size; use `split` or `merge` to reshape"),
                );
            }
            if dims.iter().any(|d| d.name == new.name) {
                return self.err(
                    Diag::error(format!("`{}` is already a dim of {}", new.name, x.ty))
                        .at(to[0].span, "duplicate")
                        .help("choose a new name"),
                );
            }
            for d in dims.iter_mut() {
                if d.name == src.name {
                    *d = new.clone();
                }
            }
            renamed_from.push(src.name.clone());
            renamed_to.push(new.name.clone());
        }
        let op = Op::Rename { from: renamed_from, to: renamed_to };
        Val::Tensor(self.emit(op, vec![x.id], TensorType::new(x.ty.dtype, dims), span))
    }

    pub(super) fn concat(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let (Some(over), Some(into)) = (a.kw.get("over"), a.kw.get("into")) else {
            return self.err(Diag::error("`concat` needs `over` and `into`").at(span, "missing keywords").help(
                "write `concat(cls, x, over = [one, patches], into = seq)`: each input's own dim, then the result dim",
            ));
        };
        let ExprKind::List(over_names) = &over.kind else {
            return self.err(
                Diag::error("`over` must be a list of dims")
                    .at(over.span, "not a list")
                    .help("write `over = [one, patches]`"),
            );
        };
        if over_names.len() != a.pos.len() {
            return self.err(
                Diag::error(format!("`over` names {} dims for {} inputs", over_names.len(), a.pos.len()))
                    .at(over.span, "one dim per input")
                    .help("name the dim each input is concatenated along"),
            );
        }
        let Some(into_dim) = self.dim_name(frame, into) else {
            return Val::Poison;
        };
        let mut inputs = Vec::new();
        for (e, d) in a.pos.iter().zip(over_names) {
            let Some(t) = self.tensor(frame, e) else {
                return Val::Poison;
            };
            let Some(d) = self.dim_of(frame, d, &t.ty) else {
                return Val::Poison;
            };
            inputs.push((t, d));
        }
        let total: u64 = inputs.iter().map(|(_, d)| d.size).fold(0u64, u64::saturating_add);
        if total != into_dim.size {
            return self.err(
                Diag::error(format!(
                    "concatenated size {total} does not match `{}` = {}",
                    into_dim.name, into_dim.size
                ))
                .at(span, "sizes do not add up")
                .help(format!("the sizes of the `over` dims must add up to `{}`", into_dim.name)),
            );
        }
        // The result: the highest-rank input's dims with its concat dim
        // replaced, then every other input's dims broadcast in by name.
        let lead = (0..inputs.len()).max_by_key(|&i| (inputs[i].0.ty.dims.len(), usize::MAX - i)).unwrap_or(0);
        let (first, fd) = &inputs[lead];
        let dtype = first.ty.dtype;
        let mut dims: Vec<Dim> =
            first.ty.dims.iter().map(|d| if d.name == fd.name { into_dim.clone() } else { d.clone() }).collect();
        for (i, (t, cd)) in inputs.iter().enumerate() {
            if i == lead {
                continue;
            }
            if t.ty.dtype != dtype {
                return self.err(
                    Diag::error("`concat` inputs have different dtypes")
                        .at(span, "mixed dtypes")
                        .help("cast them to one dtype"),
                );
            }
            for d in &t.ty.dims {
                if d.name == cd.name {
                    continue;
                }
                match dims.iter().find(|o| o.name == d.name) {
                    Some(o) if o.size != d.size => {
                        return self.err(
                            Diag::error(format!("dim `{}` differs between `concat` inputs", d.name))
                                .at(span, "size mismatch")
                                .help("inputs must agree on every other dim"),
                        );
                    }
                    Some(_) => {}
                    None => dims.push(d.clone()),
                }
            }
        }
        let op = Op::Concat { over: inputs.iter().map(|(_, d)| d.name.clone()).collect(), into: into_dim.name.clone() };
        let ins = inputs.iter().map(|(t, _)| t.id).collect();
        Val::Tensor(self.emit(op, ins, TensorType::new(dtype, dims), span))
    }

    pub(super) fn patches(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(x) = self.float_tensor(frame, a.pos[0], "patches") else {
            return Val::Poison;
        };
        let (Some(size), Some(into)) = (a.kw.get("size"), a.kw.get("into")) else {
            return self.err(
                Diag::error("`patches` needs `size` and `into`")
                    .at(span, "missing keywords")
                    .help("write `patches(image, size = 16, into = [grid, patch_in])`"),
            );
        };
        let Some(p) = self.positive(frame, size, "size") else {
            return Val::Poison;
        };
        if p.fract() != 0.0 || p > 1e6 {
            return self.err(
                Diag::error(format!("patch size must be a whole number of pixels, got {p}"))
                    .at(size.span, "patch size")
                    .help("ViT uses 14 or 16 pixel patches"),
            );
        }
        let p = p as u64;
        let ExprKind::List(names) = &into.kind else {
            return self.err(
                Diag::error("`into` must be a list of two dims")
                    .at(into.span, "not a list")
                    .help("into = [grid, patch_in]"),
            );
        };
        if names.len() != 2 || x.ty.dims.len() < 3 {
            return self.err(
                Diag::error("`patches` maps [..., channels, height, width] to [..., grid, patch_in]")
                    .at(span, "wrong dims")
                    .help("into = [grid, patch_in] names the patch count and the pixels per patch"),
            );
        }
        let n = x.ty.dims.len();
        let (c, h, w) = (&x.ty.dims[n - 3], &x.ty.dims[n - 2], &x.ty.dims[n - 1]);
        if h.size % p != 0 || w.size % p != 0 {
            return self.err(
                Diag::error(format!("image {}×{} is not divisible into {p}×{p} patches", h.size, w.size))
                    .at(size.span, "patch size")
                    .help("choose a patch size that divides the height and width"),
            );
        }
        let grid = (h.size / p).saturating_mul(w.size / p);
        let pix = c.size.saturating_mul(p).saturating_mul(p);
        let mut out = Vec::new();
        for (e, want) in names.iter().zip([grid, pix]) {
            let ExprKind::Name(nm) = &e.kind else {
                return self
                    .err(Diag::error("expected a dim name").at(e.span, "not a name").help("into = [grid, patch_in]"));
            };
            let d = match self.model_const(nm) {
                Some(_) => match self.dim(frame, nm, e.span) {
                    Some(d) => d,
                    None => return Val::Poison,
                },
                None => Dim::new(nm, want),
            };
            if d.size != want {
                return self.err(
                    Diag::error(format!("`{}` is {} but the image gives {want}", d.name, d.size))
                        .at(e.span, "wrong size")
                        .help(format!(
                            "{}×{} pixels in {p}×{p} patches of {} channels: {grid} patches of {pix} values",
                            h.size, w.size, c.size
                        )),
                );
            }
            out.push(d);
        }
        let mut dims = x.ty.dims[..n - 3].to_vec();
        dims.extend(out);
        Val::Tensor(self.emit(Op::Patches { size: p }, vec![x.id], TensorType::new(x.ty.dtype, dims), span))
    }

    /// `permute(x, [d1, d2, ...])`: the same dims in a new order.
    pub(super) fn permute(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(x) = self.tensor(frame, a.pos[0]) else { return Val::Poison };
        let ExprKind::List(names) = &a.pos[1].kind else {
            return self.err(
                Diag::error("`permute` takes a list of dims")
                    .at(a.pos[1].span, "not a list")
                    .help("write `permute(q, [batch, heads, seq, head_dim])`"),
            );
        };
        let mut dims = Vec::new();
        for e in names {
            let Some(d) = self.dim_of(frame, e, &x.ty) else { return Val::Poison };
            if dims.contains(&d) {
                return self.err(
                    Diag::error(format!("`{}` is listed twice", d.name)).at(e.span, "again").help("list each dim once"),
                );
            }
            dims.push(d);
        }
        if dims.len() != x.ty.dims.len() {
            let missing: Vec<&str> = x.ty.dims.iter().filter(|d| !dims.contains(d)).map(|d| d.name.as_str()).collect();
            return self.err(
                Diag::error(format!("`permute` must list every dim of {}; missing {}", x.ty, missing.join(", ")))
                    .at(span, "incomplete order")
                    .help("name all the dims in their new order"),
            );
        }
        Val::Tensor(self.emit(Op::Permute, vec![x.id], TensorType::new(x.ty.dtype, dims), span))
    }
}
