"""What each setting accepts: one coercer per key, turning a raw value (a keyword argument,
a TOML value, or an environment string still to be parsed) into the field's type.

Kept apart from :mod:`ckpt_track.config` (sources, precedence, the records) because the
tables here are the one place a new setting's type is declared; the error texts name the
source of the bad value, so a user knows which file or variable to fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import ConfigError
from .options import parse_bool

__all__ = ["RETENTION", "RETENTION_FIELDS", "SOURCE_KWARG", "TOP_FIELDS", "Coercer", "Invalid", "coerce", "where"]

SOURCE_KWARG = "kwarg"


class Invalid(Exception):
    """Internal: a value does not fit its field; ``expected`` says what would."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


# A coercer turns a raw value into the field's type.  ``from_env`` is True when
# the value is an environment string that still has to be parsed.
Coercer = Callable[[Any, bool], Any]

_NONE_WORDS = frozenset({"", "none"})
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def is_none_word(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in _NONE_WORDS


def _as_backend(value: Any, from_env: bool) -> tuple[str, ...]:
    expected = "a backend name or a list of backend names" + (
        " (comma-separated)" if from_env else ""
    )
    if isinstance(value, str):
        parts: list[Any] = value.split(",") if from_env else [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise Invalid(expected)
    names: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise Invalid(expected)
        name = part.strip()
        if not name:
            if from_env:  # tolerate "mlflow," and "a,,b" in a shell variable
                continue
            raise Invalid(expected + " (names must not be empty)")
        if name not in names:  # listing a backend twice must not log twice
            names.append(name)
    if not names:
        raise Invalid(expected + " (at least one)")
    return tuple(names)


def _as_str(value: Any, from_env: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("a non-empty string")
    return value


def _as_opt_str(value: Any, from_env: bool) -> str | None:
    # TOML has no null, so "" / "none" is how a file or variable switches it off
    if value is None or is_none_word(value):
        return None
    if not isinstance(value, str):
        raise Invalid("a string ('' or 'none' for no value)")
    return value


def _as_mode(value: Any, from_env: bool) -> str:
    if isinstance(value, str) and value.strip().lower() in ("min", "max"):
        return value.strip().lower()
    raise Invalid("'min' or 'max'")


def _as_distributed(value: Any, from_env: bool) -> str:
    """``auto`` (collective when a process group is initialized), ``on``, ``off``; a bool too."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "on", "off"):
        return value.strip().lower()
    try:
        return "on" if parse_bool(value, "") else "off"
    except ConfigError:
        raise Invalid("'auto', 'on' or 'off' (or a boolean)") from None


def _as_opt_mode(value: Any, from_env: bool) -> str | None:
    if value is None or is_none_word(value):
        return None
    return _as_mode(value, from_env)


def _as_pos_int(value: Any, from_env: bool) -> int:
    expected = "an integer >= 1"
    if from_env and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise Invalid(expected) from None
    # bool is an int subclass; `keep_last = true` is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid(expected)
    return value


def _as_opt_pos_int(value: Any, from_env: bool) -> int | None:
    if value is None or (from_env and is_none_word(value)):
        return None
    return _as_pos_int(value, from_env)


def _as_bool(value: Any, from_env: bool) -> bool:
    # only an environment string is a word to parse: a TOML string "yes" is a typed mistake
    if isinstance(value, bool) or (from_env and isinstance(value, str)):
        try:
            return parse_bool(value, "")
        except ConfigError:
            pass
    raise Invalid("a boolean" + (" (1/0, true/false, yes/no, on/off)" if from_env else ""))


def _as_size(value: Any, from_env: bool) -> int:
    expected = "a positive size in bytes, e.g. 1073741824, '512MB' or '2GiB'"
    if isinstance(value, bool):
        raise Invalid(expected)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise Invalid(expected)
        digits = match.group(1)
        # whole numbers stay exact ints; "1.5GiB" needs no sub-byte precision
        number = float(digits) if "." in digits else int(digits)
        value = int(number * _SIZE_UNITS[unit])
    if not isinstance(value, int) or value <= 0:
        raise Invalid(expected)
    return value


def _as_seconds(value: Any, from_env: bool) -> float:
    expected = "a number of seconds > 0, e.g. 10 or 2.5"
    if from_env and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise Invalid(expected) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise Invalid(expected)
    return float(value)


def _as_count(value: Any, from_env: bool) -> int:
    expected = "an integer >= 0"
    if from_env and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise Invalid(expected) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Invalid(expected)
    return value


TOP_FIELDS: dict[str, Coercer] = {
    "backend": _as_backend,
    "project": _as_str,
    "monitor": _as_opt_str,
    "mode": _as_mode,
    "shard_size": _as_size,
    "blocking": _as_bool,
    "overlap": _as_bool,
    "max_in_flight": _as_pos_int,
    "incremental": _as_bool,
    "timeout": _as_seconds,
    "retries": _as_count,
    "distributed": _as_distributed,
    "collective_timeout": _as_seconds,
}
RETENTION_FIELDS: dict[str, Coercer] = {
    "keep_last": _as_opt_pos_int,
    "keep_best": _as_opt_pos_int,
    "keep_every": _as_opt_pos_int,
    "metric": _as_opt_str,
    "mode": _as_opt_mode,
}
RETENTION = "retention"


def where(source: str) -> str:
    """Human wording for a ``sources`` entry."""
    if source == SOURCE_KWARG:
        return "keyword argument"
    if source.startswith("env:"):
        return f"environment variable {source[4:]}"
    if source.startswith("file:"):
        return f"config file {source[5:]}"
    return source


def coerce(coercer: Coercer, value: Any, label: str, source: str) -> Any:
    """``value`` as ``coercer`` makes it, or a ConfigError that names the key and the place
    it was set (an environment string is parsed, a typed value is only checked)."""
    try:
        return coercer(value, source.startswith("env:"))
    except Invalid as exc:
        raise ConfigError(
            f"invalid value {value!r} for {label!r} ({where(source)}): expected {exc.expected}"
        ) from None
