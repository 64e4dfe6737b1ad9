#!/usr/bin/env bash
# The daemon's end-to-end images/s against the bare training step of the same network, in the
# same minutes: `odcd bench train-step --config CONFIG` (random images in memory: forward, loss,
# backward, SGD) and `odcd run --config CONFIG` (shards on disk → decode and augment on the rayon
# pool → ODC step → embeddings to Parquet → checkpoints), alternated ROUNDS times because the
# speed of a shared machine drifts over minutes. The run's progress lines say where its loop time
# went (`time=`: forward, backward, optimizer, memory, input_wait, publish, other).
#   scripts/bench-e2e.sh                                   # configs/quickstart.toml, 2 rounds
#   CONFIG=configs/fmnist-eval.toml ROUNDS=3 scripts/bench-e2e.sh
# Needs the Fashion-MNIST shards of the quickstart (scripts/quickstart.sh --shards-only).
# Writes the runs' logs to data/perf/; one table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/quickstart.toml}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-300}
SHARDS=${SHARDS:-data/shards/fmnist-train/}
if [ -z "${ODCD:-}" ]; then
  cargo build --release --quiet --bin odcd
  ODCD="${CARGO_TARGET_DIR:-target}/release/odcd"
fi
[ -n "$(ls "$SHARDS" 2>/dev/null)" ] || {
  echo "no shards in $SHARDS: run scripts/quickstart.sh --shards-only (or set SHARDS)" >&2
  exit 1
}
OUT=data/perf
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"
bench() {
  local line
  line=$("$ODCD" bench train-step --config "$CONFIG" --steps 30 2>"$OUT/e2e-bench.err") || {
    echo "odcd bench train-step failed: see $OUT/e2e-bench.err" >&2
    exit 1
  }
  sed -E 's/.* ([0-9.]+) images\/s.*/\1/' <<<"$line"
}
echo "config $CONFIG, $STEPS steps per run; load before: $(uptime | sed 's/.*load/load/')"
printf '%-6s %-13s %-10s %-13s %s\n' round bench_before run_img_s bench_after "run: share of loop time (last window)"
for round in $(seq "$ROUNDS"); do
  before=$(bench)
  rm -rf "$TMP/run"
  log="$OUT/e2e-run-$round.log"
  "$ODCD" run --config "$CONFIG" --set "source.url=$SHARDS" --set "train.max_steps=$STEPS" \
    --set "checkpoint.url=$TMP/run/ck/" --set "embeddings.url=$TMP/run/emb/" \
    --set "train.save_weights=$TMP/run/w.safetensors" --set metrics.listen=127.0.0.1:0 \
    --set log.format=human 2>"$log" || {
    echo "odcd run failed: see $log" >&2
    exit 1
  }
  after=$(bench)
  lines=$(grep ' step=.*images_per_s=' "$log" || true)
  [ "$(wc -l <<<"$lines")" -gt 1 ] || {
    echo "the run logged fewer than 2 progress lines: see $log" >&2
    exit 1
  }
  # the run's rate: the mean of its progress lines' rates, the first (warm-up) left out
  rate=$(tail -n +2 <<<"$lines" | sed -E 's/.*images_per_s="([0-9.]+)".*/\1/' |
    awk '{s += $1; n++} END {printf "%.1f", s / n}')
  share=$(tail -n 1 <<<"$lines" | sed -E 's/.*time="([^"]*)".*/\1/')
  printf '%-6s %-13s %-10s %-13s %s\n' "$round" "$before" "$rate" "$after" "$share"
done
echo "load after: $(uptime | sed 's/.*load/load/')"
