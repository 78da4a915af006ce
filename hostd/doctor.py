"""`hostctl doctor`: can this host run hostd? One line per check: ok, or what to do."""

from __future__ import annotations

import os
import platform
import pwd
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from hostd import hostlimits, rangesource
from hostd.config import Config
from hostd.hostlimits import TenantLoad
from hostd.ranges import Claim, first_overlap
from hostd.subids import SubIdFiles, owner_problem
from runtime import cgroups, mountinfo, proc, seccomp, syscalls, sysctl, volume
from runtime.ids import RANGE_SIZE, IdRange
from runtime.limits import Limits
from runtime.records import Records
from runtime.storage import prepare_state_dir
from runtime.userns import user_namespace

FILESYSTEMS = Path("/proc/filesystems")
APPARMOR = Path("/sys/module/apparmor/parameters/enabled")
MEMINFO = Path("/proc/meminfo")
LOADAVG = Path("/proc/loadavg")
KEY_USERS = Path("/proc/key-users")


WARNING = "warning: "  # a passing check's detail that wants a look starts so (WARN)


class Check(NamedTuple):
    name: str
    ok: bool
    detail: str

    @property
    def warning(self) -> bool:
        """It works, but an admin should know (shown as WARN; doctor still passes)."""
        return self.ok and self.detail.startswith(WARNING)


def _kernel(_: Config) -> tuple[bool, str]:
    release = platform.release()
    major, minor = (int(x) for x in release.split(".")[:2])
    if (major, minor) >= (5, 19):
        return True, release
    return False, f'{release}: ID-mapped overlay layers need >= 5.19 (or rootfs_mode = "copy")'


def _userns(_: Config) -> tuple[bool, str]:
    path = sysctl.ROOT / "user/max_user_namespaces"
    if not path.exists():
        return False, "no user namespaces: use a kernel with CONFIG_USER_NS=y"
    n = int(path.read_text())
    return (
        n > 0,
        f"max_user_namespaces = {n}"
        if n > 0
        else "disabled: sysctl -w user.max_user_namespaces=15000",
    )


def _state_dir(cfg: Config) -> tuple[bool, str]:
    prepare_state_dir(cfg.paths.state_dir)  # a RuntimeFailure says what to do
    return True, f"{cfg.paths.state_dir}: the containers may pass through to their files"


def _idmapped_owner(src: Path, dst: Path, ids: IdRange) -> int:
    """Owner of root's `src` seen through an ID-mapped bind mount of it at `dst` (the kernel
    may refuse: OSError)."""
    with user_namespace(ids.map_line(), ids.map_line()) as fd:
        syscalls.idmapped_bind(str(src), str(dst), fd)
    try:
        return os.stat(dst).st_uid
    finally:
        syscalls.umount(str(dst))


