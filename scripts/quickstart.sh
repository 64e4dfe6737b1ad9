#!/usr/bin/env bash
# One command from a fresh Debian machine to a running odcd: installs what it needs
# (build tools, Fashion-MNIST from Debian), builds odcd, makes WebDataset shards from the
# IDX files and trains on them with configs/quickstart.toml (local files, CPU, 300 steps).
# `--shards-only` stops after making the shards (e.g. for the docker stack, docker/compose.yml).
set -euo pipefail
shards_only=false
[ "${1:-}" = "--shards-only" ] && shards_only=true
cd "$(dirname "$0")/.."
scripts/setup.sh --no-test-services
cargo build --release --bin odcd
ODCD="${CARGO_TARGET_DIR:-target}/release/odcd"
FM=/usr/share/datasets/fashion-mnist
OUT="$PWD/data/shards/fmnist-train"
if [ ! -s "$OUT/.complete" ]; then
  mkdir -p "$OUT"
  "$ODCD" shards import-idx "$FM/train-images-idx3-ubyte.gz" "$FM/train-labels-idx1-ubyte.gz" \
    "file://$OUT/" --per-shard 5000 --prefix fmnist-train
  "$ODCD" shards inspect "file://$OUT/" | tail -n 5
  date > "$OUT/.complete"
fi
if $shards_only; then
  echo "shards in $OUT"
  exit 0
fi
exec "$ODCD" run --config configs/quickstart.toml
