"""The private dockerd of a system container does everything a user expects of Docker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from runtime.containers import Runtime
from runtime.execs import ExecSpec
from tests.conftest import INNER_DRIVER, load_busybox, next_range, sh
from tests.hostd_harness import wait_for


def _output(rt: Runtime, name: str, script: str) -> str:
    """What `script` printed inside, or "" if it failed: for polls of a service starting."""
    res = rt.exec(name, ExecSpec(["sh", "-c", script]), timeout=60)
    return res.stdout if res.returncode == 0 else ""


@pytest.fixture(scope="module")
def dind(rt: Runtime, busybox_tar: Path) -> Iterator[str]:
    name = f"dind{os.getpid()}"
    rt.create(name, "default", next_range())
    try:
        rt.start(name)
        rt.wait_ready(name)
        load_busybox(rt, name, busybox_tar)
        yield name
    finally:
        rt.delete(name, force=True)


def test_storage_driver_is_native_overlay(rt: Runtime, dind: str) -> None:
    assert sh(rt, dind, "docker info --format '{{.Driver}}'").strip() == INNER_DRIVER


def test_docker_run(rt: Runtime, dind: str) -> None:
    assert sh(rt, dind, "docker run --rm busybox:local echo hello from inside").strip() == (
        "hello from inside"
    )


def test_docker_build(rt: Runtime, dind: str) -> None:
    dockerfile = "FROM busybox:local\nRUN echo built > /built.txt\nCMD cat /built.txt\n"
    sh(rt, dind, f"mkdir -p /tmp/ctx && printf '{dockerfile}' > /tmp/ctx/Dockerfile")
    sh(rt, dind, "docker build -q -t built:1 /tmp/ctx")
    assert sh(rt, dind, "docker run --rm built:1").strip() == "built"


def test_docker_run_publish(rt: Runtime, dind: str) -> None:
    sh(
        rt,
        dind,
        "docker run -d --name web-p -p 8080:80 busybox:local sh -c "
        "'mkdir /www && echo published > /www/index.html && httpd -f -p 80 -h /www'",
    )
    try:
        out = wait_for(partial(_output, rt, dind, "curl -fsS http://127.0.0.1:8080/"), 10, "web-p")
        assert "published" in out
    finally:
        sh(rt, dind, "docker rm -f web-p")


def test_docker_exec(rt: Runtime, dind: str) -> None:
    sh(rt, dind, "docker run -d --name sleeper busybox:local sleep 600")
    try:
        assert sh(rt, dind, "docker exec sleeper sh -c 'echo $((6*7))'").strip() == "42"
    finally:
        sh(rt, dind, "docker rm -f sleeper")


def test_docker_volume(rt: Runtime, dind: str) -> None:
    sh(rt, dind, "docker volume create vol1")
    sh(rt, dind, "docker run --rm -v vol1:/data busybox:local sh -c 'echo kept > /data/f'")
    assert sh(rt, dind, "docker run --rm -v vol1:/data busybox:local cat /data/f").strip() == "kept"
    sh(rt, dind, "mkdir -p /srv/bind && echo from-host-dir > /srv/bind/f")
    out = sh(rt, dind, "docker run --rm -v /srv/bind:/b busybox:local cat /b/f")
    assert out.strip() == "from-host-dir"


def test_docker_network_by_name(rt: Runtime, dind: str) -> None:
    sh(rt, dind, "docker network create net1")
    sh(
        rt,
        dind,
        "docker run -d --name server --network net1 busybox:local sh -c "
        "'mkdir /www && echo by-name > /www/index.html && httpd -f -p 80 -h /www'",
    )
    try:
        fetch = "docker run --rm --network net1 busybox:local wget -qO- http://server/"
        out = wait_for(partial(_output, rt, dind, fetch), 30, "server by name on net1")
        assert "by-name" in out
    finally:
        sh(rt, dind, "docker rm -f server && docker network rm net1")


def test_docker_run_privileged(rt: Runtime, dind: str) -> None:
    out = sh(rt, dind, "docker run --rm --privileged busybox:local sh -c 'mount | grep -c sysfs'")
    assert int(out.strip()) >= 1


def test_stop_start_keeps_images_and_containers(rt: Runtime, dind: str) -> None:
    sh(rt, dind, "docker create --name keepme busybox:local true")
    rt.stop(dind)
    assert rt.state(dind).status == "stopped"
    rt.start(dind)
    rt.wait_ready(dind)
    assert "busybox:local" in sh(rt, dind, "docker images --format '{{.Repository}}:{{.Tag}}'")
    assert "keepme" in sh(rt, dind, "docker ps -a --format '{{.Names}}'")


def test_docker_service_starts_without_warnings(rt: Runtime, dind: str) -> None:
    """Failed-start reasons quote the journal: docker.service must not fill it with noise."""
    sh(rt, dind, "docker info >/dev/null")
    journal = sh(rt, dind, "journalctl -b -u docker.service --no-pager -o cat")
    assert "Started docker.service" in journal
    assert "Referenced but unset environment variable" not in journal
