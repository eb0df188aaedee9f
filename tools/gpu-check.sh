#!/usr/bin/env bash
# The GPU check (issue 13 point 9), as far as the CUDA backend is built:
# run on an H100 or H200 with the release binary built elsewhere
# (tools/gpu-kit.sh). It
#   1. says which GPU and driver it runs on;
#   2. runs every fused kernel of the four tiny specs, the demo and GPT-2
#      small on the GPU and compares each with the CPU backend's on the same
#      random inputs (`tessera check-kernels`, docs/cuda.md);
#   3. measures what the planner's device profile assumes
#      (tools/h100_check.py: GEMM and attention rates, HBM, whole PyTorch
#      GPT steps).
# It writes one JSON file of results: $1, or $OUT/gpu-check.json.
# Not yet part of it (no CUDA backend to train with): training GPT-2 124M in
# Tessera, its MFU and the same-run PyTorch ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}/gpu-check.json}"
bin="${TESSERA:-target/release/tessera}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# NVRTC: the host's own (PyTorch's wheel brings one that matches its CUDA),
# else the one carried in target/gpu-kit.
nvrtc_dir="$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia.cuda_nvrtc, os
    for p in nvidia.cuda_nvrtc.__path__:
        if glob.glob(os.path.join(p, "lib", "libnvrtc.so*")):
            print(os.path.join(p, "lib")); break
except Exception:
    pass
PY
)"
if [ -z "$nvrtc_dir" ] && [ -f target/gpu-kit/libnvrtc.so.13.zst ]; then
  for f in libnvrtc.so.13 libnvrtc-builtins.so.13.0; do zstd -q -d "target/gpu-kit/$f.zst" -o "$work/$f"; done
  nvrtc_dir="$work"
fi
export LD_LIBRARY_PATH="${nvrtc_dir:+$nvrtc_dir:}${LD_LIBRARY_PATH:-}"
export TESSERA_KERNEL_CACHE="$work/kernels"

echo "== GPU"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "NVRTC from: ${nvrtc_dir:-not found}"

kernels="$work/kernels.json"
echo "[" > "$kernels"
first=1
for spec in specs/tiny/gpt.spec specs/tiny/moe.spec specs/tiny/bert.spec specs/tiny/vit.spec \
            specs/tiny/shakespeare.spec specs/models/gpt2-small.spec; do
  echo "== kernels of $spec"
  timeout 300 "$bin" check-kernels "$spec" --json > "$work/one.json" 2> "$work/one.err"
  rc=$?
  tail -3 "$work/one.err"
  python3 - "$work/one.json" "$rc" "$spec" <<'PY'
import json, sys
path, rc, spec = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    r = json.load(open(path))
    bad = [k for k in r["kernels"] if not k["ok"]]
    worst = max(r["kernels"], key=lambda k: k["max_error"] / max(k["tolerance"], 1e-30))
    print(f'{spec}: {len(r["kernels"])} kernels on {r["gpu"]} ({r["arch"]}), {len(bad)} outside tolerance; '
          f'worst {worst["max_error"]:.2e} of {worst["tolerance"]:.2e} ({"/".join(worst["ops"])})')
except Exception as e:
    print(f"{spec}: no result (exit {rc}): {e}")
PY
  [ $first = 1 ] || echo "," >> "$kernels"; first=0
  if [ -s "$work/one.json" ]; then cat "$work/one.json" >> "$kernels"; else
    python3 -c "import json,sys; print(json.dumps({'spec': sys.argv[1], 'exit': int(sys.argv[2]), 'error': open(sys.argv[3]).read()[-2000:]}))" "$spec" "$rc" "$work/one.err" >> "$kernels"; fi
done
echo "]" >> "$kernels"

echo "== planner calibration (tools/h100_check.py)"
timeout 240 python3 tools/h100_check.py "$work/calibration.json" || echo "h100_check.py failed (exit $?)"

python3 - "$kernels" "$work/calibration.json" "$out" <<'PY'
import json, os, sys
kernels = json.load(open(sys.argv[1]))
cal = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else None
json.dump({"kernels": kernels, "calibration": cal,
           "not_yet": "training in Tessera on the GPU, MFU and the PyTorch ratio: no CUDA backend yet"},
          open(sys.argv[3], "w"), indent=1)
print("wrote", sys.argv[3])
PY
