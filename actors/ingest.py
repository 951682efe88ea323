"""Telemetry ingestion: Parquet / Arrow / streamed JSON -> validated events -> twin shards.

Sources are read in batches of Arrow rows, each batch is checked against the `TelemetryEvent`
contract column-wise (`actors.telemetry.validate_table`; rows that fail go to the dead-letter
dataset with the contract's reason), rows are grouped by shard and sent as Arrow tables in
batched actor calls. Backpressure: at most ``max_in_flight`` shard calls (one per shard) of at
most ``batch_size`` events are outstanding at any time (`ray.wait` on a window), a source is
read one batch at a time, and a live stream holds at most ``batch_size`` events for busy shards
(`Dispatcher.offer`), so memory is bounded by about ``(max_in_flight + 2) * batch_size`` events
however slow a twin is: a slow shard just makes the reader wait.

Telemetry tables use `actors.telemetry.TELEMETRY_SCHEMA`; `measurements` may also be a JSON string
column (``{"T_in": {"value": 21.3, "unit": "degC"}}``, checked row by row). `events_to_table`
writes the canonical form.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import ray

from actors.heap import frozen_heap
from actors.routing import shard_index, shard_name
from actors.state import IngestReport, Reject
from actors.telemetry import TELEMETRY_SCHEMA as TELEMETRY_SCHEMA  # re-exported for sources
from actors.telemetry import events_to_table as events_to_table  # re-exported for sources
from actors.telemetry import parse_rows, rows_table, table_bytes, validate_table, validated_table
from raytwin import metrics
from raytwin.statestore import StateStore
from raytwin.storage import filesystem
from raytwin.store_failures import store_io

log = logging.getLogger("raytwin.ingest")

DEFAULT_BATCH_SIZE = 10_000
DEFAULT_MAX_IN_FLIGHT = 8
DEFAULT_LINGER_S = 0.02
"""How long a streamed event may wait for more to share its batch (see `lingering_chunks`)."""
WRITE_RETRY_S = 120.0
"""How long a batch refused by a restarting shard (`ActorUnavailableError`, once Ray's own call
retries are spent) is sent again before ingestion fails: resending is safe, re-deliveries are
duplicates."""

Batch = pa.Table | list[dict[str, Any]]
"""A source batch: Arrow rows or dict rows (parsed JSON rows go through Arrow too, `rows_table`); checked
column-wise, except fewer dict rows than `ROWS_BY_CONTRACT_BELOW`."""
ROWS_BY_CONTRACT_BELOW = 32
"""Fewer dict rows than this are checked by the contract row by row (`parse_rows`, 25-50 us a row): the
column check costs ~1 ms a batch however few its rows (some 30 Arrow calls), more than the contract for
a slow stream's chunk or a connector's few messages (4 rows: 0.19 against 1.1 ms; even at ~50 rows).
Both paths give the same verdicts, reasons and values (tests/test_ingestion.py)."""


def validate_batch(batch: Batch) -> tuple[pa.Table, list[dict[str, str]]]:
    """(valid rows as a validated table, rejects) of a source batch."""
    if isinstance(batch, pa.Table):
        return validate_table(batch)
    if len(batch) >= ROWS_BY_CONTRACT_BELOW and (table := rows_table(batch)) is not None:
        return validate_table(table, batch)
    events, rejects = parse_rows(batch)
    return validated_table(events), rejects


@dataclass(frozen=True)
class ShardRouter:
    """Everything a process needs to reach a service's shards by name (picklable into tasks)."""

    store_url: str
    shards: int
    namespace: str
    storage_options: dict[str, Any] | None = None

    def handle(self, index: int):
        return ray.get_actor(shard_name(self.store_url, index, self.shards), namespace=self.namespace)

    def store(self) -> StateStore:
        return StateStore(self.store_url, self.storage_options)


