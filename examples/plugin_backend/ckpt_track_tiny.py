"""A complete ckpt_track backend for a tracker with a simple artifact API (``tinytracker``).

Everything that is the same for every tracker comes from the core: option parsing
(``options``), the resume policy, version numbers, the dedup plan and the alias table
(``plan``), the download cache (``cache``) and the SDK error boundary (``boundary``).  What is
left is the mapping of the Protocol (``ckpt_track.protocol.Backend``) onto this tracker:

- a checkpoint version ``N`` is the files ``v<N>/...`` of the run, ``manifest.json`` uploaded
  last (the commit: a version without it is never listed);
- content-addressed tensor files (``t-<digest>.safetensors``) go to ``blobs/`` once per run,
  so a version uploads only the tensors that changed, and ``delete`` removes only the ones
  no remaining version names;
- aliases and the version high-water mark are run tags; metrics are run metrics at the step.

Register it with an entry point (``[project.entry-points."ckpt_track.backends"]
tiny = "ckpt_track_tiny:TinyBackend"``) and select it with ``backend = "tiny"``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from ckpt_track.boundary import sdk_errors
from ckpt_track.cache import fetch
from ckpt_track.errors import BackendUnavailable, CheckpointNotFound, CkptTrackError, InvalidRef
from ckpt_track.format import MANIFEST, LocalCheckpoint, is_blob, parse_manifest
from ckpt_track.options import option_names, parse_options
from ckpt_track.plan import AliasTable, by_name, files_to_send, next_version, resume_decision, unreferenced
from ckpt_track.records import Capability, RunInfo, RunSpec, Stored
from ckpt_track.refs import Ref

ALIASES, LAST = "ckpt_track.aliases", "ckpt_track.last_version"


@dataclass(frozen=True)
class TinyOptions:
    root: str = "tiny-tracker"  # where the pretend tracker keeps its data


@dataclass(frozen=True)
class TinyVersion:
    """What this backend needs to find a version again: its manifest's text."""

    manifest: str


def _translate(exc: Exception, what: str) -> CkptTrackError:
    from tinytracker import TinyError

    if isinstance(exc, TinyError) and exc.status == 404:
        return CheckpointNotFound(f"{what}: {exc}")
    if isinstance(exc, (TinyError, OSError)):
        return BackendUnavailable(f"{what}: {exc}; is the tiny tracker reachable?")
    return CkptTrackError(f"{what}: {exc}")


