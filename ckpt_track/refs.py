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
``Ref``.  A reference that does not parse raises :class:`InvalidRef` with one line: what is
wrong, a did-you-mean when a backend name or selector word was mistyped (``lcoal://``,
``@bset``, ``@setp=5``, ``:V3``), and a pointer to ``ckpt-track refs``, which lists every form.  This module knows nothing of backends: the registry installs itself as the source
of those forms (:func:`use_native_refs`) when it is imported, so the core never imports the
backends to parse a reference (and ``refs`` <-> ``registry`` is no import cycle).
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import parse_qsl, quote, urlencode

from .errors import InvalidRef

__all__ = ["CANONICAL_FORMS", "HELP_HINT", "SELECTOR_WORDS", "NativeRefs", "Ref", "parse_ref", "restore_commands",
           "use_native_refs"]

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

#: The selector words ckpt_track moves itself (``@step-N`` aliases too); a near miss of one
#: (``@bset``, ``@lateset``, ``@Best``) is refused as a typo rather than taken as a user alias.
SELECTOR_WORDS = ("latest", "best")
#: How every one-line :class:`InvalidRef` from the parser ends.
HELP_HINT = "(see `ckpt-track refs` for every form)"

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

    ``@step=N`` selects the checkpoint logged at step N; when step N was logged more than
    once (a restart that repeated steps), it selects the one logged last, i.e. the highest
    version ``:vK`` at that step.  The earlier ones stay reachable by their version
    (``ckpt-track ls`` lists every version with its step).  ``@latest`` is the one holding
    the ``latest`` alias (the last one logged), else the highest step.

    An alias is letters, digits, ``_``, ``.``, ``-``; a near miss of a selector word
    (``bset``, ``lateset``, ``Best``) is refused as a typo, so it never silently means another
    checkpoint than the user meant.

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
        try:
            return _refuse_typo(_canonical(text.strip()), text, None)
        except _NoParse as exc:
            raise InvalidRef(_bad(text, exc.reason, _suggest(text.strip(), None))) from None

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


