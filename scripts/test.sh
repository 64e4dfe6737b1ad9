#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs every test (unit tests
# and the integration tests in tests/, which start their own real services on 127.0.0.1:
# moto_server for S3, Prometheus, Tansu for Kafka, OpenMPI's mpirun, and the odcd binary itself).
#   scripts/test.sh [CARGO TEST ARGS...]
# Environment: ODCD_SETUP_DONE=1 skips scripts/setup.sh (.ci/run sets it after running setup
# itself, so CI installs once).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${ODCD_SETUP_DONE:-}" ] || scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --features mpi: the data-parallel tests (tests/daemon_mpi.rs) run `mpirun -np 2 odcd run`.
cargo test --features mpi --lib --bins --tests "$@" 2>&1 | tee "$log"
# One closing line over all test binaries.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
