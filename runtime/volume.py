"""A container's capped storage: a sparse ext4 image on a loop device, mounted at `data/`.

The container's whole writable state (overlay upper, /var/lib/docker, ...) lives in one file
system whose size is the cap: writing past it fails with ENOSPC inside, and nothing outside is
affected. The image is sparse, so the host only spends blocks on what was written, and gets
back what is deleted inside (the `discard` mount option, see MOUNT_OPTIONS).
`mount -o loop` gives the loop device the autoclear flag: unmounting releases it.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from runtime import mountinfo, proc, syscalls
from runtime.errors import RuntimeFailure

MiB = 2**20
MIN_SIZE = 64 * MiB
BLOCK = 4096
LABEL = "hostd"
# -b/-T fixed: a small first size must not pick mke2fs's 1 KiB blocks and dense inodes, which
# a grown volume would keep. The inode tables and the journal are left sparse (lazy_*_init).
MKFS_OPTIONS = (
    "-q",
    "-F",
    "-m",
    "0",
    "-b",
    str(BLOCK),
    "-T",
    "default",
    "-L",
    LABEL,
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
)
# No nosuid/nodev: flags of a host mount are locked in the container's user namespace, and
# BuildKit's `rbind ro` remounts of /var/lib/docker without them fail (EPERM). The volume lies
# in the container's 0710 directory, out of host users' reach; root inside cannot make device
# nodes, and the container's device cgroup refuses any it finds.
# discard: ext4 discards the blocks it frees at each journal commit (every 5 s), and the loop
# device turns that into holes punched in the image, so space deleted inside goes back to the
# host. Measured on a 2 GiB volume: no cost above the noise (1 GiB written and deleted, 20000
# small files, a 10-layer docker build); without it the image kept 1.8 GiB after everything
# was deleted, until an fstrim (0.55 s), which hostd would have to run on every volume.
MOUNT_OPTIONS = "loop,discard"
RELEASE_TIMEOUT = 5.0  # seconds for the kernel to detach an autoclear loop device
CAP_SYS_RESOURCE = 24
LOOP_MAJOR = 7  # the block major of every loop device (linux/major.h)
E2FSCK_FIXED = 1  # e2fsck exit status: errors found and corrected; above is a failure
FSCK_TIMEOUT = 3600.0  # seconds e2fsck or resize2fs may take on an imported volume
# The ext4 superblock: 1 KiB at offset 1024; the fields recorded_usage reads (linux/ext4.h).
SUPERBLOCK = 1024
EXT4_MAGIC = 0xEF53
INCOMPAT_64BIT = 0x80


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def check_size(size: int) -> int:
    """`size` cut down to whole 4 KiB blocks; below 64 MiB is refused (journal and metadata
    would leave next to nothing)."""
    if size < MIN_SIZE:
        raise RuntimeFailure(
            f"volume size {size} bytes is below the minimum of {_mib(MIN_SIZE)}",
            f"give a size of at least {_mib(MIN_SIZE)}",
        )
    return size - size % BLOCK


def create(image: Path, size: int) -> None:
    """A new sparse image holding an empty ext4; on failure no file is left behind."""
    size = check_size(size)
    mkfs = proc.require("mkfs.ext4", "e2fsprogs")
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise RuntimeFailure(
            f"volume image {image} already exists", "delete it first or keep using it"
        ) from exc
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot make {image} {_mib(size)} large: {exc.strerror}",
                "choose a smaller size or a state directory on a file system that takes it",
            ) from exc
        finally:
            os.close(fd)
        proc.run([mkfs, *MKFS_OPTIONS, str(image)], fix="check the free space on the host")
    except BaseException:
        image.unlink()
        raise


def loop_device(target: Path) -> str | None:
    """The loop device mounted at `target`, or None when no volume is mounted there."""
    where = str(target.resolve())
    found = [m.source for m in mountinfo.current() if m.target == where]
    return found[-1] if found and found[-1].startswith("/dev/loop") else None


def _backing_file(device: str) -> str | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/backing_file") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _attached(image: Path) -> list[str]:
    """Loop devices backed by `image`, mounted or not."""
    losetup = proc.require("losetup", "mount")
    out = proc.run([losetup, "--noheadings", "--output", "NAME", "--associated", str(image)])
    return out.stdout.split()


def _device(image: Path, target: Path) -> str | None:
    """The loop device of `image` mounted at `target`, None when nothing is mounted there;
    anything else mounted there is refused."""
    device = loop_device(target)
    if device is None and mountinfo.is_mounted(str(target.resolve())):
        raise RuntimeFailure(f"{target} is already a mount point", f"unmount it (umount {target})")
    if device is not None and _backing_file(device) != str(image.resolve()):
        raise RuntimeFailure(
            f"{target} is mounted from {device}, not from {image}", f"unmount it (umount {target})"
        )
    return device


def mount(image: Path, target: Path, options: str = MOUNT_OPTIONS) -> None:
    """Mount the image at `target` (made if missing); a no-op when it already is."""
    if _device(image, target) is not None:
        return
    target.mkdir(exist_ok=True)
    mount_prog = proc.require("mount", "mount")
    proc.run(
        [mount_prog, "-t", "ext4", "-o", options, str(image), str(target)],
        fix="check that loop devices are available (modprobe loop) and the image is intact",
    )


def unmount(target: Path) -> None:
    """Unmount the volume and release its loop device; a no-op when nothing is mounted.

    Never lazy: a busy volume stays mounted and this fails, as a detached but still live file
    system would keep its loop device and must not be resized offline."""
    device = loop_device(target)
    if device is None:
        return
    backing = _backing_file(device)
    try:
        syscalls.umount(str(target.resolve()))
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot unmount {target}: {exc.strerror}",
            f"stop the processes using it (fuser -vm {target})",
        ) from exc
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while backing is not None and _backing_file(device) == backing:
        if time.monotonic() > deadline:  # autoclear did not happen: detach it ourselves
            proc.run([proc.require("losetup", "mount"), "--detach", device])
            return
        time.sleep(0.05)


def can_grow_live() -> bool:
    """Whether we hold CAP_SYS_RESOURCE, which ext4 demands for growing a mounted file system
    (a capability bounding set without it leaves only offline resizes)."""
    with open("/proc/self/status") as f:
        caps = next(ln.split()[1] for ln in f if ln.startswith("CapEff:"))
    return bool(int(caps, 16) >> CAP_SYS_RESOURCE & 1)


def mounted(target: Path) -> bool:
    """Whether a volume (a file system on a loop device) is mounted at `target`, from device
    numbers alone: `hostctl status` asks it of every tenant, and mountinfo grows with them."""
    try:
        here = os.stat(target, follow_symlinks=False)
        parent = os.stat(target.parent)
    except FileNotFoundError:
        return False
    return here.st_dev != parent.st_dev and os.major(here.st_dev) == LOOP_MAJOR


def usage(target: Path) -> tuple[int, int]:
    """(used, size) in bytes as `df` shows them inside: file system metadata not counted."""
    if not mounted(target):
        raise RuntimeFailure(f"no volume is mounted at {target}", "mount it first")
    st = os.statvfs(target)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize


def _superblock(image: Path) -> tuple[int, int, int, int] | None:
    """(blocks, free blocks, block size, overhead blocks) from an ext4 image's superblock:
    1 KiB read, no program. None when the image is not ext4."""
    try:
        with open(image, "rb") as f:
            f.seek(SUPERBLOCK)
            sb = f.read(SUPERBLOCK)
    except FileNotFoundError:
        return None
    if len(sb) < SUPERBLOCK or struct.unpack_from("<H", sb, 0x38)[0] != EXT4_MAGIC:
        return None

    def u32(offset: int) -> int:
        return int(struct.unpack_from("<I", sb, offset)[0])

    blocks, free, log_block, overhead = u32(0x04), u32(0x0C), u32(0x18), u32(0x248)
    if u32(0x60) & INCOMPAT_64BIT:  # s_feature_incompat: counts have high halves
        blocks, free = blocks | u32(0x150) << 32, free | u32(0x158) << 32
    if log_block > 6:
        return None
    return blocks, free, 1024 << log_block, overhead


def recorded_usage(image: Path) -> int | None:
    """Bytes used on an unmounted volume, as `usage` showed them, from the counts its ext4
    superblock holds (written at unmount). None when the image is not ext4 or does not record
    its metadata overhead (an old mke2fs)."""
    sb = _superblock(image)
    if sb is None:
        return None
    blocks, free, block, overhead = sb
    if not overhead or not free + overhead <= blocks:
        return None
    return (blocks - free - overhead) * block


def adopt(src: Path, image: Path, size: int) -> None:
    """Make the ext4 image `src` (an imported volume: untrusted) the volume `image` of `size`
    bytes: its size checked, e2fsck'ed (refused when damaged beyond what -p fixes), renamed
    in, grown to `size`. On failure `src` is left for the caller to delete."""
    size = check_size(size)
    sb = _superblock(src)
    if sb is None:
        raise damaged("no ext4 file system in it")
    have = sb[0] * sb[2]
    if have > size:
        raise RuntimeFailure(
            f"the imported volume is {_mib(have)}, more than the disk limit of {_mib(size)}",
            f"give a disk limit of at least {_mib(have)}",
        )
    os.truncate(src, have)  # an export leaves out the holes at its end
    e2fsck = proc.require("e2fsck", "e2fsprogs")
    res = proc.run([e2fsck, "-f", "-p", str(src)], check=False, timeout=FSCK_TIMEOUT)
    if res.returncode > E2FSCK_FIXED:
        raise damaged(f"e2fsck: {res.last_error_line()}")
    os.rename(src, image)
    if size > have:
        os.truncate(image, size)
        proc.run([proc.require("resize2fs", "e2fsprogs"), str(image)], timeout=FSCK_TIMEOUT)


def damaged(why: str) -> RuntimeFailure:
    return RuntimeFailure(
        f"the imported volume is damaged ({why})", "export it again from an intact source"
    )


def _fsck(image: Path) -> None:
    """resize2fs works offline only on a freshly checked file system."""
    res = proc.run([proc.require("e2fsck", "e2fsprogs"), "-f", "-p", str(image)], check=False)
    if res.returncode > E2FSCK_FIXED:
        raise RuntimeFailure(
            f"{image} has file system errors e2fsck cannot fix: {res.last_error_line()}",
            f"repair it by hand (e2fsck -f {image})",
        )


def _header(image: Path) -> dict[str, str]:
    out = proc.run([proc.require("dumpe2fs", "e2fsprogs"), "-h", str(image)]).stdout
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}


def _shrink(image: Path, size: int) -> None:
    resize2fs = proc.require("resize2fs", "e2fsprogs")
    _fsck(image)
    head = _header(image)
    block = int(head["Block size"])
    blocks, free = int(head["Block count"]), int(head["Free blocks"])
    overhead = int(head.get("Overhead clusters", "0"))
    out = proc.run([resize2fs, "-P", str(image)]).stdout
    minimum = int(out.rsplit(":", 1)[1]) * block  # "Estimated minimum size ...: <blocks>"
    if size < minimum:
        used = (blocks - free - overhead) * block
        raise RuntimeFailure(
            f"cannot shrink {image} to {_mib(size)}: {_mib(used)} are used "
            f"and the file system needs at least {_mib(minimum)}",
            "delete data inside or choose a larger size",
        )
    proc.run([resize2fs, str(image), f"{size // block}"])
    os.truncate(image, size)


def resize(image: Path, target: Path, size: int) -> bool:
    """Give the volume `size` bytes: True when done live (growing a mounted volume), False
    when done offline. Shrinking needs the volume unmounted and never goes below what is used.

    Growing is safe to repeat: an interrupted grow is completed by calling it again."""
    size = check_size(size)
    resize2fs = proc.require("resize2fs", "e2fsprogs")
    device = _device(image, target)
    users = _attached(image) if device is None else []
    if users:  # mounted elsewhere: working on it offline would corrupt it
        raise RuntimeFailure(
            f"{image} is in use by {', '.join(users)}, not mounted at {target}",
            f"unmount it (losetup -j {image} names the device)",
        )
    if size < image.stat().st_size:
        if device is not None:
            raise RuntimeFailure(
                f"cannot shrink {image} while it is mounted", "stop the container first"
            )
        _shrink(image, size)
        return False
    if device is not None and not can_grow_live():
        raise RuntimeFailure(
            f"cannot grow {image} while it is mounted: no CAP_SYS_RESOURCE",
            "grow it while the container is stopped, or give hostd CAP_SYS_RESOURCE",
        )
    os.truncate(image, size)
    if device is None:
        _fsck(image)
        proc.run([resize2fs, str(image)])
        return False
    proc.run([proc.require("losetup", "mount"), "--set-capacity", device])
    proc.run([resize2fs, device], fix="check `dmesg` for ext4 online resize errors")
    return True


def data_chunks(image: Path, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of each chunk of `image` ([index * chunk_size, +chunk_size), the last one
    shorter) that holds data: chunks wholly in holes are never read (SEEK_DATA/SEEK_HOLE), and
    all-zero ones are left out as well, so a sparse volume costs what it holds."""
    zeros = bytes(chunk_size)
    with open(image, "rb", buffering=0) as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        index = 0
        while index * chunk_size < size:
            try:
                data = os.lseek(fd, index * chunk_size, os.SEEK_DATA)
            except OSError as exc:  # ENXIO: nothing but holes up to the end
                if exc.errno == errno.ENXIO:
                    return
                raise
            index = max(index, data // chunk_size)
            chunk = os.pread(fd, chunk_size, index * chunk_size)
            if chunk != zeros[: len(chunk)]:
                yield index, chunk
            index += 1
