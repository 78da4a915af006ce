"""The default seccomp profile of a system container: a deny list as data, and the OCI
`linux.seccomp` object built from it.

Everything is allowed but the system calls listed here. Each one acts on the whole host
(modules, kexec, swap, clock, accounting), or reaches kernel code with a long history of
privilege escalations and cross-namespace bugs (bpf, perf events, userfaultfd, io_uring,
file handles, keyrings), and neither systemd nor an inner dockerd needs it. Most already fail
in the user namespace; the filter takes that decision away from every future kernel check.
Kept on purpose: name_to_handle_at (systemd reads mount IDs with it), reboot (systemd halts
a pid namespace with it), seccomp (the inner Docker filters its own containers), unshare and
mount (inner runc), adjtimex and clock_adjtime (timedatectl reads the clock state with them;
setting it needs CAP_SYS_TIME of the host), personality (gdb turns off ASLR with it; the
MMAP_PAGE_ZERO flag still meets mmap_min_addr) and move_pages (ptrace-checked, own processes).
Mount of a given filesystem type cannot be told apart by seccomp (the type is a pointer):
the user namespace decides that.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Denial:
    """System calls answered with `errno` instead of running."""

    names: tuple[str, ...]
    errno: int
    why: str


# EPERM where the kernel itself answers EPERM to an unprivileged caller (callers expect it:
# systemd and runc skip BPF features on a privilege error); ENOSYS where callers fall back
# best when the feature seems absent from the kernel.
DENIALS = (
    Denial(("kexec_load", "kexec_file_load"), errno.EPERM, "replace the host's kernel"),
    Denial(
        (
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "get_kernel_syms",
            "query_module",
        ),
        errno.EPERM,
        "host kernel modules",
    ),
    Denial(("iopl", "ioperm"), errno.EPERM, "raw I/O ports"),
    Denial(("swapon", "swapoff"), errno.EPERM, "the host's swap"),
    Denial(("acct",), errno.EPERM, "process accounting to a file"),
    Denial(("settimeofday", "clock_settime"), errno.EPERM, "the host's clock"),
    Denial(("syslog",), errno.EPERM, "the host's kernel log"),
    Denial(("quotactl", "quotactl_fd"), errno.EPERM, "filesystem quotas"),
    Denial(("open_by_handle_at",), errno.EPERM, "opens files by handle, past mount bounds"),
    Denial(("bpf",), errno.EPERM, "eBPF verifier and maps: escalation history"),
    Denial(("perf_event_open",), errno.EPERM, "perf events: escalation and side channels"),
    Denial(("userfaultfd",), errno.EPERM, "stalls kernel copies: race exploitation aid"),
    Denial(("lookup_dcookie", "nfsservctl", "uselib", "_sysctl"), errno.EPERM, "obsolete"),
    Denial(
        ("keyctl", "add_key", "request_key"),
        errno.ENOSYS,
        "kernel keyrings are not namespaced (Docker's profile denies them too)",
    ),
    Denial(
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
        errno.ENOSYS,
        "io_uring: escalation history",
    ),
)

# The ABIs of each machine the kernel accepts system calls in (the compat ones included, or
# a 32-bit call would pass with its own numbers); a machine not listed gets its native ABI
# only, and runc's filter then refuses calls in any other.
ARCHITECTURES = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
}


def denied(denials: tuple[Denial, ...] = DENIALS) -> tuple[str, ...]:
    """Every denied system call name, once, in order."""
    return tuple(dict.fromkeys(name for d in denials for name in d.names))


def profile(machine: str, denials: tuple[Denial, ...] = DENIALS) -> dict[str, Any]:
    """`linux.seccomp` of config.json for a host of `machine` (platform.machine())."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": list(ARCHITECTURES.get(machine, ())),
        "syscalls": [
            {"names": list(d.names), "action": "SCMP_ACT_ERRNO", "errnoRet": d.errno}
            for d in denials
        ],
    }
