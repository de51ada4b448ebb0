"""The references W&B users paste: artifact names (``acme/resnet/ckpt-<run id>:v3``), the SDK's
``wandb-artifact://`` URIs and the web app's run and artifact pages, turned into canonical
``wandb://`` refs.  W&B numbers versions from 0, ckpt_track from 1: W&B ``v3`` is our ``:v4``.

Web hosts: the W&B cloud (``wandb.ai``; ``forge.coreweave.com/wandb`` since 0.31) needs no
server setting; a Dedicated Cloud instance (``https://<name>.wandb.io``) or a self-hosted
server is kept as ``?base_url=``.  A page of a W&B host that is no run or model artifact is
refused here; on any other host the URL is only W&B's when no other tracker claims it too
(the registry decides, see :mod:`ckpt_track.backends.registry`).

Parsing only: no SDK import, so ``ct.parse_ref`` works without ``wandb`` installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from ...errors import InvalidRef
from ...refs import Ref

__all__ = ["ARTIFACT_PREFIX", "REF_FORMS", "SEGMENT", "artifact_name", "parse_ref"]

ARTIFACT_PREFIX = "ckpt-"
_ID = r"[A-Za-z0-9_.\-]+"
SEGMENT = re.compile(rf"^{_ID}$")  # what W&B accepts in an entity, project or run id
_NATIVE = re.compile(rf"^(?:(?P<entity>{_ID})/)?(?P<project>{_ID})/(?P<name>{_ID}):(?P<sel>{_ID})$")
# UI hosts of the W&B cloud (0.31 moved it to CoreWeave Forge under /wandb): no base_url needed
_SAAS = {"wandb.ai": (), "www.wandb.ai": (), "app.wandb.ai": (), "forge.coreweave.com": ("wandb",)}
DEDICATED = ".wandb.io"  # W&B Dedicated Cloud: https://<instance>.wandb.io, its own server

REF_FORMS = (
    "wandb://[<entity>/]<project>/<run id>[@latest|@best|@step=N|:vN][?base_url=https://your-server]",
    "[<entity>/]<project>/ckpt-<run id>:v<K> | :<alias>   (W&B artifact; W&B v0 is ckpt_track :v1)",
    ("https://wandb.ai/<entity>/<project>/runs/<run id>   (also forge.coreweave.com/wandb/..., "
     "https://<instance>.wandb.io/..., self-hosted)"),
    "https://wandb.ai/<entity>/<project>/artifacts/model/ckpt-<run id>/v<K>",
)


def artifact_name(entity: str | None, project: str, run_id: str, selector: int | str) -> str:
    """W&B's name for one of our versions (0-based there), or for an alias."""
    sel = f"v{selector - 1}" if isinstance(selector, int) else selector
    return "/".join(p for p in (entity, project, f"{ARTIFACT_PREFIX}{run_id}:{sel}") if p)


def _selector(sel: str) -> dict[str, Any]:
    """A W&B ``:vK`` or ``:alias`` as a Ref selector (W&B ``v0`` is our version 1)."""
    if re.fullmatch(r"v\d+", sel):
        return {"version": int(sel[1:]) + 1}
    return {"alias": sel}


def _artifact_ref(entity: str | None, project: str, name: str, sel: str | None, params: Mapping[str, str],
                  text: str) -> Ref:
    if not name.startswith(ARTIFACT_PREFIX) or len(name) == len(ARTIFACT_PREFIX):
        raise InvalidRef(f"{text!r}: W&B artifact {name!r} is not a ckpt_track checkpoint "
                         f"(those are named {ARTIFACT_PREFIX}<run id>)")
    path = "/".join(p for p in (entity, project, name[len(ARTIFACT_PREFIX):]) if p)
    try:
        return Ref("wandb", path, params=tuple(params.items()), **(_selector(sel) if sel else {}))
    except InvalidRef as exc:
        raise InvalidRef(f"{text!r}: {exc}") from None


def _parse_url(text: str) -> Ref | None:
    """Run and artifact pages of the W&B app: cloud, Forge, or a self-hosted host."""
    url = urlsplit(text)
    url.port  # noqa: B018 -- a port out of range raises ValueError: InvalidRef at refs.parse_ref
    host = (url.hostname or "").lower()
    parts = [unquote(p) for p in url.path.split("/") if p]
    known = host in _SAAS
    dedicated = host.endswith(DEDICATED)
    for i, seg in enumerate(parts):
        if seg not in ("runs", "artifacts") or i < 2:
            continue
        prefix, (entity, project), rest = parts[:i - 2], parts[i - 2:i], parts[i + 1:]
        if known and tuple(prefix) != _SAAS[host]:
            break
        params = {} if known else {"base_url": f"{url.scheme}://{url.netloc}" + "".join(f"/{p}" for p in prefix)}
        if not all(SEGMENT.match(s) for s in (entity, project, *rest[:1 if seg == "runs" else 3])):
            break
        if seg == "runs" and rest:
            return Ref("wandb", f"{entity}/{project}/{rest[0]}", params=tuple(params.items()))
        if seg == "artifacts" and len(rest) >= 2:
            if rest[0] != "model":
                raise InvalidRef(f"{text!r}: ckpt_track checkpoints are W&B artifacts of type 'model', not {rest[0]!r}")
            return _artifact_ref(entity, project, rest[1], rest[2] if len(rest) > 2 else None, params, text)
        break
    if known or dedicated:
        raise InvalidRef(f"{text!r}: not a W&B run or model artifact page; expected "
                         "https://wandb.ai/<entity>/<project>/runs/<run id> or "
                         ".../artifacts/model/ckpt-<run id>/v<N>")
    return None


def _parse_uri(text: str) -> Ref:
    """``wandb-artifact://[<server>/]<entity>/<project>/ckpt-<run id>:<selector>``."""
    params: dict[str, str] = {}
    rest = text[len("wandb-artifact://"):]
    if rest.startswith(("http://", "https://")):  # the SDK's form with a server prefix
        url = urlsplit(rest)
        url.port  # noqa: B018 -- ValueError for a bad port, InvalidRef at refs.parse_ref
        params["base_url"] = f"{url.scheme}://{url.netloc}"
        rest = url.path
    m = _NATIVE.match(rest.strip("/"))
    if m is None:
        raise InvalidRef(f"{text!r}: expected wandb-artifact://<entity>/<project>/ckpt-<run id>:v<N>")
    return _artifact_ref(m["entity"], m["project"], m["name"], m["sel"], params, text)


def parse_ref(text: str) -> Ref | None:
    """A canonical ``wandb://`` ref for any W&B form of ``text``, or None when it is not one."""
    text = text.strip()
    if text.startswith("wandb://"):
        try:
            return Ref.parse(text)
        except InvalidRef:
            return None
    if text.startswith("wandb-artifact://"):
        return _parse_uri(text)
    if text.startswith(("http://", "https://")):
        return _parse_url(text)
    m = _NATIVE.match(text)
    if m is None or not m["name"].startswith(ARTIFACT_PREFIX):
        return None
    return _artifact_ref(m["entity"], m["project"], m["name"], m["sel"], {}, text)
