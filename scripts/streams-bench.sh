#!/usr/bin/env bash
# kubectl logs, kubectl exec and kubectl port-forward through kedge, against the same done on
# the node: release cloudcore + one edgecore on loopback, hyperfine for the timings
# (BENCHMARKS.md "Streams").
#   scripts/streams-bench.sh [LINES] [MIB]   # LINES of log to read (default 200000),
#                                            # MIB through port-forward per run (default 512)
set -euo pipefail
cd "$(dirname "$0")/.."
lines="${1:-200000}"
mib="${2:-512}"
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)" >&2; exit 2; }
# --workspace (not -p): the same features as every other build, so RocksDB is not rebuilt.
cargo build --release -q --workspace --bin cloudcore --bin edgecore
bin="${CARGO_TARGET_DIR:-target}/release"
dir=$(mktemp -d /tmp/kedge-streams.XXXXXX)
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
pids=()
trap cleanup EXIT
"$bin/cloudcore" --data-dir "$dir/cloud" --api-listen 127.0.0.1:17080 \
  --metrics-listen 127.0.0.1:17091 --quic-listen 127.0.0.1:17001 2>"$dir/cloud.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:17080/healthz >/dev/null && break; sleep 0.1; done
token=$("$bin/cloudcore" token create --data-dir "$dir/cloud" | tail -1)
"$bin/edgecore" --node-name bench-1 --cloud 127.0.0.1:17001 --data-dir "$dir/edge" \
  --metaserver-listen 127.0.0.1:17551 --no-mqtt --token "$token" 2>"$dir/edge.log" &
pids+=($!)
cloud="kubectl --kubeconfig /dev/null --server http://127.0.0.1:17080"
node="kubectl --kubeconfig /dev/null --server http://127.0.0.1:17551"
for _ in $(seq 1 100); do $cloud get node bench-1 >/dev/null 2>&1 && break; sleep 0.2; done
$cloud apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: talker}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "i=0; while [ \$i -lt $lines ]; do echo \"line \$i of the benchmark log, some seventy bytes long........\"; i=\$((i+1)); done; exec sleep 100000"]
EOF
for _ in $(seq 1 600); do
  n=$($node logs talker 2>/dev/null | wc -l || true)
  [ "$n" -ge "$lines" ] && break
  sleep 0.5
done
bytes=$($node logs talker | wc -c)
echo "log: $lines lines, $bytes bytes"
file=$(ls "$dir"/edge/pods/default_talker/main.log)
hyperfine -N --warmup 2 --runs 10 \
  -n "cloud: kubectl logs (QUIC link)" "$cloud logs talker" \
  -n "node: kubectl logs (MetaServer)" "$node logs talker" \
  -n "node: cat of the CRI log file" "cat $file"
hyperfine -N --warmup 3 --runs 30 \
  -n "cloud: kubectl exec -- true (QUIC link)" "$cloud exec talker -- true" \
  -n "node: kubectl exec -- true (MetaServer)" "$node exec talker -- true" \
  -n "node: kubectl get pod (MetaServer, no exec)" "$node get pod talker -o name"

# Port-forward throughput: a pod that sends $mib MiB on each connection, read through kubectl
# port-forward from the cloud (QUIC link), from MetaServer, and directly on the node.
cat > "$dir/source.py" <<PY
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 17800))
s.listen(16)
chunk = bytes(1 << 20)
def send(c):
    try:
        for _ in range($mib):
            c.sendall(chunk)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=send, args=(c,), daemon=True).start()
PY
$cloud apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: source}
spec:
  containers:
  - name: main
    image: python
    command: ["python3", "$dir/source.py"]
YAML
listening() { ss -ltn "sport = :$1" | grep -q LISTEN; }
for _ in $(seq 1 100); do listening 17800 && break; sleep 0.2; done
# kubectl port-forward refuses a pod that is not Running yet (as both APIs see it).
for api in "$cloud" "$node"; do
  for _ in $(seq 1 100); do
    [ "$($api get pod source -o jsonpath='{.status.phase}')" = Running ] && break
    sleep 0.2
  done
done
$cloud port-forward pod/source 17801:17800 >"$dir/pf-cloud.log" 2>&1 &
pids+=($!)
$node port-forward pod/source 17802:17800 >"$dir/pf-node.log" 2>&1 &
pids+=($!)
for port in 17801 17802; do
  for _ in $(seq 1 100); do listening $port && break; sleep 0.2; done
done
echo "port-forward: $mib MiB per run"
hyperfine -N --warmup 1 --runs 5 \
  -n "cloud: kubectl port-forward (QUIC link)" "bash -c 'cat </dev/tcp/127.0.0.1/17801 >/dev/null'" \
  -n "node: kubectl port-forward (MetaServer)" "bash -c 'cat </dev/tcp/127.0.0.1/17802 >/dev/null'" \
  -n "node: the pod's port directly" "bash -c 'cat </dev/tcp/127.0.0.1/17800 >/dev/null'"
