"""hostd.toml and its drop-ins: defaults, override order, and errors that name the file and key."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import get_type_hints

import pytest

from hostd import configfiles
from hostd.config import (
    ApiSettings,
    BackupSettings,
    Config,
    GatewaySettings,
    NetworkSettings,
    Paths,
    RuntimeConfig,
    SessionSettings,
    SubIdConfig,
    UserConfig,
    load,
    read_login_defs,
)
from hostd.errors import HostdError
from hostd.startqueue import auto_slots
from runtime.limits import Limits
from runtime.netplan import NetworkConfig, host_nameservers
from runtime.settings import DEFAULT_RECIPES, RootfsMode, Settings

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "hostd.toml"


def defaults(login_defs: Path = Path("/etc/login.defs")) -> Config:
    return Config(
        paths=Paths(
            state_dir=Path("/var/lib/hostd"),
            run_dir=Path("/run/hostd"),
            admin_socket=Path("/run/hostd/admin.sock"),
            user_socket=Path("/run/hostd/user.sock"),
            subuid=Path("/etc/subuid"),
            subgid=Path("/etc/subgid"),
            login_defs=login_defs,
        ),
        runtime=RuntimeConfig(
            runc="runc",
            cgroup_parent="auto",
            rootfs_mode=RootfsMode.AUTO,
            default_image="default",
            recipes_dir=None,
            cache_dir=Path("/var/cache/hostd/debootstrap"),
            stop_timeout=30.0,
            docker_idle_stop=900,
            parallel_starts=auto_slots(),
        ),
        subids=SubIdConfig(min=100000, max=600100000, count=65536),
        users=UserConfig(admin_group="hostd-admin", min_uid=1000),
        limits=Limits(
            cpus=min(2, os.cpu_count() or 1),
            memory=4 * 1024**3,
            pids=4096,
            disk=20 * 1024**3,
        ),
        home_quota=None,
        network=NetworkSettings(
            bridge="hostd0",
            subnet="10.213.0.0/16",
            nft_table="hostd",
            dns=(),
            privileged_ports=False,
        ),
        gateway=GatewaySettings(
            enabled=True,
            listen=("0.0.0.0", 2222),
            password_auth=False,
            max_failures=10,
            max_auth_tries=6,
            login_grace=20.0,
            max_unauthenticated=64,
            max_unauthenticated_per_source=8,
        ),
        sessions=SessionSettings(max_per_tenant=64),
        api=ApiSettings(
            max_connections=512,
            max_connections_per_user=64,
            workers=256,
            admin_workers=16,
            request_timeout=10.0,
            max_request=64 * 1024,
        ),
        backup=BackupSettings(dir=None, keep=2, full_every=7, with_home=False),
    )


class Files:
    """A main file and its drop-in directory under tmp_path, with a login.defs of the test's own
    (empty unless written), so the machine's /etc/login.defs never leaks into a test."""

    def __init__(self, root: Path) -> None:
        self.main = root / "hostd.toml"
        self.dropins = root / "hostd.toml.d"
        self.login_defs = root / "login.defs"
        self.write_dropin("00-test.toml", f'[paths]\nlogin_defs = "{self.login_defs}"\n')

    def write_main(self, text: str) -> Path:
        self.main.write_text(text)
        return self.main

    def write_dropin(self, name: str, text: str) -> Path:
        self.dropins.mkdir(exist_ok=True)
        (self.dropins / name).write_text(text)
        return self.dropins / name

    def load(self) -> Config:
        return load(self.main)

    def error(self) -> str:
        with pytest.raises(HostdError) as info:
            load(self.main)
        return str(info.value)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def test_missing_files_give_the_defaults(files: Files) -> None:
    assert files.load() == defaults(files.login_defs)


def test_missing_main_file_and_drop_in_directory_give_the_defaults(tmp_path: Path) -> None:
    config = load(tmp_path / "hostd.toml")
    assert config.paths == defaults().paths
    assert config.runtime == defaults().runtime
    assert config.limits == defaults().limits


