"""`docker build` as a developer runs it first: BuildKit (the default), the legacy builder, cache
mounts across builds, buildx; on a tenant whose /var/lib/docker lies on its capped volume. And
the same on the older debian12 image (Docker 20.10), which must keep working."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import add_developer, context
from tests.hostd_harness import Hostd, Login, UnixUsers

TEN_LAYERS = "FROM busybox:local\n" + "".join(f"RUN echo {i} > /f{i}\n" for i in range(10))

# Two stages; the first lists what earlier builds left in its cache mount, then adds to it.
# RUN_ID is part of the RUN step's cache key, so each build really runs it.
CACHE_MOUNT = """FROM busybox:local AS build
ARG RUN_ID
RUN --mount=type=cache,target=/root/.cache/e2e ls /root/.cache/e2e > /seen \\
 && touch /root/.cache/e2e/from-$RUN_ID
FROM busybox:local
COPY --from=build /seen /seen
"""


def buildkit_build(login: Login, ctx: str, tag: str) -> None:
    """`docker build` with the client's defaults; it must be BuildKit that ran (its plain
    progress names the internal steps; the legacy builder prints `Step 1/N`)."""
    out = login.sh(f"docker build --progress=plain -t {tag} {ctx} 2>&1")
    assert "[internal] load build definition from Dockerfile" in out, out[-2000:]


def test_buildkit_build_on_the_volume(dev: Login) -> None:
    """Docker 20.10's BuildKit failed here on a volume mounted nosuid,nodev by the host."""
    buildkit_build(dev, context(dev, "ctx-bk", TEN_LAYERS), "bk:1")
    assert dev.sh("docker run --rm bk:1 cat /f9").strip() == "9"


def test_legacy_builder(dev: Login) -> None:
    ctx = context(dev, "ctx-legacy", TEN_LAYERS)
    dev.sh(f"DOCKER_BUILDKIT=0 docker build -q -t legacy:1 {ctx}")
    assert dev.sh("docker run --rm legacy:1 cat /f0").strip() == "0"


def test_cache_mount_persists_between_builds(dev: Login) -> None:
    """A multi-stage build with `RUN --mount=type=cache`: the second build sees what the first
    left in the cache (the volume keeps BuildKit's cache between builds)."""
    ctx = context(dev, "ctx-cache", CACHE_MOUNT)
    for run in (1, 2):
        dev.sh(f"docker build -q --build-arg RUN_ID={run} -t cached:{run} {ctx}")
    assert dev.sh("docker run --rm cached:1 cat /seen").split() == []
    assert dev.sh("docker run --rm cached:2 cat /seen").split() == ["from-1"]


def test_buildx_build_load(dev: Login) -> None:
    """`docker buildx` is installed, its default builder is the tenant's Docker, and
    `--load` puts the result in the image store."""
    builders = dev.sh("docker buildx ls")
    assert re.search(r"^default\s*\*.*\bdocker\b", builders, re.M), builders
    assert "running" in builders, builders
    ctx = context(dev, "ctx-buildx", "FROM busybox:local\nRUN echo buildx > /built\n")
    dev.sh(f"docker buildx build --load -q -t bx:1 {ctx}")
    assert dev.sh("docker run --rm bx:1 cat /built") == "buildx\n"


@pytest.fixture(scope="module")
def old_dev(
    hostd: Hostd,
    unix_users: UnixUsers,
    tmp_path_factory: pytest.TempPathFactory,
    busybox_tar: Path,
) -> Iterator[Login]:
    """A developer on the debian12 image, built for this module and removed after it (with
    every tenant on it, even one whose creation failed half-way)."""
    hostd.hostctl("image", "build", "debian12")
    try:
        yield add_developer(
            hostd, unix_users, tmp_path_factory.mktemp("old"), busybox_tar, "--image", "debian12"
        )
    finally:
        tenants = json.loads(hostd.hostctl("--json", "user", "list").stdout)
        for tenant in tenants:
            if tenant["image"] == "debian12":
                hostd.hostctl("user", "remove", tenant["user"], check=False)
        hostd.hostctl("image", "remove", "debian12")


def test_debian12_buildkit_on_the_volume(old_dev: Login) -> None:
    """The image Docker 20.10 comes from still builds with BuildKit on the capped volume: the
    volume and Docker's binds no longer carry the nosuid/nodev flags its BuildKit drops."""
    version = old_dev.sh("docker version --format '{{.Server.Version}}'")
    assert version.startswith("20.10."), version
    buildkit_build(old_dev, context(old_dev, "ctx-old", TEN_LAYERS), "old:1")
    assert old_dev.sh("docker run --rm old:1 cat /f9").strip() == "9"
