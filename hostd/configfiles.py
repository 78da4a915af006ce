"""Reading hostd.toml and its drop-ins: TOML syntax, files in name order, key by key, each value
with where it came from. `hostd.config` checks what is read against its schema; hostctl, which
needs only the admin socket, reads just that here (this module is cheap to import).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from hostd.errors import HostdError
from runtime.errors import RuntimeFailure

MAIN = Path("/etc/hostd/hostd.toml")
ADMIN_SOCKET = "/run/hostd/admin.sock"  # the default of [paths] admin_socket


class Setting(NamedTuple):
    """A value before checking, and where it came from, for error messages."""

    value: Any
    origin: str  # a file, or "default"
    text: str  # as written: '[runtime] rootfs_mode = "fast"' or 'SUB_UID_MIN 1000'

    def check(self, check: Callable[[Any], Any]) -> Any:
        if self.value is None:
            return None
        try:
            return check(self.value)
        except RuntimeFailure as exc:
            fix = exc.fix
        except ValueError as exc:
            fix = str(exc)
        raise HostdError(f"{self.origin}: {self.text} is invalid", fix)


def toml_setting(section: str, key: str, value: Any, origin: str) -> Setting:
    rendered = json.dumps(value, ensure_ascii=False, default=str)
    return Setting(value, origin, f"[{section}] {key} = {rendered}")


def check_path(value: Any) -> Path:
    if not isinstance(value, str) or not PurePosixPath(value).is_absolute() or "\0" in value:
        raise ValueError('use an absolute path (starting with "/")')
    return Path(value)


def read(main: Path = MAIN, dropin_dir: Path | None = None) -> dict[tuple[str, str], Setting]:
    """Every `[section] key = value` of `main` and its drop-ins (`<main>.d/*.toml`, by name),
    later files overriding earlier ones key by key. Missing files count as empty."""
    if dropin_dir is None:
        dropin_dir = main.with_name(main.name + ".d")
    given: dict[tuple[str, str], Setting] = {}
    for file in [main, *sorted(dropin_dir.glob("*.toml"), key=lambda p: p.name)]:
        given.update(_read_toml(file))
    return given


def admin_socket(main: Path = MAIN) -> Path:
    """Where hostd's admin socket is, as configured: all hostctl needs of the configuration."""
    setting = read(main).get(("paths", "admin_socket"))
    return Path(ADMIN_SOCKET) if setting is None else setting.check(check_path)


def _read_toml(file: Path) -> dict[tuple[str, str], Setting]:
    text = read_text(file)
    if text is None:
        return {}
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostdError(f"{file}: {exc}", "fix the TOML syntax") from None
    found = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise HostdError(
                f"{file}: {section} is outside any section", "put it under its [section] header"
            )
        for key, value in table.items():
            found[section, key] = toml_setting(section, key, value, str(file))
    return found


def read_text(path: Path) -> str | None:
    """The file's text, None if it does not exist."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostdError(
            f"cannot read {path} ({exc.strerror})", "make it a readable file"
        ) from None
    except UnicodeDecodeError:
        raise HostdError(f"{path} is not UTF-8 text", "fix or remove the file") from None
