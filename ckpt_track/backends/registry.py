"""Backend registry: a name maps to ``"module:Class"``, imported on first use.

Built-in backends are listed here; third-party trackers register under the
entry-point group ``ckpt_track.backends``::

    [project.entry-points."ckpt_track.backends"]
    mytracker = "my_pkg.backend:MyTrackerBackend"

A plugin that fails to load is reported with a warning, never a crash.

Importing this module installs it as the source of the backends' own reference forms in
:func:`ckpt_track.refs.parse_ref` (:func:`ckpt_track.refs.use_native_refs`): the registry
depends on the core, never the other way round.

A pasted web-UI URL is offered to every backend.  One that more than one backend claims
(the same path shape, e.g. ``/ml/experiments/<id>/runs/<run>``: Databricks MLflow, or a W&B
server under ``/ml``) is decided by its host: a hosted tracker's own host first
(``BackendSpec.hosts``), then the servers configured for each backend
(:data:`HOST_SETTINGS`: ``[mlflow] tracking_uri`` / ``MLFLOW_TRACKING_URI`` and so on);
failing both, an ``InvalidRef`` names the candidates in their canonical forms.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import BackendError, BackendNotInstalled, CkptTrackError, InvalidRef, UnknownBackend
from ..protocol import Backend
from ..refs import Ref, use_native_refs

__all__ = ["HOST_SETTINGS", "NATIVE_SCHEMES", "BackendSpec", "backend_options_table", "create", "get_class",
           "hosted_backend", "names", "parse_native", "ref_forms", "schemes"]

ENTRY_POINT_GROUP = "ckpt_track.backends"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    extra: str | None = None  # pip extra that installs the SDK
    requires: tuple[str, ...] = ()  # top-level SDK modules
    options: frozenset[str] | None = None  # config keys; None: ask the class
    # web-UI hosts of the hosted service ("wandb.ai"; ".wandb.io" is any host under it)
    hosts: tuple[str, ...] = ()


# Option names come from each class's ``options``; backend modules import their SDK
# lazily, so reading them is cheap and works without the SDK installed.
BUILTIN: dict[str, BackendSpec] = {
    "local": BackendSpec("local", "ckpt_track.backends.local:LocalBackend"),
    "mlflow": BackendSpec("mlflow", "ckpt_track.backends.mlflow:MlflowBackend", "mlflow", ("mlflow",),
                          hosts=(".cloud.databricks.com", ".azuredatabricks.net", ".gcp.databricks.com")),
    "wandb": BackendSpec("wandb", "ckpt_track.backends.wandb:WandbBackend", "wandb", ("wandb",),
                         hosts=("wandb.ai", ".wandb.ai", ".wandb.io", "forge.coreweave.com")),
    "clearml": BackendSpec("clearml", "ckpt_track.backends.clearml:ClearmlBackend", "clearml", ("clearml",),
                           hosts=(".clear.ml",)),
    "comet": BackendSpec("comet", "ckpt_track.backends.comet:CometBackend", "comet", ("comet_ml",),
                         hosts=("comet.com", ".comet.com", "comet.ml", ".comet.ml")),
}

#: Schemes of the backends' native forms that are no backend name, for did-you-mean hints.
NATIVE_SCHEMES = ("runs", "models", "wandb-artifact", "experiment", "registry")

#: Where each backend's server is configured: its settings keys, then the SDK's variables
#: (read by name only: the backends' modules define what they mean).
HOST_SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mlflow": (("tracking_uri",), ("MLFLOW_TRACKING_URI",)),
    "wandb": (("base_url",), ("WANDB_BASE_URL",)),
    "comet": (("url",), ("COMET_URL_OVERRIDE",)),
    "clearml": (("web_host", "api_host"), ("CLEARML_WEB_HOST", "CLEARML_API_HOST")),
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
    """Ask each backend whether it recognises ``text`` (UI URL, native reference).

    A web URL is offered to every backend; when several claim it, its host decides (see the
    module docstring), else :class:`InvalidRef` asks which backend is meant.
    """
    if not text.lower().startswith(("http://", "https://")):
        for cls in _ref_classes():
            parser = getattr(cls, "parse_ref", None)
            ref = parser(text) if parser is not None else None
            if ref is not None:
                return ref
        return None
    claims: list[Ref] = []
    refusals: dict[str, InvalidRef] = {}
    for cls in _ref_classes():
        parser = getattr(cls, "parse_ref", None)
        if parser is None:
            continue
        try:
            ref = parser(text)
        except InvalidRef as exc:
            refusals.setdefault(getattr(cls, "name", ""), exc)
            continue
        if ref is not None and ref.backend not in {c.backend for c in claims}:
            claims.append(ref)
    return _pick(text, claims, refusals)


def _pick(text: str, claims: list[Ref], refusals: Mapping[str, InvalidRef]) -> Ref | None:
    """The claim a URL's host decides for (see the module docstring)."""
    url = urlsplit(text)
    host = (url.hostname or "").lower()
    owner = hosted_backend(host)
    if owner is not None:  # a hosted tracker's own host: only that tracker's reading counts
        mine = [c for c in claims if c.backend == owner]
        if mine:
            return mine[0]
        if owner in refusals:
            raise refusals[owner]
        raise InvalidRef(f"{text!r} is a {owner} page ckpt_track cannot read: paste the URL of a run "
                         f"or a checkpoint's page, or write {owner}://...")
    if len(claims) == 1:
        return claims[0]
    if not claims:
        if refusals:
            raise next(iter(refusals.values()))
        return None
    configured = _configured_owners(url.netloc.lower(), host, [c.backend for c in claims])
    if len(configured) == 1:
        return next(c for c in claims if c.backend == configured[0])
    forms = " or ".join(f"{c.backend}: {unquote(str(c))}" for c in claims)  # ?ui=https://... parses back
    where = "; ".join(f"{c.backend}: " + " / ".join(HOST_SETTINGS.get(c.backend, ((), ()))[1]
                                                      or (f"[{c.backend}] settings",)) for c in claims)
    raise InvalidRef(f"{text!r} could be a page of {' or '.join(c.backend for c in claims)} on a server "
                     f"ckpt_track does not know; write the reference you mean ({forms}) or set that "
                     f"tracker's server to {url.scheme}://{url.netloc} ({where})")


