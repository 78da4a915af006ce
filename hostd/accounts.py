"""What the host says about an account before hostd lets it in: locked or expired (the PAM
account stage of service `hostd`, as sshd runs it after key authentication), a login shell that
refuses logins (nologin, false), and its authorized SSH keys (read as the user, see authkeys).

Everything here blocks (NSS, PAM modules, a child process): call it from a worker thread.
`account_refusal` is the one check for every way into a tenant (the SSH gateway and the user
socket behind hostd-login and `hostctl exec`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import pwd
from pathlib import Path
from typing import Any

from hostd import authkeys
from runtime import proc
from runtime.errors import RuntimeFailure

log = logging.getLogger(__name__)

PAM_SERVICE = "hostd"
NOLOGIN_TXT = Path("/etc/nologin.txt")
NOLOGIN_DEFAULT = "This account is currently not available."
NOLOGIN_SHELLS = ("nologin", "false")  # by file name, wherever they live
KEYS_TIMEOUT = 2.0  # seconds for reading authorized_keys, the child's start included
USER_PYTHON = "/usr/bin/python3"  # the key reader runs as the user: not hostd's own interpreter


# For names that are refused anyway, the key reader does the same work as nobody on a home that
# does not exist, so the time an answer takes does not tell who exists.
def decoy() -> pwd.struct_passwd:
    """A new one each time: a struct_passwd kept in a module global makes CPython 3.11 fail at
    exit ("SystemError ... tp_clear") once asyncssh is loaded."""
    return pwd.struct_passwd(("nobody", "x", 65534, 65534, "", "/nonexistent", "/usr/sbin/nologin"))


def account_refusal(user: str, rhost: str = "") -> str | None:
    """Why `user` may not use their tenant now (one line: cause and fix), or None."""
    try:
        pw = pwd.getpwnam(user)
    except (KeyError, ValueError):
        return f"{user} is not a user of this host"
    return login_refusal(user, rhost) or shell_refusal(pw)


def login_refusal(user: str, rhost: str = "") -> str | None:
    """Why the account may not log in at all (locked, expired, PAM's account stage), or None."""
    if _locked(user):
        return f"account {user} is locked: ask an admin to unlock it (usermod -U {user})"
    return _pam_account(user, rhost)


def shell_refusal(pw: pwd.struct_passwd) -> str | None:
    """What nologin(8) would print if the login shell refuses logins (nologin, false), or None.

    As with OpenSSH, the user sees it only after authenticating."""
    if os.path.basename(pw.pw_shell) not in NOLOGIN_SHELLS:
        return None
    try:
        with open(NOLOGIN_TXT, "rb") as f:
            text = f.read(4096).decode(errors="replace").rstrip("\n")
    except OSError:
        return NOLOGIN_DEFAULT
    return text or NOLOGIN_DEFAULT


# -- locked passwords -------------------------------------------------------------------------


class _Spwd(ctypes.Structure):
    _fields_ = [
        ("sp_namp", ctypes.c_char_p),
        ("sp_pwdp", ctypes.c_char_p),
        ("sp_lstchg", ctypes.c_long),
        ("sp_min", ctypes.c_long),
        ("sp_max", ctypes.c_long),
        ("sp_warn", ctypes.c_long),
        ("sp_inact", ctypes.c_long),
        ("sp_expire", ctypes.c_long),
        ("sp_flag", ctypes.c_ulong),
    ]


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.calloc.restype = ctypes.c_void_p
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    return libc


def _shadow_password(user: str) -> bytes | None:
    """The password field of the shadow entry (through NSS, reentrant), None if there is none."""
    size = 16384
    while size <= 1 << 20:
        entry, found, buf = _Spwd(), ctypes.POINTER(_Spwd)(), ctypes.create_string_buffer(size)
        err = _libc().getspnam_r(
            user.encode(), ctypes.byref(entry), buf, ctypes.c_size_t(size), ctypes.byref(found)
        )
        if err != 34:  # ERANGE: a larger buffer
            return bytes(found.contents.sp_pwdp or b"") if found else None
        size *= 4
    return None


def is_locked(password: bytes) -> bool:
    """usermod -L and passwd -l put a `!` before the password hash. A lone `!` (or `!!`) is an
    account that never had a password (what useradd leaves, and what -L leaves it as): it
    logs in by key, as with OpenSSH + PAM; lock those with `usermod --expiredate 1`."""
    return password.startswith(b"!") and password.lstrip(b"!") != b""


def _locked(user: str) -> bool:
    password = _shadow_password(user)
    return password is not None and is_locked(password)


# -- the PAM account stage --------------------------------------------------------------------

PAM_SUCCESS, PAM_BUF_ERR, PAM_USER_UNKNOWN, PAM_CONV_ERR = 0, 5, 10, 19
PAM_NEW_AUTHTOK_REQD, PAM_ACCT_EXPIRED = 12, 13
PAM_TTY, PAM_RHOST, PAM_ERROR_MSG, PAM_TEXT_INFO = 3, 4, 3, 4


class _Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_char_p), ("resp_retcode", ctypes.c_int)]