class _NoParse(Exception):
    """Internal: ``text`` is not in a form; ``reason`` says why (no message is built yet)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


def _canonical(text: str) -> Ref:
    """The canonical grammar; :class:`_NoParse` with the reason when ``text`` is not in it."""
    m = _CANONICAL.fullmatch(text)
    if not m:
        raise _NoParse(_why_not(text))
    sel, ver = m.group("sel"), m.group("ver")
    step = alias = version = None
    if ver is not None:
        version = int(ver)
    elif sel is not None:
        sm = _STEP.match(sel)
        if sm:
            step = int(sm.group(1))
        elif sel.startswith("step="):
            raise _NoParse("step must be a non-negative integer, e.g. @step=500")
        else:
            alias = sel
    params = tuple(parse_qsl(m.group("query") or "", keep_blank_values=True, strict_parsing=False))
    try:
        return Ref(m.group("backend"), m.group("path") or "", step, alias, version, params)
    except InvalidRef as exc:
        raise _NoParse(str(exc)) from None


def _why_not(text: str) -> str:
    """Why ``text`` is not canonical, as far as one look can tell ('' when it cannot)."""
    scheme, sep, rest = text.partition("://")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9_\-]*", scheme):
        return ""
    body = rest.partition("?")[0]
    if body.count("@") > 1 or ("@" in body and ":" in body):
        return "a reference selects by one of @step=N, @alias or :vN, not several"
    if body.endswith("@"):
        return "nothing after '@': write @latest, @best, @step=N or an alias"
    if ":" in body:
        return "a version is written :v<N> with N >= 1, e.g. :v3"
    return f"expected {scheme}://<run>[@latest | @best | @step=N | @<alias> | :vN][?key=value]"


def _bad(text: str, reason: str = "", suggestion: str | None = None) -> str:
    """The one line an unparsable reference gets: what, why, a did-you-mean, where the forms are."""
    shown = text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"
    why = f": {reason}" if reason else ": not a reference form ckpt_track knows, e.g. local://<project>/<run>@best"
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    return f"cannot parse checkpoint reference {shown!r}{why}{hint} {HELP_HINT}"


def _refuse_typo(ref: Ref, text: str, source: NativeRefs | None) -> Ref:
    """``ref``, unless the text selects a near miss of ``best``/``latest`` (``@bset``): typed
    text only, so an alias given in code (``log_checkpoint(aliases=["beast"])``) is kept."""
    if ref.alias is not None and (word := typo_of(ref.alias, SELECTOR_WORDS)) is not None:
        raise InvalidRef(_bad(text, f"alias {ref.alias!r} looks like a typo of @{word}", _suggest(text, source)))
    return ref


def typo_of(word: str, targets: Sequence[str]) -> str | None:
    """The target ``word`` mistypes, or None: another case, two letters swapped, or one letter
    more or fewer, with the same first letter (``bset``/``lateset``/``Best`` -> ``best``/
    ``latest``; ``test`` or ``last`` are words of their own and stay aliases)."""
    low = word.lower()
    for target in targets:
        if word == target:
            return None
    for target in targets:
        if not low or low[0] != target[0] or abs(len(low) - len(target)) > 1:
            continue
        if low == target:
            return target
        more, fewer = Counter(low) - Counter(target), Counter(target) - Counter(low)
        if len(low) == len(target) and not more and not fewer:
            return target  # the same letters in another order
        if len(target) > 3 and sum(more.values()) + sum(fewer.values()) == 1 and all(c.isalpha() for c in more):
            return target  # one letter added or dropped (an added digit is deliberate: best2)
    return None


def _fix_selector(text: str) -> str:
    """``text`` with a mistyped selector corrected (``@bset``, ``@setp=5``, ``:V3``, ``:3``)."""
    head, sep, query = text.partition("?")
    scheme_end = head.find("://") + 3 if "://" in head else 0
    body = head[scheme_end:]
    at = body.find("@")
    colon = body.rfind(":")
    if at >= 0:
        path, sel = body[:at], body[at + 1:]
        key, eq, value = sel.partition("=")
        if eq and key != "step" and (key.lower() == "step" or typo_of(key, ("step",))):
            sel = f"step={value}"
        elif not eq and (word := typo_of(sel, SELECTOR_WORDS)) is not None:
            sel = word
        return f"{head[:scheme_end]}{path}@{sel}{sep}{query}"
    if colon >= 0:
        path, sel = body[:colon], body[colon + 1:]
        if re.fullmatch(r"[vV]?\d+", sel):
            sel = f"v{sel.lstrip('vV')}"
        elif sel.lower() in SELECTOR_WORDS or sel.startswith("step"):
            return f"{head[:scheme_end]}{path}@{sel.lower() if sel.lower() in SELECTOR_WORDS else sel}{sep}{query}"
        return f"{head[:scheme_end]}{path}:{sel}{sep}{query}"
    return text


def _fix_scheme(text: str, schemes: Sequence[str]) -> str:
    """``text`` with a mistyped scheme corrected (``lcoal://`` -> ``local://``)."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme in schemes:
        return text
    match = difflib.get_close_matches(scheme.lower(), list(schemes), n=1, cutoff=0.6)
    return f"{match[0]}://{rest}" if match else text


def _suggest(text: str, native: NativeRefs | None) -> str | None:
    """A corrected ``text`` that parses, or None."""
    schemes: list[str] = list(native.names()) if native is not None else []
    schemes += list(getattr(native, "schemes", lambda: ())()) if native is not None else []
    fixed = _fix_selector(_fix_scheme(text, schemes))
    if fixed == text:
        return None
    try:
        _parse(fixed, native)
    except (_NoParse, ValueError):  # InvalidRef is a ValueError
        return None
    return fixed


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

    Raises :class:`InvalidRef` with one line: what is wrong, a did-you-mean for a mistyped
    backend or selector, and ``(see `ckpt-track refs` for every form)``.

    >>> str(parse_ref("local://proj/run1@best"))
    'local://proj/run1@best'
    """
    if isinstance(text, Ref):
        return text
    if not isinstance(text, str) or not text.strip():
        raise InvalidRef(_bad(repr(text) if not isinstance(text, str) else text, "the reference is empty"))
    text = _screen(text)
    source = native if native is not None else _native
    try:
        ref = _refuse_typo(_parse(text, source), text, source)
        str(ref)  # what is returned can always be printed and parsed back
        return ref
    except _NoParse as exc:
        raise InvalidRef(_bad(text, exc.reason, _suggest(text, source))) from None
    except InvalidRef as exc:  # a backend's own message: one line, ending like ours
        message = " ".join(str(exc).split("\n")[:1]).rstrip()
        if HELP_HINT not in message:
            message = f"{message} {HELP_HINT}"
        raise InvalidRef(message) from exc
    except ValueError as exc:  # incl. UnicodeError: urlsplit on "http://[::1", a port over 65535, ...
        shown = text if len(text) <= 200 else f"{text[:200]}..."
        raise InvalidRef(f"cannot parse checkpoint reference {shown!r}: {exc} {HELP_HINT}") from exc


def _parse(text: str, native: NativeRefs | None) -> Ref:
    """``text`` as a Ref; :class:`_NoParse` when no form fits, a backend's InvalidRef as raised."""
    if native is None:  # no backends installed: the canonical grammar only
        return _canonical(text)
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme in native.names():
        try:
            return _canonical(text)
        except _NoParse:
            # a backend may also own URLs under its own scheme (e.g. richer native forms)
            ref = native.parse_native(text)
            if ref is not None:
                return ref
            raise
    ref = native.parse_native(text)
    if ref is not None:
        return ref
    if scheme is not None and not scheme.startswith(("http", "https")):
        raise _NoParse(f"unknown backend {scheme!r}; known: {', '.join(native.names())}")
    raise _NoParse()


def restore_commands(ref: str | Ref) -> tuple[str, str]:
    """The exact commands that restore the checkpoint ``ref`` names, as every tracker's UI
    shows them: the shell line and the Python call, each quoted so it can be pasted as is.

    >>> restore_commands("local://resnet/3k2j1x@step=500")
    ('ckpt-track restore local://resnet/3k2j1x@step=500 -o DIR', 'ct.restore("local://resnet/3k2j1x@step=500", model=model, optimizer=optimizer)')
    """
    text = str(ref)
    return (f"ckpt-track restore {shlex.quote(text)} -o DIR",
            f"ct.restore({json.dumps(text)}, model=model, optimizer=optimizer)")

