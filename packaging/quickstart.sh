#!/bin/bash
# End to end on a fresh Debian 12 host, as root: install dependencies, build the default
# system-container image, create and boot a container, and run `docker run` inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/install-deps.sh

STATE=${HOSTD_STATE_DIR:-/var/lib/hostd}
NAME=${HOSTD_DEMO_NAME:-demo}
# A high range clear of the host's own users and of /etc/subuid's usual ranges.
START=${HOSTD_DEMO_UID_START:-1879048192}
rt() { .venv/bin/hostd-runtime --state-dir "$STATE" "$@"; }

rt image list | grep -q '^default ' || rt image build default
if rt list | grep -q "^$NAME "; then rt delete --force "$NAME"; fi
rt create "$NAME" --image default --uid-start "$START"
rt start --wait "$NAME"

# No registry here: give the inner Docker a 1 MB busybox image made from busybox-static.
img=$(mktemp -d)
trap 'rm -rf "$img"' EXIT
mkdir -p "$img/bin"
cp /bin/busybox "$img/bin/"
for applet in sh echo cat ls uname id; do ln -s busybox "$img/bin/$applet"; done
tar -C "$img" -c . | rt exec "$NAME" -- docker import - busybox:local >/dev/null

echo "--- inside container '$NAME': docker run"
rt exec "$NAME" -- docker run --rm busybox:local sh -c 'echo "hello from $(uname -n), uid $(id -u) inside"'
rt exec "$NAME" -- docker info --format 'inner Docker storage driver: {{.Driver}}'
rt list
echo "init of '$NAME' runs on the host as uid $(stat -c %u "/proc/$(rt list | awk -v n="$NAME" '$1==n {print $3}')")"
echo "a shell inside: sudo .venv/bin/hostd-runtime exec -t $NAME -- bash"
