#!/usr/bin/env bash
# Build one example image FROM scratch with the static busybox: examples/build-image.sh DIR TAG
set -euo pipefail
dir=$1 tag=$2
busybox=${KLIKO_BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "error: no static busybox at $busybox (apt-get install busybox-static)" >&2; exit 1; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -r "$dir"/. "$ctx"/
mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/tmp"
cp "$busybox" "$ctx/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$ctx/rootfs/bin/$applet"
done
chmod 1777 "$ctx/rootfs/tmp"
docker build -q -t "$tag" "$ctx" >/dev/null
echo "built $tag"
