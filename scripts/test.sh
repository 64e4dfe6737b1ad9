#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs every test.
# The integration tests start their own real services (moto_server) on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test "$@"
