"""An index of the event log's identities, so a replayed backlog is de-duplicated in batches.

Why: an event older than its twin's lateness window is no longer in the twin's memory, so telling
a re-delivery (duplicate), a re-used identity with other content (conflict) and a new event (too
late) apart needs the durable log. Scanning the log's day partition once per such event made an
at-least-once producer replaying 20,000 old events run at ~290 events/s. `LogKeyIndex` answers a
whole batch from an in-memory map per partition: identity (asset, event time, sequence,
idempotency key) -> digest of the logged content (quality and SI values).

Never trusted blindly:
- Each partition's index is persisted beside its log files (``log/tenant=T/date=D/_keys.parquet``;
  the leading ``_`` keeps dataset readers off it, and `StateStore.prune` deletes it with the
  partition), so it survives restarts. It names the log files it covers, with their sizes, and is
  written with Parquet page checksums.
- Every lookup lists the partition first (one listing, no file reads when nothing changed). An
  index whose files are not all listed with their sizes (a compaction merged them), or that is
  missing or damaged (its bytes do not decode: a failed page checksum, another schema), is rebuilt
  from the log files; the store failing to read it is an outage (`StoreIOError`), never a rebuild.
  Listed files it does not cover (new batches) are read and merged. A log segment
  (`raytwin.logsegments`) grows while it is open: the index covers it up to a byte offset and
  reads only the messages appended after it.
- Only an exact answer is final: an identity logged with the same content digest is a duplicate;
  one logged with other content, or with several contents (a conflicting re-delivery logged
  before a crash), is `CONFIRM`: the caller reads those rows exactly (`StateStore.find_events`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
import pyarrow as pa
import pyarrow.parquet as pq

from raytwin.logsegments import is_segment, read_segment
from raytwin.storage import replace_file
from raytwin.store_failures import store_io
from raytwin.statestore import LOG_BATCH_SCHEMA, LOG_PART_SUFFIX, SCAN_ATTEMPTS, EventKey, StateStore, _date, read_files

log = logging.getLogger("raytwin.store")

INDEX_FILE = "_keys.parquet"
PERSIST_AFTER_FILES = 16
"""New log files merged into a cached index before it is written again (a restart reads the rest)."""
MAX_CACHED_ROWS = 1_000_000
"""Identities kept in memory across partitions (~200 MB); the least recently used partitions go first."""

Identity = tuple[str, int, int, str]
"""An event's identity in the log: asset, event time [us], sequence, idempotency key."""

_COLUMNS = ["asset_id", "event_time", "sequence", "idempotency_key", "quality", "values"]
_INDEX_SCHEMA = pa.schema([("asset_id", pa.string()), ("event_time", pa.int64()), ("sequence", pa.int64()),
                           ("idempotency_key", pa.string()), ("digest", pa.binary(16))])


class Logged(Enum):
    """What the log holds under an identity, as far as the index can tell exactly."""

    ABSENT = "absent"
    SAME = "same"  # logged with exactly this content: a re-delivery
    CONFIRM = "confirm"  # logged with other (or several) contents: read the rows to decide


