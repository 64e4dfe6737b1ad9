#!/usr/bin/env bash
# One command that checks a CUDA build of odcd on a machine with an NVIDIA GPU, no Rust
# toolchain and no network (docs/gpu.md), and prints one summary:
#   - the training-step bench on the GPU (`odcd bench train-step`) for ResNet-18 3x32x32 b64,
#     ResNet-50 3x64x64 b32 (scripts/bench-train.sh's shapes) and ResNet-50 3x224x224 b64, side
#     by side with PyTorch on the same GPU when `python3 -c 'import torch'` works there;
#   - a STEPS-step `odcd run` (configs/gpu-check.toml) on Fashion-MNIST shards: loss, checkpoints,
#     published Parquet embeddings; then `odcd eval` on its checkpoint;
#   - the peak GPU memory in use during each part (nvidia-smi).
# Where:
#   scripts/build-cuda.sh && scripts/gpu-check.sh --prepare   # on the build machine: the gzipped
#       binary and a Fashion-MNIST subset in target/cuda-dist/ (25 MiB), to carry with the repo
#   scripts/gpu-check.sh                                       # on the GPU machine
#   ODCD_GPU_CHECK_DEVICE=cpu ODCD=target/release/odcd STEPS=20 BENCH_STEPS=1 scripts/gpu-check.sh
#       # the same logic on the CPU, with a CPU build (how the script itself is tested)
# Environment: ODCD (binary; default: target/cuda-dist/odcd.gz, unpacked), ODCD_GPU_CHECK_DEVICE (default
# cuda:0), STEPS (training steps, default 500), BENCH_STEPS (measured bench steps, default 5),
# BENCH_SHAPES ("arch size batch;..."), PYTHON (default python3). Results: target/gpu-check/
# (summary.txt, the logs, eval.json). Exits non-zero when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."

dist=target/cuda-dist
train_images=10000
test_images=2000

if [ "${1:-}" = --prepare ]; then
  set -e
  [ -f "$dist/odcd.gz" ] || { echo "gpu-check: no $dist/odcd.gz: run scripts/build-cuda.sh first" >&2; exit 1; }
  fm=/usr/share/datasets/fashion-mnist
  [ -d "$fm" ] || { echo "gpu-check: no $fm: run scripts/setup.sh --no-test-services" >&2; exit 1; }
  mkdir -p "$dist/fashion-mnist"
  # The first N images and labels of each split, as IDX files again (the header's count
  # changed): ~4 MB instead of the 31 MB of both whole splits.
  python3 - "$fm" "$dist/fashion-mnist" "$train_images" "$test_images" <<'EOF'
import gzip, struct, sys
src, dst, n_train, n_test = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for split, n in (("train", n_train), ("t10k", n_test)):
    for kind, item in (("images-idx3-ubyte", 28 * 28), ("labels-idx1-ubyte", 1)):
        with gzip.open(f"{src}/{split}-{kind}.gz", "rb") as f:
            data = f.read()
        dims = data[3]
        head = bytearray(data[: 4 + 4 * dims])
        struct.pack_into(">I", head, 4, n)
        body = data[4 + 4 * dims : 4 + 4 * dims + n * item]
        with gzip.open(f"{dst}/{split}-{kind}.gz", "wb", compresslevel=9) as f:
            f.write(bytes(head) + body)
EOF
  total=$(du -sb "$dist" | cut -f1)
  echo "gpu-check: $dist holds $((total / 1024 / 1024)) MiB ($total bytes):"
  ls -l "$dist" "$dist/fashion-mnist"
  if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
    echo "gpu-check: over the 64 MiB that can be carried to the GPU machine" >&2
    exit 1
  fi
  exit 0
