"""Settings for ckpt_track: keyword arguments, environment, config file, defaults.

Precedence, highest first::

    keyword arguments  >  CKPT_TRACK_* environment  >  config file  >  defaults

Merging is per key, also inside sections, so the environment can set
``retention.keep_last`` while the file sets ``retention.metric``.

The config file is ``$CKPT_TRACK_CONFIG`` when set, otherwise the first
``ckpt_track.toml`` (or ``pyproject.toml`` with a ``[tool.ckpt_track]`` table)
found searching upward from the working directory::

    backend = ["mlflow", "local"]
    monitor = "val/acc"
    mode = "max"
    shard_size = "512MB"

    [retention]
    keep_last = 3

    [mlflow]
    tracking_uri = "http://localhost:5000"

Environment variables are ``CKPT_TRACK_<KEY>`` for top-level keys and
``CKPT_TRACK_<SECTION>__<KEY>`` for section keys.  Every key from every source
is validated: a typo is an error with a suggestion, never silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ckpt_track.errors import ConfigError, UnknownBackend

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "CONFIG_FILENAME",
    "ENV_PREFIX",
    "NON_SETTING_ENV",
    "Retention",
    "Settings",
    "find_config_file",
    "load_settings",
]

ENV_PREFIX = "CKPT_TRACK_"
CONFIG_FILENAME = "ckpt_track.toml"
PYPROJECT_FILENAME = "pyproject.toml"

#: ``CKPT_TRACK_*`` variables used elsewhere in the library that are not settings.
NON_SETTING_ENV = frozenset({"CKPT_TRACK_RUN_ID", "CKPT_TRACK_RUN_NAME", "CKPT_TRACK_CONFIG"})

_SOURCE_KWARG = "kwarg"

# --------------------------------------------------------------------------- coercion


class _Invalid(Exception):
    """Internal: a value does not fit its field; ``expected`` says what would."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


# A coercer turns a raw value into the field's type.  ``from_env`` is True when
# the value is an environment string that still has to be parsed.
_Coercer = Callable[[Any, bool], Any]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE_WORDS = frozenset({"", "none"})
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def _is_none_word(value: Any) -> bool:
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
        raise _Invalid(expected)
    names: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise _Invalid(expected)
        name = part.strip()
        if not name:
            if from_env:  # tolerate "mlflow," and "a,,b" in a shell variable
                continue
            raise _Invalid(expected + " (names must not be empty)")
        if name not in names:  # listing a backend twice must not log twice
            names.append(name)
    if not names:
        raise _Invalid(expected + " (at least one)")
    return tuple(names)


