"""hostd's configuration: /etc/hostd/hostd.toml and drop-ins, checked once into frozen dataclasses.

Drop-ins (`hostd.toml.d/*.toml`, by name) override the main file key by key, so packages and
admins can change one setting without editing the main file. A mistake stops the daemon with the
file and key to fix: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hostd import configfiles
from hostd.configfiles import Setting, check_path, read_text, toml_setting
from hostd.errors import HostdError
from hostd.rangesource import SOURCES
from hostd.startqueue import auto_slots
from hostd.units import parse_count, parse_cpus, parse_size
from runtime import cgroups, mountinfo
from runtime.ids import MAX_ID, MIN_START, RANGE_SIZE
from runtime.limits import Limits
from runtime.names import check_name
from runtime.netplan import (
    NetworkConfig,
    check_bridge,
    check_nft_table,
    check_subnet,
    host_nameservers,
)
from runtime.settings import RootfsMode, Settings

ID_OWNER = "hostd-ids"  # the locked system account tenants' ranges are registered under


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    run_dir: Path
    admin_socket: Path
    user_socket: Path
    subuid: Path
    subgid: Path
    login_defs: Path


@dataclass(frozen=True)
class RuntimeConfig:
    runc: str
    cgroup_parent: str
    rootfs_mode: RootfsMode
    default_image: str
    recipes_dir: Path | None  # None: the runtime's own recipes
    cache_dir: Path
    stop_timeout: float  # seconds
    docker_idle_stop: int  # seconds an idle inner Docker runs before it stops; 0: never
    parallel_starts: int  # containers booting at once; the other starts wait in line


@dataclass(frozen=True)
class SubIdConfig:
    """Where users' ID ranges may be allocated: [min, max], `count` IDs each, registered in
    the subuid/subgid files under `owner`, an account no human acts as (never the tenant: then
    newuidmap would let them become their container's root on the host). `source` says how a
    new tenant's range is chosen (hostd.rangesource)."""

    min: int
    max: int
    count: int
    owner: str = ID_OWNER
    source: str = "local"


@dataclass(frozen=True)
class UserConfig:
    admin_group: str
    min_uid: int  # accounts below are system accounts and get no container


@dataclass(frozen=True)
class NetworkSettings:
    bridge: str
    subnet: str  # IPv4 network; the bridge takes its first address
    nft_table: str
    dns: tuple[str, ...]  # nameservers for tenants; empty: the host's (non-loopback) ones
    privileged_ports: bool  # may ports below 1024 be granted?


@dataclass(frozen=True)
class GatewaySettings:
    enabled: bool
    listen: tuple[str, int]  # host, port
    password_auth: bool  # through PAM (service "hostd"); keys only when false
    max_failures: int  # failed attempts per source address per minute before it is refused
    max_auth_tries: int  # names and credentials tried per connection before it is closed
    login_grace: float  # seconds a connection has to log in
    max_unauthenticated: int  # connections not logged in yet, from all sources
    max_unauthenticated_per_source: int  # the same, from one source address


@dataclass(frozen=True)
class SessionSettings:
    max_per_tenant: int  # sessions open at once per tenant (SSH, hostd-login, hostctl exec)
    auto_stop: int = 0  # seconds idle before a tenant's container is stopped; 0: never


@dataclass(frozen=True)
class ApiSettings:
    """Caps on hostd's unix sockets: no local user can exhaust the daemon for the others."""

    max_connections: int  # to each socket, all callers together (waiting or served)
    max_connections_per_user: int  # user socket, one UID (each OpenSSH session holds one)
    workers: int  # threads serving user-socket requests at once (a session holds one)
    admin_workers: int  # threads serving admin-socket requests (a pool of its own; others wait)
    request_timeout: float  # seconds to send the request, and to take each reply line
    max_request: int  # bytes of one request line


@dataclass(frozen=True)
class BackupSettings:
    """Scheduled backups (`hostctl backup run`, hostd-backup.timer): off while dir is None."""

    dir: Path | None  # <dir>/<user>/<time>-<full|incr>.hostd, hostd's own (0700 root)
    keep: int  # full chains kept per tenant
    full_every: int  # a full archive every this many runs; the others incremental
    with_home: bool  # the users' homes too


@dataclass(frozen=True)
class Config:
    paths: Paths
    runtime: RuntimeConfig
    subids: SubIdConfig
    users: UserConfig
    limits: Limits  # defaults for new tenants
    home_quota: int | None  # bytes: [limits] home, the block quota on the users' home fs
    network: NetworkSettings
    gateway: GatewaySettings
    sessions: SessionSettings
    api: ApiSettings
    backup: BackupSettings

    def cgroup_parent(self) -> str:
        """The containers' parent cgroup; "auto": hostd-tenants.service's under systemd."""
        if self.runtime.cgroup_parent != "auto":
            return self.runtime.cgroup_parent
        return cgroups.default_parent(cgroups.detect(mountinfo.current()))

    def runtime_settings(self) -> Settings:
        """The runtime's view: it knows nothing of users, only where and how to run containers."""
        net = self.network
        network = NetworkConfig(
            bridge=net.bridge,
            subnet=net.subnet,
            nft_table=net.nft_table,
            dns=net.dns or host_nameservers(),
        )
        settings = Settings(
            state_dir=self.paths.state_dir,
            runc=self.runtime.runc,
            cgroup_parent=self.cgroup_parent(),
            rootfs_mode=self.runtime.rootfs_mode,
            cache_dir=self.runtime.cache_dir,
            lxcfs=self.paths.state_dir / "lxcfs",
            network=network,
            docker_idle_stop=self.runtime.docker_idle_stop,
        )
        if self.runtime.recipes_dir is not None:
            settings = replace(settings, recipes_dir=self.runtime.recipes_dir)
        return settings


# -- checks: each takes a TOML value, returns what the dataclass holds, or raises ValueError(fix)


def _program(value: Any) -> str:
    """A name looked up in PATH or an absolute path: never relative to the daemon's directory."""
    if not isinstance(value, str) or not re.fullmatch(r"/[^\0]*|[^/\0]+", value):
        raise ValueError("use a program name found in PATH or an absolute path")
    return value


def _cgroup_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,255}", value):
        raise ValueError("use one cgroup name of letters, digits, '_', '.' and '-', no '/'")
    if ".." in value or value == ".":
        raise ValueError("use a cgroup name that is not '.' and has no '..'")
    return value