fi
[ $# -eq 0 ] || { sed -n '2,19p' "$0" >&2; exit 2; }

ODCD=${ODCD:-}
DEV=${ODCD_GPU_CHECK_DEVICE:-cuda:0}
STEPS=${STEPS:-500}
BENCH_STEPS=${BENCH_STEPS:-5}
BENCH_SHAPES=${BENCH_SHAPES:-resnet18 32 64;resnet50 64 32;resnet50 224 64}
PY=${PYTHON:-python3}
R=target/gpu-check
data=$dist/fashion-mnist
[ -f "$data/train-images-idx3-ubyte.gz" ] || data=/usr/share/datasets/fashion-mnist
gpu=false
case "$DEV" in cuda | cuda:*) gpu=true ;; esac
gpu_index=${DEV#cuda:}
[ "$gpu_index" = cuda ] && gpu_index=0

summary=()
failed=0
say() { summary+=("$*"); echo "gpu-check: $*" >&2; }
fail() { say "FAILED: $*"; failed=$((failed + 1)); }

rm -rf "$R"
mkdir -p "$R"
if [ -z "$ODCD" ] && [ -f "$dist/odcd.gz" ]; then
  # the binary that scripts/build-cuda.sh packed
  gzip -dc "$dist/odcd.gz" >"$R/odcd" && chmod +x "$R/odcd" && ODCD=$R/odcd
  build="$dist/odcd.gz: $(cat "$dist/BUILD" 2>/dev/null || echo "no $dist/BUILD")"
fi
[ -x "$ODCD" ] || { echo "gpu-check: no odcd binary (${ODCD:-none}): set ODCD, or build and carry $dist/odcd.gz (docs/gpu.md)" >&2; exit 1; }

# The CUDA libraries the binary links (cuBLAS, cuBLASLt, cuRAND, the runtime) are too
# large to carry; they come from the GPU machine: a CUDA 13 toolkit, or PyTorch's CUDA 13 wheels.
if $gpu; then
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  for d in ${CUDA_HOME:+"$CUDA_HOME/lib64" "$CUDA_HOME/lib"} /usr/local/cuda/lib64 \
    ${site:+"$site/nvidia/cu13/lib" "$site/nvidia/cudnn/lib"} /usr/local/nvidia/lib64 \
    target/cuda-toolkit/lib/python3*/site-packages/nvidia/cu13/lib; do
    if ldd "$ODCD" | grep -q 'not found' && [ -d "$d" ]; then
      export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  done
fi
missing=$(ldd "$ODCD" 2>&1 | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
  echo "gpu-check: $ODCD cannot start, libraries not found: $missing" >&2
  case "$missing" in
    *libcuda.so*) echo "gpu-check: libcuda.so.1 comes with the NVIDIA driver: no driver here, or its folder is not on LD_LIBRARY_PATH" >&2 ;;
  esac
  echo "gpu-check: install CUDA 13's cuBLAS, cuRAND and runtime (a CUDA 13 toolkit, or" \
    "pip install nvidia-cublas nvidia-curand nvidia-cuda-runtime) or set CUDA_HOME" >&2
  exit 1
fi

say "odcd: $("$ODCD" --version) (${build:-$ODCD})"
say "device: $DEV; CUDA libraries from: ${LD_LIBRARY_PATH:-the default library path}"
mem_base=0
if $gpu; then
  say "GPU: $(nvidia-smi -i "$gpu_index" --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
  mem_base=$(nvidia-smi -i "$gpu_index" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null || echo 0)
fi

# Memory in use now, MiB: the GPU's (less what was in use before the check) or, on the CPU,
# the process's resident set.
mem_now() {
  local used
  if $gpu; then
    used=$(nvidia-smi -i "$gpu_index" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null || echo "$mem_base")
    echo $((used - mem_base))
  else
    awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$1/status" 2>/dev/null || echo 0
  fi
}

# measure NAME CMD...: runs CMD (stdout to $R/NAME.out, stderr to $R/NAME.log) while sampling
# the memory every 0.2 s; the peak lands in $R/NAME.mem. Returns CMD's exit status.
measure() {
  local name=$1 pid rc=0 peak=0 v
  shift
  "$@" >"$R/$name.out" 2>"$R/$name.log" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    v=$(mem_now "$pid")
    [ "${v:-0}" -gt "$peak" ] && peak=$v
    sleep 0.2
  done
  wait "$pid" || rc=$?
  echo "$peak" >"$R/$name.mem"
  return "$rc"
}
memory_word() { if $gpu; then echo "GPU memory"; else echo "RSS"; fi; }

# 1. The training-step bench, odcd and PyTorch.
torch_dev=$DEV
have_torch=false
if "$PY" -c 'import torch' >/dev/null 2>&1; then
  have_torch=true
  say "PyTorch: $("$PY" -c 'import torch; print(torch.__version__)')"
else
  say "PyTorch: absent ($PY cannot import torch): odcd figures only"
fi
rate() { sed -nE 's/.* ([0-9.]+) images\/s.*/\1/p' "$1"; }
IFS=';' read -ra shapes <<<"$BENCH_SHAPES"
for shape in "${shapes[@]}"; do
  read -r arch size batch <<<"$shape"
  name="bench-$arch-$size-b$batch"
  if measure "$name" "$ODCD" bench train-step --device "$DEV" --arch "$arch" --size "$size" \
    --batch "$batch" --steps "$BENCH_STEPS"; then
    line="$(cat "$R/$name.out"); peak $(memory_word) $(cat "$R/$name.mem") MiB"
    if $have_torch; then
      if measure "$name-torch" env DEVICE="$torch_dev" ARCH="$arch" SIZE="$size" BATCH="$batch" \
        STEPS="$BENCH_STEPS" OMP_WAIT_POLICY=PASSIVE "$PY" benches/train_step_torch.py; then
        ratio=$("$PY" -c "print(f'{$(rate "$R/$name.out")/$(rate "$R/$name-torch.out"):.2f}')")
        line="$line
    $(cat "$R/$name-torch.out"); peak $(memory_word) $(cat "$R/$name-torch.mem") MiB
    odcd/pytorch images/s: $ratio"
      else
        line="$line
    PyTorch failed: $(tail -n 1 "$R/$name-torch.log")"
      fi
    fi
    say "bench $line"
  else
    fail "bench $arch $size b$batch: $(tail -n 3 "$R/$name.log")"
  fi
done

# 2. Shards, a training run with the embeddings sink, eval on its checkpoint.
ok=true
for split in train test; do
  idx=$([ $split = train ] && echo train || echo t10k)
  n=$([ $split = train ] && echo $train_images || echo $test_images)
  "$ODCD" shards import-idx "$data/$idx-images-idx3-ubyte.gz" "$data/$idx-labels-idx1-ubyte.gz" \
    "file://$PWD/$R/shards/$split/" --per-shard 2000 --prefix "fmnist-$split" --limit "$n" \
    >"$R/shards-$split.out" 2>&1 || { fail "shards import-idx $split: $(tail -n 2 "$R/shards-$split.out")"; ok=false; }
done
log_every=$((STEPS / 10 > 0 ? STEPS / 10 : 1))
sed -e "s/^device = .*/device = \"$DEV\"/" -e "s/^max_steps = .*/max_steps = $STEPS/" \
  -e "s/^log_every = .*/log_every = $log_every/" configs/gpu-check.toml >"$R/run.toml"
if $ok; then
  start=$(date +%s)
  if measure run "$ODCD" run --config "$R/run.toml"; then
    secs=$(($(date +%s) - start))
    # Progress lines carry `step=N loss=X`; the first and the last show whether it learns.
    losses=$(sed -nE 's/.* step=([0-9]+) loss="?([0-9.]+).*/\1 \2/p' "$R/run.log")
    first=$(head -n 1 <<<"$losses")
    last=$(tail -n 1 <<<"$losses")
    say "run: $STEPS steps in $secs s (data loading and the warm-up k-means included); loss at step ${first% *} ${first#* }, at step ${last% *} ${last#* }; peak $(memory_word) $(cat "$R/run.mem") MiB"
    if [ -z "$losses" ] || ! awk -v a="${first#* }" -v b="${last#* }" 'BEGIN { exit !(b < a) }'; then
      fail "run: the loss did not fall (progress lines: $(wc -l <<<"$losses"))"
    fi
    ckpts=$("$ODCD" checkpoint list "$R/checkpoints/" 2>&1)
    n_ckpt=$(grep -c 'step' <<<"$ckpts" || true)
    if [ "$n_ckpt" -gt 0 ]; then say "checkpoints: $(tr -s ' \n' ' ' <<<"$ckpts")"; else fail "no checkpoint written: $ckpts"; fi
    n_pq=$(find "$R/embeddings" -name '*.parquet' 2>/dev/null | wc -l)
    pq_bytes=$(find "$R/embeddings" -name '*.parquet' -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}')
    if [ "$n_pq" -gt 0 ]; then say "embeddings: $n_pq Parquet files, $pq_bytes bytes under $R/embeddings/"; else fail "no embeddings published under $R/embeddings/"; fi
    if measure eval "$ODCD" eval --checkpoint "$R/checkpoints/" --train "$R/shards/train/" \
      --test "$R/shards/test/" --json-out "$R/eval.json"; then
      say "eval (peak $(memory_word) $(cat "$R/eval.mem") MiB):
$(sed 's/^/    /' "$R/eval.out")"
    else
      fail "eval: $(tail -n 3 "$R/eval.log")"
    fi
  else
    fail "run (exit status $?): $(tail -n 5 "$R/run.log")"
  fi
fi

{
  echo "==== odcd GPU check, $(date -u +%FT%TZ) ===="
  printf '%s\n' "${summary[@]}"
  if [ "$failed" -eq 0 ]; then echo "==== all parts passed ===="; else echo "==== $failed part(s) FAILED ===="; fi
} | tee "$R/summary.txt"
[ "$failed" -eq 0 ]
