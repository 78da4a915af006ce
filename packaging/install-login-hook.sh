#!/bin/bash
# Install hostd-login, the OpenSSH login hook, so that ordinary users can run it: the launcher
# as PREFIX/bin/hostd-login (#!/usr/bin/python3) and hostd's Python modules as
# PREFIX/lib/hostd/{hostd,runtime}/*.py (it imports only the standard library and stdlib-only
# modules of them). With --sshd also: the sshd_config.d snippet (Match Group hostd-users ->
# ForceCommand PREFIX/bin/hostd-login) and the group hostd-users, checked with `sshd -t`.
# Idempotent; run as root.
#
#   bash packaging/install-login-hook.sh [--prefix DIR] [--sshd]     # DIR: /usr/local
set -euo pipefail
cd "$(dirname "$0")/.."

install_login_hook() {  # PREFIX
  local prefix=$1 lib=$1/lib/hostd pkg f
  for pkg in hostd runtime; do
    install -d -m 0755 "$lib/$pkg"
    install -m 0644 "$pkg"/*.py "$lib/$pkg/"
    for f in "$lib/$pkg"/*.py; do  # modules removed from the source go here too
      [ -e "$pkg/$(basename "$f")" ] || rm -f "$f"
    done
    rm -rf "$lib/$pkg/__pycache__"
  done
  /usr/bin/python3 -m compileall -q "$lib/hostd" "$lib/runtime" >/dev/null  # users cannot write it
  install -d -m 0755 "$prefix/bin"
  install -m 0755 packaging/hostd-login "$prefix/bin/hostd-login"
}

install_sshd_snippet() {  # PREFIX
  local conf=/etc/ssh/sshd_config.d/hostd.conf new old=""
  getent group hostd-users >/dev/null || groupadd --system hostd-users
  install -d -m 0755 /etc/ssh/sshd_config.d
  new=$(mktemp /etc/ssh/sshd_config.d/.hostd.conf.XXXXXX)
  sed "s#/usr/local/bin/hostd-login#$1/bin/hostd-login#" etc/sshd_config.d/hostd.conf >"$new"
  chmod 0644 "$new"
  if [ -e "$conf" ]; then old=$(mktemp /etc/ssh/sshd_config.d/.hostd.conf.old.XXXXXX); cp -p "$conf" "$old"; fi
  mv -f "$new" "$conf"
  install -d -m 0755 /run/sshd  # sshd -t needs it; ssh.service makes it when it runs
  if ! /usr/sbin/sshd -t; then  # put back what was there: never leave sshd unable to start
    if [ -n "$old" ]; then mv -f "$old" "$conf"; else rm -f "$conf"; fi
    echo "sshd refuses its configuration with hostd's snippet (see above): not installed" >&2
    exit 1
  fi
  [ -z "$old" ] || rm -f "$old"
  if ! grep -qsE '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\.d/' /etc/ssh/sshd_config; then
    echo "note: /etc/ssh/sshd_config does not include sshd_config.d/: add" \
      "'Include /etc/ssh/sshd_config.d/*.conf' at its top" >&2
  fi
  echo "installed $conf: reload sshd to apply it (systemctl reload ssh);" \
    "let a tenant in over OpenSSH with: usermod -aG hostd-users USER"
}

prefix=/usr/local
sshd=0
while (($#)); do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --sshd) sshd=1; shift ;;
    *) echo "usage: $0 [--prefix DIR] [--sshd]" >&2; exit 2 ;;
  esac
done
[[ $prefix == /* ]] || { echo "--prefix needs an absolute path" >&2; exit 2; }
install_login_hook "$prefix"
if ((sshd)); then install_sshd_snippet "$prefix"; fi
echo "installed $prefix/bin/hostd-login"
