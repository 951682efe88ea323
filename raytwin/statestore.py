"""Durable state of live twins: event log, snapshots, dead letters and registrations.

Layout under the store URL (a local directory or any fsspec URL such as ``s3://bucket/twins``)::

    log/tenant=T/date=YYYY-MM-DD/part-<uuid>.parquet              accepted events (asset_id column), SI values
    snapshots/tenant=T/asset_id=A/snap-<event_us>-<revision>.parquet  one-row filter snapshots
    dead_letters/tenant=T/date=YYYY-MM-DD/part-<uuid>.parquet     rejects: raw JSON + reason
    twins/tenant=T/asset_id=A.json                                 twin registrations

Why: appending one immutable Parquet file per ingested shard batch and day (not per event, not
per asset) makes writes atomic (a file is either there or not; local files are written under a
hidden name and renamed), makes a re-delivered batch harmless, because readers de-duplicate by
idempotency key, and keeps the write cost of a batch flat however many assets it touches (a file
per asset per batch made the log the bottleneck of small, frequent batches). Readers prune by
tenant and date with Hive-style directories and by asset with a filter on the `asset_id` column,
which each file stores sorted (its row-group statistics skip files without the asset). Snapshot
file names carry their event time so the latest snapshot before a time is found from a listing,
without reading files.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from raytwin.storage import filesystem

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


def to_micros(ts: datetime) -> int:
    """Exact integer microseconds since the epoch of an aware datetime."""
    delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


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

    # ------------------------------------------------------------------------ plumbing ----
    def _write(self, table: pa.Table, directory: str, stem: str) -> None:
        self.fs.makedirs(directory, exist_ok=True)
        path = f"{directory}/{stem}.parquet"
        if not self._local:  # an object-store PUT is atomic already
            pq.write_table(table, path, filesystem=self.fs)
            return
        tmp = f"{directory}/.{stem}.tmp"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.mv(tmp, path)

    def _dataset(self, directory: str) -> ds.Dataset | None:
        if not self.fs.exists(directory):
            return None
        return ds.dataset(directory, filesystem=self.fs, format="parquet", partitioning="hive")

    def _asset_dir(self, kind: str, tenant: str, asset_id: str) -> str:
        return f"{self.root}/{kind}/tenant={tenant}/asset_id={asset_id}"

    # ----------------------------------------------------------------------- event log ----
    def append_log(self, tenant: str, table: pa.Table) -> int:
        """Durably append accepted events (`LOG_BATCH_SCHEMA` rows of any assets): one file per day."""
        if table.num_rows == 0:
            return 0
        day = table.column("event_time").cast(pa.int64()).to_numpy() // _DAY_US
        table = table.append_column("_day", pa.array(day))
        name = f"part-{uuid.uuid4().hex}"
        for d in np.unique(day).tolist():
            rows = table.filter(pc.equal(table.column("_day"), d)).drop_columns(["_day"])
            rows = rows.sort_by([("asset_id", "ascending"), ("event_time", "ascending")])
            self._write(rows, f"{self.root}/log/tenant={tenant}/date={_date(d * _DAY_US)}", name)
        return table.num_rows

    def read_events(
        self, tenant: str, asset_id: str, *, after: EventKey | None = None, until_us: int | None = None
    ) -> list[LoggedEvent]:
        """The asset's logged events with `after` < key and time <= `until_us`, de-duplicated by
        idempotency key (a re-delivered batch may be logged twice) and sorted by key."""
        return self.read_events_many(tenant, {asset_id: after}, until_us=until_us)[asset_id]

    def read_events_many(
        self, tenant: str, after: dict[str, EventKey | None], *, until_us: int | None = None
    ) -> dict[str, list[LoggedEvent]]:
        """`read_events` for many assets of a tenant in one scan of the log (recovery of a shard)."""
        out: dict[str, list[LoggedEvent]] = {a: [] for a in after}
        dataset = self._dataset(f"{self.root}/log/tenant={tenant}")
        if dataset is None or not after:
            return out
        flt = ds.field("asset_id").isin(list(after))
        if all(k is not None for k in after.values()):
            since = min(k[0] for k in after.values())
            flt &= (ds.field("date") >= _date(since)) & (ds.field("event_time") >= pa.scalar(since, pa.int64()).cast(TIME))
        if until_us is not None:
            flt &= ds.field("event_time") <= pa.scalar(until_us, pa.int64()).cast(TIME)
        table = dataset.to_table(filter=flt, columns=LOG_BATCH_SCHEMA.names)
        seen: set[tuple[str, str]] = set()
        for asset_id, t, seq, key, quality, values, ingest in zip(
            table.column("asset_id").to_pylist(), table.column("event_time").cast(pa.int64()).to_pylist(),
            table.column("sequence").to_pylist(), table.column("idempotency_key").to_pylist(),
            table.column("quality").to_pylist(), table.column("values").to_pylist(),
            table.column("ingest_time").cast(pa.int64()).to_pylist(),
        ):
            ev = LoggedEvent((t, seq, key), quality, dict(values), ingest)
            start = after[asset_id]
            if (start is None or ev.key > start) and (asset_id, key) not in seen:
                seen.add((asset_id, key))
                out[asset_id].append(ev)
        for events in out.values():
            events.sort(key=lambda e: e.key)
        return out

    def contains(self, tenant: str, asset_id: str, key: EventKey) -> bool:
        """Whether the event with this key is in the log (reads only that day's partition)."""
        dataset = self._dataset(f"{self.root}/log/tenant={tenant}/date={_date(key[0])}")
        if dataset is None:
            return False
        return dataset.count_rows(filter=(ds.field("asset_id") == asset_id) & (ds.field("idempotency_key") == key[2])) > 0

    # ----------------------------------------------------------------------- snapshots ----
    def write_snapshot(self, tenant: str, asset_id: str, snap: Snapshot) -> None:
        us, seq, key = snap.key
        table = pa.table({
            "event_time": pa.array([us], pa.int64()).cast(TIME),
            "sequence": [seq],
            "idempotency_key": [key],
            "revision": [snap.revision],
            "payload": [json.dumps(snap.payload)],
        }, schema=SNAPSHOT_SCHEMA)
        self._write(table, self._asset_dir("snapshots", tenant, asset_id), f"snap-{us:020d}-{snap.revision:012d}")

    def latest_snapshot(self, tenant: str, asset_id: str, at_or_before_us: int | None = None) -> Snapshot | None:
        """The newest snapshot whose event time is <= `at_or_before_us` (any, if None)."""
        directory = self._asset_dir("snapshots", tenant, asset_id)
        if not self.fs.exists(directory):
            return None
        names = sorted(
            p.rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False)
            if p.rsplit("/", 1)[-1].startswith("snap-")
        )
        if at_or_before_us is not None:
            names = [n for n in names if int(n.split("-")[1]) <= at_or_before_us]
        if not names:
            return None
        row = pq.read_table(f"{directory}/{names[-1]}", filesystem=self.fs).to_pylist()[0]
        return Snapshot(
            key=(to_micros(row["event_time"]), row["sequence"], row["idempotency_key"]),
            revision=row["revision"],
            payload=json.loads(row["payload"]),
        )

    # -------------------------------------------------------------------- dead letters ----
    def write_dead_letters(self, tenant: str, rejects: list[dict[str, str]]) -> None:
        """Store rejects (dicts with asset_id, idempotency_key, reason, raw JSON), one file per day."""
        if not rejects:
            return
        now = datetime.now(UTC)
        table = pa.table({
            "asset_id": [r.get("asset_id") for r in rejects],
            "idempotency_key": [r.get("idempotency_key") for r in rejects],
            "reason": [r["reason"] for r in rejects],
            "raw": [r["raw"] for r in rejects],
            "dead_lettered_at": pa.array([now] * len(rejects), TIME),
        }, schema=DEAD_LETTER_SCHEMA)
        self._write(table, f"{self.root}/dead_letters/tenant={tenant}/date={now.date().isoformat()}",
                    f"part-{uuid.uuid4().hex}")

    def read_dead_letters(self, tenant: str | None = None) -> pa.Table:
        """All dead letters (with tenant and date columns), optionally of one tenant."""
        dataset = self._dataset(f"{self.root}/dead_letters")
        if dataset is None:
            return DEAD_LETTER_SCHEMA.append(pa.field("tenant", pa.string())).empty_table()
        flt = ds.field("tenant") == tenant if tenant is not None else None
        return dataset.to_table(filter=flt).sort_by("dead_lettered_at")

    # ------------------------------------------------------------------- registrations ----
    def _registration_path(self, tenant: str, asset_id: str) -> str:
        return f"{self.root}/twins/tenant={tenant}/asset_id={asset_id}.json"

    def save_registration(self, tenant: str, asset_id: str, record: dict[str, Any]) -> None:
        path = self._registration_path(tenant, asset_id)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, json.dumps(record, sort_keys=True).encode())

    def load_registration(self, tenant: str, asset_id: str) -> dict[str, Any] | None:
        path = self._registration_path(tenant, asset_id)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def delete_registration(self, tenant: str, asset_id: str) -> None:
        path = self._registration_path(tenant, asset_id)
        if self.fs.exists(path):
            self.fs.rm(path)

    def registrations(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every registered twin as (tenant, asset_id, record)."""
        out = []
        for path in sorted(self.fs.glob(f"{self.root}/twins/tenant=*/asset_id=*.json")):
            tenant = path.rsplit("/", 2)[-2].removeprefix("tenant=")
            asset_id = path.rsplit("/", 1)[-1].removeprefix("asset_id=").removesuffix(".json")
            out.append((tenant, asset_id, json.loads(self.fs.cat_file(path))))
        return out
