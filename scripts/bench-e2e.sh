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
  cargo build --release --bin odcd >/dev/null
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
  "$ODCD" bench train-step --config "$CONFIG" --steps 30 2>/dev/null |
    sed -E 's/.* ([0-9.]+) images\/s.*/\1/'
}
echo "config $CONFIG, $STEPS steps per run; load before: $(uptime | sed 's/.*load/load/')"
printf '%-6s %-12s %-12s %-12s %s\n' round bench_img_s run_img_s bench_img_s "run: share of loop time (last window)"
for round in $(seq "$ROUNDS"); do
  before=$(bench)
  rm -rf "$TMP/run"
  "$ODCD" run --config "$CONFIG" --set "source.url=$SHARDS" --set "train.max_steps=$STEPS" \
    --set "checkpoint.url=$TMP/run/ck/" --set "embeddings.url=$TMP/run/emb/" \
    --set "train.save_weights=$TMP/run/w.safetensors" --set metrics.listen=127.0.0.1:0 \
    --set log.format=human 2>"$OUT/e2e-run-$round.log"
  after=$(bench)
  # images/s of the run: trained images over the loop's wall time after the warm-up
  steps=$(grep -c ' step=.*images_per_s=' "$OUT/e2e-run-$round.log" || true)
  rate=$(grep ' step=.*images_per_s=' "$OUT/e2e-run-$round.log" | tail -n +2 |
    sed -E 's/.*images_per_s="([0-9.]+)".*/\1/' |
    awk '{s += $1; n++} END {if (n) printf "%.1f", s / n; else print "n/a"}')
  share=$(grep ' step=.*time=' "$OUT/e2e-run-$round.log" | tail -n 1 | sed -E 's/.*time="([^"]*)".*/\1/')
  printf '%-6s %-12s %-12s %-12s %s\n' "$round" "$before" "$rate" "$after" "$share"
  [ "$steps" -gt 1 ] || { echo "the run logged no progress: see $OUT/e2e-run-$round.log" >&2; exit 1; }
done
echo "load after: $(uptime | sed 's/.*load/load/')"
