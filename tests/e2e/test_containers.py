"""Inner containers as a developer runs them: restart policies across a tenant restart,
`docker run --privileged`, and Docker in Docker (a nested `docker run` inside a privileged inner
container), on a tenant made by `hostctl user add` with quotas, over SSH."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.conftest import wait_inside
from tests.hostd_harness import Hostd, Login

# Ends on SIGTERM (a plain `sleep` as PID 1 ignores it and makes every stop wait 10 s).
IDLE = "sh -c 'trap \"exit 0\" TERM; sleep 100000 & wait'"
CAP_SYS_ADMIN = 21


@contextlib.contextmanager
def _cleaned_up(dev: Login, script: str) -> Iterator[None]:
    """Run the shell `script` (removing inner containers...) afterwards, on failure too."""
    try:
        yield
    finally:
        dev.ssh(script)


def _states(dev: Login, names: str) -> dict[str, str]:
    """Inner container name -> `status started-at`, as `docker inspect` reports them."""
    out = dev.sh(
        f"docker inspect -f '{{{{.Name}}}} {{{{.State.Status}}}} {{{{.State.StartedAt}}}}' {names}"
    )
    return {line.split()[0].lstrip("/"): " ".join(line.split()[1:]) for line in out.splitlines()}


def test_restart_policies_across_a_tenant_restart(dev: Login, hostd: Hostd) -> None:
    names = "e2e-always e2e-unless e2e-never"
    with _cleaned_up(dev, f"docker rm -f {names}"):
        for name, policy in zip(names.split(), ("always", "unless-stopped", "no"), strict=True):
            dev.sh(f"docker run -d --name {name} --restart={policy} busybox:local {IDLE}")
        before = _states(dev, names)
        assert all(s.startswith("running ") for s in before.values()), before
        hostd.hostctl("restart", dev.user)  # hostd-docker-boot starts dockerd: restart policies
        wait_inside(
            dev,
            "[ \"$(docker inspect -f '{{.State.Running}}' e2e-always e2e-unless | sort -u)\""
            " = true ]",
            "restart of the --restart=always/unless-stopped containers",
            diagnose="docker ps -a; docker logs e2e-always; docker logs e2e-unless",
        )
        after = _states(dev, names)
        for name in ("e2e-always", "e2e-unless"):  # running again, started anew
            assert after[name] != before[name], (name, before, after)
        assert after["e2e-never"].startswith("exited "), after


def test_privileged_inner_container(dev: Login) -> None:
    """Root of a privileged inner container has every capability and mounts filesystems."""
    mount = "mkdir /m && mount -t tmpfs e2e /m && echo in-tmpfs > /m/f && cat /m/f"
    caps = "grep CapEff /proc/self/status"
    out = dev.sh(f"docker run --rm --privileged busybox:local sh -c '{mount} && {caps}'")
    assert "in-tmpfs" in out, out
    privileged = int(out.split("CapEff:")[1].split()[0], 16)
    plain = int(dev.sh(f"docker run --rm busybox:local {caps}").split()[1], 16)
    assert privileged & (1 << CAP_SYS_ADMIN) and not plain & (1 << CAP_SYS_ADMIN)
    assert (privileged & plain) == plain and privileged != plain, (hex(privileged), hex(plain))
    refused = dev.ssh(f"docker run --rm busybox:local sh -c '{mount}'")
    assert refused.returncode != 0, "a tmpfs mount worked without --privileged"
    # ...and all of that within the tenant's user namespace: a host-wide knob stays the host's
    knob = Path("/proc/sys/vm/swappiness")
    host_value = knob.read_text()
    write = f"echo {int(host_value) // 2 + 1} > {knob}"
    assert dev.ssh(f"docker run --rm --privileged busybox:local sh -c '{write}'").returncode
    assert knob.read_text() == host_value


# The tenant's own Docker, run from its /usr (bound read-only) in a busybox image: there is no
# registry to pull a dind image from. Debian's /usr/sbin/iptables leads to /etc/alternatives.
DIND_IMAGE = "FROM busybox:local\nRUN ln -s usr/lib /lib && ln -s usr/lib64 /lib64\n"
DIND_RUN = (
    "docker run -d --name e2e-dind --privileged -v /usr:/usr:ro"
    " -v /etc/alternatives:/etc/alternatives:ro -v e2e-dind-data:/var/lib/docker"
    " -v ~/dind:/images:ro e2e-dind:local dockerd"
)


def test_docker_in_docker(dev: Login) -> None:
    """A nested dockerd (bridge network, iptables, overlay2 on a volume) in a privileged inner
    container runs a container of its own."""
    cleanup = "docker rm -f e2e-dind; docker volume rm e2e-dind-data; docker rmi e2e-dind:local"
    with _cleaned_up(dev, f"{cleanup}; rm -rf dind"):
        dev.sh(
            f"mkdir -p dind && printf '{DIND_IMAGE}' > dind/Dockerfile"
            " && docker build -q -t e2e-dind:local dind"
            " && docker save -o dind/busybox.tar busybox:local"
        )
        dev.sh(DIND_RUN)
        wait_inside(
            dev,
            "docker exec e2e-dind docker info",
            "nested dockerd answering",
            diagnose="docker ps -a; docker logs e2e-dind 2>&1 | tail -20",
        )
        nested = "docker exec e2e-dind docker"
        assert dev.sh(f"{nested} info --format '{{{{.Driver}}}}'").strip() == "overlay2"
        dev.sh(f"{nested} load -i /images/busybox.tar")
        assert dev.sh(f"{nested} run --rm busybox:local echo nested") == "nested\n"