def test_main_file_values_are_used(files: Files) -> None:
    files.write_main(
        '[paths]\nstate_dir = "/srv/hostd"\n'
        '[runtime]\nrootfs_mode = "copy"\nstop_timeout = 5\nrecipes_dir = "/srv/recipes"\n'
        '[users]\nadmin_group = "wheel"\n'
        '[limits]\ncpus = "0.5"\nmemory = "2G"\npids = 4096\ndisk = 10737418240\n'
    )
    config = files.load()
    assert config.paths.state_dir == Path("/srv/hostd")
    assert config.paths.run_dir == Path("/run/hostd")
    assert config.runtime.rootfs_mode == "copy"
    assert config.runtime.stop_timeout == 5.0
    assert config.runtime.recipes_dir == Path("/srv/recipes")
    assert config.users.admin_group == "wheel"
    assert config.limits == Limits(cpus=0.5, memory=2 * 1024**3, pids=4096, disk=10 * 1024**3)
    assert config.home_quota is None


@pytest.mark.parametrize(
    ("value", "seconds"), [('"5s"', 5), ('"15m"', 900), ('"2h"', 7200), ("60", 60), ('"off"', 0)]
)
def test_docker_idle_stop_reaches_the_runtime_in_seconds(
    files: Files, value: str, seconds: int
) -> None:
    files.write_main(f"[runtime]\ndocker_idle_stop = {value}\n")
    config = files.load()
    assert config.runtime.docker_idle_stop == seconds
    assert config.runtime_settings().docker_idle_stop == seconds


@pytest.mark.parametrize(("value", "slots"), [('"auto"', auto_slots()), ("1", 1), ("16", 16)])
def test_parallel_starts_is_auto_or_a_count(files: Files, value: str, slots: int) -> None:
    files.write_main(f"[runtime]\nparallel_starts = {value}\n")
    assert files.load().runtime.parallel_starts == slots


def test_drop_ins_override_key_by_key_in_name_order(files: Files) -> None:
    files.write_main(
        '[runtime]\nrunc = "/usr/sbin/runc"\nstop_timeout = 10\ncgroup_parent = "main"\n'
        "[limits]\npids = 100\n"
    )
    # Written in reverse order: names decide, not creation time; "9-" sorts after "10-".
    files.write_dropin("9-late.toml", '[runtime]\nrunc = "/opt/runc"\n')
    files.write_dropin("10-early.toml", '[runtime]\nrunc = "/early/runc"\ncgroup_parent = "x"\n')
    files.write_dropin("20-limits.toml", '[limits]\nmemory = "1G"\n')
    files.write_dropin("30-ignored.toml.bak", '[runtime]\nrunc = "/not/this"\n')
    config = files.load()
    assert config.runtime.runc == "/opt/runc"
    assert config.runtime.cgroup_parent == "x"
    assert config.runtime.stop_timeout == 10.0
    assert config.limits.pids == 100
    assert config.limits.memory == 1024**3


def test_every_limit_is_finite_unless_lifted_by_none(files: Files) -> None:
    limits = files.load().limits
    assert None not in (limits.cpus, limits.memory, limits.pids, limits.disk)
    assert files.load().home_quota is None  # the users' own quotas are left alone unless asked
    files.write_main(
        '[limits]\ncpus = "none"\nmemory = "None"\npids = "unlimited"\ndisk = " none "\n'
        'home = "none"\n'
    )
    assert files.load().limits == Limits(cpus=None, memory=None, pids=None, disk=None)
    assert files.load().home_quota is None


def test_home_quota_is_a_size(files: Files) -> None:
    files.write_dropin("50-home.toml", '[limits]\nhome = "10G"\n')
    assert files.load().home_quota == 10 * 1024**3


def test_drop_ins_apply_without_a_main_file(files: Files) -> None:
    files.write_dropin("50-state.toml", '[paths]\nstate_dir = "/srv/hostd"\n')
    assert files.load().paths.state_dir == Path("/srv/hostd")


def test_drop_in_directory_can_be_given(files: Files, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "a.toml").write_text('[runtime]\nrunc = "/elsewhere/runc"\n')
    assert load(files.main, other).runtime.runc == "/elsewhere/runc"


def test_unknown_key_names_the_file_and_key(files: Files) -> None:
    path = files.write_dropin("10-x.toml", '[paths]\nstatedir = "/srv"\n')
    error = files.error()
    assert error.startswith(f"{path}: unknown key [paths] statedir: use one of state_dir, ")
    assert "login_defs" in error and "etc/" not in error  # the keys, not a file to look in


def test_unknown_section_names_the_file_and_section(files: Files) -> None:
    files.write_main('[path]\nstate_dir = "/srv"\n')
    error = files.error()
    assert error.startswith(f"{files.main}: unknown section [path]: use one of [paths], ")
    assert "[limits]" in error


