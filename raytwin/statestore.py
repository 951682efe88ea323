"""Durable state of live twins: event log, snapshots, dead letters and registrations.

Layout under the store URL (a local directory or any fsspec URL such as ``s3://bucket/twins``)::

    log/tenant=T/date=YYYY-MM-DD/seg-<uuid>.arrows                accepted events (asset_id column), SI values: on
                                                                   local disk, a writer's appended segment
    log/tenant=T/date=YYYY-MM-DD/part-<uuid>.arrow                the same, one file per shard batch (object stores)
    log/tenant=T/date=YYYY-MM-DD/compact-<uuid>-<i>.parquet       the same events, merged by `compact`
    log/tenant=T/date=YYYY-MM-DD/_keys.parquet                    the partition's key index (`raytwin.keyindex`)
    snapshots/tenant=T/asset_id=A/snap-<event_us>-<revision>.parquet  one-row filter snapshots (`snapshot_stem`)
    dead_letters/tenant=T/date=YYYY-MM-DD/part-<uuid>.parquet     rejects: raw JSON + reason
    twins/tenant=T/asset_id=A.json                                 twin registrations
    deleted/tenant=T/asset_id=A.json                               when a twin was deleted: its history ends (`save_deletion`)
    logged/tenant=T/asset_id=A                                     the asset has rows in the log (empty; `append_log`)
    logged/tenant=T/_complete                                      all logged assets are marked (`mark_logged_assets`)
    dead_letter_sources/tenant=T/source=S/date=YYYY-MM-DD          source S (a connector) has dead letters of that day
                                                                   (empty; `write_dead_letters`)
    dead_letter_sources/tenant=T/_complete                         every day's sources are marked (a tenant's
                                                                   first dead letters, `mark_dead_letter_sources`)
    drift_clears/tenant=T/asset_id=A.json                          the twin's drift clears (`save_drift_clear`)
    model_swaps/tenant=T/asset_id=A.json                           the twin's model swaps (`save_model_swaps`)
    shadows/tenant=T/candidate=REF/asset_id=A.json                 a running shadow evaluation on the twin (`save_shadow`)
    retention/tenant=T.json                                        where `prune` cut the tenant's history
    lease.json                                                     the service whose shards may write (`Lease`)

Why: logging each ingested shard batch and day as one unit (not per event, not per asset) makes a
write atomic for readers (a segment's message, or an object, is there whole or not at all), makes a
re-delivered batch harmless, because readers keep one row per event identity, and keeps the write
cost of a batch flat however many assets it touches (a file per asset per batch made the log the
bottleneck of small, frequent batches). On local disk a shard appends its batches to an open
segment per day (`raytwin.logsegments`: one `write` a batch, where creating and renaming a file
per batch cost up to a quarter of a small call); an object store cannot append, so there each
batch is an object. Readers prune by tenant and date with Hive-style directories and by asset with
a filter on the `asset_id` column. Snapshot file names carry their event time so the latest
snapshot before a time is found from a listing, without reading files.

An event's identity is its asset and `EventKey` (event time, sequence, idempotency key): a device
that reboots re-uses idempotency keys with new times, and those are other events. Readers and
`compact` keep one row per identity, the first ingested (least `ingest_time`, then a total order on
content: `one_row_per_event`), so the result never depends on the order files are listed in and
matches what the live twin applied (it dead-letters a re-delivery with other content as a conflict).

`prune` deletes a tenant's history before a date, but never what a registered twin's recovery
needs (its newest snapshot and the log after it), and records the cut first, so a read that would
replay across it raises `HistoryPruned` instead of silently skipping events.

Logs in segments or small part files are slow to read (no statistics, many files): `compact` merges
a partition's part files and closed segments into `compact-*` Parquet files of up to `COMPACT_ROWS`
rows, sorted by asset and time, written before the files they replace are deleted. Readers that find
a file gone re-list (`_scan`), so compaction can run while shards write and read; it leaves a segment
alone while its writer may append to it; a compactor that dies midway leaves duplicates, which
readers drop anyway.

A new twin's recovery (no snapshot) must find its asset's rows wherever they are, yet an asset id
never logged (the common case: a twin just created) has none. `append_log` marks each asset it logs
(an empty file, durable before the asset's first row) and `read_events_many` reads no log for an
asset without a marker. Why: the rows of an id can be there at its creation (a twin deleted before
deletions were recorded, or whose deletion was cut short, resumes its history), so only the whole
log told, read for every new twin: with a year of one tenant's history (1,095 files) registering a
twin took 0.3-0.7 s on local disk and 5,477 GETs on S3; now 2-17 ms and none. Markers say "no rows"
only once the tenant's log is marked whole (`_complete`, `WholeMarker`): a log written before markers is read once
for its asset ids (`mark_logged_assets`, on a shard's registration of a twin); until then the whole
log is read as before.

A connector's dead letters are found by their reasons (led by ``scheme://NAME/``, `DEAD_LETTER_SOURCE`), and one
with fewer than a page had the times of every day of its tenant's history read (a year: 365 days, 0.3 s on local
disk). `write_dead_letters` marks each source of the rows it writes for their day (an empty file, durable before the
rows, written once per source and day by a process), and a read of one source's dead letters reads only its marked
days, once the tenant's days are marked whole (`_complete`): a tenant's first dead letters mark them whole where it
has none (`write_dead_letters`); dead letters written before markers are read once for their sources
(`mark_dead_letter_sources`, first at a connector's start, even one that fails); until then every day is read as
before. Only connector processes write a source's dead letters, and a starting backend restarts those of a version that
writes other markers (`connectors.runtime.MARKERS`) before it starts any; a rollback to a version without the markers,
then an upgrade again, is not covered (connectors/README.md, "writers of an older version").

Readers take every kind of log file (`read_files`): segments, Arrow IPC part files (`LOG_PART_SUFFIX`,
what local stores held before segments, and object stores hold) and Parquet part files of earlier
versions."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from raytwin import renewal_watch
from raytwin.damage import report_damaged
from raytwin.logsegments import SegmentWriter, held_segment, is_segment, read_segment
from raytwin.storage import cat_existing, filesystem, replace_file, write_markers
from raytwin.store_failures import store_io

log = logging.getLogger("raytwin.store")
_T = TypeVar("_T")
SCAN_ATTEMPTS = 3
COMPACT_ROWS = 1_000_000
"""Most rows per compacted file: ~30 MB of log rows (merged from 500 part files in 2.8 s here),
so a day at 10k events/s is ~860 files."""
COMPACT_ROW_GROUP = 65_536
"""Rows per row group of a compacted file: its rows are sorted by asset, so a read of one asset
skips the row groups whose `asset_id` statistics exclude it."""


@dataclass(frozen=True)
class _Compacted:
    """A kind of partition `compact` merges: the row order of merged files, and whether it keeps
    one row per event identity (`one_row_per_event`: log rows of a re-delivered batch)."""

    kind: str
    order: list[tuple[str, str]]
    unique_events: bool


COMPACTED = (
    _Compacted("log", [(c, "ascending") for c in ("asset_id", "event_time", "sequence", "idempotency_key")], True),
    _Compacted("dead_letters", [("dead_lettered_at", "ascending"), ("asset_id", "ascending")], False),
)

_DICTIONARY_COLUMNS = {"asset_id": "asset_id", "quality": "quality", "values": "values.key_value.key",
                       "reason": "reason"}
"""Columns whose values repeat (of `values`, the measurement names), by Parquet column path: only
these are dictionary-encoded. Parquet's default also tries it on unique keys and float values,
which made a 100-event log file 0.90 ms to write instead of 0.52 ms, on the live path of every
shard batch."""

ALL_MARKED = "_complete"
"""The marker that every item of a tenant's marker set has its marker (`WholeMarker`): every asset with rows in the
tenant's log (`StateStore.mark_logged_assets`), every day's dead-letter sources, every command's index markers
(`connectors.commands.CommandLedger`)."""


class WholeMarker:
    """Whether a tenant's marker set is whole (its `ALL_MARKED` in the tenant's folder, ``folder(tenant)``): what makes
    the absence of an item's marker mean "no such item". Items written before their markers get theirs once
    (`complete`); a writer's first write of a tenant with nothing to mark may mark it whole (`mark`). A tenant found
    whole stays so, and is remembered (no read again)."""

    def __init__(self, fs: Any, folder: Callable[[str], str]):
        self.fs, self.folder = fs, folder
        self._whole: set[str] = set()

    def known(self, tenant: str) -> bool:
        """Whether `tenant` is known whole, without a read."""
        return tenant in self._whole

    def holds(self, tenant: str) -> bool:
        """Whether `tenant` is whole: known, else its marker read (and remembered where there)."""
        if tenant not in self._whole and self.fs.exists(f"{self.folder(tenant)}/{ALL_MARKED}"):
            self._whole.add(tenant)
        return tenant in self._whole

    def mark(self, tenant: str) -> None:
        """Mark `tenant` whole: its items' markers are durable, or it has no item."""
        write_markers(self.fs, self.folder(tenant), [ALL_MARKED])
        self._whole.add(tenant)

    def complete(self, tenant: str, backfill: Callable[[], None]) -> None:
        """Unless `tenant` is whole: `backfill` (write the markers of its items written before markers), then mark it
        whole, once theirs are durable."""
        if not self.holds(tenant):
            backfill()
            self.mark(tenant)


