#!/usr/bin/env bash
# RSS soak: runs `odcd run` on the Fashion-MNIST train shards in a loop (a cheap 8 px
# model so records flow fast) and prints the daemon's RSS against records trained, until
# N records (default 1,000,000). Memory must stay flat: the ODC memory capacity bounds it.
#   scripts/soak-rss.sh [N] [ODCD_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
BIN=${2:-target/release/odcd}
SHARDS="$PWD/data/shards/fmnist-train"
[ -d "$SHARDS" ] || { echo "run scripts/quickstart.sh first (it makes $SHARDS)" >&2; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
sed -e "s#^url = \"data/shards/fmnist-train/\"#url = \"$SHARDS/\"#" \
    -e 's/^mode = .*/mode = { loop = {} }/' \
    -e 's/^batch_size = 64/batch_size = 256/' \
    -e 's/^size = 32/size = 8/' \
    -e 's/^max_steps = 300//' \
    -e 's/^num_clusters = 100/num_clusters = 50/' \
    -e 's/^memory_capacity = 60000/memory_capacity = 20000/' \
    -e 's/^warmup_samples = 4000/warmup_samples = 2000/' \
    -e 's/^log_every = 10/log_every = 100/' \
    -e "s#^listen = .*#listen = \"127.0.0.1:$port\"#" \
    -e "s#data/checkpoints/#$work/ckpt/#" -e "s#data/embeddings/#$work/emb/#" \
    -e "s#data/quickstart-weights.safetensors#$work/w.safetensors#" \
    configs/quickstart.toml > "$work/soak.toml"
"$BIN" run --config "$work/soak.toml" 2> "$work/log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
echo "records_trained rss_mib elapsed_s"
t0=$(date +%s)
next=0
while kill -0 $pid 2>/dev/null; do
  sleep 2
  imgs=$(curl -s "127.0.0.1:$port/metrics" | awk '/^odcd_train_images_total /{print $2}')
  [ -n "$imgs" ] || continue
  if [ "$imgs" -ge "$next" ]; then
    rss=$(awk '/^VmRSS/{print int($2/1024)}' /proc/$pid/status)
    echo "$imgs $rss $(( $(date +%s) - t0 ))"
    next=$(( next + N / 10 ))
  fi
  [ "$imgs" -ge "$N" ] && break
done
