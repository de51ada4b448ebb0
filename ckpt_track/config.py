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

The backend *choice* (``backend`` / ``CKPT_TRACK_BACKEND``) is checked where it is used,
by :meth:`Settings.checked_backends` (``ct.init``, a command that needs the configured
backend): a command whose reference names its backend (``ckpt-track ls local://p/r``)
works whatever the environment chooses for training.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .config_values import RETENTION, RETENTION_FIELDS, SOURCE_KWARG, TOP_FIELDS, coerce, where
from .errors import ConfigError, UnknownBackend
from .options import DEFAULT_PROJECT, close_matches, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "CONFIG_FILENAME",
    "DEFAULT_ROOT",
    "ENV_PREFIX",
    "NON_SETTING_ENV",
    "STORAGE_KEYS",
    "STORAGE_SECTION",
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

#: The local store (and the spool every save is committed to first) when ``[local] root`` is
#: unset.  Here, not in ``backends.local``, because the core's spool needs it too.
DEFAULT_ROOT = "ckpt_runs"

#: The ``[storage]`` section: where tensor files live and the fsspec options to reach it
#: (see :mod:`ckpt_track.objstore`); read with ``Settings.backend_options("storage")``.
STORAGE_SECTION = "storage"
#: Its keys: ``url``/``replicas``/``part_size`` are ckpt_track's, the rest go to fsspec as is
#: (``options`` is a table of any further fsspec keyword arguments).
STORAGE_KEYS = frozenset({
    "url", "replicas", "options", "part_size", "endpoint_url", "anon", "key", "secret", "token", "profile", "region",
    "client_kwargs", "config_kwargs", "s3_additional_kwargs", "max_concurrency", "default_block_size",
    "requester_pays", "use_ssl", "version_aware", "account_name", "account_key", "project",
})

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
        for name, coercer in RETENTION_FIELDS.items():
            value = coerce(coercer, getattr(self, name), f"retention.{name}", "Retention()")
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
    project: str = DEFAULT_PROJECT
    monitor: str | None = "val/loss"
    mode: str = "min"
    shard_size: int = 2 * 1024**3  # bytes; "512MB"/"2GiB" accepted
    blocking: bool = False  # save synchronously instead of in the background
    # copy what the optimizer owns in the background while the next forward/backward runs; its
    # step waits for the copy (ckpt_track.overlap); false: everything is copied before the call returns
    overlap: bool = True
    max_in_flight: int = 1
    # content-addressed tensor files: unchanged tensors are neither written nor uploaded again
    incremental: bool = True
    # the time budget of one tracker call in seconds, shared by its 1 + retries attempts (see
    # ckpt_track.network); uploads are retried on top of that by the upload thread, off the loop
    timeout: float = 10.0
    retries: int = 2
    # under torch.distributed: "auto" makes init/log_checkpoint/resume collective when a process
    # group of more than one rank is initialized, "off" keeps this rank a single process (code
    # that logs from rank 0 only), "on" requires every rank (see ckpt_track.distributed)
    distributed: str = "auto"
    # seconds a collective step (every rank joining init, a save, a resume) may wait for a rank
    collective_timeout: float = 300.0
    retention: Retention = field(default_factory=Retention)
    # mappings are unhashable, so they stay out of __hash__ (but count for ==)
    backends: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty_proxy, hash=False)
    sources: Mapping[str, str] = field(default_factory=_empty_proxy, hash=False)
    # the backend names load_settings knew of (None: ask the registry when checked)
    known_backends: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, coercer in TOP_FIELDS.items():
            value = coerce(coercer, getattr(self, name), name, "Settings()")
            object.__setattr__(self, name, value)
        if not isinstance(self.retention, Retention):
            raise ConfigError(f"Settings.retention must be a Retention, not {self.retention!r}")
        object.__setattr__(self, "backends", _freeze_sections(self.backends))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def checked_backends(self) -> tuple[str, ...]:
        """The chosen backends, each one checked to exist; :class:`UnknownBackend` (a
        ConfigError) naming the setting that chose it otherwise.  Call it where the choice is
        used (``ct.init``, a reference without a backend), not when settings are loaded.

        >>> Settings().checked_backends()
        ('local',)
        """
        known = self.known_backends
        if known is None:
            from ckpt_track.backends.registry import names  # here: the registry imports backends

            known = tuple(names())
        for name in self.backend:
            if name not in known:
                error = UnknownBackend(name, known)
                source = self.sources.get("backend")
                if source:
                    error.args = (f"{error} (set by {where(source)})",)
                raise error
        return self.backend

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

            self._table = {**backend_options_table(), STORAGE_SECTION: STORAGE_KEYS}
        return self._table


