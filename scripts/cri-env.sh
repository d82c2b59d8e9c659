#!/usr/bin/env bash
# cri-env.sh — a throw-away CRI test environment on loopback: Debian's docker-registry on a free
# 127.0.0.1 port and containerd 1.6 (Debian bookworm) with its own root, state, socket, runc root,
# CNI bridge and an offline pause image. Everything lives under DIR; `down` undoes it.
#
#   cri-env.sh up DIR     # DIR must be short (unix socket paths < 108 bytes), e.g. $(mktemp -d /tmp/kcri.XXXX)
#   . DIR/env             # CRI_ENDPOINT REGISTRY PAUSE_IMAGE BUSYBOX_IMAGE CNI_BRIDGE CNI_SUBNET
#   cri-env.sh down DIR   # kill containerd, its shims and containers, unmount, delete netns/bridge, rm -rf DIR
#
# needs: containerd runc containernetworking-plugins docker-registry busybox-static curl python3 iproute2
# env:   CNI_SUBNET (default 10.88.0.0/16), PUSH_IMAGE (default: push-image.sh beside this file),
#        PRIVATE_AUTH=user:pass (also a registry with htpasswd auth and an image of its own in it:
#        PRIVATE_REGISTRY, PRIVATE_IMAGE in DIR/env; needs htpasswd from apache2-utils)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PUSH_IMAGE=${PUSH_IMAGE:-$HERE/push-image.sh}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_for() { # tries cmd...
  local n=$1; shift; for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }

