"""`hostctl doctor` without a broken host: each check fed the host facts that make it pass and
fail (kernel release, /proc/sys values, mountinfo, a state dir's modes, subuid files, the
programs on PATH), through doctor's own seams. A failure's detail names the cause and the fix."""

from __future__ import annotations

import errno
import functools
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostd import config as config_mod
from hostd import doctor, hostlimits, subids
from hostd.config import Config
from hostd.state import State, Tenant
from runtime import cgroups, mountinfo, netplan, sysctl, volume
from runtime.ids import IdRange
from runtime.limits import Limits
from runtime.mountinfo import Mount

RUNC_VERSION = "runc version 1.1.5\ncommit: v1.1.5\nspec: 1.0.2-dev\ngo: go1.19.8\n"
SECCOMP_ACTIONS = "kill_process kill_thread trap errno user_notif trace log allow\n"
CGROUP_V2 = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw\n"
CGROUP_HYBRID = (
    "24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "30 24 0:26 / /sys/fs/cgroup/unified rw shared:5 - cgroup2 cgroup2 rw,nsdelegate\n"
    "31 24 0:27 / /sys/fs/cgroup/memory rw shared:6 - cgroup cgroup rw,memory\n"
    "32 24 0:28 / /sys/fs/cgroup/cpu,cpuacct rw shared:7 - cgroup cgroup rw,cpu,cpuacct\n"
)
NO_CGROUPS = "24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may pass (pytest's tmp_path is under a 0700 one), so that a state
    dir below it can be opened to the containers."""
    path = Path(tempfile.mkdtemp(prefix="hostd-doctor-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path)


def load(base: Path, text: str = "", state_dir: Path | None = None) -> Config:
    """hostd.toml in `base`: the state dir and subuid/subgid files there, then `text`."""
    main = base / "hostd.toml"
    main.write_text(
        f'[paths]\nstate_dir = "{state_dir or base / "state"}"\nsubuid = "{base}/subuid"\n'
        f'subgid = "{base}/subgid"\n{text}'
    )
    return config_mod.load(main)


@pytest.fixture
def cfg(base: Path) -> Config:
    return load(base)


@pytest.fixture
def path_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory as the whole PATH: no program is found unless a test puts it there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def program(bin_dir: Path, name: str, output: str = "") -> Path:
    """A program `name` on PATH that prints `output`."""
    path = bin_dir / name
    (bin_dir / f"{name}.out").write_text(output)
    path.write_text(f"#!/bin/sh\nexec /bin/cat '{bin_dir}/{name}.out'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def proc_sys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proc-sys"
    root.mkdir()
    monkeypatch.setattr(sysctl, "ROOT", root)
    return root


def put(root: Path, key: str, value: str) -> None:
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_text(value)


def one(cfg: Config, name: str, monkeypatch: pytest.MonkeyPatch) -> doctor.Check:
    """The result `doctor.run` gives for the check `name` (the others are not run)."""
    monkeypatch.setattr(doctor, "CHECKS", tuple(c for c in doctor.CHECKS if c[0] == name))
    (result,) = doctor.run(cfg)
    assert result.name == name
    return result


# -- kernel and /proc/sys ---------------------------------------------------------------------


@pytest.mark.parametrize("release", ["5.19.0", "6.1.0-13-amd64", "6.18.0", "10.0.1"])
def test_a_kernel_with_idmapped_overlay_passes(
    cfg: Config, release: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor.platform, "release", lambda: release)
    assert one(cfg, "kernel", monkeypatch) == ("kernel", True, release)


@pytest.mark.parametrize("release", ["5.18.19", "5.15.0-91-generic", "4.19.0-26-amd64"])
def test_an_older_kernel_names_the_version_needed_and_the_way_out(
    cfg: Config, release: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor.platform, "release", lambda: release)
    result = one(cfg, "kernel", monkeypatch)
    assert not result.ok
    assert result.detail == (
        f'{release}: ID-mapped overlay layers need >= 5.19 (or rootfs_mode = "copy")'
    )


def test_user_namespaces_on_off_and_missing(
    cfg: Config, proc_sys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(proc_sys, "user/max_user_namespaces", "63371\n")
    assert one(cfg, "user namespaces", monkeypatch)[1:] == (True, "max_user_namespaces = 63371")
    put(proc_sys, "user/max_user_namespaces", "0\n")
    assert one(cfg, "user namespaces", monkeypatch)[1:] == (
        False,
        "disabled: sysctl -w user.max_user_namespaces=15000",
    )
    (proc_sys / "user/max_user_namespaces").unlink()
    assert one(cfg, "user namespaces", monkeypatch)[1:] == (
        False,
        "no user namespaces: use a kernel with CONFIG_USER_NS=y",
    )


def test_inotify_reports_the_settings_and_what_hostd_raises(
    cfg: Config, proc_sys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a failure (hostd raises them itself), but the detail says what it will do."""
    put(proc_sys, "fs/inotify/max_user_instances", "128\n")
    put(proc_sys, "fs/inotify/max_user_watches", "524288\n")
    low = one(cfg, "inotify", monkeypatch)
    assert low.ok and low.detail.endswith(
        "hostd raises fs.inotify.max_user_instances to 1024 when it starts"
    )
    put(proc_sys, "fs/inotify/max_user_instances", "8192\n")
    high = one(cfg, "inotify", monkeypatch)
    assert high.ok and "raises" not in high.detail and "= 8192" in high.detail


