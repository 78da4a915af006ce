#!/bin/sh
# Runs inside the freshly bootstrapped root filesystem (chroot), as root. Shared by the
# debian12 and debian13 recipes.
set -eu

# Boot only what a system container uses: units that cannot work in an unprivileged container (kernel
# modules, udev, fsck, consoles) or are useless there (timers for apt, man-db, e2scrub, fstrim)
# are masked, so the system is `running` and docker.service is reached early.
# A template unit masked masks all its instances (modprobe@, getty@...). logind too: sessions
# enter by `runc exec`, not a PAM login inside, so it would track nothing (and keep dbus up).
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
    container-getty@.service systemd-logind.service; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done
systemctl set-default multi-user.target >/dev/null

# Docker starts on first use: docker.socket listens from boot and starts docker.service (and it
# containerd) at the first connection; hostd-docker-idle stops both again after
# DOCKER_IDLE_STOP seconds with no container running and no client (/etc/default/hostd-docker-idle,
# which hostd writes from its [runtime] docker_idle_stop). An idle tenant runs no dockerd.
systemctl disable docker.service containerd.service >/dev/null 2>&1 || true
systemctl enable docker.socket >/dev/null 2>&1 || true
cat > /usr/local/sbin/hostd-docker-idle <<'SCRIPT'
#!/bin/bash
# hostd-docker-idle watch: stop docker.service (and with it containerd.service) once Docker has
# been idle
# for DOCKER_IDLE_STOP seconds (0: never): no container running, no client connected to
# /run/docker.sock and no request served (dockerd read and wrote nothing), checked every
# tenth of that time (1 to 30 s).
# docker.socket keeps listening, so the next docker call starts them again.
# hostd-docker-idle boot: start Docker at boot if a container has a restart policy.
set -u

boot() {
    local f policy='"RestartPolicy":\{"Name":"(always|unless-stopped|on-failure)"'
    for f in /var/lib/docker/containers/*/hostconfig.json; do
        if [ -e "$f" ] && [[ $(<"$f") =~ $policy ]]; then
            exec systemctl start --no-block docker.service
        fi
    done
}

# What shows someone uses Docker (from /proc, and ss for the sockets): the bytes dockerd read and
# wrote beyond the 8 of each eventfd call the Go runtime makes on its own (`payload`), the
# clients connected to its socket (`clients`), and the running container shims (`shims`).
activity() {
    local key value comm p rchar=0 wchar=0 syscr=0 syscw=0 peer
    clients="" shims=0
    while read -r key value; do
        case $key in
            rchar:) rchar=$value ;; wchar:) wchar=$value ;;
            syscr:) syscr=$value ;; syscw:) syscw=$value ;;
        esac
    done <"/proc/$dockerd/io"
    payload=$((rchar + wchar - 8 * (syscr + syscw)))
    # dockerd keeps the server end of some finished calls (`docker run --rm`): peer 0
    while read -r _ _ _ _ _ _ _ peer; do
        [ "$peer" = 0 ] || clients+=x
    done < <(ss -xHn src /run/docker.sock)
    for p in /proc/[0-9]*/comm; do
        read -r comm <"$p" 2>/dev/null && [ "$comm" = containerd-shim ] && shims=$((shims + 1))
    done
}

watch() {
    local idle=${DOCKER_IDLE_STOP:-900} step quiet=0 last="" tick clients shims payload
    [ "$idle" -gt 0 ] 2>/dev/null || exit 0
    dockerd=$(systemctl show -P MainPID docker.service)
    [ "$dockerd" -gt 0 ] || exit 0
    step=$((idle / 10))
    [ "$step" -ge 1 ] || step=1
    [ "$step" -le 30 ] || step=30
    exec {tick}<> <(:)  # `read -t` on a pipe nobody writes to: a sleep without a fork
    while :; do
        read -r -t "$step" -u "$tick" _ || true
        activity
        if [ "$payload" = "$last" ] && [ -z "$clients" ] && [ "$shims" = 0 ]; then
            quiet=$((quiet + step))
        else
            quiet=0
        fi
        last=$payload
        if [ "$quiet" -ge "$idle" ]; then
            [ -n "$(docker ps -q)" ] || exec systemctl --no-block stop docker.service
            quiet=0
            activity
            last=$payload
        fi
    done
}

