#!/bin/sh
# The planner's predictions for the single-GPU training steps that
# tools/h100_check.py measures: the GPT-3 library spec with --set overrides,
# one GPU (DEVICE, default h100_80gb; h200_141gb for the H200), bf16, no
# recompute, no dropout.
set -e
T=${TESSERA:-target/release/tessera}
for cfg in "4096 32 8 1" "4096 32 8 4" "2048 16 16 2"; do
  set -- $cfg
  printf 'h%s-l%s-mb%s ' "$1" "$3" "$4"
  $T plan specs/models/gpt3-175b.spec --device ${DEVICE:-h100_80gb} --json \
    --set dims.embed=$1 --set dims.heads=$2 --set dims.layers=$3 --set dims.seq=2048 \
    --set dims.vocab=51200 --set dims.p_drop=0 \
    --set parallel.mesh.data=1 --set parallel.mesh.tensor=1 --set parallel.mesh.pipeline=1 \
    --set parallel.recompute=none --set parallel.zero=0 --set parallel.sequence_parallel=false \
    --set parallel.pipeline.schedule=1f1b --set parallel.pipeline.virtual=1 \
    --set train.batch=8 --set train.micro_batch=$4 |
    python3 -c 'import json,sys; v=json.load(sys.stdin); e=v["estimate"]; print("predicted step %.4f s, %.1f TFLOP/s, breakdown %s" % (v["step_time_s"], v["tflops_per_gpu"], json.dumps(e["breakdown"])))'
done
