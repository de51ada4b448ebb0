"""The references MLflow users paste: UI URLs, ``runs:/`` and ``models:/`` URIs, and the
lookup that turns a LoggedModel or a registry version into ``mlflow://<run_id>:vN``.

UI URLs of an MLflow server (``http://host/#/experiments/<id>/runs/<run_id>``) and of
Databricks, where the SDK prints ``https://<workspace>/ml/experiments/<id>/runs/<run_id>``
(and logged models under ``/ml/experiments/<id>/models/m-<id>``), older pages are
``https://<workspace>/?o=<org>#mlflow/experiments/<id>/runs/<run_id>`` and
``#mlflow/models/<name>/versions/<v>``, and Unity Catalog versions
``/explore/data/models/<catalog>/<schema>/<model>/version/<v>``.  Every one keeps the UI's
address as ``?ui=``: the tracking URI to use when none is configured (``databricks`` for a
Databricks workspace, see :func:`is_databricks_host`).

Parsing needs no SDK and no server; :func:`resolve` asks the tracking server which run and
version a model reference stands for.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

from ...errors import CheckpointNotFound, InvalidRef
from ...refs import Ref
from .client import MlflowSdk
from .handles import TAG_VERSION

__all__ = ["DATABRICKS_HOSTS", "REF_FORMS", "is_databricks_host", "parse", "resolve"]

NAME = "mlflow"
_RUN_ID = r"[0-9a-f]{32}"
_MODEL_ID = r"m-[0-9a-f]{32}"
_NAME = r"[A-Za-z0-9_.\-]+"
_UI = re.compile(r"^(?P<base>https?://[^#\s]+?)/?#(?:/|mlflow/)(?P<route>[^?\s]*)(?:\?.*)?$")
#: Web hosts of Databricks workspaces (AWS, Azure, GCP)
DATABRICKS_HOSTS = (".cloud.databricks.com", ".azuredatabricks.net", ".gcp.databricks.com")

REF_FORMS = (
    "mlflow://<run_id>[@selector]   runs:/<run_id>[/<alias>]",
    "models:/m-<model_id>   models:/<name>/<version>   models:/<name>@<alias>",
    ("MLflow UI URLs: http://host/#/experiments/<id>/runs/<run_id>, .../models/m-<id>, "
     "http://host/#/models/<name>/versions/<v>"),
    ("Databricks: https://<workspace>/ml/experiments/<id>/runs/<run_id>, .../ml/experiments/<id>/models/m-<id>, "
     "/ml/models/<name>/versions/<v>, /explore/data/models/<catalog>/<schema>/<model>/version/<v>, "
     "#mlflow/experiments/<id>/runs/<run_id>"),
)


def is_databricks_host(url_or_host: str) -> bool:
    """True for a Databricks workspace's web host (or a URL on one)."""
    host = urlsplit(url_or_host).hostname if "://" in url_or_host else url_or_host
    host = (host or "").lower().rstrip(".")
    return any(host.endswith(suffix) for suffix in DATABRICKS_HOSTS)


def parse(text: str) -> Ref | None:
    """The reference an MLflow UI URL or native URI stands for, or None for another form."""
    text = text.strip()
    if m := _UI.match(text):
        return _ui(m)
    if text.lower().startswith(("http://", "https://")):
        return _workspace_page(text)
    if m := re.fullmatch(rf"runs:/({_RUN_ID})(?:/({_NAME}))?/?", text):
        sel = m.group(2)
        if sel is None:
            return Ref(NAME, m.group(1))
        if re.fullmatch(r"v\d+", sel):
            return Ref(NAME, m.group(1), version=int(sel[1:]))
        return Ref(NAME, m.group(1), alias=sel)
    if m := re.fullmatch(rf"models:/({_MODEL_ID})/?", text):
        return Ref(NAME, f"models/{m.group(1)}")
    if m := re.fullmatch(r"models:/([^/@]+)/(\d+|latest)/?", text):
        v = m.group(2)
        return _registered(m.group(1), version=None if v == "latest" else int(v),
                           alias="latest" if v == "latest" else None)
    if m := re.fullmatch(rf"models:/([^/@]+)@({_NAME})", text):
        return _registered(m.group(1), alias=m.group(2))
    return None


