"""The per-tenant change log: every catalog change, twin state change, drift flag and job completion.

Each change gets the next number of its tenant's sequence (1, 2, 3, ... with no holes); that
number is the event id of the change stream (`serve_apps.change_stream`) and, for catalog
changes, the changed asset's or type's revision (its ETag). The log lives in the `Backend`
replica, which appends under one lock, and is durable before an append returns: one JSON-lines
segment per append at ``{store}/changes/{tenant}/{first // 10000:010d}/{first:016d}-{last:016d}-e{epoch}.jsonl``
(object stores cannot append; names sort by sequence; `epoch`: the store lease's of the service writing, absent from
segments written before it was named), created only where its name is free (`ChangeStore.write`: an
exclusive create). A failed write, which may have landed, is written again with its numbers and bytes
(`ChangeLog._append_locked`; found landed, it is done): never a second copy of a change, nor another under its
number, nor a segment over another log's. A restarted backend continues the sequence from the newest segment, so
an event id read from a stream stays a valid resume point across replica restarts.

Each change also carries the `generation` of the log that wrote it, a random token drawn each time
the backend starts, and its event id is ``<seq>-<generation>`` (`event_id`). Why: a store restored
from an earlier copy continues the sequence from the copy's head, so new changes get the numbers of
changes clients already saw; their generation differs, so a resume point from before the restore is
recognised (`serve_apps.change_stream.resume_point` finds another change, or none, under its number) and refused
(410) instead of silently skipping the changes under the reused numbers.

The newest `memory` changes of each tenant are also kept in memory (a bounded ring), so live
streams are served without store reads; a reader further behind reads the segments from the
store itself (`ChangeStore`), without the backend.

Recorded marks: the log keeps, per tenant, what it has *written* about each twin, (revision, drift) of its newest
`twin.state`/`twin.drift` change, and the ids of the jobs with a `job.*` change that ended since its jobs' floor, jobs
that ended before it being taken as recorded (`Recorded`), and checkpoints them beside the segments at most every
`CHECKPOINT_S`
(``{store}/changes/{tenant}/.recorded.json``, with the event id of the newest change they cover;
`ChangeLog.checkpoint`). A restarted backend reads the checkpoint and the changes after it (`ChangeLog.recorded`,
`ChangeLog.recorded_jobs`), so it knows which twins' states or drift flags got ahead of the log (a batch applied whose
change write failed, then a crash) and which jobs ended without their change (the same, or a crash between the job's
record and its change; a job the restart itself failed) and records their catch-up changes
(`serve_apps.backend.Backend._catch_up`, `_catch_up_jobs`). A log without a checkpoint (one written before them; a new
tenant's gets one at its first change) or whose checkpoint is not of it (a store restored from an uneven copy: the
checkpoint's newest change is not in the log under its generation) cannot tell what it lost: its twins' current states
and its jobs are taken as recorded, as before the marks (`ChangeLog.adopt`, `ChangeLog.adopt_jobs`), and it is
checkpointed from then on; so are the jobs of a checkpoint from before they were named in it.

One writer: the log of the service holding the store's lease. Once another service took the store over, the log writes
nothing there (`ChangeLog.fence`, the backend's `check_writable`, a verdict read at most once a second): no change,
which would take a number the successor's log gives too, and no checkpoint, which would replace the successor's (a
checkpoint reads the lease afresh, so a backend closed within that second writes none either). A takeover between
that read and the write (serve_apps/README.md, "After a takeover") lets segments through, named with the fenced
service's epoch, which readers leave out once the successor wrote (below). What it could not write is the successor's
to record: its catch-up finds the jobs from their records (its start failed those queued or running here, whose end
this queue no longer saves: `serve_apps.jobs.JobQueue.fence`), and the twins from their states (the fenced service's
twin writes are refused by its shards).

Segments of two logs: a fenced log and its successor both number from the head they read, so their segments may
overlap under different names. The rule every reader applies (`ChangeStore._segments`: reads, the head, the oldest
change): **a segment is left out when a segment of a higher epoch begins at or before its last number**. A successor
begins after the head it read, so what the fenced log wrote before the takeover stays, and what it wrote after it
(its window segments: from the successor's first number on, or later in that window) is never served once the
successor wrote a change; the successor's changes are served under every number they hold, whichever name sorts first.
Where no epoch tells them apart (segments without one, two logs of one lease), overlapping segments are read in name
order, each number taken once from the first that holds it; a same-named segment of another such log is refused and
the changes are numbered after it (`ChangeLog._renumber_locked`). Limits: a fenced segment is served until the
successor writes a change (its first is at or before the segment's last number): a stream replaying the store then
may have read it, and its resume point there is refused (410: another generation's change holds the number); a
superseding segment is looked for in the segment's folder, the folder before it and those up to its last number, so a
fenced log that wrote more than `PARTITION` changes in its window could have its later ones served; epochs only grow
(`actors.lease.acquire_lease`), and a log whose store's newest segment has a higher epoch than its lease's (a
``lease.json`` lost: epochs start again at 1) names its segments with that one (`ChangeLog._head_locked`).

Retention (`retention_s`): whole directories of `PARTITION` changes whose newest change is older
than that are deleted, oldest first, never the newest directory; a resume point before the oldest
kept change is refused (410) rather than resumed with a gap. So the log's size is bounded by
its rate times the retention, not by the store's age.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from raytwin.storage import filesystem, replace_file, write_once
from raytwin.statestore import FenceCheck, StoreFenced, fenced
from raytwin.store_failures import store_io

ChangeKind = Literal["twin.state", "twin.drift", "asset.created", "asset.updated", "asset.deleted",
                     "asset_type.created", "asset_type.deleted", "job.succeeded", "job.failed",
                     "job.cancelled"]
CHANGE_KINDS: tuple[str, ...] = ChangeKind.__args__
PARTITION = 10_000
"""Sequence numbers per store directory: bounds the listing a reader behind the ring needs; the unit of retention."""
PRUNE_EVERY_S = 600.0
"""How often an appending backend applies the retention to a tenant's log (one listing)."""
MAX_UNWRITTEN = 10_000
"""Changes of one tenant kept in memory after their write failed (`ChangeLog._commit`) before its telemetry batches
are refused (`ChangeLog.check_room`): about 12 MB of twin.state changes of a two-state model (1.2 kB each)."""

