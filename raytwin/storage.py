"""Where RayTwin keeps data: a local directory or any fsspec URL (``s3://`` through s3fs).

One place resolves URLs to filesystems so that the state store, the model registry, run records
and dead letters all honour the same options. For S3-compatible servers (MinIO, a test server)
set ``RAYTWIN_S3_ENDPOINT_URL``; credentials come from the usual AWS environment variables.

Every S3 request is bounded: ``RAYTWIN_S3_TIMEOUT_S`` (default 5 s) to connect and between bytes of an
answer, ``RAYTWIN_S3_ATTEMPTS`` (default 3) tries in all, retried by botocore alone. Why: s3fs's own
defaults (15 s a read, five tries by botocore, each retried five times by s3fs) held a call to an
endpoint that stopped answering for over six minutes, with a shard's ingest call, the lease heartbeat
or an API request waiting in it; bounded, it fails as the store's `timeout` within ~20 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import suppress
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from raytwin.store_failures import store_io


S3_TIMEOUT_S = 5.0
"""Default of ``RAYTWIN_S3_TIMEOUT_S``: an S3 request's connect and read timeout (a read's is between bytes, so a
large object is not cut short)."""
S3_ATTEMPTS = 3
"""Default of ``RAYTWIN_S3_ATTEMPTS``: tries of an S3 request in all (botocore's standard retries, with backoff)."""


def _positive(name: str, default: float, kind: type[int] | type[float]) -> Any:
    """The environment's `name` as a positive `kind`, `default` where unset; a clear error otherwise (not a
    conversion's traceback from deep inside the first store call)."""
    raw = os.environ.get(name)
    if raw is None:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: expected a {'whole ' if kind is int else ''}number above 0 (default "
                         f"{default:g}); set it so, or unset it")
    return value


def storage_options_for(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for `url`: explicit `options` win over the environment. An S3 store's requests are
    bounded (module docstring) unless `options` set their own ``config_kwargs``."""
    opts = dict(options or {})
    if not url.startswith("s3://"):
        return opts
    endpoint = os.environ.get("RAYTWIN_S3_ENDPOINT_URL")
    if endpoint and "client_kwargs" not in opts:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    timeout_s = _positive("RAYTWIN_S3_TIMEOUT_S", S3_TIMEOUT_S, float)
    attempts = _positive("RAYTWIN_S3_ATTEMPTS", S3_ATTEMPTS, int)
    opts.setdefault("config_kwargs", {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                      "retries": {"mode": "standard", "total_max_attempts": attempts}})
    return opts


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the path within it for `url` (a plain path means the local disk)."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, options))
    if url.startswith("s3://"):
        fs.retries = 1  # s3fs's own loop of tries around botocore's (no constructor option): botocore's alone
    return fs, path.rstrip("/")


def read_chunks(fs: AbstractFileSystem, path: str, size: int = 1 << 20) -> Iterator[bytes]:
    """`path`'s bytes in chunks of `size`: a download streamed to a client, never held whole in memory."""
    with store_io("read"), fs.open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def file_sha256(fs: AbstractFileSystem, path: str) -> str:
    """`path`'s SHA-256, read in chunks (for a file whose writer kept no hash)."""
    digest = hashlib.sha256()
    for chunk in read_chunks(fs, path):
        digest.update(chunk)
    return digest.hexdigest()


@store_io("write")
def make_folder(fs: AbstractFileSystem, path: str) -> None:
    """`path` as a folder, with its parents (where it is one already: nothing)."""
    fs.makedirs(path, exist_ok=True)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys, no spaces, exact float repr) for hashing and storage."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether `fs` is the local disk (where a file is written in place, unlike an object-store PUT)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


@store_io("write")
def replace_file(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` whole, replacing what it held: a reader sees the old bytes or the new, never part of them.

    Why: the store's small records (registrations, catalog entries, model swaps, job records...) are read while
    they are rewritten, and one written in place is empty or partial meanwhile, or for good if its writer dies.
    Local disk: a hidden file beside it (``.<name>.<pid>.<hex>.tmp``, which no reader's ``*.json`` listing
    matches; a killed writer's is removed a day later: `remove_stale_temp_files`), synced, renamed over it, and the
    folder synced so the rename survives a power cut. Object stores (and other filesystems): one PUT, atomic already.
    Parent folders are created.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    tmp = _synced_copy(path, data)
    try:
        os.replace(tmp, path)
    except Exception:
        os.unlink(tmp)
        raise
    _sync_folder(os.path.dirname(path))


def cat_existing(fs: AbstractFileSystem, paths: list[str]) -> dict[str, bytes]:
    """The contents of those of `paths` that exist, read in one batch (concurrently on object stores); any
    other failure to read one raises (an outage must not read as "not there")."""
    found = fs.cat(paths, on_error="return") if paths else {}
    for body in found.values():
        if isinstance(body, Exception) and not isinstance(body, FileNotFoundError):
            raise body
    return {path: body for path, body in found.items() if not isinstance(body, Exception)}


@store_io("write")
def write_markers(fs: AbstractFileSystem, folder: str, names: Collection[str]) -> None:
    """Create the empty files `names` in `folder`, on disk when this returns: records whose existence is what they
    say (the state store's logged-asset markers), which must outlast what they are written before.
    Local disk: created, then the folder and its parent synced once (an empty file has no bytes to sync; the sync
    of the folder's parent keeps a folder just made). Object stores: one PUT each, concurrently."""
    paths = [f"{folder}/{name}" for name in names]
    if not is_local(fs):
        fs.pipe(dict.fromkeys(paths, b""))
        return
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    _sync_folder(folder)
    _sync_folder(os.path.dirname(folder))


TEMP_FILE = re.compile(r"\..+\.\d+\.[0-9a-f]{32}\.tmp")
"""The name of `_synced_copy`'s hidden file (``.<name>.<pid>.<hex>.tmp``), which a writer killed before its rename
leaves behind for good (`remove_stale_temp_files`)."""
STALE_TEMP_S = 24 * 3600.0
"""Age, by its mtime, past which such a file is taken as a dead writer's. A live writer renames (or, `write_once`,
removes) it as soon as it is written and synced, and each write sets its mtime: seconds, minutes for a large artifact
on a slow disk. A day leaves room for a writer paused that long, and for another host sharing the disk whose clock
(or the file server's, which sets the mtime there) is hours off ours."""


def remove_stale_temp_files(fs: AbstractFileSystem, root: str, older_than_s: float = STALE_TEMP_S) -> int:
    """Remove the hidden files that writers killed between write and rename left under `root` (`TEMP_FILE`), once
    `older_than_s` old: no live writer's, on this host or another (`STALE_TEMP_S`); how many. Object stores: none
    (a record is one PUT there). A file gone meanwhile (its writer's rename, another sweep) is skipped."""
    if not is_local(fs):
        return 0
    cutoff, removed = time.time() - older_than_s, 0
    with store_io("write"):
        for folder, _, names in os.walk(root):
            for name in filter(TEMP_FILE.fullmatch, names):
                path = os.path.join(folder, name)
                with suppress(FileNotFoundError):
                    if os.lstat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
    return removed


def _synced_copy(path: str, data: bytes) -> str:
    """`data` in a hidden file beside `path` (its folder created), on disk: the file's name (`TEMP_FILE`)."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except Exception:  # a failed write (disk full...) leaves no file behind; a killed writer leaves a hidden one
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _sync_folder(folder: str) -> None:
    """Persist a rename in `folder` (best effort: some platforms cannot open a folder)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@store_io("write")
def write_once(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` only if it does not exist yet, atomically; `FileExistsError` if it does.

    The compare-and-set behind append-only logs: of two writers racing for one name, exactly one wins.
    Local disk: a complete temporary file is hard-linked to the name (`link` fails if the name exists,
    and a reader never sees half a file), and the folder synced, as `replace_file` does: the name is on disk when
    this returns. Object stores: a conditional PUT (``If-None-Match: *``).
    """
    if not is_local(fs):
        fs.pipe_file(path, data, mode="create")
        return
    tmp = _synced_copy(path, data)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    _sync_folder(os.path.dirname(path))


LOCATION = re.compile(r"[a-z][a-z0-9+.-]*://\S+|(?<![\w.])/[^\s:'\",)]+", re.IGNORECASE)
"""A URL or an absolute path in a message."""


def scrub_locations(text: str) -> str:
    """`text` with URLs and absolute paths as ``<store>``: an answer names no store location (tenants must not
    learn the operator's buckets and paths; the log keeps them)."""
    return LOCATION.sub("<store>", text)
