"""Backend registry: a name maps to ``"module:Class"``, imported on first use.

Built-in backends are listed here; third-party trackers register under the
entry-point group ``ckpt_track.backends``::

    [project.entry-points."ckpt_track.backends"]
    mytracker = "my_pkg.backend:MyTrackerBackend"

A plugin that fails to load is reported with a warning, never a crash.

Importing this module installs it as the source of the backends' own reference forms in
:func:`ckpt_track.refs.parse_ref` (:func:`ckpt_track.refs.use_native_refs`): the registry
depends on the core, never the other way round.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from ..errors import BackendError, BackendNotInstalled, UnknownBackend
from ..protocol import Backend
from ..refs import Ref, use_native_refs

__all__ = ["BackendSpec", "backend_options_table", "create", "get_class", "names", "parse_native", "ref_forms"]

ENTRY_POINT_GROUP = "ckpt_track.backends"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    extra: str | None = None  # pip extra that installs the SDK
    requires: tuple[str, ...] = ()  # top-level SDK modules
    options: frozenset[str] | None = None  # config keys; None: ask the class


# Option names come from each class's ``options``; backend modules import their SDK
# lazily, so reading them is cheap and works without the SDK installed.
BUILTIN: dict[str, BackendSpec] = {
    "local": BackendSpec("local", "ckpt_track.backends.local:LocalBackend"),
    "mlflow": BackendSpec("mlflow", "ckpt_track.backends.mlflow:MlflowBackend", "mlflow", ("mlflow",)),
    "wandb": BackendSpec("wandb", "ckpt_track.backends.wandb:WandbBackend", "wandb", ("wandb",)),
    "clearml": BackendSpec("clearml", "ckpt_track.backends.clearml:ClearmlBackend", "clearml", ("clearml",)),
    "comet": BackendSpec("comet", "ckpt_track.backends.comet:CometBackend", "comet", ("comet_ml",)),
}


@lru_cache(maxsize=1)
def _plugins() -> dict[str, BackendSpec]:
    found: dict[str, BackendSpec] = {}
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # noqa: BLE001 - a broken installation must not break the built-ins
        warnings.warn(f"cannot read entry points {ENTRY_POINT_GROUP!r}: {exc}", stacklevel=2)
        return found
    for ep in eps:
        if ep.name in BUILTIN:
            warnings.warn(f"plugin backend {ep.name!r} ({ep.value}) ignored: the name is built in", stacklevel=2)
            continue
        found[ep.name] = BackendSpec(ep.name, ep.value)
    return found


def _specs() -> dict[str, BackendSpec]:
    return {**BUILTIN, **_plugins()}


def names() -> list[str]:
    """Every backend name: built-ins, then plugins."""
    return list(_specs())


def _spec(name: str) -> BackendSpec:
    try:
        return _specs()[name]
    except KeyError:
        raise UnknownBackend(name, names()) from None


def get_class(name: str) -> type[Backend]:
    """Import and return a backend class; ``BackendNotInstalled`` when its SDK is missing."""
    spec = _spec(name)
    for module in spec.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: module set to None in sys.modules
            found = False
        if not found:
            raise BackendNotInstalled(name, spec.extra, module)
    return _import(spec)


def _import(spec: BackendSpec) -> type[Backend]:
    module_name, _, attr = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name and module_name.startswith("ckpt_track."):
            raise BackendError(
                f"backend {spec.name!r} is not part of this ckpt-track release yet; "
                f"available: {', '.join(n for n in names() if _importable(_specs()[n]))}"
            ) from exc
        if spec.requires and exc.name and exc.name.split(".")[0] in spec.requires:
            raise BackendNotInstalled(spec.name, spec.extra, exc.name) from exc
        raise BackendError(f"backend {spec.name!r} ({spec.target}) failed to import: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise BackendError(f"backend {spec.name!r}: {module_name} has no {attr!r}") from exc


def _importable(spec: BackendSpec) -> bool:
    module_name = spec.target.partition(":")[0]
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def create(name: str, options: Mapping[str, Any] | None = None) -> Backend:
    """Instantiate a backend with its config section."""
    cls = get_class(name)
    return cls(dict(options or {}))  # type: ignore[call-arg]


def backend_options_table() -> dict[str, frozenset[str]]:
    """Config keys each backend accepts (for typo checks in ``config.py``)."""
    table: dict[str, frozenset[str]] = {}
    for name, spec in _specs().items():
        if spec.options is not None:
            table[name] = spec.options
            continue
        try:
            table[name] = frozenset(getattr(_import(spec), "options", frozenset()))
        except Exception as exc:  # noqa: BLE001 - a broken plugin is skipped with a warning, never a crash
            if name in BUILTIN:
                table[name] = frozenset()  # not in this release: the name stays known
            else:
                warnings.warn(f"backend plugin {name!r} is broken and was skipped: {exc}", stacklevel=2)
    return table


def _ref_classes() -> list[type[Backend]]:
    classes = []
    for spec in _specs().values():
        if not _importable(spec):
            continue
        try:
            classes.append(_import(spec))
        except Exception as exc:  # noqa: BLE001 - a broken plugin is skipped with a warning, never a crash
            if spec.name not in BUILTIN:
                warnings.warn(f"backend plugin {spec.name!r} is broken and was skipped: {exc}", stacklevel=2)
    return classes


def parse_native(text: str) -> Ref | None:
    """Ask each backend whether it recognises ``text`` (UI URL, native reference)."""
    for cls in _ref_classes():
        parser = getattr(cls, "parse_ref", None)
        if parser is None:
            continue
        ref = parser(text)
        if ref is not None:
            return ref
    return None


def ref_forms() -> tuple[str, ...]:
    forms: list[str] = []
    for cls in _ref_classes():
        forms.extend(getattr(cls, "ref_forms", lambda: ())())
    return tuple(forms)


# looked up by attribute at each parse, so a patched or extended registry is what is asked
use_native_refs(sys.modules[__name__])
