//! Attention: multi-head, grouped-query, masks, T5 and Transformer-XL
//! relative positions; its FLOPs and the score memory it keeps.

use super::Args;
use crate::check::walk::{Frame, Val, Walker};
use crate::diag::Diag;
use crate::ir::{Op, RelPos};
use crate::model::{Dim, OpCost, TensorType};
use crate::syntax::ast::DType;
use crate::syntax::span::Span;

impl Walker<'_> {
    pub(super) fn attention(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(q) = self.float_tensor(frame, a.pos[0], "attention") else {
            return Val::Poison;
        };
        let Some(k) = self.float_tensor(frame, a.pos[1], "attention") else {
            return Val::Poison;
        };
        let Some(v) = self.float_tensor(frame, a.pos[2], "attention") else {
            return Val::Poison;
        };
        let layout_help = "q is [..., seq, heads, head_dim]; k and v are [..., kv_seq, kv_heads, head_dim] with the same leading dims";
        for (t, e) in [(&q, a.pos[0]), (&k, a.pos[1]), (&v, a.pos[2])] {
            if t.ty.dims.len() < 3 {
                return self.err(
                    Diag::error(format!("attention operand {} has fewer than 3 dims", t.ty))
                        .at(e.span, "too few dims")
                        .help(layout_help),
                );
            }
        }
        let n = q.ty.dims.len();
        let (qs, qh, qd) = (&q.ty.dims[n - 3], &q.ty.dims[n - 2], &q.ty.dims[n - 1]);
        let m = k.ty.dims.len();
        let (ks, kh, kd) = (&k.ty.dims[m - 3], &k.ty.dims[m - 2], &k.ty.dims[m - 1]);
        if q.ty.dims[..n - 3] != k.ty.dims[..m - 3] {
            return self.err(
                Diag::error(format!("attention operands do not line up: q {}, k {}", q.ty, k.ty))
                    .at(span, "leading dims differ")
                    .help(layout_help),
            );
        }
        let vm = v.ty.dims.len();
        if vm != m || v.ty.dims[..vm - 1] != k.ty.dims[..m - 1] {
            return self.err(
                Diag::error(format!("keys {} and values {} must share all dims but the last", k.ty, v.ty))
                    .at(a.pos[2].span, "mismatched values")
                    .help(layout_help),
            );
        }
        if qd != kd {
            return self.err(
                Diag::error(format!(
                    "query head dim `{}`={} differs from key head dim `{}`={}",
                    qd.name, qd.size, kd.name, kd.size
                ))
                .at(a.pos[1].span, "mismatched head_dim")
                .help(layout_help),
            );
        }
        if kh.size == 0 || qh.size % kh.size != 0 {
            return self.err(
                Diag::error(format!("{} query heads cannot be grouped over {} key/value heads", qh.size, kh.size))
                    .at(a.pos[1].span, "heads not divisible")
                    .help("grouped-query attention needs heads divisible by kv_heads"),
            );
        }
        let causal = match a.kw.get("causal") {
            None => false,
            Some(e) => match self.expr(frame, e) {
                Val::Bool(b) => b,
                Val::Poison => return Val::Poison,
                other => {
                    return self.err(
                        Diag::error(format!("`causal` must be true or false, found {}", other.kind()))
                            .at(e.span, "not a boolean")
                            .help("causal = true"),
                    );
                }
            },
        };
        let mut drop_p = 0.0;
        if let Some(e) = a.kw.get("dropout") {
            drop_p = self.eval_const(frame, e).unwrap_or(0.0);
            if !(0.0..1.0).contains(&drop_p) {
                return self.err(
                    Diag::error(format!("attention dropout must be in [0, 1), got {drop_p}"))
                        .at(e.span, "rate")
                        .help("typical rates are 0.0 to 0.1"),
                );
            }
        }
        let lead: Vec<Dim> = q.ty.dims[..n - 3].to_vec();
        let mut ins = vec![q.id, k.id, v.id];
        let mut rel = RelPos::None;
        let mut mask_id = None;
        if let Some(e) = a.kw.get("mask") {
            let Some(mk) = self.tensor(frame, e) else {
                return Val::Poison;
            };
            let allowed: Vec<&Dim> = lead.iter().chain([qs, ks, qh]).collect();
            let fits =
                mk.ty.dtype == DType::Bool && mk.ty.dims.iter().all(|d| allowed.contains(&d)) && mk.ty.has(&ks.name);
            if !fits {
                return self.err(
                    Diag::error(format!("attention mask {} does not fit", mk.ty)).at(e.span, "bad mask").help(format!(
                        "a mask is bool over the key dim `{}`, optionally with the batch, query and head dims",
                        ks.name
                    )),
                );
            }
            ins.push(mk.id);
            mask_id = Some(mk.id);
        }
        if let Some(e) = a.kw.get("rel_bias") {
            // T5 relative position bias: a table [buckets, heads].
            let Some(t) = self.tensor(frame, e) else {
                return Val::Poison;
            };
            if t.ty.dims.len() != 2 || t.ty.dims[1] != *qh {
                return self.err(
                    Diag::error(format!("`rel_bias` table must be [buckets, {}], found {}", qh.name, t.ty))
                        .at(e.span, "bad table")
                        .help("declare `param rel: [buckets, heads]`"),
                );
            }
            let max_distance = match a.kw.get("max_distance") {
                Some(md) => match self.positive(frame, md, "max_distance") {
                    Some(v) => v,
                    None => return Val::Poison,
                },
                None => 128.0,
            };
            ins.push(t.id);
            rel = RelPos::T5 { max_distance };
        }
        if let Some(e) = a.kw.get("rel_pos") {
            // Transformer-XL: projected sinusoid positions [kv_seq, heads, head_dim].
            let Some(r) = self.tensor(frame, e) else {
                return Val::Poison;
            };
            let want = TensorType::new(q.ty.dtype, vec![ks.clone(), qh.clone(), qd.clone()]);
            if r.ty != want {
                return self.err(
                    Diag::error(format!("`rel_pos` must be {want}, found {}", r.ty))
                        .at(e.span, "bad relative positions")
                        .help("project sinusoids: `sinusoid(seq, embed) @ w_r` with `w_r: [embed, heads, head_dim]`"),
                );
            }
            self.save(&r.ty);
            ins.push(r.id);
            if a.kw.contains_key("pos_bias_u") != a.kw.contains_key("pos_bias_v") {
                return self.err(
                    Diag::error("Transformer-XL attention takes both `pos_bias_u` and `pos_bias_v`, or neither")
                        .at(span, "one bias given")
                        .help("give both content and position biases, `[heads, head_dim]` each"),
                );
            }
            rel = RelPos::Xl { biases: a.kw.contains_key("pos_bias_u") };
            for key in ["pos_bias_u", "pos_bias_v"] {
                if let Some(e) = a.kw.get(key) {
                    let Some(u) = self.tensor(frame, e) else {
                        return Val::Poison;
                    };
                    ins.push(u.id);
                    if u.ty.dims != [qh.clone(), qd.clone()] {
                        return self.err(
                            Diag::error(format!("`{key}` must be [{}, {}], found {}", qh.name, qd.name, u.ty))
                                .at(e.span, "bad bias")
                                .help(format!("declare `param u: [{}, {}]`", qh.name, qd.name)),
                        );
                    }
                }
            }
        }
        if rel != RelPos::None && a.kw.contains_key("rel_bias") && a.kw.contains_key("rel_pos") {
            return self.err(
                Diag::error("`rel_bias` (T5) and `rel_pos` (Transformer-XL) are two kinds of relative position")
                    .at(span, "both given")
                    .help("use one of them"),
            );
        }
        let window = match a.kw.get("window") {
            Some(e) => match self.positive(frame, e, "window") {
                Some(w) if w.fract() == 0.0 && w <= 1e12 => Some(w as u64),
                Some(w) => {
                    return self.err(
                        Diag::error(format!("`window` must be a whole number of tokens, got {w}"))
                            .at(e.span, "not whole")
                            .help("for example window = 4096"),
                    );
                }
                None => return Val::Poison,
            },
            None => None,
        };
        // Cost: q·k and p·v over the full score matrix (causal masking not
        // subtracted), times the share of blocks a sparse pattern computes.
        let batch: f64 = lead.iter().map(|d| d.size as f64).product();
        let pairs = batch * qh.size as f64 * qs.size as f64 * ks.size as f64;
        let flops = 2.0 * pairs * qd.size as f64 * 2.0 * self.attention_density(mask_id, qs, ks, causal, window);
        let mut saved = 0.0;
        for t in [&q, &k, &v] {
            saved += self.act_size(&t.ty);
        }
        // Without recompute, the softmax output (and with dropout its mask and
        // output) stay alive: 2 bytes each in 16-bit, 1 byte the mask.
        let head_split = self.shard_factor(&TensorType::new(q.ty.dtype, vec![qh.clone()]));
        let score_elems = pairs / head_split as f64;
        let elem = if q.ty.dtype.is_float() { self.act_bytes as f64 } else { 4.0 };
        let scores = if drop_p > 0.0 { score_elems * (2.0 * elem + 1.0) } else { score_elems * elem };
        let rank = flops / head_split as f64;
        self.add_cost(OpCost {
            flops,
            attn_flops: flops,
            act_none: saved + scores,
            act_selective: saved,
            rank_flops: rank,
            rank_attn_flops: rank,
            kernels: 2.0,
            ..OpCost::default()
        });
        let out = TensorType::new(
            q.ty.dtype,
            q.ty.dims[..n - 1].iter().cloned().chain([v.ty.dims[vm - 1].clone()]).collect(),
        );
        let mask = a.kw.contains_key("mask");
        Val::Tensor(self.emit(Op::Attention { causal, dropout: drop_p, mask, rel, window }, ins, out, span))
    }

    /// The share of the score matrix's blocks that a block-sparse kernel
    /// computes under a mask built in the spec (one `fold` can evaluate)
    /// and a window, relative to the same pattern without them: a causal
    /// pattern counts as dense, the convention of the published runs the
    /// planner is checked against. 1 for a mask from the data.
    fn attention_density(
        &mut self,
        mask: Option<crate::ir::ValueId>,
        qs: &Dim,
        ks: &Dim,
        causal: bool,
        window: Option<u64>,
    ) -> f64 {
        let key = mask.and_then(|m| crate::ir::fold::key(&self.graph, m));
        if key.is_none() && window.is_none() {
            return 1.0;
        }
        // Layers that build the same mask fold it once.
        let cache = (key.clone().unwrap_or_default(), qs.clone(), ks.clone(), causal, window);
        if let Some(d) = self.attention_densities.get(&cache) {
            return *d;
        }
        let folded = mask
            .filter(|_| key.is_some())
            .and_then(|m| crate::ir::fold::constant(&self.graph, m).map(|v| (v, self.graph.ty(m).clone())));
        let blocks = |m: Option<(&[f64], &TensorType)>, w| {
            crate::ir::fold::attention_blocks(m, qs, ks, causal, w, ATTENTION_TILE)
        };
        let sparse = blocks(folded.as_ref().map(|(v, t)| (v.as_slice(), t)), window);
        // A pattern inside the causal triangle, flagged or built, is measured
        // against the triangle, which counts as dense.
        let causal_like = causal || folded.as_ref().is_some_and(|(v, t)| crate::ir::fold::within_causal(v, t, qs, ks));
        let dense = crate::ir::fold::attention_blocks(None, qs, ks, causal_like, None, ATTENTION_TILE);
        let d = (sparse / dense.max(f64::MIN_POSITIVE)).min(1.0);
        self.attention_densities.insert(cache, d);
        d
    }
}

/// The query and key block of the attention kernels the cost model prices
/// sparse patterns by (FlashAttention's 128 × 128 tiles).
pub const ATTENTION_TILE: u64 = 128;
