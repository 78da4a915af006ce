"""Archives as an attacker or a bad copy makes them, fed to a real hostd's `hostctl user
import`: truncated, a flipped byte, garbage, a newer format, members with `..` or absolute
names, an oversized header, a chunk past the volume, a home whose tar climbs out of the home.
Each is one line of error and leaves nothing: no tenant, no subuid/subgid entry, no
container, no staging file; the tenant it came from is untouched. And paths: hostd opens no
file an admin names, hostctl opens them as the admin."""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hostd import archive as a
from hostd import protocol as p
from hostd.client import call
from hostd.state import MIGRATIONS
from runtime.errors import RuntimeFailure
from runtime.volume import data_chunks
from tests.hostd_harness import HOST_PYTHON, Hostd, UnixUsers

SCHEMA = len(MIGRATIONS)


@dataclass(frozen=True)
class Source:
    user: str
    archive: Path
    tmp: Path


@pytest.fixture(scope="module")
def source(
    hostd: Hostd, unix_users: UnixUsers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Source]:
    """A stopped tenant with a small volume and a file in its home, exported with its home."""
    user = unix_users.make()
    tmp = tmp_path_factory.mktemp("archives")
    hostd.hostctl("user", "add", user, "--disk", "256M")
    try:
        home = Path(pwd.getpwnam(user).pw_dir)
        (home / "notes.txt").write_text("mine\n")
        shutil.chown(home / "notes.txt", user, user)
        hostd.hostctl("user", "export", user, "-o", str(tmp / "good.hostd"), "--with-home")
        yield Source(user, tmp / "good.hostd", tmp)
    finally:
        hostd.hostctl("user", "remove", user, check=False)


@dataclass(frozen=True)
class Snapshot:
    """What must not change when an import is refused."""

    subuid: str
    subgid: str
    containers: list[str]
    source_status: str


def snapshot(hostd: Hostd, source: Source) -> Snapshot:
    status = json.loads(hostd.hostctl("status", source.user, "--json").stdout)[0]
    return Snapshot(
        hostd.subuid.read_text(),
        hostd.subgid.read_text(),
        sorted(p.name for p in (hostd.state_dir / "containers").iterdir()),
        f"{status['state']} {status['range_start']}",
    )


def staging(hostd: Hostd) -> list[str]:
    path = hostd.state_dir / "staging"
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def refused(
    hostd: Hostd, source: Source, as_user: str, *files: Path, options: tuple[str, ...] = ()
) -> str:
    """Import `files` as `as_user`: refused in one line, leaving nothing. The error."""
    before = snapshot(hostd, source)
    res = hostd.hostctl("user", "import", *map(str, files), "--as", as_user, *options, check=False)
    said = [line for line in res.stderr.splitlines() if not line.startswith("... ")]
    assert res.returncode == 1 and len(said) == 1 and said[0].startswith("hostctl: "), res.stderr
    assert "Traceback" not in res.stderr
    assert hostd.hostctl("user", "show", as_user, check=False).returncode == 1
    assert snapshot(hostd, source) == before
    assert staging(hostd) == []
    return said[0]


def craft(
    src: Path,
    dst: Path,
    header: dict[str, object] | None = None,
    home: bytes | None = None,
    extra: list[tuple[str, bytes]] | None = None,
) -> None:
    """A copy of archive `src` with a changed header, home or extra members, its manifest
    made to match: what an attacker who knows the format writes."""
    with tempfile.TemporaryDirectory() as tmp:
        image, home_tar = Path(tmp) / "img", Path(tmp) / "home.tar"
        fd, vol = os.open(src, os.O_RDONLY), os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
        reader = a.Reader(fd, src.name, SCHEMA)
        try:
            head, record = reader.header(), reader.tenant()
            with open(home_tar, "wb") as sink:
                reader.restore(vol, sink, None)
        finally:
            reader.close()
            os.close(fd)
            os.close(vol)
        head = replace(head, **header or {})  # type: ignore[arg-type]
        pieces = home if home is not None else home_tar.read_bytes()
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with a.Writer(out) as w:
            hs = w.add(a.HEADER, head.encode())
            ts = w.add(a.TENANT, record.encode())
            sums = {
                n: w.add(f"volume/{n:08d}", data) for n, data in data_chunks(image, a.CHUNK_SIZE)
            }
            for name, data in extra or []:
                w.add(name, data)
            homes = []
            if head.with_home:
                homes = [w.add("home/00000000", pieces)]
            w.add(
                a.MANIFEST,
                a.Manifest(head.id, head.volume_size, sums, tuple(homes), hs, ts).encode(),
            )
            w.finish()
        os.close(out)


