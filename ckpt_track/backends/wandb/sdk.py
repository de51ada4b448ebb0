"""The boundary of the W&B SDK: the one place that imports ``wandb`` (on first use only), turns
its errors into ckpt_track's (:meth:`Sdk.translate`, a small table), connects the public API,
starts live runs, and logs a checkpoint as an artifact plus a history row."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...boundary import http_status, sdk_errors
from ...errors import (
    AuthError,
    BackendError,
    BackendUnavailable,
    CheckpointNotFound,
    CkptTrackError,
    ConfigError,
)
from ...format import MANIFEST, LocalCheckpoint
from ...records import RunSpec
from .common import description
from .refs import ARTIFACT_PREFIX

__all__ = ["METRIC", "Sdk"]

METRIC = "checkpoint/"  # history keys: checkpoint/step (the x-axis), checkpoint/<metric>
_NO_KEY = re.compile(r"api key|authenticat|log ?in", re.IGNORECASE)


class Sdk:
    """The W&B SDK for one server (``base_url``; None: the SDK's default)."""

    def __init__(self, base_url: str | None) -> None:
        self.base_url = base_url
        self._api: Any = None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return self.base_url or os.environ.get("WANDB_BASE_URL") or "the W&B cloud"

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn W&B SDK errors into the ckpt_track tree, once, at the boundary."""
        with sdk_errors(self.translate, what):
            yield

    def translate(self, exc: Exception, what: str) -> CkptTrackError:
        from wandb.errors import CommError, UsageError

        from ._compat import RunNotFoundError

        text, status = str(exc), http_status(exc)
        if isinstance(exc, UsageError) and _NO_KEY.search(text):
            return AuthError(f"{what}: no W&B API key is configured for {self.where}; set WANDB_API_KEY "
                             "(or run `wandb login`), or set [wandb] mode = \"offline\"")
        if status in (401, 403):
            return AuthError(f"{what}: {self.where} rejected the W&B API key (HTTP {status}); "
                             "set WANDB_API_KEY to a valid key for that server")
        inner = getattr(exc, "exc", None)  # CommError wraps the request's error
        if status == 404 or isinstance(exc, RunNotFoundError) or (
                isinstance(inner, ValueError) and "not found" in str(inner)):
            return CheckpointNotFound(f"{what}: not found on {self.where} ({text})")
        if isinstance(exc, (CommError, ConnectionError, TimeoutError)):
            return BackendUnavailable(f"{what}: cannot reach {self.where} ({text}); check the network and "
                                      "[wandb] base_url, or set [wandb] mode = \"offline\"")
        if isinstance(exc, UsageError):
            return ConfigError(f"{what}: W&B rejected the request: {text}")
        return BackendError(f"{what} failed: {type(exc).__name__}: {text}")

    def api(self) -> Any:
        """The public API client (``wandb.Api``), connected on first use."""
        with self._lock:
            if self._api is None:
                import wandb

                from ._compat import keep_retries_off_global_random

                keep_retries_off_global_random()
                overrides = {"base_url": self.base_url} if self.base_url else {}
                timeout = _http_timeout()
                with self.errors("connecting to the W&B API"):
                    self._api = wandb.Api(overrides=overrides, timeout=timeout)
            return self._api

    def default_entity(self) -> str:
        with self.errors("asking W&B for the default entity"):
            entity = self.api().default_entity
        if not entity:
            raise ConfigError("W&B has no default entity for this API key; set [wandb] entity or WANDB_ENTITY")
        return str(entity)

    def start(self, spec: RunSpec, entity: str | None, project: str, run_id: str | None, *, mode: str,
              directory: Path, resume: str | None) -> Any:
        """``wandb.init`` of a run (``resume`` as W&B spells it, None: not given), with the
        ``checkpoint/*`` metrics plotted against ``checkpoint/step``."""
        import wandb

        kwargs: dict[str, Any] = {"entity": entity, "project": project, "id": run_id, "name": spec.name,
                                  "config": dict(spec.config) or None, "dir": str(directory), "mode": mode,
                                  "reinit": "create_new"}  # several runs may be open in one process
        if resume is not None:
            kwargs["resume"] = resume
            if resume != "never":
                kwargs["allow_val_change"] = True
        if self.base_url:
            kwargs["settings"] = wandb.Settings(base_url=self.base_url)
        directory.mkdir(parents=True, exist_ok=True)
        with self.errors(f"starting W&B run in project {project!r} ({mode})"):
            live = wandb.init(**kwargs)
            live.define_metric(f"{METRIC}step")
            live.define_metric(f"{METRIC}*", step_metric=f"{METRIC}step")
        return live

    def log(self, live: Any, run_id: str, src: Path, ckpt: LocalCheckpoint, aliases: list[str],
            meta: Mapping[str, Any], *, wait: bool, registry: str | None) -> tuple[Any, dict[str, int]]:
        """Log the checkpoint's files at ``src`` as the run's artifact and its metrics as a history
        row; returns the logged artifact (``wait``: once the server numbered it) and the size of
        each of its files by MD5 digest (as the SDK computed it).  ``registry``: link it there
        when it is ``best``."""
        import wandb

        with self.errors(f"logging the checkpoint at step {ckpt.step} to W&B"):
            art = wandb.Artifact(f"{ARTIFACT_PREFIX}{run_id}", type="model", metadata=dict(meta),
                                 description=description(meta, aliases))
            for fname in [*sorted(ckpt.manifest.files), MANIFEST]:
                # immutable: W&B hashes and uploads the file in place instead of copying it to staging
                art.add_file(str(src / fname), name=fname, policy="immutable", skip_cache=True)
            files = {str(e.digest): int(e.size or 0) for e in art.manifest.entries.values()}
            logged = live.log_artifact(art, aliases=aliases)
            if wait:
                logged = logged.wait()  # the server numbers the version once every file is uploaded
            row = {f"{METRIC}step": ckpt.step, **{f"{METRIC}{k}": v for k, v in ckpt.manifest.metrics.items()}}
            if ckpt.manifest.epoch is not None:
                row[f"{METRIC}epoch"] = ckpt.manifest.epoch
            live.log(row)
            live.summary.update(summary(meta, aliases))
            if registry and "best" in aliases:
                self.link(live, logged, registry)
        return logged, files

    @staticmethod
    def link(live: Any, artifact: Any, registry: str) -> None:
        """Link ``artifact`` into a registry collection as its ``best`` (online only:
        ``link_artifact`` needs the server)."""
        live.link_artifact(artifact, target_path=registry, aliases=["best"])


def summary(meta: Mapping[str, Any], aliases: list[str]) -> dict[str, Any]:
    """The run summary keys a checkpoint sets: the newest one, and the best one when it is ``best``
    (what the run's Overview shows, with the line that restores it)."""
    out: dict[str, Any] = {}
    for which in ("latest", "best"):
        if which == "latest" or which in aliases:
            out[f"ckpt_track/{which}_step"] = meta["step"]
            if "ref" in meta:
                out[f"ckpt_track/{which}"] = meta["ref"]
                out[f"ckpt_track/{which}_restore"] = meta["restore"]["cli"]
    return out


def _http_timeout() -> int | None:
    """``WANDB_HTTP_TIMEOUT`` in whole seconds: the SDK reads it once, at import, so ckpt_track
    passes it per ``Api`` to honour a value set later."""
    raw = os.environ.get("WANDB_HTTP_TIMEOUT", "").strip()
    try:
        return max(1, round(float(raw))) if raw else None
    except ValueError:
        raise ConfigError(f"WANDB_HTTP_TIMEOUT={raw!r} is not a number of seconds") from None
