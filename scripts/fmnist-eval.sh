#!/usr/bin/env bash
# Representation quality, one command (docs/evaluation.md): builds odcd (release), makes the
# data set's shards, trains with configs/fmnist-eval.toml for TRAIN_SECONDS of wall time on its
# train images (labels are never read by training), then runs `odcd eval` on its validation or
# test images with the raw-pixel and untrained-network baselines, and writes the HTML report.
#
#   scripts/fmnist-eval.sh [KEY=VALUE ...]     extra args: config overrides (`odcd run --set`)
#
# Environment:
#   DATASET        fmnist   (default) Fashion-MNIST: train = its first 50,000 train images,
#                           val = the other 10,000 train images, test = the 10,000 test images
#                  fmnist8k an 8,000-image set: train = train images 0..8,000, val = train images
#                           8,000..10,000, test = test images 0..2,000
#   SPLIT          val (default: choose settings here) | test (report once per configuration)
#   RUN            name of the run's result folder (default "default")
#   TRAIN_SECONDS  wall time of training (default 1800)
#   EVAL_MAX_TRAIN / EVAL_MAX_TEST  evaluate on the first N train / eval images only
#   EVAL_CENTER=1  centre every row's features on the train mean before the cosine
#                  (`odcd eval --center`); results then go to eval-$SPLIT-center.{txt,json}
#   EVAL_FEATURE   backbone (default) | spatial | neck | stageN | stagesN: the feature
#                  evaluated (`odcd eval --feature`; stage2 with EVAL_CENTER=1 is the one
#                  docs/evaluation.md chose on the validation splits); results then go to
#                  eval-$SPLIT-$EVAL_FEATURE.{txt,json}
#   SKIP_TRAIN=1   evaluate the checkpoint of a previous run of the same RUN again
#   ODCD           an odcd binary to use instead of building one
# Results: data/quality/$DATASET/$RUN/{eval-$SPLIT.txt,eval-$SPLIT.json,train.log,uptime.txt,
# report/index.html}.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET="${DATASET:-fmnist}"
SPLIT="${SPLIT:-val}"
RUN="${RUN:-default}"
TRAIN_SECONDS="${TRAIN_SECONDS:-1800}"
case "$SPLIT" in val | test) ;; *)
  echo "SPLIT=$SPLIT: use val or test" >&2
  exit 2
  ;;
esac
# train: first..first+count of the train file; val: the next images of it; test: of the test file
case "$DATASET" in
  fmnist) train_n=50000 val_n=10000 test_n=10000 ;;
  fmnist8k) train_n=8000 val_n=2000 test_n=2000 ;;
  *)
    echo "DATASET=$DATASET: use fmnist or fmnist8k" >&2
    exit 2
    ;;
esac
limits=()
[ -n "${EVAL_MAX_TRAIN:-}" ] && limits+=(--max-train "$EVAL_MAX_TRAIN")
[ -n "${EVAL_MAX_TEST:-}" ] && limits+=(--max-test "$EVAL_MAX_TEST")
[ -n "${EVAL_FEATURE:-}" ] && limits+=(--feature "$EVAL_FEATURE")
suffix="$SPLIT${EVAL_FEATURE:+-$EVAL_FEATURE}"
if [ "${EVAL_CENTER:-}" = 1 ]; then
  limits+=(--center)
  suffix="$suffix-center"
fi
overrides=()
for kv in "$@"; do overrides+=(--set "$kv"); done
scripts/setup.sh --no-test-services
if [ -z "${ODCD:-}" ]; then
  cargo build --release --bin odcd
  ODCD="${CARGO_TARGET_DIR:-target}/release/odcd"
fi
FM=/usr/share/datasets/fashion-mnist
DATA="$PWD/data/datasets/$DATASET"
# split name, IDX file, first image, image count
while read -r split file skip count; do
  dir="$DATA/$split"
  if [ ! -s "$dir/.complete" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    "$ODCD" shards import-idx "$FM/$file-images-idx3-ubyte.gz" "$FM/$file-labels-idx1-ubyte.gz" \
      "file://$dir/" --per-shard 5000 --prefix "$DATASET-$split" --skip "$skip" --limit "$count"
    date > "$dir/.complete"
  fi
done <<EOF
train train 0 $train_n
val train $train_n $val_n
test t10k 0 $test_n
EOF
OUT="data/quality/$DATASET/$RUN"
mkdir -p "$OUT"
if [ "${SKIP_TRAIN:-}" != 1 ]; then
  rm -rf "$OUT/checkpoints" "$OUT/report"
  { echo "before training: $(uptime)"; echo "cores: $(nproc)"; echo "overrides: $*"; } > "$OUT/uptime.txt"
  # The data set's size sets the memory and the warm-up (every sample starts from a k-means
  # label, as in the reference); everything else comes from the config and the overrides.
  rc=0
  # SIGINT after TRAIN_SECONDS: the step in flight finishes and a last checkpoint is written.
  timeout -s INT "$TRAIN_SECONDS" "$ODCD" run --config configs/fmnist-eval.toml \
    --set "source.url=$DATA/train/" --set "checkpoint.url=$PWD/$OUT/checkpoints/" \
    --set "odc.memory_capacity=$train_n" --set "odc.warmup_samples=$train_n" \
    "${overrides[@]}" 2> "$OUT/train.log" || rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then
    echo "training failed (exit $rc); see $OUT/train.log" >&2
    exit 1
  fi
  echo "after training: $(uptime)" >> "$OUT/uptime.txt"
fi
grep ' step=' "$OUT/train.log" | tail -n 2 || true
"$ODCD" eval --checkpoint "$OUT/checkpoints/" \
  --train "$DATA/train/" --test "$DATA/$SPLIT/" "${limits[@]}" \
  --baseline-pixels --baseline-random --precise-bn --json-out "$OUT/eval-$suffix.json" | tee "$OUT/eval-$suffix.txt"
echo "after eval ($suffix): $(uptime)" >> "$OUT/uptime.txt"
"$ODCD" report --checkpoint "$OUT/checkpoints/" --shards "$DATA/train/" --out "$OUT/report"
cat "$OUT/uptime.txt"
