#!/usr/bin/env bash
# The test suite, as CI runs it: formatting, lints, every test, and every criterion benchmark
# once in test mode (so benchmarks cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test --workspace --all-targets (benches run once in test mode)"
cargo test --workspace --all-targets
