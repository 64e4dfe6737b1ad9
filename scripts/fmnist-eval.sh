#!/usr/bin/env bash
# Representation quality on Fashion-MNIST, one command (docs/evaluation.md):
# builds odcd (release), makes WebDataset shards of the 60,000 train and 10,000 test images,
# trains with configs/fmnist-eval.toml for TRAIN_SECONDS of wall time on the train images
# (labels are never read by training), then runs `odcd eval` on the test images with the
# raw-pixel and random-network baselines, and writes the HTML report.
# Results: data/fmnist-eval/{eval.txt,eval.json,train.log,uptime.txt,report/index.html}.
# Environment: TRAIN_SECONDS (default 1800), EVAL_MAX_TRAIN / EVAL_MAX_TEST (evaluate on the
# first N train / test images only; default all 60,000 / 10,000), SKIP_TRAIN=1 (evaluate the
# checkpoint of a previous run again), ODCD (an odcd binary to use instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_SECONDS="${TRAIN_SECONDS:-1800}"
limits=()
[ -n "${EVAL_MAX_TRAIN:-}" ] && limits+=(--max-train "$EVAL_MAX_TRAIN")
[ -n "${EVAL_MAX_TEST:-}" ] && limits+=(--max-test "$EVAL_MAX_TEST")
scripts/setup.sh --no-test-services
if [ -z "${ODCD:-}" ]; then
  cargo build --release --bin odcd
  ODCD="${CARGO_TARGET_DIR:-target}/release/odcd"
fi
FM=/usr/share/datasets/fashion-mnist
for split in train t10k; do
  name=$([ "$split" = train ] && echo fmnist-train || echo fmnist-test)
  dir="$PWD/data/shards/$name"
  if [ ! -s "$dir/.complete" ]; then
    mkdir -p "$dir"
    "$ODCD" shards import-idx "$FM/$split-images-idx3-ubyte.gz" "$FM/$split-labels-idx1-ubyte.gz" \
      "file://$dir/" --per-shard 5000 --prefix "$name"
    date > "$dir/.complete"
  fi
done
OUT=data/fmnist-eval
mkdir -p "$OUT"
if [ "${SKIP_TRAIN:-}" != 1 ]; then
  rm -rf "$OUT/checkpoints" "$OUT/report"
  { echo "before training: $(uptime)"; echo "cores: $(nproc)"; } > "$OUT/uptime.txt"
  # SIGINT after TRAIN_SECONDS: the step in flight finishes and a last checkpoint is written.
  rc=0
  timeout -s INT "$TRAIN_SECONDS" "$ODCD" run --config configs/fmnist-eval.toml 2> "$OUT/train.log" || rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then
    echo "training failed (exit $rc); see $OUT/train.log" >&2
    exit 1
  fi
  echo "after training: $(uptime)" >> "$OUT/uptime.txt"
fi
grep ' step=' "$OUT/train.log" | tail -n 2 || true
"$ODCD" eval --checkpoint "$OUT/checkpoints/" \
  --train data/shards/fmnist-train/ --test data/shards/fmnist-test/ "${limits[@]}" \
  --baseline-pixels --baseline-random --json-out "$OUT/eval.json" | tee "$OUT/eval.txt"
echo "after eval: $(uptime)" >> "$OUT/uptime.txt"
"$ODCD" report --checkpoint "$OUT/checkpoints/" --shards data/shards/fmnist-train/ --out "$OUT/report"
cat "$OUT/uptime.txt"