class _Backlog:
    """Events this process sent to each shard and not yet saw applied, across its dispatchers
    (`raytwin_shard_backlog_events`; the shard's backlog is the sum over processes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: Counter[int] = Counter()

    def add(self, shard: int, events: int) -> None:
        with self._lock:
            self._events[shard] += events
            metrics.SHARD_BACKLOG.set(self._events[shard], shard=str(shard))

    def of(self, shard: int) -> int:
        """Events this process sent to `shard` and not yet saw answered."""
        with self._lock:
            return self._events[shard]


_BACKLOG = _Backlog()


class Dispatcher:
    """Sends event batches to shards: at most `max_in_flight` calls outstanding, one per shard.

    One outstanding call per shard keeps each asset's events in source order even across an
    actor restart (Ray may reorder *retried* calls), so a crash never turns in-order events into
    late ones; different shards still work in parallel. Rows for a busy shard are *held* in
    source order and go out as one call as soon as it completes, merged with any rows that
    arrived meanwhile (at most `batch_size` per call): a busy shard never holds up the others,
    and under load events wait for one shard call, not for a call per batch queued before them.
    """

    def __init__(self, router: ShardRouter, tenant: str, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 batch_size: int = DEFAULT_BATCH_SIZE, handles: list | None = None, states: bool = False):
        if max_in_flight < 1 or batch_size < 1:
            raise ValueError("max_in_flight and batch_size must be >= 1")
        self.router, self.tenant, self.states = router, tenant, states
        metrics.zero_dead_letters("ingest")  # a burst of invalid rows shows in the dead-letter ratio (`Metric.zero`)
        metrics.BACKPRESSURE.zero({})  # and a process's first waits on its backpressure panel
        self.max_in_flight, self.batch_size = max_in_flight, batch_size
        self.handles = handles or [router.handle(i) for i in range(router.shards)]
        self.busy: dict[int, tuple[ray.ObjectRef, pa.Table, float]] = {}  # shard -> its call, its rows, first sent
        self.held: dict[int, list[pa.Table]] = {}  # shard -> rows not sent yet, in source order
        self.report = IngestReport()

    def reject(self, rejects: list[dict[str, str]]) -> None:
        """Dead-letter rows that failed the contract before routing."""
        if rejects:
            self.router.store().write_dead_letters(self.tenant, rejects)
            metrics.DEAD_LETTERS.inc(len(rejects), stage="ingest", reason="invalid")
            self.report += IngestReport(rejected=len(rejects), reasons=[
                Reject(idempotency_key=r["idempotency_key"], reason=r["reason"]) for r in rejects])

    def send(self, table: pa.Table) -> None:
        """Send validated rows (`VALIDATED_SCHEMA`) to their shards, in calls of at most `batch_size`:
        idle shards first, then each busy one as soon as its outstanding call completes; returns
        once every row is sent (a source read batch by batch waits here: backpressure)."""
        self._hold(table)
        self._dispatch(max_held=0)

    def offer(self, table: pa.Table) -> None:
        """`send` without waiting for busy shards while at most `batch_size` rows are held: a
        live stream keeps collecting events meanwhile, and they join the busy shard's next call
        (`await_shard`, then `dispatch` or `offer`, send it when the shard completes)."""
        self._hold(table)
        self.dispatch()

    @property
    def holding(self) -> bool:
        """Whether rows wait for a busy shard."""
        return bool(self.held)

    def await_shard(self, timeout_s: float) -> bool:
        """Wait until a busy shard that rows wait for completes (any busy shard when they wait for
        `max_in_flight`), for at most `timeout_s` unless every shard is busy (new rows could go
        nowhere sooner); whether held rows can go out now (`dispatch`)."""
        all_busy = len(self.busy) >= min(self.max_in_flight, len(self.handles))
        waiting = list(self.busy) if all_busy else [i for i in self.held if i in self.busy] or list(self.busy)
        if waiting:
            self._complete(waiting, timeout_s=None if all_busy else timeout_s)
        return len(self.busy) < self.max_in_flight and any(index not in self.busy for index in self.held)

    def dispatch(self) -> None:
        """Send held rows to the shards that are free (`offer` does too)."""
        self._dispatch(max_held=self.batch_size)

    def _hold(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        ids = table.column("asset_id").combine_chunks().dictionary_encode()
        shard_of_asset = np.array([shard_index(self.tenant, a, self.router.shards) for a in ids.dictionary.to_pylist()],
                                  dtype=np.int64)
        shard_of_row = shard_of_asset[ids.indices.to_numpy()]
        present, counts = np.unique(shard_of_row, return_counts=True)
        if present.size > 1:  # one gather for all shards (a take per shard cost twice as much), then slices
            table = table.take(np.argsort(shard_of_row, kind="stable"))
        for index, start, count in zip(present.tolist(), (np.cumsum(counts) - counts).tolist(), counts.tolist()):
            self.held.setdefault(index, []).append(table.slice(start, count))

    def _held_rows(self) -> int:
        return sum(part.num_rows for parts in self.held.values() for part in parts)

    def _dispatch(self, max_held: int) -> None:
        """Send held rows to idle shards (within `max_in_flight`); wait for busy ones while more
        than `max_held` rows are held."""
        while True:
            self._complete(list(self.busy), timeout_s=0)
            for index in [i for i in self.held if i not in self.busy]:
                if len(self.busy) >= self.max_in_flight:
                    break
                self._send_held(index)
            if self._held_rows() <= max_held:
                return
            self._wait_for(list(self.busy))

    def _send_held(self, index: int) -> None:
        """One call of the shard's oldest held rows (at most `batch_size`)."""
        rows = pa.concat_tables(self.held.pop(index))
        part, rest = rows.slice(0, self.batch_size), rows.slice(self.batch_size)
        if rest.num_rows:
            self.held[index] = [rest]
        self._call(index, part, time.monotonic())
        _BACKLOG.add(index, part.num_rows)

    def _call(self, index: int, part: pa.Table, first_sent: float) -> None:
        call = self.handles[index].ingest.remote(self.tenant, table_bytes(part), states=self.states)
        self.busy[index] = (call, part, first_sent)

    def _wait_for(self, shards: list[int]) -> None:
        """Backpressure: wait until one of `shards` finished its call (the wait is a metric)."""
        t0 = time.perf_counter()
        self._complete(shards)
        metrics.BACKPRESSURE.inc(time.perf_counter() - t0)

    def _complete(self, shards: list[int], timeout_s: float | None = None) -> None:
        """Take the reports of those of `shards`' calls that are done, waiting until one is or
        `timeout_s` passed (None: no limit; 0: take those already done)."""
        if not shards:
            return
        refs = [self.busy[i][0] for i in shards]
        if timeout_s == 0:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        else:
            done, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        for index in [i for i in shards if self.busy[i][0] in done]:
            ref, part, first_sent = self.busy.pop(index)
            resent = False
            try:
                report = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:  # restarting: send again until it is back (bounded)
                if time.monotonic() - first_sent > WRITE_RETRY_S:
                    raise
                log.warning("event=shard_unavailable shard=%d tenant=%s events=%d action=resend", index, self.tenant,
                            part.num_rows)
                self._call(index, part, first_sent)
                resent = True
            finally:  # applied or failed (a full disk, a dead shard): no longer waiting; resent: still is
                if not resent:
                    _BACKLOG.add(index, -part.num_rows)
            if not resent:
                self.report += report

    def abandon(self) -> None:
        """Forget the calls still outstanding (a call failed and the ingest gives up): their events leave this
        process's backlog, which would otherwise count them for as long as the process lives."""
        for index, (_, part, _) in self.busy.items():
            _BACKLOG.add(index, -part.num_rows)
        self.busy.clear()

    def finish(self) -> IngestReport:
        """Send every held row and wait for every outstanding call; the report covers everything sent."""
        try:
            self._dispatch(max_held=0)
            while self.busy:
                self._complete(list(self.busy))
        except BaseException:
            self.abandon()
            raise
        log.info("event=ingested tenant=%s accepted=%d duplicates=%d rejected=%d conflicts=%d", self.tenant,
                 self.report.accepted, self.report.duplicates, self.report.rejected, self.report.conflicts)
        return self.report


