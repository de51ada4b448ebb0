"""ClearML's own reference forms: bare task ids as the UI's ID field shows them, offline
session ids, and web-UI links to a task (``experiments/`` on older servers, ``tasks/`` on
newer ones) or to a model page, on any web host."""

from __future__ import annotations

import re

from ...refs import Ref
from .metadata import HEX

__all__ = ["REF_FORMS", "parse_ref"]

_UI = re.compile(rf"^https?://[^/\s?#]+(?:/[^\s?#]*?)?/(?:projects/[^/\s?#]+/)?(experiments|tasks|models)/({HEX})"
                 r"(?:[/?#]\S*)?$")
_BARE = re.compile(rf"^(?P<id>{HEX}|offline-{HEX})(?P<sel>@[^?:/@\s]+|:v\d+)?$")

REF_FORMS = (
    "clearml://<task_id>[@selector]   clearml://offline-<hex>[@selector]   <task_id>   offline-<hex>",
    "clearml://models/<model_id>   clearml://<project>/<task name or run id>[@selector]",
    ("ClearML UI URLs: https://app.clear.ml/projects/<id|*>/experiments/<task_id>/..., "
     ".../projects/<id>/tasks/<task_id>/..., .../projects/<id>/models/<model_id>/... (any web host)"),
)


def parse_ref(backend: str, text: str) -> Ref | None:
    """The reference ``text`` is in one of ClearML's own forms, or None."""
    text = text.strip()
    if m := _UI.match(text):
        kind, ident = m.groups()
        return Ref(backend, f"models/{ident}" if kind == "models" else ident)
    if m := _BARE.match(text):
        return Ref.parse(f"{backend}://{m.group('id')}{m.group('sel') or ''}")
    return None