DEAD_LETTER_SOURCE = re.compile(r"^[a-z][a-z0-9+.-]*://([^/]+)/")
"""What leads the reason of a connector's dead letter: a URI scheme, then ``://NAME/`` (`connectors.mapping.led`);
NAME is its source, marked for the day of the dead letter (module docstring)."""

_DEAD_LETTERED: set[tuple[str, str]] = set()
"""The (store root, tenant) pairs whose dead letters this process has written (`StateStore._first_dead_letters`): per
process, not per store, as ingestion and a connector's sink open a store for each write (`ShardRouter.store`)."""

_SOURCES_MARKED: dict[tuple[str, str, str], set[str]] = {}
"""Per (store root, tenant, day), the dead letters' sources this process has marked (`StateStore._mark_sources`), per
process for the same reason as `_DEAD_LETTERED`: a store of its own would write them again on every write."""

LOG_PART_SUFFIX = ".arrow"
"""The file type of the log's part files (one per shard batch on object stores): Arrow IPC."""


def files_dataset(fs: Any, paths: list[str], partition_base_dir: str | None = None) -> ds.Dataset | None:
    """One dataset over store files of either format, by suffix: Parquet (``.parquet``) and Arrow
    IPC (`LOG_PART_SUFFIX`); Hive partitions from the paths below `partition_base_dir` when given.
    None when there is no such file."""
    formats = (("parquet", [p for p in paths if p.endswith(".parquet")]),
               ("ipc", [p for p in paths if p.endswith(LOG_PART_SUFFIX)]))
    parts = [ds.dataset(files, filesystem=fs, format=fmt, partition_base_dir=partition_base_dir,
                        partitioning="hive" if partition_base_dir else None)
             for fmt, files in formats if files]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else ds.dataset(parts)


def read_files(fs: Any, paths: list[str], partition_base_dir: str | None = None, *, empty: pa.Table,
               filter: ds.Expression | None = None, columns: list[str] | None = None) -> pa.Table:
    """The rows of store files of any kind (`files_dataset`'s, and log segments up to their last
    complete message: `raytwin.logsegments`), filtered and projected; `empty` when there are none.
    Hive partition columns from the paths below `partition_base_dir`, as text for segments."""
    segments = [p for p in paths if is_segment(p.rsplit("/", 1)[-1])]
    dataset = files_dataset(fs, [p for p in paths if not is_segment(p.rsplit("/", 1)[-1])], partition_base_dir)
    tables = [dataset.to_table(filter=filter, columns=columns)] if dataset is not None else []
    if segments:
        names = list(_partitions(segments[0], partition_base_dir))
        schema = pa.schema([*LOG_BATCH_SCHEMA, *(pa.field(n, pa.string()) for n in names)])
        tables.append(ds.Scanner.from_batches(_segment_batches(fs, segments, partition_base_dir), schema=schema,
                                              filter=filter, columns=columns).to_table())
    if not tables:
        return empty
    return pa.concat_tables([tables[0], *(t.cast(tables[0].schema) for t in tables[1:])])


_SCAN_ROWS = 65_536
"""Log rows per batch a segment is scanned in (it holds one small message per shard call)."""


def _segment_batches(fs: Any, paths: list[str], base: str | None) -> Iterator[pa.RecordBatch]:
    for path in paths:
        parts = _partitions(path, base)
        batches, _ = read_segment(path, fs=fs)
        pending, rows = [], 0
        for batch in [*batches, None]:
            if batch is not None:
                pending.append(batch)
                rows += batch.num_rows
            if pending and (batch is None or rows >= _SCAN_ROWS):
                merged = pa.concat_batches(pending)
                yield pa.RecordBatch.from_arrays(
                    [*merged.columns, *(pa.repeat(pa.scalar(v), merged.num_rows) for v in parts.values())],
                    names=[*merged.schema.names, *parts])
                pending, rows = [], 0


_READAHEAD = 2
"""Files, and batches of a file, a streamed scan reads ahead (`_batches`): Arrow's defaults (4 and 16 of up
to 131,072 rows) would hold far more than the page a read of dead letters keeps."""


def _batches(fs: Any, paths: list[str], base: str, **scan: Any) -> Iterator[pa.RecordBatch]:
    """The record batches of the Parquet and Arrow IPC files `paths` (`files_dataset`'s), streamed; `scan`: a
    scanner's filter and columns."""
    dataset = files_dataset(fs, paths, base)
    return iter(()) if dataset is None else dataset.to_batches(**scan, batch_readahead=_READAHEAD,
                                                               fragment_readahead=_READAHEAD)


def _largest(batches: Iterable[pa.RecordBatch], n: int) -> np.ndarray:
    """The `n` largest values of the first column of `batches` (as int64, ascending), kept as they stream: memory
    for about 2n and a batch, not for all of them."""
    kept = np.empty(0, np.int64)
    for batch in batches:
        kept = np.concatenate([kept, batch.column(0).cast(pa.int64()).to_numpy()])
        if len(kept) > 2 * n:
            kept = np.partition(kept, len(kept) - n)[len(kept) - n:]
    return np.sort(kept)[max(0, len(kept) - n):]


def _partitions(path: str, base: str | None) -> dict[str, str]:
    """The Hive partition values (``name=value`` directories) of `path` below `base`."""
    if base is None:
        return {}
    dirs = path[len(base):].strip("/").split("/")[:-1]
    return dict(d.split("=", 1) for d in dirs if "=" in d)


EventKey = tuple[int, int, str]
"""The total order of events: (event time in microseconds since the epoch, sequence, idempotency key)."""

TIME = pa.timestamp("us", tz="UTC")
LOG_SCHEMA = pa.schema([
    ("event_time", TIME),
    ("sequence", pa.int64()),
    ("idempotency_key", pa.string()),
    ("quality", pa.string()),
    ("values", pa.map_(pa.string(), pa.float64())),
    ("ingest_time", TIME),
])
LOG_BATCH_SCHEMA = pa.schema([("asset_id", pa.string()), *LOG_SCHEMA])
"""What `append_log` takes: log rows of several assets."""
_DAY_US = 86_400_000_000

SNAPSHOT_SCHEMA = pa.schema([
    ("event_time", TIME),
    ("sequence", pa.int64()),
    ("idempotency_key", pa.string()),
    ("revision", pa.int64()),
    ("payload", pa.string()),
])
DEAD_LETTER_SCHEMA = pa.schema([
    ("asset_id", pa.string()),
    ("idempotency_key", pa.string()),
    ("reason", pa.string()),
    ("raw", pa.string()),
    ("dead_lettered_at", TIME),
])
DEAD_LETTER_COLUMNS = pa.schema([*DEAD_LETTER_SCHEMA, ("tenant", pa.string()), ("date", pa.string())])
"""A dead letter as read back: with its tenant and UTC day (``YYYY-MM-DD``), from its partition."""


def to_micros(ts: datetime) -> int:
    """Exact integer microseconds since the epoch of an aware datetime."""
    delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def column_micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A `TIME` column without nulls (a validated batch's, a log batch's) as int64 epoch microseconds: the
    NumPy view of its values, the numbers an Arrow cast to int64 gives at a quarter of its cost (a live
    shard call read four such columns)."""
    if column.null_count:
        raise ValueError("column_micros takes a timestamp column without nulls; fill or drop them first")
    return column.to_numpy().view(np.int64)


def from_micros(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


def _midnight_us(day: date) -> int:
    return to_micros(datetime(day.year, day.month, day.day, tzinfo=UTC))


def _date(us: int) -> str:
    """The UTC date partition of a time."""
    return from_micros(us).date().isoformat()


@dataclass(frozen=True)
class LoggedEvent:
    """An accepted event as stored in the log: its order key, quality and SI values."""

    key: EventKey
    quality: str
    values: dict[str, float]
    ingest_us: int

    @property
    def time_s(self) -> float:
        return self.key[0] / 1e6


def _sources_of(reasons: Iterable[str | None]) -> set[str]:
    """The sources that lead `reasons` (`DEAD_LETTER_SOURCE`; a reason of no connector has none)."""
    return {m.group(1) for r in reasons if r and (m := DEAD_LETTER_SOURCE.match(r))}


def log_table(events: Iterable[tuple[str, LoggedEvent]]) -> pa.Table:
    """(asset_id, event) pairs as `LOG_BATCH_SCHEMA` rows (the inverse of `StateStore.read_events`)."""
    events = list(events)
    return pa.table({
        "asset_id": [a for a, _ in events],
        "event_time": pa.array([e.key[0] for _, e in events], pa.int64()).cast(TIME),
        "sequence": pa.array([e.key[1] for _, e in events], pa.int64()),
        "idempotency_key": [e.key[2] for _, e in events],
        "quality": [e.quality for _, e in events],
        "values": pa.array([list(e.values.items()) for _, e in events], LOG_SCHEMA.field("values").type),
        "ingest_time": pa.array([e.ingest_us for _, e in events], pa.int64()).cast(TIME),
    }, schema=LOG_BATCH_SCHEMA)


class StoreFenced(RuntimeError):
    """A writer's lease on the store is stale: another service took the store over (see `Lease`)."""


