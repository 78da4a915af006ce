"""Image recipes and manifests: the files describing images, read without building any."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from runtime.errors import RuntimeFailure
from runtime.images import ImageStore, Manifest, Recipe
from runtime.settings import DEFAULT_RECIPES

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


def test_default_is_debian13_with_a_current_docker() -> None:
    recipe = Recipe.load(DEFAULT_RECIPES / "default")
    assert (recipe.name, recipe.alias_of, recipe.suite) == ("default", "debian13", "trixie")
    assert recipe.mirror.startswith("http")
    wanted = {"systemd", "systemd-sysv", "docker.io", "docker-cli", "docker-buildx"}
    assert wanted | {"docker-compose", "containerd", "runc"} <= set(recipe.packages)
    assert recipe.directory == DEFAULT_RECIPES / "debian13"  # its files/ too
    assert recipe.setup.is_file()  # what build() runs in the chroot
    daemon = json.loads((recipe.directory / "files/etc/docker/daemon.json").read_text())
    assert daemon == {"storage-driver": "overlay2"}  # measured fastest: docs/benchmarks.md


def test_debian12_recipe_ships_with_the_same_setup() -> None:
    recipe = Recipe.load(DEFAULT_RECIPES / "debian12")
    assert (recipe.suite, recipe.alias_of) == ("bookworm", None)
    assert recipe.setup == DEFAULT_RECIPES / "debian13/setup.sh"
    assert recipe.setup.is_file() and recipe.directory == DEFAULT_RECIPES / "debian12"


def test_recipes_ship_without_symlinks() -> None:
    """A wheel copies symlinks as files: sharing is written in recipe.toml instead."""
    assert [p for p in DEFAULT_RECIPES.rglob("*") if p.is_symlink()] == []


def test_an_alias_names_a_real_recipe(tmp_path: Path) -> None:
    for name, text in (("a", 'alias_of = "b"\n'), ("b", 'alias_of = "c"\n'), ("c", MINIMAL)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.toml").write_text(text)
    assert Recipe.load(tmp_path / "b").alias_of == "c"
    with pytest.raises(RuntimeFailure, match="c instead"):
        Recipe.load(tmp_path / "a")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "recipe.toml").write_text('alias_of = "missing"\n')
    assert "missing/recipe.toml" in load_failure(tmp_path / "d").cause


def test_recipes_are_listed_with_what_is_built(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", DEFAULT_RECIPES, tmp_path / "cache")
    summaries = store.recipe_summaries()
    assert [r["recipe"] for r in summaries] == ["debian12", "debian13", "default"]
    assert all(r["description"] and r["built"] is None for r in summaries)


def test_variant_and_packages_have_defaults(tmp_path: Path) -> None:
    recipe = Recipe.load(recipe_dir(tmp_path, MINIMAL))
    assert (recipe.suite, recipe.mirror) == ("trixie", "http://mirror.example/debian")
    assert (recipe.variant, recipe.packages) == ("minbase", ())


def test_unknown_recipe_names_the_ones_there_are(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", DEFAULT_RECIPES, tmp_path / "cache")
    with pytest.raises(RuntimeFailure) as info:
        store.recipe("nope")
    assert info.value.cause == "no image recipe 'nope' (recipes: debian12, debian13, default)"
    with pytest.raises(RuntimeFailure, match="invalid recipe name"):
        store.recipe("../etc")


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
