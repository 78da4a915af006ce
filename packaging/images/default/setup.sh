#!/bin/sh
# Runs inside the freshly bootstrapped root filesystem (chroot), as root.
set -eu

# Units that cannot work in an unprivileged container: mask them so the system is `running`.
for unit in sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
            sys-fs-fuse-connections.mount systemd-firstboot.service \
            systemd-sysctl.service systemd-modules-load.service \
            systemd-udevd.service systemd-udev-trigger.service \
            systemd-remount-fs.service getty.target console-getty.service; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done

systemctl enable docker.service containerd.service >/dev/null 2>&1 || true
test -e /etc/systemd/system/multi-user.target.wants/docker.service

# Each container gets its own machine ID on first boot; hostname and hosts are written at start.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
: > /etc/hostname

# Members of group sudo get root without a password (the inner account is added by hostd).
echo '%sudo ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/hostd
chmod 0440 /etc/sudoers.d/hostd

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log
