"""The fsspec boundary: opening a URL with the ``[storage]`` options, and turning the store's
exceptions into ckpt_track errors that say what to fix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import (
    AuthError,
    BackendNotInstalled,
    BackendUnavailable,
    CkptTrackError,
    ConfigError,
)

__all__ = ["MIN_PART", "is_url", "open_fs", "parse_size", "storage_errors", "storage_options"]

MIN_PART = 5 * 1024 * 1024  # S3's smallest multipart part
_S3_DEFAULTS: dict[str, Any] = {  # fail in seconds, not minutes: the upload thread retries on its own
    "config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3, "mode": "standard"}},
}


_BOOL_KEYS = ("anon", "requester_pays", "use_ssl", "version_aware")
_INT_KEYS = ("max_concurrency", "default_block_size")


def parse_size(value: Any, what: str) -> int:
    """Bytes from an int or a string such as ``'64MiB'`` (the settings' size syntax)."""
    from ..config_values import Invalid, _as_size

    try:
        return _as_size(value, True)
    except Invalid as exc:
        raise ConfigError(f"{what}: {exc}, got {value!r}") from None


def storage_options(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec keyword arguments from the ``[storage]`` section (environment strings coerced)."""
    from ..options import parse_bool

    opts = {k: v for k, v in dict(section or {}).items()
            if k not in ("url", "replicas", "options", "part_size") and v != ""}
    for key in _BOOL_KEYS:
        if key in opts:
            opts[key] = parse_bool(opts[key], f"[storage] {key}")
    for key in _INT_KEYS:
        if key in opts:
            try:
                opts[key] = int(opts[key])
            except (TypeError, ValueError):
                raise ConfigError(f"[storage] {key} must be an integer, got {opts[key]!r}") from None
    region = opts.pop("region", None)
    if region:
        opts["client_kwargs"] = {**dict(opts.get("client_kwargs") or {}), "region_name": str(region)}
    extra = dict(section or {}).get("options") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"[storage] options must be a table of fsspec arguments, not {extra!r}")
    return {**opts, **extra}


def is_url(text: str) -> bool:
    """True for an fsspec URL other than a local path (``file://`` and plain paths are local)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.lower() not in ("file", "local") and scheme.isidentifier()


def open_fs(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``url`` (``[storage]`` options passed on)."""
    try:
        import fsspec
    except ImportError as exc:
        raise BackendNotInstalled(f"{url}: object storage needs fsspec: pip install 'ckpt-track[s3]'") from exc
    scheme = url.partition("://")[0].lower()
    # a fresh instance: fsspec's cache keys on the arguments, not on the environment they read
    opts = {"skip_instance_cache": True, **dict(options or {})}
    if scheme in ("s3", "s3a"):
        for key, value in _S3_DEFAULTS.items():
            opts.setdefault(key, value)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as exc:
        extra = "s3" if scheme in ("s3", "s3a") else scheme
        raise BackendNotInstalled(
            f"{url}: fsspec has no {scheme}:// implementation installed ({exc}); "
            f"pip install 'ckpt-track[{extra}]'" if extra == "s3" else f"{url}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{url}: not a storage URL fsspec can open ({exc}); check [local] root / "
                          "[storage] url and the [storage] options") from exc
    return fs, path.rstrip("/")


def _translate(exc: Exception, what: str, url: str) -> CkptTrackError:
    text = str(exc)
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text \
            or "SignatureDoesNotMatch" in text or "NoCredentialsError" in type(exc).__name__ \
            or "Unable to locate credentials" in text:
        return AuthError(
            f"{what}: {url} refused the credentials ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or [storage] key / secret) to a key allowed to read and write there")
    if _no_bucket(exc):
        return ConfigError(f"{what}: the bucket of {url} does not exist ({text}); create it, or point "
                           "[local] root / [storage] url at an existing bucket")
    return BackendUnavailable(
        f"{what}: {url} is unreachable ({type(exc).__name__}: {text}); check that the object store is running "
        "and AWS_ENDPOINT_URL / [storage] endpoint_url; pending checkpoints stay on local disk and are retried")


@contextlib.contextmanager
def storage_errors(what: str, url: str) -> Iterator[None]:
    """The object store's boundary: ckpt_track errors and a missing object (``FileNotFoundError``,
    the caller decides) pass; everything else becomes a typed error naming what to fix."""
    try:
        yield
    except (CkptTrackError, FileExistsError):
        raise
    except FileNotFoundError as exc:
        if _no_bucket(exc):
            raise _translate(exc, what, url) from exc
        raise
    except Exception as exc:
        raise _translate(exc, what, url) from exc


def _no_bucket(exc: BaseException) -> bool:
    return "bucket does not exist" in str(exc).lower() or "NoSuchBucket" in str(exc)


def _absent(exc: FileNotFoundError) -> None:
    """Inside :func:`storage_errors`: a missing object is an answer, a missing bucket is not."""
    if _no_bucket(exc):
        raise exc


def _taken(exc: BaseException) -> bool:
    """A create-only write found the object there (S3: 412 PreconditionFailed; local: exists)."""
    if isinstance(exc, FileExistsError):
        return True
    text = str(exc)
    return "pre-condition" in text or "PreconditionFailed" in text or "412" in text