def _idmap(cfg: Config) -> tuple[bool, str]:
    base = cfg.paths.state_dir
    prepare_state_dir(base)
    ids = IdRange(cfg.subids.min)
    with tempfile.TemporaryDirectory(dir=base, prefix=".doctor-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        dst.mkdir()
        try:
            owner = _idmapped_owner(src, dst, ids)
        except OSError as exc:
            return False, (
                f"refused on {base} ({exc.strerror}): containers will use a "
                'shifted copy (rootfs_mode = "copy")'
            )
    if owner != ids.start:
        return False, (
            f"on {base} a mapped root's file shows owner {owner}, not {ids.start}: containers "
            'would see wrong owners; set rootfs_mode = "copy"'
        )
    return True, f"supported on {base}"


def _overlay(_: Config) -> tuple[bool, str]:
    found = "overlay" in FILESYSTEMS.read_text().split()
    return found, "available" if found else "missing: modprobe overlay"


def _cgroups(_: Config) -> tuple[bool, str]:
    layout = cgroups.detect(mountinfo.current())
    if layout.version == 2:
        return True, "v2 (unified)"
    if not layout.hierarchies:
        return False, "no cgroup file system mounted: mount cgroup2 on /sys/fs/cgroup"
    names = ",".join(c for h in layout.hierarchies for c in h.controllers)
    hybrid = any("unified" in h.controllers for h in layout.hierarchies)
    return True, f"v1{' hybrid' if hybrid else ''} ({names})"


def _tenant_cgroups(cfg: Config) -> tuple[bool, str]:
    """Where the tenants' cgroups go; under systemd, below hostd-tenants.service, which halts
    them at a shutdown (elsewhere systemd would kill them)."""
    parent = cfg.cgroup_parent()
    if parent == cgroups.SYSTEMD_PARENT:
        return True, f"{parent} (systemd: halted cleanly at shutdown)"
    if cfg.runtime.cgroup_parent == "auto" and cgroups.systemd_runs():
        return False, (
            f"{parent}, outside systemd's units: a shutdown kills the tenants: systemctl enable"
            " --now hostd-tenants.service, then restart hostd and the tenants"
        )
    return True, parent


def _runc(cfg: Config) -> tuple[bool, str]:
    path = shutil.which(cfg.runtime.runc)
    if path is None:
        return False, "not found: apt-get install runc"
    first = proc.run([path, "--version"], check=False).stdout.splitlines()[:1]
    return True, first[0] if first else path


def _subids(cfg: Config) -> tuple[bool, str]:
    files = SubIdFiles(cfg.paths.subuid, cfg.paths.subgid)
    uids, gids = files.read()
    return True, (
        f"{cfg.paths.subuid}: {len(uids)} ranges, {cfg.paths.subgid}: {len(gids)}; "
        f"hostd allocates in {cfg.subids.min}-{cfg.subids.max}"
    )


def _owner(cfg: Config) -> tuple[bool, str]:
    name = cfg.subids.owner
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return True, f"{name} does not exist yet: hostd creates it (a locked system account)"
    problem = owner_problem(pw, cfg.users.min_uid)
    if problem is not None:
        return False, (
            f"{name} {problem}: lock it (`usermod -L -s /usr/sbin/nologin {name}`), "
            "else it can map every tenant's IDs"
        )
    uids, gids = SubIdFiles(cfg.paths.subuid, cfg.paths.subgid).read()
    for entries in (uids, gids):
        mine = [e for e in entries if e.owner == name]
        for other in entries:
            clash = next((m for m in mine if other.owner != name and other.overlaps(m)), None)
            if clash is not None:
                return False, (
                    f"{other.owner}'s range {other.start}-{other.end} overlaps "
                    f"tenants' IDs {clash.start}-{clash.end}: {other.owner} can map "
                    "them with newuidmap; remove that entry"
                )
    return True, (
        f"{name} (locked, no login) owns {sum(e.owner == name for e in uids)} ranges: "
        "tenants cannot newuidmap into their container's IDs"
    )


def _id_ranges(cfg: Config) -> tuple[bool, str]:
    """Where new ranges come from, and that no two ranges overlap across the files and the
    state; for deterministic, which tenants' ranges are not the formula's."""
    lo, hi, min_uid = cfg.subids.min, cfg.subids.max, cfg.users.min_uid
    source = {
        "local": f"local: the first free range in {lo}-{hi}",
        "deterministic": f"deterministic: {rangesource.formula(min_uid, lo)}, "
        f"uids {min_uid}-{rangesource.last_uid(min_uid, lo, hi)} fit below {hi}",
        "subid": f"subid: from libsubid's {rangesource.provider()!r} provider (getsubids)",
    }[cfg.subids.source]
    if cfg.subids.source == "subid" and shutil.which("getsubids") is None:
        return False, f"{source}, but getsubids is missing: apt-get install uidmap"
    clash = first_overlap(_range_claims(cfg))
    if clash is not None:
        return False, (
            f"{clash[0].label} overlaps {clash[1].label}: remove or move one (a tenant's "
            "range is hers: change the other)"
        )
    off = _off_formula(cfg) if cfg.subids.source == "deterministic" else []
    if off:
        return True, (
            f"{WARNING}{source}; {'; '.join(off)}: allocated before source = deterministic, "
            "they keep them (moving them keeps them too)"
        )
    return True, f"{source}; no two ranges overlap"


def _range_claims(cfg: Config) -> list[Claim]:
    """Every range the state records and every entry of subuid and subgid, each with whose
    it is: a tenant's range and hostd's entry for it (or, for source = subid, the user's own
    entry the directory grants) are one claim, not an overlap."""
    records = _state_rows(cfg, "SELECT start, user, status FROM ranges") or []
    user_at = {start: user for start, user, _ in records}
    claims = [
        Claim(start, start + RANGE_SIZE - 1, user, f"{user}'s range {IdRange(start)} ({status})")
        for start, user, status in records
    ]
    uids, gids = SubIdFiles(cfg.paths.subuid, cfg.paths.subgid).read()
    for path, entries in ((cfg.paths.subuid, uids), (cfg.paths.subgid, gids)):
        for e in entries:
            if e.count <= 0:
                continue
            holder = f"entry of {_account_name(e.owner)}"
            exact = e.count == RANGE_SIZE and e.start in user_at
            if exact and e.owner == cfg.subids.owner:
                holder = user_at[e.start]
            elif exact and cfg.subids.source == "subid":
                holder = _account_name(e.owner)
            label = f"{e.owner}'s entry {e.owner}:{e.start}:{e.count} in {path}"
            claims.append(Claim(e.start, e.end, holder, label))
    return claims


def _account_name(owner: str) -> str:
    """A subuid owner as a user name (an entry may name the uid)."""
    if owner.isdigit():
        try:
            return pwd.getpwuid(int(owner)).pw_name
        except KeyError:
            pass
    return owner


def _off_formula(cfg: Config) -> list[str]:
    """Tenants whose range is not the deterministic formula's, one phrase each."""
    rows = _state_rows(cfg, "SELECT user, uid, range_start FROM tenants ORDER BY user") or []
    off = []
    for user, uid, start in rows:
        want = cfg.subids.min + (uid - cfg.users.min_uid) * RANGE_SIZE
        if start != want:
            off.append(
                f"{user}'s range is {IdRange(start)}, the formula's {want}-{want + RANGE_SIZE - 1}"
            )
    return off


def _nft(_: Config) -> tuple[bool, str]:
    path = shutil.which("nft")
    if path is None:
        return False, "not found: apt-get install nftables"
    return True, proc.run([path, "--version"], check=False).stdout.strip()


def _dns(cfg: Config) -> tuple[bool, str]:
    network = cfg.runtime_settings().network
    assert network is not None  # hostd always configures one
    if not network.dns:
        return False, (
            "the host has no nameserver a tenant can reach (loopback only): set "
            '[network] dns = ["<resolver address>"]'
        )
    origin = "configured" if cfg.network.dns else "the host's"
    return True, f"tenants use {', '.join(network.dns)} ({origin})"


def _disk(_: Config) -> tuple[bool, str]:
    missing = [p for p in ("mkfs.ext4", "resize2fs", "losetup") if shutil.which(p) is None]
    if missing:
        return False, f"{', '.join(missing)} missing: apt-get install e2fsprogs util-linux"
    growth = (
        "raised live"
        if volume.can_grow_live()
        else "raised at next start (no CAP_SYS_RESOURCE for online resize)"
    )
    return True, f"per-tenant ext4 image on a loop device; quotas are {growth}"


def _lxcfs(_: Config) -> tuple[bool, str]:
    if shutil.which("lxcfs") is None:
        return False, "not found: apt-get install lxcfs fuse3 (else /proc shows the host's)"
    return True, proc.run(["lxcfs", "--version"], check=False).stdout.strip() or "installed"


def _seccomp(cfg: Config) -> tuple[bool, str]:
    actions = sysctl.ROOT / "kernel/seccomp/actions_avail"
    if not actions.exists() or "errno" not in actions.read_text().split():
        return False, "the kernel has no seccomp filters: use one with CONFIG_SECCOMP_FILTER=y"
    runc = shutil.which(cfg.runtime.runc)
    if runc is None or "libseccomp" not in proc.run([runc, "--version"], check=False).stdout:
        return False, "runc is built without libseccomp: install Debian's runc"
    return True, f"default profile ({len(seccomp.denied())} syscalls denied)"


def _apparmor(_: Config) -> tuple[bool, str]:
    if not APPARMOR.exists() or APPARMOR.read_text().strip() != "Y":
        return True, "not enabled on this kernel"
    return True, "enabled; tenants get no AppArmor profile (seccomp and their user namespace)"


def _inotify(_: Config) -> tuple[bool, str]:
    return True, hostlimits.settings_report()  # hostd raises what is too low itself


def _home_quota(cfg: Config) -> tuple[bool, str]:
    """Homes are outside the tenants' volumes: say whether `[limits] home` can cap them."""
    support = hostlimits.home_quota("/home")
    if support.enforced and shutil.which("setquota") is None:
        return False, f"{support.describe()}, but setquota is missing: apt-get install quota"
    if not support.enforced and cfg.home_quota is not None:
        return False, (
            f"{support.describe()}: mount {support.mount.target} with usrquota, or drop "
            "[limits] home"
        )
    return True, support.describe()


# -- headroom: the tenants' quotas (hostd's state, read-only) against the host ---------------


def _state_rows(cfg: Config, sql: str) -> list[tuple[Any, ...]] | None:
    """Rows of a query on hostd's state, opened read-only; None when hostd never ran."""
    path = cfg.paths.state_dir / "hostd.db"
    if not path.exists():
        return None
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _usage(layout: cgroups.Layout, cfg: Config, user: str) -> cgroups.Usage | None:
    """What a tenant's cgroup holds now; None when it is not running."""
    try:
        return cgroups.usage(layout, cfg.cgroup_parent(), user)
    except (OSError, KeyError):  # no cgroup: not running
        return None


def _volume(cfg: Config, user: str) -> int:
    """Bytes of host disk a tenant's sparse volume takes (0 without one)."""
    try:
        return os.stat(Records(cfg.paths.state_dir).dir(user) / "data.img").st_blocks * 512
    except FileNotFoundError:
        return 0


def _tenants(cfg: Config) -> list[TenantLoad] | None:
    rows = _state_rows(
        cfg,
        "SELECT t.user, t.range_start, q.cpus, q.memory, q.pids, q.disk"
        " FROM tenants t LEFT JOIN quotas q ON q.user = t.user ORDER BY t.user",
    )
    if rows is None:
        return None
    layout = cgroups.detect(mountinfo.current())
    found = []
    for user, start, *quota in rows:
        used = _usage(layout, cfg, user)
        memory, pids = (used.memory, used.pids) if used else (None, None)
        found.append(TenantLoad(user, start, Limits(*quota), memory, pids, _volume(cfg, user)))
    return found


def _memory() -> tuple[int, int]:
    """Total and available memory in bytes."""
    lines = (line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line)
    kib = {key: int(value.split()[0]) for key, value in lines}
    return kib["MemTotal"] * 1024, kib["MemAvailable"] * 1024


def _memory_headroom(cfg: Config) -> tuple[bool, str]:
    total, available = _memory()
    return hostlimits.memory_headroom(total, available, _tenants(cfg))


def _space(path: Path) -> tuple[int, int]:
    """Size and free bytes of the file system holding `path` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _disk_headroom(cfg: Config) -> tuple[bool, str]:
    size, free = _space(cfg.paths.state_dir)
    return hostlimits.disk_headroom(
        str(cfg.paths.state_dir), size, free, _tenants(cfg), cfg.limits.disk
    )


def _pid_headroom(cfg: Config) -> tuple[bool, str]:
    tasks = int(LOADAVG.read_text().split()[3].split("/")[1])  # all threads on the host
    return hostlimits.pid_headroom(
        int(sysctl.read("kernel/pid_max")),
        int(sysctl.read("kernel/threads-max")),
        tasks,
        _tenants(cfg),
        cfg.limits.pids,
    )


def _keys_headroom(cfg: Config) -> tuple[bool, str]:
    users = hostlimits.parse_key_users(KEY_USERS.read_text())
    return hostlimits.keys_headroom(
        int(sysctl.read("kernel/keys/maxkeys")),
        int(sysctl.read("kernel/keys/maxbytes")),
        users,
        _tenants(cfg),
    )


def _subid_headroom(cfg: Config) -> tuple[bool, str]:
    uids, gids = SubIdFiles(cfg.paths.subuid, cfg.paths.subgid).read()
    recorded = _state_rows(cfg, "SELECT start, status FROM ranges") or []
    taken = [(e.start, e.end) for e in (*uids, *gids) if e.count > 0]
    taken += [(start, start + RANGE_SIZE - 1) for start, _ in recorded]
    quarantined = sum(status == "quarantined" for _, status in recorded)
    return hostlimits.subid_headroom(taken, cfg.subids.min, cfg.subids.max, RANGE_SIZE, quarantined)


CHECKS: tuple[tuple[str, Callable[[Config], tuple[bool, str]]], ...] = (
    ("kernel", _kernel),
    ("user namespaces", _userns),
    ("state dir", _state_dir),
    ("ID-mapped mounts", _idmap),
    ("overlay", _overlay),
    ("cgroups", _cgroups),
    ("tenant cgroups", _tenant_cgroups),
    ("runc", _runc),
    ("subuid files", _subids),
    ("ID range owner", _owner),
    ("ID ranges", _id_ranges),
    ("nftables", _nft),
    ("tenant DNS", _dns),
    ("disk quota", _disk),
    ("lxcfs", _lxcfs),
    ("seccomp", _seccomp),
    ("apparmor", _apparmor),
    ("inotify", _inotify),
    ("home quotas", _home_quota),
    ("memory headroom", _memory_headroom),
    ("disk headroom", _disk_headroom),
    ("task headroom", _pid_headroom),
    ("kernel keys", _keys_headroom),
    ("subuid space", _subid_headroom),
)


def run(cfg: Config) -> list[Check]:
    results = []
    for name, check in CHECKS:
        try:
            ok, detail = check(cfg)
        except Exception as exc:  # a broken check is a finding, not a crash
            ok, detail = False, f"check failed: {exc}"
        results.append(Check(name, ok, detail))
    return results
