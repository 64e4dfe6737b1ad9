#!/usr/bin/env bash
# Training-step throughput, odcd (candle) and PyTorch side by side, same machine, same run.
# Needs PyTorch: PYTHON=/path/to/venv/bin/python (default python3) with `pip install torch`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cargo build --release --bench train_step >/dev/null 2>&1 || cargo bench --no-run --bench train_step
for cfg in "resnet18 32 64" "resnet50 64 32"; do
  set -- $cfg
  ARCH=$1 SIZE=$2 BATCH=$3 cargo bench --bench train_step 2>/dev/null | grep odcd
  ARCH=$1 SIZE=$2 BATCH=$3 OMP_WAIT_POLICY=PASSIVE "$PY" benches/train_step_torch.py
done