class FenceCheck(Protocol):
    """The Serve backend's `check_writable`: raises `StoreFenced` once another service took the store over. Its
    verdict may be up to a second old; `fresh` reads the store's lease now, for a write that decides for good what a
    successor may have decided within that second."""

    def __call__(self, fresh: bool = False) -> None: ...


def fenced(check: FenceCheck | None, unknown: bool = False, fresh: bool = False) -> bool:
    """Whether `check` (the Serve backend's `check_writable`; None: no fence) finds the store taken over by
    another service (`StoreFenced`), for the backend's own acts (a job's end, a recalibration's), which the successor
    takes on; `unknown` while the fence is not known (the lease unread: the store fails). False by default: the write
    that follows meets the store. True for a write that would replace the successor's (`ChangeLog.checkpoint`),
    which waits for a read instead. `fresh`: from a read of the lease made now (`check` a `FenceCheck`)."""
    try:
        if check is not None:
            check(fresh=True) if fresh else check()
    except StoreFenced:
        return True
    except Exception:  # noqa: BLE001 - not known to be fenced
        return unknown
    return False


@dataclass(frozen=True)
class Lease:
    """Which service may write the store (`lease.json`): the holder's shard actors write with
    (owner, epoch) and every write checks it (`StateStore.check_lease`), so a stale shard, or one
    of a second service on the store, is refused instead of writing snapshots that skip the other's
    events. `actors.service.TwinService` acquires it (epoch + 1), attaches to it (same shard count
    and namespace), or takes it over; `released` once the holder closed."""

    owner: str
    epoch: int
    shards: int
    namespace: str
    acquired_at: str  # ISO time
    acquired_by: str  # host:pid
    released: bool = False
    cluster: str = ""  # the Ray session whose shards write with it ("": a lease written before it was recorded)

    @property
    def fence(self) -> tuple[str, int]:
        return self.owner, self.epoch


@dataclass(frozen=True)
class Heartbeat:
    """The lease holder's shards saying they are alive (`lease-heartbeat.json`, renewed every few
    seconds): how a service in another Ray cluster tells a live holder, which it must not fence, from
    one that crashed, whose lease it may take (`actors.lease.acquire_lease`)."""

    owner: str
    epoch: int
    cluster: str
    at_s: float  # Unix time of the renewal

    def renews(self, lease: Lease) -> bool:
        return (self.owner, self.epoch, self.cluster) == (lease.owner, lease.epoch, lease.cluster)


LEASE_HEARTBEAT_S = 2.0
"""How often a lease holder's shards renew its heartbeat (`actors.lease.renew_heartbeat`)."""
LEASE_EXPIRY_S = 6.0
"""A lease holder whose heartbeat was not renewed for this long is gone (crashed, or its cluster stopped); why
this long: `actors.lease.EXPIRY_S`."""


class HistoryPruned(LookupError):
    """A read needs events from before the point where `StateStore.prune` cut the history."""


@dataclass(frozen=True)
class Pruning:
    """What `StateStore.prune` did: history before `history_from` (UTC midnight) is gone."""

    tenant: str
    history_from: date | None  # None: nothing could be pruned
    held_back_by: list[str]  # twins whose newest snapshot (or lack of one) kept the cut earlier than asked
    partitions_deleted: int
    snapshots_deleted: int


@dataclass(frozen=True)
class Compaction:
    """What `StateStore.compact` did to one partition (path relative to the store)."""

    partition: str
    files_in: int
    files_out: int
    rows_in: int
    rows_out: int  # rows_in less the duplicate log rows of a re-delivered batch


_IDENTITY = ("asset_id", "event_time", "sequence", "idempotency_key")
"""An event's identity in the log: its asset and its `EventKey`."""


def _content_order(row: dict[str, Any]) -> str:
    """A total order on a logged row's content (quality, values), to break ties in ingest time."""
    return json.dumps([row["quality"], sorted(row["values"])])


def one_row_per_event(table: pa.Table, floors: dict[str, int] | None = None) -> pa.Table:
    """The log rows (`LOG_BATCH_SCHEMA`) with one row per event identity (asset, event time,
    sequence, idempotency key): the first ingested (least `ingest_time`, then least content), so
    the row kept never depends on the order of the files read. Returned sorted by identity.

    Rows of one identity are a re-delivered batch logged twice (same content) or, rarely, a
    conflicting re-delivery that a shard logged before it crashed: the live twin applied the
    first ingested one, so recovery and compaction keep it. `floors` (`StateStore.history_floors`):
    rows of a deleted twin's history and rows of the twin registered again under its id are other
    events even where their identities match (the same file ingested again after a re-creation),
    so one of each is kept."""
    identity = list(_IDENTITY)
    if floors:
        table = table.append_column("_current", pa.array(_after_floors(table, floors)))
        identity.append("_current")
    table = table.sort_by([(c, "ascending") for c in (*identity, "ingest_time")])
    if table.num_rows < 2:
        return table.drop_columns(["_current"]) if floors else table
    cols = [table.column(c) for c in (*identity, "ingest_time")]
    same = [pc.equal(c.slice(1), c.slice(0, table.num_rows - 1)).to_numpy() for c in cols]
    if floors:
        table = table.drop_columns(["_current"])
        same = [np.logical_and(same[0], same[-2]), *same[1:-2], same[-1]]  # the identity includes the incarnation
    repeat = np.concatenate([[False], np.logical_and.reduce(same[:4])])
    if not repeat.any():
        return table
    keep = ~repeat
    tied = np.flatnonzero(repeat[1:] & same[4] & keep[:-1])  # first rows of a repeat tied on ingest time
    for start in tied.tolist():  # rare: resolve by content, in Python
        end = start + 1
        while end < table.num_rows and repeat[end] and same[4][end - 1]:
            end += 1
        rows = table.slice(start, end - start).to_pylist()
        best = min(range(len(rows)), key=lambda j: _content_order(rows[j]))
        keep[start], keep[start + best] = False, True
    return table.filter(pa.array(keep))


def _after_floors(table: pa.Table, floors: dict[str, int]) -> np.ndarray:
    """Whether each log row was ingested after its asset's floor (its twin's last deletion): rows of
    assets never deleted are all after."""
    ids = table.column("asset_id").combine_chunks().dictionary_encode()
    floor = np.array([floors.get(a, np.iinfo(np.int64).min) for a in ids.dictionary.to_pylist()], dtype=np.int64)
    return table.column("ingest_time").cast(pa.int64()).to_numpy() > floor[ids.indices.to_numpy()]


def current_rows(table: pa.Table, floors: dict[str, int] | None) -> pa.Table:
    """The log rows that belong to the twins registered now: none of a deleted twin's history."""
    return table.filter(pa.array(_after_floors(table, floors))) if floors else table


_BEFORE_1970 = "."
"""Marks a negative snapshot time in a file name: it sorts before the digits of non-negative ones."""


DEAD_LETTER_RETRY_WINDOW = timedelta(hours=1)
"""How long after UTC midnight a retried write looks for its first try's dead letters in yesterday's partition
(Ray retries a shard's call within seconds to a minute of its crash)."""


def dead_letter_stem(rejects: list[dict[str, str]], batch_id: bytes) -> str:
    """A dead-letter file name given by its content and its batch (`batch_id`: what tells a Ray retry of the
    same call from a producer's re-delivery, e.g. the batch's ingest times). Why: a shard writes a batch's
    dead letters before it logs the batch, and Ray retries a call its crash cut short; the retry refuses the
    same events again and replaces that file instead of adding a second copy of each dead letter."""
    digest = hashlib.sha256(batch_id)
    for r in rejects:
        digest.update(json.dumps([r.get("asset_id"), r.get("idempotency_key"), r["reason"], r["raw"]]).encode())
    return f"part-{digest.hexdigest()[:32]}"


def snapshot_stem(us: int, revision: int) -> str:
    """A snapshot's file name (without `.parquet`): names sort as strings by time, then revision,
    for times before 1970 too (written as `.` + 10^19 + t, which keeps 20 characters)."""
    t = f"{us:020d}" if us >= 0 else f"{_BEFORE_1970}{10**19 + us:019d}"
    return f"snap-{t}-{revision:012d}"


def parse_snapshot_name(name: str) -> tuple[int, int]:
    """(event time in us, revision) of a snapshot file name; also reads the `snap--<|t|>-...`
    names that pre-1970 snapshots got before they had their own encoding."""
    t, revision = name.removeprefix("snap-").removesuffix(".parquet").rsplit("-", 1)
    us = int(t[1:]) - 10**19 if t.startswith(_BEFORE_1970) else int(t)
    return us, int(revision)


@dataclass(frozen=True)
class Snapshot:
    """A twin's state after every event up to and including `key` (payload is the filter's JSON)."""

    key: EventKey
    revision: int
    payload: dict[str, Any]


