#!/usr/bin/env bash
# Pod start with `edgecore --runtime cri` against `ctr run` of the same image, in the same run
# on the same throw-away containerd (scripts/cri-env.sh): BENCHMARKS.md "CRI: pod start".
#
#   scripts/cri-bench.sh [N]     # N pods of each kind, one at a time (default 10)
#   BIN=/path/to/dir scripts/cri-bench.sh   # cloudcore/edgecore from there (default: a release build)
#
# kedge: time from the pod's POST to the cloud's API until the cloud's watch shows it Running
# (scheduling, sync to the node, sandbox + container through CRI, the status back up), image
# already present (IfNotPresent). Baseline: `ctr run -d` (returns once the task started) of the
# same image, with --net-host against hostNetwork pods and with a fresh netns (no CNI) against
# CNI pods.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10}"
if [ -z "${BIN:-}" ]; then
  cargo build --release -q --workspace --bins
  BIN="${CARGO_TARGET_DIR:-target}/release"
fi
env_dir=$(mktemp -d /tmp/kcri.XXXX)
work=$(mktemp -d /tmp/kedge-cri-bench.XXXXXX)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  CNI_SUBNET=10.77.0.0/16 scripts/cri-env.sh down "$env_dir" || true
  rm -rf "$work"
}
trap cleanup EXIT
CNI_SUBNET=10.77.0.0/16 PUSH_IMAGE=scripts/push-image.sh scripts/cri-env.sh up "$env_dir" >/dev/null
. "$env_dir/env"
sock=${CRI_ENDPOINT#unix://}
ctr=(ctr --address "$sock" -n kedge-bench)

# --- baseline: ctr run of the same image (pulled once into its own namespace)
"${ctr[@]}" images pull --plain-http "$BUSYBOX_IMAGE" >/dev/null
ctr_run() { # label args...
  local label=$1; shift
  local times=()
  for i in $(seq 1 "$n"); do
    local s e; s=$(date +%s%N)
    "${ctr[@]}" run -d "$@" "$BUSYBOX_IMAGE" "b-$label-$i" sh -c 'sleep 3600' >/dev/null
    e=$(date +%s%N); times+=($(( (e - s) / 1000 )))
  done
  for i in $(seq 1 "$n"); do
    "${ctr[@]}" task kill -s KILL "b-$label-$i" >/dev/null 2>&1 || true
  done
  sleep 0.5
  for i in $(seq 1 "$n"); do
    "${ctr[@]}" task rm -f "b-$label-$i" >/dev/null 2>&1 || true
    "${ctr[@]}" containers rm "b-$label-$i" >/dev/null 2>&1 || true
  done
  printf '%s\n' "${times[@]}" >"$work/ctr-$label"
}
ctr_run host --net-host
ctr_run netns

# --- kedge: cloudcore + one edgecore --runtime cri
api=127.0.0.1:17180
"$BIN/cloudcore" --data-dir "$work/cloud" --api-listen "$api" \
  --metrics-listen 127.0.0.1:17191 --quic-listen 127.0.0.1:17101 2>"$work/cloud.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://$api/healthz" >/dev/null && break; sleep 0.1; done
token=$("$BIN/cloudcore" token create --data-dir "$work/cloud" | tail -1)
"$BIN/edgecore" --node-name bench-1 --cloud 127.0.0.1:17101 --data-dir "$work/edge" \
  --metaserver-listen 127.0.0.1:17651 --no-mqtt --token "$token" \
  --runtime cri --cri-endpoint "$CRI_ENDPOINT" 2>"$work/edge.log" &
pids+=($!)
for _ in $(seq 1 150); do
  kubectl --kubeconfig /dev/null --server "http://$api" get node bench-1 >/dev/null 2>&1 && break
  sleep 0.2
done

python3 - "$api" "$BUSYBOX_IMAGE" "$n" "$work" <<'PY'
import json, statistics, sys, threading, time, urllib.request
api, image, n, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
running = {}
cond = threading.Condition()

def watch():
    req = urllib.request.urlopen(f"http://{api}/api/v1/namespaces/default/pods?watch=1", timeout=600)
    for line in req:
        ev = json.loads(line)
        pod = ev.get("object", {})
        name = pod.get("metadata", {}).get("name")
        if pod.get("status", {}).get("phase") == "Running":
            with cond:
                running.setdefault(name, time.monotonic())
                cond.notify_all()

threading.Thread(target=watch, daemon=True).start()
time.sleep(0.5)

def pod(name, host):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"hostNetwork": host, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": image,
                                     "command": ["sh", "-c", "sleep 3600"]}]}}

def create(name, host):
    body = json.dumps(pod(name, host)).encode()
    req = urllib.request.Request(f"http://{api}/api/v1/namespaces/default/pods", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.monotonic()
    urllib.request.urlopen(req).read()
    with cond:
        if not cond.wait_for(lambda: name in running, timeout=120):
            sys.exit(f"{name} not Running within 120 s")
    return (running[name] - t0) * 1e6

create("warm-up", False)  # the image is pulled here, once
res = {}
for label, host in (("host", True), ("netns", False)):
    res[label] = [create(f"p-{label}-{i}", host) for i in range(n)]

def ctr(label):
    return [int(x) for x in open(f"{work}/ctr-{label}").read().split()]

def ms(v):
    return f"{v / 1000:.0f} ms"

print(f"pod start, {n} pods each, one at a time (median / p90 / min)")
print("| pods | kedge --runtime cri: create → Running | baseline `ctr run -d` | ratio (medians) |")
print("|---|---|---|---|")
for label, what, base in (("host", "hostNetwork", "--net-host"), ("netns", "CNI bridge", "own netns, no CNI")):
    k, c = sorted(res[label]), sorted(ctr(label))
    p90 = lambda v: v[min(len(v) - 1, int(len(v) * 0.9))]
    km, cm = statistics.median(k), statistics.median(c)
    print(f"| {what} | {ms(km)} / {ms(p90(k))} / {ms(k[0])} | {ms(cm)} / {ms(p90(c))} / {ms(c[0])} ({base}) | {km / cm:.2f}× |")
PY
