#!/usr/bin/env bash
# RSS soak: runs `odcd run --config configs/soak.toml` on the Fashion-MNIST train shards in a
# loop (a cheap 8 px model so records flow fast) and prints the daemon's RSS against records
# trained, until N records (default 1,000,000). Memory must stay flat: the ODC memory capacity
# bounds it. The run writes to data/soak/ (cleared before and after) and serves /metrics on
# the `listen` address of configs/soak.toml.
#   scripts/soak-rss.sh [N] [ODCD_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
BIN=${2:-target/release/odcd}
CONFIG=configs/soak.toml
SHARDS=data/shards/fmnist-train
[ -d "$SHARDS" ] || { echo "run scripts/quickstart.sh first (it makes $SHARDS)" >&2; exit 1; }
addr=$(sed -n 's/^listen = "\(.*\)"$/\1/p' "$CONFIG")
[ -n "$addr" ] || { echo "no [metrics] listen address in $CONFIG" >&2; exit 1; }
rm -rf data/soak
log=$(mktemp)
"$BIN" run --config "$CONFIG" 2> "$log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf data/soak "$log"' EXIT
echo "records_trained rss_mib elapsed_s"
t0=$(date +%s)
next=0
imgs=0
while kill -0 $pid 2>/dev/null; do
  sleep 2
  # Not serving yet (or any more): an empty answer, tried again.
  imgs=$(curl -s "$addr/metrics" | awk '/^odcd_train_images_total /{print $2}' || true)
  [ -n "$imgs" ] || continue
  if [ "$imgs" -ge "$next" ]; then
    rss=$(awk '/^VmRSS/{print int($2/1024)}' /proc/$pid/status)
    echo "$imgs $rss $(( $(date +%s) - t0 ))"
    next=$(( next + N / 10 ))
  fi
  [ "$imgs" -ge "$N" ] && break
done
# The daemon stopped before N records (a bad config, a busy port): say why.
if [ "${imgs:-0}" -lt "$N" ]; then
  echo "odcd exited after ${imgs:-0} records; its log ends:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
