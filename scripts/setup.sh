#!/usr/bin/env bash
# Installs what a fresh machine of this kind lacks for building and testing kedge.
# Idempotent: each step checks first, so a warm machine spends no time here.
set -euo pipefail

need_apt=()
# RocksDB's bindings (librocksdb-sys, via bindgen) need libclang.
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
# A C++ toolchain for RocksDB itself.
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
# The device tests play the mapper with mosquitto_pub/sub and run a real mosquitto broker.
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# The MQTT TLS tests make their CA and certificates with the openssl command line
# (mosquitto_passwd, for the TLS mosquitto broker's password file, comes with mosquitto).
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# `k8s-cri` (CRI v1 for `edgecore --runtime cri`) compiles its protos with protoc at build time.
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# DMI's proto imports google/protobuf/any.proto, which protoc finds in /usr/include.
[ -f /usr/include/google/protobuf/any.proto ] || need_apt+=(libprotobuf-dev)
# The CRI tests and benchmark: containerd (with ctr) and runc, CNI plugins, a local OCI registry,
# and busybox-static to build the test images from (edge/tests/support/cri.rs).
command -v containerd >/dev/null 2>&1 || need_apt+=(containerd)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need_apt+=(runc)
[ -x /usr/lib/cni/bridge ] || need_apt+=(containernetworking-plugins)
command -v docker-registry >/dev/null 2>&1 || need_apt+=(docker-registry)
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
# htpasswd for the private-registry test (imagePullSecrets).
command -v htpasswd >/dev/null 2>&1 || need_apt+=(apache2-utils)
# The high-availability tests run a three-member etcd cluster on loopback (cloud/tests/ha.rs).
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)

if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The official Kubernetes Python client: a client library nobody here wrote, for the watch-list
# tests (edge/tests/client_libraries.rs).
python3 -c "import kubernetes" >/dev/null 2>&1 || python3 -m pip install -q kubernetes >&2
# grpcio and grpcio-tools: the DMI tests play a mapper-framework mapper in Python, with stubs
# generated from edge/proto in the test (edge/tests/dmi.rs).
python3 -c "import grpc_tools" >/dev/null 2>&1 || python3 -m pip install -q grpcio grpcio-tools >&2
# schemathesis: property-based requests generated from the API's OpenAPI v3 documents, against a
# real cloudcore (cloud/tests/schemathesis.rs).
command -v schemathesis >/dev/null 2>&1 || python3 -m pip install -q schemathesis >&2

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing (this machine kind ships Rust via rustup)" >&2; exit 1; }
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
