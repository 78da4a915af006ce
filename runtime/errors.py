"""The one error type users of the runtime see: a cause and the fix, on one line."""


class RuntimeFailure(Exception):
    """Something the caller can act on. str() is `<cause>: <fix>`, never a traceback."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}: {fix}")
        self.cause = cause
        self.fix = fix
