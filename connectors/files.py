"""Small JSON documents in the store, replaced atomically (a reader never sees a half-written one)."""

from __future__ import annotations

import uuid

from fsspec import AbstractFileSystem


def write_atomically(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write beside `path`, then rename over it: a rename on a local disk, one PUT's worth on an
    object store. Why: a command's record is read by the API while its connector records an ack."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)
