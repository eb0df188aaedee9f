#!/usr/bin/env bash
# The gradient buckets' overlap with the backward pass, measured: the demo
# (specs/tiny/shakespeare.spec, 1.6M parameters) under data 2, as two
# threads, two processes over TCP (tessera launch) and two over MPI
# (mpirun), each with one bucket (parallel.bucket=1Gi: issued when the
# backward pass ends, nothing to overlap) and with 64Ki-element buckets
# (issued during it). Per run: the median tokens/s of steps 6..STEPS, and
# from rank 0's trace, per step: the time its communication stream spent in
# calls, the share of it before the compute stream reached the gradient
# reduction phase (hidden behind the backward pass), and the time the
# compute stream spent in that phase (the join's wait, the mean, the norm's
# start).
# Usage: tools/overlap.sh [STEPS]   (needs target/release/tessera built with --features mpi)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
bin=target/release/tessera
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(--steps "$steps" --eval-interval 100000 --overwrite --trace-steps "$steps")
run() { # name, bucket, the command up to `train`...
  local name=$1 bucket=$2; shift 2
  "$@" train specs/tiny/shakespeare.spec --set "parallel.bucket=$bucket" "${common[@]}" \
    --out "$tmp/$name" --trace "$tmp/$name.trace.json" >"$tmp/$name.log" 2>&1 || { cat "$tmp/$name.log"; exit 1; }
  python3 - "$name" "$bucket" "$tmp/$name/metrics.jsonl" "$tmp/$name.trace.json" "$steps" <<'PY'
import json, statistics, sys
name, bucket, metrics, trace, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
rows = [json.loads(l) for l in open(metrics)]
tps = statistics.median(r["tokens_per_s"] for r in rows[5:])
events = json.load(open(trace))["traceEvents"]
tracks = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
comm_tid = next(t for t, n in tracks.items() if n.startswith("rank 0 ") and n.endswith("communication stream"))
spans = [e for e in events if e.get("ph") == "X"]
joins = sorted((e for e in spans if e["tid"] == 0 and e["name"] == "gradient reduction"), key=lambda e: e["ts"])
busy = hidden = 0.0
for s in (e for e in spans if e["tid"] == comm_tid):
    busy += s["dur"]
    join = next((j for j in joins if j["ts"] + j["dur"] >= s["ts"]), None)
    if join is not None:
        hidden += max(0.0, min(s["ts"] + s["dur"], join["ts"]) - s["ts"])
waited = sum(j["dur"] for j in joins)
n = len(joins)
print(f"| {name} | {bucket} | {tps:,.0f} | {busy / 1e3 / n:.2f} | {100 * hidden / max(busy, 1e-9):.0f}% | {waited / 1e3 / n:.2f} |")
PY
}
echo "| run | parallel.bucket | tokens/s (median) | rank 0 stream in calls, ms/step | hidden behind backward | rank 0 gradient reduction phase, ms/step |"
echo "|---|---|---|---|---|---|"
for bucket in 1Gi 64Ki; do
  run "2 threads" "$bucket" "$bin"
  run "2 processes (TCP)" "$bucket" "$bin" launch --nproc-per-node 2 --
  run "2 processes (MPI)" "$bucket" mpirun --oversubscribe -n 2 "$bin"
done
