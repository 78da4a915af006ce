"""hostd into the VM: the checkout's code, Python dependencies Debian lacks as wheels (the VM
has no network: they are downloaded here and installed offline there), the configuration and
the systemd unit. `install_hostd` is the one step to swap for `apt-get install ./hostd_*.deb`
once the package exists; the staging disk then carries the .deb instead.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.vm.machine import CACHE, Machine, cache_locked

CHECKOUT = Path(__file__).resolve().parents[2]
LABEL = "hostd-install"  # the staging disk's label
MOUNT = "/mnt/hostd-install"
PREFIX = "/opt/hostd"  # the venv (Debian's Python packages visible) and the code
# Requirements Debian 12 satisfies (its package in the VM recipe); the others come as wheels.
FROM_DEBIAN = {"cffi": "python3-cffi", "systemd-python": "python3-systemd",
               "pyroute2": "python3-pyroute2"}  # fmt: skip


def _project() -> dict[str, object]:
    with open(CHECKOUT / "pyproject.toml", "rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def requirements() -> list[str]:
    """hostd's requirements that Debian's packages do not meet."""
    deps = _project()["dependencies"]
    assert isinstance(deps, list)
    return [d for d in deps if not any(d.startswith(name) for name in FROM_DEBIAN)]


def wheels() -> Path:
    """The wheels of `requirements()` and their dependencies, downloaded once per set."""
    reqs = requirements()
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:16]
    final = CACHE / f"wheels-{key}"
    with cache_locked():
        if final.is_dir():
            return final
        work = CACHE / f".wheels-{key}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
             "--python-version", "3.11", "-d", str(work), *reqs],
            check=True, timeout=600,
        )  # fmt: skip
        work.rename(final)
        return final


def stage(dest: Path) -> None:
    """What `install_hostd` installs, laid out in `dest` for the staging disk."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("hostd", "runtime"):  # runtime/ with its compiled _syscalls.abi3.so
        shutil.copytree(CHECKOUT / package, dest / "src" / package, ignore=ignore)
    shutil.copytree(CHECKOUT / "etc", dest / "etc")
    shutil.copytree(CHECKOUT / "packaging", dest / "packaging")
    shutil.copytree(wheels(), dest / "wheels")
    (dest / "tests").mkdir()  # the harness's look at what the host holds (host_view)
    for name in ("__init__.py", "hostd_harness.py"):
        shutil.copy(CHECKOUT / "tests" / name, dest / "tests" / name)
    (dest / "requirements.txt").write_text("\n".join(requirements()) + "\n")
    scripts = _project()["scripts"]
    assert isinstance(scripts, dict)
    (dest / "bin").mkdir()
    for tool, target in scripts.items():
        module, func = target.split(":")
        script = dest / "bin" / tool
        script.write_text(
            f"#!{PREFIX}/venv/bin/python\nimport sys\nfrom {module} import {func}\n"
            f"sys.exit({func}())\n"
        )
        script.chmod(0o755)


INSTALL = f"""set -eu
mkdir -p {MOUNT}
mountpoint -q {MOUNT} || mount -o ro LABEL={LABEL} {MOUNT}
cd {MOUNT}
# pip run from Debian's wheel of it (python3-pip-whl): a venv with its own pip (ensurepip)
# costs a minute more under emulation.
python3 -m venv --system-site-packages --without-pip {PREFIX}/venv
set -- /usr/share/python-wheels/pip-*.whl
{PREFIX}/venv/bin/python "$1/pip" install -q --no-index --find-links wheels -r requirements.txt
cp -a src {PREFIX}/src
site=$({PREFIX}/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo {PREFIX}/src >"$site/hostd-src.pth"
install -m 0755 bin/* /usr/local/bin/
install -d /etc/hostd
install -m 0644 etc/hostd.toml /etc/hostd/hostd.toml
install -m 0644 etc/pam.d/hostd /etc/pam.d/hostd
install -m 0644 packaging/sysctl.d/*.conf /etc/sysctl.d/
sysctl -q --system
ln -sf /usr/local/bin/hostd /usr/sbin/hostd  # where the units run it, as the package does
install -m 0644 packaging/systemd/*.service /etc/systemd/system/
systemctl daemon-reload
"""


def install_hostd(vm: Machine) -> None:
    """Install hostd in the VM from the staging disk (not started)."""
    vm.sh(INSTALL)
