"""Checkpoint format v1: a directory of safetensors shards, ``state.json`` and
``manifest.json``.

``manifest.json`` is written last and is the commit: a directory without a
valid manifest is not a checkpoint.  It records the format version, step,
epoch, creation time, metrics, lineage, and the size and xxh3-128 hash of every
other file.  Loading never unpickles: tensors come from safetensors, the rest
from JSON.

Checkpoints are published atomically: written into a hidden temporary sibling
directory, fsynced, then renamed into place.

Incremental (content-addressed) layout: with ``blobs=True`` tensors are grouped
(a tensor of ``pack_size`` bytes or more alone, smaller ones packed together in
name order) and each group is written to ``t-<digest>.safetensors``, where the
digest is the xxh3-128 of the file (earlier versions: of the group's names, dtypes,
shapes and bytes; the schemes never share a name).  Equal names mean equal bytes, so a group that did not change since an earlier
checkpoint is hard-linked from it instead of being written again, and a backend
can store each such file once per run (:func:`is_blob`).  The directory is still
a plain v1 checkpoint: any v1 reader loads it.

The package's modules:

- :mod:`.manifest`: the manifest (:class:`Manifest`, :class:`FileEntry`), its
  parsing and digest, :class:`LocalCheckpoint` and the format's constants;
- :mod:`.files`: opening and parsing files that may be damaged or hostile;
- :mod:`.hashing`: file hashes, content digests, content-addressed file names;
- :mod:`.write`: :func:`write_checkpoint`; :func:`write_blobs` and :func:`commit_staged` (a sharded save);
- :mod:`.copy`: :func:`copy_checkpoint` and the download cache's :func:`link_cached`;
- :mod:`.read`: :func:`verify`, :func:`load_checkpoint` and reading tensors in place;
- :mod:`.atomic`: the atomic file-system steps every store shares;
- :mod:`.modes`: committed files are read-only, readable as the umask allows (:func:`seal`).

Everything is importable from ``ckpt_track.format`` itself.
"""

from __future__ import annotations

from .atomic import (
    TMP_PREFIX,
    atomic_json,
    free_space,
    fsync_dir,
    now_iso,
    publish,
    read_json_file,
    remove_dir,
    staged_dir,
    staging,
    swap_in,
)
from .copy import copy_checkpoint, link_cached
from .files import MAX_JSON_DEPTH, check_name, load_json, open_regular, read_exact
from .hashing import PACK_SIZE, blob_groups, blob_name, content_digest, hash_file, hash_open, is_blob
from .manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HASH_ALGORITHM,
    LAYOUT,
    MANIFEST,
    MAX_FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    MAX_STATE_BYTES,
    SHARDED_FORMAT_VERSION,
    STATE,
    FileEntry,
    LocalCheckpoint,
    Manifest,
    canonical_json,
    manifest_digest,
    parse_manifest,
    read_manifest,
)
from .modes import read_only_mode, seal
from .read import (
    MAX_HEADER_BYTES,
    TensorInfo,
    fits,
    load_checkpoint,
    load_into,
    open_files,
    open_tensor_files,
    open_verified,
    read_header,
    read_state,
    read_state_open,
    read_tensor,
    refuse_sharded,
    tensor_files,
    tensor_index,
    verify,
)
from .write import commit_staged, write_blobs, write_checkpoint

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HASH_ALGORITHM",
    "LAYOUT",
    "MANIFEST",
    "MAX_FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "MAX_STATE_BYTES",
    "PACK_SIZE",
    "SHARDED_FORMAT_VERSION",
    "STATE",
    "TMP_PREFIX",
    "FileEntry",
    "LocalCheckpoint",
    "Manifest",
    "TensorInfo",
    "atomic_json",
    "blob_groups",
    "blob_name",
    "canonical_json",
    "check_name",
    "commit_staged",
    "content_digest",
    "copy_checkpoint",
    "fits",
    "free_space",
    "fsync_dir",
    "hash_file",
    "hash_open",
    "is_blob",
    "link_cached",
    "load_checkpoint",
    "load_into",
    "load_json",
    "manifest_digest",
    "now_iso",
    "open_files",
    "open_regular",
    "open_tensor_files",
    "open_verified",
    "parse_manifest",
    "publish",
    "read_exact",
    "read_header",
    "read_json_file",
    "read_manifest",
    "read_only_mode",
    "read_state",
    "read_state_open",
    "read_tensor",
    "refuse_sharded",
    "remove_dir",
    "seal",
    "staged_dir",
    "staging",
    "swap_in",
    "tensor_files",
    "tensor_index",
    "verify",
    "write_blobs",
    "write_checkpoint",
]
