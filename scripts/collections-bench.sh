#!/usr/bin/env bash
# Measures a node's first list of a collection it never held (the subscription: the cloud
# routes every object, the node waits until its cache holds them) against the same list
# served by the cloud and by the node's cache afterwards. Usage: scripts/collections-bench.sh [N]
# (N ConfigMaps of ~200 bytes, default 1000). Debug binaries unless CARGO_PROFILE=release.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
profile="${CARGO_PROFILE:-debug}"
target="${CARGO_TARGET_DIR:-target}"
flag=""; [ "$profile" = release ] && flag="--release"
cargo build -q $flag -p cloud --bin cloudcore -p edge --bin edgecore
bin="$target/$profile"
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(port); quic=$(port); metrics=$(port); meta=$(port)
"$bin/cloudcore" --data-dir "$dir/cloud" --api-listen "127.0.0.1:$api" --quic-listen "127.0.0.1:$quic" \
  --metrics-listen "127.0.0.1:$metrics" 2>"$dir/cloud.log" & pids+=("$!")
K="kubectl --kubeconfig /dev/null --server http://127.0.0.1:$api"
E="kubectl --kubeconfig /dev/null --server http://127.0.0.1:$meta"
for _ in $(seq 1 100); do $K get --raw /healthz >/dev/null 2>&1 && break; sleep 0.1; done
token=$("$bin/cloudcore" token create --data-dir "$dir/cloud" | tail -n1)
"$bin/edgecore" --node-name bench-1 --cloud "127.0.0.1:$quic" --token "$token" --data-dir "$dir/edge" \
  --metaserver-listen "127.0.0.1:$meta" --mqtt-listen 127.0.0.1:0 2>"$dir/edge.log" & pids+=("$!")
for _ in $(seq 1 300); do $E get --raw /healthz >/dev/null 2>&1 && break; sleep 0.1; done
$K create namespace bench >/dev/null
python3 - "$n" > "$dir/list.json" <<'PY'
import json, sys
n = int(sys.argv[1])
items = [{"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": f"cm-{i:05d}", "namespace": "bench", "labels": {"app": "bench"}},
          "data": {"config": "x" * 120}} for i in range(n)]
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
PY
# kind: List makes kubectl validate client-side with /openapi/v2, which is not served.
$K create --validate=false -f "$dir/list.json" >/dev/null
ms() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo $(( (e - s) / 1000000 )); }
path=/api/v1/namespaces/bench/configmaps
cloud=$(ms $K get --raw "$path")
first=$(ms $E get --raw "$path")
count=$($E get --raw "$path" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["items"]))')
cached=$(ms $E get --raw "$path")
cloud2=$(ms $K get --raw "$path")
echo "configmaps=$n edge_items=$count cloud_list_ms=$cloud,$cloud2 edge_first_list_ms=$first edge_cached_list_ms=$cached"