CHECKPOINT_S = 10.0
"""How often, at most, a tenant's recorded marks are checkpointed when they changed: bounds the log tail a restarted
backend reads to know them (the changes of ~15 s at most, with the backend's 5 s store watch writing them). The
checkpoint holds every twin with a recorded change, ~30 bytes each (3 MB for 100,000 twins, whose marks take ~19 MB
of memory), rewritten whole each time."""
MARKS_FILE = ".recorded.json"
"""The checkpoint's name in the tenant's log folder: hidden, so segment listings skip it."""
TAIL_PAGE = 1000
"""Changes read per store call when reading the log's tail after a checkpoint."""
JOB_WINDOW_S = 3600.0
"""How far behind the newest job with a change the recorded marks' floor follows (`Recorded.note_jobs`), once a
backend's catch-up of its tenant's jobs is done: bounds the jobs they name (a job change a second: 3,600 ids, ~250 kB of
checkpoint). A job that ended before the floor is taken as recorded; the floor never passes a lost job's change, which
a later job's written change implies written (a failed write's changes are written first)."""

Mark = tuple[int, bool]
"""A twin's (state revision, drift flag)."""
JobEnds = dict[str, datetime]
"""Job id -> when the job ended, of jobs whose `job.*` change the log wrote."""

log = logging.getLogger("raytwin.serve.changes")


class Change(BaseModel):
    """One change of a tenant's twins, catalog or jobs, as written to the log and sent on streams."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seq: int = Field(description="position in the tenant's change log (1, 2, ...): the stream's event id")
    kind: ChangeKind
    time: datetime = Field(description="when the server recorded the change")
    asset_id: str | None = None
    type_name: str | None = None
    type_version: str | None = None
    revision: int | None = Field(None, description="the resource's revision after the change: the twin's state "
                                 "revision for twin.*, the ETag revision (= seq) for asset.* and asset_type.*")
    data: dict[str, Any] = Field(default_factory=dict)
    generation: str | None = Field(None, description="which run of the server's change log wrote it (new at each "
                                   "start; null: written before generations): with seq, the stream's event id "
                                   "(`<seq>-<generation>`), so a resume point from before a restore of the store "
                                   "is recognised")

    @property
    def event_id(self) -> str:
        return event_id(self.seq, self.generation)


def event_id(seq: int, generation: str | None) -> str:
    """A change's event id on the stream: ``<seq>-<generation>`` (plain ``<seq>`` without a generation)."""
    return str(seq) if generation is None else f"{seq}-{generation}"


def parse_event_id(value: str) -> tuple[int, str | None] | None:
    """(seq, generation) of an event id (`event_id`), None for text that is not one."""
    seq, _, generation = value.strip().partition("-")
    if not seq.isdigit() or (generation and not generation.isalnum()):
        return None
    return int(seq), generation or None


class ChangePage(BaseModel):
    """Changes after a position, from memory. `fell_behind`: the position is older than the
    in-memory window (`oldest` is the oldest change still there): read the store."""

    changes: list[Change]
    head: int
    oldest: int | None = None
    fell_behind: bool = False


@dataclass
class Queued:
    """An append waiting for its group commit."""

    drafts: list[dict[str, Any]]
    changes: list[Change] | None = None
    error: Exception | None = None


