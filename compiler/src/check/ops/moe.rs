//! Mixture-of-experts routing: top-k with a capacity factor or dropless,
//! dispatch to experts and combine back.

use super::Args;
use crate::check::walk::RouteVal;
use crate::check::walk::{Frame, Val, Walker};
use crate::diag::Diag;
use crate::ir::Op;
use crate::model::{Dim, Routing, TensorType};
use crate::syntax::ast::ExprKind;
use crate::syntax::span::Span;
use std::rc::Rc;

impl Walker<'_> {
    pub(super) fn top_k(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(probs) = self.float_tensor(frame, a.pos[0], "top_k") else {
            return Val::Poison;
        };
        let Some(expert) = probs.ty.dims.last().cloned() else {
            return self.err(
                Diag::error("`top_k` of a scalar")
                    .at(a.pos[0].span, "no dims")
                    .help("route router probabilities [..., expert]"),
            );
        };
        let k = match a.kw.get("k") {
            Some(e) => match self.eval_const(frame, e) {
                Some(v) if v.fract() == 0.0 && v >= 1.0 && v <= expert.size as f64 => v as u64,
                Some(v) => {
                    return self.err(
                        Diag::error(format!("`k` = {v} must be a whole number from 1 to the {} experts", expert.size))
                            .at(e.span, "bad k")
                            .help("Switch routes to 1 expert, Mixtral and GShard to 2"),
                    );
                }
                None => return Val::Poison,
            },
            None => 1,
        };
        let capacity = match a.kw.get("capacity") {
            None => None,
            Some(e) => match &e.kind {
                ExprKind::Name(nm) if nm == "dropless" => None,
                // A capacity of 0 is `dropless` passed through a constant.
                _ => match self.eval_const(frame, e) {
                    Some(0.0) => None,
                    Some(c) if c > 0.0 && c.is_finite() => Some(c),
                    Some(c) => {
                        return self.err(
                            Diag::error(format!("capacity factor must be positive, got {c}"))
                                .at(e.span, "bad capacity")
                                .help("typical factors are 1.0 to 2.0, or `dropless`"),
                        );
                    }
                    None => return Val::Poison,
                },
            },
        };
        let tokens: Vec<Dim> = probs.ty.dims[..probs.ty.dims.len() - 1].to_vec();
        let t: u64 = tokens.iter().map(|d| d.size).fold(1u64, u64::saturating_mul);
        let ideal = t.saturating_mul(k) as f64 / expert.size as f64;
        let slot = match capacity {
            Some(c) => (ideal * c).ceil().max(1.0) as u64,
            // Dropless: an expert may receive every token (a static worst case).
            None => t.max(1),
        };
        self.slot_useful.insert(slot, (ideal / slot as f64).min(1.0));
        self.expert_dims.insert(expert.name.clone(), (expert.size, k));
        if !self.routings.iter().any(|r| r.expert_dim == expert.name && r.top_k == k && r.capacity == capacity) {
            self.routings.push(Routing {
                expert_dim: expert.name.clone(),
                experts: expert.size,
                top_k: k,
                capacity,
                span,
            });
        }
        self.save(&probs.ty);
        let gates = self.emit(Op::TopK { k, capacity, slots: slot }, vec![probs.id], probs.ty.clone(), span);
        Val::Route(Rc::new(RouteVal {
            tokens,
            expert,
            slot: Dim::new("slot", slot),
            dropless: capacity.is_none(),
            gates: gates.id,
            probs: probs.id,
        }))
    }

    pub(super) fn dispatch_combine(&mut self, frame: &mut Frame, n: &str, a: &Args, span: Span) -> Val {
        let Some(r) = self.route(frame, a.pos[0]) else {
            return Val::Poison;
        };
        let Some(x) = self.float_tensor(frame, a.pos[1], n) else {
            return Val::Poison;
        };
        if n == "dispatch" {
            let nt = r.tokens.len();
            if x.ty.dims.len() <= nt || x.ty.dims[..nt] != r.tokens[..] {
                let toks: Vec<String> = r.tokens.iter().map(|d| d.name.clone()).collect();
                return self.err(
                    Diag::error(format!(
                        "`dispatch` input {} does not start with the routed token dims [{}]",
                        x.ty,
                        toks.join(", ")
                    ))
                    .at(a.pos[1].span, "wrong token dims")
                    .help("dispatch the same tokens that were routed"),
                );
            }
            if self.expert_dims.contains_key(&r.expert.name) && x.ty.has(&r.expert.name) {
                return self.err(
                    Diag::error("`dispatch` input already has the expert dim")
                        .at(a.pos[1].span, "here")
                        .help("dispatch token features"),
                );
            }
            let mut dims = vec![r.expert.clone(), r.slot.clone()];
            dims.extend(x.ty.dims[nt..].iter().cloned());
            let out = TensorType::new(x.ty.dtype, dims);
            self.save(&out);
            self.exchange_cost(&out, &r);
            Val::Tensor(self.emit(Op::Dispatch, vec![r.gates, x.id], out, span))
        } else {
            let ok = x.ty.dims.len() > 2 && x.ty.dims[0] == r.expert && x.ty.dims[1] == r.slot;
            if !ok {
                return self.err(
                    Diag::error(format!("`combine` input {} must start with [{}, slot]", x.ty, r.expert.name))
                        .at(a.pos[1].span, "not expert outputs")
                        .help("combine what the experts computed on dispatched tokens"),
                );
            }
            self.save(&x.ty);
            self.exchange_cost(&x.ty, &r);
            let mut dims = r.tokens.clone();
            dims.extend(x.ty.dims[2..].iter().cloned());
            Val::Tensor(self.emit(Op::Combine, vec![r.gates, x.id], TensorType::new(x.ty.dtype, dims), span))
        }
    }

    /// Bytes a rank exchanges to move its routed tokens (`[expert, slot, ...]`)
    /// to or from their experts: the whole capacity buffer with a capacity
    /// factor (padding included, as GShard and Switch send it), the routed
    /// tokens only when dropless (a worst-case buffer is never sent whole).
    fn exchange_cost(&mut self, ty: &TensorType, r: &RouteVal) {
        let useful = if r.dropless { self.slot_useful.get(&r.slot.size).copied().unwrap_or(1.0) } else { 1.0 };
        let elem = if ty.dtype.is_float() { self.act_bytes } else { ty.dtype.bytes() };
        let bytes = ty.numel() as f64 * elem as f64 * useful / self.compute_split(ty.dims.iter()) as f64;
        self.add_cost(crate::model::OpCost { exchange_bytes: bytes, exchanges: 1.0, ..Default::default() });
    }
}
