"""On/off switches read from the environment (``HERD_COMPILE=1``, ``HERD_GRAPH_GEMV=0``, ...), one parser for
all of them, so every switch accepts the same spellings and a typo is an error rather than silently "on"."""

from __future__ import annotations

import os

from .errors import ConfigError

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_switch(name: str, default: bool) -> bool:
    """The value of environment switch `name` (unset or empty: `default`)."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise ConfigError(f"environment variable {name}={os.environ[name]!r}: expected one of {', '.join(_ON + _OFF)}")
