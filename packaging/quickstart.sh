#!/bin/bash
# End to end on a fresh Debian 12 host, as root: install hostd, build the default image, start
# hostd with its SSH gateway (port 2222), make the invoking user (the one who ran sudo) a
# tenant, and run `docker run` in their container over SSH, as them. Run as root directly, it
# uses a demo account, `hostddemo`. For the SSH step the user gets a key of their own,
# ~/.ssh/hostd_quickstart, added to their authorized_keys.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/install-deps.sh

for tool in hostd hostctl hostd-runtime; do ln -sfn "$PWD/.venv/bin/$tool" "/usr/local/bin/$tool"; done
export PATH="$PWD/.venv/bin:$PATH"  # these tools, whatever else PATH holds (a pyenv, say)
install -d /etc/hostd
[ -e /etc/hostd/hostd.toml ] || install -m 0644 etc/hostd.toml /etc/hostd/hostd.toml
install -m 0644 etc/pam.d/hostd /etc/pam.d/hostd  # hostd's own service: kept current
bash packaging/install-login-hook.sh  # hostd-login, for OpenSSH (see etc/sshd_config.d)

if [ -d /run/systemd/system ]; then  # systemd is PID 1
  install -m 0644 packaging/systemd/hostd.service /etc/systemd/system/hostd.service
  systemctl daemon-reload
  systemctl enable --now hostd
elif ! hostctl status >/dev/null 2>&1; then
  echo "no systemd here: starting hostd in the background (log: /var/log/hostd.log)"
  nohup hostd >>/var/log/hostd.log 2>&1 &
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
