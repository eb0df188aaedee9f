#!/usr/bin/env bash
# Prepare what tools/gpu-check.sh needs on a GPU machine that has no Rust
# toolchain and no network: the release binary (cudarc loads CUDA at run
# time) and, compressed, the NVRTC 13 that the tests use (for a host whose
# PyTorch brings no NVRTC of its own). Writes target/gpu-kit/; carry
# `target/release/tessera` and `target/gpu-kit` to the GPU machine (about
# 55 MB together).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin tessera
lib="target/nvrtc-venv/lib/python3.11/site-packages/nvidia/cu13/lib"
if [ ! -f "$lib/libnvrtc.so.13" ]; then
  tools/test --release --test cuda >/dev/null  # sets NVRTC up (target/nvrtc-venv)
fi
mkdir -p target/gpu-kit
for f in libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
  if [ ! -f "target/gpu-kit/$f.zst" ] || [ "$lib/$f" -nt "target/gpu-kit/$f.zst" ]; then
    zstd -q -f -15 -T0 "$lib/$f" -o "target/gpu-kit/$f.zst"
  fi
done
du -ch target/release/tessera target/gpu-kit/* | tail -1