def test_key_outside_a_section_is_refused(files: Files) -> None:
    files.write_main('state_dir = "/srv"\n')
    assert files.error() == (
        f"{files.main}: state_dir is outside any section: put it under its [section] header"
    )


def test_toml_syntax_error_names_the_file(files: Files) -> None:
    files.write_main("[paths\n")
    assert re.fullmatch(
        rf"{re.escape(str(files.main))}: .*line 1.*: fix the TOML syntax", files.error()
    )


def test_bad_value_names_file_key_value_and_fix(files: Files) -> None:
    files.write_main('[runtime]\nrootfs_mode = "fast"\n')
    assert files.error() == (
        f'{files.main}: [runtime] rootfs_mode = "fast" is invalid: use "auto", "idmapped" or "copy"'
    )


@pytest.mark.parametrize(
    ("section", "line", "fix"),
    [
        ("paths", 'state_dir = "var/lib/hostd"', "absolute path"),
        ("paths", 'subuid = ""', "absolute path"),
        ("paths", "run_dir = 5", "absolute path"),
        ("runtime", 'runc = "bin/runc"', "PATH or an absolute path"),
        ("runtime", 'runc = ""', "PATH or an absolute path"),
        ("runtime", 'rootfs_mode = "IDMAPPED"', '"auto", "idmapped" or "copy"'),
        ("runtime", 'cgroup_parent = "a/b"', "no '/'"),
        ("runtime", 'cgroup_parent = "/hostd"', "no '/'"),
        ("runtime", 'cgroup_parent = ".."', "no '..'"),
        ("runtime", 'cgroup_parent = "."', "no '..'"),
        ("runtime", 'cgroup_parent = ""', "no '/'"),
        ("runtime", 'default_image = "../etc"', "letters, digits"),
        ("runtime", 'recipes_dir = "recipes"', "absolute path"),
        ("runtime", "stop_timeout = 0", "positive number of seconds"),
        ("runtime", "stop_timeout = -1.5", "positive number of seconds"),
        ("runtime", "stop_timeout = nan", "positive number of seconds"),
        ("runtime", "stop_timeout = inf", "positive number of seconds"),
        ("runtime", 'stop_timeout = "30"', "positive number of seconds"),
        ("runtime", 'docker_idle_stop = "15 min"', 'like "15m"'),
        ("runtime", "docker_idle_stop = -1", 'like "15m"'),
        ("runtime", "docker_idle_stop = 1.5", 'like "15m"'),
        ("runtime", "docker_idle_stop = true", 'like "15m"'),
        ("runtime", "parallel_starts = 0", '"auto" or a whole number from 1'),
        ("runtime", 'parallel_starts = "8"', '"auto" or a whole number from 1'),
        ("runtime", "parallel_starts = 2.5", '"auto" or a whole number from 1'),
        ("runtime", "parallel_starts = true", '"auto" or a whole number from 1'),
        ("runtime", "parallel_starts = 1025", '"auto" or a whole number from 1'),
        ("subids", "count = 1000", "exactly 65536 IDs"),
        ("subids", "count = 65536.0", "exactly 65536 IDs"),
        ("subids", "min = 1000", "from 65536 to"),
        ("subids", "min = -1", "from 65536 to"),
        ("subids", 'min = "100000"', "from 65536 to"),
        ("subids", "max = 4294967295", "from 65536 to 4294967294"),
        ("subids", 'owner = "Hostd:ids"', "system account name"),
        ("users", "min_uid = 0", "from 1 to"),
        ("users", "min_uid = true", "from 1 to"),
        ("users", 'admin_group = "hostd admins"', "group name"),
        ("limits", 'memory = "10XB"', "positive size like 512M"),
        ("limits", 'memory = "1.5"', "positive size like 512M"),
        ("limits", 'disk = "0"', "positive size like 512M"),
        ("limits", "disk = 0", "positive size like 512M"),
        ("limits", 'disk = "2000000T"', "at most 1048576T"),
        ("limits", "pids = 0", "positive whole number"),
        ("limits", "pids = 1.5", "positive whole number"),
        ("limits", "pids = true", "positive whole number"),
        ("limits", "cpus = 0", "positive number of CPUs"),
        ("limits", "cpus = -1", "positive number of CPUs"),
        ("limits", 'cpus = "lots"', "positive number of CPUs"),
        ("limits", "cpus = [1]", 'string like "2G" or a number'),
        ("limits", 'home = "0"', "positive size like 512M"),
        ("limits", 'home = "nothing"', "positive size like 512M"),
        ("limits", 'memory = "none please"', "positive size like 512M"),
        (
            "limits",
            f"cpus = {(os.cpu_count() or 1) + 1}",
            f"use at most {os.cpu_count() or 1} (its CPU count)",
        ),
    ],
)
def test_bad_values_are_refused(files: Files, section: str, line: str, fix: str) -> None:
    path = files.write_dropin("50-bad.toml", f"[{section}]\n{line}\n")
    message = files.error()
    key, _, _ = line.partition(" = ")
    assert message.startswith(f"{path}: [{section}] {key} = ")
    assert " is invalid: " in message
    assert fix in message.partition(" is invalid: ")[2]


