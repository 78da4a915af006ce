"""Export and import against a real hostd, on what goes wrong around a good archive: the
range it asks for is taken, the user is a tenant already, the disk fills up during the
import, hostd is killed in the middle; and a home restored as another user, never over their
own files. Each failure is one line and leaves nothing; a crash is undone by reconcile."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hostd_harness import Hostd, UnixUsers, wait_for


@dataclass(frozen=True)
class Source:
    user: str
    archive: Path
    range_start: int


@pytest.fixture(scope="module")
def source(
    hostd: Hostd, unix_users: UnixUsers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Source]:
    """A stopped tenant with 16 MiB of data in its volume and two files in its home,
    exported with its home."""
    user = unix_users.make()
    tmp = tmp_path_factory.mktemp("export")
    hostd.hostctl("user", "add", user, "--disk", "256M")
    try:
        hostd.hostctl(
            "exec", user, "--", "sh", "-c", "head -c 16777216 /dev/urandom > /var/tmp/data"
        )
        hostd.hostctl("stop", user)
        home = Path(pwd.getpwnam(user).pw_dir)
        for name in ("a.txt", "b.txt"):
            (home / name).write_text(f"{name} from the archive\n")
            shutil.chown(home / name, user, user)
        hostd.hostctl("user", "export", user, "-o", str(tmp / "src.hostd"), "--with-home")
        show = json.loads(hostd.hostctl("user", "show", user, "--json").stdout)
        yield Source(user, tmp / "src.hostd", show["tenant"]["range_start"])
    finally:
        hostd.hostctl("user", "remove", user, check=False)


@pytest.fixture
def other(hostd: Hostd, unix_users: UnixUsers) -> Iterator[str]:
    user = unix_users.make()
    yield user
    hostd.hostctl("user", "remove", user, check=False)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    said = [line for line in res.stderr.splitlines() if not line.startswith("... ")]
    assert res.returncode == 1 and len(said) == 1 and said[0].startswith("hostctl: "), res.stderr
    return said[0]


def left_behind(hostd: Hostd, user: str) -> list[str]:
    """What an import of `user` left: a tenant row, subuid/subgid lines, a container, staging."""
    left = []
    if hostd.hostctl("user", "show", user, check=False).returncode == 0:
        left.append("tenant")
    ranges = json.loads(hostd.hostctl("ranges", "--json").stdout)
    starts = {str(r["start"]) for r in ranges}
    for path in (hostd.subuid, hostd.subgid):
        left += [f"{path.name}: {line}" for line in path.read_text().splitlines()
                 if line.split(":")[1] not in starts]  # fmt: skip
    if (hostd.state_dir / "containers" / user).exists():
        left.append("container")
    staging = hostd.state_dir / "staging"
    left += [f"staging/{p.name}" for p in staging.iterdir()] if staging.exists() else []
    return left


def test_import_as_another_user_restores_the_home_without_overwriting(
    hostd: Hostd, source: Source, other: str
) -> None:
    home = Path(pwd.getpwnam(other).pw_dir)
    (home / "a.txt").write_text("their own\n")
    theirs = Path(pwd.getpwnam(source.user).pw_dir)
    both = {p.relative_to(home) for p in home.rglob("*")} & {
        p.relative_to(theirs) for p in theirs.rglob("*")
    }  # a.txt and what both homes got from /etc/skel
    res = hostd.hostctl("user", "import", str(source.archive), "--as", other, "--with-home")
    assert f"imported {other}: IDs" in res.stdout and "files shifted" in res.stdout
    assert f"home restored, {len(both)} existing entries left as they were" in res.stdout
    assert (home / "a.txt").read_text() == "their own\n"  # never overwritten
    assert (home / "b.txt").read_text() == "b.txt from the archive\n"
    assert (home / "b.txt").stat().st_uid == pwd.getpwnam(other).pw_uid
    out = hostd.hostctl("exec", other, "--", "sh", "-c", "wc -c < /var/tmp/data").stdout
    assert out.strip() == "16777216"


def test_a_taken_range_or_an_existing_tenant_is_refused_before_any_data(
    hostd: Hostd, source: Source, other: str
) -> None:
    res = hostd.hostctl(
        "user", "import", str(source.archive), "--as", other, "--range", "keep", check=False
    )
    assert f"collide with {source.user}'s range" in one_line_error(res)
    assert left_behind(hostd, other) == []
    res = hostd.hostctl("user", "import", str(source.archive), check=False)
    assert f"{source.user} is already a tenant here" in one_line_error(res)
    assert hostd.hostctl("status", source.user).returncode == 0


def test_a_full_disk_during_the_import_leaves_nothing(
    hostd: Hostd, source: Source, other: str
) -> None:
    """The staging dir on an 8 MiB tmpfs: the volume's 16 MiB do not fit."""
    staging = hostd.state_dir / "staging"
    staging.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "hostd-test-full", str(staging)],
        check=True,
    )
    try:
        res = hostd.hostctl("user", "import", str(source.archive), "--as", other, check=False)
        assert "filled up during the import" in one_line_error(res)
        assert left_behind(hostd, other) == []
    finally:
        subprocess.run(["umount", str(staging)], check=True)


def test_hostd_killed_during_an_import_is_undone_at_restart(
    hostd: Hostd, source: Source, other: str
) -> None:
    """kill -9 while the volume streams in (a FIFO feeds the archive: it waits mid-way):
    reconcile rolls the import back like an interrupted add."""
    fifo = source.archive.parent / "slow.fifo"
    os.mkfifo(fifo)
    data = source.archive.read_bytes()
    importer = subprocess.Popen(
        hostd.hostctl_argv("user", "import", str(fifo), "--as", other),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with open(fifo, "wb") as feed:
            feed.write(data[: len(data) // 2])
            feed.flush()
            staging = hostd.state_dir / "staging"
            wait_for(
                lambda: staging.exists() and any(staging.iterdir()),
                60,
                "the import to reserve the tenant and stream into its staging file",
            )
            assert hostd.proc is not None
            hostd.proc.send_signal(signal.SIGKILL)
            hostd.proc.wait(60)
            hostd.proc = None
    except BrokenPipeError:
        pass
    finally:
        importer.wait(60)
        fifo.unlink()
    assert importer.returncode == 1
    hostd.start()  # reconcile
    assert left_behind(hostd, other) == []
