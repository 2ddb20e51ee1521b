"""Which statetx command is running, for messages whose advice differs between the command line
and Python (standard library only: the command line sets it before importing NumPy)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# the statetx command running (e.g. "tx train"; set by statetx.cli.main), None from Python
_COMMAND: ContextVar[str | None] = ContextVar("statetx_command", default=None)


@contextmanager
def command_line(command: str) -> Iterator[None]:
    """Within: messages say the command line's form of an advice (flags, ``key=value``
    overrides) instead of Python's (:func:`on_command_line`)."""
    token = _COMMAND.set(command)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def on_command_line() -> str | None:
    """The statetx command running (``"tx train"``, ``"filter_on_target_knockdown"``, ...), or
    None when statetx is used from Python."""
    return _COMMAND.get()