def ingest_rows(router: ShardRouter, tenant: str, batches: Iterable[Batch], **opts) -> IngestReport:
    """Validate and route source batches (the common path of every source)."""
    dispatcher = Dispatcher(router, tenant, **opts)
    for i, batch in enumerate(batches, 1):
        table, rejects = validate_batch(batch)
        dispatcher.reject(rejects)
        dispatcher.send(table)
        if i % 100 == 0:
            log.info("event=ingest_progress tenant=%s batches=%d accepted=%d", tenant, i, dispatcher.report.accepted)
    return dispatcher.finish()


def table_batches(table: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    """`table` in slices of at most `batch_size` rows (zero-copy)."""
    for start in range(0, table.num_rows, batch_size):
        yield table.slice(start, batch_size)


class StreamBuffer:
    """A source read by a thread into a buffer of at most `size` items, handed over in chunks,
    each at the latest `linger_s` after its oldest item arrived (`take`).

    Why: a live stream must not wait for `size` events before anything is applied (at one event a
    second, a 10,000-event chunk would take hours to fill), while a fast stream still gets large
    chunks: items that arrive while the consumer is busy join the next chunk. When shards fall
    behind, the buffer fills and the reader stalls (bounded memory). The consumer is woken once
    per chunk (when its first item arrives, and when it is full), not once per item: a thread
    hand-off per event cost the driver ~10k wake-ups a second at 10k events/s. An exception
    raised by the source is re-raised by `take` after the items read before it.
    """

    def __init__(self, source: Iterable[Any], size: int, linger_s: float):
        if size < 1 or linger_s < 0:
            raise ValueError("size must be >= 1 and linger_s >= 0")
        self.size, self.linger_s = size, linger_s
        self._items: list[Any] = []
        self._first_arrived = 0.0  # when the oldest buffered item arrived
        self._ended = self._stopped = False
        self._failure: BaseException | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(source,), name="raytwin-ingest-source", daemon=True).start()

    def _read(self, source: Iterable[Any]) -> None:
        try:
            for item in source:
                with self._changed:
                    while len(self._items) >= self.size and not self._stopped:
                        self._changed.wait()
                    if self._stopped:
                        return
                    if not self._items:
                        self._first_arrived = time.monotonic()
                        self._changed.notify_all()  # the consumer starts this chunk's linger clock
                    self._items.append(item)
                    if len(self._items) >= self.size:
                        self._changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            with self._changed:
                self._failure = exc
                self._changed.notify_all()
            return
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _due_at(self) -> float:
        """When the buffered chunk is due (now if full or the source stopped); needs items."""
        if len(self._items) >= self.size or self._ended or self._failure is not None:
            return 0.0
        return self._first_arrived + self.linger_s

    def wait_budget(self) -> float:
        """Seconds the consumer may spend elsewhere before a chunk can be due: until the buffered
        chunk is due, or `linger_s` when nothing is buffered (an item arriving now is due then)."""
        with self._changed:
            if self._items:
                return max(0.0, self._due_at() - time.monotonic())
            return 0.0 if self._ended or self._failure is not None else self.linger_s

    def take(self, timeout_s: float | None = None, *, drain: bool = False) -> list[Any] | None:
        """The next chunk once it is due (`drain`: whatever is buffered, due or not); [] if
        `timeout_s` passed first; None once the source ended and every item was handed over."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while True:
                now = time.monotonic()
                if self._items and (drain or self._due_at() <= now):
                    chunk, self._items = self._items, []
                    self._changed.notify_all()  # room for the reader
                    return chunk
                if not self._items and self._failure is not None:
                    raise self._failure
                if not self._items and self._ended:
                    return None
                wake = self._due_at() if self._items else None
                if deadline is not None:
                    if now >= deadline:
                        return []
                    wake = deadline if wake is None else min(wake, deadline)
                self._changed.wait(None if wake is None else wake - now)

    def close(self) -> None:
        """Stop the reader (it ends at its next item)."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()


