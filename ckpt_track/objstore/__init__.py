"""Checkpoint stores on object storage (S3 and anything else fsspec opens), for
``[local] root = "s3://bucket/prefix"``.

There is no rename and no lock on an object store, so the layout is built so that neither
is needed::

    <prefix>/objects/<xxh3-128>                         every file of every version, content-addressed:
                                                        shared by all projects and runs under the prefix
    <prefix>/<project>/<run_id>/run.json                name, created, config, last_version
    <prefix>/<project>/<run_id>/aliases.json            {"latest": 3, "best": 2}
    <prefix>/<project>/<run_id>/checkpoints/v000003.json   the version's manifest: the commit

A version is committed by writing its manifest last with a create-only conditional write
(``If-None-Match: *`` on S3); the write that finds the number taken moves on to the next one,
so two writers never share a version.  Objects are uploaded first (a file the prefix already
holds at the same hash and size is not sent again: dedup across runs, and an interrupted upload
resumes where it stopped).  A crash leaves only objects no manifest names; ``gc`` removes them.

Credentials and endpoint come from the standard places (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles) and the ``[storage]`` settings.
"""

from __future__ import annotations

from .fsio import MIN_PART, is_url, open_fs, parse_size, storage_errors, storage_options
from .runs import ObjectProjects, ObjectRun, Version
from .store import GC_GRACE_S, ObjectStore

__all__ = ["GC_GRACE_S", "MIN_PART", "ObjectProjects", "ObjectRun", "ObjectStore", "Version", "is_url", "open_fs",
           "parse_size", "storage_errors", "storage_options"]
