"""The Debian package, built from this tree once per session (packaging/build-deb.sh), checked
without installing it on this host (the suite's other tests use the checkout's venv): lintian,
its fields, files, conffiles and maintainer scripts; its private venv imported from the
extracted tree; postrm's remove and purge run for real against a scratch /var/lib, /var/cache,
/run and /etc in a mount namespace of their own. The install itself, under a real
systemd, is tests/vm's business."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SITE = "usr/lib/hostd/venv/lib/python3.11/site-packages"
COMMANDS = {  # path in the package -> the module whose main() it runs
    "usr/sbin/hostd": "hostd.daemon",
    "usr/bin/hostctl": "hostd.hostctl",
    "usr/sbin/hostd-runtime": "runtime.cli",
}
THIRD_PARTY = ("asyncssh", "cryptography", "pam", "pyroute2", "systemd", "cffi", "_cffi_backend")


def run(
    *argv: str | Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], check=check, capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("dpkg-buildpackage", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: run packaging/install-deps.sh")
    out = tmp_path_factory.mktemp("deb")
    build = run("bash", ROOT / "packaging/build-deb.sh", out, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = out.glob(f"hostd_{VERSION}_*.deb")
    return path


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    run("dpkg-deb", "-x", deb, root)
    return root


@pytest.fixture(scope="module")
def control(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("control")
    run("dpkg-deb", "-e", deb, d)
    return d


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", deb, name).stdout.strip()


def test_lintian_has_no_errors_nor_warnings(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian missing: run packaging/install-deps.sh")
    r = run("lintian", "--fail-on", "error,warning", deb, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fields_name_the_version_and_debian_dependencies(deb: Path) -> None:
    assert field(deb, "Package") == "hostd"
    assert field(deb, "Version") == VERSION
    assert field(deb, "Architecture") == run("dpkg", "--print-architecture").stdout.strip()
    depends = {d.split()[0] for d in field(deb, "Depends").split(", ")}
    for package in ("runc", "uidmap", "lxcfs", "debootstrap", "nftables", "iproute2", "zstd"):
        assert package in depends
    # Debian's where it is recent enough; asyncssh (2.10 in Debian 12) is in the venv
    assert {"python3-pyroute2", "python3-systemd", "python3"} <= depends
    assert "python3-asyncssh" not in depends


def test_files_and_conffiles(deb: Path, tree: Path, control: Path) -> None:
    assert set((control / "conffiles").read_text().split()) == {
        "/etc/hostd/hostd.toml",
        "/etc/pam.d/hostd",
    }
    assert (tree / "etc/hostd/hostd.toml").read_text() == (ROOT / "etc/hostd.toml").read_text()
    assert (tree / "etc/pam.d/hostd").read_text() == (ROOT / "etc/pam.d/hostd").read_text()
    sysctl = tree / "usr/lib/sysctl.d/60-hostd.conf"
    assert sysctl.read_text() == (ROOT / "packaging/sysctl.d/60-hostd.conf").read_text()
    # the units of packaging/systemd, running the package's hostd
    units = {u.name for u in (ROOT / "packaging/systemd").iterdir()}
    assert units == {
        "hostd.service",
        "hostd-tenants.service",
        "hostd-lxcfs.service",
        "hostd-backup.service",
        "hostd-backup.timer",
    }
    assert {u.name for u in (tree / "lib/systemd/system").iterdir()} == units
    for name in units:
        unit = (tree / "lib/systemd/system" / name).read_text()
        assert unit == (ROOT / "packaging/systemd" / name).read_text()
    unit = (tree / "lib/systemd/system/hostd.service").read_text()
    assert "\nExecStart=/usr/sbin/hostd " in unit
    # the sshd snippet is shipped, not enabled
    assert not (tree / "etc/ssh").exists()
    snippet = (tree / "usr/share/hostd/sshd_config.d/hostd.conf").read_text()
    assert "ForceCommand /usr/bin/hostd-login\n" in snippet
    for page in ("man8/hostctl.8.gz", "man8/hostd.8.gz", "man5/hostd.toml.5.gz"):
        assert (tree / "usr/share/man" / page).stat().st_size > 500
    listing = run("dpkg-deb", "-c", deb).stdout
    assert "__pycache__" not in listing and ".pyc" not in listing  # postinst compiles them
    assert f"{SITE}/runtime/recipes/default/recipe.toml" in listing


def test_nothing_names_the_build_directory(tree: Path) -> None:
    hits = run("grep", "-rIl", "/tmp/hostd-deb.", tree, check=False).stdout
    assert hits == ""


def test_commands_run_the_venv_in_isolated_mode(tree: Path) -> None:
    python = tree / "usr/lib/hostd/venv/bin/python3"
    assert os.path.normpath(python.parent / os.readlink(python)) == str(tree / "usr/bin/python3")
    for path, module in COMMANDS.items():
        text = (tree / path).read_text()
        assert text.startswith("#!/bin/sh\nexec /usr/lib/hostd/venv/bin/python3 -I -c ")
        assert f"from {module} import main" in text
        assert os.access(tree / path, os.X_OK)


def test_venv_modules_import_and_hostctl_knows_its_version(tree: Path) -> None:
    """Every module of hostd from the extracted venv (Debian's python3 and its pyroute2 and
    systemd, the venv's asyncssh, cryptography, pam and the compiled runtime._syscalls)."""
    code = (
        "import importlib, pkgutil, sys, hostd, runtime, runtime._syscalls, asyncssh, pam\n"
        "for pkg in (hostd, runtime):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(hostd.__file__, runtime._syscalls.__file__, asyncssh.__file__)\n"
        "sys.argv = ['hostctl', '--version']\n"
        "from hostd.hostctl import main\n"
        "sys.exit(main())\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree / SITE)}
    r = run("/usr/bin/python3", "-P", "-c", code, env=env, check=False)
    assert r.returncode == 0, r.stderr
    paths, version = r.stdout.splitlines()[0], r.stdout.splitlines()[-1]
    assert all(p.startswith(str(tree / SITE)) for p in paths.split()), paths
    assert VERSION in version


def test_hostd_login_imports_only_the_standard_library(tree: Path) -> None:
    """Ordinary users run it with the system python3 (sshd's ForceCommand): from the package's
    /usr/lib/hostd/{hostd,runtime}, none of the venv's third-party modules."""
    launcher = (tree / "usr/bin/hostd-login").read_text()
    assert launcher.startswith("#!/usr/bin/python3 -I\n")
    lib = tree / "usr/lib/hostd"
    code = (
        f"import sys; sys.path.insert(0, {str(lib)!r}); import hostd.login\n"
        "print(hostd.login.__file__)\n"
        f"print(' '.join(m for m in sys.modules if m.split('.')[0] in {THIRD_PARTY!r}))\n"
    )
    r = run("/usr/bin/python3", "-I", "-c", code)
    where, third_party = r.stdout.split("\n")[:2]
    assert Path(where).resolve().is_relative_to((tree / SITE).resolve())
    assert third_party == ""


def test_maintainer_scripts(control: Path) -> None:
    postinst = (control / "postinst").read_text()
    for group in ("hostd-admin", "hostd-users"):
        assert group in postinst
    assert "addgroup --quiet --system" in postinst
    # debhelper's: enabled always, started only where systemd runs
    assert "deb-systemd-helper" in postinst and "-d /run/systemd/system" in postinst
    # an upgrade restarts hostd; it never restarts (so halts) the tenants' unit nor lxcfs
    assert "deb-systemd-invoke $_dh_action 'hostd.service'" in postinst
    assert "deb-systemd-invoke start 'hostd-lxcfs.service' 'hostd-tenants.service'" in postinst
    # the backup timer ships disabled (enabled again on upgrade only if an admin enabled it)
    assert "if deb-systemd-helper debian-installed 'hostd-backup.timer'" in postinst
    invoked = [line for line in postinst.splitlines() if "deb-systemd-invoke" in line]
    assert not [line for line in invoked if "hostd-backup" in line]
    prerm = (control / "prerm").read_text()
    stops = [line for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
    assert len(stops) == 2 and all(
        '[ "$1" = remove ]' in prerm.split(line)[0].splitlines()[-1] for line in stops
    )
    assert "compileall" in postinst
    for script in ("postinst", "prerm", "postrm"):
        assert run("sh", "-n", control / script, check=False).returncode == 0


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Stand-ins for the host paths postrm touches; a tenant, a kept range, another user's."""
    for d in ("var-lib/hostd/containers/alice", "var-cache/hostd/debootstrap", "run/hostd"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "var-lib/hostd/hostd.db").write_text("")
    (tmp_path / "etc").mkdir()
    for name in ("subuid", "subgid"):
        (tmp_path / "etc" / name).write_text("bob:100000:65536\nhostd-ids:1879048192:65536\n")
    yield tmp_path


def postrm(control: Path, scratch: Path, action: str) -> subprocess.CompletedProcess[str]:
    """postrm ACTION in a mount namespace whose /var/lib, /var/cache, /run and /etc are the
    scratch ones (sed -i replaces /etc/subuid; debhelper's part masks the unit in /etc): it
    acts for real, on nothing of this host's."""
    binds = [("var-lib", "/var/lib"), ("var-cache", "/var/cache"), ("run", "/run"), ("etc", "/etc")]
    mounts = " && ".join(f"mount --bind {scratch / a} {b}" for a, b in binds)
    # mounts of a real hostd of this host under /var/lib/hostd: not in this namespace's way
    hide = "grep -o ' /var/lib/hostd/[^ ]*' /proc/mounts | xargs -r -n1 umount -l"
    script = f"{hide}; {mounts} && exec sh {control / 'postrm'} {action}"
    return run("unshare", "--mount", "--propagation", "private", "sh", "-c", script, check=False)


def test_remove_keeps_tenants_data_and_ranges(control: Path, scratch: Path) -> None:
    r = postrm(control, scratch, "remove")
    assert r.returncode == 0, r.stderr
    assert (scratch / "var-lib/hostd/containers/alice").is_dir()
    assert "hostd-ids:" in (scratch / "etc/subuid").read_text()


def test_purge_refuses_while_a_tenant_is_left(control: Path, scratch: Path) -> None:
    r = postrm(control, scratch, "purge")
    assert r.returncode != 0
    assert "hostctl user remove" in r.stderr and "alice" in r.stderr
    assert (scratch / "var-lib/hostd/hostd.db").exists()
    assert (scratch / "var-cache/hostd/debootstrap").is_dir()
    assert "hostd-ids:" in (scratch / "etc/subgid").read_text()


def test_purge_without_tenants_removes_hostds_own_and_says_so(control: Path, scratch: Path) -> None:
    (scratch / "var-lib/hostd/containers/alice").rmdir()
    r = postrm(control, scratch, "purge")
    assert r.returncode == 0, r.stderr
    assert not (scratch / "var-lib/hostd").exists()
    assert not (scratch / "var-cache/hostd").exists()
    assert not (scratch / "run/hostd").exists()
    for name in ("subuid", "subgid"):
        assert (scratch / "etc" / name).read_text() == "bob:100000:65536\n"  # others' lines stay
        assert f"removed the ID ranges of hostd-ids from /etc/{name}" in r.stdout
    assert "removed /var/lib/hostd" in r.stdout