def _image(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError('use an image name like "default"')
    return check_name(value, "image")


def _group(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", value):
        raise ValueError('use a group name like "hostd-admin"')
    return value


def _account(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise ValueError(f'use a system account name like "{ID_OWNER}"')
    return value


def _seconds(value: Any) -> float:
    if type(value) not in (int, float) or not 0 < value < math.inf:
        raise ValueError("use a positive number of seconds like 30")
    return float(value)


_DURATION = re.compile(r"(\d{1,9})\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> int:
    """Whole seconds from 900 or "15m" ("30s", "2h", "1d"); 0 or "off" turn the feature off."""
    text = str(value).strip().lower() if type(value) in (int, str) else ""
    if text == "off":
        return 0
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError('use a duration like "15m", "30s", "2h", or "off"')
    return int(match[1]) * _UNIT_SECONDS[match[2]]


def format_duration(seconds: int) -> str:
    """`parse_duration`'s text for `seconds`: the largest unit that divides it, or "off"."""
    if seconds <= 0:
        return "off"
    unit = next(u for u in "dhms" if seconds % _UNIT_SECONDS[u] == 0)
    return f"{seconds // _UNIT_SECONDS[unit]}{unit}"


def _parallel_starts(value: Any) -> int:
    """ "auto" (sized to the host's CPUs) or a whole number of containers booting at once."""
    if value == "auto":
        return auto_slots()
    if type(value) is not int or not 1 <= value <= 1024:
        raise ValueError('use "auto" or a whole number from 1 to 1024, like 4')
    return value


def _id(lowest: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or not lowest <= value <= MAX_ID:
            raise ValueError(f"use a whole number from {lowest} to {MAX_ID}")
        return value

    return check


def _count(value: Any) -> int:
    if type(value) is not int or value != RANGE_SIZE:
        raise ValueError(f"every user gets exactly {RANGE_SIZE} IDs: remove the key")
    return RANGE_SIZE


def _source(value: Any) -> str:
    if value not in SOURCES:
        raise ValueError(f"use one of {', '.join(map(repr, SOURCES))}")
    return str(value)


def _text(value: Any) -> str:
    """A number or string limit as text for the unit parsers (which reject "True" and "1e3")."""
    if not isinstance(value, str | int | float):
        raise ValueError('use a string like "2G" or a number')
    return str(value)


def _addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError('use a list like ["192.0.2.53"]')
    try:
        return tuple(str(ipaddress.ip_address(v)) for v in value)
    except ValueError:
        raise ValueError('use a list of IP addresses like ["192.0.2.53"]') from None


def _listen(value: Any) -> tuple[str, int]:
    host, _, port = str(value).rpartition(":")
    try:
        if not isinstance(value, str) or not 0 < int(port) < 65536:
            raise ValueError
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError('use "ADDRESS:PORT" like "0.0.0.0:2222" or "[::]:2222"') from None
    return host.strip("[]"), int(port)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("use true or false")
    return value


def _number(lowest: int, highest: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or not lowest <= value <= highest:
            raise ValueError(f"use a whole number from {lowest} to {highest}")
        return value

    return check


def _backup_dir(value: Any) -> Path | None:
    """An absolute path, or "" to turn backups off."""
    return None if value == "" else check_path(value)


def _request_size(value: Any) -> int:
    size = parse_size(_text(value), "request")
    if not 4096 <= size <= 16 << 20:
        raise ValueError('use a size from "4K" to "16M"')
    return size


def _limit(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    """A limit, or "none" (or "unlimited") to lift it explicitly, as `hostctl quota` takes."""

    def check(value: Any) -> Any:
        text = _text(value)
        return None if text.strip().lower() in ("none", "unlimited") else parse(text)

    return check


# Finite defaults: one tenant must not take the whole host. A tenant idles at ~40 MB with
# dockerd up; 4G runs builds and a few services. 4096 tasks stop a fork bomb long before the
# host's pid_max. Two CPUs (or all of a smaller host) leave the others to the rest. 20G of
# volume holds a base image set and build cache; the volume is a sparse file, so unused
# space costs nothing.
DEFAULT_CPUS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Key:
    default: Any  # as written in TOML; None: unset
    check: Callable[[Any], Any]
    login_defs: str | None = None  # the login.defs setting that overrides the default


_SCHEMA: dict[str, dict[str, _Key]] = {
    "paths": {
        "state_dir": _Key("/var/lib/hostd", check_path),
        "run_dir": _Key("/run/hostd", check_path),
        "admin_socket": _Key(configfiles.ADMIN_SOCKET, check_path),
        "user_socket": _Key("/run/hostd/user.sock", check_path),
        "subuid": _Key("/etc/subuid", check_path),
        "subgid": _Key("/etc/subgid", check_path),
        "login_defs": _Key("/etc/login.defs", check_path),
    },
    "runtime": {
        "runc": _Key("runc", _program),
        "cgroup_parent": _Key("auto", _cgroup_name),
        "rootfs_mode": _Key("auto", RootfsMode.parse),
        "default_image": _Key("default", _image),
        "recipes_dir": _Key(None, check_path),
        "cache_dir": _Key("/var/cache/hostd/debootstrap", check_path),
        "stop_timeout": _Key(30.0, _seconds),
        "docker_idle_stop": _Key("15m", parse_duration),
        "parallel_starts": _Key("auto", _parallel_starts),
    },
    "subids": {
        "min": _Key(100000, _id(MIN_START), "SUB_UID_MIN"),
        "max": _Key(600100000, _id(MIN_START), "SUB_UID_MAX"),
        "count": _Key(RANGE_SIZE, _count),
        "owner": _Key(ID_OWNER, _account),
        "source": _Key("local", _source),
    },
    "users": {
        "admin_group": _Key("hostd-admin", _group),
        "min_uid": _Key(1000, _id(1), "UID_MIN"),
    },
    "network": {
        "bridge": _Key("hostd0", check_bridge),
        "subnet": _Key("10.213.0.0/16", check_subnet),
        "nft_table": _Key("hostd", check_nft_table),
        "dns": _Key([], _addresses),
        "privileged_ports": _Key(False, _bool),
    },
    "gateway": {
        "enabled": _Key(True, _bool),
        "listen": _Key("0.0.0.0:2222", _listen),
        "password_auth": _Key(False, _bool),
        "max_failures": _Key(10, _id(1)),
        "max_auth_tries": _Key(6, _id(1)),
        "login_grace": _Key(20.0, _seconds),
        "max_unauthenticated": _Key(64, _id(1)),
        "max_unauthenticated_per_source": _Key(8, _id(1)),
    },
    "sessions": {
        "max_per_tenant": _Key(64, _id(1)),
        "auto_stop": _Key("off", parse_duration),
    },
    "api": {
        "max_connections": _Key(512, _number(1, 65536)),
        "max_connections_per_user": _Key(64, _number(1, 65536)),
        "workers": _Key(256, _number(1, 4096)),
        "admin_workers": _Key(16, _number(1, 4096)),
        "request_timeout": _Key(10.0, _seconds),
        "max_request": _Key("64K", _request_size),
    },
    "backup": {
        "dir": _Key("", _backup_dir),
        "keep": _Key(2, _number(1, 1000)),
        "full_every": _Key(7, _number(1, 1000)),
        "with_home": _Key(False, _bool),
    },
    "limits": {
        "cpus": _Key(DEFAULT_CPUS, _limit(lambda t: parse_cpus(t, os.cpu_count() or 1))),
        "memory": _Key("4G", _limit(lambda t: parse_size(t, "memory"))),
        "pids": _Key(4096, _limit(lambda t: parse_count(t, "pids"))),
        "disk": _Key("20G", _limit(lambda t: parse_size(t, "disk"))),
        "home": _Key(None, _limit(lambda t: parse_size(t, "home"))),
    },
}


def load(main: Path = configfiles.MAIN, dropin_dir: Path | None = None) -> Config:
    """The configuration from `main` (all defaults if missing) and its drop-ins, checked."""
    given = configfiles.read(main, dropin_dir)
    for section, key in given:
        if section not in _SCHEMA:
            raise HostdError(
                f"{given[section, key].origin}: unknown section [{section}]",
                f"use one of {', '.join(f'[{name}]' for name in _SCHEMA)}",
            )
        if key not in _SCHEMA[section]:
            raise HostdError(
                f"{given[section, key].origin}: unknown key [{section}] {key}",
                f"use one of {', '.join(_SCHEMA[section])}",
            )
    defaults = {
        (section, key): toml_setting(section, key, spec.default, "default")
        for section, keys in _SCHEMA.items()
        for key, spec in keys.items()
    }
    login_defs = given.get(("paths", "login_defs"), defaults["paths", "login_defs"]).check(
        check_path
    )
    settings = defaults | _from_login_defs(login_defs) | given
    values = {
        section: {key: settings[section, key].check(spec.check) for key, spec in keys.items()}
        for section, keys in _SCHEMA.items()
    }
    subids = values["subids"]
    if subids["min"] + subids["count"] - 1 > subids["max"]:
        low, high = settings["subids", "min"], settings["subids", "max"]
        raise HostdError(
            f"{low.text} ({low.origin}) and {high.text} ({high.origin})"
            f" leave no room for {subids['count']} IDs",
            "lower min or raise max",
        )
    return Config(
        paths=Paths(**values["paths"]),
        runtime=RuntimeConfig(**values["runtime"]),
        subids=SubIdConfig(**subids),
        users=UserConfig(**values["users"]),
        limits=Limits(**{k: v for k, v in values["limits"].items() if k != "home"}),
        home_quota=values["limits"]["home"],
        network=NetworkSettings(**values["network"]),
        gateway=GatewaySettings(**values["gateway"]),
        sessions=SessionSettings(**values["sessions"]),
        api=ApiSettings(**values["api"]),
        backup=BackupSettings(**values["backup"]),
    )


def _from_login_defs(path: Path) -> dict[tuple[str, str], Setting]:
    """Settings whose default /etc/login.defs overrides, so hostd agrees with useradd."""
    defs = read_login_defs(path)
    found = {}
    for section, keys in _SCHEMA.items():
        for key, spec in keys.items():
            if spec.login_defs is not None and spec.login_defs in defs:
                text = defs[spec.login_defs]
                value = int(text) if re.fullmatch(r"[0-9]{1,10}", text) else text
                found[section, key] = Setting(value, str(path), f"{spec.login_defs} {text}")
    return found


def read_login_defs(path: Path) -> dict[str, str]:
    """`KEY VALUE` lines of /etc/login.defs (none if it is missing), for its ID ranges."""
    text = read_text(path) or ""
    defs = {}
    for line in text.splitlines():
        fields = line.split(None, 1)
        if len(fields) == 2 and not fields[0].startswith("#"):
            defs[fields[0]] = fields[1].strip()
    return defs
