#!/usr/bin/env bash
# Training-step throughput, odcd (candle) and PyTorch side by side, same machine, same run.
# Needs PyTorch (not for `rss` or `kernels`): PYTHON=/path/to/venv/bin/python (default python3)
# with `pip install torch`.
#   scripts/bench-train.sh        # ResNet-18 3×32×32 b64 and ResNet-50 3×64×64 b32, ratios
#   scripts/bench-train.sh rss    # odcd RSS every 100 steps over 1,000 steps (must stay flat)
#   scripts/bench-train.sh kernels  # odcd's CPU kernels vs the generic path (train.kernels),
#                                   # alternating ROUNDS times per model, ratios per round
# STEPS (default 5) sets the steps per median. ROUNDS (default 3) alternates odcd and PyTorch
# that many times per model and reports each round's ratio and their median: on a shared
# machine the speed drifts by ±20% over minutes, and a single pair of runs minutes apart
# can land on either side of 1.0. The load average is printed with the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cargo build --release --bench train_step >/dev/null 2>&1 || cargo bench --no-run --bench train_step
if [ "${1:-}" = rss ]; then
  STEPS=${STEPS:-1000} RSS_EVERY=${RSS_EVERY:-100} cargo bench --bench train_step 2>/dev/null
  exit 0
fi
echo "load: $(uptime)"
ROUNDS=${ROUNDS:-3}
rate() { sed -E 's/.* ([0-9.]+) images\/s.*/\1/' <<<"$1"; }
if [ "${1:-}" = kernels ]; then
  for cfg in "resnet18 32 64" "resnet50 64 32"; do
    set -- $cfg
    ratios=()
    for round in $(seq "$ROUNDS"); do
      cpu=$(ARCH=$1 SIZE=$2 BATCH=$3 cargo bench --bench train_step 2>/dev/null | grep odcd)
      gen=$(KERNELS=generic ARCH=$1 SIZE=$2 BATCH=$3 cargo bench --bench train_step 2>/dev/null | grep odcd)
      echo "round $round: $cpu"
      echo "round $round: $gen"
      ratios+=("$(python3 -c "print(f'{$(rate "$cpu")/$(rate "$gen"):.2f}')")")
    done
    echo "$1 speed-up of the CPU kernels over the generic path per round: ${ratios[*]}; median $(printf '%s\n' "${ratios[@]}" | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p")"
  done
  echo "load: $(uptime)"
  exit 0
fi
for cfg in "resnet18 32 64" "resnet50 64 32"; do
  set -- $cfg
  ratios=()
  for round in $(seq "$ROUNDS"); do
    odcd=$(ARCH=$1 SIZE=$2 BATCH=$3 cargo bench --bench train_step 2>/dev/null | grep odcd)
    torch=$(ARCH=$1 SIZE=$2 BATCH=$3 OMP_WAIT_POLICY=PASSIVE "$PY" benches/train_step_torch.py)
    echo "round $round: $odcd"
    echo "round $round: $torch"
    ratios+=("$(python3 -c "print(f'{$(rate "$odcd")/$(rate "$torch"):.2f}')")")
  done
  echo "$1 ratio odcd/pytorch images/s per round: ${ratios[*]}; median $(printf '%s\n' "${ratios[@]}" | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p")"
done
echo "load: $(uptime)"