@dataclass
class Recorded:
    """What the tenant's log has written about its twins and jobs, as of change `seq` (of `generation`): each twin's
    `Mark` from its newest twin.state or twin.drift change, and the jobs with a job.* change that ended at or after
    `jobs_floor` (`jobs`; None: not known, a checkpoint from before it, until `ChangeLog.adopt_jobs`); those that ended
    before the floor are taken as recorded (None: no job is). Not `exact`: a log from before the marks, whose twins
    missing from `marks` are unknown rather than unrecorded, until `ChangeLog.adopt`; it is not checkpointed meanwhile.

    The floor is checkpointed, and moves only once this run's catch-up of the tenant's jobs is done (`jobs_settled`,
    `ChangeLog.settle_jobs`): a job this run records ends long after a lost one when the service was down for hours,
    and a floor that followed it before the catch-up ran (or across a crash before it) skipped the lost one."""

    marks: dict[str, Mark] = field(default_factory=dict)
    seq: int = 0
    generation: str | None = None
    exact: bool = True
    jobs: JobEnds | None = None
    jobs_floor: datetime | None = None
    jobs_settled: bool = False  # this run's catch-up of the jobs is done: the floor may move (not checkpointed)
    dirty: bool = False
    saved_at: float = -math.inf  # monotonic time of the last checkpoint attempt

    def note(self, change: Change) -> None:
        """Follow one written change."""
        if change.kind in ("twin.state", "twin.drift") and change.asset_id and change.revision is not None:
            self.marks[change.asset_id] = (change.revision, bool(change.data.get("drift")))
        elif change.kind == "asset.deleted" and change.asset_id:
            self.marks.pop(change.asset_id, None)
        elif change.kind.startswith("job.") and self.jobs is not None and (job_id := change.data.get("job_id")):
            finished = change.data.get("finished")  # set by every job's end; the change's own time is later
            self.note_jobs({job_id: datetime.fromisoformat(finished) if finished else change.time})
        self.seq, self.generation, self.dirty = change.seq, change.generation, True

    def note_jobs(self, ended: JobEnds) -> None:
        """Add jobs taken as recorded (`jobs` becomes known); once `jobs_settled`, move the floor up to `JOB_WINDOW_S`
        before the newest and drop the jobs before it."""
        jobs = {**(self.jobs or {}), **ended}
        if self.jobs_settled and jobs:
            floor = max(jobs.values()) - timedelta(seconds=JOB_WINDOW_S)
            self.jobs_floor = floor if self.jobs_floor is None else max(self.jobs_floor, floor)
        self.jobs = jobs if self.jobs_floor is None else {j: t for j, t in jobs.items() if t >= self.jobs_floor}


@dataclass(frozen=True)
class JobMarks:
    """What a tenant's log has written of its jobs (`Recorded`): `ended`, the jobs with a change that ended at or after
    `floor`; those that ended before it are taken as recorded (None: none is)."""

    ended: JobEnds
    floor: datetime | None


def _floor(saved: dict[str, Any]) -> datetime | None:
    """The jobs' floor of checkpoint `saved`; of one from before the floor was kept, `JOB_WINDOW_S` before its newest
    job, as its version took it."""
    if "jobs_floor" in saved:
        return None if saved["jobs_floor"] is None else datetime.fromisoformat(saved["jobs_floor"])
    newest = max((datetime.fromisoformat(t) for t in (saved.get("jobs") or {}).values()), default=None)
    return None if newest is None else newest - timedelta(seconds=JOB_WINDOW_S)


