//! The cost model against published formulas: activation memory per layer
//! (Korthikanti et al., 2022) and FLOPs per token (6N + attention).

mod common;

use common::check_ok;
use tessera::compiler::cost;

const GPT3: &str = "specs/models/gpt3-175b.spec";

/// GPT-3 with overrides, without its device (so an unsharded layout still
/// checks: the per-layer figures are what these tests compare).
fn gpt3(overrides: &[&str]) -> tessera::compiler::Model {
    let text = std::fs::read_to_string(GPT3).unwrap();
    let text: String =
        text.lines().filter(|l| !l.trim_start().starts_with("device")).map(|l| format!("{l}\n")).collect();
    let mut sources = tessera::compiler::SourceMap::new();
    let opts = tessera::compiler::Options {
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        model: None,
        micro_batch: None,
    };
    tessera::compiler::check_text(&mut sources, GPT3, &text, std::path::Path::new("specs/models"), &opts)
        .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)))
}

/// Saved activations of one layer for one microbatch.
fn per_layer(overrides: &[&str], selective: bool) -> f64 {
    let m = gpt3(overrides);
    let c = &m.cost.layers;
    (if selective { c.act_selective } else { c.act_none }) / m.cost.layer_count as f64
}

const SINGLE: &[&str] =
    &["parallel.mesh.data=1", "parallel.mesh.tensor=1", "parallel.mesh.pipeline=1", "parallel.sequence_parallel=false"];

#[test]
fn activations_match_korthikanti_without_recompute() {
    // s·b·h·(34 + 5·a·s/h) bytes per layer: 16-bit activations, dropout on.
    let (s, b, h, a) = (2048.0, 1.0, 12288.0, 96.0);
    let mut o = SINGLE.to_vec();
    o.push("parallel.recompute=none");
    assert_eq!(per_layer(&o, false), s * b * h * (34.0 + 5.0 * a * s / h));
    // Selective recompute drops the attention-score terms.
    assert_eq!(per_layer(&o, true), s * b * h * 34.0);
}

#[test]
fn activations_with_tensor_and_sequence_parallel_and_selective_recompute() {
    // s·b·h·34/t with tensor + sequence parallelism and selective recompute.
    let (s, b, h, t) = (2048.0, 1.0, 12288.0, 8.0);
    assert_eq!(per_layer(&["parallel.recompute=selective"], true), s * b * h * 34.0 / t);
    // Tensor parallelism without sequence parallelism keeps 10·sbh replicated.
    assert_eq!(per_layer(&["parallel.sequence_parallel=false"], true), s * b * h * (10.0 + 24.0 / t));
}

#[test]
fn flops_per_token_follow_6n_plus_attention() {
    let m = check_ok(GPT3, &[]);
    let (l, s, d, v) = (96.0, 2048.0, 12288.0, 50257.0);
    // Forward: 2 × (non-embedding matmul params + the tied output projection) + 4·l·s·d attention.
    let matmul_params = l * 12.0 * d * d + v * d;
    let want = 2.0 * matmul_params + 4.0 * l * s * d;
    let got = cost::flops_per_token_forward(&m);
    assert!((got - want).abs() / want < 1e-12, "forward {got} vs {want}");
    assert_eq!(cost::flops_per_token_train(&m), 3.0 * got);
    assert!((cost::attention_flops_per_token(&m) - 4.0 * l * s * d).abs() < 1.0);
}

#[test]
fn moe_flops_count_routed_tokens_not_capacity() {
    // Mixtral routes each token to 2 of 8 experts: forward FLOPs are 2 per
    // active matmul parameter (active params less the gathered embedding and
    // the norm gains) plus attention, 4·layers·seq·d_attn.
    let m = check_ok("specs/models/mixtral-8x7b.spec", &[]);
    let (layers, seq, d, vocab) = (32.0, 4096.0, 4096.0, 32000.0);
    let norms = (2.0 * layers + 1.0) * d;
    let matmul_params = cost::params_active(&m) as f64 - vocab * d - norms;
    let want = 2.0 * matmul_params + 4.0 * layers * seq * d;
    let got = cost::flops_per_token_forward(&m);
    assert!((got - want).abs() / want < 1e-9, "forward {got} vs {want}");
}