class StateStore:
    """Reads and writes the layout above; safe to share between processes (files are immutable)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.storage_options = storage_options
        self.fs, self.root = filesystem(url, storage_options)
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self._segments = SegmentWriter(LOG_BATCH_SCHEMA) if self._local else None  # the log's open segments
        self._marked: dict[str, set[str]] = {}  # per tenant, the assets known to have their logged marker
        self._logged_whole = WholeMarker(self.fs, self._markers)  # every logged asset has its marker
        self._sources_whole = WholeMarker(self.fs, self._sources)  # every day's dead-letter sources are marked

    # ------------------------------------------------------------------------ plumbing ----
    def _write(self, table: pa.Table, directory: str, stem: str, row_group_size: int | None = None) -> None:
        path = f"{directory}/{stem}.parquet"
        options = {"row_group_size": row_group_size,
                   "use_dictionary": [path for c, path in _DICTIONARY_COLUMNS.items() if c in table.column_names]}
        if not self._local:  # an object-store PUT is atomic already
            self.fs.makedirs(directory, exist_ok=True)
            pq.write_table(table, path, filesystem=self.fs, **options)
            return
        # local disk: Arrow's own file writer and the OS rename, not fsspec's Python file objects
        # (~0.1 ms of every file; a shard writes snapshots and dead letters this way)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{directory}/.{stem}.tmp"
        pq.write_table(table, tmp, **options)
        os.replace(tmp, path)

    def _write_part(self, table: pa.Table, directory: str, stem: str) -> None:
        """A log part file (Arrow IPC) on an object store, which cannot append (a PUT is atomic)."""
        self.fs.makedirs(directory, exist_ok=True)
        with self.fs.open(f"{directory}/{stem}{LOG_PART_SUFFIX}", "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    def _files(self, directory: str) -> list[str] | None:
        """The files under `directory` (hidden ones, ``.`` or ``_``, left out), or None without it."""
        if not self.fs.exists(directory):
            return None
        return [p for p in self.fs.find(directory)
                if not any(n.startswith((".", "_")) for n in p[len(directory):].split("/"))]

    def _relisting(self, directories: list[str], read: Callable[[list[str]], _T]) -> _T:
        """`read` of the files under `directories`, listed again if a file vanished meanwhile (a compaction
        deleted it after writing the same rows elsewhere)."""
        for attempt in range(SCAN_ATTEMPTS):
            if attempt:
                for directory in directories:
                    self.fs.invalidate_cache(directory)
            try:
                return read([p for d in directories for p in self._files(d) or []])
            except FileNotFoundError:
                if attempt == SCAN_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _scan(self, directory: str, *, empty: pa.Table, filter: ds.Expression | None = None,
              columns: list[str] | None = None, days_from: str | None = None) -> pa.Table:
        """The rows under `directory` (`read_files`, Hive partition columns below it; `_relisting`).
        `days_from`: only its ``date=`` partitions of that day and later are listed and read (a replay from a
        recent snapshot listed the tenant's whole history: a year of it, 1,095 files, 15 ms on local disk; now 2 ms)."""
        directories = [directory] if days_from is None else [
            d for d in self._subdirs(directory, "date=") if d.rsplit("=", 1)[-1] >= days_from]
        return self._relisting(directories, lambda files: read_files(self.fs, files, directory, filter=filter,
                                                                     columns=columns, empty=empty))

    def _subdirs(self, directory: str, prefix: str) -> list[str]:
        """The directories ``PREFIX...`` right under `directory`, sorted, listed afresh (an object store's
        listing cache may predate a new partition); none without it."""
        try:
            found = self.fs.ls(directory, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/") for p in found if p.rstrip("/").rsplit("/", 1)[-1].startswith(prefix))

    def _asset_dir(self, kind: str, tenant: str, asset_id: str) -> str:
        return f"{self.root}/{kind}/tenant={tenant}/asset_id={asset_id}"

    # ----------------------------------------------------------------------- event log ----
    @store_io("write")
    def append_log(self, tenant: str, table: pa.Table, assets: Collection[str] | None = None) -> int:
        """Durably append accepted events (`LOG_BATCH_SCHEMA` rows of any assets): on local disk to
        this store's open segment of each day (`raytwin.logsegments`), elsewhere one file per day.
        `assets`: the distinct asset ids of `table`'s rows, where the caller has them (a shard does: finding
        them again in the column was ~4 % of a live shard call)."""
        if table.num_rows == 0:
            return 0
        self._mark_logged(tenant, pc.unique(table.column("asset_id")).to_pylist() if assets is None else assets)
        day = column_micros(table.column("event_time")) // _DAY_US
        name = None if self._segments is not None else f"part-{uuid.uuid4().hex}"  # one name for the batch's files
        days = np.unique(day).tolist()
        for d in days:
            rows = table if len(days) == 1 else table.filter(pa.array(day == d))  # a live batch: one day, no split
            directory = f"{self.root}/log/tenant={tenant}/date={_date(d * _DAY_US)}"
            if name is None:
                self._segments.append(directory, rows)
            else:
                self._write_part(rows.sort_by([("asset_id", "ascending"), ("event_time", "ascending")]), directory, name)
        return table.num_rows

    def _markers(self, tenant: str) -> str:
        return f"{self.root}/logged/tenant={tenant}"

    def _mark_logged(self, tenant: str, asset_ids: Collection[str]) -> None:
        """Mark the assets of rows about to be logged, before them (module docstring): their folder is listed once per
        tenant by this store, and a marker written once per asset, not on every batch."""
        marked = self._marked.get(tenant)
        if marked is None:
            try:
                listed = self.fs.ls(self._markers(tenant), detail=False, refresh=True)
            except FileNotFoundError:
                listed = []
            marked = self._marked[tenant] = {p.rstrip("/").rsplit("/", 1)[-1].removeprefix("asset_id=") for p in listed}
        if not marked.issuperset(asset_ids):  # the usual batch: every asset marked, no set built
            new = sorted(set(asset_ids) - marked)
            write_markers(self.fs, self._markers(tenant), [f"asset_id={a}" for a in new])
            marked.update(new)

    @store_io("write")
    def mark_logged_assets(self, tenant: str) -> None:
        """Mark every asset with rows in the tenant's log, then the log as marked whole (`ALL_MARKED`), unless it is
        already: from then on a new twin's recovery reads no log (module docstring). Only a log written before
        markers is read, once, for its asset ids (as every new twin's recovery read it before); rows logged
        meanwhile are marked by their writers."""
        def backfill() -> None:
            table = self._scan(f"{self.root}/log/tenant={tenant}", columns=["asset_id"],
                               empty=LOG_BATCH_SCHEMA.empty_table().select(["asset_id"]))
            write_markers(self.fs, self._markers(tenant),
                          [f"asset_id={a}" for a in pc.unique(table.column("asset_id")).to_pylist()])

        self._logged_whole.complete(tenant, backfill)

    def _unlogged(self, tenant: str, asset_ids: list[str]) -> set[str]:
        """Those of `asset_ids` with no row in the tenant's log, told by their markers alone (none while the log is
        not marked whole): one small read each, none of the log."""
        markers = self._markers(tenant)
        found = {p.rsplit("/", 1)[-1] for p in cat_existing(
            self.fs, [f"{markers}/{ALL_MARKED}", *(f"{markers}/asset_id={a}" for a in asset_ids)])}
        return set() if ALL_MARKED not in found else {a for a in asset_ids if f"asset_id={a}" not in found}

    @store_io("write")
    def close_segments(self) -> None:
        """Stop appending to this store's open log segments (the next batch starts new ones), so that
        a compaction can take them (`raytwin.logsegments`)."""
        if self._segments is not None:
            self._segments.close()

    @store_io("read")
    def read_events(
        self, tenant: str, asset_id: str, *, after: EventKey | None = None, until_us: int | None = None
    ) -> list[LoggedEvent]:
        """The asset's logged events with `after` < key and time <= `until_us`, one per identity
        (`one_row_per_event`: a re-delivered batch may be logged twice) and sorted by key."""
        return self.read_events_many(tenant, {asset_id: after}, until_us=until_us)[asset_id]

    @store_io("read")
    def read_events_many(
        self, tenant: str, after: dict[str, EventKey | None], *, until_us: int | None = None,
        floors: dict[str, int] | None = None,
    ) -> dict[str, list[LoggedEvent]]:
        """`read_events` for many assets of a tenant in one scan of the log (recovery of a shard), without
        the history of deleted twins before their `floors` (`history_floors`); not looked for, the assets read from
        their start that the log never held (their markers tell: module docstring)."""
        if not after:
            return {}
        cut, pruned = self._cut(tenant)
        for asset_id, start in after.items():
            if asset_id in pruned and (start is None or start[0] < cut):
                raise HistoryPruned(f"{asset_id!r} of tenant {tenant!r}: history before "
                                    f"{from_micros(cut).isoformat()} was pruned, and no snapshot after it "
                                    f"precedes the requested time")
        out: dict[str, list[LoggedEvent]] = {asset_id: [] for asset_id in after}
        if fresh := [asset_id for asset_id, start in after.items() if start is None]:
            unlogged = self._unlogged(tenant, fresh)  # (their events: none)
            after = {asset_id: start for asset_id, start in after.items() if asset_id not in unlogged}
            if not after:
                return out
        flt = ds.field("asset_id").isin(list(after))
        days_from = None
        if all(k is not None for k in after.values()):
            since = min(k[0] for k in after.values())
            days_from = _date(since)
            flt &= (ds.field("date") >= days_from) & (ds.field("event_time") >= pa.scalar(since, pa.int64()).cast(TIME))
        if until_us is not None:
            flt &= ds.field("event_time") <= pa.scalar(until_us, pa.int64()).cast(TIME)
        table = self._scan(f"{self.root}/log/tenant={tenant}", filter=flt, columns=LOG_BATCH_SCHEMA.names,
                           empty=LOG_BATCH_SCHEMA.empty_table(), days_from=days_from)
        out.update(self._events(one_row_per_event(current_rows(table, floors)), after))
        return out

    @staticmethod
    def _events(table: pa.Table, after: dict[str, EventKey | None]) -> dict[str, list[LoggedEvent]]:
        """Log rows (one per identity, sorted by identity) as each asset's events after its key."""
        out: dict[str, list[LoggedEvent]] = {a: [] for a in after}
        for asset_id, t, seq, key, quality, values, ingest in zip(
            table.column("asset_id").to_pylist(), table.column("event_time").cast(pa.int64()).to_pylist(),
            table.column("sequence").to_pylist(), table.column("idempotency_key").to_pylist(),
            table.column("quality").to_pylist(), table.column("values").to_pylist(),
            table.column("ingest_time").cast(pa.int64()).to_pylist(),
        ):
            start = after[asset_id]
            if start is None or (t, seq, key) > start:
                out[asset_id].append(LoggedEvent((t, seq, key), quality, dict(values), ingest))
        return out

    @store_io("read")
    def find_event(self, tenant: str, asset_id: str, key: EventKey) -> LoggedEvent | None:
        """The logged event with this identity (the one recovery replays), or None; reads only
        that day's partition."""
        return self.find_events(tenant, [(asset_id, key)]).get((asset_id, key))

    @store_io("read")
    def find_events(self, tenant: str, identities: Iterable[tuple[str, EventKey]], floors: dict[str, int] | None = None
                    ) -> dict[tuple[str, EventKey], LoggedEvent]:
        """`find_event` for many (asset, key) identities: one read of each day's partition they fall in
        (none of a deleted twin's history before its floor, `history_floors`)."""
        by_day: dict[str, set[tuple[str, EventKey]]] = {}
        for asset_id, key in identities:
            by_day.setdefault(_date(key[0]), set()).add((asset_id, key))
        found = {}
        for day, wanted in sorted(by_day.items()):
            assets = sorted({a for a, _ in wanted})
            flt = ds.field("asset_id").isin(assets) & ds.field("idempotency_key").isin(sorted({k[2] for _, k in wanted}))
            table = self._scan(f"{self.root}/log/tenant={tenant}/date={day}", filter=flt,
                               columns=LOG_BATCH_SCHEMA.names, empty=LOG_BATCH_SCHEMA.empty_table())
            for asset_id, events in self._events(one_row_per_event(current_rows(table, floors)),
                                                 dict.fromkeys(assets)).items():
                found.update(((asset_id, e.key), e) for e in events if (asset_id, e.key) in wanted)
        return found

    # ----------------------------------------------------------------------- snapshots ----
    @store_io("write")
    def write_snapshot(self, tenant: str, asset_id: str, snap: Snapshot) -> None:
        us, seq, key = snap.key
        table = pa.table({
            "event_time": pa.array([us], pa.int64()).cast(TIME),
            "sequence": [seq],
            "idempotency_key": [key],
            "revision": [snap.revision],
            "payload": [json.dumps(snap.payload)],
        }, schema=SNAPSHOT_SCHEMA)
        self._write(table, self._asset_dir("snapshots", tenant, asset_id), snapshot_stem(us, snap.revision))

    @store_io("read")
    def latest_snapshot(self, tenant: str, asset_id: str, at_or_before_us: int | None = None,
                        usable: Callable[[Snapshot], bool] | None = None) -> Snapshot | None:
        """The newest snapshot whose event time is <= `at_or_before_us` (any, if None) and, if given, that is
        `usable` (older ones are read until one is: rare, a damaged state)."""
        directory = self._asset_dir("snapshots", tenant, asset_id)
        if not self.fs.exists(directory):
            return None
        names = sorted((n for n in (p.rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False))
                        if n.startswith("snap-")), key=parse_snapshot_name)
        if at_or_before_us is not None:
            names = [n for n in names if parse_snapshot_name(n)[0] <= at_or_before_us]
        unreadable: list[tuple[str, Exception]] = []
        found = None
        for name in reversed(names):
            try:
                snap = self._read_snapshot(f"{directory}/{name}")
            except (OSError, pa.ArrowException, ValueError, KeyError, IndexError, TypeError) as exc:
                unreadable.append((name, exc))
                continue
            if usable is None or usable(snap):
                found = name, snap
                break
        for name, exc in unreadable:  # after the search: the line says what recovery starts from instead
            report_damaged("snapshot", f"{directory}/{name}", "unreadable",
                           "event=snapshot_unreadable tenant=%s asset_id=%s file=%s error=%r action=skipped "
                           "starts_from=%s (replaying the log after that; the file is left for inspection)", tenant, asset_id,
                           name, f"{type(exc).__name__}: {exc}", found[0] if found else "the_log_from_its_start")
        return found[1] if found else None

    def _read_snapshot(self, path: str) -> Snapshot:
        row = pq.read_table(path, filesystem=self.fs).to_pylist()[0]
        return Snapshot(key=(to_micros(row["event_time"]), row["sequence"], row["idempotency_key"]),
                        revision=row["revision"], payload=json.loads(row["payload"]))

    # -------------------------------------------------------------------- dead letters ----
    @store_io("write")
    def write_dead_letters(self, tenant: str, rejects: list[dict[str, str]], stem: str | None = None) -> None:
        """Store rejects (dicts with asset_id, idempotency_key, reason, raw JSON), one file per day, named
        `stem` (`dead_letter_stem`: the same rejects written again replace their file, keeping its time) or a random
        name."""
        if not rejects:
            return
        now = datetime.now(UTC)
        day, written = self._first_try(tenant, stem, now) if stem else (now.date(), now)
        table = pa.table({
            "asset_id": [r.get("asset_id") for r in rejects],
            "idempotency_key": [r.get("idempotency_key") for r in rejects],
            "reason": [r["reason"] for r in rejects],
            "raw": [r["raw"] for r in rejects],
            "dead_lettered_at": pa.array([written] * len(rejects), TIME),
        }, schema=DEAD_LETTER_SCHEMA)
        self._first_dead_letters(tenant)
        self._mark_sources(tenant, day.isoformat(), {r["reason"] for r in rejects})
        self._write(table, f"{self.root}/dead_letters/tenant={tenant}/date={day.isoformat()}",
                    stem or f"part-{uuid.uuid4().hex}")

    def _sources(self, tenant: str, source: str | None = None) -> str:
        return f"{self.root}/dead_letter_sources/tenant={tenant}" + (f"/source={source}" if source else "")

    def _mark_sources(self, tenant: str, day: str, reasons: Collection[str]) -> None:
        """Mark the sources of dead letters about to be written for `day`, before them (module docstring): once per
        source and day by this process (`_SOURCES_MARKED`)."""
        marked = _SOURCES_MARKED.setdefault((self.root, tenant, day), set())
        for source in sorted(_sources_of(reasons) - marked):
            write_markers(self.fs, self._sources(tenant, source), [f"date={day}"])
            marked.add(source)

    def _first_dead_letters(self, tenant: str) -> None:
        """Before this process's first dead letters of `tenant` (`_DEAD_LETTERED`): a tenant without a dead letter has
        its days marked whole (`ALL_MARKED`), so that a source's reads read its days alone from its first dead letter
        on, not every day until a connector of it starts, and that start reads none (it read every dead letter a
        tenant had from HTTP ingestion before its first connector). Written only where the listing finds no day, it
        never claims a day's sources marked where they are not: since markers, the sources of dead letters are marked
        before them, and the days written before are there to be listed (none is written any more); a crash before
        the rows leaves it true of none. A day found, of either kind, leaves the tenant to
        `mark_dead_letter_sources`."""
        first = (self.root, tenant) not in _DEAD_LETTERED
        if first and not self._sources_whole.known(tenant) and not self._dead_letter_days(tenant, None):
            self._sources_whole.mark(tenant)
        _DEAD_LETTERED.add((self.root, tenant))

    @store_io("write")
    def mark_dead_letter_sources(self, tenant: str) -> None:
        """Mark the source of every dead letter of the tenant for its day, then its days as marked whole
        (`ALL_MARKED`), unless they are already: from then on a read of one source's dead letters reads its days
        alone. Only dead letters written before markers are read, once, for their reasons (as a connector's page of
        few did every time before); those written meanwhile are marked by their writers."""
        def backfill() -> None:
            empty = DEAD_LETTER_SCHEMA.empty_table().select(["reason"])
            days: dict[str, list[str]] = {}  # per source
            for dirs in self._dead_letter_days(tenant, None):
                reasons = self._relisting(dirs, lambda files: read_files(
                    self.fs, files, f"{self.root}/dead_letters", empty=empty, columns=["reason"]))
                for source in _sources_of(pc.unique(reasons.column("reason")).to_pylist()):
                    days.setdefault(source, []).append(dirs[0].rsplit("=", 1)[-1])
            for source, found in days.items():  # a source's days at once (concurrent PUTs on an object store)
                write_markers(self.fs, self._sources(tenant, source), [f"date={day}" for day in found])

        self._sources_whole.complete(tenant, backfill)

    def _source_days(self, tenant: str, source: str) -> set[str] | None:
        """The days marked as holding dead letters of `source`; None while the tenant's days are not marked whole."""
        if not self._sources_whole.holds(tenant):
            return None
        try:
            listed = self.fs.ls(self._sources(tenant, source), detail=False, refresh=True)
        except FileNotFoundError:
            return set()
        return {p.rstrip("/").rsplit("=", 1)[-1] for p in listed}

    def _first_try(self, tenant: str, stem: str, now: datetime) -> tuple[date, datetime]:
        """The UTC day whose partition holds `stem`'s file and the time its dead letters were written: the first
        try's where a retry finds its file, else today and `now`. Why the day: a retry just after midnight would add
        a second copy of each dead letter in today's partition, beside the first try's in yesterday's. Why the time:
        it is a dead letter's place in a connector's listing (`serve_apps.dead_letters`), and a retry that moved its
        dead letters to the newest made a client paging through them miss those it had not read yet."""
        today = now.date()
        days = [today]
        if now - datetime(today.year, today.month, today.day, tzinfo=UTC) < DEAD_LETTER_RETRY_WINDOW:
            days.insert(0, today - timedelta(days=1))
        for day in days:
            path = f"{self.root}/dead_letters/tenant={tenant}/date={day.isoformat()}/{stem}.parquet"
            if self.fs.exists(path):
                written = pq.read_table(path, columns=["dead_lettered_at"], filesystem=self.fs).column(0)[0]
                return day, written.as_py()
        return today, now

    @store_io("read")
    def read_dead_letters(self, tenant: str | None = None) -> pa.Table:
        """All dead letters (with tenant and date columns), optionally of one tenant, oldest first: a tenant
        with a poison device may have millions (`newest_dead_letters` reads a page of them)."""
        flt = ds.field("tenant") == tenant if tenant is not None else None
        empty = DEAD_LETTER_SCHEMA.append(pa.field("tenant", pa.string())).empty_table()
        return self._scan(f"{self.root}/dead_letters", filter=flt, empty=empty).sort_by("dead_lettered_at")

    @store_io("read")
    def newest_dead_letters(self, tenant: str | None, limit: int | None, *, day: str | None = None,
                            where: ds.Expression | None = None, columns: list[str] | None = None,
                            since: datetime | None = None, until: datetime | None = None, source: str | None = None,
                            whole_times: bool = False) -> pa.Table:
        """The newest `limit` (None: all) dead letters of `tenant` (None: every tenant's) of one UTC ``YYYY-MM-DD``
        `day` (None: any) that match `where` and were written at or after `since` and before `until` (None: ever),
        oldest first, with `columns` (default: all, as `read_dead_letters`): the last rows of `read_dead_letters`,
        without reading them all. With `whole_times`, every row of the oldest time kept (more than `limit` where
        several share it), so that a page ordered by time and content can end inside that time (a connector's
        page, `serve_apps.dead_letters`). Only the day partitions that hold the page are read: first the times of
        the matching rows, newest day first (none after `until`'s), until `limit` are found (a partition's rows are
        of its day) or no older day may hold one written since `since`, then the rows from the `limit`-th newest time
        on, of the days that hold them alone, whose files and row groups alone are read (by their time statistics:
        `compact` sorts by time), so memory is bounded by the page and a row group, not by the millions of 4 KiB dead
        letters a poison device leaves. A page with fewer than `limit` rows still reads the times of every day from
        `since` on (without it, of the tenant's whole history), unless `where` selects one `source`'s dead letters alone
        (a connector's, by `DEAD_LETTER_SOURCE`) and `source` names it: then only the days marked with it are read, once
        the tenant's are marked whole (module docstring)."""
        days = self._dead_letter_days(tenant, day)
        if source is not None and tenant is not None and (marked := self._source_days(tenant, source)) is not None:
            days = [dirs for dirs in days if dirs[0].rsplit("=", 1)[-1] in marked]
        if since is not None:
            recent = ds.field("dead_lettered_at") >= pa.scalar(since, TIME)
            where = recent if where is None else recent & where
            # a retry just after midnight wrote into the day before with its own time (before `_first_try` kept the
            # first try's)
            first = (since - DEAD_LETTER_RETRY_WINDOW).date().isoformat()
            days = [dirs for dirs in days if dirs[0].rsplit("=", 1)[-1] >= first]
        if until is not None:  # a row's partition is its time's day or (that retry's) the day before
            older = ds.field("dead_lettered_at") < pa.scalar(until, TIME)
            where = older if where is None else older & where
            days = [dirs for dirs in days if dirs[0].rsplit("=", 1)[-1] <= until.date().isoformat()]
        if limit is not None:
            days, since_us = self._newest_times(days, limit, where)
            if since_us is not None:
                recent = ds.field("dead_lettered_at") >= pa.scalar(since_us, TIME)
                where = recent if where is None else recent & where
        wanted = columns or DEAD_LETTER_COLUMNS.names
        read = [*wanted, *(["dead_lettered_at"] if "dead_lettered_at" not in wanted else [])]
        empty = DEAD_LETTER_COLUMNS.empty_table().select(read)
        table = self._relisting([d for dirs in reversed(days) for d in dirs],  # oldest day first, as listed
                                lambda files: read_files(self.fs, files, f"{self.root}/dead_letters", empty=empty,
                                                         filter=where, columns=read)).sort_by("dead_lettered_at")
        if limit is not None and not whole_times:  # (more rows than `limit` where several share the oldest time kept)
            table = table.slice(max(0, table.num_rows - limit))
        return table.select(wanted)

    def _dead_letter_days(self, tenant: str | None, day: str | None) -> list[list[str]]:
        """The dead-letter partition directories of `tenant` (None: of every tenant, by tenant) and `day` (None:
        every day), a list a day, newest day first."""
        base = f"{self.root}/dead_letters"
        tenants = [f"{base}/tenant={tenant}"] if tenant is not None else self._subdirs(base, "tenant=")
        by_day: dict[str, list[str]] = {}
        for directory in tenants:
            for partition in self._subdirs(directory, "date="):
                if day is None or partition.endswith(f"/date={day}"):
                    by_day.setdefault(partition.rsplit("=", 1)[-1], []).append(partition)
        return [by_day[d] for d in sorted(by_day, reverse=True)]

    def _newest_times(self, days: list[list[str]], limit: int,
                      where: ds.Expression | None) -> tuple[list[list[str]], int | None]:
        """Of `days` (`_dead_letter_days`), those that hold the newest `limit` dead letters matching `where`,
        and the time of the oldest of these (none and None: none match): read a day at a time, times alone. Only the
        days that hold one are returned, so that their rows are not looked for again in the days between them (a
        connector with a few dead letters in a year of another's)."""
        found, oldest, held = 0, None, []
        for dirs in days:
            times = self._relisting(dirs, lambda files: _largest(
                _batches(self.fs, files, f"{self.root}/dead_letters", columns=["dead_lettered_at"], filter=where),
                limit - found))
            if len(times):  # every row of a day's partition is of that day: older days' are older
                found, oldest = found + len(times), int(times[0])
                held.append(dirs)
            if found == limit:
                break
        return held, oldest

    # ---------------------------------------------------------------------- compaction ----
    @store_io("write")
    def compact(self, *, tenant: str | None = None, min_files: int = 2) -> list[Compaction]:
        """Merge the files of every log and dead-letter partition (of `tenant`, or all) that has at
        least `min_files` part files or a closed log segment (one no writer may append to any more;
        this store's own are closed first); see the module docstring for why it is safe online."""
        self.close_segments()
        done = []
        for compacted in COMPACTED:
            pattern = f"{self.root}/{compacted.kind}/tenant={tenant or '*'}/date=*"
            for directory in sorted(self.fs.glob(pattern)):
                names = sorted(self.fs.ls(directory, detail=False))
                parts = [p for p in names if p.rsplit("/", 1)[-1].startswith("part-")]
                with ExitStack() as held:  # segments stay locked against their writers until deleted
                    closed = [p for p in names if is_segment(p.rsplit("/", 1)[-1])
                              and (not self._local or held.enter_context(held_segment(p)))]
                    if closed or len(parts) >= max(min_files, 1):
                        done.append(self._compact_partition(directory, parts + closed, compacted))
        return done

    def _compact_partition(self, directory: str, parts: list[str], compacted: _Compacted) -> Compaction:
        table = read_files(self.fs, parts, empty=LOG_BATCH_SCHEMA.empty_table())
        rows_in = table.num_rows
        if compacted.unique_events:
            tenant = directory.rsplit("/", 2)[-2].removeprefix("tenant=")
            table = one_row_per_event(table, self.history_floors(tenant))
        else:
            table = table.sort_by(compacted.order)
        stem = f"compact-{uuid.uuid4().hex}"
        starts = range(0, table.num_rows, COMPACT_ROWS)
        for i, start in enumerate(starts):
            self._write(table.slice(start, COMPACT_ROWS), directory, f"{stem}-{i:04d}", COMPACT_ROW_GROUP)
        self.fs.rm(parts)  # only once the merged rows are durable
        done = Compaction(directory.removeprefix(self.root + "/"), len(parts), len(starts), rows_in, table.num_rows)
        log.info("event=compacted partition=%s files_in=%d files_out=%d rows_in=%d rows_out=%d", done.partition,
                 done.files_in, done.files_out, done.rows_in, done.rows_out)
        return done

    # ----------------------------------------------------------------------- retention ----
    def _retention_path(self, tenant: str) -> str:
        return f"{self.root}/retention/tenant={tenant}.json"

    def _retention(self, tenant: str) -> dict[str, Any] | None:
        """Where `prune` cut the tenant's history and whose history it cut (None: never pruned)."""
        path = self._retention_path(tenant)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def _cut(self, tenant: str) -> tuple[int | None, set[str]]:
        """`_retention`'s cut (microseconds; None: never pruned) and the assets whose history it cut: any read of
        theirs starts at or after it (`read_events_many` raises `HistoryPruned` before it)."""
        retention = self._retention(tenant)
        return (retention["history_from_us"], set(retention["assets"])) if retention else (None, set())

    @store_io("write")
    def prune(self, tenant: str, before: date) -> Pruning:
        """Delete the tenant's log and dead letters of dates before `before` (UTC) and the
        snapshots older than that, keeping what every registered twin's recovery needs: the cut
        moves back to the date of the oldest newest-snapshot, and a twin without a snapshot keeps
        all of its tenant's history. The cut, and the assets whose history it removes, are recorded
        before anything is deleted (a twin registered later replays from its prior as usual)."""
        needed: dict[str, date] = {}
        for t, asset_id, _ in self.registrations():
            if t == tenant:
                snap = self.latest_snapshot(tenant, asset_id)
                needed[asset_id] = date.min if snap is None else from_micros(snap.key[0]).date()
        cut = min([before, *needed.values()])
        held = sorted(a for a, d in needed.items() if d < before)
        if cut == date.min:
            return Pruning(tenant, None, held, 0, 0)
        recorded = self._retention(tenant)
        cut = max(cut, from_micros(recorded["history_from_us"]).date()) if recorded else cut  # only moves forward
        cut_us = _midnight_us(cut)
        partitions = {kind: [d for d in self.fs.glob(f"{self.root}/{kind}/tenant={tenant}/date=*")
                             if d.rsplit("=", 1)[-1] < cut.isoformat()] for kind in ("log", "dead_letters")}
        pruned = set(needed) | set(recorded["assets"] if recorded else ())
        for directory in partitions["log"]:
            pruned.update(pc.unique(self._scan(directory, columns=["asset_id"], empty=LOG_BATCH_SCHEMA.empty_table())
                                    ["asset_id"]).to_pylist())
        replace_file(self.fs, self._retention_path(tenant),
                     json.dumps({"history_from_us": cut_us, "assets": sorted(pruned)}).encode())
        deleted = partitions["log"] + partitions["dead_letters"]
        self.close_segments()  # no append of this store lands in a deleted partition
        for directory in deleted:  # only once the cut is recorded
            self.fs.rm(directory, recursive=True)
        old_snapshots = [p for p in self.fs.glob(f"{self.root}/snapshots/tenant={tenant}/asset_id=*/snap-*.parquet")
                         if parse_snapshot_name(p.rsplit("/", 1)[-1])[0] < cut_us]
        if old_snapshots:
            self.fs.rm(old_snapshots)
        log.info("event=pruned tenant=%s history_from=%s partitions=%d snapshots=%d held_back_by=%d", tenant,
                 cut.isoformat(), len(deleted), len(old_snapshots), len(held))
        return Pruning(tenant, cut, held, len(deleted), len(old_snapshots))

    # --------------------------------------------------------------------------- lease ----
    @property
    def _lease_path(self) -> str:
        return f"{self.root}/lease.json"

    @property
    def _heartbeat_path(self) -> str:
        return f"{self.root}/lease-heartbeat.json"

    @store_io("read")
    def read_lease(self) -> Lease | None:
        return None if (found := self._read_json(self._lease_path)) is None else Lease(**found)

    @store_io("write")
    def write_lease(self, lease: Lease) -> None:
        """Replace the lease (atomically: a writer checking it never reads half a file)."""
        self._replace_json(self._lease_path, asdict(lease))

    @store_io("read")
    def read_heartbeat(self) -> Heartbeat | None:
        return None if (found := self._read_json(self._heartbeat_path)) is None else Heartbeat(**found)

    @store_io("write")
    def write_heartbeat(self, beat: Heartbeat) -> None:
        self._replace_json(self._heartbeat_path, asdict(beat))

    def live_holder(self) -> Lease | None:
        """The lease of the service holding the store if its shards renew its heartbeat; None if none does (none
        leased it, it released it, or nothing renewed it for `LEASE_EXPIRY_S`: it crashed, or its shards are all
        down). For a command that must not write behind a running service's back (`raytwin registry` on a served
        store). It watches the heartbeat on this host's monotonic clock (`RenewalWatch`): it answers at the first
        renewal (within about `LEASE_HEARTBEAT_S` for a running service), at once for a store no lease holds, and
        after `LEASE_EXPIRY_S` for a holder that stopped. Why not compare the renewal's time with this host's
        clock: that time is the holder's host's, and a clock skew over the expiry showed a running service as
        stopped (the command wrote behind its back) and a crashed one as running. What it cannot tell: a service
        that takes the store after it answered (it locks nothing)."""
        lease = self.read_lease()
        while lease is not None and not lease.released:
            if self._renewed(lease):
                return lease
            lease, watched = self.read_lease(), lease
            if lease == watched:
                return None  # (else a service took the store over meanwhile: its lease is watched in turn)
        return None

    def _renewed(self, lease: Lease) -> bool:
        """Whether `lease`'s shards renew its heartbeat within `LEASE_EXPIRY_S` of this host's monotonic clock
        (True at the first renewal seen)."""
        return any(renewed_at is not None for renewed_at in self.renewals(lease, LEASE_EXPIRY_S, LEASE_HEARTBEAT_S))

    def renewals(self, lease: Lease, quiet_s: float, heartbeat_s: float) -> Iterator[float | None]:
        """`renewal_watch.renewals` of `lease`'s heartbeat, renewed every `heartbeat_s` by its shards (a heartbeat
        another holder's shard wrote is none), read twice per renewal so that none is missed."""
        return renewal_watch.renewals(self.read_heartbeat, quiet_s, heartbeat_s / 2,
                                      renews=lambda beat: beat is not None and beat.renews(lease))

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def _replace_json(self, path: str, value: dict[str, Any]) -> None:
        """Write `path` whole (`replace_file`): a writer checking the lease never reads half of it."""
        replace_file(self.fs, path, json.dumps(value).encode())

    @store_io("read")
    def check_lease(self, fence: tuple[str, int] | None) -> None:
        """Raise `StoreFenced` unless the store's live lease is (owner, epoch) `fence` (None: a
        writer outside any service, allowed while no service holds the store). One small file
        read: writers call it once per batch."""
        lease = self.read_lease()
        held = None if lease is None or lease.released else lease.fence
        if held != fence:
            holder = f"service {held[0]} (epoch {held[1]})" if held else "no live service"
            raise StoreFenced(f"store {self.url} is leased to {holder}, not to this writer "
                              f"({'no lease' if fence is None else f'epoch {fence[1]}'}): it was taken over or "
                              "its service closed; this writer must stop")

    # ------------------------------------------------------------------- drift clears ----
    def _drift_clear_path(self, tenant: str, asset_id: str) -> str:
        return f"{self.root}/drift_clears/tenant={tenant}/asset_id={asset_id}.json"

    @store_io("write")
    def save_drift_clear(self, tenant: str, asset_id: str, key: EventKey) -> None:
        """Record that the twin's drift alarm was cleared after the event `key`, beside its earlier clears:
        recovery replays the log up to each clear after its snapshot, clears, then replays the rest, so a
        restart does not latch a cleared alarm again. Why every clear, not the last alone: the alarm freezes
        the process noise's adaptation, so the states between two clears depend on the first. Those before the
        tenant's pruned history cut, for a twin whose history it cut, are dropped: any read of the twin, recovery's
        or back in time, starts from a snapshot at or after the cut and replays only the clears from its start on
        (`actors.recovery._clears_to_replay`), so with `prune` the record stops growing one key per clear."""
        cut_us, cut_assets = self._cut(tenant)
        since = cut_us if asset_id in cut_assets else None
        keys = [k for k in self.load_drift_clears(tenant, asset_id)
                if k != tuple(key) and (since is None or k[0] >= since)] + [tuple(key)]
        record = {"key": list(key), "keys": [list(k) for k in keys]}  # "key": the last, as versions before read it
        replace_file(self.fs, self._drift_clear_path(tenant, asset_id), json.dumps(record).encode())

    @store_io("read")
    def load_drift_clears(self, tenant: str, asset_id: str) -> list[EventKey]:
        """The keys of the last events before each of the twin's drift clears, in order (a record written
        before every clear was kept holds the last alone)."""
        path = self._drift_clear_path(tenant, asset_id)
        if not self.fs.exists(path):
            return []
        record = json.loads(self.fs.cat_file(path))
        return [(us, seq, idempotency_key) for us, seq, idempotency_key in record.get("keys", [record["key"]])]

    def _model_swaps_path(self, tenant: str, asset_id: str) -> str:
        return f"{self.root}/model_swaps/tenant={tenant}/asset_id={asset_id}.json"

    @store_io("write")
    def save_model_swaps(self, tenant: str, asset_id: str, swaps: list[dict[str, Any]]) -> None:
        """Record the twin's model swaps (each ``{"at_us": boundary, "artifact": ModelArtifact JSON}``);
        written before a swap takes effect, so recovery and time travel apply the same versions."""
        path = self._model_swaps_path(tenant, asset_id)
        replace_file(self.fs, path, json.dumps({"swaps": swaps}, sort_keys=True).encode())

    @store_io("read")
    def load_model_swaps(self, tenant: str, asset_id: str) -> list[dict[str, Any]]:
        path = self._model_swaps_path(tenant, asset_id)
        return json.loads(self.fs.cat_file(path))["swaps"] if self.fs.exists(path) else []

    @store_io("read")
    def model_versions(self, tenant: str, model: str) -> dict[str, list[str]]:
        """The versions of `model` that the tenant's registered twins run now or applied events of their
        retained history with, each with those twins' asset ids: what model retention must keep
        (`raytwin.lifecycle.ModelLifecycle.prune`), since `?at=` reads and runs from a past state take the
        version of that time. A version whose era ended before `prune`'s cut of the twin's history is no
        longer needed. Read from the registrations and model swaps (each durable before it applies), so
        twins of a stopped service count too."""
        cut_us, cut_assets = self._cut(tenant)
        swaps_root = f"{self.root}/model_swaps/tenant={tenant}"
        paths = self.fs.glob(f"{swaps_root}/asset_id=*.json")
        swaps = {p.rsplit("/", 1)[-1].removeprefix("asset_id=").removesuffix(".json"): json.loads(body)["swaps"]
                 for p, body in (self.fs.cat(paths).items() if paths else ())}
        used: dict[str, set[str]] = {}
        for asset_id, record in self.registrations_of(tenant).items():
            eras = [(None, record["artifact"]), *sorted(((int(s["at_us"]), s["artifact"])
                                                         for s in swaps.get(asset_id, ())), key=lambda e: e[0])]
            ends = [at for at, _ in eras[1:]] + [None]  # an era ends where the next swap starts
            since = cut_us if asset_id in cut_assets else None
            for (_, artifact), end in zip(eras, ends):
                if artifact["name"] == model and (since is None or end is None or end > since):
                    used.setdefault(artifact["version"], set()).add(asset_id)
        return {version: sorted(assets) for version, assets in sorted(used.items())}

    # ------------------------------------------------------------------------ shadows ----
    def _shadow_path(self, tenant: str, ref: str, asset_id: str) -> str:
        return f"{self.root}/shadows/tenant={tenant}/candidate={ref}/asset_id={asset_id}.json"

    @store_io("write")
    def save_shadow(self, tenant: str, ref: str, asset_id: str, record: dict[str, Any]) -> None:
        """Record (replace) the twin's part of the shadow evaluation of candidate `ref`: its declaration
        and its last checkpoint (`actors.shadow`), so a restarted shard resumes it."""
        path = self._shadow_path(tenant, ref, asset_id)
        replace_file(self.fs, path, json.dumps(record, sort_keys=True).encode())

    @store_io("read")
    def load_shadows(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """Every recorded shadow evaluation's twin part as (tenant, candidate ref, asset_id, record)."""
        out = []
        for path in sorted(self.fs.glob(f"{self.root}/shadows/tenant=*/candidate=*/asset_id=*.json")):
            tenant, ref, leaf = path.rsplit("/", 3)[-3:]
            out.append((tenant.removeprefix("tenant="), ref.removeprefix("candidate="),
                        leaf.removeprefix("asset_id=").removesuffix(".json"), json.loads(self.fs.cat_file(path))))
        return out

    @store_io("write")
    def delete_shadow(self, tenant: str, ref: str, asset_id: str) -> None:
        path = self._shadow_path(tenant, ref, asset_id)
        if self.fs.exists(path):
            self.fs.rm(path)

    # ------------------------------------------------------------------- deleted twins ----
    def _deletion_path(self, tenant: str, asset_id: str) -> str:
        return f"{self.root}/deleted/tenant={tenant}/asset_id={asset_id}.json"

    @store_io("write")
    def save_deletion(self, tenant: str, asset_id: str, floor_us: int) -> None:
        """Record that the twin was deleted: log rows of the asset ingested until `floor_us` are its
        history, which a twin registered again under the same id does not resume (they stay in the log;
        compaction keeps them apart from the new twin's). Only the last deletion matters."""
        path = self._deletion_path(tenant, asset_id)
        replace_file(self.fs, path, json.dumps({"floor_us": floor_us}).encode())

    @store_io("read")
    def history_floors(self, tenant: str, asset_ids: Collection[str] | None = None) -> dict[str, int]:
        """The floor of each of the tenant's deleted twins (`save_deletion`), or of those of `asset_ids` alone:
        a read of each of them, not of every twin the tenant ever deleted (registering one twin read all 5,000
        deletions of a tenant that had deleted as many, twice: 0.1 s each on local disk)."""
        if asset_ids is None:
            paths = self.fs.glob(f"{self.root}/deleted/tenant={tenant}/asset_id=*.json")
        else:
            paths = [self._deletion_path(tenant, asset_id) for asset_id in asset_ids]
        return {path.rsplit("/", 1)[-1].removeprefix("asset_id=").removesuffix(".json"): json.loads(body)["floor_us"]
                for path, body in cat_existing(self.fs, paths).items()}

    @store_io("write")
    def forget_twin(self, tenant: str, asset_id: str) -> None:
        """Remove what a deleted twin derived from its history (snapshots, drift clear, model swaps),
        which a twin registered again under its id must not start from."""
        for path in (f"{self.root}/snapshots/tenant={tenant}/asset_id={asset_id}",
                     self._drift_clear_path(tenant, asset_id), self._model_swaps_path(tenant, asset_id)):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    # ------------------------------------------------------------------- registrations ----
    def _registration_path(self, tenant: str, asset_id: str) -> str:
        return f"{self.root}/twins/tenant={tenant}/asset_id={asset_id}.json"

    @store_io("write")
    def save_registration(self, tenant: str, asset_id: str, record: dict[str, Any]) -> None:
        """Replace the twin's registration whole (`replace_file`): it is rewritten while others read it (a restarted
        shard finishing a retype while the driver answers stale reads from it, `actors.recovery.durable_state`)."""
        replace_file(self.fs, self._registration_path(tenant, asset_id), json.dumps(record, sort_keys=True).encode())

    @store_io("read")
    def load_registration(self, tenant: str, asset_id: str) -> dict[str, Any] | None:
        path = self._registration_path(tenant, asset_id)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    @store_io("write")
    def delete_registration(self, tenant: str, asset_id: str) -> None:
        path = self._registration_path(tenant, asset_id)
        if self.fs.exists(path):
            self.fs.rm(path)

    @store_io("read")
    def registrations_of(self, tenant: str) -> dict[str, dict[str, Any]]:
        """A tenant's registered twins' records by asset id, read in one batch (concurrently on object stores)."""
        paths = self.fs.glob(f"{self.root}/twins/tenant={tenant}/asset_id=*.json")
        return {path.rsplit("/", 1)[-1].removeprefix("asset_id=").removesuffix(".json"): json.loads(body)
                for path, body in (self.fs.cat(paths).items() if paths else ())}

    @store_io("read")
    def registrations(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every registered twin as (tenant, asset_id, record)."""
        out = []
        for path in sorted(self.fs.glob(f"{self.root}/twins/tenant=*/asset_id=*.json")):
            tenant = path.rsplit("/", 2)[-2].removeprefix("tenant=")
            asset_id = path.rsplit("/", 1)[-1].removeprefix("asset_id=").removesuffix(".json")
            out.append((tenant, asset_id, json.loads(self.fs.cat_file(path))))
        return out