class ChangeLog:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, memory: int = 1000,
                 retention_s: float | None = None, max_unwritten: int = MAX_UNWRITTEN,
                 checkpoint_s: float = CHECKPOINT_S, fence: FenceCheck | None = None, epoch: int = 0):
        """`retention_s`: keep at least that much history (None: everything). `epoch`: the lease epoch of the service
        writing (0: none), named in its segments so that readers take a successor's over a fenced log's (module
        docstring, "Segments of two logs"). `fence`: raises
        (`raytwin.statestore.StoreFenced`) once this log's service no longer holds its store
        (`serve_apps.backend.Backend.check_writable`, a cached verdict: no store read per append; a checkpoint asks it
        from a read of the lease made now); the log then writes nothing there, neither changes (`_append_locked`) nor
        checkpoints (`checkpoint`), so that the successor's log alone numbers the tenant's changes, and its catch-up
        records what this one could not (None: no fence)."""
        self.store = ChangeStore(url, storage_options)
        self.fence = fence
        self.memory, self.retention_s, self.max_unwritten = memory, retention_s, max_unwritten
        self.checkpoint_s = checkpoint_s
        self._recorded: dict[str, Recorded] = {}  # loaded at a tenant's first append or `recorded` call
        self._checkpoint_lock = threading.Lock()  # one checkpoint pass at a time: an older one never lands last
        self._pruned_at: dict[str, float] = {}  # tenant -> monotonic time of its last retention pass
        self._lock = threading.Lock()  # sequence numbers, segment writes, the rings
        self._queue_lock = threading.Lock()
        self._queue: dict[str, list[Queued]] = {}  # appends waiting for the next group commit
        self._head: dict[str, int] = {}
        self.epoch = epoch
        self._epoch: dict[str, int] = {}  # tenant -> the epoch its segments are named with (`_head_locked`)
        self._ring: dict[str, deque[Change]] = {}
        self.generation = secrets.token_hex(4)  # this run's: a restored store's new changes differ from the old
        self._unwritten: dict[str, list[list[Change]]] = {}  # segments whose write failed: written first, as they were

    # ---- writing --------------------------------------------------------------------------
    def record(self, tenant: str, drafts: list[dict[str, Any]]) -> list[Change]:
        """Record `drafts` (Change fields without seq and time; revision defaults to seq) as the
        tenant's next changes; returns once they are on the store.

        Group commit: callers that arrive while a segment is being written queue up, and the next
        one to get the lock writes all of them as one segment, so N concurrent appends cost about
        one store write, not N (an object-store PUT takes tens of milliseconds)."""
        return self.commit(tenant, self.submit(tenant, drafts))

    def submit(self, tenant: str, drafts: list[dict[str, Any]]) -> Queued:
        """Queue an append (cheap): queued appends get sequence numbers in queue order at `commit`."""
        item = Queued(drafts)
        with self._queue_lock:
            self._queue.setdefault(tenant, []).append(item)
        return item

    def commit(self, tenant: str, item: Queued) -> list[Change]:
        """Wait until `item` is on the store (writing it, with whatever else is queued, if nobody else is)."""
        with self._lock:
            if item.changes is None and item.error is None:
                with self._queue_lock:
                    batch = self._queue.pop(tenant)
                self._commit(tenant, batch)
        if item.error is not None:
            raise item.error
        self._retain(tenant)
        return item.changes or []

    def _retain(self, tenant: str) -> None:
        """Apply the retention to the tenant's log every `PRUNE_EVERY_S` (outside the lock: appends
        go to the newest directory, which is never deleted); a failure is retried on the next pass."""
        now = time.monotonic()
        if self.retention_s is None or now - self._pruned_at.get(tenant, -PRUNE_EVERY_S) < PRUNE_EVERY_S:
            return
        self._pruned_at[tenant] = now
        try:
            removed = self.store.prune(tenant, datetime.now(UTC) - timedelta(seconds=self.retention_s))
        except Exception:  # noqa: BLE001 - the appends are durable; retention waits for the next pass
            log.warning("event=change_retention_failed tenant=%s", tenant, exc_info=True)
            return
        if removed:
            log.info("event=change_retention tenant=%s removed_through=%d", tenant, removed)

    def _commit(self, tenant: str, batch: list[Queued]) -> None:
        """Write the queued appends as one segment (under the lock); every caller gets its changes or the error.

        A failed write (a full disk, a store outage) keeps its changes (`_append_locked`): they describe what already
        happened (a twin's applied events, a finished job), so they are written ahead of the tenant's next append, or by
        `flush`: the stream misses no change, even when the client's resend of the batch is all duplicates.
        Kept in this process's memory only, and `check_room` bounds them: a backend that stops before the store takes
        writes again loses them, but not what they describe: the next backend finds the twins whose state or drift
        flag is ahead of the recorded marks (`recorded`) and records their current state then, and the jobs that
        ended without a change the log wrote (`recorded_jobs`) and records their change then (serve_apps/README.md,
        "Change stream"). So does the successor of a fenced log (`fence`), whose refused drafts are kept too: never
        written while it is fenced."""
        all_drafts = [d for item in batch for d in item.drafts]
        try:
            changes = self._append_locked(tenant, all_drafts) if all_drafts else []
        except Exception as exc:
            log.warning("event=change_write_failed tenant=%s kept=%d error=%s: %s", tenant,
                        self._kept(tenant), type(exc).__name__, exc)
            for item in batch:
                item.error = exc
            return
        for item in batch:
            item.changes, changes = changes[:len(item.drafts)], changes[len(item.drafts):]

    def write(self, tenant: str, apply: Callable[[int], list[dict[str, Any]]]) -> list[Change]:
        """Run `apply(next_seq)` under the log's lock, then record the drafts it returns.

        `apply` is the write the changes describe (a catalog file carrying revision `next_seq`), so
        revisions and log order agree; if it raises, nothing is recorded. If the log's write fails after it, the
        changes are kept, as `_commit` keeps them: written ahead of the next append (`apply` wrote what they describe).
        """
        with self._lock:
            self._check_fence()  # before `apply`: no catalog write whose change a fenced log would refuse
            self._flush_locked(tenant)  # first: `apply` writes the revision its change will have
            self._recorded_locked(tenant)  # and what may fail to load: not after `apply`, leaving it unrecorded
            drafts = apply(self._head_locked(tenant) + 1)
            return self._append_locked(tenant, drafts) if drafts else []

    def flush(self, tenants: list[str] | None = None) -> None:
        """Write the changes whose write failed (`_commit`), of `tenants` (None: all); raises the store's error."""
        with self._lock:
            for tenant in list(self._unwritten) if tenants is None else tenants:
                self._flush_locked(tenant)

    def unwritten(self) -> int:
        """How many changes wait for a write that failed (0: the log has every change recorded)."""
        with self._lock:
            return sum(self._kept(t) for t in self._unwritten)

    def check_room(self, tenant: str) -> None:
        """`StoreUnavailable` (503) while `max_unwritten` of the tenant's changes wait for a write that failed: each
        batch applied meanwhile would keep more in memory, without bound while the store fails, all lost if the
        backend stops. For a caller about to apply a batch: nothing of it is applied, and its resend is once the
        kept changes are written (`flush`, every few seconds). Read without the lock, which a write to a store
        that hangs holds: a telemetry request must not wait on it here."""
        from serve_apps.store_errors import unavailable  # here: the SDK imports this module, without FastAPI

        kept = self._kept(tenant)
        if kept >= self.max_unwritten:
            raise unavailable(f"{kept} changes of tenant {tenant} wait for the change log's write, which failed",
                              "no_writes", "the store takes no writes (a full disk, a read-only or unwritable store: the backend "
                              "logs event=change_write_failed with the error); this tenant's telemetry is refused, "
                              "nothing of it applied, until they are written")

    def _kept(self, tenant: str) -> int:
        return sum(len(segment) for segment in self._unwritten.get(tenant, ()))

    def _flush_locked(self, tenant: str) -> None:
        if self._unwritten.get(tenant):
            self._append_locked(tenant, [])

    def _append_locked(self, tenant: str, drafts: list[dict[str, Any]]) -> list[Change]:
        """Write the tenant's unwritten segments then `drafts` as its next changes; the changes of `drafts`. Refused
        (`fence`) once another service holds the store: its log numbers the changes from then on.

        A write that failed may have landed (a timeout after the store took the PUT, a folder sync failing after the
        rename), so its segment keeps its numbers and bytes and is written again as it was, which replaces it whole
        where it landed: written again renumbered, or its numbers given to the next changes, it was read twice or
        replaced by other changes under its numbers. Only the first kept segment was ever tried (the writes stop at
        the first failure), so the changes kept after it share one segment: at most two writes flush them."""
        kept = self._unwritten.setdefault(tenant, [])
        first = (kept[-1][-1].seq if kept else self._head_locked(tenant)) + 1
        now = datetime.now(UTC)
        new = [Change(seq=first + i, time=now, generation=self.generation, **{"revision": first + i, **d})
               for i, d in enumerate(drafts)]
        if new:
            if len(kept) > 1:
                kept[-1] = [*kept[-1], *new]
            else:
                kept.append(new)
        self._check_fence()
        recorded = self._recorded_locked(tenant)  # after keeping `drafts`: loading it reads the log's tail
        written: list[Change] = []
        while kept:
            try:
                self.store.write(tenant, kept[0], self._epoch[tenant])
            except StoreFenced:
                self._renumber_locked(tenant, kept)
                continue
            changes = kept.pop(0)
            for change in changes:
                recorded.note(change)
            self._head[tenant] = changes[-1].seq
            self._ring.setdefault(tenant, deque(maxlen=self.memory)).extend(changes)
            written += changes
        self._unwritten.pop(tenant, None)
        return written[len(written) - len(new):]

    def _renumber_locked(self, tenant: str, kept: list[list[Change]]) -> None:
        """Number the `kept` changes after the store's newest, as one segment, where another log's segment of the same
        epoch took their first segment's name (`ChangeStore.write`'s `StoreFenced`; logs of two epochs never share a
        name): its write landed first, and this log, which holds the store, writes after it (refusing each write, it
        wrote nothing more for the tenant). Raises where this log is fenced (a read of the lease made now) or has no
        fence (then no other log may write its store). Revisions stay: a catalog
        change's is that of the file already written. Numbered past the refused name even where the store's listing
        does not show it yet (an object store's cached listing): numbered after that listing alone, the same name was
        refused again, for good, the log's lock held."""
        if self.fence is None:
            raise StoreFenced(f"changes of tenant {tenant} were written by another log on this store: give each "
                              "service its own store") from None
        self.fence(fresh=True)
        first = max(self.store.last_seq(tenant), kept[0][0].seq) + 1
        changes = [change for segment in kept for change in segment]
        kept[:] = [[change.model_copy(update={"seq": first + i}) for i, change in enumerate(changes)]]
        log.warning("event=change_renumbered tenant=%s first=%d count=%d: a fenced service's change took their "
                    "numbers in the takeover window", tenant, first, len(changes))

    def _check_fence(self) -> None:
        """Raise (`fence`) unless this log may write the store now."""
        if self.fence is not None:
            self.fence()

    def reserve(self, tenant: str, at_least: int) -> None:
        """Continue the tenant's sequence after `at_least` (revisions already on the store: the change of a catalog
        entry written just before a crash, whose log segment was lost, is recorded at the entry's revision:
        `serve_apps.backend.record_lost_catalog_changes`)."""
        with self._lock:
            self._head[tenant] = max(self._head_locked(tenant), at_least)

    # ---- recorded marks ---------------------------------------------------------------------
    def recorded(self, tenant: str) -> dict[str, Mark] | None:
        """Each twin's `Mark` as last written to the log (a twin missing: none recorded since its creation, so
        revision 0 without drift); None for a log from before the marks, whose twins are then assumed recorded up
        to their current state (`adopt`)."""
        with self._lock:
            recorded = self._recorded_locked(tenant)
            return dict(recorded.marks) if recorded.exact else None

    def recorded_mark(self, tenant: str, asset_id: str) -> Mark | None:
        """One twin's `Mark` as last written (`recorded`); None when not known (a log from before the marks)."""
        with self._lock:
            recorded = self._recorded_locked(tenant)
            return recorded.marks.get(asset_id, (0, False) if recorded.exact else None)

    def recorded_jobs(self, tenant: str) -> JobMarks | None:
        """The jobs whose change the log wrote since its floor, and the floor (`Recorded.jobs`, `Recorded.jobs_floor`);
        None for a log whose checkpoint is from before them (or that has none usable), until `adopt_jobs`."""
        with self._lock:
            recorded = self._recorded_locked(tenant)
            return None if recorded.jobs is None else JobMarks(dict(recorded.jobs), recorded.jobs_floor)

    def settle_jobs(self, tenant: str) -> None:
        """This run's catch-up of the tenant's jobs is done (`serve_apps.backend.Backend._catch_up_jobs`): from the next
        job change written on, the floor follows the newest job (`Recorded.note_jobs`). Not at once: a caught-up change
        whose write failed is written ahead of that next one, never skipped by a floor that moved first."""
        with self._lock:
            self._recorded_locked(tenant).jobs_settled = True

    def adopt_jobs(self, tenant: str, ended: JobEnds) -> None:
        """Take the jobs that `ended` as recorded, making the log's jobs known (`recorded_jobs`) where they were not:
        what it had lost of them before stays lost, as before the marks named jobs."""
        with self._lock:
            recorded = self._recorded_locked(tenant)
            if recorded.jobs is None:
                recorded.note_jobs(ended)
                recorded.dirty = True

    def adopt(self, tenant: str, marks: dict[str, Mark]) -> None:
        """Take `marks` (the twins' current states) as recorded for the twins the log has written nothing about since
        this start, making a log from before the marks exact: checkpointed from then on. What it had lost before
        stays lost: that log cannot tell."""
        with self._lock:
            recorded = self._recorded_locked(tenant)
            for asset_id, mark in marks.items():
                recorded.marks.setdefault(asset_id, mark)
            recorded.exact = recorded.dirty = True

    def checkpoint(self, force: bool = False) -> None:
        """Write the marks of each tenant whose marks changed, at most every `checkpoint_s` (`force`: now, as on a
        clean close). Snapshots are taken under the log's lock (a dict copy), written outside it; a failed write is
        logged and tried again at the next call, never failing an append. None while fenced, where one would replace
        the successor's, nor while the fence is not known (the lease unread: the marks stay dirty for the next pass).
        The fence is asked from a read of the lease made now (`fresh`), when marks are due: a verdict up to a second
        old (`serve_apps.backend.FENCE_CHECK_S`) let a backend closed within a second of a takeover write its marks
        over the successor's."""
        with self._checkpoint_lock:
            now = time.monotonic()
            with self._lock:
                if not self._due_locked(force, now):
                    return
            if fenced(self.fence, unknown=True, fresh=True):
                return
            with self._lock:
                due = {t: (r.seq, r.generation, dict(r.marks), None if r.jobs is None else dict(r.jobs), r.jobs_floor)
                       for t, r in self._due_locked(force, now).items()}
                for t in due:
                    self._recorded[t].dirty, self._recorded[t].saved_at = False, now
            for tenant, (seq, generation, marks, jobs, floor) in due.items():
                try:
                    self.store.write_marks(tenant, seq, generation, marks, jobs, floor)
                except Exception as exc:  # noqa: BLE001 - the log is durable; the next pass writes the marks
                    log.warning("event=change_marks_checkpoint_failed tenant=%s error=%s: %s", tenant,
                                type(exc).__name__, exc)
                    with self._lock:
                        self._recorded[tenant].dirty = True

    def _due_locked(self, force: bool, now: float) -> dict[str, Recorded]:
        """The marks `checkpoint` writes at `now`: changed since written, and last written `checkpoint_s` ago (`force`:
        however recently). Asked before the fence too, so that the store watch's passes with nothing to write read no
        lease."""
        return {t: r for t, r in self._recorded.items()
                if r.exact and r.dirty and (force or now - r.saved_at >= self.checkpoint_s)}

    def _recorded_locked(self, tenant: str) -> Recorded:
        if tenant not in self._recorded:
            self._head_locked(tenant)  # read before the shards apply a batch (`recorded_mark`): numbering its changes
            # then reads no store, which may fail after the batch was applied, and the changes are kept
            self._recorded[tenant] = self._load_recorded(tenant)
        return self._recorded[tenant]

    def _load_recorded(self, tenant: str) -> Recorded:
        """The tenant's marks: its checkpoint and the log's changes after it; without a usable checkpoint, exact
        only for a log with no change yet."""
        try:
            saved = self.store.read_marks(tenant)
            recorded = None if saved is None else Recorded(
                {a: (int(r), bool(d)) for a, (r, d) in saved["twins"].items()}, int(saved["seq"]), saved["generation"],
                jobs=None if saved.get("jobs") is None else {
                    j: datetime.fromisoformat(t) for j, t in saved["jobs"].items()}, jobs_floor=_floor(saved))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("event=change_marks_unreadable tenant=%s error=%s", tenant, exc)
            recorded = None
        if recorded is not None:
            if self._follow_tail(tenant, recorded):
                return recorded
            log.warning("event=change_marks_not_of_log tenant=%s seq=%d generation=%s: the checkpoint's newest change "
                        "is not in the log (a restored store, retention); its twins are taken as recorded up to "
                        "their current state", tenant, recorded.seq, recorded.generation)
        last = self.store.read(tenant, max(self.store.last_seq(tenant) - 1, 0), 1)
        if last:
            return Recorded(seq=last[0].seq, generation=last[0].generation, exact=False)
        return self._first_marks(tenant)

    def _first_marks(self, tenant: str) -> Recorded:
        """The marks of a log with no change yet, checkpointed at once (once per tenant): a log without a checkpoint
        is one from before the marks, which a crash before the first periodic checkpoint would make this one."""
        recorded = Recorded(jobs={})
        try:
            self._check_fence()  # (it may be the successor's log's first checkpoint by now)
            self.store.write_marks(tenant, 0, None, {}, {}, None)
        except Exception as exc:  # noqa: BLE001 - the next `checkpoint` writes it
            log.warning("event=change_marks_checkpoint_failed tenant=%s error=%s: %s", tenant, type(exc).__name__, exc)
            recorded.dirty = True
        return recorded

    def _follow_tail(self, tenant: str, recorded: Recorded) -> bool:
        """Apply the changes after `recorded.seq` to it; False when the log does not hold its change `seq` of its
        generation (the checkpoint is of another log)."""
        after = recorded.seq
        if after > 0:
            first = self.store.read(tenant, after - 1, 1)
            if not first or (first[0].seq, first[0].generation) != (after, recorded.generation):
                return False
        while page := self.store.read(tenant, after, TAIL_PAGE):
            for change in page:
                recorded.note(change)
            after = page[-1].seq
        recorded.dirty = False
        return True

    # ---- reading ----------------------------------------------------------------------------
    def head(self, tenant: str) -> int:
        """The tenant's newest sequence number (0: no changes yet)."""
        with self._lock:
            return self._head_locked(tenant)

    def heads(self, tenants: list[str]) -> dict[str, int]:
        with self._lock:
            return {t: self._head_locked(t) for t in tenants}

    def read(self, tenant: str, after: int, limit: int) -> ChangePage:
        """Up to `limit` changes with seq > `after` from memory, oldest first; `fell_behind` when
        `after` is older than the memory window (read those from `self.store`)."""
        with self._lock:
            head = self._head_locked(tenant)
            ring = self._ring.get(tenant)
            oldest = ring[0].seq if ring else None
            if after >= head:
                return ChangePage(changes=[], head=head, oldest=oldest)
            if oldest is not None and after + 1 >= oldest:
                start = after + 1 - oldest
                return ChangePage(changes=list(islice(ring, start, start + limit)), head=head, oldest=oldest)
            return ChangePage(changes=[], head=head, oldest=oldest, fell_behind=True)

    def _head_locked(self, tenant: str) -> int:
        """The tenant's head, read from the store at first; and the epoch its segments are named with: this log's,
        or the newest segment's where that is higher (a store whose lease was lost started its epochs again at 1:
        named with that, every change of this log would be superseded by the older ones)."""
        if tenant not in self._head:
            newest = self.store.newest(tenant)
            self._head[tenant] = 0 if newest is None else newest.last
            self._epoch[tenant] = max(self.epoch, 0 if newest is None else newest.epoch)
        return self._head[tenant]


