#!/usr/bin/env bash
# The demo of the README: brings up PostgreSQL and RabbitMQ when they are not
# reachable, then runs the whole shop under load and checks it. Arguments go
# to the demo (e.g. `scripts/demo.sh --orders 2000 --faults`; `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
exec cargo run --release --quiet -p shop --bin shop-demo -- "$@"
