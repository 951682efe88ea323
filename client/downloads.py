"""Downloads of run output files and job result files, checked against the SHA-256 the server recorded: in memory
(`run_file`, `job_file`), or streamed to a path (`download_run_file`, `download_job_file` of the sync and async
clients).

The server sends a file's recorded SHA-256 as the ``X-RayTwin-SHA256`` header, always: an answer without it is
refused (`MissingChecksum`: a proxy stripped it, or the URL is not RayTwin's) unless the caller passes
``verify=False``. A streamed file's bytes go to a temporary file beside the target (the same directory, so the
final rename is atomic) and are hashed as they come; the file takes the target's name only once its SHA-256 is
the recorded one. A transfer cut short, bytes that differ, an error or a cancellation leave no file behind and the
target as it was: a reader of the target sees the old file or the whole new one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from client.calls import Call
from client.errors import CorruptDownload, InvalidArgument, MissingChecksum

SHA256_HEADER = "X-RayTwin-SHA256"
CHUNK_BYTES = 1 << 20
"""Bytes read from the answer at a time (and held in memory at most, besides the socket's buffers)."""


@dataclass(frozen=True)
class Origin:
    """Whose record holds a downloaded file's SHA-256, and how a damaged stored file is made again."""

    owner: str  # "run": its message says "the run recorded ..."
    remake: str


RUN_FILE = Origin("run", "`raytwin rerun <run id>` makes it again")
JOB_FILE = Origin("job", "run the scenario or sweep again (a sweep job's run: `raytwin rerun <its run_id>`)")


def recorded_sha256(answer: httpx.Response, origin: Origin, verify: bool) -> str | None:
    """The SHA-256 the server recorded for the file `answer` brings; `MissingChecksum` where it names none (RayTwin
    always does) unless `verify` is False (then None: the file is accepted unchecked)."""
    recorded = (answer.headers.get(SHA256_HEADER) or "").strip().lower() or None  # hex digits in either case
    if recorded is None and verify:
        raise MissingChecksum(
            f"{answer.request.url}: the answer has no (or an empty) {SHA256_HEADER} header, which RayTwin sends with every "
            f"{origin.owner} file, so its bytes cannot be checked: a proxy in front of RayTwin stripped it (let the "
            "header through), or the URL is not RayTwin's API (check it); verify=False accepts the file unchecked")
    return recorded


def check_sha256(url: object, size: int, got: str, recorded: str | None, origin: Origin) -> None:
    """Refuse bytes whose SHA-256 is not the one the server recorded (`recorded` None: accepted unchecked)."""
    if recorded is not None and got != recorded:
        raise CorruptDownload(f"{url}: {size} bytes with SHA-256 {got}, but the {origin.owner} recorded {recorded}: "
                              "download it again; if the same bytes come again, the stored file itself is damaged "
                              f"(the service streams it as stored): {origin.remake}")


def hashed(origin: Origin, verify: bool) -> Callable[[httpx.Response], bytes]:
    """The parser of a file downloaded into memory: its bytes, checked (`recorded_sha256`, `check_sha256`)."""

    def parse(answer: httpx.Response) -> bytes:
        recorded = recorded_sha256(answer, origin, verify)
        check_sha256(answer.request.url, len(answer.content), hashlib.sha256(answer.content).hexdigest(), recorded,
                     origin)
        return answer.content

    return parse


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

    def __init__(self, target: Path, answer: httpx.Response, origin: Origin, verify: bool):
        self.target, self.url, self.origin = target, answer.url, origin
        self.recorded = recorded_sha256(answer, origin, verify)  # refused before a byte is written
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
        check_sha256(self.url, self.size, self._sha256.hexdigest(), self.recorded, self.origin)
        os.replace(self.tmp, self.target)
        return self.target


@dataclass(frozen=True)
class FileDownload:
    """One file to stream to a path, for the clients' download loop: the request (a read: resent like one), the
    target (`download_target`) and how the bytes are checked."""

    call: Call[None]
    target: Path
    origin: Origin
    verify: bool

    def file(self, answer: httpx.Response) -> StreamedFile:
        """The temporary file that `answer`'s bytes go to (`MissingChecksum` first, if they cannot be checked)."""
        return StreamedFile(self.target, answer, self.origin, self.verify)