@pytest.mark.parametrize(
    ("lines", "room"),
    [("min = 700000000", False), ("min = 600100000", False), ("min = 600034465", True)],
)
def test_min_needs_room_for_a_range_below_max(files: Files, lines: str, room: bool) -> None:
    files.write_main(f"[subids]\n{lines}\n")
    if room:
        assert files.load().subids.min == 600034465
        return
    value = lines.partition(" = ")[2]
    assert files.error() == (
        f"[subids] min = {value} ({files.main}) and [subids] max = 600100000 (default)"
        " leave no room for 65536 IDs: lower min or raise max"
    )


LOGIN_DEFS = """\
# /etc/login.defs
MAIL_DIR        /var/mail

UID_MIN                  2000
UID_MAX                 60000
#SUB_UID_MIN            999999
SUB_UID_MIN\t\t   200000
SUB_UID_MAX    300000000
ENCRYPT_METHOD SHA512
"""


def test_login_defs_supplies_unset_subids_and_min_uid(files: Files) -> None:
    files.login_defs.write_text(LOGIN_DEFS)
    config = files.load()
    assert config.subids == SubIdConfig(min=200000, max=300000000, count=65536)
    assert config.users.min_uid == 2000


def test_config_file_beats_login_defs(files: Files) -> None:
    files.login_defs.write_text(LOGIN_DEFS)
    files.write_main("[subids]\nmin = 300000\n[users]\nmin_uid = 500\n")
    config = files.load()
    assert config.subids == SubIdConfig(min=300000, max=300000000, count=65536)
    assert config.users.min_uid == 500


@pytest.mark.parametrize("value", ["1000", "lots"])
def test_bad_login_defs_value_names_login_defs(files: Files, value: str) -> None:
    files.login_defs.write_text(f"SUB_UID_MIN {value}\n")
    assert files.error() == (
        f"{files.login_defs}: SUB_UID_MIN {value} is invalid: use a whole number from 65536 to"
        " 4294967294"
    )


def test_read_login_defs(tmp_path: Path) -> None:
    path = tmp_path / "login.defs"
    path.write_text(LOGIN_DEFS + "LONE_KEY\n   \n  # indented comment\n")
    assert read_login_defs(path) == {
        "MAIL_DIR": "/var/mail",
        "UID_MIN": "2000",
        "UID_MAX": "60000",
        "SUB_UID_MIN": "200000",
        "SUB_UID_MAX": "300000000",
        "ENCRYPT_METHOD": "SHA512",
    }
    assert read_login_defs(tmp_path / "missing") == {}


def test_unreadable_file_is_an_error_not_defaults(files: Files) -> None:
    files.main.mkdir()
    assert files.error() == f"cannot read {files.main} (Is a directory): make it a readable file"


def test_shipped_config_loads_to_the_defaults(tmp_path: Path) -> None:
    no_dropins = tmp_path / "none"
    assert load(SHIPPED, no_dropins) == load(tmp_path / "missing.toml", no_dropins)


def test_shipped_config_documents_every_key_with_a_valid_value(tmp_path: Path) -> None:
    """Uncommenting every `# key = value` line gives a loadable file with exactly our keys."""
    lines = SHIPPED.read_text().splitlines()
    uncommented = [re.sub(r"^# (\w+ = )", r"\1", line) for line in lines]
    keys = {
        (section, line.partition(" = ")[0])
        for section, line in _sections(uncommented)
        if not line.startswith("#") and " = " in line
    }
    expected = {
        (section, key.name)
        for section, cls in get_type_hints(Config).items()
        if dataclasses.is_dataclass(cls)
        for key in dataclasses.fields(cls)
    }
    assert keys == expected | {("limits", "home")}  # Config.home_quota
    edited = tmp_path / "hostd.toml"
    edited.write_text("\n".join(uncommented))
    load(edited, tmp_path / "none")


