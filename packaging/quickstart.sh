#!/bin/bash
# End to end on a fresh Debian 12 host, as root: build the Debian package from this checkout
# and install it with apt (dependencies from Debian), start hostd (under systemd where systemd
# is PID 1: the package enables and starts hostd.service; directly otherwise), build the
# default image, make the invoking user (the one who ran sudo) a tenant, and run `docker run`
# in their container over SSH (hostd's gateway, port 2222), as them. Run as root directly, it
# uses a demo account, `hostddemo`. For the SSH step the user gets a key of their own,
# ~/.ssh/hostd_quickstart, added to their authorized_keys. Undo: `hostctl user remove USER`,
# then `apt-get purge hostd`.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

bash packaging/build-deb.sh dist
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
apt-get update -qq
# --reinstall: a rebuilt package of the same version replaces the installed one
apt-get install -y -qq --reinstall "./dist/hostd_${version}_$(dpkg --print-architecture).deb"
# busybox-static: the quickstart's 1 MB image for the inner Docker (there is no registry here)
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" ||
  apt-get install -y -qq --no-install-recommends busybox-static

if [ -d /run/systemd/system ]; then  # systemd is PID 1: the package started hostd.service
  systemctl is-active --quiet hostd || systemctl start hostd
elif ! hostctl status >/dev/null 2>&1; then
  echo "no systemd here: starting hostd in the background (log: /var/log/hostd.log)"
  # a session of its own, as systemd gives a service: with the kernel's autogroup scheduling,
  # hostd then shares its CPU weight with nothing else started from this shell
  setsid nohup hostd >>/var/log/hostd.log 2>&1 </dev/null &
fi
for _ in $(seq 100); do hostctl status >/dev/null 2>&1 && break; sleep 0.1; done
hostctl status >/dev/null

hostctl image list | grep -q '^default ' || hostctl image build default

user=${SUDO_USER:-}
if [ -z "$user" ] || [ "$user" = root ]; then
  user=hostddemo
  id "$user" >/dev/null 2>&1 || useradd -m -s /bin/bash "$user"
fi
hostctl user show "$user" >/dev/null 2>&1 || hostctl user add "$user"
hostctl start "$user"

# No registry here: give the inner Docker a 1 MB busybox image made from busybox-static.
img=$(mktemp -d)
trap 'rm -rf "$img"' EXIT
mkdir -p "$img/bin"
cp /bin/busybox "$img/bin/"
for applet in sh echo cat ls uname id; do ln -s busybox "$img/bin/$applet"; done
tar -C "$img" -c . | hostctl exec "$user" --user "$user" -- docker import - busybox:local >/dev/null

home=$(getent passwd "$user" | cut -d: -f6)
key="$home/.ssh/hostd_quickstart"
if [ ! -e "$key" ]; then
  install -d -m 0700 -o "$user" -g "$(id -gn "$user")" "$home/.ssh"
  runuser -u "$user" -- ssh-keygen -q -t ed25519 -N "" -C "hostd quickstart" -f "$key"
  cat "$key.pub" >> "$home/.ssh/authorized_keys"
  chown "$user:" "$home/.ssh/authorized_keys"
  chmod 0600 "$home/.ssh/authorized_keys"
fi
ssh_in() {
  runuser -u "$user" -- ssh -p 2222 -i "$key" -o StrictHostKeyChecking=accept-new \
    -o UserKnownHostsFile="$home/.ssh/hostd_known_hosts" -o LogLevel=ERROR "$user@127.0.0.1" "$@"
}
echo "--- ssh -p 2222 $user@localhost: docker run inside their container"
ssh_in "docker run --rm busybox:local sh -c 'echo hello from container \$(uname -n), uid \$(id -u) inside it'"
# shellcheck disable=SC2016 # expanded inside the container, not here
ssh_in 'echo "logged in as $(id -un) on $(hostname), groups: $(id -nG)"
  docker version --format "Docker {{.Server.Version}}, storage driver $(docker info --format {{.Driver}})"
  echo "compose $(docker compose version --short), $(docker buildx version | cut -d" " -f1-2)"
  printf "FROM busybox:local\nRUN echo built by BuildKit > /msg\n" | docker build -q -t hello:built - >/dev/null
  docker run --rm hello:built cat /msg'
hostctl status "$user"
echo "log in yourself: ssh -p 2222 $user@<this host>   (or: sudo hostctl exec -t $user --user $user -- bash -l)"
