"""The Protocol mapped onto ClearML: runs are tasks, versions are models (online) or artifacts
(offline), and the core's decisions (``plan``: version numbers, the dedup plan, the resume
policy; ``cache``: the download cache) are carried out here.

Where a run's checkpoints live is a strategy picked by the run itself: :class:`Online` for a
task on the server (an imported offline session too), :class:`Offline` for a session folder or
zip on local disk.  A backend reads both kinds, so the choice is per run, made in
:meth:`ClearmlBackend._place`, never a mode check inside the operations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from ... import cache
from ...errors import CheckpointNotFound, InvalidRef
from ...format import LocalCheckpoint, is_blob
from ...options import option_names, parse_options
from ...plan import by_name, files_to_send, next_version, resume_decision, unreferenced
from ...records import Capability, RunInfo, RunSpec, Stored
from ...refs import Ref
from . import _compat, continuation, listing
from .client import Api
from .metadata import (
    BLOB,
    HEX,
    P_ALIASES,
    P_RESUMED,
    P_VERSION,
    RUN_TAG,
    ClearmlCheckpoint,
    ClearmlRun,
    Item,
    State,
    alias_table,
    encode_table,
    make_record,
    model_item,
    own_files,
)
from .offline import Offline, Sessions
from .online import Online
from .refs import REF_FORMS, parse_ref
from .sdk import sdk
from .tasks import OpenTask, Tasks, upload_blobs

__all__ = ["ClearmlBackend", "ClearmlOptions"]

Place = Online | Offline


@dataclass(frozen=True)
class ClearmlOptions:
    """The ``[clearml]`` section."""

    project: str | None = None  # ClearML project (default: the run's)
    offline: bool | None = None  # write an offline session (default: the SDK's CLEARML_OFFLINE_MODE)
    output_uri: str | None = None  # where model packages go (default: the files server)
    web_host: str | None = None  # base of UI links (default: the SDK's web_server)
    offline_dir: str | None = None  # where offline sessions are looked up (default: <clearml cache>/offline)
    # let Task.init detect the repository (default: only when clearml.conf configures sdk.development's
    # vcs_repo_detect_async / store_uncommitted_code_diff; the SDK's own default hangs finish())
    detect_repository: bool | None = None


def _tid(run: RunInfo) -> str:
    return str(getattr(run.native, "task_id", None) or run.run_id)


def _is_offline(run: RunInfo) -> bool:
    return bool(getattr(run.native, "offline", _tid(run).startswith("offline-")))


def _report_scalars(task: Any, ckpt: LocalCheckpoint) -> None:
    """The checkpoint's metrics as task scalars at ``iteration=step`` (``val/loss``: title
    ``val``, series ``loss``)."""
    logger = task.get_logger()
    for metric, value in sorted(ckpt.manifest.metrics.items()):
        if math.isfinite(value):  # the server rejects NaN/inf scalars
            title, _, series = metric.rpartition("/")
            logger.report_scalar(title or series, series, value, iteration=ckpt.step)


class ClearmlBackend:
    """Checkpoints in ClearML: models of a task online, task artifacts offline."""

    name: ClassVar[str] = "clearml"
    options: ClassVar[frozenset[str]] = option_names(ClearmlOptions)
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {Capability.DELETE, Capability.CHOOSE_RUN_ID, Capability.DEDUP})

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        opts = parse_options(ClearmlOptions, options, backend=self.name)
        self.project = opts.project or None
        self.offline = opts.offline
        self.api = Api(web_host=(opts.web_host or "").rstrip("/") or None, force_online=opts.offline is False)
        self.sessions = Sessions(Path(opts.offline_dir).expanduser() if opts.offline_dir else None)
        self.tasks = Tasks(opts.output_uri or None, opts.detect_repository)
        self._online, self._offline = Online(self.api), Offline(self.sessions)

    def _place(self, run: RunInfo) -> Place:
        return self._offline if _is_offline(run) else self._online

    def _boundary(self, doing: str) -> Any:
        return self.api.boundary(doing)

    # -- runs ----------------------------------------------------------------------------------
    def _offline_mode(self) -> bool:
        if self.offline is not None:
            return self.offline
        sdk()
        from clearml import Task

        return bool(Task.is_offline())

    def open_run(self, spec: RunSpec) -> RunInfo:
        project = self.project or spec.project
        with self._boundary(f"opening a run in project {project!r}"):
            if self._offline_mode():
                return self._open_offline(spec, project)
            found = self.api.lookup(project, spec.run_id, spec.name if by_name(spec) else None)
            wanted = spec.run_id or spec.name
            what = f"run {wanted!r} in ClearML project {project!r}" + (f" (task {found['id']})" if found else "")
            decision = resume_decision(spec, found is not None, what=what,
                                       missing=lambda: f"no ClearML task {wanted!r} in project {project!r}")
            if decision == "attach":
                assert found is not None
                return self._info(self.tasks.attach(found), resumed=True)
            return self._info(self.tasks.create(spec, project), resumed=False)

    def _open_offline(self, spec: RunSpec, project: str) -> RunInfo:
        """A new offline session; with the run id or name of an earlier session (a crashed or a
        finished one), a session that continues it (see :mod:`.continuation`)."""
        wanted = spec.run_id or spec.name
        previous = continuation.previous(self.sessions, spec, project)
        what = f"offline ClearML run {wanted!r} in project {project!r}" + (
            f" (session {previous['id']})" if previous else "")
        decision = resume_decision(spec, previous is not None, what=what, missing=lambda: (
            f"no offline ClearML session of run {wanted!r} in project {project!r} in "
            f"{', '.join(map(str, self.sessions.dirs()))}; set [clearml] offline_dir to where the sessions are"))
        info = self._info(self.tasks.create_offline(spec, project), resumed=decision == "attach")
        if decision == "attach":
            assert previous is not None
            continuation.carry_over(self, self._run_info(previous, True), info)
        return info

    def _info(self, op: OpenTask, resumed: bool) -> RunInfo:
        t = op.task
        return self._run_info({"id": t.id, "name": t.name, "system_tags": t.get_system_tags() or [],
                               "project_name": t.get_project_name(), "project": t.project}, resumed)

    def _run_info(self, doc: Mapping[str, Any], resumed: bool, params: tuple[tuple[str, str], ...] = ()) -> RunInfo:
        tid = str(doc["id"])
        run_id = next((t[len(RUN_TAG):] for t in doc.get("system_tags") or [] if t.startswith(RUN_TAG)), tid)
        offline = tid.startswith("offline-")
        url = None
        if not offline and doc.get("project"):
            url = f"{self.api.web()}/projects/{doc['project']}/tasks/{tid}/output/log"
        return RunInfo(backend=self.name, project=str(doc.get("project_name") or ""), run_id=run_id,
                       name=str(doc.get("name") or tid), ref=Ref(self.name, tid, params=params),
                       resumed=resumed, native=ClearmlRun(tid, offline, url))

    def find_run(self, ref: Ref) -> RunInfo:
        segs = ref.segments
        with self._boundary(f"looking up {ref}"):
            if len(segs) == 2 and segs[0] == "models":
                return self.find_run(self.resolve_ref(ref))
            if len(segs) == 1 and re.fullmatch(rf"offline-{HEX}", segs[0]):
                return self._run_info(self.sessions.doc(segs[0])[0], True, ref.params)
            if len(segs) == 1 and re.fullmatch(HEX, segs[0]):
                doc = self.api.task(segs[0])
                if doc is None:
                    raise CheckpointNotFound(f"{ref}: no ClearML task {segs[0]} on {self.api.host}")
                return self._run_info(doc, True, ref.params)
            if len(segs) >= 2:
                return self._find_by_name(ref, "/".join(segs[:-1]), segs[-1])
        raise InvalidRef(f"{ref}: not a ClearML run; accepted forms:\n  " + "\n  ".join(self.ref_forms()))

    def _find_by_name(self, ref: Ref, project: str, wanted: str) -> RunInfo:
        """``clearml://<project>/<run id or task name>``: offline sessions on disk, else the server."""
        if self._offline_mode():
            docs = self.sessions.find(run_id=wanted, project=project) or self.sessions.find(name=wanted, project=project)
            if docs:
                return self._run_info(docs[-1], True, ref.params)
        else:
            row = self.api.lookup(project, wanted, None) or self.api.lookup(project, None, wanted)
            if row is not None:
                return self.find_run(Ref(self.name, row["id"], params=ref.params))
        raise CheckpointNotFound(f"{ref}: no ClearML run named {wanted!r} in project {project!r}")

    def resolve_ref(self, ref: Ref) -> Ref:
        """``clearml://models/<model_id>`` -> ``clearml://<task_id>:vN`` (the run that logged it)."""
        segs = ref.segments
        if len(segs) != 2 or segs[0] != "models":
            return ref
        if not re.fullmatch(HEX, segs[1]):
            raise InvalidRef(f"{ref}: a ClearML model id is 32 hex digits")
        with self._boundary(f"looking up model {segs[1]}"):
            row = self.api.model(segs[1])
        item = model_item(row) if row else None
        if row is None or item is None or not row.get("task"):
            why = "no such model" if row is None else "the model is not a ckpt_track checkpoint"
            raise CheckpointNotFound(f"{ref}: {why} on the ClearML server")
        return Ref(self.name, row["task"], version=item.version, params=ref.params)

    # -- reading ---------------------------------------------------------------------------------
    def _state(self, run: RunInfo) -> State:
        return self._place(run).state(run, _tid(run))

    def list(self, run: RunInfo) -> list[Stored]:
        with self._boundary(f"listing the checkpoints of {run.ref}"):
            state = self._state(run)
        table = alias_table(state.props)
        out: dict[int, Stored] = {}
        for item in sorted(state.items, key=lambda i: i.version):
            out.setdefault(item.version, self._stored(run, item, table, state))
        return list(out.values())

    def _stored(self, run: RunInfo, item: Item, table: Mapping[str, int], state: State) -> Stored:
        aliases = set(item.tags) | {a for a, v in table.items() if v == item.version}
        rec = item.record
        return Stored(ref=run.ref.select(version=item.version), run=run, version=item.version, step=rec.step,
                      epoch=rec.epoch, aliases=tuple(sorted(aliases)), metrics=rec.metrics, size=rec.size,
                      created=rec.created, lineage=rec.lineage,
                      native=self._place(run).handle(item, _tid(run), state))

    def get(self, stored: Stored, dest: Path) -> LocalCheckpoint:
        place, h = self._place(stored.run), stored.native
        with self._boundary(f"downloading {stored.ref}"):
            return cache.fetch(Path(dest), own=lambda into: place.fetch_own(h, into),
                               blobs=lambda names, into: place.fetch_blobs(stored, names, into),
                               where=str(stored.ref))

    # -- writing ---------------------------------------------------------------------------------
    def _writable(self, run: RunInfo) -> OpenTask:
        tid = _tid(run)
        op = self.tasks.held(tid) or self._place(run).reopen(run, tid)
        self.tasks.open[tid] = op
        return op

    def _set_props(self, run: RunInfo, **props: str) -> None:
        op = self.tasks.held(_tid(run))
        if op is not None:  # through the SDK, so its cached copy of the task stays current
            op.task.set_user_properties(**props)
        else:
            self._place(run).edit_props(run, _tid(run), props)

    def put(self, run: RunInfo, ckpt: LocalCheckpoint, aliases: Sequence[str] = ()) -> Stored:
        aliases = sorted(set(aliases))
        place = self._place(run)
        with self._boundary(f"storing step {ckpt.step} in {run.ref}"):
            place.ready()
            op = self._writable(run)
            state = place.state(run, _tid(run))
            version = next_version((i.version for i in state.items), int(state.props.get(P_VERSION) or 0))
            table = {a: v for a, v in alias_table(state.props).items() if a not in aliases}
            m = ckpt.manifest
            # blobs first, the checkpoint last: a checkpoint never lists a file the task lacks, and a
            # put that fails half-way leaves blobs its retry finds already stored
            sent = sorted(f for f in files_to_send(m, state.held_sizes()) if is_blob(f))
            upload_blobs(op, run, ckpt, sent)
            uploaded = sum(m.files[f].size for f in sent) + sum((ckpt.path / f).stat().st_size for f in own_files(m))
            item, table = place.store(op, run, ckpt, version, make_record(m, version, f"{self.name}://{_tid(run)}"), aliases, state, table)
            self._set_props(run, **{P_VERSION: str(version), P_ALIASES: encode_table(table)})
            _report_scalars(op.task, ckpt)
            return replace(self._stored(run, item, table, state), uploaded=uploaded)

    def set_aliases(self, stored: Stored, aliases: Sequence[str]) -> None:
        wanted = set(aliases)
        with self._boundary(f"moving aliases {sorted(wanted)} to {stored.ref}"):
            state = self._state(stored.run)
            self._place(stored.run).set_tags(state, stored, wanted)
            table = alias_table(state.props)
            new = {a: v for a, v in table.items() if a not in wanted}
            if stored.native.kind == "artifact":  # no tags: the table is where its aliases live
                new.update({a: stored.version for a in wanted})
            if new != table:
                self._set_props(stored.run, **{P_ALIASES: encode_table(new)})

    def delete(self, stored: Stored) -> None:
        h: ClearmlCheckpoint = stored.native
        with self._boundary(f"deleting {stored.ref}"):
            if h.kind == "model":
                self._online.remove_model(stored)
            else:
                self._delete_artifacts(stored.run, {h.key: h.uri})
            state = self._state(stored.run)
            # its tensor files that no other checkpoint lists; not every unlisted blob: a put running
            # elsewhere may have stored new ones it has not listed yet
            unused = unreferenced([f for f in h.blobs if f in state.blobs], (i.record.blobs for i in state.items))
            if unused:
                self._delete_artifacts(stored.run, {BLOB + f: str(state.blobs[f].get("uri") or "") for f in unused})
            table = alias_table(state.props)
            if any(v == stored.version for v in table.values()):
                self._set_props(stored.run, **{P_ALIASES: encode_table(
                    {a: v for a, v in table.items() if v != stored.version})})

    def _delete_artifacts(self, run: RunInfo, uris: Mapping[str, str]) -> None:
        op = self._writable(run)
        op.task.delete_artifacts(sorted(uris), raise_on_errors=True, delete_from_storage=True)
        _compat.forget_uploaded(op.task, set(uris))  # else the next upload brings them back
        self._place(run).drop_files(list(uris.values()))

    def link_input(self, run: RunInfo, source: Stored) -> None:
        with self._boundary(f"recording that {run.ref} resumes from {source.ref}"):
            op = self._writable(run)
            self._set_props(run, **{P_RESUMED: str(source.ref)})
            h = source.native
            if isinstance(h, ClearmlCheckpoint) and h.kind == "model" and not _is_offline(run):
                from clearml import InputModel

                InputModel(model_id=h.key).connect(op.task, name=f"resumed_from_v{source.version}")

    # -- runs and projects (``ckpt-track runs`` / ``projects``) ----------------------------------------
    def list_projects(self) -> list[str]:
        """The projects holding ckpt_track runs: offline sessions on disk, and the server's when
        online and configured."""
        with self._boundary("listing ClearML projects"):
            return listing.projects(self)

    def list_runs(self, project: str) -> list[RunInfo]:
        """The runs of ``project`` that hold ckpt_track checkpoints, oldest first;
        ``CheckpointNotFound`` naming the known projects when there is no such project."""
        with self._boundary(f"listing the runs of ClearML project {project!r}"):
            return listing.runs(self, project)

    def finish_run(self, run: RunInfo) -> None:
        with self._boundary(f"closing {run.ref}"):
            self.tasks.finish(_tid(run))

    # -- references --------------------------------------------------------------------------------
    @classmethod
    def parse_ref(cls, text: str) -> Ref | None:
        return parse_ref(cls.name, text)

    @classmethod
    def ref_forms(cls) -> tuple[str, ...]:
        return REF_FORMS
