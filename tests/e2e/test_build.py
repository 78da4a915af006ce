"""`docker build` as a developer runs it first: BuildKit (the default) and the legacy builder,
on a tenant whose /var/lib/docker lies on its capped volume."""

from __future__ import annotations

from tests.hostd_harness import Login

TEN_LAYERS = "FROM busybox:local\n" + "".join(f"RUN echo {i} > /f{i}\n" for i in range(10))


def test_buildkit_build_on_the_volume(dev: Login) -> None:
    """Docker 20.10's BuildKit failed here on a volume mounted nosuid,nodev by the host."""
    dev.sh(f"mkdir -p ctx-bk && printf '{TEN_LAYERS}' > ctx-bk/Dockerfile")
    dev.sh("docker build -q -t bk:1 ctx-bk")
    assert dev.sh("docker run --rm bk:1 cat /f9").strip() == "9"


def test_legacy_builder(dev: Login) -> None:
    dev.sh(f"mkdir -p ctx-legacy && printf '{TEN_LAYERS}' > ctx-legacy/Dockerfile")
    dev.sh("DOCKER_BUILDKIT=0 docker build -q -t legacy:1 ctx-legacy")
    assert dev.sh("docker run --rm legacy:1 cat /f0").strip() == "0"
