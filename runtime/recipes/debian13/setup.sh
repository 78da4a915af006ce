#!/bin/sh
# Runs inside the freshly bootstrapped root filesystem (chroot), as root. Shared by the
# debian12 and debian13 recipes.
set -eu

# Boot only what a system container uses: units that cannot work in an unprivileged container (kernel
# modules, udev, fsck, consoles) or are useless there (timers for apt, man-db, e2scrub, fstrim)
# are masked, so the system is `running` and docker.service is reached early.
# A template unit masked masks all its instances (modprobe@, getty@...).
for unit in \
    sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
    sys-fs-fuse-connections.mount proc-sys-fs-binfmt_misc.automount \
    systemd-binfmt.service systemd-firstboot.service systemd-sysctl.service \
    systemd-modules-load.service modprobe@.service kmod-static-nodes.service \
    systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service \
    systemd-hwdb-update.service systemd-remount-fs.service systemd-fsck-root.service \
    systemd-pstore.service systemd-random-seed.service systemd-update-utmp.service \
    systemd-update-utmp-runlevel.service \
    e2scrub_reap.service e2scrub_all.timer fstrim.timer apt-daily.timer \
    apt-daily-upgrade.timer man-db.timer dpkg-db-backup.timer \
    getty.target getty@.service serial-getty@.service console-getty.service \
    container-getty@.service; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done
systemctl set-default multi-user.target >/dev/null

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

# Do now the first-boot work that ConditionNeedsUpdate= would redo in every new container
# (ldconfig, the journal catalog), and mark /etc and /var as up to date with /usr.
ldconfig
journalctl --update-catalog
if [ -x /usr/lib/systemd/systemd-update-done ]; then
    /usr/lib/systemd/systemd-update-done
else  # systemd 252 (debian12) has no systemd-update-done: stamp as it would
    touch -r /usr /etc/.updated /var/.updated
fi
