#!/usr/bin/env bash
# The main job, for now: the transport demo (a cloud endpoint and edge nodes exchanging acked
# messages over kedge's QUIC link on loopback). Arguments go to the demo (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release -p loadtest --bin transport-demo -- "$@"