def hosted_backend(host: str) -> str | None:
    """The backend whose hosted service serves web-UI host ``host`` (``"wandb.ai"``), or None."""
    host = host.lower().rstrip(".")
    for spec in _specs().values():
        for pattern in spec.hosts:
            if host == pattern or (pattern.startswith(".") and host.endswith(pattern)):
                return spec.name
    return None


_settings_source: Callable[[], Any] | None = None


def use_settings(source: Callable[[], Any] | None) -> None:
    """Install where the configured servers are read from (``ckpt_track.config.load_settings``;
    :mod:`ckpt_track.resolve` installs it, as config imports this module): only an ambiguous
    self-hosted URL asks, so parsing any other reference loads no settings."""
    global _settings_source
    _settings_source = source


def _configured_owners(netloc: str, host: str, candidates: Sequence[str]) -> list[str]:
    """The candidates whose configured server is ``netloc`` (else, failing that, ``host``)."""
    servers = {name: _configured_servers(name) for name in candidates}
    exact = [name for name, found in servers.items() if netloc in {n for n, _ in found}]
    if exact:
        return exact
    return [name for name, found in servers.items() if host and host in {h for _, h in found}]


def _configured_servers(name: str) -> list[tuple[str, str]]:
    """``(netloc, hostname)`` of each server configured for backend ``name``: its settings
    section (file or ``CKPT_TRACK_*``), then its SDK's variables."""
    keys, env_names = HOST_SETTINGS.get(name, ((), ()))
    values: list[str] = []
    try:
        section = _settings_source().backend_options(name) if _settings_source is not None else {}
        values += [str(section[k]) for k in keys if section.get(k)]
    except CkptTrackError:  # a broken config file is reported by the command that loads it
        pass
    values += [os.environ[v] for v in env_names if os.environ.get(v)]
    if name == "mlflow" and any(v.startswith("databricks") for v in values) and os.environ.get("DATABRICKS_HOST"):
        values.append(os.environ["DATABRICKS_HOST"])
    found: list[tuple[str, str]] = []
    for value in values:
        try:
            url = urlsplit(value if "://" in value else f"https://{value}")
            host = (url.hostname or "").lower()
        except ValueError:
            continue
        if host:
            found.append((url.netloc.lower(), host))
            if host.startswith("api."):  # ClearML's API host api.<domain> serves app.<domain>
                found.append((url.netloc.lower().replace("api.", "app.", 1), "app." + host[4:]))
    return found


def schemes() -> tuple[str, ...]:
    """Schemes of native forms that are no backend name (for did-you-mean hints)."""
    return NATIVE_SCHEMES


def ref_forms() -> tuple[str, ...]:
    forms: list[str] = []
    for cls in _ref_classes():
        forms.extend(getattr(cls, "ref_forms", lambda: ())())
    return tuple(forms)


# looked up by attribute at each parse, so a patched or extended registry is what is asked
use_native_refs(sys.modules[__name__])
