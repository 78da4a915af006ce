"""The errors users of the runtime and hostd see: a cause and the fix, on one line, and a code
that says what kind of failure it is (it travels over hostd's socket as data)."""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Something the caller can act on. str() is `<cause>: <fix>`, never a traceback.

    `code` names the kind: `invalid` (bad input or a host that cannot do it), `not_found`,
    `conflict` (exists already, or in use), `busy` (try again later), `internal` (a bug)."""

    code = "invalid"

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}: {fix}")
        self.cause = cause
        self.fix = fix


class NotFound(RuntimeFailure):
    """What was named does not exist (a container, an image, a tenant)."""

    code = "not_found"


class Conflict(RuntimeFailure):
    """It exists already, overlaps, or is in use by something else."""

    code = "conflict"


class Busy(RuntimeFailure):
    """Something else is doing it right now: try again later."""

    code = "busy"


class Internal(RuntimeFailure):
    """A bug or an unexpected failure: the details are in hostd's log."""

    code = "internal"


ERROR_CODES: dict[str, type[RuntimeFailure]] = {
    cls.code: cls for cls in (RuntimeFailure, NotFound, Conflict, Busy, Internal)
}