_CONV = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(_Message)),
    ctypes.POINTER(ctypes.POINTER(_Response)),
    ctypes.c_void_p,
)


class _Conv(ctypes.Structure):
    _fields_ = [("conv", _CONV), ("appdata_ptr", ctypes.c_void_p)]


@functools.cache
def _libpam() -> Any:
    """libpam, bound by hand: python-pam offers pam_acct_mgmt only after pam_authenticate,
    and key logins have no password to authenticate."""
    pam = ctypes.CDLL("libpam.so.0")
    pam.pam_start.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.POINTER(_Conv),
        ctypes.POINTER(ctypes.c_void_p),
    ]
    pam.pam_set_item.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    pam.pam_acct_mgmt.argtypes = [ctypes.c_void_p, ctypes.c_int]
    pam.pam_end.argtypes = [ctypes.c_void_p, ctypes.c_int]
    pam.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
    pam.pam_strerror.restype = ctypes.c_char_p
    return pam


def _conversation(said: list[str]) -> Any:
    """A PAM conversation that keeps what modules say and answers no prompt."""

    def conv(count: int, messages: Any, replies: Any, _data: Any) -> int:
        if not 0 < count <= 32:
            return PAM_CONV_ERR
        for i in range(count):
            message = messages[i].contents
            if message.msg_style not in (PAM_ERROR_MSG, PAM_TEXT_INFO):
                return PAM_CONV_ERR
            said.append((message.msg or b"").decode(errors="replace").strip())
        array = _libc().calloc(count, ctypes.sizeof(_Response))  # PAM frees it
        if not array:
            return PAM_BUF_ERR
        replies[0] = ctypes.cast(array, ctypes.POINTER(_Response))
        return PAM_SUCCESS

    return _CONV(conv)


def _pam_account(user: str, rhost: str) -> str | None:
    """Run pam_acct_mgmt for `user` in service hostd (expiry, pam_access, pam_nologin...)."""
    pam, said = _libpam(), list[str]()
    conv = _conversation(said)
    handle = ctypes.c_void_p()
    ret = pam.pam_start(
        PAM_SERVICE.encode(), user.encode(), ctypes.byref(_Conv(conv, None)), ctypes.byref(handle)
    )
    if ret != PAM_SUCCESS:
        return f"PAM could not start for {user} (error {ret}): check /etc/pam.d/{PAM_SERVICE}"
    try:
        pam.pam_set_item(handle, PAM_TTY, b"ssh")  # as sshd sets it, for pam_access
        if rhost:
            pam.pam_set_item(handle, PAM_RHOST, rhost.encode())
        ret = pam.pam_acct_mgmt(handle, 0)
        reason = (pam.pam_strerror(handle, ret) or b"").decode(errors="replace")
    finally:
        pam.pam_end(handle, ret)
    if ret == PAM_SUCCESS:
        return None
    if ret == PAM_ACCT_EXPIRED:
        return f"account {user} has expired: ask an admin to renew it (usermod --expiredate)"
    if ret == PAM_NEW_AUTHTOK_REQD:
        return f"the password of {user} has expired: set a new one with passwd on the host"
    if ret == PAM_USER_UNKNOWN:
        return f"{user} is not a user of this host"
    detail = "; ".join(m for m in said if m) or reason
    return f"the host refuses logins of {user} ({detail}): ask an admin"


# -- authorized keys --------------------------------------------------------------------------


def authorized_keys(pw: pwd.struct_passwd, timeout: float = KEYS_TIMEOUT) -> str | None:
    """The user's ~/.ssh/authorized_keys as text, read by a child running as the user (see
    authkeys), or None: absent, unsafe, too big or too slow (the reason is logged).
    Takes at most about `timeout` seconds."""
    groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    try:
        res = proc.run(
            [USER_PYTHON, "-I", "-S", "-", pw.pw_dir],
            input=_script(),
            env={},
            timeout=timeout,
            max_output=authkeys.MAX_SIZE + 4096,
            as_user=(pw.pw_uid, pw.pw_gid, groups),
            check=False,
        )
    except (RuntimeFailure, OSError) as exc:  # no reader to run, too slow, too much
        log.warning("ignoring %s's authorized_keys: %s", pw.pw_name, exc)
        return None
    return _keys_or_none(pw.pw_name, res.returncode, res.stdout)


def _keys_or_none(user: str, status: int, out: str) -> str | None:
    if status == authkeys.FOUND:
        return out
    if status == authkeys.MISSING:
        return None
    if status == authkeys.UNSAFE:
        log.warning("ignoring %s's authorized_keys: %s", user, out[:300])
    else:
        log.warning("ignoring %s's authorized_keys: the reader failed (status %s)", user, status)
    return None


@functools.cache
def _script() -> bytes:
    """The key reader's program (read in hostd: the child gets it on stdin)."""
    return Path(authkeys.__file__).read_bytes()
