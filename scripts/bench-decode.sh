#!/usr/bin/env bash
# Decode + augment bench: Rust (1 and 2 threads) and the Pillow/NumPy baseline, same inputs,
# same machine, same run. Needs: pip install pillow numpy scikit-image
#   scripts/bench-decode.sh [SECONDS]   # per measurement, default 3
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
data="$target/bench-data"
secs="${1:-3}"
fm=tests/fixtures/fmnist-test-000000.tar
[ -f "$data/jpeg256.tar" ] || python3 scripts/make_bench_data.py "$data"
cargo bench --bench decode -- "$fm" "$data/jpeg256.tar" "$secs"
python3 benches/decode_pillow.py "$fm" "$data/jpeg256.tar" "$secs"