def content_digest(quality: str, values: Iterable[tuple[str, float]]) -> bytes:
    """16 bytes identifying an event's logged content (quality, SI values by name, exact floats)."""
    text = json.dumps([quality, sorted(values)], separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass
class _Partition:
    """One day partition's identities: the log files they were read from (name -> size; for a
    segment, the offset read up to)."""

    files: dict[str, int] = field(default_factory=dict)
    digests: dict[Identity, bytes | None] = field(default_factory=dict)  # None: several contents
    unsaved: int = 0  # files merged since the index file was written

    def merge(self, table: pa.Table) -> None:
        for identity, digest in zip(_identities(table), _digests(table)):
            known = self.digests.setdefault(identity, digest)
            if known is not None and known != digest:
                self.digests[identity] = None


def _changed(name: str, covered: int, listed: int | None) -> bool:
    """Whether a file the index covers is gone or other than it was (a segment only grows)."""
    return listed is None or (listed < covered if is_segment(name) else listed != covered)


def _identities(table: pa.Table) -> list[Identity]:
    return list(zip(table.column("asset_id").to_pylist(), table.column("event_time").cast(pa.int64()).to_pylist(),
                    table.column("sequence").to_pylist(), table.column("idempotency_key").to_pylist()))


def _digests(table: pa.Table) -> list[bytes | None]:
    if "digest" in table.column_names:
        return table.column("digest").to_pylist()
    return [content_digest(q, v) for q, v in zip(table.column("quality").to_pylist(), table.column("values").to_pylist())]


def _decoded(data: bytes) -> _Partition:
    """The index file's bytes as a partition; raises on any damage (a failed page checksum is an OSError: decoded
    apart from the read, so that it is never taken for the store's)."""
    table = pq.read_table(io.BytesIO(data), page_checksum_verification=True)
    meta = table.schema.metadata or {}
    files = json.loads(meta[b"files"])
    if table.schema.remove_metadata() != _INDEX_SCHEMA or int(meta[b"rows"]) != table.num_rows:
        raise ValueError("unexpected schema or row count")
    part = _Partition(files={str(k): int(v) for k, v in files.items()})
    part.merge(table)
    return part


class LogKeyIndex:
    """Batched "is this identity logged, with this content?" over a `StateStore`'s event log."""

    def __init__(self, store: StateStore, max_rows: int = MAX_CACHED_ROWS):
        self.store, self.max_rows = store, max_rows
        self._cache: OrderedDict[tuple[str, str], _Partition] = OrderedDict()
        self.rebuilds = 0  # partitions rebuilt from their log files (missing, corrupt or stale index)

    def lookup(self, tenant: str, queries: list[tuple[str, EventKey, bytes]]) -> list[Logged]:
        """For each (asset, key, `content_digest`) of the tenant, what the log holds under it."""
        days = {_date(key[0]) for _, key, _ in queries}
        parts = {day: self._partition(tenant, day) for day in sorted(days)}
        out = []
        for asset_id, key, digest in queries:
            part = parts[_date(key[0])]
            identity = (asset_id, *key)
            if identity not in part.digests:
                out.append(Logged.ABSENT)
            else:
                out.append(Logged.SAME if part.digests[identity] == digest else Logged.CONFIRM)
        self._evict(keep=set((tenant, d) for d in days))
        return out

    # ------------------------------------------------------------------ partitions ----
    def _directory(self, tenant: str, day: str) -> str:
        return f"{self.store.root}/log/tenant={tenant}/date={day}"

    def _partition(self, tenant: str, day: str) -> _Partition:
        directory = self._directory(tenant, day)
        for attempt in range(SCAN_ATTEMPTS):
            listing = self._list(directory)
            part = self._cache.pop((tenant, day), None) or self._load(directory)
            rebuild = part is None or any(_changed(name, covered, listing.get(name)) for name, covered in part.files.items())
            if rebuild:
                if listing:
                    self.rebuilds += 1
                    log.info("event=key_index_rebuild partition=%s reason=%s files=%d", directory,
                             "missing_or_unreadable" if part is None else "log_files_changed", len(listing))
                part = _Partition()
            new = sorted(listing.keys() - part.files.keys())
            grown = sorted(n for n, covered in part.files.items() if is_segment(n) and listing[n] > covered)
            try:
                read = self._read(directory, new, grown, part.files)
            except FileNotFoundError:  # compacted meanwhile: list again
                if attempt == SCAN_ATTEMPTS - 1:
                    raise
                continue
            for table, _ in read.values():
                part.merge(table)
            part.files.update((n, listing[n]) for n in new if not is_segment(n))
            part.files.update((n, end) for n, (_, end) in read.items() if end is not None)
            part.unsaved += len(new) + sum(1 for n in grown if read[n][0].num_rows)
            if part.unsaved and (rebuild or part.unsaved >= PERSIST_AFTER_FILES):
                self._save(directory, part)
            self._cache[(tenant, day)] = part
            return part
        raise AssertionError("unreachable")

    @store_io("read")
    def _read(self, directory: str, new: list[str], grown: list[str], covered: dict[str, int]
              ) -> dict[str, tuple[pa.Table, int | None]]:
        """The identity columns of the `new` files and of what the `grown` segments gained, by name,
        with the offset each segment was read up to (None for other files: read whole, in one scan)."""
        out: dict[str, tuple[pa.Table, int | None]] = {}
        files = [n for n in new if not is_segment(n)]
        if files:
            out[files[0]] = (read_files(self.store.fs, [f"{directory}/{n}" for n in files], columns=_COLUMNS,
                                        empty=LOG_BATCH_SCHEMA.empty_table().select(_COLUMNS)), None)
        for name in [n for n in new if is_segment(n)] + grown:
            batches, end = read_segment(f"{directory}/{name}", covered.get(name, 0), fs=self.store.fs)
            out[name] = (pa.Table.from_batches(batches, LOG_BATCH_SCHEMA).select(_COLUMNS), end)
        return out

    @store_io("read")
    def _list(self, directory: str) -> dict[str, int]:
        """The partition's log files (name -> size), listed afresh (no cached listing)."""
        fs = self.store.fs
        fs.invalidate_cache(directory)
        try:
            entries = fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if (name.startswith(("part-", "compact-")) and name.endswith((".parquet", LOG_PART_SUFFIX))
                    or is_segment(name)):
                out[name] = int(e["size"])
        return out

    def _load(self, directory: str) -> _Partition | None:
        """The persisted index, or None when it is missing or damaged (then it is rebuilt). The store failing its
        read raises (`StoreIOError`): a rebuild would re-read the partition's whole log from that failing store."""
        try:
            with store_io("read"):
                data = self.store.fs.cat_file(f"{directory}/{INDEX_FILE}")
        except FileNotFoundError:
            return None
        try:
            return _decoded(data)
        except Exception as exc:  # bytes the store returned that decode to no index: damaged, rebuilt, never trusted
            log.warning("event=key_index_unreadable partition=%s error=%r", directory, exc)
            return None

    def _save(self, directory: str, part: _Partition) -> None:
        ids = list(part.digests)
        table = pa.table([pa.array([i[0] for i in ids], pa.string()), pa.array([i[1] for i in ids], pa.int64()),
                          pa.array([i[2] for i in ids], pa.int64()), pa.array([i[3] for i in ids], pa.string()),
                          pa.array(list(part.digests.values()), pa.binary(16))], schema=_INDEX_SCHEMA)
        table = table.replace_schema_metadata({"files": json.dumps(part.files), "rows": str(table.num_rows)})
        buf = io.BytesIO()
        pq.write_table(table, buf, write_page_checksum=True)
        replace_file(self.store.fs, f"{directory}/{INDEX_FILE}", buf.getvalue())
        part.unsaved = 0

    def _evict(self, keep: set[tuple[str, str]]) -> None:
        rows = sum(len(p.digests) for p in self._cache.values())
        for key in list(self._cache):
            if rows <= self.max_rows:
                break
            if key not in keep:
                rows -= len(self._cache.pop(key).digests)


