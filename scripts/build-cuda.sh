#!/usr/bin/env bash
# Builds `odcd` with the `cuda` feature on a machine with no GPU and no system CUDA toolkit.
# Leaves the stripped binary in target/cuda-build/odcd and, gzipped, in target/cuda-dist/odcd.gz:
# the folder to carry to a GPU machine with the repository (docs/gpu.md, scripts/gpu-check.sh).
#   scripts/build-cuda.sh                 # CUDA 13.0 toolkit from PyPI wheels, then the build
#   scripts/build-cuda.sh --jobs 1        # fewer parallel compilers (default 2)
#   scripts/build-cuda.sh --nice 0        # normal priority (default 19: yields to other builds)
#   scripts/build-cuda.sh --compute-cap 80  # another GPU generation (default 90, Hopper H100/H200)
#   scripts/build-cuda.sh --cudnn         # also candle's cuDNN convolutions (needs cuDNN 9 there)
# The toolkit is NVIDIA's CUDA 13.0 PyPI wheels in a venv under target/cuda-toolkit (ignored by
# git, nothing installed system-wide; re-runs reuse it). 13.0 because candle's kernels travel as
# PTX that the GPU's driver compiles when they load, and a driver only loads PTX from its own CUDA
# version or older: the 580 drivers are CUDA 13.0. Needs python3 with venv, cc, and the network
# to PyPI on the first run. Took 31 min on the 2-core development machine over a CPU release
# build's target/ (docs/gpu.md: how it was measured), so CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${JOBS:-2}
nice_level=${NICE:-19}
compute_cap=${CUDA_COMPUTE_CAP:-90}
cudnn=false
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
    --nice) nice_level=${2:?--nice needs a number}; shift 2 ;;
    --compute-cap) compute_cap=${2:?--compute-cap needs a number such as 90}; shift 2 ;;
    --cudnn) cudnn=true; shift ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
venv=target/cuda-toolkit
# CUDA 13.0.x releases of each wheel (the compiler, its front end and headers, and the libraries
# that candle links: runtime, NVRTC, cuBLAS, cuRAND). nvidia-cuda-nvcc-cu12 would not do: for
# CUDA 12 that wheel holds only ptxas, while the CUDA 13 wheels below carry nvcc itself.
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
)
if $cudnn; then wheels+=(nvidia-cudnn-cu13==9.13.1.26); fi
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${wheels[*]}" ]; then
  echo "build-cuda: installing the CUDA 13.0 wheels into $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}"
  echo "${wheels[*]}" >"$stamp"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CUDA_HOME="$site/nvidia/cu13"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "build-cuda: no nvcc in $CUDA_HOME/bin: the nvidia-cuda-nvcc wheel's layout changed" >&2; exit 1; }
export PATH="$CUDA_HOME/bin:$PATH"

# The linker wants unversioned names (-lcublas finds libcublas.so); the wheels ship only the
# versioned libraries, so link names point at them. The binary then needs the versioned names.
libs=(cudart cublas cublasLt curand nvrtc)
if $cudnn; then
  libs+=(cudnn)
  # cuDNN's wheel has its own folder; its headers and library join the toolkit's for the build.
  for f in "$site"/nvidia/cudnn/include/*.h; do ln -sf "$f" "$CUDA_HOME/include/"; done
  for f in "$site"/nvidia/cudnn/lib/libcudnn*.so.*; do ln -sf "$f" "$CUDA_HOME/lib/"; done
fi
for l in "${libs[@]}"; do
  real=$(find "$CUDA_HOME/lib" -maxdepth 1 -regex ".*/lib$l\.so\.[0-9]+" | head -n 1)
  [ -n "$real" ] || { echo "build-cuda: lib$l.so.N missing from $CUDA_HOME/lib" >&2; exit 1; }
  ln -sf "$(basename "$real")" "$CUDA_HOME/lib/lib$l.so"
done

# libcuda.so is the GPU driver's own library: no wheel ships it and this machine has no driver.
# candle builds cudarc with `dynamic-linking`, so the link needs a libcuda.so that names the driver
# API's functions. This link-time library (like the toolkit's lib/stubs/libcuda.so) defines each
# function cudarc declares, with the driver's soname libcuda.so.1; it is never carried or loaded:
# on the GPU machine the dynamic loader finds the driver's real libcuda.so.1.
cudarc=$(awk '/^name = "cudarc"$/ {getline; print $3}' Cargo.lock | tr -d '"')
cargo fetch --quiet
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc" | head -1)
stub_dir="$CUDA_HOME/lib/stubs"
if [ ! -f "$stub_dir/libcuda.so" ] || [ "$stub_dir/libcuda.so" -ot "$cudarc_src/src/driver/sys/mod.rs" ]; then
  mkdir -p "$stub_dir"
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc_src/src/driver/sys/mod.rs" |
    awk '{print "void " $4 "(void) {}"}' | sort -u >"$stub_dir/libcuda_link.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so" "$stub_dir/libcuda_link.c"
fi

features=cuda
if $cudnn; then features=cuda,cudnn; fi
echo "build-cuda: cargo build --release --features $features -j $jobs (nice $nice_level, compute capability $compute_cap)" >&2
# CUDA_COMPUTE_CAP: candle's kernel build otherwise asks nvidia-smi, which a GPU-less machine lacks.
# CUDAFORGE_THREADS: how many nvcc run at once in that kernel build.
CUDA_COMPUTE_CAP=$compute_cap CUDAFORGE_THREADS=$jobs \
  nice -n "$nice_level" cargo build --release --features "$features" -j "$jobs" --bin odcd

# The stripped binary is over the 64 MiB that can be carried to a GPU machine (candle's kernels:
# ~31 MB of sm_90a machine code and ~10 MB of PTX); gzip brings it to about a third. gzip, not
# xz, since every machine has it. scripts/gpu-check.sh unpacks it.
mkdir -p target/cuda-build target/cuda-dist
rm -f target/cuda-dist/odcd
cp target/release/odcd target/cuda-build/odcd
strip target/cuda-build/odcd
echo "build-cuda: compressing target/cuda-dist/odcd.gz" >&2
nice -n "$nice_level" gzip -9 -c target/cuda-build/odcd >target/cuda-dist/odcd.gz
echo "$features compute_cap=$compute_cap cuda=13.0 commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo -dirty)" \
  >target/cuda-dist/BUILD
size=$(stat -c %s target/cuda-build/odcd)
packed=$(stat -c %s target/cuda-dist/odcd.gz)
echo "build-cuda: target/cuda-build/odcd (stripped): $((size / 1024 / 1024)) MiB ($size bytes)"
echo "build-cuda: target/cuda-dist/odcd.gz (to carry): $((packed / 1024 / 1024)) MiB ($packed bytes)"
echo "build-cuda: done in $(($(date +%s) - start)) s"
if [ "$packed" -gt $((64 * 1024 * 1024)) ]; then
  echo "build-cuda: odcd.gz is over 64 MiB, more than can be carried to a GPU machine" >&2
  exit 1
fi
echo "build-cuda: dynamic libraries (ldd; libcuda.so.1 is the GPU driver's, the other CUDA ones"
echo "build-cuda: must be on the GPU machine too: docs/gpu.md):"
LD_LIBRARY_PATH="$CUDA_HOME/lib" ldd target/cuda-build/odcd
