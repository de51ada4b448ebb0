"""Checkpoint references: one frozen :class:`Ref` type and one parser.

Canonical grammar (``str(ref)`` always yields this form and parses back)::

    <backend>://<path>[@<selector> | :v<N>][?key=value&...]

    selector := latest | best | step=<N> | <alias>        (step-<N> is an alias)
    path     := backend-specific run locator, '/'-separated segments

Examples::

    local://resnet/3k2j1x@best
    local://resnet/3k2j1x@step=500?root=/data/ckpts
    mlflow://0f1e2d3c4b5a@latest
    wandb://acme/resnet/3k2j1x:v7

Backends add their own forms (web-UI URLs, native SDK references) through
``parse_ref`` hooks collected by the backend registry; they all normalise to a
``Ref``.  This module knows nothing of backends: the registry installs itself as the source
of those forms (:func:`use_native_refs`) when it is imported, so the core never imports the
backends to parse a reference (and ``refs`` <-> ``registry`` is no import cycle).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import parse_qsl, quote, urlencode

from .errors import InvalidRef

__all__ = ["CANONICAL_FORMS", "NativeRefs", "Ref", "parse_ref", "use_native_refs"]

_SEGMENT = r"[A-Za-z0-9_.\-]+"
_ALIAS = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CANONICAL = re.compile(
    rf"^(?P<backend>[a-z][a-z0-9_\-]*)://"
    rf"(?P<path>{_SEGMENT}(?:/{_SEGMENT})*)?"
    r"(?:@(?P<sel>[^?:/]+)|:v(?P<ver>\d+))?"
    r"(?:\?(?P<query>[^#]*))?$"
)
_STEP = re.compile(r"^step=(\d+)$")
MAX_LENGTH = 4096  # characters of a whole reference
MAX_SEGMENT = 255  # bytes of one path segment: a file name on every common file system (caches use them)

CANONICAL_FORMS = (
    "<backend>://<run>                 the run's latest checkpoint",
    "<backend>://<run>@latest | @best  an alias (also step-N or your own aliases)",
    "<backend>://<run>@step=N          the checkpoint logged at step N",
    "<backend>://<run>:vN              version N of the run's checkpoints",
)


@dataclass(frozen=True)
class Ref:
    """A parsed checkpoint reference.

    At most one of ``step``, ``alias`` and ``version`` is set; none of them means
    the run's latest checkpoint.  ``params`` are sorted ``(key, value)`` pairs,
    e.g. ``(("root", "/data/ckpts"),)`` for a local store elsewhere.

    >>> r = Ref.parse("local://resnet/3k2j1x@step=500")
    >>> (r.backend, r.path, r.step, str(r))
    ('local', 'resnet/3k2j1x', 500, 'local://resnet/3k2j1x@step=500')
    """

    backend: str
    path: str = ""
    step: int | None = None
    alias: str | None = None
    version: int | None = None
    params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.step, self.alias, self.version)) > 1:
            raise InvalidRef(f"a reference selects by step, alias or version, not several: {self!r}")
        if self.step is not None and self.step < 0:
            raise InvalidRef(f"step must be >= 0, got {self.step}")
        if self.version is not None and self.version < 1:
            raise InvalidRef(f"versions start at v1, got v{self.version}")
        if self.alias is not None and not (isinstance(self.alias, str) and _ALIAS.fullmatch(self.alias)):
            raise InvalidRef(f"alias {self.alias!r} may only hold letters, digits, '_', '.', '-'")
        if self.path and not re.fullmatch(rf"{_SEGMENT}(?:/{_SEGMENT})*", self.path):
            raise InvalidRef(f"path {self.path!r} may only hold '/'-separated letters, digits, '_', '.', '-'")
        if any(len(seg) > MAX_SEGMENT for seg in self.path.split("/")):
            raise InvalidRef(f"a path segment of {self.path[:60]!r}... is longer than {MAX_SEGMENT} characters")
        for k, v in self.params:
            bad = next((c for x in (k, v) if isinstance(x, str) and (c := _bad_char(x)) is not None), None)
            if bad is not None:
                raise InvalidRef(f"parameter {str(k)[:40]!r} holds the character {bad!r}, which a reference cannot hold")
        object.__setattr__(self, "params", tuple(sorted(self.params)))

    # -- construction -------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Ref:
        """Parse the canonical form only (no backend hooks); see :func:`parse_ref`."""
        m = _CANONICAL.fullmatch(text.strip())
        if not m:
            raise InvalidRef(_bad(text))
        sel, ver = m.group("sel"), m.group("ver")
        step = alias = version = None
        if ver is not None:
            version = int(ver)
        elif sel is not None:
            sm = _STEP.match(sel)
            if sm:
                step = int(sm.group(1))
            elif sel.startswith("step="):
                raise InvalidRef(_bad(text, reason="step must be a non-negative integer, e.g. @step=500"))
            else:
                alias = sel
        params = tuple(parse_qsl(m.group("query") or "", keep_blank_values=True, strict_parsing=False))
        try:
            return cls(m.group("backend"), m.group("path") or "", step, alias, version, params)
        except InvalidRef as exc:
            raise InvalidRef(_bad(text, reason=str(exc))) from None

    # -- views ----------------------------------------------------------------
    @property
    def selector(self) -> str:
        """``@step=N``, ``@alias``, ``:vN`` or ``''``."""
        if self.step is not None:
            return f"@step={self.step}"
        if self.alias is not None:
            return f"@{self.alias}"
        if self.version is not None:
            return f":v{self.version}"
        return ""

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")) if self.path else ()

    def param(self, key: str, default: str | None = None) -> str | None:
        return dict(self.params).get(key, default)

    def run_ref(self) -> Ref:
        """The same run without a selector."""
        return replace(self, step=None, alias=None, version=None)

    def select(self, *, step: int | None = None, alias: str | None = None, version: int | None = None) -> Ref:
        """The same run with another selector."""
        return replace(self, step=step, alias=alias, version=version)

    def with_params(self, params: Mapping[str, str]) -> Ref:
        merged = dict(self.params)
        merged.update(params)
        return replace(self, params=tuple(merged.items()))

    def __str__(self) -> str:
        query = ("?" + urlencode(self.params, quote_via=quote, safe="/")) if self.params else ""
        return f"{self.backend}://{self.path}{self.selector}{query}"


def _bad(text: str, extra_forms: tuple[str, ...] = (), reason: str = "") -> str:
    forms = "\n  ".join(CANONICAL_FORMS + extra_forms)
    why = f" ({reason})" if reason else ""
    shown = text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"
    return f"cannot parse checkpoint reference {shown!r}{why}; accepted forms:\n  {forms}"


def _bad_char(text: str) -> str | None:
    """The first character a reference may never hold: NUL and other control characters,
    lone surrogates (they cannot be encoded, so such a reference could not even be printed)."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return ch
    return None


