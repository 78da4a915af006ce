"""Run by hostd's prerm on `remove`, once hostd has stopped (its files are still there).

With tenants left (a container directory under the state directory: a tenant, or data kept
by `hostctl user remove --keep-data`), it changes nothing: their containers keep running with
their network, and it says so. With none, it takes down what hostd made on the host for them:
the bridge, the nft table and the lxcfs mount. Tenants' data and ID ranges are never touched
here; postrm refuses a purge while any is left (only hostctl removes tenants)."""

import socket
import sys
from pathlib import Path

from hostd import config
from runtime import lxcfs, network
from runtime.records import Records


def answers(path: Path) -> bool:
    """Whether a hostd still listens on its admin socket (one started without systemd)."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def main() -> int:
    try:
        cfg = config.load()
        settings = cfg.runtime_settings()
    except Exception as e:  # a broken configuration must not stop the removal
        print(f"hostd: left the bridge and lxcfs of hostd as they are: {e}", file=sys.stderr)
        return 0
    root = Records(settings.state_dir).root
    left = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if left:
        print(
            f"hostd: {len(left)} tenant(s) keep their containers, data and ID ranges "
            f"({', '.join(left)}): install hostd again to manage them; "
            "before a purge, remove each with `hostctl user remove USER`"
        )
        return 0
    if answers(cfg.paths.admin_socket):
        print("hostd: a hostd still runs (not started by systemd): stop it, it has no files now")
        return 0
    try:
        if settings.network is not None:
            network.teardown_host(settings.network)
        lxcfs.stop(settings.lxcfs)
    except Exception as e:
        print(f"hostd: could not take down hostd's bridge or lxcfs: {e}", file=sys.stderr)
        return 0
    print("hostd: no tenants left: took down hostd's bridge, nft table and lxcfs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