def _as_str(value: Any, from_env: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("a non-empty string")
    return value


def _as_opt_str(value: Any, from_env: bool) -> str | None:
    # TOML has no null, so "" / "none" is how a file or variable switches it off
    if value is None or _is_none_word(value):
        return None
    if not isinstance(value, str):
        raise _Invalid("a string ('' or 'none' for no value)")
    return value


def _as_mode(value: Any, from_env: bool) -> str:
    if isinstance(value, str) and value.strip().lower() in ("min", "max"):
        return value.strip().lower()
    raise _Invalid("'min' or 'max'")


def _as_opt_mode(value: Any, from_env: bool) -> str | None:
    if value is None or _is_none_word(value):
        return None
    return _as_mode(value, from_env)


def _as_pos_int(value: Any, from_env: bool) -> int:
    expected = "an integer >= 1"
    if from_env and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _Invalid(expected) from None
    # bool is an int subclass; `keep_last = true` is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(expected)
    return value


def _as_opt_pos_int(value: Any, from_env: bool) -> int | None:
    if value is None or (from_env and _is_none_word(value)):
        return None
    return _as_pos_int(value, from_env)


def _as_bool(value: Any, from_env: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_env and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _Invalid("a boolean" + (" (1/0, true/false, yes/no, on/off)" if from_env else ""))


def _as_size(value: Any, from_env: bool) -> int:
    expected = "a positive size in bytes, e.g. 1073741824, '512MB' or '2GiB'"
    if isinstance(value, bool):
        raise _Invalid(expected)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise _Invalid(expected)
        digits = match.group(1)
        # whole numbers stay exact ints; "1.5GiB" needs no sub-byte precision
        number = float(digits) if "." in digits else int(digits)
        value = int(number * _SIZE_UNITS[unit])
    if not isinstance(value, int) or value <= 0:
        raise _Invalid(expected)
    return value


def _as_seconds(value: Any, from_env: bool) -> float:
    expected = "a number of seconds > 0, e.g. 10 or 2.5"
    if from_env and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Invalid(expected) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise _Invalid(expected)
    return float(value)


def _as_count(value: Any, from_env: bool) -> int:
    expected = "an integer >= 0"
    if from_env and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _Invalid(expected) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(expected)
    return value


_TOP_FIELDS: dict[str, _Coercer] = {
    "backend": _as_backend,
    "project": _as_str,
    "monitor": _as_opt_str,
    "mode": _as_mode,
    "shard_size": _as_size,
    "blocking": _as_bool,
    "max_in_flight": _as_pos_int,
    "incremental": _as_bool,
    "timeout": _as_seconds,
    "retries": _as_count,
}
_RETENTION_FIELDS: dict[str, _Coercer] = {
    "keep_last": _as_opt_pos_int,
    "keep_best": _as_opt_pos_int,
    "keep_every": _as_opt_pos_int,
    "metric": _as_opt_str,
    "mode": _as_opt_mode,
}
_RETENTION = "retention"


def _where(source: str) -> str:
    """Human wording for a ``sources`` entry."""
    if source == _SOURCE_KWARG:
        return "keyword argument"
    if source.startswith("env:"):
        return f"environment variable {source[4:]}"
    if source.startswith("file:"):
        return f"config file {source[5:]}"
    return source


def _coerce(coercer: _Coercer, value: Any, label: str, source: str) -> Any:
    try:
        return coercer(value, source.startswith("env:"))
    except _Invalid as exc:
        raise ConfigError(
            f"invalid value {value!r} for {label!r} ({_where(source)}): expected {exc.expected}"
        ) from None


def _did_you_mean(word: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(word, sorted(candidates), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(map(repr, matches))}?" if matches else ""


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Retention:
    """Which checkpoints to keep; unset rules keep everything."""

    keep_last: int | None = None  # the N newest
    keep_best: int | None = None  # the K best by ``metric``
    keep_every: int | None = None  # those whose step % M == 0
    metric: str | None = None  # None: use Settings.monitor
    mode: str | None = None  # "min"/"max"; None: use Settings.mode

    def __post_init__(self) -> None:
        for name, coercer in _RETENTION_FIELDS.items():
            value = _coerce(coercer, getattr(self, name), f"retention.{name}", "Retention()")
            object.__setattr__(self, name, value)

    def enabled(self) -> bool:
        """True when any keep_* rule is set, i.e. old checkpoints may be deleted."""
        return any(v is not None for v in (self.keep_last, self.keep_best, self.keep_every))


def _empty_proxy() -> Mapping[str, Any]:
    return MappingProxyType({})


def _freeze_sections(sections: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({str(k): MappingProxyType(dict(v)) for k, v in sections.items()})


@dataclass(frozen=True)
class Settings:
    """Resolved, validated settings; build with :func:`load_settings`."""

    backend: tuple[str, ...] = ("local",)  # a str becomes a 1-tuple
    project: str = "default"
    monitor: str | None = "val/loss"
    mode: str = "min"
    shard_size: int = 2 * 1024**3  # bytes; "512MB"/"2GiB" accepted
    blocking: bool = False  # save synchronously instead of in the background
    max_in_flight: int = 1
    # content-addressed tensor files: unchanged tensors are neither written nor uploaded again
    incremental: bool = True
    # the time budget of one tracker call in seconds, shared by its 1 + retries attempts (see
    # ckpt_track.network); uploads are retried on top of that by the upload thread, off the loop
    timeout: float = 10.0
    retries: int = 2
    retention: Retention = field(default_factory=Retention)
    # mappings are unhashable, so they stay out of __hash__ (but count for ==)
    backends: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty_proxy, hash=False)
    sources: Mapping[str, str] = field(default_factory=_empty_proxy, hash=False)

    def __post_init__(self) -> None:
        for name, coercer in _TOP_FIELDS.items():
            value = _coerce(coercer, getattr(self, name), name, "Settings()")
            object.__setattr__(self, name, value)
        if not isinstance(self.retention, Retention):
            raise ConfigError(f"Settings.retention must be a Retention, not {self.retention!r}")
        object.__setattr__(self, "backends", _freeze_sections(self.backends))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def backend_options(self, name: str) -> dict[str, Any]:
        """The options section for backend ``name`` (a fresh dict; ``{}`` when absent)."""
        return dict(self.backends.get(name, {}))


# --------------------------------------------------------------------------- config file


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib only puts the position in the message before Python 3.14
        line = getattr(exc, "lineno", None)
        if line is None:
            found = re.search(r"line (\d+)", str(exc))
            line = int(found.group(1)) if found else None
        at = f"{path}:{line}" if line is not None else str(path)
        raise ConfigError(f"invalid TOML in config file {at}: {exc}") from exc


def _pyproject_table(path: Path, data: dict[str, Any]) -> dict[str, Any] | None:
    tool = data.get("tool")
    table = tool.get("ckpt_track") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"[tool.ckpt_track] in {path} must be a table, not {table!r}")
    return table


def find_config_file(start: Path | None = None) -> Path | None:
    """The nearest ``ckpt_track.toml`` or ``pyproject.toml`` with ``[tool.ckpt_track]``.

    Searches ``start`` (default: the working directory) and then its parents;
    a ``pyproject.toml`` without the table is skipped.  Returns None if nothing is found.
    """
    here = (start if start is not None else Path.cwd()).resolve()
    if here.is_file():
        here = here.parent
    for directory in (here, *here.parents):
        candidate = directory / CONFIG_FILENAME
        if candidate.is_file():
            return candidate
        candidate = directory / PYPROJECT_FILENAME
        if candidate.is_file() and _pyproject_table(candidate, _read_toml(candidate)) is not None:
            return candidate
    return None


def _load_file(path: Path) -> dict[str, Any]:
    data = _read_toml(path)
    if path.name != PYPROJECT_FILENAME:
        return data
    table = _pyproject_table(path, data)
    if table is None:
        raise ConfigError(f"{path} has no [tool.ckpt_track] table")
    return table


# --------------------------------------------------------------------------- layers

# One source's settings: "key" or "section.key" -> (coerced value, source)
_Layer = dict[str, tuple[Any, str]]


class _Sections:
    """Backend section schemas, fetched from the registry only when first needed."""

    def __init__(self, given: Mapping[str, frozenset[str]] | None) -> None:
        self._table = dict(given) if given is not None else None

    def get(self) -> dict[str, frozenset[str]]:
        if self._table is None:
            # imported here: the registry imports backends, which may import this module
            from ckpt_track.backends.registry import backend_options_table

            self._table = dict(backend_options_table())
        return self._table


def _valid_top_keys(sections: _Sections) -> str:
    return (
        f"Valid keys: {', '.join(sorted(_TOP_FIELDS))}; "
        f"sections: {', '.join([_RETENTION, *sorted(sections.get())])}."
    )


def _mapping_layer(data: Mapping[str, Any], source: str, sections: _Sections) -> _Layer:
    """Validate and coerce a file table or the keyword overrides."""
    skip_none = source == _SOURCE_KWARG  # a None keyword argument means "not given"
    layer: _Layer = {}
    where = _where(source)
    for key, value in data.items():
        if skip_none and value is None:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"setting names must be strings, got {key!r} ({where})")
        if key in _TOP_FIELDS:
            layer[key] = (_coerce(_TOP_FIELDS[key], value, key, source), source)
            continue
        if key == _RETENTION:
            allowed: Mapping[str, Any] = _RETENTION_FIELDS
        elif key in sections.get():
            allowed = dict.fromkeys(sections.get()[key])
        else:
            candidates = [*_TOP_FIELDS, _RETENTION, *sections.get()]
            raise ConfigError(
                f"unknown setting {key!r} ({where}).{_did_you_mean(key, candidates)} "
                + _valid_top_keys(sections)
            )
        if isinstance(value, Retention) and key == _RETENTION:
            value = {f.name: getattr(value, f.name) for f in fields(value)}
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {key!r} ({where}) must be a table/dict, not {value!r}")
        for sub, sub_value in value.items():
            if skip_none and sub_value is None:
                continue
            if sub not in allowed:
                raise ConfigError(
                    f"unknown key {sub!r} in section [{key}] ({where})."
                    f"{_did_you_mean(str(sub), list(allowed))} "
                    f"Valid keys for [{key}]: {', '.join(sorted(allowed)) or '(none)'}."
                )
            label = f"{key}.{sub}"
            if key == _RETENTION:
                sub_value = _coerce(_RETENTION_FIELDS[sub], sub_value, label, source)
            layer[label] = (sub_value, source)
    return layer


def _env_layer(env: Mapping[str, str], sections: _Sections) -> _Layer:
    """Validate and coerce the ``CKPT_TRACK_*`` variables."""
    layer: _Layer = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name.upper() in NON_SETTING_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        source = f"env:{name}"
        section, _, key = rest.partition("__")
        if not key and section in _TOP_FIELDS:
            layer[section] = (_coerce(_TOP_FIELDS[section], raw, section, source), source)
            continue
        if key and section == _RETENTION and key in _RETENTION_FIELDS:
            label = f"{_RETENTION}.{key}"
            layer[label] = (_coerce(_RETENTION_FIELDS[key], raw, label, source), source)
            continue
        if key and key in sections.get().get(section, ()):
            # backends declare option names but not types, so the string is passed on as is
            layer[f"{section}.{key}"] = (raw, source)
            continue
        raise _unknown_env(name, sections)
    return layer


def _unknown_env(name: str, sections: _Sections) -> ConfigError:
    known = [k.upper() for k in _TOP_FIELDS]
    known += [f"{_RETENTION}__{k}".upper() for k in _RETENTION_FIELDS]
    for section, keys in sections.get().items():
        known += [f"{section}__{k}".upper() for k in keys]
    known += [n[len(ENV_PREFIX) :] for n in NON_SETTING_ENV]
    # compare without the shared prefix, which would make every name look similar
    rest = name[len(ENV_PREFIX) :].upper()
    matches = difflib.get_close_matches(rest, sorted(known), n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(ENV_PREFIX + m for m in matches)}?" if matches else ""
    return ConfigError(
        f"unknown environment variable {name}.{hint} Settings are {ENV_PREFIX}<KEY> for "
        f"{', '.join(sorted(_TOP_FIELDS))} and {ENV_PREFIX}<SECTION>__<KEY> for the sections "
        f"{', '.join([_RETENTION, *sorted(sections.get())])}; other recognised variables: "
        f"{', '.join(sorted(NON_SETTING_ENV))}."
    )


def _config_path(env: Mapping[str, str], cwd: Path) -> Path | None:
    explicit = env.get("CKPT_TRACK_CONFIG")
    if not explicit:  # unset or empty: search instead
        return find_config_file(cwd)
    path = Path(explicit).expanduser()
    if not path.is_absolute():
        path = cwd / path
    if not path.is_file():
        raise ConfigError(f"CKPT_TRACK_CONFIG={explicit!r}: no such file ({path})")
    return path.resolve()


# --------------------------------------------------------------------------- entry point


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    backend_sections: Mapping[str, frozenset[str]] | None = None,
) -> Settings:
    """Merge keyword ``overrides`` > ``env`` > config file > defaults into :class:`Settings`.

    ``overrides`` has the file's shape (top-level keys plus section dicts); None
    values are ignored.  ``env`` defaults to ``os.environ`` and ``cwd`` to the
    working directory.  ``backend_sections`` maps each backend name to its
    allowed option names; by default it comes from the backend registry.
    Raises :class:`ConfigError` (or :class:`UnknownBackend`) naming the bad key and its source.
    """
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else Path(cwd)
    sections = _Sections(backend_sections)

    merged: _Layer = {}
    path = _config_path(env, cwd)
    if path is not None:
        merged.update(_mapping_layer(_load_file(path), f"file:{path}", sections))
    merged.update(_env_layer(env, sections))
    if overrides:
        merged.update(_mapping_layer(overrides, _SOURCE_KWARG, sections))

    if "backend" in merged:  # the default is trusted; it needs no registry lookup
        names, source = merged["backend"]
        known = sections.get()
        for name in names:
            if name not in known:
                error = UnknownBackend(name, known)
                if hasattr(error, "add_note"):  # Python 3.11+
                    error.add_note(f"set by {_where(source)}")
                raise error

    top: dict[str, Any] = {}
    retention: dict[str, Any] = {}
    backends: dict[str, dict[str, Any]] = {}
    for key, (value, _source) in merged.items():
        section, _, sub = key.partition(".")
        if not sub:
            top[key] = value
        elif section == _RETENTION:
            retention[sub] = value
        else:
            backends.setdefault(section, {})[sub] = value
    return Settings(
        **top,
        retention=Retention(**retention),
        backends=backends,
        sources={key: source for key, (_value, source) in merged.items()},
    )
