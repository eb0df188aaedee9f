#!/usr/bin/env bash
# How long generated crates take to build (docs/codegen.md, "Build times"):
# `tessera build` of specs/bench/tiny.spec and specs/models/gpt2-small.spec
# into a scratch folder, then, in one fresh target folder,
#   clean:       the first release build (every dependency, Tessera included);
#   crate:       the generated crate alone, its dependencies built
#                (`cargo clean -p`, then build);
#   incremental: the spec touched, then build (the module embeds the spec
#                with include_str!, so cargo rebuilds the crate).
# Usage: tools/codegen-build-time.sh [SCRATCH]   (needs a release `tessera`).
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="${1:-$(mktemp -d)}"
tessera=target/release/tessera
[ -x "$tessera" ] || cargo build --release -q
export CARGO_TARGET_DIR="$scratch/target"
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
first=1
for spec in specs/bench/tiny.spec specs/models/gpt2-small.spec; do
  name=$(basename "$spec" .spec)
  out="$scratch/$name"
  rm -rf "$out"
  "$tessera" build "$spec" --out "$out" >/dev/null
  lines=$(wc -l < "$out/src/lib.rs")
  bytes=$(wc -c < "$out/src/lib.rs")
  krate=$(sed -n 's/^name = "\(.*\)"/\1/p' "$out/Cargo.toml" | head -1)
  if [ "$first" = 1 ]; then
    clean=$(secs cargo build --release --manifest-path "$out/Cargo.toml")
    first=0
  else
    clean="-"
    cargo build --release --manifest-path "$out/Cargo.toml" >/dev/null 2>&1
  fi
  cargo clean --release -p "$krate" --manifest-path "$out/Cargo.toml" >/dev/null 2>&1
  crate=$(secs cargo build --release --manifest-path "$out/Cargo.toml")
  touch "$out"/spec/*/"$name".spec
  incremental=$(secs cargo build --release --manifest-path "$out/Cargo.toml")
  echo "$name: $lines lines ($bytes bytes) of generated Rust; clean build ${clean} s, the crate alone ${crate} s, incremental after touching the spec ${incremental} s"
done
