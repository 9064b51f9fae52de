#!/usr/bin/env bash
# The test command of the README: brings up PostgreSQL and RabbitMQ when they
# are not reachable, then runs every test of the workspace with every feature.
# Extra arguments go to cargo test (e.g. `scripts/test.sh -p outbox`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
exec cargo test --workspace --all-features "$@"