# After dockerd stopped: its own firewall chains and docker0, which its next start deletes and
# makes again one iptables call at a time (0.1-0.2 s of that start), removed in one batch now.
# DOCKER-USER, the chain for the user's own rules, stays.
clean() {
    local table ours='DOCKER(-ISOLATION-STAGE-[12])?'
    for table in nat filter; do
        iptables-save -t "$table" \
            | grep -v -E -e "^(:|-A )$ours( |$)" -e "-j $ours( |$)" -e 'docker0' \
            | iptables-restore -w -T "$table"
    done
    ip link del docker0 2>/dev/null || true
}

case ${1:-} in
    boot) boot ;;
    watch) watch ;;
    clean) clean ;;
    *) echo "usage: hostd-docker-idle boot|watch|clean" >&2; exit 2 ;;
esac
SCRIPT
chmod 0755 /usr/local/sbin/hostd-docker-idle
cat > /etc/systemd/system/hostd-docker-idle.service <<'UNIT'
[Unit]
Description=Stop Docker when it is idle
BindsTo=docker.service
After=docker.service

[Service]
Environment=DOCKER_IDLE_STOP=900
EnvironmentFile=-/etc/default/hostd-docker-idle
ExecStart=/usr/local/sbin/hostd-docker-idle watch

[Install]
WantedBy=docker.service
UNIT
cat > /etc/systemd/system/hostd-docker-boot.service <<'UNIT'
[Unit]
Description=Start Docker at boot for containers with a restart policy
ConditionDirectoryNotEmpty=/var/lib/docker/containers

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/hostd-docker-idle boot

[Install]
WantedBy=multi-user.target
UNIT
echo 'DOCKER_IDLE_STOP=900' > /etc/default/hostd-docker-idle
# Every idle stop makes the next call a start: allow more than Debian's 3 starts a minute (a
# start limit hit would fail docker.socket too), still stopping a dockerd that crash-loops.
mkdir -p /etc/systemd/system/docker.service.d
printf '[Unit]\nStartLimitIntervalSec=60\nStartLimitBurst=12\n' \
    > /etc/systemd/system/docker.service.d/hostd-idle.conf
printf '[Service]\nExecStopPost=-/usr/local/sbin/hostd-docker-idle clean\n' \
    >> /etc/systemd/system/docker.service.d/hostd-idle.conf
# docker.service runs `dockerd ... $DOCKER_OPTS`, set only where /etc/default/docker sets it:
# an empty default keeps systemd's "Referenced but unset environment variable" warning out of
# the journal (and out of failed-start reasons). The file, read after it, still wins.
printf '[Service]\nEnvironment=DOCKER_OPTS=\n' > /etc/systemd/system/docker.service.d/hostd-env.conf
# containerd runs while docker.service wants it, and stops with it.
mkdir -p /etc/systemd/system/containerd.service.d
# containerd starts as often as Docker does (systemd's default allows only 5 starts in 10 s).
printf '[Unit]\nStopWhenUnneeded=yes\nStartLimitIntervalSec=60\nStartLimitBurst=12\n' \
    > /etc/systemd/system/containerd.service.d/hostd-idle.conf
# No `modprobe overlay` before it: a container cannot load modules (the host has overlay: hostd
# loads it), and the attempt logged an error at every Docker start and cost ~20 ms of it.
printf '[Service]\nExecStartPre=\n' > /etc/systemd/system/containerd.service.d/hostd-nomodprobe.conf
systemctl enable hostd-docker-idle.service hostd-docker-boot.service >/dev/null
test -e /etc/systemd/system/sockets.target.wants/docker.socket
test ! -e /etc/systemd/system/multi-user.target.wants/docker.service

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
