"""Backend options, declared once per backend as a frozen dataclass and parsed here.

A backend declares its ``[section]`` keys with their types and defaults::

    @dataclass(frozen=True)
    class MyOptions:
        url: str | None = None
        offline: bool = False

    class MyBackend:
        options = option_names(MyOptions)
        def __init__(self, options=None):
            self.opts = parse_options(MyOptions, options, backend="mytracker")

Unknown keys are a ``ConfigError`` with a did-you-mean suggestion; a boolean accepts
``true/false, 1/0, yes/no, on/off`` (environment strings); an empty string means "not set".
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["DEFAULT_PROJECT", "check_unknown", "close_matches", "did_you_mean", "option_names", "parse_bool",
           "parse_options", "project_for"]

DEFAULT_PROJECT = "default"  # the project ct.init gives when none is named (config.Settings.project)

T = TypeVar("T")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def close_matches(word: str, candidates: Iterable[str]) -> list[str]:
    """The (at most two) candidates closest to a mistyped ``word``."""
    return difflib.get_close_matches(word, sorted(candidates), n=2, cutoff=0.6)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest candidates, or an empty string."""
    matches = close_matches(word, candidates)
    return f" Did you mean {' or '.join(map(repr, matches))}?" if matches else ""


def parse_bool(value: Any, what: str) -> bool:
    """A boolean from a TOML bool or an environment word; ``ConfigError`` naming ``what``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # TOML `offline = 1`
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ConfigError(f"{what} must be true or false (1/0, yes/no, on/off), got {value!r}")


def option_names(cls: type) -> frozenset[str]:
    """The keys an options dataclass declares (what ``config.py`` typo-checks against)."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def check_unknown(backend: str, given: Iterable[str], known: Iterable[str], note: str = "") -> None:
    """``ConfigError`` for keys of ``[backend]`` that the backend does not declare."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        hint = "".join(did_you_mean(k, known) for k in unknown)
        raise ConfigError(f"{backend} backend: unknown option(s) {unknown}; known: {known}{note}.{hint}")


def _coerce(value: Any, hint: Any, what: str) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and not value.strip()):
        return None if optional else value
    if base is bool:
        return parse_bool(value, what)
    if base is int and not isinstance(value, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be an integer, got {value!r}") from None
    if base is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if base is str:
        if isinstance(value, os.PathLike):  # a directory given as a Path
            return os.fspath(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{what} must be a string, got {value!r}")
    return value  # any other declared type is passed through for the backend to check


def parse_options(cls: type[T], options: Mapping[str, Any] | None, *, backend: str, note: str = "") -> T:
    """``cls`` filled from ``options`` (a config section): unknown keys refused, values coerced
    to the declared types; ``note`` is appended to the unknown-key message."""
    options = dict(options or {})
    check_unknown(backend, options, option_names(cls), note)
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"[{backend}] {k}") for k, v in options.items()}
    return cls(**values)


def project_for(configured: str | None, given: str, sdk: str | None) -> str:
    """The project a tracker run goes into: the backend's own ``project`` setting, else the
    ``ct.init(project=)`` one when it names one, else the tracker SDK's own setting (such as
    ``WANDB_PROJECT``), else ckpt_track's default project.

    >>> project_for(None, "default", "from-sdk"), project_for(None, "resnet", "from-sdk")
    ('from-sdk', 'resnet')
    """
    if configured:
        return configured
    if given != DEFAULT_PROJECT or not sdk:
        return given
    return sdk

