//! Block calls: matching arguments to parameters, binding the signature's
//! dims to the caller's, expanding the body inline, checking the result.

use super::walk::{Frame, Val, Walker};
use crate::diag::{Diag, unknown_help};
use crate::model::{Dim, TensorType};
use crate::syntax::ast::{self, Arg, DimEntry};
use crate::syntax::span::Span;
use std::rc::Rc;

impl Walker<'_> {
    pub(super) fn call_block(&mut self, frame: &mut Frame, def: &Rc<ast::BlockDef>, args: &[Arg], span: Span) -> Val {
        let bname = def.name.name.clone();
        if self.call_stack.contains(&bname) {
            let chain = format!("{} -> {bname}", self.call_stack.join(" -> "));
            return self.err(
                Diag::error(format!("block `{bname}` calls itself ({chain})"))
                    .at(span, "recursive call")
                    .also(def.name.span, "block defined here")
                    .help("blocks are expanded inline, so they cannot recurse; use `repeat` for a stack of layers"),
            );
        }
        if self.call_stack.len() > 64 {
            return self.err(
                Diag::error("blocks nested more than 64 deep").at(span, "here").help("flatten the block structure"),
            );
        }
        // Match arguments to parameters.
        let mut given: Vec<Option<(Val, Span)>> = vec![None; def.params.len()];
        // `name -> dim`: inside the block, the dim `name` is the caller's `dim`.
        let mut dim_args: Vec<(ast::Ident, Dim, Span)> = Vec::new();
        let mut pos = 0;
        for a in args {
            match a {
                Arg::Pos(e) => {
                    if pos >= def.params.len() {
                        let v = self.expr(frame, e);
                        drop(v);
                        return self.err(
                            Diag::error(format!("block `{bname}` takes {} arguments, got more", def.params.len()))
                                .at(e.span, "extra argument")
                                .also(def.name.span, "block defined here")
                                .help("remove the extra argument"),
                        );
                    }
                    let v = self.expr(frame, e);
                    given[pos] = Some((v, e.span));
                    pos += 1;
                }
                Arg::Kw(k, e) => {
                    let Some(i) = def.params.iter().position(|p| param_name(p) == k.name) else {
                        let help = unknown_help("parameter", &k.name, def.params.iter().map(param_name));
                        return self.err(
                            Diag::error(format!("block `{bname}` has no parameter `{}`", k.name))
                                .at(k.span, "unknown keyword")
                                .help(help),
                        );
                    };
                    if given[i].is_some() {
                        return self.err(
                            Diag::error(format!("argument `{}` given twice", k.name))
                                .at(k.span, "again here")
                                .help("give each argument once"),
                        );
                    }
                    let v = self.expr(frame, e);
                    given[i] = Some((v, e.span));
                }
                Arg::DimMap { from, to, from_list, to_list, span } => {
                    if *from_list || *to_list || from.len() != 1 || to.len() != 1 {
                        return self.err(
                            Diag::error("a dim argument passes one dim")
                                .at(*span, "a list here")
                                .help("write one `name -> dim` per dim, e.g. `vit_layer(h, heads -> image_heads, mlp -> image_mlp)`"),
                        );
                    }
                    if dim_args.iter().any(|(n, _, _): &(ast::Ident, _, _)| n.name == from[0].name) {
                        return self.err(
                            Diag::error(format!("dim `{}` passed twice", from[0].name))
                                .at(*span, "again here")
                                .help("pass each dim once"),
                        );
                    }
                    // The dim is the caller's: it follows the caller's own bindings.
                    let Some(d) = self.dim(frame, &to[0].name, to[0].span) else {
                        return Val::Poison;
                    };
                    dim_args.push((from[0].clone(), d, *span));
                }
            }
        }
        let mut callee = Frame { is_block: true, layer: frame.layer, ..Frame::default() };
        let count = frame.call_counts.entry(bname.clone()).or_insert(0);
        let seg = if *count == 0 { bname.clone() } else { format!("{bname}_{count}") };
        *count += 1;
        callee.path = if frame.path.is_empty() { seg } else { format!("{}.{seg}", frame.path) };
        let mut poisoned = false;
        // Bind constants first: tensor signatures may use them.
        for (i, p) in def.params.iter().enumerate() {
            if let ast::BlockParam::Const { name, default } = p {
                let v = match given[i].take() {
                    Some((v, _)) => v,
                    None => self.expr(frame, default),
                };
                match v {
                    Val::Num(_) | Val::Bool(_) | Val::Str(_) => {
                        callee.consts.insert(name.name.clone(), v);
                    }
                    Val::Poison => poisoned = true,
                    other => {
                        self.err(
                            Diag::error(format!(
                                "block parameter `{}` is a constant, but got {}",
                                name.name,
                                other.kind()
                            ))
                            .at(span, "in this call")
                            .also(name.span, "declared as a constant here")
                            .help("declare it as `name: dtype[dims]` to pass a tensor"),
                        );
                        poisoned = true;
                    }
                }
            }
        }
        for (i, p) in def.params.iter().enumerate() {
            let ast::BlockParam::Tensor { name, ty } = p else {
                continue;
            };
            let Some((v, vspan)) = given[i].take() else {
                self.err(
                    Diag::error(format!("missing argument `{}` of block `{bname}`", name.name))
                        .at(span, "in this call")
                        .also(name.span, "parameter declared here")
                        .help("pass a tensor for every tensor parameter"),
                );
                poisoned = true;
                continue;
            };
            let t = match v {
                Val::Tensor(t) => t,
                Val::Poison => {
                    poisoned = true;
                    continue;
                }
                other => {
                    self.err(
                        Diag::error(format!(
                            "argument `{}` of `{bname}` must be a tensor, found {}",
                            name.name,
                            other.kind()
                        ))
                        .at(vspan, "not a tensor")
                        .also(ty.span, "expected type")
                        .help("pass a tensor value"),
                    );
                    poisoned = true;
                    continue;
                }
            };
            if !self.bind(&mut callee, ty, &t.ty, &bname, &name.name, vspan) {
                poisoned = true;
                continue;
            }
            callee.values.insert(name.name.clone(), Val::Tensor(t));
        }
        // Dim arguments bind after the tensors, which they must agree with.
        let mut own = Vec::new();
        for (name, d, aspan) in dim_args {
            if let Some(b) = callee.bindings.get(&name.name)
                && *b != d
            {
                self.err(
                    Diag::error(format!(
                        "`{} -> {}` disagrees with the block's tensor arguments, which bind `{}` to `{}`",
                        name.name, d.name, name.name, b.name
                    ))
                    .at(aspan, "this dim argument")
                    .help("a dim named in the block's signature takes the argument's dim; pass the tensor with that dim, or drop the dim argument"),
                );
                poisoned = true;
                continue;
            }
            let id = self.dim_args_used.len();
            self.dim_args_used.push(false);
            callee.bindings.insert(name.name.clone(), d);
            callee.dim_args.insert(name.name.clone(), id);
            own.push((id, name, aspan));
        }
        // The caller's dim arguments reach the blocks it calls, unless a
        // signature or this call binds the name anew.
        for (name, &id) in &frame.dim_args {
            if !callee.bindings.contains_key(name)
                && let Some(d) = frame.bindings.get(name)
            {
                callee.bindings.insert(name.clone(), d.clone());
                callee.dim_args.insert(name.clone(), id);
            }
        }
        if poisoned {
            return Val::Poison;
        }
        self.call_stack.push(bname.clone());
        self.body(&mut callee, &def.body.stmts);
        self.call_stack.pop();
        for (id, name, aspan) in own {
            if !self.dim_args_used[id] {
                self.err(
                    Diag::error(format!(
                        "dim argument `{}` has no effect: `{bname}` uses no dim `{}` here",
                        name.name, name.name
                    ))
                    .at(aspan, "never read")
                    .also(def.name.span, "block defined here")
                    .help("pass only dims that the block or the blocks it calls use (check the spelling)"),
                );
            }
        }
        let Some(ret) = callee.returned.take() else {
            return self.err(
                Diag::error(format!("block `{bname}` does not return a value"))
                    .at(def.body.span, "no `return` in this body")
                    .help("end the block with `return <expr>`"),
            );
        };
        if let (Some(rt), Val::Tensor(t)) = (&def.ret, &ret) {
            let Some(dims) = self.type_dims(&mut callee, rt) else {
                return Val::Poison;
            };
            let dtype = rt.dtype.map(|d| d.0).unwrap_or(t.ty.dtype);
            let expect = TensorType::new(dtype, dims);
            if expect != t.ty {
                return self.err(
                    Diag::error(format!("block `{bname}` returns {} but declares {expect}", t.ty))
                        .at(span, "in this call")
                        .also(rt.span, "declared return type")
                        .help("make the returned value match the declared type (dims by name and order)"),
                );
            }
        }
        let mut ret = ret;
        if let Val::Tensor(t) = &mut ret {
            t.param = None;
        }
        ret
    }

    /// Bind a block signature's dims to the argument's dims.
    pub(super) fn bind(
        &mut self,
        callee: &mut Frame,
        sig: &ast::TypeExpr,
        actual: &TensorType,
        block: &str,
        arg: &str,
        span: Span,
    ) -> bool {
        let mismatch = |w: &mut Self, why: String| {
            w.err(
                Diag::error(format!(
                    "argument `{arg}` of `{block}` has type {actual}, which does not fit `{}`",
                    crate::syntax::printer::type_expr(sig)
                ))
                .at(span, why)
                .also(sig.span, "expected by the block")
                .help("dims bind by position; the same signature name must bind the same dim everywhere"),
            );
            false
        };
        if let Some((dt, _)) = sig.dtype
            && dt != actual.dtype
        {
            return mismatch(self, format!("dtype {} instead of {}", actual.dtype.name(), dt.name()));
        }
        let has_ellipsis = sig.dims.iter().any(|d| matches!(d, DimEntry::Ellipsis(_)));
        let named: Vec<&DimEntry> = sig.dims.iter().filter(|d| !matches!(d, DimEntry::Ellipsis(_))).collect();
        let (lead, rest) = if has_ellipsis {
            if actual.dims.len() < named.len() {
                return mismatch(self, format!("{} dims, but at least {} are needed", actual.dims.len(), named.len()));
            }
            actual.dims.split_at(actual.dims.len() - named.len())
        } else {
            if actual.dims.len() != named.len() {
                return mismatch(self, format!("{} dims instead of {}", actual.dims.len(), named.len()));
            }
            actual.dims.split_at(0)
        };
        if has_ellipsis {
            match &callee.ellipsis {
                Some(e) if e.as_slice() != lead => {
                    return mismatch(self, "its leading dims differ from another argument's `...`".into());
                }
                _ => callee.ellipsis = Some(lead.to_vec()),
            }
        }
        for (entry, d) in named.iter().zip(rest) {
            let DimEntry::Named { name, size } = entry else {
                continue;
            };
            if let Some(e) = size {
                let mut tmp = callee.clone();
                if let Some(v) = self.eval_const(&mut tmp, e)
                    && v != d.size as f64
                {
                    return mismatch(self, format!("dim `{}` has size {} instead of {v}", d.name, d.size));
                }
            }
            match callee.bindings.get(&name.name) {
                Some(b) if b != d => {
                    return mismatch(
                        self,
                        format!("`{}` is bound to `{}` elsewhere but is `{}` here", name.name, b.name, d.name),
                    );
                }
                _ => {
                    callee.bindings.insert(name.name.clone(), d.clone());
                }
            }
        }
        true
    }
}

fn param_name(p: &ast::BlockParam) -> &str {
    match p {
        ast::BlockParam::Tensor { name, .. } | ast::BlockParam::Const { name, .. } => &name.name,
    }
}
