"""`docker compose` as a developer runs it: a 3-service project with a service built from a
Dockerfile, services reaching each other by name on a user-defined network, a named volume that
outlives `down`, and a published port reached from the host through a port grant."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from collections.abc import Iterator

from tests.hostd_harness import Hostd, Login, free_port

WEB_DOCKERFILE = """\
FROM busybox:local
COPY status /www/cgi-bin/status
RUN chmod +x /www/cgi-bin/status
CMD ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
"""
# Asks the two other services, by name, what they hold.
WEB_STATUS = """\
#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
echo "boots=$(wget -qO- http://db/boots | wc -l) cache=$(wget -qO- http://cache/)"
"""
COMPOSE = """\
services:
  web:
    build: web
    ports: ["{port}:8080"]
    networks: [back]
    depends_on: [db, cache]
    healthcheck:
      test: ["CMD", "wget", "-qO-", "http://127.0.0.1:8080/cgi-bin/status"]
      interval: 1s
      retries: 60
  db:
    image: busybox:local
    command: ["sh", "-c", "echo up >> /data/boots && echo db ready && exec httpd -f -h /data"]
    volumes: ["data:/data"]
    networks: [back]
  cache:
    image: busybox:local
    command:
      - sh
      - -c
      - mkdir /www && echo hot > /www/index.html && echo cache ready && exec httpd -f -h /www
    networks: [back]
networks:
  back: {{}}
volumes:
  data: {{}}
"""
COMPOSE_CMD = "cd shop && docker compose -p shop"
UP = f"{COMPOSE_CMD} up -d --wait --wait-timeout 120"


def _status(port: int) -> str:
    """What the project's web service answers on the host's `port`."""
    url = f"http://127.0.0.1:{port}/cgi-bin/status"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode()).strip()


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextlib.contextmanager
def _project(dev: Login, port: int) -> Iterator[None]:
    """The project's files in ~/shop; everything it made (containers, network, volume, built
    image) and the files removed afterwards, on failure too."""
    files = {
        "shop/compose.yaml": COMPOSE.format(port=port),
        "shop/web/Dockerfile": WEB_DOCKERFILE,
        "shop/web/status": WEB_STATUS,
    }
    try:
        for path, text in files.items():
            dev.sh(f"mkdir -p $(dirname {path}) && cat > {path}", input=text.encode())
        yield
    finally:
        dev.ssh(f"{COMPOSE_CMD} down -v --rmi local; cd && rm -rf shop")


def test_compose_up_build_network_volume_port(dev: Login, hostd: Hostd) -> None:
    port = free_port()
    with _project(dev, port):
        dev.sh(UP)  # builds web, starts db and cache, waits for web's health check
        ps = dev.sh(f"{COMPOSE_CMD} ps --format '{{{{.Service}}}} {{{{.State}}}} {{{{.Health}}}}'")
        running = sorted(line.strip() for line in ps.splitlines())
        assert running == ["cache running", "db running", "web running healthy"], ps
        logs = dev.sh(f"{COMPOSE_CMD} logs --no-color db cache")
        assert "db ready" in logs and "cache ready" in logs, logs

        assert _refused(port), f"port {port} reached the tenant before it was granted"
        hostd.hostctl("ports", "grant", dev.user, str(port))
        try:
            assert _status(port) == "boots=1 cache=hot"
            dev.sh(f"{COMPOSE_CMD} down")  # keeps the named volume
            assert not dev.sh(f"{COMPOSE_CMD} ps -a -q").strip()
            dev.sh(UP)
            assert _status(port) == "boots=2 cache=hot", "the named volume lost its data"
        finally:
            hostd.hostctl("ports", "revoke", dev.user, str(port))

        dev.sh(f"{COMPOSE_CMD} down -v --rmi local")
        mine = "-q -f label=com.docker.compose.project=shop"
        left = dev.sh(
            f"docker ps -a {mine}; docker volume ls {mine}; docker network ls {mine};"
            " docker images -q shop-web"
        )
        assert not left.strip(), f"`down -v --rmi local` left: {left}"
