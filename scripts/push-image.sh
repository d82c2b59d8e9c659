#!/usr/bin/env bash
# push-image.sh — build a one-layer OCI image from Debian's busybox-static and push it to a
# distribution (v2) registry with nothing but curl, tar, gzip and sha256sum. No docker, no internet.
#
# usage: push-image.sh HOST:PORT REPO[:TAG] [-- CMD ARG...]
#   push-image.sh 127.0.0.1:5000 kedge/busybox:1.35
#   push-image.sh 127.0.0.1:5000 kedge/pause:3.6 -- /bin/sleep infinity     # pause stand-in
#   push-image.sh 127.0.0.1:5000 kedge/web:1 -- /bin/httpd -f -p 8080 -h /www
# env:
#   REGISTRY_AUTH=user:pass   basic auth (registry with htpasswd auth)
#   IMAGE_ENV="A=1 B=2"       Config.Env (PATH is always set)
#   EXTRA_DIR=/some/dir       copied into the rootfs before packing (files, test binaries, /www ...)
#   OCI_DIR=/path             also keep the image as an OCI layout (index.json + blobs/) there
#                             (tar it: `tar -C $OCI_DIR -cf img.tar .` → `ctr -n k8s.io images import img.tar`)
# prints the manifest digest (sha256:...) on stdout as its last line.
set -euo pipefail

[ $# -ge 2 ] || { sed -n 2,16p "$0"; exit 2; }
REG=$1; REF=$2; shift 2
[ "${1:-}" = "--" ] && shift
REPO=${REF%%:*}; TAG=latest; [ "$REPO" != "$REF" ] && TAG=${REF#*:}
BUSYBOX=${BUSYBOX:-/bin/busybox}
CURL=(curl -sS --fail-with-body)
[ -n "${REGISTRY_AUTH:-}" ] && CURL+=(-u "$REGISTRY_AUTH")

W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
R=$W/rootfs
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,var/tmp,proc,sys,dev,run,home}
chmod 1777 "$R/tmp" "$R/var/tmp"
cp "$BUSYBOX" "$R/bin/busybox"
for a in $("$BUSYBOX" --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n' >"$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$R/etc/group"
[ -n "${EXTRA_DIR:-}" ] && cp -a "$EXTRA_DIR"/. "$R"/

# reproducible layer: sorted names, fixed mtime/owner
tar -C "$R" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$W/layer.tar" .
DIFF_ID=sha256:$(sha256sum "$W/layer.tar" | cut -d' ' -f1)
gzip -n -c "$W/layer.tar" >"$W/layer.tgz"
LAYER=sha256:$(sha256sum "$W/layer.tgz" | cut -d' ' -f1); LAYER_SIZE=$(stat -c %s "$W/layer.tgz")

# Config.Cmd as a JSON array
if [ $# -gt 0 ]; then CMD=$(printf '%s\n' "$@" | python3 -c 'import json,sys;print(json.dumps(sys.stdin.read().splitlines()))')
else CMD='["/bin/sh"]'; fi
ENVJ='"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"'
for e in ${IMAGE_ENV:-}; do ENVJ="$ENVJ,\"$e\""; done
printf '{"architecture":"amd64","os":"linux","config":{"Env":[%s],"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["%s"]},"history":[{"created_by":"push-image.sh busybox-static"}]}' \
  "$ENVJ" "$CMD" "$DIFF_ID" >"$W/config.json"
CONFIG=sha256:$(sha256sum "$W/config.json" | cut -d' ' -f1); CONFIG_SIZE=$(stat -c %s "$W/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%s}]}' \
  "$CONFIG" "$CONFIG_SIZE" "$LAYER" "$LAYER_SIZE" >"$W/manifest.json"
MANIFEST=sha256:$(sha256sum "$W/manifest.json" | cut -d' ' -f1)

push_blob() { # file digest
  if "${CURL[@]}" -o /dev/null -I "http://$REG/v2/$REPO/blobs/$2" 2>/dev/null; then return; fi
  # POST starts an upload; Location is relative (/v2/...) or absolute depending on the registry
  loc=$("${CURL[@]}" -o /dev/null -D - -X POST "http://$REG/v2/$REPO/blobs/uploads/" |
        tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  case $loc in http*) ;; *) loc="http://$REG$loc" ;; esac
  case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
  "${CURL[@]}" -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
    --data-binary @"$1" "$loc${sep}digest=$2"
}
push_blob "$W/layer.tgz" "$LAYER"
push_blob "$W/config.json" "$CONFIG"
"${CURL[@]}" -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary @"$W/manifest.json" "http://$REG/v2/$REPO/manifests/$TAG"

if [ -n "${OCI_DIR:-}" ]; then
  mkdir -p "$OCI_DIR/blobs/sha256"
  for f in layer.tgz:$LAYER config.json:$CONFIG manifest.json:$MANIFEST; do
    cp "$W/${f%%:*}" "$OCI_DIR/blobs/sha256/${f##*:sha256:}"; done
  echo '{"imageLayoutVersion":"1.0.0"}' >"$OCI_DIR/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$MANIFEST" "$(stat -c %s "$W/manifest.json")" "$REG/$REPO:$TAG" "$TAG" >"$OCI_DIR/index.json"
fi
echo "pushed $REG/$REPO:$TAG layer=$LAYER_SIZE bytes" >&2
echo "$MANIFEST"
