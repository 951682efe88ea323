"""Appended log segments: a writer's accepted events on local disk, one growing Arrow IPC stream per
log partition, instead of one file per shard batch.

Why: a live shard logs tens of small batches a second. A file per batch cost a file creation and a
rename on every call (0.4-1 ms on a busy VM, a quarter of a small call) and left ~100 files a second
for every later read to list and open. Appending the batch's IPC message to an open stream is one
`write` (~0.1 ms), and a partition holds one segment per writer per `SEGMENT_MAX_AGE_S`.

Rules that keep it safe:
- **One writer per segment, never reopened.** A segment's name is new (``seg-<uuid>.arrows``); the
  writer holds an exclusive `flock` on it while it may append, which the kernel releases when the
  writer's process dies. A restarted writer starts new segments.
- **Torn tails are not there.** A batch is appended as one message and acknowledged after its
  `write` returned. A writer killed mid-write leaves a partial message at the end of its last
  segment: that batch was not acknowledged, and readers (`read_segment`) stop at the last complete
  message. Readers cannot tell that from a segment cut later (by hand, a bad disk: acknowledged
  events lost), so a closed segment ending in a partial message is reported (`_report_cut`). A write that
  fails abandons the segment (the next batch starts a new one), so nothing is ever appended after a
  partial message; one that holds no batch yet is deleted (a full disk refusing every try must not leave
  an empty segment per try).
- **Compaction takes only segments no writer holds** (`held_segment`): it locks the segment first, so
  no append can land between its read and its delete.
- Local disks only: an object store cannot append (there the log keeps one object per batch).
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from raytwin.damage import report_damaged
from raytwin.store_failures import store_io

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".arrows"
"""Arrow IPC *stream* format (``.arrows``): appendable, unlike the IPC file format's footer."""
SEGMENT_MAX_AGE_S = 300.0
"""A writer starts a new segment after this long, so compaction can take the old one."""
SEGMENT_MAX_BYTES = 128 * 2**20
"""...or once a segment holds this much (~1.3M log rows)."""


def is_segment(name: str) -> bool:
    return name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)


@dataclass
class _Open:
    fd: int
    path: str
    opened_at: float  # monotonic
    size: int


class SegmentWriter:
    """A process's open segments, one per partition directory (`append`); not thread-safe (a
    shard's calls run one at a time)."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self._header = schema.serialize().to_pybytes()
        self._open: dict[str, _Open] = {}

    @store_io("write")
    def append(self, directory: str, table: pa.Table) -> None:
        """Append `table` (of `schema`) to the partition's segment as one message; returns once the
        bytes are written (as durable as a written file: the page cache, not fsync)."""
        if not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        batch = table.combine_chunks().to_batches()
        data = pa.concat_batches(batch).serialize().to_pybytes() if len(batch) > 1 else batch[0].serialize().to_pybytes()
        now = time.monotonic()
        self._close_aged(now)
        seg = self._open.get(directory) or self._start(directory, now)
        try:
            _write_all(seg.fd, data)
        except BaseException:  # never append after a partial message; a segment with no batch in it goes
            self._abandon(directory, discard=seg.size == len(self._header))
            raise
        seg.size += len(data)
        if seg.size >= SEGMENT_MAX_BYTES:
            self._abandon(directory)

    def close(self, under: str = "") -> None:
        """Stop appending to the segments in directories below `under` (all by default): they
        become closed segments that compaction may take."""
        for directory in [d for d in self._open if d.startswith(under)]:
            self._abandon(directory)

    def _start(self, directory: str, now: float) -> _Open:
        path = f"{directory}/{SEGMENT_PREFIX}{uuid.uuid4().hex}{SEGMENT_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # the partition's first segment: its directory is made then
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, self._header)
        except BaseException:
            _discard(fd, path)
            raise
        seg = self._open[directory] = _Open(fd, path, now, len(self._header))
        return seg

    def _close_aged(self, now: float) -> None:
        for directory, seg in list(self._open.items()):
            if now - seg.opened_at >= SEGMENT_MAX_AGE_S:
                self._abandon(directory)

    def _abandon(self, directory: str, discard: bool = False) -> None:
        """Stop appending to the partition's segment; `discard`: delete it too (it holds no batch)."""
        seg = self._open.pop(directory, None)
        if seg is None:
            return
        if discard:
            _discard(seg.fd, seg.path)
        else:
            os.close(seg.fd)  # releases the lock

    def __del__(self) -> None:
        for seg in self._open.values():
            os.close(seg.fd)


