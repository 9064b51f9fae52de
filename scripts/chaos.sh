#!/usr/bin/env bash
# The fault suite (shop-chaos): producers, two outbox-relay processes and
# two consumers of two instances each on partition queues, while relays and
# consumers are killed with SIGKILL, the broker is restarted, every
# database session is terminated, every broker connection closed and the
# partition count changed. Exits non-zero on any loss, double application,
# order violation, dead letter or parked row.
#
#   scripts/chaos.sh            100,000 events, release build (about 5 min)
#   scripts/chaos.sh --short    10,000 events, debug build (CI)
#
# Further arguments go to `shop-chaos run` (see `--help`). It restarts
# RabbitMQ and terminates PostgreSQL sessions: never run it beside tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
profile=release
dir=target/release
args=()
if [ "${1:-}" = "--short" ]; then
    shift
    # The debug build reuses what the tests compiled.
    profile=dev
    dir=target/debug
    args=(--events 10000 --rate 250 --drain-timeout 300)
fi
cargo build --quiet --profile "$profile" --workspace --all-features --bins
exec "$dir/shop-chaos" run "${args[@]}" "$@"