def test_seccomp_needs_the_kernel_filters_and_a_runc_with_libseccomp(
    cfg: Config, proc_sys: Path, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(proc_sys, "kernel/seccomp/actions_avail", SECCOMP_ACTIONS)
    program(path_dir, "runc", RUNC_VERSION + "libseccomp: 2.5.4\n")
    result = one(cfg, "seccomp", monkeypatch)
    assert result.ok and result.detail.startswith("default profile (")

    program(path_dir, "runc", RUNC_VERSION)  # built without it
    assert one(cfg, "seccomp", monkeypatch)[1:] == (
        False,
        "runc is built without libseccomp: install Debian's runc",
    )
    put(proc_sys, "kernel/seccomp/actions_avail", "kill_process allow\n")  # no errno action
    no_filters = "the kernel has no seccomp filters: use one with CONFIG_SECCOMP_FILTER=y"
    assert one(cfg, "seccomp", monkeypatch)[1:] == (False, no_filters)
    (proc_sys / "kernel/seccomp/actions_avail").unlink()
    assert one(cfg, "seccomp", monkeypatch)[1:] == (False, no_filters)


# -- file systems and mounts ------------------------------------------------------------------


def test_overlay_present_or_missing(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    filesystems = tmp_path / "filesystems"
    monkeypatch.setattr(doctor, "FILESYSTEMS", filesystems)
    filesystems.write_text("nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\toverlay\n")
    assert one(cfg, "overlay", monkeypatch)[1:] == (True, "available")
    filesystems.write_text("nodev\tsysfs\n\text4\nnodev\toverlayfs-not\n")
    assert one(cfg, "overlay", monkeypatch)[1:] == (False, "missing: modprobe overlay")


@pytest.mark.parametrize(
    ("text", "ok", "detail"),
    [
        (CGROUP_V2, True, "v2 (unified)"),
        (CGROUP_HYBRID, True, "v1 hybrid (cpu,cpuacct,memory,unified)"),
        (NO_CGROUPS, False, "no cgroup file system mounted: mount cgroup2 on /sys/fs/cgroup"),
    ],
    ids=["v2", "v1-hybrid", "none"],
)
def test_cgroup_layouts(
    cfg: Config, text: str, ok: bool, detail: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mountinfo, "current", lambda: mountinfo.parse(text))
    assert one(cfg, "cgroups", monkeypatch)[1:] == (ok, detail)


def test_tenant_cgroups_under_systemd_belong_to_hostd_tenants_service(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With systemd as PID 1 and hostd-tenants.service not active, the tenants would land
    outside systemd's units (a shutdown kills them): doctor says so and how to fix it."""
    root, systemd = tmp_path / "cg", tmp_path / "run-systemd-system"
    monkeypatch.setattr(mountinfo, "current", lambda: mountinfo.parse(CGROUP_V2))
    monkeypatch.setattr(cgroups, "SYSTEMD_DIR", str(systemd))
    monkeypatch.setattr(
        cgroups, "detect", lambda _: cgroups.Layout(2, (cgroups.Hierarchy(str(root), ()),))
    )
    cfg = load(base)
    assert one(cfg, "tenant cgroups", monkeypatch)[1:] == (True, "hostd")  # no systemd
    systemd.mkdir()
    ok, detail = one(cfg, "tenant cgroups", monkeypatch)[1:]
    assert not ok and "systemctl enable --now hostd-tenants.service" in detail
    (root / cgroups.SYSTEMD_PARENT).mkdir(parents=True)  # the unit is active
    assert one(cfg, "tenant cgroups", monkeypatch)[1:] == (
        True,
        "hostd.slice/hostd-tenants.service (systemd: halted cleanly at shutdown)",
    )
    chosen = load(base, '[runtime]\ncgroup_parent = "mine"\n')  # the admin's choice stands
    assert one(chosen, "tenant cgroups", monkeypatch)[1:] == (True, "mine")


def test_a_state_dir_is_made_or_opened_for_the_containers(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(base)
    state = cfg.paths.state_dir
    result = one(cfg, "state dir", monkeypatch)
    assert result == ("state dir", True, f"{state}: the containers may pass through to their files")
    assert (state.stat().st_mode & 0o777) == 0o711
    state.chmod(0o700)  # as a umask of 077 makes it: opened again, not refused
    assert one(cfg, "state dir", monkeypatch).ok
    assert (state.stat().st_mode & 0o777) == 0o711


def test_a_state_dir_under_a_closed_directory_names_it_and_the_fix(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = base / "closed"
    closed.mkdir(mode=0o700)
    cfg = load(base, state_dir=closed / "state")
    result = one(cfg, "state dir", monkeypatch)
    assert not result.ok
    assert result.detail == (
        f"check failed: {closed} (mode 0700) is closed to the containers' root users: "
        f"chmod o+x {closed}, or choose a state_dir under directories others may pass"
    )
    assert not (closed / "state").exists()  # refused before anything was made


def _probe(
    owner: int | None = None, error: OSError | None = None
) -> Callable[[Path, Path, IdRange], int]:
    """A stand-in for the kernel's ID-mapped bind mount: the owner it shows, or its refusal."""

    def probe(src: Path, dst: Path, ids: IdRange) -> int:
        assert src.is_dir() and dst.is_dir() and src.parent == dst.parent
        if error is not None:
            raise error
        return ids.start if owner is None else owner

    return probe


def test_idmapped_mounts_supported(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_idmapped_owner", _probe())
    result = one(cfg, "ID-mapped mounts", monkeypatch)
    assert result[1:] == (True, f"supported on {cfg.paths.state_dir}")
    assert list(cfg.paths.state_dir.iterdir()) == []  # the probe's directories are gone


def test_idmapped_mounts_refused_point_to_the_copy_mode(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    monkeypatch.setattr(doctor, "_idmapped_owner", _probe(error=refused))
    assert one(cfg, "ID-mapped mounts", monkeypatch)[1:] == (
        False,
        f"refused on {cfg.paths.state_dir} (Invalid argument): containers will use a "
        'shifted copy (rootfs_mode = "copy")',
    )
    assert list(cfg.paths.state_dir.iterdir()) == []


def test_idmapped_mounts_showing_the_wrong_owner_say_so(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "_idmapped_owner", _probe(owner=65534))
    result = one(cfg, "ID-mapped mounts", monkeypatch)
    start = IdRange(cfg.subids.min).start
    assert not result.ok
    assert f"shows owner 65534, not {start}" in result.detail
    assert result.detail.endswith('set rootfs_mode = "copy"')


# -- programs ---------------------------------------------------------------------------------


def test_runc_found_or_missing(
    cfg: Config, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert one(cfg, "runc", monkeypatch)[1:] == (False, "not found: apt-get install runc")
    program(path_dir, "runc", RUNC_VERSION)
    assert one(cfg, "runc", monkeypatch)[1:] == (True, "runc version 1.1.5")


def test_a_configured_runc_path_is_the_one_checked(
    base: Path, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program(path_dir, "runc", RUNC_VERSION)  # on PATH, but not the one configured
    cfg = load(base, f'[runtime]\nrunc = "{base}/nowhere/runc"\n')
    assert one(cfg, "runc", monkeypatch)[1:] == (False, "not found: apt-get install runc")


def test_nftables_found_or_missing(
    cfg: Config, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert one(cfg, "nftables", monkeypatch)[1:] == (False, "not found: apt-get install nftables")
    program(path_dir, "nft", "nftables v1.0.6 (Lester Gooch #5)\n")
    assert one(cfg, "nftables", monkeypatch)[1:] == (True, "nftables v1.0.6 (Lester Gooch #5)")


def test_lxcfs_found_or_missing(
    cfg: Config, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = one(cfg, "lxcfs", monkeypatch)
    assert result[1:] == (
        False,
        "not found: apt-get install lxcfs fuse3 (else /proc shows the host's)",
    )
    program(path_dir, "lxcfs", "5.0.3\n")
    assert one(cfg, "lxcfs", monkeypatch)[1:] == (True, "5.0.3")


def test_disk_quota_tools_and_live_growth(
    cfg: Config, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program(path_dir, "losetup")
    assert one(cfg, "disk quota", monkeypatch)[1:] == (
        False,
        "mkfs.ext4, resize2fs missing: apt-get install e2fsprogs util-linux",
    )
    program(path_dir, "mkfs.ext4")
    program(path_dir, "resize2fs")
    monkeypatch.setattr(volume, "can_grow_live", lambda: True)
    live = one(cfg, "disk quota", monkeypatch)
    assert live.ok and live.detail.endswith("quotas are raised live")
    monkeypatch.setattr(volume, "can_grow_live", lambda: False)
    later = one(cfg, "disk quota", monkeypatch)
    assert later.ok and later.detail.endswith(
        "raised at next start (no CAP_SYS_RESOURCE for online resize)"
    )


def test_apparmor_enabled_or_not_is_never_a_failure(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enabled = tmp_path / "enabled"
    monkeypatch.setattr(doctor, "APPARMOR", enabled)
    assert one(cfg, "apparmor", monkeypatch)[1:] == (True, "not enabled on this kernel")
    enabled.write_text("N\n")
    assert one(cfg, "apparmor", monkeypatch)[1:] == (True, "not enabled on this kernel")
    enabled.write_text("Y\n")
    result = one(cfg, "apparmor", monkeypatch)
    assert result.ok and result.detail.startswith("enabled; tenants get no AppArmor profile")


# -- subordinate IDs --------------------------------------------------------------------------

OWNER = "hostd-ids"


def test_subid_files_are_counted(base: Path, cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    (base / "subuid").write_text(f"alice:100000:65536\n{OWNER}:200000:65536\n# note\n")
    result = one(cfg, "subuid files", monkeypatch)
    assert result[1:] == (
        True,
        f"{base}/subuid: 2 ranges, {base}/subgid: 0; hostd allocates in 100000-600100000",
    )


def test_an_unreadable_subid_file_fails_naming_it(
    base: Path, cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    (base / "subuid").mkdir()
    result = one(cfg, "subuid files", monkeypatch)
    assert not result.ok
    assert result.detail.startswith("check failed: ") and f"{base}/subuid" in result.detail


def _account(name: str, uid: int, shell: str) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, uid, "", "/nonexistent", shell))


@pytest.fixture
def owner_account(base: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make the range owner's account look as given (passwd entry and shadow password)."""

    def make(uid: int = 998, shell: str = "/usr/sbin/nologin", password: str = "!") -> None:
        entry = _account(OWNER, uid, shell)
        real = pwd.getpwnam

        def getpwnam(name: str) -> pwd.struct_passwd:
            return entry if name == OWNER else real(name)

        monkeypatch.setattr(pwd, "getpwnam", getpwnam)
        shadow = base / "shadow"
        shadow.write_text(f"root:*:19000::::::\n{OWNER}:{password}:19000::::::\n")
        monkeypatch.setattr(subids, "SHADOW", shadow)

    return make


def test_a_missing_range_owner_is_made_by_hostd(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def getpwnam(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    assert one(cfg, "ID range owner", monkeypatch)[1:] == (
        True,
        f"{OWNER} does not exist yet: hostd creates it (a locked system account)",
    )


def test_a_locked_system_owner_with_its_own_ranges_passes(
    base: Path, cfg: Config, owner_account: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    owner_account()
    (base / "subuid").write_text(f"alice:100000:65536\n{OWNER}:300000:65536\n")
    (base / "subgid").write_text(f"alice:100000:65536\n{OWNER}:300000:65536\n")
    result = one(cfg, "ID range owner", monkeypatch)
    assert result[1:] == (
        True,
        f"{OWNER} (locked, no login) owns 1 ranges: "
        "tenants cannot newuidmap into their container's IDs",
    )


@pytest.mark.parametrize(
    ("account", "problem"),
    [
        ({"uid": 1001}, "has uid 1001: not a system account (0 < uid < 1000)"),
        ({"uid": 0}, "has uid 0: not a system account (0 < uid < 1000)"),
        ({"shell": "/bin/bash"}, "has the login shell /bin/bash"),
        ({"password": "$y$j9T$salt$hash"}, "has a usable or empty password"),
        ({"password": ""}, "has a usable or empty password"),
    ],
    ids=["human-uid", "root", "shell", "password", "empty-password"],
)
def test_an_owner_someone_could_log_in_as_is_refused_with_the_fix(
    cfg: Config,
    owner_account: Callable[..., None],
    account: dict[str, object],
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner_account(**account)
    assert one(cfg, "ID range owner", monkeypatch)[1:] == (
        False,
        f"{OWNER} {problem}: lock it (`usermod -L -s /usr/sbin/nologin {OWNER}`), "
        "else it can map every tenant's IDs",
    )


@pytest.mark.parametrize("file", ["subuid", "subgid"])
def test_another_users_range_over_tenants_ids_is_named(
    base: Path,
    cfg: Config,
    owner_account: Callable[..., None],
    file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner_account()
    (base / "subuid").write_text(f"{OWNER}:300000:65536\n")
    (base / "subgid").write_text(f"{OWNER}:300000:65536\n")
    with (base / file).open("a") as f:
        f.write("mallory:350000:1000\n")  # inside a tenant's range
    assert one(cfg, "ID range owner", monkeypatch)[1:] == (
        False,
        "mallory's range 350000-350999 overlaps tenants' IDs 300000-365535: mallory can map "
        "them with newuidmap; remove that entry",
    )


# -- configuration against the host ----------------------------------------------------------


def _host_resolv(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(text)
    host = functools.partial(netplan.host_nameservers, (resolv,))
    monkeypatch.setattr(config_mod, "host_nameservers", host)


def test_tenant_dns_configured_or_from_the_host(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _host_resolv(tmp_path, "nameserver 127.0.0.53\nnameserver 192.0.2.53\n", monkeypatch)
    assert one(load(base), "tenant DNS", monkeypatch)[1:] == (
        True,
        "tenants use 192.0.2.53 (the host's)",
    )
    configured = load(base, '[network]\ndns = ["198.51.100.1", "198.51.100.2"]\n')
    assert one(configured, "tenant DNS", monkeypatch)[1:] == (
        True,
        "tenants use 198.51.100.1, 198.51.100.2 (configured)",
    )


def test_a_host_with_only_a_loopback_resolver_needs_dns_configured(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _host_resolv(tmp_path, "nameserver 127.0.0.53\nnameserver ::1\n", monkeypatch)
    assert one(load(base), "tenant DNS", monkeypatch)[1:] == (
        False,
        "the host has no nameserver a tenant can reach (loopback only): set "
        '[network] dns = ["<resolver address>"]',
    )


def _home_fs(monkeypatch: pytest.MonkeyPatch, *options: str) -> None:
    """/home on its own ext4, mounted with `options`."""
    mounts = [
        Mount("/", "ext4", "/dev/sda1", ("rw",)),
        Mount("/home", "ext4", "/dev/sdb1", ("rw", *options)),
    ]
    real = hostlimits.home_quota
    monkeypatch.setattr(hostlimits, "home_quota", lambda path: real(path, mounts))


def test_home_quotas_enforced_need_setquota(
    cfg: Config, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _home_fs(monkeypatch, "usrquota")
    assert one(cfg, "home quotas", monkeypatch)[1:] == (
        False,
        "enforced (ext4 usrquota on /home), but setquota is missing: apt-get install quota",
    )
    program(path_dir, "setquota")
    assert one(cfg, "home quotas", monkeypatch)[1:] == (True, "enforced (ext4 usrquota on /home)")


def test_home_quotas_unavailable_fail_only_when_configured(
    base: Path, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _home_fs(monkeypatch)
    unavailable = (
        "not available: /home (ext4) has no usrquota; homes are outside the tenants' disk caps"
    )
    assert one(load(base), "home quotas", monkeypatch)[1:] == (True, unavailable)
    wanted = load(base, '[limits]\nhome = "10G"\n')
    assert one(wanted, "home quotas", monkeypatch)[1:] == (
        False,
        f"{unavailable}: mount /home with usrquota, or drop [limits] home",
    )


# -- headroom ---------------------------------------------------------------------------------

G = 2**30
M = 2**20


def tenants(cfg: Config, *quotas: Limits, quarantine: int = 0) -> list[str]:
    """hostd's state with one tenant per quota (ranges from 100000 on), and `quarantine`
    removed ones whose ranges are held back; their names."""
    cfg.paths.state_dir.mkdir(parents=True, exist_ok=True)
    names = [f"t{i}" for i in range(len(quotas) + quarantine)]
    with State(cfg.paths.state_dir / "hostd.db") as state:
        for i, name in enumerate(names):
            quota = quotas[i] if i < len(quotas) else Limits()
            start = 100000 + i * 65536
            t = Tenant(
                name,
                2000 + i,
                2000 + i,
                f"/home/{name}",
                start,
                "default",
                "adding",
                "running",
                "2026-01-01T00:00:00+00:00",
            )
            state.begin_add(t, quota)
            state.set_phase(name, "ready")
            if i >= len(quotas):
                state.delete_tenant(name, "quarantined")
    return names[: len(quotas)]


def running(monkeypatch: pytest.MonkeyPatch, **used: tuple[int, int]) -> None:
    """These tenants run, using (memory bytes, tasks); the others are stopped."""

    def usage(_: cgroups.Layout, __: Config, user: str) -> cgroups.Usage | None:
        return cgroups.Usage(used[user][0], 1.0, used[user][1]) if user in used else None

    monkeypatch.setattr(doctor, "_usage", usage)


def memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, total: int, available: int) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        f"MemTotal:       {total // 1024} kB\nMemFree:        1 kB\n"
        f"MemAvailable:   {available // 1024} kB\n"
    )
    monkeypatch.setattr(doctor, "MEMINFO", meminfo)


def test_memory_headroom_without_tenants_is_capacity_only(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory(tmp_path, monkeypatch, 4 * G, 3 * G)
    assert one(cfg, "memory headroom", monkeypatch)[1:] == (
        True,
        "3G available of 4G; 102 tenants fit at 40M each (assumed); no tenants yet",
    )


def test_memory_headroom_warns_when_starting_the_stopped_tenants_would_fill_it(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants(cfg, Limits(memory=4 * G), Limits(memory=4 * G), Limits())
    running(monkeypatch, t0=(100 * M, 20))
    memory(tmp_path, monkeypatch, 1 * G, 500 * M)
    text = (
        "500M available of 1G; 10 tenants fit at 100M each (the mean of 1 running); "
        "3 tenants' quotas add up to 8G (8.0x, 1 unlimited)"
    )
    assert one(cfg, "memory headroom", monkeypatch)[1:] == (True, text)
    memory(tmp_path, monkeypatch, 1 * G, 300 * M)
    assert one(cfg, "memory headroom", monkeypatch)[1:] == (
        False,
        text.replace("500M", "300M") + ": starting the 2 stopped would leave 100M available: "
        "add memory, or move tenants to another host",
    )


def space(monkeypatch: pytest.MonkeyPatch, size: int, free: int, volume: int = 0) -> None:
    """The state dir's file system, and what each tenant's volume takes of it."""
    monkeypatch.setattr(doctor, "_space", lambda _: (size, free))
    monkeypatch.setattr(doctor, "_volume", lambda _, __: volume)


def test_disk_headroom_without_tenants_counts_default_volumes(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    space(monkeypatch, 100 * G, 50 * G)
    where = cfg.paths.state_dir
    assert one(cfg, "disk headroom", monkeypatch)[1:] == (
        True,
        f"50G free of 100G on {where}; no tenants yet; room for 2 full volumes of 20G",
    )
    space(monkeypatch, 100 * G, 10 * G)
    result = one(cfg, "disk headroom", monkeypatch)
    assert not result.ok and result.detail.endswith("less than 20% free: add space or remove data")


def test_disk_headroom_warns_when_the_volumes_may_outgrow_the_free_space(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants(cfg, *[Limits(disk=10 * G)] * 3)
    space(monkeypatch, 100 * G, 30 * G, volume=1 * G)
    text = (
        f"30G free of 100G on {cfg.paths.state_dir}; 3 tenants' volumes take 3G, quotas add "
        "up to 30G (0.9x the space)"
    )
    assert one(cfg, "disk headroom", monkeypatch)[1:] == (True, text)
    space(monkeypatch, 100 * G, 20 * G, volume=1 * G)
    assert one(cfg, "disk headroom", monkeypatch)[1:] == (
        False,
        text.replace("30G free", "20G free").replace("0.9x", "1.3x")
        + ": the volumes may grow by 27G more than is free, and a full file system fails "
        "every tenant's writes: add space, or lower disk quotas "
        "(`hostctl quota set USER --disk SIZE`)",
    )


def tasks(proc_sys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **values: int) -> None:
    put(proc_sys, "kernel/pid_max", f"{values.get('pid_max', 32768)}\n")
    put(proc_sys, "kernel/threads-max", f"{values.get('threads_max', 30000)}\n")
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.35 0.84 1.46 5/{values.get('now', 115)} 20379\n")
    monkeypatch.setattr(doctor, "LOADAVG", loadavg)


def test_task_headroom_says_what_binds_and_what_hostd_raises(
    cfg: Config, proc_sys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks(proc_sys, tmp_path, monkeypatch)
    assert one(cfg, "task headroom", monkeypatch)[1:] == (
        True,
        "kernel.threads-max = 30000 binds (115 tasks now); hostd raises kernel.pid_max from "
        "32768 to 4194304 when it starts; no tenants yet; room for 7 tenants at 4096 each",
    )
    tasks(proc_sys, tmp_path, monkeypatch, pid_max=4194304, threads_max=10**7, now=3400000)
    assert one(cfg, "task headroom", monkeypatch)[1:] == (
        False,
        "kernel.pid_max = 4194304 binds (3400000 tasks now): over 80% used: stop tenants, "
        "or raise kernel.pid_max",
    )


def test_task_headroom_warns_when_the_pid_quotas_add_up_past_the_host(
    cfg: Config, proc_sys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants(cfg, *[Limits(pids=4096)] * 7, Limits())
    tasks(proc_sys, tmp_path, monkeypatch, pid_max=4194304)
    text = (
        "kernel.threads-max = 30000 binds (115 tasks now); 8 tenants' quotas add up to 28672, "
        "1 unlimited"
    )
    assert one(cfg, "task headroom", monkeypatch)[1:] == (True, text)
    tasks(proc_sys, tmp_path, monkeypatch, pid_max=4194304, threads_max=28000)
    assert one(cfg, "task headroom", monkeypatch)[1:] == (
        False,
        text.replace("30000", "28000") + ": tenants at their quotas would leave the host no "
        "tasks: lower pids quotas (`hostctl quota set USER --pids N`) or raise "
        "kernel.threads-max",
    )


def key_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "key-users"
    path.write_text(text)
    monkeypatch.setattr(doctor, "KEY_USERS", path)


def test_kernel_keys_warn_when_a_tenant_or_root_nears_its_quota(
    cfg: Config, proc_sys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(proc_sys, "kernel/keys/maxkeys", "200\n")
    put(proc_sys, "kernel/keys/maxbytes", "20000\n")
    root = "    0:     9 8/8 3/1000000 88/25000000\n"
    key_users(tmp_path, monkeypatch, root)
    text = (
        "each tenant may hold 200 keys, 20000 bytes (kernel.keys.maxkeys/maxbytes): about "
        "200 containers inside; root holds 3/1000000"
    )
    assert one(cfg, "kernel keys", monkeypatch)[1:] == (True, text)
    tenants(cfg, Limits(), Limits())  # ranges 100000 and 165536
    key_users(tmp_path, monkeypatch, root + "100000:  12 12/12 12/200 840/20000\n")
    busiest = "; busiest tenant t0 12/200 keys, 840 bytes"
    assert one(cfg, "kernel keys", monkeypatch)[1:] == (True, text + busiest)
    key_users(
        tmp_path,
        monkeypatch,
        root + "100000:  12 12/12 12/200 840/20000\n165536: 190 190/190 190/200 13300/20000\n",
    )
    assert one(cfg, "kernel keys", monkeypatch)[1:] == (
        False,
        text + "; busiest tenant t1 190/200 keys, 13300 bytes: t1 over 80%: sysctl -w "
        "kernel.keys.maxkeys=2000 kernel.keys.maxbytes=2000000 (root: kernel.keys.root_maxkeys, "
        "root_maxbytes), and in /etc/sysctl.d",
    )


def test_subuid_space_counts_free_ranges_and_the_quarantined(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(base, "[subids]\nmin = 100000\nmax = 755359\n")  # 10 ranges
    (base / "subuid").write_text(f"{OWNER}:100000:65536\nbob:200000:1000\n")
    assert one(cfg, "subuid space", monkeypatch)[1:] == (
        True,
        "8 of 10 ranges of 65536 IDs free in 100000-755359",
    )
    tenants(cfg, Limits(), quarantine=2)  # 100000, and 165536 and 231072 held back
    (base / "subgid").write_text(f"{OWNER}:296608:393216\n")  # six more, elsewhere
    assert one(cfg, "subuid space", monkeypatch)[1:] == (
        False,
        "1 of 10 ranges of 65536 IDs free in 100000-755359; 2 quarantined (`hostctl ranges "
        "release START` frees one): raise [subids] max in hostd.toml (or SUB_UID_MAX in "
        "/etc/login.defs), or release quarantined ranges",
    )


# -- the report as a whole --------------------------------------------------------------------


def test_a_check_that_breaks_is_a_finding_and_the_others_still_run(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_: Config) -> tuple[bool, str]:
        raise ValueError("unexpected /proc content")

    checks = (("kernel", doctor._kernel), ("broken", broken), ("apparmor", doctor._apparmor))
    monkeypatch.setattr(doctor, "CHECKS", checks)
    monkeypatch.setattr(doctor.platform, "release", lambda: "6.18.0")
    results = doctor.run(cfg)
    assert [r.name for r in results] == ["kernel", "broken", "apparmor"]
    assert results[1] == ("broken", False, "check failed: unexpected /proc content")
    assert results[0].ok and results[2].ok


def test_every_check_has_tests_here() -> None:
    """A new check in doctor.CHECKS needs its passing and failing inputs in this file."""
    source = Path(__file__).read_text()
    untested = [name for name, _ in doctor.CHECKS if f'"{name}", monkeypatch' not in source]
    assert untested == []


# -- ID ranges: the source in use, overlaps across subuid, subgid and the state ---------------


def entries(base: Path, *lines: str) -> None:
    for name in ("subuid", "subgid"):
        (base / name).write_text("".join(f"{line}\n" for line in lines))


def test_id_ranges_say_the_source_and_find_no_overlap(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(base, "[subids]\nmin = 100000\nmax = 600100000\n")
    tenants(cfg, Limits(), Limits())  # t0 at 100000, t1 at 165536
    entries(base, f"{OWNER}:100000:65536", f"{OWNER}:165536:65536", "podman:900000:65536")
    assert one(cfg, "ID ranges", monkeypatch)[1:] == (
        True,
        "local: the first free range in 100000-600100000; no two ranges overlap",
    )


@pytest.mark.parametrize("file", ["subuid", "subgid"])
def test_an_entry_over_a_tenants_range_fails_naming_both(
    base: Path, file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(base, "[subids]\nmin = 100000\n")
    tenants(cfg, Limits(), Limits())
    entries(base, f"{OWNER}:100000:65536", f"{OWNER}:165536:65536")
    with (base / file).open("a") as f:
        f.write("mallory:170000:10\n")
    check = one(cfg, "ID ranges", monkeypatch)
    assert check[1:] == (
        False,
        f"t1's range 165536-231071 (active) overlaps mallory's entry mallory:170000:10 in "
        f"{base / file}: remove or move one (a tenant's range is hers: change the other)",
    )


@pytest.mark.parametrize(("source", "ok"), [("local", False), ("subid", True)])
def test_a_users_own_entry_of_her_range_is_a_grant_only_from_the_directory(
    base: Path, source: str, ok: bool, path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under her own name she can newuidmap it: right for subid (the directory's grant),
    an overlap for hostd's own ranges."""
    program(path_dir, "getsubids")
    cfg = load(base, f'[subids]\nmin = 100000\nsource = "{source}"\n')
    tenants(cfg, Limits())
    entries(base, "t0:100000:65536")
    check = one(cfg, "ID ranges", monkeypatch)
    assert check.ok is ok
    assert ok or "t0's range 100000-165535 (active) overlaps t0's entry t0:100000:65536" in (
        check.detail
    )


def test_deterministic_shows_the_formula_and_warns_of_tenants_off_it(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on = load(
        base,
        '[subids]\nmin = 100000\nmax = 362143\nsource = "deterministic"\n[users]\nmin_uid = 2000\n',
    )
    tenants(on, Limits(), Limits())  # uids 2000 and 2001 at 100000 and 165536: the formula's
    formula = "deterministic: start = 100000 + (uid - 2000) * 65536, uids 2000-2003 fit below"
    assert one(on, "ID ranges", monkeypatch)[1:] == (
        True,
        f"{formula} 362143; no two ranges overlap",
    )
    off = load(
        base,
        '[subids]\nmin = 100000\nmax = 362143\nsource = "deterministic"\n[users]\nmin_uid = 1999\n',
    )
    check = one(off, "ID ranges", monkeypatch)
    assert check.warning
    assert check.detail == (
        "warning: deterministic: start = 100000 + (uid - 1999) * 65536, uids 1999-2002 fit "
        "below 362143; t0's range is 100000-165535, the formula's 165536-231071; t1's range is "
        "165536-231071, the formula's 231072-296607: allocated before source = deterministic, "
        "they keep them (moving them keeps them too)"
    )


def test_subid_names_the_provider_and_needs_getsubids(
    base: Path, path_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(base, '[subids]\nsource = "subid"\n')
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("subid: sss\n")
    monkeypatch.setattr(doctor.rangesource, "NSSWITCH", nsswitch)
    assert one(cfg, "ID ranges", monkeypatch)[1:] == (
        False,
        "subid: from libsubid's 'sss' provider (getsubids), but getsubids is missing: "
        "apt-get install uidmap",
    )
    program(path_dir, "getsubids")
    assert one(cfg, "ID ranges", monkeypatch)[1:] == (
        True,
        "subid: from libsubid's 'sss' provider (getsubids); no two ranges overlap",
    )
