"""The comet_ml boundary: importing the SDK (lazily, without touching the training's random
generator), pointing it at a self-hosted server, the REST ``API`` and its experiments, and the
table that turns the SDK's and ``requests``' errors into ckpt_track's.

Only this module and the modes call comet_ml; each call runs inside :meth:`CometSdk.calling`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from ...boundary import http_status, sdk_errors
from ...errors import (
    AuthError,
    BackendError,
    BackendNotInstalled,
    BackendUnavailable,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
)

__all__ = ["CometSdk"]

_DEFAULT_SERVER = "https://www.comet.com"


class CometSdk:
    """comet_ml for one backend: the server it talks to, the REST API object and the
    ``APIExperiment`` of each key already looked up (one REST call per experiment)."""

    def __init__(self, url: str | None) -> None:
        self.url = url  # the server root, or None for comet.com / $COMET_URL_OVERRIDE
        self._api: Any = None
        self._experiments: dict[str, Any] = {}

    def module(self) -> Any:
        """comet_ml, imported on first use (the backend imports without the SDK installed), with
        its server set to this backend's."""
        comet_ml = self.imported()
        if self.url:  # comet_ml reads its server from the environment only
            os.environ["COMET_URL_OVERRIDE"] = f"{self.url}/clientlib/"
        return comet_ml

    @staticmethod
    def imported() -> Any:
        """comet_ml itself, imported without pointing it at this backend's server (reading its
        settings must not move where the process's other Comet work goes)."""
        from ...network import keep_random

        try:
            # `import comet_ml` draws random.random() to sample error tracking: not from the training's generator
            with keep_random() if "comet_ml" not in sys.modules else nullcontext():
                import comet_ml
        except ImportError as exc:
            raise BackendNotInstalled("comet", "comet", "comet_ml") from exc
        return comet_ml

    def ref_params(self) -> tuple[tuple[str, str], ...]:
        """The ``?url=`` a reference carries when the server is not comet.com."""
        return (("url", self.url),) if self.url else ()

    def where(self) -> str:
        return f"Comet at {self.url or os.environ.get('COMET_URL_OVERRIDE') or _DEFAULT_SERVER}"

    def calling(self, what: str) -> AbstractContextManager[None]:
        """Turn comet_ml and requests errors raised while doing ``what`` into ckpt_track's."""
        return sdk_errors(self.translate, what)

    # -- the error table ------------------------------------------------------------------
    def _auth(self, exc: Exception, what: str) -> CkptTrackError:
        return AuthError(f"{self.where()} rejected the API key while {what}: set COMET_API_KEY to a valid "
                         "key (Comet: Account Settings, API Keys)")

    def _workspace(self, exc: Exception, what: str) -> CkptTrackError:
        return ConfigError(f"{what}: {exc}; check [comet] workspace and your access to it")

    def _missing(self, exc: Exception, what: str) -> CkptTrackError:
        return CheckpointNotFound(f"{what}: {self.where()} has no such object ({exc})")

    def _unreachable(self, exc: Exception, what: str) -> CkptTrackError:
        return BackendUnavailable(f"cannot reach {self.where()} while {what} ({exc}); check the network and "
                                  "[comet] url, or set [comet] online = false and `comet upload` later")

    def translate(self, exc: Exception, what: str) -> CkptTrackError:
        """The first row whose exception types or HTTP statuses match ``exc`` decides."""
        import requests
        from comet_ml import exceptions as cx

        table: list[tuple[tuple[type[BaseException], ...], range | tuple[int, ...],
                          Callable[[Exception, str], CkptTrackError]]] = [
            ((cx.InvalidAPIKey, cx.Unauthorized, cx.AuthenticationError), (401, 403), self._auth),
            ((cx.InvalidWorkspace, cx.ServiceAccountWorkspaceRestricted, cx.ViewOnlyAccessException), (),
             self._workspace),
            ((cx.NotFound,), (404,), self._missing),
            ((requests.ConnectionError, requests.Timeout), range(500, 600), self._unreachable),
        ]
        status = http_status(exc)
        for types, statuses, make in table:
            if isinstance(exc, types) or status in statuses:
                return make(exc, what)
        return BackendError(f"Comet failed while {what}: {type(exc).__name__}: {exc}")

    # -- the REST API -----------------------------------------------------------------------
    def api(self) -> Any:
        """The REST ``API``; an ``AuthError`` naming COMET_API_KEY before any request without one."""
        if self._api is None:
            comet_ml = self.module()
            if comet_ml.config.get_api_key(None, comet_ml.config.get_config()) is None:
                raise AuthError("Comet needs an API key to work online: set COMET_API_KEY (or run `comet login`), "
                                "or set [comet] online = false to log offline and `comet upload` later")
            with self.calling("connecting to the REST API"):
                self._api = comet_ml.API(cache=False)  # cached reads would hide our own writes
        return self._api

    def lookup(self, key: str) -> Any | None:
        """The ``APIExperiment`` of ``key`` asked anew (None when there is none); call in ``calling``."""
        found = self.api().get_experiment_by_key(key)
        if found is not None:
            self._experiments[key] = found
        return found

    def experiment(self, key: str) -> Any:
        """The ``APIExperiment`` of ``key`` (asked once); ``CheckpointNotFound`` when there is none."""
        if key not in self._experiments:
            with self.calling(f"looking up experiment {key}"):
                found = self.lookup(key)
            if found is None:
                raise CheckpointNotFound(f"no Comet experiment {key} on {self.where()} (or no access to it)")
        return self._experiments[key]

    def workspace(self, configured: str | None) -> str:
        """``configured``, else the API key's default workspace."""
        if configured:
            return configured
        with self.calling("reading your default workspace"):
            return str(self.api().get_default_workspace())

    @staticmethod
    def download_asset(exp: Any, asset_id: str, target: Path) -> None:
        """One asset into ``target``, streamed: ``download_model()`` would hold the whole
        checkpoint in memory."""
        target.parent.mkdir(parents=True, exist_ok=True)
        response = exp.get_asset(asset_id, return_type="response", stream=True)
        try:
            with open(target, "wb") as out:
                out.writelines(response.iter_content(1 << 20))
        finally:
            response.close()
