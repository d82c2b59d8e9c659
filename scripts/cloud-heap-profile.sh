#!/usr/bin/env bash
# Where an idle node's cloud memory goes, by allocation site (BENCHMARKS.md "Where an idle
# node's cloud memory goes"): loadtest starts a fleet of NODES hollow nodes (PODS pods each)
# against a cloudcore run under heaptrack, waits IDLE_AFTER seconds into the idle window, kills
# cloudcore with SIGKILL (what is live then is what the fleet costs at rest) and prints the
# largest live allocation sites. cloudcore is built with `--features system-allocator`: glibc
# malloc, whose allocations heaptrack sees (mimalloc's it does not). Needs heaptrack.
# Output: OUT (default /tmp/kedge-heap) holds the heaptrack data and `leaks.txt`.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
nodes="${NODES:-2000}"
pods="${PODS:-1}"
idle_after="${IDLE_AFTER:-45}"
out="${OUT:-/tmp/kedge-heap}"
command -v heaptrack >/dev/null || { echo "needs heaptrack (apt-get install heaptrack)" >&2; exit 1; }
cargo build --release -q -p loadtest --bin loadtest
cargo build --release -q -p cloud --features system-allocator --bin cloudcore
rm -rf "$out" && mkdir -p "$out"
cp "$target_dir/release/cloudcore" "$out/cloudcore"
# loadtest runs `cloudcore token create …` too: only the server runs under heaptrack.
cat > "$out/cloudcore-under-heaptrack" <<EOF
#!/bin/sh
case "\$1" in token) exec "$out/cloudcore" "\$@" ;; esac
exec heaptrack -o "$out/cloud" "$out/cloudcore" "\$@"
EOF
chmod +x "$out/cloudcore-under-heaptrack"
"$target_dir/release/loadtest" --cloudcore "$out/cloudcore-under-heaptrack" --nodes "$nodes" \
  --pods-per-node "$pods" --scenario idle --idle-window 600s --converge-timeout 300s \
  > "$out/loadtest.log" 2>&1 &
loadtest=$!
trap 'kill $loadtest 2>/dev/null; wait 2>/dev/null' EXIT
# loadtest says `== idle` once connect-storm is done; the window starts after a convergence check.
for _ in $(seq 1 600); do
  grep -q '^== idle' "$out/loadtest.log" 2>/dev/null && break
  sleep 1
done
sleep "$idle_after"
pid=$(pgrep -x cloudcore | head -n 1)
echo "killing cloudcore $pid with SIGKILL, $idle_after s into the idle scenario"
grep -E 'VmRSS' "/proc/$pid/status" || true
kill -9 "$pid"
sleep 2
file=$(ls "$out"/cloud*.zst "$out"/cloud*.gz 2>/dev/null | head -n 1 || true)
heaptrack_print --print-leaks 1 --print-peaks 0 --print-allocators 0 --print-temporary 0 \
  --peak-limit 40 "$file" > "$out/leaks.txt" 2>&1 || true
sed -n '/^MEMORY LEAKS/,$p' "$out/leaks.txt" | head -n 200
