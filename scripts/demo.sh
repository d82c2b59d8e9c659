#!/usr/bin/env bash
# The main job: cloudcore with its embedded Kubernetes-compatible API server, three edgecores
# on this machine that join it with a bootstrap token, a sample workload (a namespace, a
# ConfigMap, a Deployment of three pods and a DaemonSet) applied with kubectl and run as
# containers of containerd pulled from a local registry, a device on edge-1 reporting over
# MQTT, and how to look at it from the cloud and from an edge.
#
#   ./scripts/demo.sh            # runs until Ctrl-C; use kubectl meanwhile
#   ./scripts/demo.sh --once     # shows everything, then stops
#   ./scripts/demo.sh --process  # pods as plain processes (no containerd; also without root)
#
# Containers (the default, as root): scripts/cri-env.sh starts a throw-away containerd (own
# root, socket and CNI bridge, an offline pause image) and a registry on a loopback port, and
# pushes a busybox image built from Debian's busybox-static to it; all of it is removed at the
# end. Environment: KEDGE_DEMO_DIR (default /tmp/kedge-demo, wiped at start), KEDGE_API_PORT
# (default 6080). Edge MetaServers listen on 127.0.0.1:10551..10553, their MQTT brokers on
# 127.0.0.1:11883..11885.
set -euo pipefail
cd "$(dirname "$0")/.."
once=false
runtime=cri
for arg in "$@"; do
  case "$arg" in
    --once) once=true ;;
    --process) runtime=process ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done
scripts/setup.sh
cargo build --release -q -p cloud --bin cloudcore -p edge --bin edgecore
target_dir="${CARGO_TARGET_DIR:-target}"
cloudcore="$target_dir/release/cloudcore"
edgecore="$target_dir/release/edgecore"

dir="${KEDGE_DEMO_DIR:-/tmp/kedge-demo}"
port="${KEDGE_API_PORT:-6080}"
rm -rf "$dir"
mkdir -p "$dir"
pids=()
cri_dir=""
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$cri_dir" ]; then scripts/cri-env.sh down "$cri_dir" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

if [ "$runtime" = cri ] && { [ "$(id -u)" != 0 ] || ! command -v containerd >/dev/null; }; then
  echo "(containers need root and containerd; running the pods as processes: --process)" >&2
  runtime=process
fi
image=busybox
runtime_args=()
if [ "$runtime" = cri ]; then
  # A short path: containerd's sockets live under it.
  cri_dir=/tmp/kedge-demo-cri
  scripts/cri-env.sh down "$cri_dir" >/dev/null 2>&1 || true
  echo "== containerd, a CNI bridge and a registry on loopback (scripts/cri-env.sh up $cri_dir)"
  scripts/cri-env.sh up "$cri_dir" >/dev/null
  # shellcheck disable=SC1091
  . "$cri_dir/env"
  image=$BUSYBOX_IMAGE
  runtime_args=(--runtime cri --cri-endpoint "$CRI_ENDPOINT")
  echo "registry: http://$REGISTRY (image $image), containerd: $CRI_ENDPOINT"
fi
"$cloudcore" --data-dir "$dir/cloud" --api-listen "127.0.0.1:$port" \
  --metrics-listen "127.0.0.1:$((port + 3011))" --quic-listen 127.0.0.1:10001 \
  2> "$dir/cloudcore.log" &
cloud_pid=$!
pids+=("$cloud_pid")

cat > "$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: kedge
  cluster: {server: "http://127.0.0.1:$port"}
contexts:
- name: kedge
  context: {cluster: kedge, user: kedge, namespace: demo}
current-context: kedge
users:
- name: kedge
  user: {}
KUBECONFIG
export KUBECONFIG="$dir/kubeconfig"

for _ in $(seq 1 100); do
  kubectl get --raw /healthz >/dev/null 2>&1 && break
  kill -0 "$cloud_pid" 2>/dev/null || { cat "$dir/cloudcore.log" >&2; exit 1; }
  sleep 0.1
done

token=$("$cloudcore" token create --data-dir "$dir/cloud" --ttl 1h | tail -n 1)
for i in 1 2 3; do
  "$edgecore" --node-name "edge-$i" --cloud 127.0.0.1:10001 --token "$token" \
    --data-dir "$dir/edge-$i" --metaserver-listen "127.0.0.1:$((10550 + i))" \
    --mqtt-listen "127.0.0.1:$((11882 + i))" "${runtime_args[@]}" \
    2> "$dir/edge-$i.log" &
  pids+=("$!")