def _ui(m: re.Match[str]) -> Ref | None:
    """A run page, a LoggedModel page or a registry version page of the MLflow UI; the UI's
    address is kept (``?ui=``) as the tracking URI to use when none is configured."""
    base = urlsplit(m.group("base"))
    _ = base.port  # ValueError for a bad port or host: InvalidRef at refs.parse_ref
    # Databricks puts ?o=<org id> before the fragment: the address is the part before it
    params = (("ui", f"{base.scheme}://{base.netloc}{base.path}".rstrip("/")),)
    route = [unquote(p) for p in m.group("route").strip("/").split("/")]
    return _route(route, params)


def _workspace_page(text: str) -> Ref | None:
    """A Databricks page addressed by path (``/ml/...``, ``/explore/data/models/...``); on a
    Databricks host any other page is refused, elsewhere it is not MLflow's."""
    url = urlsplit(text)
    _ = url.port  # ValueError for a bad port or host: InvalidRef at refs.parse_ref
    params = (("ui", f"{url.scheme}://{url.netloc}"),)
    parts = [unquote(p) for p in url.path.split("/") if p]
    ref = None
    if parts[:1] == ["ml"]:
        ref = _route(parts[1:], params)
    elif parts[:3] == ["explore", "data", "models"] and len(parts) >= 8 and parts[6] == "version" \
            and parts[7].isdigit():  # Unity Catalog: <catalog>/<schema>/<model>/version/<v>
        ref = _registered(".".join(parts[3:6]), version=int(parts[7]), params=params)
    if ref is None and is_databricks_host(text):
        raise InvalidRef(f"{text!r} is a Databricks page that is no MLflow run, logged model or model version; "
                         "copy the URL of the run's page (https://<workspace>/ml/experiments/<id>/runs/<run_id>)")
    return ref


def _route(route: list[str], params: tuple[tuple[str, str], ...]) -> Ref | None:
    """``experiments/<id>/runs/<run_id>``, ``experiments/<id>/models/m-<id>`` or
    ``models/<name>/versions/<v>`` (anything after them is a tab of the page)."""
    if len(route) < 4:
        return None
    if route[0] == "experiments" and route[2] == "runs" and re.fullmatch(_RUN_ID, route[3]):
        return Ref(NAME, route[3], params=params)
    if route[0] == "experiments" and route[2] == "models" and re.fullmatch(_MODEL_ID, route[3]):
        return Ref(NAME, f"models/{route[3]}", params=params)
    if route[0] == "models" and route[2] == "versions" and route[3].isdigit():
        return _registered(route[1], version=int(route[3]), params=params)
    return None


def _registered(name: str, *, version: int | None = None, alias: str | None = None,
                params: tuple[tuple[str, str], ...] = ()) -> Ref:
    if not re.fullmatch(_NAME, name):
        raise InvalidRef(f"registered model name {name!r}: ckpt_track references support letters, digits, '_', '.', '-'")
    return Ref(NAME, f"registered/{name}", version=version, alias=alias, params=params)


def resolve(sdk: MlflowSdk, ref: Ref) -> Ref:
    """``models/<id>`` and ``registered/<name>`` references -> ``<run_id>:vN``; others as given."""
    segs = ref.segments
    if len(segs) == 2 and segs[0] == "models":
        with sdk.errors(f"looking up logged model {segs[1]}"):
            return _model_ref(sdk.client.get_logged_model(segs[1]), ref)
    if len(segs) == 2 and segs[0] == "registered":
        with sdk.errors(f"looking up registered model {segs[1]!r}"):
            mv = _model_version(sdk, segs[1], ref)
            model_id = getattr(mv, "model_id", None) or str(mv.source).removeprefix("models:/")
            return _model_ref(sdk.client.get_logged_model(model_id), ref)
    return ref


def _model_version(sdk: MlflowSdk, name: str, ref: Ref) -> Any:
    """The registry version a reference selects: by number, by alias, or the newest."""
    if ref.version is not None:
        return sdk.client.get_model_version(name, str(ref.version))
    if ref.alias not in (None, "latest"):
        return sdk.client.get_model_version_by_alias(name, ref.alias)
    versions = sdk.client.search_model_versions(f"name='{name}'")
    if not versions:
        raise CheckpointNotFound(f"registered model {name!r} has no versions at {sdk.where}")
    return max(versions, key=lambda v: int(v.version))


def _model_ref(model: Any, ref: Ref) -> Ref:
    version = model.tags.get(TAG_VERSION)
    if version is None or not model.source_run_id:
        raise CheckpointNotFound(f"logged model {model.model_id} was not logged by ckpt_track (no {TAG_VERSION} tag)")
    return Ref(NAME, model.source_run_id, version=int(version), params=ref.params)