class TinyBackend:
    name: ClassVar[str] = "tiny"
    options: ClassVar[frozenset[str]] = option_names(TinyOptions)
    capabilities: ClassVar[frozenset[str]] = frozenset({Capability.DELETE, Capability.DEDUP})

    def __init__(self, options: Any = None) -> None:
        from tinytracker import TinyClient  # the SDK is imported when the backend is used

        self.opts = parse_options(TinyOptions, options, backend=self.name)
        self.client = TinyClient(Path(self.opts.root).expanduser().absolute())

    # -- runs ---------------------------------------------------------------------------
    def _info(self, doc: dict[str, Any], resumed: bool) -> RunInfo:
        return RunInfo(self.name, doc["project"], doc["id"], doc["name"], Ref(self.name, doc["id"]), resumed)

    def open_run(self, spec: RunSpec) -> RunInfo:
        with sdk_errors(_translate, f"opening a run of project {spec.project!r}"):
            found = self._lookup(spec)
            decision = resume_decision(spec, found is not None, what=f"tiny run {spec.run_id or spec.name!r}",
                                       missing=lambda: f"no tiny run {spec.run_id or spec.name!r} in "
                                                       f"project {spec.project!r} under {self.client.root}")
            if decision == "attach":
                assert found is not None
                return self._info(found, resumed=True)
            run_id = self.client.create_run(spec.project, spec.name or "", dict(spec.config))
            return self._info(self.client.get_run(run_id), resumed=False)

    def _lookup(self, spec: RunSpec) -> dict[str, Any] | None:
        if spec.run_id is not None:
            hits = [r for r in self.client.search_runs(spec.project) if r["id"] == spec.run_id]
        else:
            hits = self.client.search_runs(spec.project, spec.name) if by_name(spec) else []
        return hits[-1] if hits else None

    def find_run(self, ref: Ref) -> RunInfo:
        if len(ref.segments) != 1:
            raise InvalidRef(f"{ref}: a tiny reference is tiny://<run id>")
        with sdk_errors(_translate, f"looking up tiny run {ref.path}"):
            return self._info(self.client.get_run(ref.path), resumed=True)

    # -- versions -----------------------------------------------------------------------
    def _tags(self, run: RunInfo) -> tuple[AliasTable, int]:
        tags = self.client.get_run(run.run_id)["tags"]
        return AliasTable(json.loads(tags.get(ALIASES, "{}"))), int(tags.get(LAST, 0))

    def _manifests(self, run: RunInfo) -> dict[int, str]:
        """Committed versions (those whose manifest is there) -> the manifest's text."""
        out = {}
        with tempfile.TemporaryDirectory(prefix="ckpt_track-tiny-") as tmp:
            for path in self.client.list_files(run.run_id, "v"):
                head, _, fname = path.partition("/")
                if fname == MANIFEST and head[1:].isdigit():
                    self.client.download(run.run_id, path, Path(tmp) / MANIFEST)
                    out[int(head[1:])] = (Path(tmp) / MANIFEST).read_text()
        return dict(sorted(out.items()))

    def _stored(self, run: RunInfo, version: int, text: str, aliases: AliasTable) -> Stored:
        m = parse_manifest(text.encode(), f"{run.ref}:v{version}")
        return Stored(run.ref.select(version=version), run, version, m.step, m.epoch, aliases.of(version),
                      dict(m.metrics), m.size, m.created, dict(m.lineage), native=TinyVersion(text))

    def list(self, run: RunInfo) -> list[Stored]:
        with sdk_errors(_translate, f"listing the checkpoints of {run.ref}"):
            aliases, _ = self._tags(run)
            return [self._stored(run, v, text, aliases) for v, text in self._manifests(run).items()]

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        m = ckpt.manifest
        with sdk_errors(_translate, f"logging checkpoint step {m.step} to {run.ref}"):
            table, last = self._tags(run)
            version = next_version(self._manifests(run), last)
            self.client.set_tag(run.run_id, LAST, str(version))  # a deleted number is never reused
            held = {f.removeprefix("blobs/"): size for f, size in self.client.list_files(run.run_id, "blobs/").items()}
            sent = files_to_send(m, held)
            for fname in sent:  # shared blobs first, then the version's own files, the manifest last
                self.client.upload(run.run_id, ckpt.path / fname, f"blobs/{fname}" if is_blob(fname) else
                                   f"v{version}/{fname}")
            self.client.upload(run.run_id, ckpt.path / MANIFEST, f"v{version}/{MANIFEST}")
            for key, value in m.metrics.items():
                self.client.log_metric(run.run_id, key, value, m.step)
            table = table.point(aliases, version)
            self.client.set_tag(run.run_id, ALIASES, json.dumps(table.as_dict()))
        text = (ckpt.path / MANIFEST).read_text()
        uploaded = sum(m.files[f].size for f in sent) + len(text.encode())
        return replace(self._stored(run, version, text, table), uploaded=uploaded)

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        run_id, version = stored.run.run_id, stored.version

        def own(into: Path) -> None:
            for path in self.client.list_files(run_id, f"v{version}/"):
                self.client.download(run_id, path, into / path.partition("/")[2])

        def blobs(names: Sequence[str], into: Path) -> None:
            for fname in names:
                self.client.download(run_id, f"blobs/{fname}", into / fname)

        with sdk_errors(_translate, f"downloading {stored.ref}"):
            return fetch(dest, own, blobs, where=str(stored.ref))

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        with sdk_errors(_translate, f"moving aliases {list(aliases)} to {stored.ref}"):
            table, _ = self._tags(stored.run)
            self.client.set_tag(stored.run.run_id, ALIASES, json.dumps(table.point(aliases, stored.version).as_dict()))

    def delete(self, stored: Stored) -> None:
        run_id, version = stored.run.run_id, stored.version
        with sdk_errors(_translate, f"deleting {stored.ref}"):
            self.client.delete_file(run_id, f"v{version}/{MANIFEST}")  # un-commit first
            for path in self.client.list_files(run_id, f"v{version}/"):
                self.client.delete_file(run_id, path)
            table, _ = self._tags(stored.run)
            self.client.set_tag(run_id, ALIASES, json.dumps(table.without(version).as_dict()))
            held = [f.removeprefix("blobs/") for f in self.client.list_files(run_id, "blobs/")]
            named = [parse_manifest(t.encode()).files for t in self._manifests(stored.run).values()]
            for fname in unreferenced(held, named):
                self.client.delete_file(run_id, f"blobs/{fname}")

    def link_input(self, run: RunInfo, source: Stored) -> None:
        with sdk_errors(_translate, f"recording that {run.ref} resumes from {source.ref}"):
            self.client.set_tag(run.run_id, "ckpt_track.resumed_from", str(source.ref))

    def finish_run(self, run: RunInfo) -> None:
        return None  # every call above is already durable

    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        return None  # this tracker has no web UI: only tiny://<run id> (parsed by the core)

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return ("tiny://<run id>[@selector]",)