def _sections(lines: list[str]) -> list[tuple[str, str]]:
    section, found = "", []
    for line in lines:
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m[1]
        else:
            found.append((section, line))
    return found


def test_runtime_settings_carry_paths_and_runtime_options(files: Files) -> None:
    files.write_main(
        '[paths]\nstate_dir = "/srv/hostd"\n'
        '[runtime]\nrunc = "/usr/local/bin/runc"\ncgroup_parent = "tenants"\n'
        'rootfs_mode = "copy"\ncache_dir = "/srv/cache"\n'
    )
    assert files.load().runtime_settings() == Settings(
        state_dir=Path("/srv/hostd"),
        runc="/usr/local/bin/runc",
        cgroup_parent="tenants",
        rootfs_mode=RootfsMode.COPY,
        cache_dir=Path("/srv/cache"),
        recipes_dir=DEFAULT_RECIPES,
        lxcfs=Path("/srv/hostd/lxcfs"),
        network=NetworkConfig(dns=host_nameservers()),
    )
    files.write_dropin("50-recipes.toml", '[runtime]\nrecipes_dir = "/srv/recipes"\n')
    assert files.load().runtime_settings().recipes_dir == Path("/srv/recipes")


@pytest.mark.parametrize(
    ("line", "fix"),
    [
        ('bridge = "br0"', 'use "hostd" followed by'),
        ('bridge = "hostd-with-a-long-name"', 'use "hostd" followed by'),
        ('subnet = "8.8.0.0/16"', "private IPv4 network"),
        ('subnet = "10.0.0.0/30"', "private IPv4 network"),
        ('dns = "1.1.1.1"', "use a list"),
        ('dns = ["nope"]', "IP addresses"),
        ('privileged_ports = "yes"', "true or false"),
    ],
)
def test_bad_network_settings(tmp_path: Path, line: str, fix: str) -> None:
    main = tmp_path / "hostd.toml"
    main.write_text(f"[network]\n{line}\n")
    with pytest.raises(HostdError, match=re.escape(fix)):
        load(main)


def test_network_settings(tmp_path: Path) -> None:
    main = tmp_path / "hostd.toml"
    main.write_text('[network]\nbridge = "hostd7"\nsubnet = "10.9.0.0/24"\ndns = ["10.0.0.53"]\n')
    net = load(main).network
    assert (net.bridge, net.subnet, net.dns) == ("hostd7", "10.9.0.0/24", ("10.0.0.53",))


def test_hostctl_finds_the_admin_socket_as_configured(files: Files) -> None:
    main = files.main
    assert configfiles.admin_socket(main) == Path(configfiles.ADMIN_SOCKET)  # no file: default
    files.write_main('[paths]\nadmin_socket = "/srv/a.sock"\n')
    assert configfiles.admin_socket(main) == Path("/srv/a.sock")
    files.write_dropin("50-socket.toml", '[paths]\nadmin_socket = "/srv/b.sock"\n')
    assert configfiles.admin_socket(main) == Path("/srv/b.sock") == files.load().paths.admin_socket
    files.write_dropin("60-bad.toml", '[paths]\nadmin_socket = "relative.sock"\n')
    with pytest.raises(HostdError, match=r"60-bad.toml: \[paths\] admin_socket = .* is invalid"):
        configfiles.admin_socket(main)


def test_backup_settings_parse_and_an_empty_dir_turns_backups_off(files: Files) -> None:
    assert files.load().backup.dir is None
    files.write_main('[backup]\ndir = "/srv/backups"\nkeep = 3\nfull_every = 1\nwith_home = true\n')
    assert files.load().backup == BackupSettings(Path("/srv/backups"), 3, 1, True)


@pytest.mark.parametrize(
    ("line", "fix"),
    [
        ('dir = "backups"', 'use an absolute path (starting with "/")'),
        ("keep = 0", "use a whole number from 1 to 1000"),
        ("full_every = true", "use a whole number from 1 to 1000"),
    ],
)
def test_bad_backup_settings_are_refused(files: Files, line: str, fix: str) -> None:
    files.write_main(f"[backup]\n{line}\n")
    assert files.error().endswith(f" is invalid: {fix}")
