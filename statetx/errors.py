"""Exception classes. Every message names the offending key, value or file, and what to do."""

from __future__ import annotations


class StatetxError(Exception):
    """Base class of statetx's own errors."""


class SplitConfigError(StatetxError, ValueError):
    """The TOML split specification itself is invalid."""


class DataError(StatetxError, ValueError):
    """The data contradict the split specification or the options."""


class ConfigError(StatetxError, ValueError):
    """An option value is invalid."""