def lingering_chunks(source: Iterable[dict[str, Any]], size: int, linger_s: float) -> Iterator[list[dict[str, Any]]]:
    """Chunks of at most `size` items of `source`, each handed over at the latest `linger_s` after
    its oldest item arrived (`StreamBuffer`)."""
    buffer = StreamBuffer(source, size, linger_s)
    try:
        while (chunk := buffer.take()) is not None:
            yield chunk
    finally:
        buffer.close()


def stream_rows(router: ShardRouter, tenant: str, source: Iterable[dict[str, Any]], *,
                batch_size: int = DEFAULT_BATCH_SIZE, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                linger_s: float = DEFAULT_LINGER_S) -> IngestReport:
    """The live path: chunks of `source` validated and offered to the shards as they come due.
    While rows wait for a busy shard, its completion is awaited (until the next chunk can be
    due); the moment it is free, everything buffered so far goes out with them in one call
    (group commit): under load a batch waits for one shard call, and the driver validates fewer,
    larger chunks instead of one per `linger_s` for shards that cannot take them yet."""
    dispatcher = Dispatcher(router, tenant, max_in_flight=max_in_flight, batch_size=batch_size)
    buffer = StreamBuffer(source, batch_size, linger_s)
    chunks = 0
    try:
        while True:
            free = False
            if dispatcher.holding:
                free = dispatcher.await_shard(buffer.wait_budget())
                chunk = buffer.take(timeout_s=0, drain=free)
            else:
                chunk = buffer.take()
            if chunk is None:
                return dispatcher.finish()
            if not chunk:
                if free:
                    dispatcher.dispatch()
                continue
            table, rejects = validate_batch(chunk)
            dispatcher.reject(rejects)
            dispatcher.offer(table)
            chunks += 1
            if chunks % 100 == 0:
                log.info("event=ingest_progress tenant=%s batches=%d accepted=%d", tenant, chunks,
                         dispatcher.report.accepted)
    finally:
        buffer.close()


