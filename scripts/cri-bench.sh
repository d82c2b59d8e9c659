#!/usr/bin/env bash
# Pod start with `edgecore --runtime cri` against `ctr run` of the same image, in the same run
# on the same throw-away containerd (scripts/cri-env.sh): BENCHMARKS.md "CRI: pod start".
#
#   scripts/cri-bench.sh [N]       # N pods of each kind, one at a time (default 10)
#   scripts/cri-bench.sh many [N]  # N pods at once on one node (default 100), CRI and process runtime
#   BIN=/path/to/dir scripts/cri-bench.sh   # cloudcore/edgecore from there (default: a release build)
#
# `many`: N pods created at once on an `edgecore --runtime cri` node, then N on an
# `edgecore --runtime process` node (each bound by nodeName); for each, the time from the
# first POST until the cloud's watch shows all N Running, edgecore's CPU seconds over that time
# (/proc/PID/stat), and its RSS after 35 s idle with the N pods running.
#
# kedge: time from the pod's POST to the cloud's API until the cloud's watch shows it Running
# (scheduling, sync to the node, sandbox + container through CRI, the status back up), image
# already present (IfNotPresent). Baseline: `ctr run -d` (returns once the task started) of the
# same image, with --net-host against hostNetwork pods and with a fresh netns (no CNI) against
# CNI pods.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=start
if [ "${1:-}" = many ]; then mode=many; shift; n="${1:-100}"; else n="${1:-10}"; fi
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
  [ -z "${KEEP_LOGS:-}" ] || cp "$work"/*.log "$KEEP_LOGS"/ 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
CNI_SUBNET=10.77.0.0/16 PUSH_IMAGE=scripts/push-image.sh scripts/cri-env.sh up "$env_dir" >/dev/null
. "$env_dir/env"
sock=${CRI_ENDPOINT#unix://}
ctr=(ctr --address "$sock" -n kedge-bench)

# cloudcore on loopback; sets api and token (a bootstrap token for the edgecores).
api=127.0.0.1:17180
start_cloud() {
  "$BIN/cloudcore" --data-dir "$work/cloud" --api-listen "$api" \
    --metrics-listen 127.0.0.1:17191 --quic-listen 127.0.0.1:17101 2>"$work/cloud.log" &
  pids+=($!)
  for _ in $(seq 1 100); do curl -sf "http://$api/healthz" >/dev/null && break; sleep 0.1; done
  token=$("$BIN/cloudcore" token create --data-dir "$work/cloud" | tail -1)
}

if [ "$mode" = many ]; then
  start_cloud
  "$BIN/edgecore" --node-name bench-cri --cloud 127.0.0.1:17101 --data-dir "$work/edge-cri" \
    --metaserver-listen 127.0.0.1:17651 --no-mqtt --token "$token" \
    --runtime cri --cri-endpoint "$CRI_ENDPOINT" 2>"$work/edge-cri.log" &
  cri_pid=$!; pids+=($cri_pid)
  "$BIN/edgecore" --node-name bench-proc --cloud 127.0.0.1:17101 --data-dir "$work/edge-proc" \
    --metaserver-listen 127.0.0.1:17652 --no-mqtt --token "$token" \
    --runtime process 2>"$work/edge-proc.log" &
  proc_pid=$!; pids+=($proc_pid)
  for node in bench-cri bench-proc; do
    for _ in $(seq 1 150); do
      kubectl --kubeconfig /dev/null --server "http://$api" get node "$node" >/dev/null 2>&1 && break
      sleep 0.2
    done
  done
  python3 - "$api" "$BUSYBOX_IMAGE" "$n" "$cri_pid" "$proc_pid" <<'PY'
import json, os, sys, threading, time, urllib.request
api, image, n, cri_pid, proc_pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
running = set()
cond = threading.Condition()
tick = os.sysconf("SC_CLK_TCK")

def watch():
    for line in urllib.request.urlopen(f"http://{api}/api/v1/namespaces/default/pods?watch=1", timeout=3600):
        pod = json.loads(line).get("object", {})
        if pod.get("status", {}).get("phase") == "Running":
            with cond:
                running.add(pod["metadata"]["name"])
                cond.notify_all()

threading.Thread(target=watch, daemon=True).start()
time.sleep(0.5)

def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def post(pod):
    req = urllib.request.Request(f"http://{api}/api/v1/namespaces/default/pods", data=json.dumps(pod).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req).read()

def burst(node, pid, prefix):
    names = [f"{prefix}-{i}" for i in range(n)]
    c0, t0 = cpu(pid), time.monotonic()
    for name in names:
        post({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
              "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                       "containers": [{"name": "main", "image": image,
                                       "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]}]}})
    with cond:
        if not cond.wait_for(lambda: all(x in running for x in names), timeout=900):
            sys.exit(f"{node}: {sum(x in running for x in names)} of {n} Running after 900 s")
    return time.monotonic() - t0, cpu(pid) - c0

res = {}
res["cri"] = burst("bench-cri", cri_pid, "c")
res["process"] = burst("bench-proc", proc_pid, "p")
time.sleep(35)
print(f"{n} pods at once on one node (cloudcore + edgecore on this machine)")
print("| runtime | all Running after | edgecore CPU during the start | edgecore RSS, idle with the pods |")
print("|---|---|---|---|")
for label, pid in (("cri", cri_pid), ("process", proc_pid)):
    wall, secs = res[label]
    print(f"| {label} | {wall:.1f} s | {secs:.2f} s | {rss(pid):.1f} MB |")
PY
  exit 0
fi

# --- baseline image: pulled once into ctr's own namespace (kedge's is pulled by its warm-up pod)
"${ctr[@]}" images pull --plain-http "$BUSYBOX_IMAGE" >/dev/null

# --- kedge: cloudcore + one edgecore --runtime cri
start_cloud
"$BIN/edgecore" --node-name bench-1 --cloud 127.0.0.1:17101 --data-dir "$work/edge" \
  --metaserver-listen 127.0.0.1:17651 --no-mqtt --token "$token" \
  --runtime cri --cri-endpoint "$CRI_ENDPOINT" 2>"$work/edge.log" &
pids+=($!)
for _ in $(seq 1 150); do
  kubectl --kubeconfig /dev/null --server "http://$api" get node bench-1 >/dev/null 2>&1 && break
  sleep 0.2
done

python3 - "$api" "$BUSYBOX_IMAGE" "$n" "$sock" <<'PY'
import json, statistics, subprocess, sys, threading, time, urllib.request
api, image, n, sock = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctr = ["ctr", "--address", sock, "-n", "kedge-bench"]
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

def ctr_run(name, host):
    args = ctr + ["run", "-d"] + (["--net-host"] if host else []) + [image, name, "sh", "-c", "sleep 3600"]
    t0 = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return (time.monotonic() - t0) * 1e6

create("warm-up", False)  # the image is pulled here, once
res, base = {}, {}
# Interleaved, one kedge pod then one `ctr run`, so that both see the same machine.
for label, host in (("host", True), ("netns", False)):
    res[label], base[label] = [], []
    for i in range(n):
        res[label].append(create(f"p-{label}-{i}", host))
        base[label].append(ctr_run(f"b-{label}-{i}", host))
for label in base:
    for i in range(n):
        subprocess.run(ctr + ["task", "kill", "-s", "KILL", f"b-{label}-{i}"], stderr=subprocess.DEVNULL)
time.sleep(0.5)
for label in base:
    for i in range(n):
        subprocess.run(ctr + ["task", "rm", "-f", f"b-{label}-{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(ctr + ["containers", "rm", f"b-{label}-{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def ms(v):
    return f"{v / 1000:.0f} ms"

print(f"pod start, {n} pods each, one at a time (median / p90 / min)")
print("| pods | kedge --runtime cri: create → Running | baseline `ctr run -d` | ratio (medians) |")
print("|---|---|---|---|")
for label, what, kind in (("host", "hostNetwork", "--net-host"), ("netns", "CNI bridge", "own netns, no CNI")):
    k, c = sorted(res[label]), sorted(base[label])
    p90 = lambda v: v[min(len(v) - 1, int(len(v) * 0.9))]
    km, cm = statistics.median(k), statistics.median(c)
    print(f"| {what} | {ms(km)} / {ms(p90(k))} / {ms(k[0])} | {ms(cm)} / {ms(p90(c))} / {ms(c[0])} ({kind}) | {km / cm:.2f}× |")
PY
