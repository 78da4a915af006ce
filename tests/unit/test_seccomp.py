"""The default seccomp profile: what it denies, with which errno, on which ABIs."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno

import pytest

from runtime.seccomp import DENIALS, denied, profile

# What the issue and the kernel's history name; each one must stay denied.
MUST_DENY = (
    "kexec_load",
    "kexec_file_load",
    "open_by_handle_at",
    "userfaultfd",
    "perf_event_open",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "lookup_dcookie",
    "nfsservctl",
    "_sysctl",
    "uselib",
    "io_uring_setup",
)
# What systemd (252) and an inner dockerd (20.10) and runc use: denying one breaks a tenant.
MUST_ALLOW = (
    "name_to_handle_at",
    "reboot",
    "seccomp",
    "prctl",
    "unshare",
    "setns",
    "clone",
    "clone3",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "mount_setattr",
    "adjtimex",
    "clock_adjtime",
    "personality",
    "ptrace",
    "chroot",
    "mknod",
)


def test_default_is_allow_and_every_rule_is_an_errno() -> None:
    p = profile("x86_64")
    assert p["defaultAction"] == "SCMP_ACT_ALLOW"
    for rule in p["syscalls"]:
        assert rule["action"] == "SCMP_ACT_ERRNO"
        assert rule["errnoRet"] in (errno.EPERM, errno.ENOSYS)
        assert "args" not in rule  # whole calls: no argument filter to get wrong


@pytest.mark.parametrize("name", MUST_DENY)
def test_dangerous_calls_are_denied(name: str) -> None:
    assert name in denied()


@pytest.mark.parametrize("name", MUST_ALLOW)
def test_calls_a_system_container_needs_are_allowed(name: str) -> None:
    assert name not in denied()


def test_errnos_callers_expect() -> None:
    errnos = {n: r["errnoRet"] for r in profile("x86_64")["syscalls"] for n in r["names"]}
    # the kernel's own answer to an unprivileged caller: systemd and runc skip on it
    assert errnos["bpf"] == errnos["perf_event_open"] == errnos["kexec_load"] == errno.EPERM
    # "not in this kernel": keyring and io_uring users fall back
    assert errnos["keyctl"] == errnos["io_uring_setup"] == errno.ENOSYS


def test_each_call_is_denied_once() -> None:
    names = [n for d in DENIALS for n in d.names]
    assert len(names) == len(set(names)) == len(denied())


def test_x86_64_covers_the_i386_and_x32_abis() -> None:
    assert profile("x86_64")["architectures"] == [
        "SCMP_ARCH_X86_64",
        "SCMP_ARCH_X86",
        "SCMP_ARCH_X32",
    ]
    assert profile("aarch64")["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


def test_an_unknown_machine_gets_its_native_abi_only() -> None:
    """runc adds the native ABI itself; calls in any other then fail the filter."""
    assert profile("riscv64")["architectures"] == []
    assert profile("riscv64")["syscalls"] == profile("x86_64")["syscalls"]


def test_every_name_is_known_to_libseccomp() -> None:
    """runc ignores a name libseccomp cannot resolve on the native ABI: a typo or a name of
    another ABI would silently deny nothing."""
    path = ctypes.util.find_library("seccomp")
    if path is None:
        pytest.skip("libseccomp missing: apt-get install libseccomp2")
    lib = ctypes.CDLL(path)
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    unknown = [n for n in denied() if lib.seccomp_syscall_resolve_name(n.encode()) < 0]
    assert unknown == []