def _valid_top_keys(sections: _Sections) -> str:
    return (
        f"Valid keys: {', '.join(sorted(TOP_FIELDS))}; "
        f"sections: {', '.join([RETENTION, *sorted(sections.get())])}."
    )


def _mapping_layer(data: Mapping[str, Any], source: str, sections: _Sections) -> _Layer:
    """Validate and coerce a file table or the keyword overrides."""
    skip_none = source == SOURCE_KWARG  # a None keyword argument means "not given"
    layer: _Layer = {}
    at = where(source)
    for key, value in data.items():
        if skip_none and value is None:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"setting names must be strings, got {key!r} ({at})")
        if key in TOP_FIELDS:
            layer[key] = (coerce(TOP_FIELDS[key], value, key, source), source)
            continue
        if key == RETENTION:
            allowed: Mapping[str, Any] = RETENTION_FIELDS
        elif key in sections.get():
            allowed = dict.fromkeys(sections.get()[key])
        else:
            candidates = [*TOP_FIELDS, RETENTION, *sections.get()]
            raise ConfigError(
                f"unknown setting {key!r} ({at}).{did_you_mean(key, candidates)} "
                + _valid_top_keys(sections)
            )
        if isinstance(value, Retention) and key == RETENTION:
            value = {f.name: getattr(value, f.name) for f in fields(value)}
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {key!r} ({at}) must be a table/dict, not {value!r}")
        for sub, sub_value in value.items():
            if skip_none and sub_value is None:
                continue
            if sub not in allowed:
                raise ConfigError(
                    f"unknown key {sub!r} in section [{key}] ({at})."
                    f"{did_you_mean(str(sub), list(allowed))} "
                    f"Valid keys for [{key}]: {', '.join(sorted(allowed)) or '(none)'}."
                )
            label = f"{key}.{sub}"
            if key == RETENTION:
                sub_value = coerce(RETENTION_FIELDS[sub], sub_value, label, source)
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
        if not key and section in TOP_FIELDS:
            layer[section] = (coerce(TOP_FIELDS[section], raw, section, source), source)
            continue
        if key and section == RETENTION and key in RETENTION_FIELDS:
            label = f"{RETENTION}.{key}"
            layer[label] = (coerce(RETENTION_FIELDS[key], raw, label, source), source)
            continue
        if key and key in sections.get().get(section, ()):
            # backends declare option names but not types, so the string is passed on as is
            layer[f"{section}.{key}"] = (raw, source)
            continue
        raise _unknown_env(name, sections)
    return layer


def _unknown_env(name: str, sections: _Sections) -> ConfigError:
    known = [k.upper() for k in TOP_FIELDS]
    known += [f"{RETENTION}__{k}".upper() for k in RETENTION_FIELDS]
    for section, keys in sections.get().items():
        known += [f"{section}__{k}".upper() for k in keys]
    known += [n[len(ENV_PREFIX) :] for n in NON_SETTING_ENV]
    # compare without the shared prefix, which would make every name look similar; the hint
    # names the variable whole and unquoted, as a shell spells it
    rest = name[len(ENV_PREFIX) :].upper()
    matches = close_matches(rest, known)
    hint = f" Did you mean {' or '.join(ENV_PREFIX + m for m in matches)}?" if matches else ""
    return ConfigError(
        f"unknown environment variable {name}.{hint} Settings are {ENV_PREFIX}<KEY> for "
        f"{', '.join(sorted(TOP_FIELDS))} and {ENV_PREFIX}<SECTION>__<KEY> for the sections "
        f"{', '.join([RETENTION, *sorted(sections.get())])}; other recognised variables: "
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
    Raises :class:`ConfigError` naming the bad key and its source.  The backend names are
    checked where they are used (:meth:`Settings.checked_backends`), not here.
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
        merged.update(_mapping_layer(overrides, SOURCE_KWARG, sections))

    # an unknown backend name is reported where the choice is used (Settings.checked_backends):
    # CKPT_TRACK_BACKEND=nosuch must not break `ckpt-track ls local://p/r`
    known = tuple(sections.get()) if "backend" in merged else None

    top: dict[str, Any] = {}
    retention: dict[str, Any] = {}
    backends: dict[str, dict[str, Any]] = {}
    for key, (value, _source) in merged.items():
        section, _, sub = key.partition(".")
        if not sub:
            top[key] = value
        elif section == RETENTION:
            retention[sub] = value
        else:
            backends.setdefault(section, {})[sub] = value
    return Settings(
        **top,
        retention=Retention(**retention),
        backends=backends,
        sources={key: source for key, (_value, source) in merged.items()},
        known_backends=None if known is None else tuple(k for k in known if k != STORAGE_SECTION),
    )
