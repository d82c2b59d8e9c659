#!/usr/bin/env bash
# edgecore's idle memory with 100 cached pods (BENCHMARKS.md "edgecore idle memory"):
# release cloudcore + edgecore (hollow runtime) on loopback, 100 pods bound to the node, then
# VmRSS / RssAnon / RssFile of edgecore after 35 s idle. Extra arguments go to edgecore
# (e.g. --no-mqtt). Needs kubectl. PROFILE=release measures the speed-optimized edgecore
# instead of the size-optimized one devices get (`--profile edge`, the default here);
# SMAPS=1 adds resident memory per mapping, SMAPS=2 each large anonymous mapping.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
profile="${PROFILE:-edge}"
cargo build --release -q -p cloud --bin cloudcore
cargo build --profile "$profile" -q -p edge --bin edgecore
bin="$target_dir/release"
edgecore="$target_dir/$profile/edgecore"
dir=$(mktemp -d /tmp/kedge-rss.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
"$bin/cloudcore" --data-dir "$dir/cloud" --quic-listen 127.0.0.1:19101 \
  --api-listen 127.0.0.1:19180 --metrics-listen 127.0.0.1:19191 2> "$dir/cloud.log" &
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:19180/healthz >/dev/null && break; sleep 0.1; done
# The embedded broker on a port of its own, unless the arguments choose otherwise.
mqtt=(--mqtt-listen 127.0.0.1:19883)
case " $* " in *" --no-mqtt "* | *" --mqtt-url "*) mqtt=() ;; esac
token=$("$bin/cloudcore" token create --data-dir "$dir/cloud" | tail -n 1)
"$edgecore" --node-name edge-1 --cloud 127.0.0.1:19101 --token "$token" --data-dir "$dir/edge" \
  --metaserver-listen 127.0.0.1:19550 "${mqtt[@]}" --runtime hollow "$@" \
  2> "$dir/edge.log" &
edge=$!
sleep 3
for i in $(seq 1 100); do
  printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: p%d}\nspec:\n  nodeName: edge-1\n  containers: [{name: c, image: busybox, command: [sleep, "1000"]}]\n---\n' "$i"
done | kubectl --server http://127.0.0.1:19180 apply -f - >/dev/null
sleep 35
grep -E "VmRSS|RssAnon|RssFile" "/proc/$edge/status"
if [ -n "${SMAPS:-}" ]; then
  # Resident kB per mapped file (the binary's code, shared libraries) and anonymous memory.
  awk '/^[0-9a-f]+-[0-9a-f]+ /{name=($6==""?"[anon]":$6)} /^Rss:/{rss[name]+=$2} END{for(n in rss) if(rss[n]>0) printf "%8d kB  %s\n", rss[n], n}' \
    "/proc/$edge/smaps" | sort -rn | head -15
  ls -l "$edgecore"
fi
if [ "${SMAPS:-}" = 2 ]; then
  # Each anonymous mapping of 256 kB or more resident: address range, size, resident.
  awk '/^[0-9a-f]+-[0-9a-f]+ /{range=$1; anon=($6=="" || $6 ~ /^\[/); name=$6} /^Size:/{size=$2}
       /^Rss:/{if (anon && $2 >= 256) printf "%-34s %-8s size %7d kB  rss %6d kB\n", range, name, size, $2}' \
    "/proc/$edge/smaps"
fi
