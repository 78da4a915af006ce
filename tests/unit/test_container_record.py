"""What meta.json records about a container, and the undo log of half-done operations."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.containers import Runtime
from runtime.errors import RuntimeFailure
from runtime.ids import IdRange
from runtime.records import Container
from runtime.settings import RootfsMode, Settings
from runtime.storage import prepare_state_dir
from runtime.undo import Undo


def make_container(mode: RootfsMode = RootfsMode.IDMAPPED) -> Container:
    return Container(
        name="alice",
        image="default",
        image_dir="/state/images/.versions/default@20240501T101010-42",
        ids=IdRange(231072),
        hostname="alice",
        rootfs_mode=mode,
        created="2024-05-01T10:10:10Z",
    )


@pytest.mark.parametrize("mode", [RootfsMode.IDMAPPED, RootfsMode.COPY])
def test_container_survives_meta_json(mode: RootfsMode) -> None:
    c = make_container(mode)
    back = Container.from_json(c.to_json())
    assert back == c
    assert type(back.rootfs_mode) is RootfsMode


def test_meta_json_stores_plain_values() -> None:
    data = json.loads(make_container().to_json())
    assert data["ids"] == 231072
    assert data["rootfs_mode"] == "idmapped"


def test_meta_json_with_an_unsafe_range_is_refused() -> None:
    data = json.loads(make_container().to_json())
    with pytest.raises(RuntimeFailure, match="root"):
        Container.from_json(json.dumps({**data, "ids": 0}))


class Boom(Exception):
    pass


def run_undo(steps: list[str], fail_with: Exception | None, broken: str = "") -> None:
    """Push steps a, b, c (each appends its name to `steps`), then fail or not."""

    def step(name: str) -> None:
        steps.append(name)
        if name == broken:
            raise OSError(f"{name} broke")

    with Undo() as undo:
        for name in ("a", "b", "c"):
            undo.push(step, name)
        if fail_with is not None:
            raise fail_with


def test_undo_does_nothing_on_success() -> None:
    steps: list[str] = []
    run_undo(steps, fail_with=None)
    assert steps == []


def test_undo_runs_steps_in_reverse_on_failure_and_reraises() -> None:
    steps: list[str] = []
    with pytest.raises(Boom):
        run_undo(steps, fail_with=Boom())
    assert steps == ["c", "b", "a"]


def test_undo_keeps_going_past_a_failing_step(caplog: pytest.LogCaptureFixture) -> None:
    steps: list[str] = []
    with caplog.at_level(logging.ERROR), pytest.raises(Boom):
        run_undo(steps, fail_with=Boom(), broken="b")
    assert steps == ["c", "b", "a"]
    assert "b broke" in caplog.text


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory others may pass, under /tmp (pytest's own tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="hostd-unit-"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base)


def test_state_dir_is_made_passable_whatever_the_umask(open_base: Path) -> None:
    old = os.umask(0o077)
    try:
        prepare_state_dir(open_base / "var" / "state")
    finally:
        os.umask(old)
    for d in (open_base / "var", open_base / "var" / "state"):
        assert d.stat().st_mode & 0o777 == 0o711
    prepare_state_dir(open_base / "var" / "state")  # again: nothing to do


def test_a_closed_state_dir_of_hostd_is_opened_to_passing(open_base: Path) -> None:
    (open_base / "state").mkdir(mode=0o700)
    (open_base / "state").chmod(0o700)
    prepare_state_dir(open_base / "state")
    assert (open_base / "state").stat().st_mode & 0o777 == 0o711


@pytest.mark.parametrize("closed", ["home", "home/state"])
def test_a_closed_directory_on_the_way_is_refused_before_anything_is_made(
    open_base: Path, closed: str
) -> None:
    (open_base / "home" / "state").mkdir(parents=True)
    (open_base / closed).chmod(0o700)
    with pytest.raises(
        RuntimeFailure,
        match=rf"{open_base / closed} \(mode 0700\) is closed"
        rf".*chmod o\+x {open_base / closed}",
    ):
        prepare_state_dir(open_base / "home" / "state" / "hostd")
    assert not (open_base / "home" / "state" / "hostd").exists()


def test_the_runtime_prepares_its_state_dir_once_not_per_request(open_base: Path) -> None:
    state = open_base / "state"
    rt = Runtime(Settings(state))
    assert state.stat().st_mode & 0o777 == 0o711
    state.chmod(0o700)  # changed behind its back: requests (under the lock) leave it so
    assert rt.prune_images() == []
    assert state.stat().st_mode & 0o777 == 0o700