up() {
  local D; D=$(realpath "$1"); mkdir -p "$D"
  [ ${#D} -le 60 ] || { echo "DIR too long for socket paths: $D" >&2; exit 1; }
  local id; id=$(printf '%04x' $((RANDOM)))
  local P; P=$(free_port)
  local SUBNET=${CNI_SUBNET:-10.88.0.0/16} BR=kdg$id NET=kedge-$id
  mkdir -p "$D"/registry/data "$D"/containerd/{root,state,runc,opt,certs.d/127.0.0.1:$P} "$D"/cni/{net.d,ipam} "$D"/pause-oci

  # --- registry (distribution v2) on loopback
  cat >"$D/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $D/registry/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$P
  secret: kedge-test
EOF
  setsid docker-registry serve "$D/registry/config.yml" >"$D/registry/log" 2>&1 </dev/null &
  echo $! >"$D/registry/pid"; echo "$P" >"$D/registry/port"
  wait_for 200 curl -sf "http://127.0.0.1:$P/v2/" || { cat "$D/registry/log"; exit 1; }

  # --- optional private registry (htpasswd, bcrypt) with its own image: PRIVATE_AUTH=user:pass
  local P2=""
  if [ -n "${PRIVATE_AUTH:-}" ]; then
    P2=$(free_port)
    mkdir -p "$D/registry-private/data" "$D/private-extra"
    htpasswd -Bbn "${PRIVATE_AUTH%%:*}" "${PRIVATE_AUTH#*:}" >"$D/registry-private/htpasswd"
    cat >"$D/registry-private/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $D/registry-private/data
auth:
  htpasswd:
    realm: kedge-test
    path: $D/registry-private/htpasswd
http:
  addr: 127.0.0.1:$P2
  secret: kedge-test
EOF
    setsid docker-registry serve "$D/registry-private/config.yml" >"$D/registry-private/log" 2>&1 </dev/null &
    echo $! >"$D/registry-private/pid"
    wait_for 200 curl -sf -u "$PRIVATE_AUTH" "http://127.0.0.1:$P2/v2/" || { cat "$D/registry-private/log"; exit 1; }
    echo private >"$D/private-extra/private-marker"   # content of its own: an image id of its own
    EXTRA_DIR=$D/private-extra REGISTRY_AUTH=$PRIVATE_AUTH "$PUSH_IMAGE" "127.0.0.1:$P2" kedge/private:1 >/dev/null
  fi

  # --- images: busybox (Cmd sh) and a pause stand-in (sleep infinity), the latter also as OCI tar
  "$PUSH_IMAGE" "127.0.0.1:$P" kedge/busybox:1 >/dev/null
  OCI_DIR=$D/pause-oci "$PUSH_IMAGE" "127.0.0.1:$P" kedge/pause:1 -- /bin/sleep infinity >/dev/null
  sed -i 's|"io.containerd.image.name":"[^"]*"|"io.containerd.image.name":"kedge.local/pause:1"|' "$D/pause-oci/index.json"
  tar -C "$D/pause-oci" -cf "$D/pause.tar" .

  # --- CNI: bridge + host-local (IPAM state inside DIR) + portmap
  cat >"$D/cni/net.d/10-$NET.conflist" <<EOF
{"cniVersion":"1.0.0","name":"$NET","plugins":[
 {"type":"bridge","bridge":"$BR","isGateway":true,"ipMasq":false,"hairpinMode":true,
  "ipam":{"type":"host-local","ranges":[[{"subnet":"$SUBNET"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"$D/cni/ipam"}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}
EOF
  # --- containerd: loopback registries need no config in 1.6 (http is tried for localhost/127.0.0.1),
  #     hosts.toml is written anyway as the pattern for a non-loopback http registry
  printf 'server = "http://127.0.0.1:%s"\n[host."http://127.0.0.1:%s"]\n  capabilities = ["pull", "resolve"]\n' "$P" "$P" \
    >"$D/containerd/certs.d/127.0.0.1:$P/hosts.toml"
  cat >"$D/containerd/config.toml" <<EOF
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
[grpc]
  address = "$D/containerd/containerd.sock"
[ttrpc]
  address = "$D/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$D/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "kedge.local/pause:1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$D/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$D/containerd/certs.d"
EOF
  setsid containerd --config "$D/containerd/config.toml" >"$D/containerd/log" 2>&1 </dev/null &
  echo $! >"$D/containerd/pid"
  wait_for 200 ctr --address "$D/containerd/containerd.sock" version || { tail "$D/containerd/log"; exit 1; }
  ctr --address "$D/containerd/containerd.sock" -n k8s.io images import "$D/pause.tar" >/dev/null

  cat >"$D/env" <<EOF
CRI_ENDPOINT=unix://$D/containerd/containerd.sock
REGISTRY=127.0.0.1:$P
BUSYBOX_IMAGE=127.0.0.1:$P/kedge/busybox:1
PAUSE_IMAGE=kedge.local/pause:1
CNI_BRIDGE=$BR
CNI_NETWORK=$NET
CNI_SUBNET=$SUBNET
EOF
  [ -z "$P2" ] || printf 'PRIVATE_REGISTRY=127.0.0.1:%s\nPRIVATE_IMAGE=127.0.0.1:%s/kedge/private:1\n' "$P2" "$P2" >>"$D/env"
  cat "$D/env"
}

# pids of the shims serving our socket, found by a /proc scan of argv — never by process name
shim_pids() { # SOCK
  local p a; for p in /proc/[0-9]*; do
    a=$(tr '\0' '|' 2>/dev/null <"$p/cmdline") || continue
    case "$a" in *containerd-shim-runc-v2\|*"|-address|$1|"*) echo "${p#/proc/}" ;; esac
  done; return 0; }

down() {
  local D; D=$(realpath "$1"); [ -d "$D" ] || return 0
  local SOCK=$D/containerd/containerd.sock pid c n
  # 1. what our pods made outside DIR: sandbox/container ids (CRI's per-id dirs) and netns paths
  #    (grep'd from containerd's bolt db: works whether or not containerd still answers)
  local ids netns
  ids=$(ls "$D"/containerd/root/io.containerd.grpc.v1.cri/{sandboxes,containers} 2>/dev/null | grep -E '^[0-9a-f]{64}$' || true)
  netns=$(grep -aoE '/var/run/netns/cni-[0-9a-f-]{36}' "$D"/containerd/root/io.containerd.metadata.v1.bolt/meta.db 2>/dev/null | sort -u || true)
  # 2. containerd, then its shims (which keep containers alive on their own)
  for f in containerd/pid registry/pid registry-private/pid; do
    [ -f "$D/$f" ] && kill "$(cat "$D/$f")" 2>/dev/null || true
  done
  for pid in $(shim_pids "$SOCK"); do kill -9 "$pid" 2>/dev/null || true; done
  # 3. containers left running (their parent shim is gone): runc with our root
  if [ -d "$D/containerd/runc/k8s.io" ]; then
    local R="$D/containerd/runc/k8s.io" cs; cs=$(runc --root "$R" list -q 2>/dev/null || true)
    for c in $cs; do runc --root "$R" kill --all "$c" KILL >/dev/null 2>&1 || true; done
    for c in $cs; do runc --root "$R" delete --force "$c" >/dev/null 2>&1 & done; wait
  fi
  for f in containerd/pid registry/pid registry-private/pid; do # wait, then insist
    [ -f "$D/$f" ] || continue; pid=$(cat "$D/$f")
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # 4. mounts under DIR (rootfs overlays, shm tmpfs), deepest first
  { findmnt -rn -o TARGET | grep "^$D/" || true; } | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  # 5. network: our pods' netns, our bridge, CNI result cache entries of our network
  for n in $netns; do ip netns delete "$(basename "$n")" 2>/dev/null || true; done
  local BR; BR=$(sed -n 's/^CNI_BRIDGE=//p' "$D/env" 2>/dev/null || true)
  [ -n "$BR" ] && ip link delete "$BR" 2>/dev/null || true
  for c in $ids; do
    rm -f /var/lib/cni/results/*-"$c"-*
    # shim socket (containerd 1.6 keeps it under /run/containerd/s whatever `state` says; one per sandbox)
    rm -f "/run/containerd/s/$(printf '%s' "$SOCK/k8s.io/$c" | sha256sum | cut -c1-64)"
    # portmap (hostPort) rules of this sandbox: the CNI-HOSTPORT-DNAT jump tagged with its id, and its chain
    iptables-save -t nat 2>/dev/null | { grep -F "id: \\\"$c\\\"" || true; } | while read -r rule; do
      eval "iptables -t nat ${rule/#-A/-D}" || true
      for ch in $(grep -oE 'CNI-(DN|SN)-[0-9a-f]+' <<<"$rule"); do iptables -t nat -F "$ch"; iptables -t nat -X "$ch"; done 2>/dev/null
    done
  done
  rm -rf "$D"
}

case ${1:-} in
  up) up "${2:?DIR}" ;;
  down) down "${2:?DIR}" ;;
  *) sed -n 2,11p "$0"; exit 2 ;;
esac
