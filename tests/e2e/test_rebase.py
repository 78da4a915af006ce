"""`hostctl user rebase`: a developer's tenant moved to a rebuilt image keeps its Docker data
and home, sees the new image's files, and finds what it had changed in the old root set aside."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.containers import Runtime
from runtime.storage import SET_ASIDE
from tests.e2e.conftest import add_developer
from tests.hostd_harness import Hostd, Login, UnixUsers

MARKER = "etc/hostd-test-image"  # which version of the test image a root file system shows
# A package the developer installs: dpkg records it in the root's upper layer.
PROBE_DEB = (
    "mkdir -p deb/DEBIAN && printf 'Package: hostd-probe\\nVersion: 1\\nArchitecture: all\\n"
    "Maintainer: hostd <root@localhost>\\nDescription: probe\\n' > deb/DEBIAN/control && "
    "dpkg-deb -b deb probe.deb >/dev/null && sudo dpkg -i probe.deb >/dev/null"
)


class ImageVersions:
    """Versions of a test image, each the default template plus its own MARKER file: a real
    new version in ~15 s, where `hostctl image build` takes ~50 s."""

    def __init__(self, rt: Runtime, tmp: Path) -> None:
        self.rt, self.tmp = rt, tmp
        self.name = f"rb{os.getpid()}"
        self.tar = tmp / "template.tar"
        template = rt.images.resolve("default") / "rootfs"
        subprocess.run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "-C",
                str(template),
                "-cf",
                str(self.tar),
                ".",
            ],
            check=True,
        )

    def publish(self, marker: str) -> str:
        """A new version whose MARKER says `marker` (appended: the last copy wins); its name."""
        extra = self.tmp / marker
        (extra / "etc").mkdir(parents=True)
        (extra / MARKER).write_text(marker + "\n")
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(extra), "-rf", str(self.tar), f"./{MARKER}"],
            check=True,
        )
        return f"{self.name}@{self.rt.images.import_tarball(self.name, self.tar).version}"


@pytest.fixture(scope="module")
def image(rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageVersions]:
    img = ImageVersions(rt, tmp_path_factory.mktemp("rebase-image"))
    try:
        yield img
    finally:
        img.tar.unlink()
        if (rt.images.root / img.name).is_symlink():
            rt.images.remove(img.name, [Path(c.image_dir) for c in rt.containers()])


@pytest.fixture(scope="module")
def first(image: ImageVersions) -> str:
    return image.publish("one")


@pytest.fixture(scope="module")
def tenant(
    hostd: Hostd,
    unix_users: UnixUsers,
    tmp_path_factory: pytest.TempPathFactory,
    busybox_tar: Path,
    image: ImageVersions,
    first: str,
) -> Iterator[Login]:
    login = add_developer(
        hostd, unix_users, tmp_path_factory.mktemp("rebase"), busybox_tar, "--image", image.name
    )
    yield login
    hostd.hostctl("user", "remove", login.user, check=False)


def _one_line_error(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in res.stderr, res.stderr


def test_rebase_keeps_docker_data_and_home_and_sets_the_old_root_aside(
    hostd: Hostd, rt: Runtime, tenant: Login, image: ImageVersions, first: str
) -> None:
    user = tenant.user
    assert tenant.sh(f"cat /{MARKER}") == "one\n"
    tenant.sh(
        "mkdir -p ctx && printf 'FROM busybox:local\\nRUN echo built > /built\\n' "
        "> ctx/Dockerfile && docker build -q -t mine:1 ctx >/dev/null"
    )
    tenant.sh(
        "docker volume create keep >/dev/null && "
        "docker run --rm -v keep:/v busybox:local sh -c 'echo kept > /v/f'"
    )
    tenant.sh("echo home > ~/home-file && sudo sh -c 'echo upper > /etc/mine.conf'")
    tenant.sh(PROBE_DEB)
    second = image.publish("two")

    refused = hostd.hostctl("user", "rebase", user, check=False)
    _one_line_error(refused, "running", "--restart")
    assert tenant.sh(f"cat /{MARKER}") == "one\n"  # untouched, still up

    res = hostd.hostctl("user", "rebase", user, "--restart")
    assert res.stdout == f"rebased {user} from {first} to {second} (restarted); pruned {first}\n"
    assert f"warning: {user}'s own changes" in res.stderr
    assert f"at {SET_ASIDE}/" in res.stderr and "reinstall: hostd-probe" in res.stderr
    assert not (rt.images.versions_dir() / first).exists()  # no tenant used it any more

    assert tenant.sh(f"cat /{MARKER}; . /etc/os-release; echo $VERSION_CODENAME") == "two\ntrixie\n"
    assert tenant.sh("docker run --rm mine:1 cat /built") == "built\n"
    assert tenant.sh("docker run --rm -v keep:/v busybox:local cat /v/f") == "kept\n"
    assert tenant.sh("cat ~/home-file") == "home\n"
    assert (
        tenant.sh(
            "test ! -e /etc/mine.conf && ! dpkg -s hostd-probe >/dev/null 2>&1; "
            f"cat {SET_ASIDE}/*/etc/mine.conf"
        )
        == "upper\n"
    )
    tenant.sh(f'sudo rm -rf {SET_ASIDE}/* && test -z "$(ls {SET_ASIDE})"')  # theirs to delete
    assert hostd.hostctl("status", user).stdout.split("\n")[1].split()[1] == "running"

    again = hostd.hostctl("user", "rebase", user, image.name, "--restart")
    assert again.stdout == f"{user} is already on {second}: nothing to do\n"


def test_rebase_of_unknown_user_or_image_says_the_fix(hostd: Hostd, tenant: Login) -> None:
    _one_line_error(
        hostd.hostctl("user", "rebase", "nosuchtenant", check=False),
        "not a tenant",
        "hostctl user add",
    )
    _one_line_error(
        hostd.hostctl("user", "rebase", tenant.user, "nosuchimage", check=False),
        "'nosuchimage' not found",
        "build it",
    )


def test_a_stopped_tenant_is_rebased_without_restart(
    hostd: Hostd, tenant: Login, image: ImageVersions
) -> None:
    hostd.hostctl("stop", tenant.user)
    third = image.publish("three")
    res = hostd.hostctl("user", "rebase", tenant.user)
    assert res.stdout.startswith(f"rebased {tenant.user} from ") and f"to {third}" in res.stdout
    assert "(restarted)" not in res.stdout
    assert tenant.sh(f"cat /{MARKER}") == "three\n"  # the login starts it, account and all
