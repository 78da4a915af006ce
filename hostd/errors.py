"""Errors hostd shows users: the runtime's one-line `<cause>: <fix>` form."""

from runtime.errors import RuntimeFailure


class HostdError(RuntimeFailure):
    """A failure of hostd's own (configuration, users, state): cause and fix on one line."""