class Segment(NamedTuple):
    """A segment of the log on the store, by its name: its first and last change numbers and the lease epoch of the
    log that wrote it (0: named without one, written before epochs were, or by a log without a lease)."""

    first: int
    last: int
    epoch: int
    path: str


def _segment(path: str) -> Segment:
    """The `Segment` a path names: ``{first}-{last}.jsonl`` or ``{first}-{last}-e{epoch}.jsonl``."""
    first, last, *epoch = path.rsplit("/", 1)[1].removesuffix(".jsonl").split("-")
    return Segment(int(first), int(last), int(epoch[0].removeprefix("e")) if epoch else 0, path)


class _Folders:
    """A tenant's folders of segments for one walk, each listed once when first needed, and the rule that leaves a
    segment out (module docstring, "Segments of two logs")."""

    def __init__(self, store: ChangeStore, tenant: str):
        self.store, self.parts = store, store._ls(f"{store.root}/{tenant}")
        self.numbers = [int(p.rsplit("/", 1)[1]) for p in self.parts]
        self._segments: dict[int, list[Segment]] = {}
        self._starts: dict[int, dict[int, int]] = {}  # folder index -> epoch -> its earliest first number there
        self._bars: dict[tuple[int, int, int], float] = {}  # (folder, folder after the last, epoch) -> `served`'s bar

    def segments(self, i: int) -> list[Segment]:
        """Folder `i`'s segments, in order."""
        if i not in self._segments:
            self._segments[i] = sorted(map(_segment, self.store._ls(self.parts[i])))
            self._starts[i] = {}
            for s in reversed(self._segments[i]):
                self._starts[i][s.epoch] = s.first
        return self._segments[i]

    def served(self, i: int, segment: Segment) -> bool:
        """Whether `segment`, of folder `i`, is served: no segment of a higher epoch begins at or before its last
        number, looked for in folder `i`, the one before it (where its successor's first may lie) and those up to
        its last number's."""
        key = (i, bisect_right(self.numbers, segment.last // PARTITION), segment.epoch)
        if key not in self._bars:
            self._bars[key] = min((first for j in range(max(i - 1, 0), key[1]) if self.segments(j)
                                   for epoch, first in self._starts[j].items() if epoch > segment.epoch),
                                  default=math.inf)
        return segment.last < self._bars[key]


class ChangeStore:
    """The log's segments on the store. The backend's `ChangeLog` writes them; anyone reads them:
    a stream replaying history reads them in its Ingress replica, not through the one backend."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = filesystem(url, storage_options)
        self._folders: set[str] = set()

    @store_io("write")
    def write(self, tenant: str, changes: list[Change], epoch: int = 0) -> None:
        """Write a segment of lease `epoch` (0: none, the name without it), never over another: created only where its
        name is free (`write_once`, an exclusive create on local disk and S3 alike), or found holding these very bytes
        (an earlier try that landed: `ChangeLog` writes a segment again as it was). `StoreFenced` where another log's
        segment holds the name: one of the same epoch (or none) must not replace this one's changes."""
        first, last = changes[0].seq, changes[-1].seq
        folder = f"{self.root}/{tenant}/{first // PARTITION:010d}"
        if folder not in self._folders:  # once per folder: on S3 each makedirs is a request
            self.fs.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        name = f"{first:016d}-{last:016d}" + (f"-e{epoch}" if epoch else "")
        path, data = f"{folder}/{name}.jsonl", "".join(c.model_dump_json() + "\n" for c in changes)
        try:
            write_once(self.fs, path, data.encode())
        except FileExistsError:
            if self.fs.cat_file(path) != data.encode():
                raise StoreFenced(f"changes {first}-{last} of tenant {tenant} are another log's (a service that took "
                                  "the store over numbers them): this log writes none of them") from None

    @store_io("read")
    def read(self, tenant: str, after: int, limit: int) -> list[Change]:
        """Up to `limit` changes with seq > `after`, oldest first."""
        out: list[Change] = []
        for segment in self._segments(tenant, after + 1):
            if segment.last <= after:
                continue
            for line in self.fs.cat_file(segment.path).splitlines():
                change = Change.model_validate_json(line)
                if change.seq > after:  # (and once: segments an older version wrote again renumbered overlap)
                    out.append(change)
                    after = change.seq
                    if len(out) == limit:
                        return out
        return out

    @store_io("write")
    def write_marks(self, tenant: str, seq: int, generation: str | None, marks: dict[str, Mark],
                    jobs: JobEnds | None, jobs_floor: datetime | None) -> None:
        """Checkpoint the tenant's recorded marks (`Recorded`: its twins', its jobs' or null where not known, and the
        jobs' floor) as of change `seq` of `generation` (`replace_file` creates the tenant's folder where the log has
        none yet)."""
        ended = None if jobs is None else {j: t.isoformat() for j, t in jobs.items()}
        replace_file(self.fs, f"{self.root}/{tenant}/{MARKS_FILE}", json.dumps(
            {"seq": seq, "generation": generation, "twins": marks, "jobs": ended,
             "jobs_floor": None if jobs_floor is None else jobs_floor.isoformat()}, separators=(",", ":")).encode())

    @store_io("read")
    def read_marks(self, tenant: str) -> dict[str, Any] | None:
        """The tenant's checkpoint (`write_marks`; one from before jobs were named lacks "jobs", one from before their
        floor was kept "jobs_floor"), None without one;
        ValueError for one unreadable as one."""
        path = f"{self.root}/{tenant}/{MARKS_FILE}"
        if not self.fs.exists(path):
            return None
        saved = json.loads(self.fs.cat_file(path))
        if not isinstance(saved, dict) or not {"seq", "generation", "twins"} <= saved.keys():
            raise ValueError(f"{path} is no checkpoint of recorded marks")
        return saved

    @store_io("read")
    def first_seq(self, tenant: str) -> int:
        """The oldest change kept (1 unless the retention removed older ones; head + 1 for an empty log)."""
        for segment in self._segments(tenant, 0):
            return segment.first
        return self.last_seq(tenant) + 1

    @store_io("write")
    def prune(self, tenant: str, before: datetime) -> int:
        """Delete the tenant's directories whose newest change is older than `before`, oldest first,
        stopping at the first younger one and never deleting the newest; returns the last sequence
        number removed (0: none)."""
        parts = self._ls(f"{self.root}/{tenant}")
        removed = 0
        for part in parts[:-1]:
            segments = self._ls(part)
            newest = Change.model_validate_json(self.fs.cat_file(segments[-1]).splitlines()[-1]) if segments else None
            if newest is not None and newest.time >= before:
                break
            self.fs.rm(part, recursive=True)
            self._folders.discard(part)
            removed = newest.seq if newest is not None else removed
        return removed

    def last_seq(self, tenant: str) -> int:
        """The newest change's number (0: none)."""
        newest = self.newest(tenant)
        return 0 if newest is None else newest.last

    @store_io("read")
    def newest(self, tenant: str) -> Segment | None:
        """The served segment reaching furthest (None: no change), from the newest folder holding one: a writer killed
        between a new folder's creation and its first segment (local disk; object stores have no empty folders) left
        it empty, and read as an empty log, the sequence started again at 1 over the numbers already given."""
        folders = _Folders(self, tenant)
        for i in reversed(range(len(folders.parts))):  # the folder's segments, and the one before's reaching into it
            reach = folders.numbers[i] * PARTITION
            served = [s for j in (i - 1, i) if j >= 0 for s in folders.segments(j)
                      if s.last >= reach and folders.served(j, s)]
            if served:
                return max(served, key=lambda s: (s.last, s.epoch))
        return None

    def _segments(self, tenant: str, seq: int) -> Iterator[Segment]:
        """The segments served that hold changes from `seq` on (`last` >= `seq`), in order (`_Folders.served`). A
        segment lies in the folder of its first change, so the folder before `seq`'s may hold one that reaches past
        it. Folders are listed as the walk reaches them: a read of the newest changes lists two or three."""
        folders = _Folders(self, tenant)
        for i in range(max(bisect_right(folders.numbers, seq // PARTITION) - 2, 0), len(folders.parts)):
            yield from (s for s in folders.segments(i) if s.last >= seq and folders.served(i, s))

    def _ls(self, folder: str) -> list[str]:
        if not self.fs.exists(folder):
            return []
        paths = (p.rstrip("/") for p in self.fs.ls(folder, detail=False))
        # hidden: what a killed writer left, the marks' checkpoint
        return sorted(p for p in paths if not p.rsplit("/", 1)[1].startswith("."))