@ray.remote
def ingest_table(router: ShardRouter, tenant: str, table: pa.Table, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> IngestReport:
    """Ray task: ingest an Arrow table of telemetry."""
    return ingest_rows(router, tenant, table_batches(table, batch_size), batch_size=batch_size,
                       max_in_flight=max_in_flight)


@ray.remote
def ingest_parquet(router: ShardRouter, tenant: str, url: str, storage_options: dict[str, Any] | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> IngestReport:
    """Ray task: ingest a Parquet file or dataset directory (local or any fsspec URL), streamed in batches."""
    return ingest_rows(router, tenant, _parquet_batches(url, storage_options, batch_size), batch_size=batch_size,
                       max_in_flight=max_in_flight)


def _parquet_batches(url: str, storage_options: dict[str, Any] | None, batch_size: int) -> Iterator[pa.Table]:
    """The Parquet file or dataset at `url`, read in batches of at most `batch_size` rows as they are wanted."""
    fs, path = filesystem(url, storage_options)
    with store_io("read"):  # (a generator: its body, not its call, reads)
        for batch in ds.dataset(path, filesystem=fs, format="parquet").to_batches(batch_size=batch_size):
            yield pa.Table.from_batches([batch])


def ingest_stream(router: ShardRouter, tenant: str, source: Iterable[dict[str, Any]],
                  batch_size: int = DEFAULT_BATCH_SIZE, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                  linger_s: float = DEFAULT_LINGER_S) -> IngestReport:
    """Consume an iterator of event dicts (e.g. `ndjson_http_source`) until it ends, in batches of
    at most `batch_size` events sent at the latest `linger_s` after their oldest event arrived.
    The process's heap is frozen meanwhile (`actors.heap.frozen_heap`): a full garbage collection
    of the caller's process (~130 ms measured in the benchmark's driver) held up every batch."""
    with frozen_heap():
        return stream_rows(router, tenant, source, batch_size=batch_size, max_in_flight=max_in_flight,
                           linger_s=linger_s)


def ndjson_http_source(url: str, *, timeout_s: float = 30.0, client: httpx.Client | None = None) -> Iterator[dict]:
    """Events from a newline-delimited JSON HTTP response, streamed (never read whole).

    A line that is not a JSON object (or that Python's JSON reader refuses: nesting beyond its
    recursion limit, an integer of more than 4,300 digits) is yielded as ``{"_unparsed": line}``
    so it is dead-lettered with its content rather than silently dropped or failing the stream.
    """
    own = client is None
    client = client or httpx.Client(timeout=timeout_s)
    try:
        with client.stream("GET", url) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
                    item = None
                yield item if isinstance(item, dict) else {"_unparsed": line}
    finally:
        if own:
            client.close()