#[test]
fn memory_by_zero_stage() {
    // GPT-2 XL on 8 data ranks: ZeRO 1 shards the optimizer, 2 gradients, 3 weights.
    let mem = |z: &str| {
        let m = check_ok("specs/models/gpt2-xl.spec", &[z]);
        tessera::compiler::cost::memory::memory_per_rank(&m)[0]
    };
    let (z0, z1, z2, z3) =
        (mem("parallel.zero=0"), mem("parallel.zero=1"), mem("parallel.zero=2"), mem("parallel.zero=3"));
    let n = 1_557_611_200u64;
    assert_eq!(z0.params, 2 * n);
    assert_eq!(z0.grads, 2 * n);
    assert_eq!(z0.optimizer, 12 * n, "fp32 master + Adam m and v");
    assert_eq!(z1.optimizer, 12 * n / 8);
    assert_eq!(z2.grads, 2 * n / 8);
    assert_eq!(z3.params, 2 * n / 8);
    assert_eq!(z0.activations, z3.activations);
}

/// Attention FLOPs of a one-layer model whose attention line is `attn`.
fn attention_flops(attn: &str) -> f64 {
    let text = format!(
        "model m {{\n\
           dims {{ seq = 2048, embed = 64, heads = 1, head_dim = 64, row = 16, col = 128 }}\n\
           input x: f32[batch, seq, embed]\n\
           param wq: [embed, heads, head_dim]\n\
           param wk: [embed, heads, head_dim]\n\
           param wv: [embed, heads, head_dim]\n\
           q = x @ wq\n\
           k = rename(x @ wk, seq -> kv_seq)\n\
           v = rename(x @ wv, seq -> kv_seq)\n\
           q_pos = iota(seq)\n\
           k_pos = rename(iota(seq), seq -> kv_seq)\n\
           y = {attn}\n\
           loss = sum(y, batch, seq, heads, head_dim)\n\
         }}\n"
    );
    let mut sources = tessera::compiler::SourceMap::new();
    let opts = tessera::compiler::Options::default();
    let m = tessera::compiler::check_text(&mut sources, "m.spec", &text, std::path::Path::new("specs"), &opts)
        .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)));
    m.cost.pre.attn_flops + m.cost.layers.attn_flops + m.cost.post.attn_flops
}

/// Sparse attention is priced by the 128 × 128 blocks a block-sparse kernel
/// computes, a causal pattern counting as dense (the convention of the
/// published runs): over 2048 positions (16 × 16 blocks, 136 in the causal
/// triangle) a causal window of 512 computes 70 blocks (4 row blocks of 1
/// to 4, then 12 of 5), so 70/136 of the dense FLOPs, whether flagged or
/// built as a mask; a mask built from a grid's dims (DALL-E's row pattern)
/// is priced by its blocks alike.
#[test]
fn sparse_attention_is_priced_by_the_blocks_it_computes() {
    let dense = attention_flops("attention(q, k, v)");
    assert_eq!(dense, 2.0 * 2.0 * 2048.0 * 2048.0 * 64.0);
    assert_eq!(attention_flops("attention(q, k, v, causal = true)"), dense, "causal counts as dense");
    let window = attention_flops("attention(q, k, v, causal = true, window = 512)");
    assert!((window / dense - 70.0 / 136.0).abs() < 1e-12, "{}", window / dense);
    let built = attention_flops("attention(q, k, v, mask = q_pos >= k_pos && q_pos < k_pos + 512)");
    assert!((built / dense - 70.0 / 136.0).abs() < 1e-12, "built band: {}", built / dense);
    // DALL-E's row attention on a 16 × 128 grid, built from the grid's dims:
    // each query block (one row) sees one key block, 16 of 256 blocks, or
    // with `causal` the 16 diagonal blocks of the triangle's 136.
    let row_mask = "merge(merge(permute(iota(row) == rename(iota(row), row -> kv_row) && iota(col) >= 0 \
                    && rename(iota(col), col -> kv_col) >= 0, [row, col, kv_row, kv_col]), [row, col] -> seq), \
                    [kv_row, kv_col] -> kv_seq)";
    let rows = attention_flops(&format!("attention(q, k, v, mask = {row_mask})"));
    assert!((rows / dense - 16.0 / 256.0).abs() < 1e-12, "rows: {}", rows / dense);
    let causal_rows = attention_flops(&format!("attention(q, k, v, causal = true, mask = {row_mask})"));
    assert!((causal_rows / dense - 16.0 / 136.0).abs() < 1e-12, "causal rows: {}", causal_rows / dense);
}