done
echo "== three edge nodes join with a bootstrap token"
kubectl wait --for=condition=Ready node/edge-1 node/edge-2 node/edge-3 --timeout=60s
kubectl get nodes -o wide
echo
echo "== kubectl apply -f examples/sample-workload.yaml   (image: $image)"
sed "s|image: busybox|image: $image|" examples/sample-workload.yaml | kubectl apply -f -
kubectl rollout status deployment/greeter --timeout=60s
kubectl rollout status daemonset/node-agent --timeout=60s
echo
echo "== from the cloud: kubectl get deployments,daemonsets,replicasets,pods -o wide"
kubectl get deployments,daemonsets,replicasets -o wide
kubectl get pods -o wide
echo
echo "== from edge-1's MetaServer: kubectl --server http://127.0.0.1:10551 get pods -A"
kubectl --kubeconfig /dev/null --server http://127.0.0.1:10551 get pods -A
echo
pod=$(kubectl get pods -l app=greeter -o jsonpath='{.items[0].metadata.name}')
node=$(kubectl get pod "$pod" -o jsonpath='{.spec.nodeName}')
if [ "$runtime" = cri ]; then runs_as="a container"; else runs_as="a process"; fi
echo "== $pod (of Deployment greeter) runs on $node as $runs_as: kubectl logs $pod -n demo"
sleep 1
kubectl logs "$pod" -n demo
echo
echo "== kubectl exec $pod -n demo -- sh -c 'echo \$GREETING'   (over $node's QUIC link)"
kubectl exec "$pod" -n demo -- sh -c 'echo $GREETING'
echo
echo "== kubectl top nodes   (usage measured on each node, asked for over its link)"
kubectl top nodes || true
echo
echo "== kubectl apply -f examples/sample-device.yaml; a mapper on edge-1 reports over MQTT"
kubectl apply -f examples/sample-device.yaml
for _ in $(seq 1 100); do
  kubectl --kubeconfig /dev/null --server http://127.0.0.1:10551 get device thermo-1 -n demo \
    >/dev/null 2>&1 && break
  sleep 0.1
done
report='{"event_id":"demo-1","twin":{"temperature":{"actual":{"value":"21.5"}}}}'
echo "mosquitto_pub -p 11883 -t '\$hw/events/device/thermo-1/twin/update' -m '$report'"
mosquitto_pub -p 11883 -q 1 -t '$hw/events/device/thermo-1/twin/update' -m "$report"
reported=""
for _ in $(seq 1 100); do
  reported=$(kubectl get devicestatus thermo-1 \
    -o jsonpath='{.status.twins[?(@.propertyName=="temperature")].reported.value}')
  [ "$reported" = "21.5" ] && break
  sleep 0.1
done
echo "the cloud's DeviceStatus: temperature reported = ${reported:-<none yet>}"
if [ "$runtime" = cri ]; then
  runs_on="as containers of containerd ($CRI_ENDPOINT), images from http://$REGISTRY"
  on_edge="kubectl exec deployment/greeter -- cat /etc/greeter/greeting       # updated in the pods"
  new_image="$REGISTRY/kedge/busybox:2"
  push="scripts/push-image.sh $REGISTRY kedge/busybox:2 && "
else
  runs_on="as local processes"
  on_edge="cat $dir/*/pods/demo_greeter-*/root/etc/greeter/greeting          # updated on the edge"
  new_image="busybox:2"
  push=""
fi
cat <<EOF2

cloudcore serves the Kubernetes API on http://127.0.0.1:$port (state in $dir/cloud); three
edgecores run the pods $runs_on
(state in $dir/edge-N, logs in $dir/*.log).

    export KUBECONFIG=$dir/kubeconfig
    kubectl get nodes,pods -o wide                                   # from the cloud
    kubectl --kubeconfig /dev/null --server http://127.0.0.1:10551 get pods -A   # from edge-1
    kubectl patch configmap greeter-config -p '{"data":{"greeting":"bonjour"}}'
    $on_edge
    kubectl logs -f $pod                                              # follows its output
    kubectl exec -it $pod -- sh                                       # a shell in the pod
    kubectl attach $pod                                               # its output as it comes
    kubectl top pods                                                  # CPU and memory per pod
    kubectl port-forward pod/POD 8080:PORT                            # a pod's port, from this machine
    kubectl scale deployment greeter --replicas=5                     # two more pods
    ${push}kubectl set image deployment/greeter greeter=$new_image && kubectl rollout status deployment/greeter
    kubectl rollout undo deployment/greeter                           # back to revision 1
    kubectl delete pod $pod   # stopped, and replaced by the ReplicaSet
    mosquitto_sub -p 11883 -t '\$hw/events/device/+/twin/update/#' -v &   # a mapper's view
    kubectl -n demo patch device thermo-1 --type=json -p '[{"op":"replace","path":"/spec/properties/0/desired/value","value":"23"}]'   # a delta
    kubectl -n demo get devicestatus thermo-1 -o yaml                 # what the node reports

Metrics: http://127.0.0.1:$((port + 3011))/metrics
EOF2
if $once; then
  exit 0
fi
echo "Ctrl-C stops everything."
wait "$cloud_pid"
