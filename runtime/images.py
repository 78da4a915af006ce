"""Read-only image templates: built from a recipe with debootstrap, or imported from a tarball.

Layout under the store root:
    <name>                   symlink to the current version (swapped atomically)
    .versions/<name>@<ver>/  rootfs/ and manifest.json, never modified after publication
    .build/                  work in progress; a failed build leaves nothing elsewhere
A rebuild publishes a new version; containers keep the version they were created from, so
running containers are never disturbed. Unreferenced old versions are pruned.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from runtime import fsutil, proc
from runtime.errors import RuntimeFailure
from runtime.names import check_name

INIT_PATHS = ("sbin/init", "lib/systemd/systemd", "usr/lib/systemd/systemd")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created: str  # ISO 8601, UTC
    source: str
    size: int  # bytes on disk
    packages: tuple[str, ...]  # "name version", from the image's dpkg database

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(**{**data, "packages": tuple(data["packages"])})


@dataclass(frozen=True)
class Recipe:
    """An image recipe: a directory holding recipe.toml, setup.sh and optionally files/.

    Sharing is written out in recipe.toml, never made by symlinks (a wheel would copy them):
    `alias_of = "debian13"` makes the recipe another name for that one (`default`), and
    `setup_from = "debian13"` runs that recipe's setup.sh."""

    name: str
    directory: Path  # the recipe's own, or the one it is an alias of
    description: str
    suite: str
    variant: str
    mirror: str
    packages: tuple[str, ...]
    setup: Path  # the script run in the new root
    alias_of: str | None = None  # the recipe this name points to (`default` -> `debian13`)

    @classmethod
    def load(cls, directory: Path) -> Recipe:
        path = directory / "recipe.toml"
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
            if "alias_of" in data:
                return cls._alias(directory, str(data["alias_of"]))
            if not isinstance(data.get("packages", []), list):
                raise KeyError("packages must be a list of package names")
            setup = directory / "setup.sh"
            if "setup_from" in data:
                setup = (
                    directory.parent / check_name(str(data["setup_from"]), "recipe") / "setup.sh"
                )
            return cls(
                directory.name,
                directory,
                str(data.get("description", "")),
                str(data["suite"]),
                str(data.get("variant", "minbase")),
                str(data["mirror"]),
                tuple(str(p) for p in data.get("packages", ())),
                setup,
            )
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, KeyError, OSError) as exc:
            raise RuntimeFailure(f"bad image recipe {path}: {exc}", "fix the file") from exc

    @classmethod
    def _alias(cls, directory: Path, target: str) -> Recipe:
        real = cls.load(directory.parent / check_name(target, "recipe"))
        if real.alias_of is not None:
            raise RuntimeFailure(
                f"bad image recipe {directory / 'recipe.toml'}: {target} is an alias too",
                f"name the recipe {real.alias_of} instead",
            )
        return replace(real, name=directory.name, alias_of=real.name)


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class ImageStore:
    def __init__(self, root: Path, recipes: Path, cache: Path) -> None:
        self.root = root
        self.recipes_dir = recipes
        self.cache = cache  # debootstrap's package cache, kept across builds

    # -- queries ---------------------------------------------------------------------------

    def versions_dir(self) -> Path:
        return self.root / ".versions"

    def resolve(self, name: str) -> Path:
        """Directory of the current version of image `name` (holding rootfs/ and manifest)."""
        check_name(name, "image")
        link = self.root / name
        if not link.is_symlink():
            raise RuntimeFailure(
                f"image {name!r} not found",
                f"build it with `hostd-runtime image build {name}` or import a tarball",
            )
        return self.root / os.readlink(link)

    def manifest(self, version_dir: Path) -> Manifest:
        with open(version_dir / "manifest.json") as f:
            return Manifest.from_json(json.load(f))

    def manifests(self) -> list[Manifest]:
        if not self.root.is_dir():
            return []
        return [
            self.manifest(self.resolve(p.name))
            for p in sorted(self.root.iterdir())
            if p.is_symlink()
        ]

    # -- building --------------------------------------------------------------------------

    def recipes(self) -> list[Recipe]:
        """The recipes that ship (and any an admin added to the recipes directory)."""
        if not self.recipes_dir.is_dir():
            return []
        dirs = sorted(self.recipes_dir.iterdir())
        return [Recipe.load(d) for d in dirs if (d / "recipe.toml").is_file()]

    def recipe_summaries(self) -> list[dict[str, Any]]:
        """Each recipe with the version of the image of the same name, if built."""
        built = {m.name: m.version for m in self.manifests()}
        return [
            {
                "recipe": r.name,
                "alias_of": r.alias_of,
                "description": r.description,
                "suite": r.suite,
                "built": built.get(r.name),
            }
            for r in self.recipes()
        ]

    def recipe(self, name: str) -> Recipe:
        check_name(name, "recipe")
        directory = self.recipes_dir / name
        if not (directory / "recipe.toml").is_file():
            known = ", ".join(r.name for r in self.recipes()) or "none"
            raise RuntimeFailure(
                f"no image recipe {name!r} (recipes: {known})",
                "name one of them, or give --recipe",
            )
        return Recipe.load(directory)

    def build(
        self, name: str, recipe_name: str | None = None, progress: Progress = _quiet
    ) -> Manifest:
        """Build image `name` from recipe `recipe_name` (default: same name) and publish it."""
        check_name(name, "image")
        recipe = self.recipe(recipe_name or name)
        debootstrap = proc.require("debootstrap", "debootstrap")
        with self._workdir(name) as work:
            rootfs = work / "rootfs"
            self.cache.mkdir(parents=True, exist_ok=True)
            progress(f"debootstrap {recipe.suite} ({len(recipe.packages)} extra packages)")
            proc.run(
                [
                    debootstrap,
                    f"--variant={recipe.variant}",
                    f"--cache-dir={self.cache}",
                    "--include=" + ",".join(recipe.packages),
                    recipe.suite,
                    str(rootfs),
                    recipe.mirror,
                ],
                fix=f"check that {recipe.mirror} is reachable from this host",
            )
            progress("running setup.sh in the new root")
            shutil.copy(recipe.setup, rootfs / "hostd-setup.sh")
            proc.run(
                ["chroot", str(rootfs), "/bin/sh", "/hostd-setup.sh"],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
                fix=f"fix {recipe.setup}",
            )
            (rootfs / "hostd-setup.sh").unlink()
            files = recipe.directory / "files"
            if files.is_dir():
                shutil.copytree(files, rootfs, dirs_exist_ok=True, symlinks=True)
            source = (
                f"recipe {recipe.directory.name}: debootstrap {recipe.suite} "
                f"{recipe.variant} from {recipe.mirror}"
            )
            return self._publish(name, work, source, progress)

    def import_tarball(
        self, name: str, tarball: Path, progress: Progress = _quiet, label: str | None = None
    ) -> Manifest:
        """Import a root filesystem tarball (what `docker export` writes) as image `name`;
        `label` names its origin in the manifest when `tarball` is not a meaningful path."""
        check_name(name, "image")
        if not tarball.is_file():
            raise RuntimeFailure(f"no such tarball {tarball}", "give the path of a .tar(.gz) file")
        with self._workdir(name) as work:
            rootfs = work / "rootfs"
            rootfs.mkdir(mode=0o755)
            progress(f"unpacking {label or tarball}")
            proc.run(
                [
                    "tar",
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "-xpf",
                    str(tarball),
                    "-C",
                    str(rootfs),
                ],
                fix="give a root filesystem tarball, as `docker export` writes",
            )
            if not any((rootfs / p).exists() or (rootfs / p).is_symlink() for p in INIT_PATHS):
                raise RuntimeFailure(
                    f"{tarball} has no init (/sbin/init)",
                    "export a system image with systemd installed",
                )
            return self._publish(name, work, f"import {label or tarball.resolve()}", progress)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise publishing and pruning across processes (hostd, hostd-runtime)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextmanager
    def _workdir(self, name: str) -> Iterator[Path]:
        """A build directory: removed on failure; on success it has been renamed away."""
        build = self.root / ".build"
        build.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # templates hold root's setuid files: root's eyes only
        work = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=build))
        try:
            yield work
        finally:
            fsutil.remove_tree(work)

    def _publish(self, name: str, work: Path, source: str, progress: Progress) -> Manifest:
        rootfs = work / "rootfs"
        version = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        manifest = Manifest(
            name=name,
            version=version,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            source=source,
            size=fsutil.disk_usage(rootfs),
            packages=_packages(rootfs),
        )
        (work / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1) + "\n")
        os.chmod(work, 0o755)
        self.versions_dir().mkdir(exist_ok=True)
        final = self.versions_dir() / f"{name}@{version}"
        with self._locked():  # a prune must not see the version before its symlink
            os.rename(work, final)
            fsutil.atomic_symlink(os.path.relpath(final, self.root), self.root / name)
        progress(f"published {name}@{version} ({manifest.size // 2**20} MiB)")
        return manifest

    # -- removal ---------------------------------------------------------------------------

    def remove(self, name: str, in_use: Iterable[Path]) -> None:
        """Unpublish `name`; its versions go once no container uses them."""
        current = self.resolve(name)
        users = {p.resolve() for p in in_use}
        if current.resolve() in users:
            raise RuntimeFailure(
                f"image {name!r} is used by containers", "delete those containers first"
            )
        (self.root / name).unlink()
        self.prune(users)

    def prune(self, in_use: Iterable[Path]) -> list[str]:
        """Delete versions that are neither current nor used by a container."""
        keep = {p.resolve() for p in in_use}
        removed = []
        with self._locked():
            keep |= {
                (self.root / os.readlink(p)).resolve()
                for p in self.root.iterdir()
                if p.is_symlink()
            }
            if self.versions_dir().is_dir():
                for version in self.versions_dir().iterdir():
                    if version.resolve() not in keep:
                        fsutil.remove_tree(version)
                        removed.append(version.name)
        return removed


def _packages(rootfs: Path) -> tuple[str, ...]:
    admindir = rootfs / "var/lib/dpkg"
    if not (admindir / "status").exists():
        return ()
    out = proc.run(
        ["dpkg-query", f"--admindir={admindir}", "-W", "-f", "${Package} ${Version}\\n"]
    ).stdout
    return tuple(sorted(line for line in out.splitlines() if line))
