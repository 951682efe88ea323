"""Downloads of run output files to a path, streamed (`download_run_file` of the sync and async clients).

The bytes go to a temporary file beside the target (the same directory, so the final rename is atomic) and are
hashed as they come; the file takes the target's name only once its SHA-256 is the one the run record holds
(the ``X-RayTwin-SHA256`` header). A transfer cut short, bytes that differ, an error or a cancellation leave
no file behind and the target as it was: a reader of the target sees the old file or the whole new one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from types import TracebackType

from client.errors import CorruptDownload, InvalidArgument

SHA256_HEADER = "X-RayTwin-SHA256"
CHUNK_BYTES = 1 << 20
"""Bytes read from the answer at a time (and held in memory at most, besides the socket's buffers)."""


def check_sha256(url: object, size: int, got: str, recorded: str | None) -> None:
    """Refuse bytes whose SHA-256 is not the one the run recorded (`recorded` None: the answer named none)."""
    if recorded is not None and got != recorded:
        raise CorruptDownload(f"{url}: {size} bytes with SHA-256 {got}, but the run recorded {recorded}: "
                              "download it again; if the same bytes come again, the stored file itself is damaged "
                              "(the service streams it as stored): `raytwin rerun <run id>` makes it again")


def download_target(path: str | os.PathLike[str]) -> Path:
    """`path` as a download's target, refused before anything is sent unless its directory exists and it is not
    a directory itself (found only after the whole file came, it would waste the transfer)."""
    target = Path(path)
    if target.is_dir():
        raise InvalidArgument(f"{target} is a directory: give the path of the file to write, e.g. {target / 'x'}")
    if not target.parent.is_dir():
        raise InvalidArgument(f"{target.parent} is not a directory: create it first (the file is written beside "
                              "its target, then renamed)")
    return target


class StreamedFile:
    """One download into `target`, used as a context manager: `write` each chunk, then `commit` (checks the
    SHA-256 and renames); leaving the block any other way removes the temporary file."""

    def __init__(self, target: Path, url: object, recorded: str | None):
        self.target, self.url, self.recorded = target, url, recorded
        self.size, self._sha256 = 0, hashlib.sha256()
        self.tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
        # created as `open` creates a file (0666 less the umask; mkstemp's 0600 would stay the target's), never
        # over an existing one
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        self._file = os.fdopen(fd, "wb")

    def __enter__(self) -> StreamedFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)  # gone already once committed

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._sha256.update(chunk)
        self.size += len(chunk)

    def commit(self) -> Path:
        """The target, now holding the whole file (on disk, not only in the page cache); `CorruptDownload`,
        and the target untouched, if its bytes are not the recorded ones."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        check_sha256(self.url, self.size, self._sha256.hexdigest(), self.recorded)
        os.replace(self.tmp, self.target)
        return self.target
