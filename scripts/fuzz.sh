#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 600, the issue's ten minutes),
# one after another, then minimizes each corpus (`cargo fuzz cmin`) into fuzz/corpus/NAME, which
# is kept in git and replayed by `cargo test -p kedge-fuzz`. Prints one line per target: runs,
# executions per second, coverage (libFuzzer's cov/ft) and the inputs that crashed (left in
# fuzz/artifacts/NAME).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (installed here if missing) and builds with RUSTC_BOOTSTRAP=1 on stable. The
# targets link RocksDB: a librocksdb.a from an earlier workspace build is reused when there is one
# (RocksDB itself is not what is fuzzed), which saves the C++ build.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-600}
shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${KEDGE_FUZZ_TARGET_DIR:-/var/cache/kedge-fuzz/target}"
# Thin LTO with one codegen unit (the workspace's release profile) made the cold fuzz build take
# 27 minutes here; the fuzzer needs optimized code, not the last few percent of it.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
built=$(ls -t "${KEDGE_CACHE_DIR:-/var/cache/kedge-ci}"/target/*/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -1 || true)
if [ -n "$built" ]; then
  lib_dir="$(dirname "$CARGO_TARGET_DIR")/rocksdb"
  mkdir -p "$lib_dir"
  cp -u "$built" "$lib_dir/librocksdb.a"
  export ROCKSDB_LIB_DIR="$lib_dir" ROCKSDB_STATIC=1
fi
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
# Built once, then the binaries are run directly: `cargo fuzz run` would rebuild whenever a
# source file changed during the (long) run. KEDGE_FUZZ_NO_BUILD=1 reuses the last build.
[ -n "${KEDGE_FUZZ_NO_BUILD:-}" ] || cargo fuzz build -s none -O --features fuzz-targets
bin_dir="$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release"
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  status=0
  "$bin_dir/$t" -artifact_prefix="artifacts/$t/" -max_total_time="$seconds" -print_final_stats=1 \
    -rss_limit_mb=4096 -timeout=10 "corpus/$t" >"logs/$t.log" 2>&1 || status=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo 0)
  rate=$(grep -o 'exec/s: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "logs/$t.log" | tail -1 || true)
  # Minimize (what `cargo fuzz cmin` does): merge into an empty directory, keep that.
  rm -rf "corpus/$t.min" && mkdir -p "corpus/$t.min"
  if "$bin_dir/$t" -merge=1 -rss_limit_mb=4096 -timeout=10 "corpus/$t.min" "corpus/$t" >>"logs/$t.log" 2>&1; then
    rm -rf "corpus/$t" && mv "corpus/$t.min" "corpus/$t"
  else
    rm -rf "corpus/$t.min"
  fi
  kept=$(find "corpus/$t" -type f | wc -l)
  crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
  echo "$t: ${seconds}s, $runs runs, $rate exec/s, $cov, corpus $kept, crashes $crashes (exit $status)"
done
