"""Root inside a system container cannot reach the kernel interfaces the seccomp profile denies,
in any ABI (64-bit, i386 through int 0x80, x32), nor from an inner `--privileged` container;
systemd, the inner dockerd, `docker build` and `docker run --privileged` keep working."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.containers import Runtime
from tests.conftest import ContainerFactory, load_busybox, sh

# Each call is made so that, without the filter, this kernel (6.18, no kexec, no x32, Debian's
# sysctls) would answer differently: ENOSYS for kexec and x32, success for the user-mode
# userfaultfd, a self-only software perf counter, keyctl and io_uring_setup. Prints one
# `name errno` line per call (0: it ran).
PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void report(const char *name, long ret) {
    printf("%s %d\n", name, ret < 0 ? errno : 0);
}

static long int80(long nr) {  /* an i386 system call with zero arguments */
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(0), "c"(0), "d"(0), "S"(0), "D"(0)
                     : "memory", "r8", "r9", "r10", "r11");
    if (ret < 0 && ret > -4096) { errno = -ret; return -1; }
    return ret;
}

int main(void) {
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("kexec_file_load", syscall(SYS_kexec_file_load, -1, -1, 0, NULL, 0));
    report("init_module", syscall(SYS_init_module, NULL, 0, ""));
    report("bpf", syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, NULL, 0));
    report("userfaultfd", syscall(SYS_userfaultfd, UFFD_USER_MODE_ONLY | O_CLOEXEC));
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = PERF_TYPE_SOFTWARE;
    attr.config = PERF_COUNT_SW_TASK_CLOCK;
    attr.exclude_kernel = 1;
    attr.exclude_hv = 1;
    report("perf_event_open", syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0));
    report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
    struct io_uring_params params;
    memset(&params, 0, sizeof params);
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, &params));
    struct { struct file_handle fh; unsigned char data[128]; } h;
    int mount_id, fd = open("probe-target", O_CREAT | O_RDONLY, 0600);
    h.fh.handle_bytes = sizeof h.data;
    report("name_to_handle_at", syscall(SYS_name_to_handle_at, AT_FDCWD, "probe-target",
                                        &h.fh, &mount_id, 0));
    int dir = open(".", O_RDONLY | O_DIRECTORY);
    report("open_by_handle_at", syscall(SYS_open_by_handle_at, dir, &h.fh, O_RDONLY));
    report("i386_getpid", int80(20));
    report("i386_kexec_load", int80(283));
    report("x32_kexec_load", syscall(0x40000000 | 528, 0, 0, NULL, 0));
    close(fd);
    return 0;
}
"""

EPERM, ENOSYS = errno.EPERM, errno.ENOSYS
EXPECTED = {
    "kexec_load": EPERM,
    "kexec_file_load": EPERM,
    "init_module": EPERM,
    "bpf": EPERM,
    "userfaultfd": EPERM,
    "perf_event_open": EPERM,
    "keyctl": ENOSYS,
    "io_uring_setup": ENOSYS,
    "open_by_handle_at": EPERM,
    "i386_kexec_load": EPERM,
    "x32_kexec_load": EPERM,
    # what must keep working: systemd's mount IDs, 32-bit programs
    "name_to_handle_at": 0,
    "i386_getpid": 0,
}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("gcc missing: apt-get install gcc libc6-dev (builds the probe)")
    src = tmp_path_factory.mktemp("probe") / "probe.c"
    src.write_text(PROBE_C)
    binary = src.with_suffix("")
    subprocess.run(["gcc", "-static", "-O1", "-o", str(binary), str(src)], check=True)
    return binary.read_bytes()


def results(out: str) -> dict[str, int]:
    return {name: int(code) for name, code in (line.split() for line in out.splitlines())}


def test_the_probe_sees_the_kernel_without_the_filter(probe: bytes, tmp_path: Path) -> None:
    """On the host, unfiltered, the same calls answer otherwise: what the test below sees
    inside is the filter's doing, not the user namespace's."""
    (tmp_path / "probe").write_bytes(probe)
    (tmp_path / "probe").chmod(0o755)
    out = subprocess.run(
        [str(tmp_path / "probe")], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    got = results(out)
    for name in (
        "kexec_load",
        "i386_kexec_load",
        "x32_kexec_load",
        "keyctl",
        "io_uring_setup",
        "userfaultfd",
    ):
        assert got[name] != EXPECTED[name], (name, got[name])


def test_filter_is_active_and_denies(
    rt: Runtime, make_container: ContainerFactory, probe: bytes
) -> None:
    name = make_container("scmp")
    status = sh(rt, name, "grep -E '^Seccomp:' /proc/1/status /proc/self/status")
    assert status.count("\t2\n") == 2, status  # mode 2: filter, for init and for exec'd ones
    sh(rt, name, "cat > /tmp/probe && chmod 755 /tmp/probe", input=probe)
    assert results(sh(rt, name, "cd /tmp && ./probe")) == EXPECTED


def test_inner_docker_works_and_privileged_inner_containers_stay_filtered(
    rt: Runtime, make_container: ContainerFactory, busybox_tar: Path, probe: bytes
) -> None:
    name = make_container("scmpd")
    state = sh(rt, name, "systemctl is-system-running --wait || systemctl --failed --no-legend")
    assert state.strip() == "running"
    load_busybox(rt, name, busybox_tar)
    sh(rt, name, "cat > /tmp/probe && chmod 755 /tmp/probe", input=probe)
    dockerfile = "FROM busybox:local\nRUN echo built > /built.txt\nCMD cat /built.txt\n"
    sh(rt, name, f"mkdir -p /tmp/ctx && printf '{dockerfile}' > /tmp/ctx/Dockerfile")
    sh(rt, name, "docker build -q -t built:1 /tmp/ctx")
    assert sh(rt, name, "docker run --rm built:1").strip() == "built"
    # --privileged drops the inner Docker's own profile, never the tenant's
    out = sh(
        rt,
        name,
        "docker run --rm --privileged --tmpfs /tmp -v /tmp/probe:/probe busybox:local "
        "sh -c 'mount | grep -q sysfs && cd /tmp && /probe'",
    )
    assert results(out) == EXPECTED
