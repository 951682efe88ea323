"""Reads bounded by what they ask for, on a store holding a tenant's long history (`reads-bounded`).

One local-disk store holds a tenant's history of `RAYTWIN_BENCH_HISTORY_DAYS` days (default 365, the full size:
minutes to build; every count below scales with it): 300 log events a day in three files, 274 dead letters a day
(a poison device's, and a connector with 10 in all), 5,000 deletion records, 100,000 audit records over 200 days,
100,000 jobs, a lifecycle log of 2,000 records and 10,000 commands of 50 assets. The store is built with fsync off
(the files read are the same). Each read of the RESULTS table "Reads bounded by what they ask for" is timed, with
the folders it lists and the files it opens or reads (fsspec's `ls`, `cat_file` and `open`: a proxy for an object
store's requests), and, where the way it read before can still run, that way too, with the same answer checked:

- a page of the audit log (`AuditLog.page`, 100 records);
- a connector's dead letters, fewer than a page (`connector_dead_letters`, limit 1,000; before: the tenant's days
  not marked whole with their sources, then `StateStore.mark_dead_letter_sources` once, timed too), and a restarted
  connector's of its backfill's last hour (`SeenLetters.recent`);
- one twin's events after its snapshot (`StateStore.read_events` from a key of the last day);
- a twin's deletion record (`StateStore.history_floors` of one id; before: of every deleted twin);
- registering a twin whose id was never logged (`read_events_many` from its start: no log file read);
- a page of jobs (`job_listing.page`; before: every job filtered and sorted);
- a model's lifecycle check (`ModelLifecycle.current`; before: `verify`, the whole chain);
- one asset's commands (`CommandLedger.list` with `asset_id`) and a restarted connector's commands
  (`CommandLedger.unsettled`); before: the same calls on the store as written before the command index (every
  command of the tenant read), then `CommandLedger.index` once, timed too.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

from fsspec import AbstractFileSystem

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from benchmarks.lifecycle_check import MODEL, build_log
from connectors.commands import Command, CommandLedger, CommandStatus, is_unsettled
from connectors.seen_letters import SeenLetters
from raytwin import statestore
from raytwin.audit import AuditLog, AuditRecord
from raytwin.statestore import LoggedEvent, StateStore, log_table, to_micros
from serve_apps.dead_letters import connector_dead_letters
from serve_apps.job_listing import page
from serve_apps.jobs import JobRecord

HISTORY_DAYS_ENV = "RAYTWIN_BENCH_HISTORY_DAYS"
YEAR, QUICK_DAYS = 365, 4
TENANT, END = "acme", datetime(2026, 12, 1, tzinfo=UTC)
EVENTS_A_FILE, FILES_A_DAY, TWINS = 100, 3, 50
ASSETS, CONNECTORS = 50, ("c", "d")


def _sized(full: int, days: int) -> int:
    """`full` (the count at a year of history) for `days` of it, at least 1."""
    return max(1, round(full * days / YEAR))


class Counted:
    """The folders an fsspec filesystem lists and the files it opens or reads while the block runs: its `ls`,
    `cat_file` and `open` (one read, whatever it calls inside), and the data and log files the state store scans
    (Arrow opens local ones itself); patched on the instance and put back (the local filesystem object is shared
    by the whole process)."""

    def __init__(self) -> None:
        self.listed = self.read = 0
        self._inside = False

    def _counting(self, real: Callable[..., Any], counter: str, files: Callable[..., int]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._inside:
                return real(*args, **kwargs)
            setattr(self, counter, getattr(self, counter) + files(*args, **kwargs))
            self._inside = True
            try:
                return real(*args, **kwargs)
            finally:
                self._inside = False
        return counted

    @contextmanager
    def on(self, fs: AbstractFileSystem) -> Iterator[Counted]:
        def one(*_: Any, **__: Any) -> int:
            return 1

        def paths(_fs: AbstractFileSystem, files: list[str], *_: Any, **__: Any) -> int:
            return len(files)

        with mock.patch.object(fs, "ls", self._counting(fs.ls, "listed", one)), \
                mock.patch.object(fs, "cat_file", self._counting(fs.cat_file, "read", one)), \
                mock.patch.object(fs, "open", self._counting(fs.open, "read", one)), \
                mock.patch.object(statestore, "read_files", self._counting(statestore.read_files, "read", paths)), \
                mock.patch.object(statestore, "_batches", self._counting(statestore._batches, "read", paths)):
            yield self


class Store:
    """The built store and what its reads need."""

    def __init__(self, root: str, days: int):
        self.root, self.days = root, days
        self.state = StateStore(f"{root}/store")
        self.audit = AuditLog(f"{root}/store")
        self.ledger = CommandLedger(f"{root}/store")
        self.lifecycle = build_log(f"{root}/registry", None, _sized(2_000, days))
        self.jobs: dict[str, JobRecord] = {}
        self.listed: list[tuple[datetime, str]] = []
        self.snapshot_key: tuple[int, int, str] | None = None

    def build(self) -> None:
        with mock.patch("os.fsync"):  # (durability is not what is measured)
            self._log()
            self._dead_letters()
            for i in range(_sized(5_000, self.days)):
                self.state.save_deletion(TENANT, f"gone-{i}", 0)
            self._audit()
            self._commands()
        self._jobs()

    def _log(self) -> None:
        for d in range(self.days):
            day = END - timedelta(days=self.days - d)
            for f in range(FILES_A_DAY):
                rows = []
                for i in range(EVENTS_A_FILE):
                    us = to_micros(day + timedelta(hours=8 * f, seconds=60 * i))
                    rows.append((f"t{i % TWINS}", LoggedEvent((us, i, f"{d}:{f}:{i}"), "good", {"h1": 0.1}, us)))
                self.state.append_log(TENANT, log_table(rows))
                self.state.close_segments()  # a file each
                if d == self.days - 1 and f == 0:
                    self.snapshot_key = rows[0][1].key  # t0's first event of the last day
        self.state.mark_logged_assets(TENANT)

    def _dead_letters(self) -> None:
        per_day, web_days = _sized(100_000, self.days) // self.days, set(range(0, self.days, max(1, self.days // 10)))
        for d in range(self.days):
            reasons = ["mqtt://poison/site/p-1/telemetry: not JSON"] * per_day
            reasons += ["mqtt://web/site/p-2/telemetry: not JSON"] if d in web_days else []
            clock = type("Clock", (datetime,), {"now": staticmethod(
                lambda tz=None, d=d: END - timedelta(days=self.days - d, hours=-12))})
            with mock.patch.object(statestore, "datetime", clock):
                self.state.write_dead_letters(TENANT, [{"asset_id": "p-1", "idempotency_key": f"{d}:{i}", "reason": r,
                                                        "raw": f"{d}:{i}"} for i, r in enumerate(reasons)])
        self.state.fs.rm(f"{self.state.root}/dead_letter_sources", recursive=True)  # as written before markers
        self.state = StateStore(f"{self.root}/store")  # (one that saw none of them marked)

    def _audit(self) -> None:
        days, count = _sized(200, self.days), _sized(100_000, self.days)
        for i in range(count):
            self.audit.append(AuditRecord(time=END - timedelta(days=days) + timedelta(days=days) * i / count,
                                          request_id="r", key_id="k", tenant=TENANT, role="admin",
                                          action="asset.create", target=f"a{i}"))

    def _commands(self) -> None:
        """As the ledger wrote them before its index (`{store}/connectors/commands/tenant=T/<id>.json`): most
        acknowledged, one in 100 still awaiting its answer, one in 100 expired."""
        folder = f"{self.ledger.root}/tenant={TENANT}"
        self.ledger.fs.makedirs(folder, exist_ok=True)
        for i in range(_sized(10_000, self.days)):
            c = Command(id=uuid.uuid4().hex, correlation_id=uuid.uuid4().hex, tenant=TENANT,
                        connector=CONNECTORS[i % 2], asset_id=f"a{i % ASSETS}", name="setpoint", value={"x": i},
                        status=CommandStatus.proposed, proposed_by="k1", history=[])
            c = c.moved(CommandStatus.proposed, "k1").moved(CommandStatus.approved, "k2", approved_by="k2")
            c = c.moved(CommandStatus.sending, "connector").moved(CommandStatus.sent, "connector")
            if i % 100 == 1:
                c = c.moved(CommandStatus.expired, "connector")
            elif i % 100:
                c = c.moved(CommandStatus.acknowledged, "asset", ack={"status": "ok"})
            self.ledger.fs.pipe_file(f"{folder}/{c.id}.json", c.model_dump_json().encode())

    def _jobs(self) -> None:
        count, t0 = _sized(100_000, self.days), END - timedelta(days=self.days)
        for i in range(count):
            job = JobRecord(job_id=f"j{i:06d}", kind="sweep", tenant=f"t{i % 10}", key_id="k", asset_id="zone-1",
                            model_ref="thermal_rc@1.0.0", content_hash="h", scenarios=3, n_steps=10,
                            state="failed" if i % 10 == 3 else "succeeded", submitted=t0 + timedelta(minutes=i))
            self.jobs[job.job_id] = job
            if job.tenant == "t3":
                self.listed.append(job.listed_at)


def _timed(ctx: BenchContext, res: BenchResult, fs: AbstractFileSystem, label: str,
           call: Callable[[], Any]) -> tuple[float, Any]:
    """Median ms of `call` (recorded as `label`'s timing), its answer, and its listings and reads in `res.checks`."""
    timing, answer = ctx.measure(label, call)
    with Counted().on(fs) as counted:
        call()
    res.timings[label] = timing
    res.checks[label] = {"listed": counted.listed, "read": counted.read}
    return 1e3 * timing.median_s, answer


def _row(res: BenchResult, name: str, ms: float, before: tuple[str, float] | None = None) -> None:
    """A figure of `name`'s time, named with the folders it listed and the files it read."""
    counts = res.checks[name]
    res.figures.append(Figure(f"{name}: {counts['listed']:,} listed, {counts['read']:,} read", ms, "ms",
                              baseline=before[0] if before else None, baseline_value=before[1] if before else None))


def measure_reads(ctx: BenchContext, store: Store) -> BenchResult:
    res, fs = BenchResult(), store.state.fs
    ms, _ = _timed(ctx, res, fs, "audit page of 100", lambda: store.audit.page(TENANT, limit=100))
    _row(res, "audit page of 100", ms)
    _dead_letters(ctx, res, store)
    since = END - timedelta(hours=1)
    ms, _ = _timed(ctx, res, fs, "a restarted connector's dead letters of its last hour",
                   lambda: SeenLetters.recent(store.state, TENANT, "poison", since))
    _row(res, "a restarted connector's dead letters of its last hour", ms)
    ms, events = _timed(ctx, res, fs, "one twin's events after its snapshot",
                        lambda: store.state.read_events(TENANT, "t0", after=store.snapshot_key))
    res.checks["events after the snapshot"] = len(events)
    _row(res, "one twin's events after its snapshot", ms)
    old, _ = _timed(ctx, res, fs, "every deletion record (before)", lambda: store.state.history_floors(TENANT))
    ms, _ = _timed(ctx, res, fs, "a twin's deletion record", lambda: store.state.history_floors(TENANT, ["gone-7"]))
    _row(res, "every deletion record (before)", old)
    _row(res, "a twin's deletion record", ms, ("every deletion record", old))
    ms, fresh = _timed(ctx, res, fs, "a new twin's log read",
                       lambda: store.state.read_events_many(TENANT, {"never-logged": None}))
    res.checks["a new twin's events"] = len(fresh["never-logged"])
    _row(res, "a new twin's log read", ms)
    _jobs(ctx, res, store)
    _lifecycle(ctx, res, store)
    _commands(ctx, res, store)
    return res


def _once(res: BenchResult, fs: AbstractFileSystem, label: str, call: Callable[[], Any]) -> float:
    """Milliseconds of `call`, run once (what it does is done then: an index's build), with its listings and reads."""
    with mock.patch("os.fsync"), Counted().on(fs) as counted:
        start = time.perf_counter()
        call()
        ms = 1e3 * (time.perf_counter() - start)
    res.checks[label] = {"listed": counted.listed, "read": counted.read}
    return ms


def _dead_letters(ctx: BenchContext, res: BenchResult, store: Store) -> None:
    """Before: the tenant's days not marked whole with their sources (every day's times read)."""
    name, fs = "a connector's dead letters, fewer than a page", store.state.fs
    old, before = _timed(ctx, res, fs, f"{name}, days not marked (before)",
                         lambda: connector_dead_letters(store.state, TENANT, "web", None, 1000))
    marking = _once(res, fs, "marking the dead letters' sources (once)",
                    lambda: store.state.mark_dead_letter_sources(TENANT))
    ms, after = _timed(ctx, res, fs, name, lambda: connector_dead_letters(store.state, TENANT, "web", None, 1000))
    res.checks[f"{name} equal"] = after == before
    res.checks["dead letters found"] = len(after.dead_letters)
    _row(res, f"{name}, days not marked (before)", old)
    _row(res, name, ms, ("days not marked", old))
    _row(res, "marking the dead letters' sources (once)", marking)


def _jobs(ctx: BenchContext, res: BenchResult, store: Store) -> None:
    def every_job() -> list[JobRecord]:  # what a page did before: every job filtered and sorted
        return sorted((j for j in store.jobs.values() if j.tenant == "t3" and j.state == "failed"),
                      key=lambda j: j.listed_at, reverse=True)[:100]

    def a_page() -> list[JobRecord]:
        return page(store.listed, store.jobs.__getitem__, "failed", 100)[0]

    old, before = _timed(ctx, res, store.state.fs, "a page of jobs, every job sorted (before)", every_job)
    ms, after = _timed(ctx, res, store.state.fs, "a page of jobs", a_page)
    res.checks["jobs pages equal"] = before == after
    _row(res, "a page of jobs, every job sorted (before)", old)
    _row(res, "a page of jobs", ms, ("every job sorted", old))


def _lifecycle(ctx: BenchContext, res: BenchResult, store: Store) -> None:
    lc = store.lifecycle
    old, _ = _timed(ctx, res, lc.fs, "lifecycle verify, the whole chain (before)", lambda: lc.verify(MODEL))
    ms, _ = _timed(ctx, res, lc.fs, "lifecycle check", lambda: lc.current(MODEL))
    _row(res, "lifecycle verify, the whole chain (before)", old)
    _row(res, "lifecycle check", ms, ("the whole chain", old))


def _commands(ctx: BenchContext, res: BenchResult, store: Store) -> None:
    ledger, fs = store.ledger, store.ledger.fs
    reads = {"one asset's commands": lambda: ledger.list(TENANT, "a7"),
             "a restarted connector's commands": lambda: ledger.unsettled(TENANT, "c")}
    before = {name: _timed(ctx, res, fs, f"{name}, not indexed (before)", read) for name, read in reads.items()}
    index_ms = _once(res, fs, "indexing the commands (once)", lambda: ledger.index(TENANT))
    res.checks["commands"] = len(ledger.list(TENANT))
    for name, read in reads.items():
        ms, answer = _timed(ctx, res, fs, name, read)
        res.checks[f"{name} equal"] = answer == before[name][1]
        res.checks[f"{name} found"] = len(answer)
        _row(res, f"{name}, not indexed (before)", before[name][0])
        _row(res, name, ms, ("not indexed", before[name][0]))
    expected = [c for c in ledger.list(TENANT) if c.connector == "c" and is_unsettled(c)]
    res.checks["a restarted connector's commands equal a whole read"] = before[
        "a restarted connector's commands"][1] == expected
    _row(res, "indexing the commands (once)", index_ms)


@benchmark("reads-bounded", "The store reads that grew with a tenant's history, on a long one "
                            f"({HISTORY_DAYS_ENV} days, default {YEAR})")
def reads_bounded(ctx: BenchContext) -> BenchResult:
    days = QUICK_DAYS if ctx.quick else int(os.environ.get(HISTORY_DAYS_ENV, YEAR))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp, days)
        built = datetime.now(UTC)
        store.build()
        res = measure_reads(ctx, store)
    res.notes.append(f"{days} days of history, built in {(datetime.now(UTC) - built).total_seconds():.0f} s "
                     "(with the reads)")
    failed = [k for k, v in res.checks.items() if k.endswith("equal") and v is not True]
    if failed:
        raise AssertionError(f"reads-bounded: answers differ from the whole read: {failed}")
    return res