@pytest.fixture
def victim(unix_users: UnixUsers) -> str:
    """A user of this host, not a tenant, that archives are imported as."""
    return unix_users.make()


def test_the_good_archive_imports(hostd: Hostd, source: Source, victim: str) -> None:
    """The control: the same archive, unchanged, imports (and is removed again)."""
    res = hostd.hostctl("user", "import", str(source.archive), "--as", victim, "--no-start")
    assert f"imported {victim}" in res.stdout
    hostd.hostctl("user", "remove", victim)


def damaging_flip(data: bytes) -> bytes:
    """`data` with one byte flipped, from its middle on, where the flip changes what it holds.
    About 1 in 1000 positions of a zstd stream decode to the same bytes when flipped (a match
    offset into a run of zeros, say): such an archive is intact, and imports."""
    unzstd = ["zstd", "-d", "-q", "-c"]
    plain = subprocess.run(unzstd, input=data, capture_output=True, check=True).stdout
    for pos in range(len(data) // 2, len(data)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x55
        out = subprocess.run(unzstd, input=bytes(flipped), capture_output=True)
        if out.returncode != 0 or out.stdout != plain:
            return bytes(flipped)
    raise AssertionError("no flipped byte damages the archive")


def test_truncated_flipped_and_garbage_are_refused(
    hostd: Hostd, source: Source, victim: str
) -> None:
    data = source.archive.read_bytes()
    bad = source.tmp / "bad.hostd"
    bad.write_bytes(data[: len(data) // 2])
    assert "truncated" in refused(hostd, source, victim, bad) or "damaged" in refused(
        hostd, source, victim, bad
    )
    bad.write_bytes(damaging_flip(data))
    assert "damaged" in refused(hostd, source, victim, bad)
    bad.write_bytes(os.urandom(len(data)))
    assert "is not a hostd archive or is damaged" in refused(hostd, source, victim, bad)


def test_newer_format_and_schema_are_refused(hostd: Hostd, source: Source, victim: str) -> None:
    bad = source.tmp / "newer.hostd"
    craft(source.archive, bad, header={"format": 2})
    assert "archive format 2, newer than this hostd's 1" in refused(hostd, source, victim, bad)
    craft(source.archive, bad, header={"schema": SCHEMA + 1})
    assert f"state schema {SCHEMA + 1}, newer" in refused(hostd, source, victim, bad)


@pytest.mark.parametrize("name", ["volume/../../x", "home/../..", "/etc/cron.d/x", "volume/9"])
def test_unexpected_names_are_refused(hostd: Hostd, source: Source, victim: str, name: str) -> None:
    bad = source.tmp / "names.hostd"
    craft(source.archive, bad, extra=[(name, b"* * * * * root touch /pwned\n")])
    assert "unexpected member" in refused(hostd, source, victim, bad)
    assert not Path("/etc/cron.d/x").exists() and not Path("/pwned").exists()


def test_chunk_past_the_volume_and_oversized_header_are_refused(
    hostd: Hostd, source: Source, victim: str
) -> None:
    bad = source.tmp / "past.hostd"
    craft(source.archive, bad, extra=[("volume/99999999", b"x")])
    assert "past the volume's end" in refused(hostd, source, victim, bad)
    fd = os.open(bad, os.O_WRONLY | os.O_TRUNC)
    with a.Writer(fd) as w:
        w.add(a.HEADER, b" " * (64 << 20))  # the reader refuses it before reading it
        w.finish()
    os.close(fd)
    assert "a hostd-archive.json of 67108864 bytes" in refused(hostd, source, victim, bad)


def home_tar(target: Path) -> bytes:
    """A home tar that tries to climb out: `..`, an absolute name, a symlink then a file
    through it into `target`, a directory its user cannot write."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name in ("../escaped", f"{target}/absolute", "inside"):
            info = tarfile.TarInfo(name)
            info.size = 3
            t.addfile(info, io.BytesIO(b"x!\n"))
        link = tarfile.TarInfo("out")
        link.type, link.linkname = tarfile.SYMTYPE, str(target)
        t.addfile(link)
        through = tarfile.TarInfo("out/planted")
        through.size = 3
        t.addfile(through, io.BytesIO(b"x!\n"))
    return buf.getvalue()


def test_a_home_tar_cannot_climb_out_of_the_home(hostd: Hostd, source: Source, victim: str) -> None:
    """tar runs as the user: whatever it makes of the names, it cannot write where they
    cannot (a root-owned directory), nor above their home."""
    target = Path(tempfile.mkdtemp(prefix="hostd-victim-", dir="/var/tmp"))
    os.chmod(target, 0o755)
    home = Path(pwd.getpwnam(victim).pw_dir)
    bad = source.tmp / "home.hostd"
    try:
        craft(source.archive, bad, home=home_tar(target))
        res = hostd.hostctl(
            "user", "import", str(bad), "--as", victim, "--with-home", "--no-start", check=False
        )
        if res.returncode == 0:
            hostd.hostctl("user", "remove", victim)
        else:
            said = [x for x in res.stderr.splitlines() if not x.startswith("... ")]
            assert len(said) == 1 and said[0].startswith("hostctl: "), res.stderr
            assert hostd.hostctl("user", "show", victim, check=False).returncode == 1
        assert os.listdir(target) == []
        assert not (home.parent / "escaped").exists()
        for path in home.rglob("*"):  # what it made is the user's
            assert path.lstat().st_uid == pwd.getpwnam(victim).pw_uid
    finally:
        shutil.rmtree(target)
    assert staging(hostd) == []


def test_hostd_opens_no_path_an_admin_names(hostd: Hostd, source: Source) -> None:
    """Names travel for messages only: without the files as descriptors hostd refuses."""
    for op, args in (
        ("user.export", {"user": source.user, "since": "/etc/shadow"}),
        ("user.import", {"files": ["/etc/shadow"]}),
    ):
        request = p.decode(p.OPS[op].request, args)
        with pytest.raises(RuntimeFailure, match="file"):
            call(hostd.admin_socket, op, request)


def test_hostctl_opens_files_as_the_caller(hostd: Hostd, source: Source, victim: str) -> None:
    """An admin who is not root cannot have an export written over a root-owned file, nor
    import a file they cannot read: hostctl opens them, as them, before asking hostd."""
    run = hostd.admin_socket.parent
    config = run / "hostctl-as-user.toml"
    config.write_text(f'[paths]\nadmin_socket = "{hostd.admin_socket}"\n')
    os.chmod(config, 0o644)
    protected = Path(tempfile.mkdtemp(prefix="hostd-root-", dir="/var/tmp"))
    os.chmod(protected, 0o755)
    owned = protected / "precious"
    owned.write_text("root's\n")
    secret = protected / "secret.hostd"
    shutil.copy(source.archive, secret)
    os.chmod(secret, 0o600)
    uid = pwd.getpwnam(victim).pw_uid
    try:

        def hostctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [HOST_PYTHON, "-m", "hostd.hostctl", "--config", str(config), *args],
                capture_output=True,
                text=True,
                timeout=120,
                user=uid,
                group=pwd.getpwnam(victim).pw_gid,
                extra_groups=[],
                cwd=os.getcwd(),
            )

        res = hostctl("user", "export", source.user, "-o", str(owned), "--force")
        assert res.returncode == 1 and f"cannot write {owned}: Permission denied" in res.stderr
        assert owned.read_text() == "root's\n"
        res = hostctl("user", "import", str(secret))
        assert res.returncode == 1 and f"cannot read {secret}: Permission denied" in res.stderr
    finally:
        shutil.rmtree(protected)
        config.unlink()