def _discard(fd: int, path: str) -> None:
    """Delete a segment this writer created whose writes failed before any batch was in it (a full disk: one
    empty file per refused try would pile up), then close it: unlinked while still locked, so no compaction
    takes it meanwhile. A failed delete leaves an empty segment, which readers skip."""
    with suppress(OSError):
        os.unlink(path)
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@store_io("read")
def read_segment(path: str, start: int = 0, *, fs: Any = None) -> tuple[list[pa.RecordBatch], int]:
    """The complete messages of a segment from byte offset `start` (0, or an offset this function
    returned before), and the offset after the last of them: a partial message at the end (a
    writer mid-append, or killed mid-append) is left for later or for good. `fs`: an fsspec
    filesystem other than the local disk holding it (a copied store), read whole. A whole read
    (`start` 0) of a segment no writer holds that ends in a partial message reports it (`_report_cut`)."""
    remote = fs is not None and "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if remote:
        source = pa.BufferReader(fs.cat_file(path))
    else:
        try:
            source = pa.memory_map(path)
        except FileNotFoundError:
            raise
        except OSError:  # mapping an empty file fails: a segment whose header is not written yet
            return [], start
    with source:
        batches, end = _complete_messages(source, start)
        if start == 0 and end < source.size():
            _report_cut(path, batches, end, source.size(), lockable=not remote)
    return batches, end


def _complete_messages(source: Any, start: int) -> tuple[list[pa.RecordBatch], int]:
    reader = ipc.MessageReader.open_stream(source)
    try:
        schema = ipc.read_schema(reader.read_next_message())
    except (StopIteration, pa.ArrowInvalid, OSError):
        return [], start
    end = source.tell() if start == 0 else start
    source.seek(end)
    batches = []
    while True:
        try:
            message = reader.read_next_message()
            batches.append(ipc.read_record_batch(message, schema))
        except (StopIteration, pa.ArrowInvalid, OSError):
            return batches, end
        end = source.tell()


def _report_cut(path: str, batches: list[pa.RecordBatch], end: int, size: int, *, lockable: bool) -> None:
    """Report a segment that ends in a partial message for good. Why: readers keep its complete messages, as
    they must for a writer killed mid-append (an unacknowledged batch), but a segment cut by hand or by a bad
    disk lost acknowledged events too, and an operator must learn of it to have them sent again. A segment a
    writer holds (`flock`) may still be mid-append: not reported."""
    if lockable and _appending(path):
        return
    report_damaged("log_segment", path, str(size),
                   "event=log_segment_cut file=%s rows_kept=%d bytes_kept=%d bytes_lost=%d action=kept_readable_rows "
                   "(its tail is lost: one unacknowledged batch if its writer crashed mid-append; acknowledged events "
                   "if it was truncated: restore it or have those events sent again)",
                   path, sum(b.num_rows for b in batches), end, size - end)


_held_here: set[str] = set()
"""Segments this process holds (`held_segment`): closed ones, though their lock is taken."""


def _appending(path: str) -> bool:
    """Whether a writer (another open file than `held_segment`'s) holds the segment's lock, or it is gone."""
    if path in _held_here:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close below
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def held_segment(path: str) -> Iterator[bool]:
    """Lock a segment against its writer: True (and held for the block) when no writer holds it any
    more, False when one still may append to it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        _held_here.add(path)
        try:
            yield True
        finally:
            _held_here.discard(path)
    finally:
        os.close(fd)
