"""Comet's names and references: experiment keys, the ``ckpt-v<N>-step<S>`` model names, the
SDK's ``experiment://`` and ``registry://`` model URIs and the web UI's experiment and
model-registry pages (``https://www.comet.com/<workspace>/model-registry/<model>[/<version>]``),
on comet.com or a self-hosted server (kept as ``?url=``).

Nothing here imports comet_ml: references parse (and ``ckpt-track`` explains a malformed one)
on a machine without the SDK.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from ...errors import ConfigError, InvalidRef
from ...refs import Ref

__all__ = ["KEY", "MODEL", "REF_FORMS", "SEGMENT", "model_name", "parse_ref", "registry_name", "segment",
           "semver", "server_root"]

NAME = "comet"
KEY = re.compile(r"^[A-Za-z0-9]{32,50}$")  # what comet_ml accepts as an experiment key
MODEL = re.compile(r"^ckpt-v(\d+)-step(\d+)$")
SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")
_REGISTRY_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_SAAS_HOSTS = frozenset({"comet.com", "www.comet.com", "comet.ml", "www.comet.ml"})
_VERSION = re.compile(r"^\d+\.\d+\.\d+(?:[-+][A-Za-z0-9.\-]+)?$")  # a registry version: semver

REF_FORMS = (
    "comet://<workspace>/<project>/<experiment key or name>[@selector | :vN]",
    "comet://<project>/<experiment key or name>   (workspace from [comet] workspace)",
    "https://www.comet.com/<workspace>/<project>/<experiment key>[/...]   (self-hosted hosts too)",
    "https://www.comet.com/<workspace>/model-registry/<model>[/<version>]   (= registry://<workspace>/<model>)",
    "experiment://<experiment key>/ckpt-v<N>-step<S>",
    "experiment://<workspace>/<project>/<experiment name>/ckpt-v<N>-step<S>",
    "registry://<workspace>/<model>[:<version or stage>]   (= comet://registry/<workspace>/<model>@<version>)",
)


def model_name(version: int, step: int) -> str:
    """The Comet model name of checkpoint ``version`` logged at ``step``."""
    return f"ckpt-v{version}-step{step}"


def segment(value: Any, what: str) -> str:
    """A workspace, project or run id that can be one segment of a reference."""
    if not isinstance(value, str) or not SEGMENT.match(value):
        raise ConfigError(f"Comet {what} {value!r} may only hold letters, digits, '_', '.', '-'")
    return value


def server_root(url: Any) -> str | None:
    """``https://comet.example.com[/clientlib/]`` -> ``https://comet.example.com``."""
    if not url:
        return None
    u = urlparse(str(url))
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ConfigError(f"[comet] url {url!r} must look like https://comet.example.com (the server root)")
    return f"{u.scheme}://{u.netloc}{re.sub(r'/clientlib/?$', '', u.path.rstrip('/'))}"


def registry_name(value: Any) -> str | None:
    """The ``register_as`` option, refused here rather than by the server at the first upload."""
    if not value:
        return None
    if not _REGISTRY_NAME.match(str(value)):
        raise ConfigError(f"[comet] register_as {value!r}: Comet registry names are lowercase "
                          "letters and digits joined by single '-', e.g. 'resnet-ckpt'")
    return str(value)


def semver(version: str) -> tuple[int, ...]:
    """A registry version string as numbers, for ordering (``"2.0.0"`` -> ``(2, 0, 0)``)."""
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", version)[:3])


def _experiment_uri(text: str) -> Ref:
    parts = text[len("experiment://"):].split("/")
    if len(parts) not in (2, 4) or not all(parts):
        raise InvalidRef(f"{text!r}: expected experiment://<experiment key>/<model> or "
                         "experiment://<workspace>/<project>/<experiment name>/<model>")
    if not (match := MODEL.match(parts[-1])):
        raise InvalidRef(f"{text!r}: model {parts[-1]!r} is not a ckpt_track checkpoint "
                         "(those are named ckpt-v<N>-step<S>)")
    if len(parts) == 2 and not KEY.match(parts[0]):
        raise InvalidRef(f"{text!r}: {parts[0]!r} is not an experiment key (32 to 50 letters and digits)")
    return Ref(NAME, "/".join(parts[:-1]), version=int(match.group(1)))


def _registry_uri(text: str) -> Ref:
    path, colon, version = text[len("registry://"):].partition(":")
    parts = path.split("/")
    if len(parts) != 2 or not all(parts) or (colon and not version):
        raise InvalidRef(f"{text!r}: expected registry://<workspace>/<model>[:<version or stage>]")
    return Ref(NAME, f"registry/{parts[0]}/{parts[1]}", alias=version or None)


def _page(text: str) -> Ref | None:
    u = urlparse(text)
    u.port  # noqa: B018 -- a port out of range raises ValueError: InvalidRef at refs.parse_ref
    parts = [p for p in u.path.split("/") if p]
    saas = (u.hostname or "").lower() in _SAAS_HOSTS
    params = () if saas else (("url", f"{u.scheme}://{u.netloc}"),)
    if len(parts) >= 3 and parts[1] == "model-registry" and SEGMENT.match(parts[0]) and SEGMENT.match(parts[2]):
        # <ws>/model-registry/<model>[/<version>][/<tab>]: a registry model (its newest version) or one version
        version = parts[3] if len(parts) > 3 and _VERSION.match(parts[3]) else None
        return Ref(NAME, f"registry/{parts[0]}/{parts[2]}", alias=version, params=params)
    if len(parts) >= 3 and KEY.match(parts[2]):  # <ws>/<project>/<key>[/...]: an experiment page
        return Ref(NAME, "/".join(parts[:3]), params=params)
    if saas:
        raise InvalidRef(f"{text!r} is not a Comet experiment or model-registry page; copy an experiment's URL "
                         "(https://www.comet.com/<workspace>/<project>/<experiment key>) or a registry model's "
                         "(https://www.comet.com/<workspace>/model-registry/<model>/<version>)")
    return None


def parse_ref(text: str) -> Ref | None:
    """The SDK's model URIs and the UI's experiment pages as ``comet://`` references; None for
    anything else (the canonical ``comet://`` form is parsed by the core)."""
    t = text.strip()
    low = t.lower()
    if low.startswith("experiment://"):
        return _experiment_uri(t)
    if low.startswith("registry://"):
        return _registry_uri(t)
    if low.startswith(("http://", "https://")):
        return _page(t)
    return None
