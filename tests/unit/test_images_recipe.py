"""Image recipes and manifests: the files describing images, read without building any."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from runtime.containers import DEFAULT_RECIPES
from runtime.errors import RuntimeFailure
from runtime.images import Manifest, Recipe

MINIMAL = 'suite = "trixie"\nmirror = "http://mirror.example/debian"\n'


def recipe_dir(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "recipe.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return tmp_path


def load_failure(directory: Path) -> RuntimeFailure:
    with pytest.raises(RuntimeFailure) as info:
        Recipe.load(directory)
    assert "\n" not in str(info.value)
    return info.value


def test_default_recipe_builds_debian_with_systemd_and_docker() -> None:
    recipe = Recipe.load(DEFAULT_RECIPES / "default")
    assert recipe.directory == DEFAULT_RECIPES / "default"
    assert recipe.suite == "bookworm"
    assert recipe.mirror.startswith("http")
    assert {"systemd", "systemd-sysv", "docker.io"} <= set(recipe.packages)
    assert (recipe.directory / "setup.sh").is_file()  # what build() runs in the chroot


def test_variant_and_packages_have_defaults(tmp_path: Path) -> None:
    recipe = Recipe.load(recipe_dir(tmp_path, MINIMAL))
    assert (recipe.suite, recipe.mirror) == ("trixie", "http://mirror.example/debian")
    assert (recipe.variant, recipe.packages) == ("minbase", ())


def test_missing_recipe_says_where_it_looked(tmp_path: Path) -> None:
    failure = load_failure(tmp_path / "nope")
    assert failure.cause == f"no image recipe at {tmp_path / 'nope' / 'recipe.toml'}"


@pytest.mark.parametrize(
    ("content", "mentioned"),
    [
        (MINIMAL + "packages = [\n", "line"),  # unterminated array
        ('suite = "bookworm"\n', "mirror"),  # missing key
        (MINIMAL.encode() + b"# caf\xe9, saved as Latin-1\n", "utf-8"),
    ],
)
def test_bad_recipe_is_a_one_line_failure(
    tmp_path: Path, content: str | bytes, mentioned: str
) -> None:
    failure = load_failure(recipe_dir(tmp_path, content))
    assert failure.cause.startswith(f"bad image recipe {tmp_path / 'recipe.toml'}: ")
    assert mentioned in failure.cause


def test_manifest_survives_its_json_file() -> None:
    manifest = Manifest(
        name="default",
        version="20240501T101010-42",
        created="2024-05-01T10:10:10Z",
        source="debootstrap bookworm minbase from http://deb.debian.org/debian",
        size=512 * 2**20,
        packages=("bash 5.2.15-2+b2", "systemd 252.22-1~deb12u1"),
    )
    assert Manifest.from_json(json.loads(json.dumps(asdict(manifest)))) == manifest
