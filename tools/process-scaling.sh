#!/usr/bin/env bash
# Scaling of the demo (specs/tiny/shakespeare.spec, global batch 16) as 1,
# 2 and 4 processes over MPI (mpirun) and over TCP (tessera launch), and as
# 2 and 4 threads of one process, on this machine (4 ranks: microbatches of 4): the median
# tokens/s of steps 6..STEPS, and from rank 0's trace the time per step its
# program spends in collectives and point-to-point transfers (on both of its
# streams).
# Usage: tools/process-scaling.sh [STEPS]   (needs a build with --features mpi)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
bin=target/release/tessera
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tmp=$(mktemp -d)
common=(--steps "$steps" --eval-interval 100000 --overwrite --trace-steps "$steps")
run() { # name, the command up to `train`..., ::, overrides...
  local name=$1; shift
  local launcher=()
  while [ "$1" != "::" ]; do launcher+=("$1"); shift; done; shift
  "${launcher[@]}" train specs/tiny/shakespeare.spec "$@" "${common[@]}" \
    --out "$tmp/$name" --trace "$tmp/$name.trace.json" >"$tmp/$name.log" 2>&1
  python3 - "$name" "$tmp/$name/metrics.jsonl" "$tmp/$name.trace.json" "$steps" <<'PY'
import json, statistics, sys
name, metrics, trace, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(metrics)]
tps = statistics.median(r["tokens_per_s"] for r in rows[5:])
events = json.load(open(trace))
events = events["traceEvents"] if isinstance(events, dict) else events
tracks = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
# Rank 0's compute track and its communication stream's.
mine = {0} | {t for t, n in tracks.items() if n.startswith("rank 0 ") and n.endswith("communication stream")}
comm = sum(e.get("dur", 0) for e in events if e.get("tid") in mine and e.get("cat") in ("collective", "p2p"))
print(f"| {name} | {tps:,.0f} | {comm / 1e3 / steps:.1f} |")
PY
}
echo "| run | tokens/s (median) | rank 0 in communication, ms/step |"
echo "|---|---|---|"
four=(--set parallel.mesh.data=4 --set train.micro_batch=4)
run "1 process" "$bin" :: --set parallel.mesh.data=1
run "2 threads, 1 process" "$bin" ::
run "2 processes (MPI)" mpirun --oversubscribe -n 2 "$bin" ::
run "2 processes (TCP, tessera launch)" "$bin" launch --nproc-per-node 2 -- ::
run "4 threads, 1 process" "$bin" :: "${four[@]}"
run "4 processes (MPI)" mpirun --oversubscribe -n 4 "$bin" :: "${four[@]}"
run "4 processes (TCP, tessera launch)" "$bin" launch --nproc-per-node 4 -- :: "${four[@]}"
rm -rf "$tmp"