def _screen(text: str) -> str:
    """Reject, before any parser sees it, what no reference form allows."""
    text = text.strip()
    if len(text) > MAX_LENGTH:
        raise InvalidRef(f"cannot parse a checkpoint reference of {len(text)} characters "
                         f"(at most {MAX_LENGTH}): {text[:80]!r}...")
    if (bad := _bad_char(text)) is not None:
        raise InvalidRef(f"checkpoint reference {text[:200]!r} holds the character {bad!r} at position "
                         f"{text.index(bad)}; control characters and lone surrogates are never part of a "
                         "reference (was it pasted with a stray byte?)")
    return text


class NativeRefs(Protocol):
    """Where the reference forms of the backends come from (the backend registry module)."""

    def names(self) -> Sequence[str]:
        """Every backend name (a scheme that is one is parsed canonically first)."""

    def parse_native(self, text: str) -> Ref | None:
        """The reference a backend recognises in ``text`` (UI URL, native form), or None."""

    def ref_forms(self) -> tuple[str, ...]:
        """Human-readable forms the backends accept, for error messages."""


_native: NativeRefs | None = None


def use_native_refs(source: NativeRefs | None) -> None:
    """Install where :func:`parse_ref` finds the backends' own forms.  The backend registry
    calls this when it is imported (``ckpt_track`` imports it), so parsing needs no import of
    the backends from here; None leaves only the canonical grammar."""
    global _native
    _native = source


def parse_ref(text: str | Ref, native: NativeRefs | None = None) -> Ref:
    """Parse any reference: canonical ``backend://...`` forms, or a form a backend
    recognises (a tracker web-UI URL, a native SDK reference).  ``native`` overrides the
    installed source of backend forms (:func:`use_native_refs`).

    Raises :class:`InvalidRef` listing the accepted forms.

    >>> str(parse_ref("local://proj/run1@best"))
    'local://proj/run1@best'
    """
    if isinstance(text, Ref):
        return text
    if not isinstance(text, str) or not text.strip():
        raise InvalidRef(_bad(repr(text) if not isinstance(text, str) else text))
    text = _screen(text)
    try:
        ref = _parse(text, native if native is not None else _native)
        str(ref)  # what is returned can always be printed and parsed back
        return ref
    except InvalidRef:
        raise
    except ValueError as exc:  # incl. UnicodeError: urlsplit on "http://[::1", a port over 65535, ...
        shown = text if len(text) <= 200 else f"{text[:200]}..."
        raise InvalidRef(f"cannot parse checkpoint reference {shown!r}: {exc}") from exc


def _parse(text: str, native: NativeRefs | None) -> Ref:
    if native is None:  # no backends installed: the canonical grammar only
        return Ref.parse(text)
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme in native.names():
        try:
            return Ref.parse(text)
        except InvalidRef:
            # a backend may also own URLs under its own scheme (e.g. richer native forms)
            ref = native.parse_native(text)
            if ref is not None:
                return ref
            raise
    ref = native.parse_native(text)
    if ref is not None:
        return ref
    raise InvalidRef(_bad(text, native.ref_forms()))
