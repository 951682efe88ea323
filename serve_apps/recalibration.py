"""The drift -> recalibration trigger: latched drift alarms become bounded, coalesced calibration jobs.

The `Recalibrator` reads each tenant's change log (`serve_apps.changes`) from a durable cursor: a
``twin.drift`` change that raises the flag, for an asset type with an enabled policy
(`raytwin.recalibration`), becomes a pending trigger unless the twin is cooling down or already
covered by a pending or running calibration. Per asset type at most `max_concurrent_jobs`
calibrations run; while more than one slot is free the strongest alarm gets a job of its own, and
the last free slot takes every other pending trigger of the type as *one* calibration (on the
strongest of them, its evidence naming all), so 1,000 twins latching at once start at most
`max_concurrent_jobs` jobs and later latches wait as one pending calibration per type.

Restart-safe: the cursor, the pending triggers and the running jobs (each with its candidate
version, reserved before launch) are one JSON document per tenant, saved before anything
acts on it, as a new revision (`raytwin.revisions`: created only where its number is free).
A restarted backend relaunches the running jobs (`sweeps.recalibration.recalibrate`
finishes a candidate a crashed attempt registered instead of calibrating again) and reads the
changes after the cursor from the store, so a trigger is neither lost nor run twice. So does a service that took the
store over from another: the fenced one (`Recalibrator.fence`, the store's lease read before each write of the
document: a job's end or relaunch, a trigger admitted or dropped, a launch) then records no job's end, admits no
trigger and launches nothing, so the document is the successor's alone (its task still running
there ends unrecorded: the successor's relaunch finishes the job). That lease read and the save are two operations;
a takeover between them (the takeover window) is caught by the save itself, conditional on the revision this service
read: the fenced service cannot put back its older state (before, a successor restarted before its next save resumed
from it, read the changes after its older cursor again and ran their calibration a second time). A save that finds the
document moved on (`DocumentMoved`) has its act redone on the document as stored (`Recalibrator._redo`): the fenced
service's fresh lease read then stops it; a successor whose first save found a fenced save (of just before the
takeover) landed after its read acts on that one, relaunching the job that save launched.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raytwin.recalibration import DriftTrigger, RecalibrationPolicy
from raytwin.revisions import DocumentMoved, Revisions
from raytwin.statestore import FenceCheck, fenced
from raytwin.storage import canonical_json, filesystem, scrub_locations
from serve_apps.changes import Change

log = logging.getLogger("raytwin.serve.recalibration")
KEEP_FINISHED = 100
"""Finished jobs kept per tenant in the state document (outcomes are also in the lifecycle log)."""
MAX_ATTEMPTS = 3
"""Launches of one job, relaunches after a restart, a lost worker or node or a store outage included: then it fails."""
LAUNCH_RETRY_S = 30.0
"""How long a job whose launch met a store outage waits, times its launches so far, before it is launched again: an
S3 brownout or a full disk freed passes in seconds to minutes, and the twin stays latched (no new trigger comes)."""


class RecalJob(BaseModel):
    """One calibration the trigger launched (or will relaunch after a restart)."""

    model_config = ConfigDict(extra="ignore")  # a stored document: one a newer version wrote still loads
    job_key: str
    tenant: str
    model_ref: str = Field(description="The drifting twins' model, name@version")
    asset_id: str = Field(description="The twin whose window is fitted (the strongest alarm of the group)")
    candidate_version: str
    triggers: list[DriftTrigger]
    started: float = Field(description="Trigger clock (epoch s) at launch")
    window_end: datetime | None = Field(None, description="Event time the fitted window ends at (latch + settle_s)")
    attempts: int = Field(1, description="Launches so far (relaunches after a restart or a lost worker count)")
    state: Literal["running", "succeeded", "failed"] = "running"
    finished: float | None = None
    run_id: str | None = None
    candidate: str | None = None
    error: str | None = None


class TenantState(BaseModel):
    """A tenant's trigger state, stored as one document (see module docstring)."""

    model_config = ConfigDict(extra="ignore")  # as `RecalJob`: a rollback to an older version must still start
    cursor: int = Field(0, description="The last change-log sequence number acted on")
    pending: dict[str, list[DriftTrigger]] = Field(default_factory=dict, description="model ref -> triggers")
    running: dict[str, RecalJob] = Field(default_factory=dict)
    finished: list[RecalJob] = Field(default_factory=list)
    covered: dict[str, float] = Field(default_factory=dict,
                                      description="asset id -> when the last calibration covering it started")


Policies = Callable[[str, str], RecalibrationPolicy | None]
"""(tenant, type name) -> the policy, or None."""
Later = Callable[[float, Callable[[], None]], Callable[[], None]]
"""Run a function after that many seconds, on another thread; returns what cancels it."""
Launch = Callable[[RecalJob, RecalibrationPolicy], None]
"""Start the job's calibration; it reports back through `Recalibrator.finish` (an exception: it failed to start)."""
ChooseVersion = Callable[[str, str, set[str]], str]
"""(tenant, model ref, versions reserved by running jobs) -> the candidate's version."""
ReadChanges = Callable[[str, int], list[Change]]
"""(tenant, after) -> the tenant's recorded changes after that sequence number, in order (a page)."""
SAVE_EVERY = 10_000
"""Changes without triggers between cursor writes (a restart re-reads at most these)."""
REDO = 3
"""Tries of one act whose save found the tenant's document moved on (`Recalibrator._redo`)."""


def trigger_of(change: Change) -> DriftTrigger | None:
    """The drift trigger a change carries: a ``twin.drift`` change that raised the flag."""
    if change.kind != "twin.drift" or not change.data.get("drift"):
        return None
    d = change.data

    def finite(x: Any) -> float | None:  # a diverged filter reports NaN or infinite statistics
        return float(x) if isinstance(x, int | float) and math.isfinite(x) else None

    return DriftTrigger(seq=change.seq, asset_id=change.asset_id, type_name=change.type_name,
                        type_version=change.type_version, event_time=d.get("event_time"), revision=change.revision,
                        drift_score=finite(d.get("drift_score")) or 1.0, nis_mean=finite(d.get("nis_mean")),
                        nis_last=finite(d.get("nis_last")))


def _timer(delay_s: float, fn: Callable[[], None]) -> Callable[[], None]:
    timer = threading.Timer(delay_s, fn)
    timer.daemon = True
    timer.start()
    return timer.cancel


def _take_pending(state: TenantState, model_ref: str, taken: list[DriftTrigger]) -> None:
    """Remove `taken` from the model's pending triggers (the rest in sequence order; none left: the entry)."""
    rest = sorted((t for t in state.pending[model_ref] if t not in taken), key=lambda t: t.seq)
    if rest:
        state.pending[model_ref] = rest
    else:
        del state.pending[model_ref]


class Recalibrator:
    """Turns drift changes into calibration jobs under the tenants' policies (one per backend)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, policies: Policies, launch: Launch,
                 choose_version: ChooseVersion, read: ReadChanges, clock: Callable[[], float] = time.time,
                 later: Later = _timer, fence: FenceCheck | None = None):
        """`fence`: raises `StoreFenced` once another service took the store over (`Backend.check_writable`): this one
        then acts on no job's end or relaunch (`_fenced`, which asks it from a read of the store's lease made now)."""
        self.fs, self.root = filesystem(url, storage_options)
        self.fence = fence
        self.policies, self.launch, self.choose_version, self.clock = policies, launch, choose_version, clock
        self.read, self.later = read, later
        self._lock = threading.RLock()
        self._retries: dict[tuple[str, str], Callable[[], None]] = {}  # (tenant, job) -> cancels its deferred launch
        self._states: dict[str, TenantState] = {}
        self._revision: dict[str, int] = {}  # tenant -> revision of its document that `_states` holds
        self._saved: dict[str, int] = {}  # tenant -> cursor on the store
        self._reached: dict[tuple[str, str], datetime] = {}  # (tenant, asset) -> newest event time seen changed
        self._scores: dict[tuple[str, str], float] = {}  # (tenant, asset) -> highest drift score of this episode

    # ---- state ---------------------------------------------------------------------------
    def _document(self, tenant: str) -> Revisions:
        """The tenant's state document: ``{root}/{tenant}/trigger-state/{revision}.json`` (``trigger-state.json``
        before it had revisions)."""
        folder = f"{self.root}/{tenant}/trigger-state"
        return Revisions(self.fs, folder, legacy=f"{folder}.json")

    def state(self, tenant: str) -> TenantState:
        with self._lock:
            if tenant not in self._states:
                revision, body = self._document(tenant).read()
                self._states[tenant] = TenantState() if body is None \
                    else TenantState.model_validate_json(body)  # none: from the log's start, nothing is skipped
                self._revision[tenant], self._saved[tenant] = revision, self._states[tenant].cursor
            return self._states[tenant]

    def snapshot(self, tenant: str) -> TenantState:
        """A copy of the tenant's pending, running and recently finished recalibrations."""
        with self._lock:
            return self.state(tenant).model_copy(deep=True)

    def _save(self, tenant: str) -> None:
        """Save the tenant's state as the revision after the one it holds (whole or not at all: a new file);
        `DocumentMoved` where another service saved the document since, whose state then replaces it here."""
        state, revision = self._states[tenant], self._revision[tenant] + 1
        try:
            self._document(tenant).write(revision, canonical_json(state.model_dump(mode="json")))
        except DocumentMoved as exc:
            log.warning("event=recalibration_state_moved tenant=%s revision=%d: %s; the act is redone on the state "
                        "as stored", tenant, revision, exc)
            del self._states[tenant]  # read again by `state`
            raise
        self._revision[tenant], self._saved[tenant] = revision, state.cursor

    def _redo(self, tenant: str, act: Callable[[], None]) -> None:
        """Run `act` on the tenant's state, and again, at most `REDO` tries, where its save found the document moved
        on (`_save`). Before each try the running jobs of the stored document this service has not launched are
        relaunched (`_relaunch`), as a restart does: a save of another service that landed after this one read the
        document launched them (a fenced service's, of just before the takeover). Where this service is the fenced
        one, its fresh lease read refuses those relaunches and the act (`_fenced`)."""
        with self._lock:
            launched = set(self.state(tenant).running)
            for _ in range(REDO):
                try:
                    for job_key in sorted(self.state(tenant).running.keys() - launched):
                        launched.add(job_key)
                        self._relaunch(tenant, job_key, "another service saved the state, running it, after it was "
                                                        "read here")
                    act()
                    return
                except DocumentMoved:
                    continue
            log.warning("event=recalibration_state_contended tenant=%s tries=%d: the document moved on at each save; "
                        "the next poll, end or restart acts again", tenant, REDO)

    # ---- acting ----------------------------------------------------------------------------
    def resume(self, tenant: str) -> None:
        """After a restart: relaunch the running jobs, then act on the changes recorded after the cursor."""
        with self._lock:
            for job_key in list(self.state(tenant).running):
                self.relaunch(tenant, job_key, "the backend restarted")
        self.poll(tenant)

    def relaunch(self, tenant: str, job_key: str, why: str) -> None:
        """Launch a running job again (`recalibrate` finishes a candidate an earlier attempt registered):
        after a restart, or when its task was lost with its worker or node; at most `MAX_ATTEMPTS` launches,
        counted before each, so a job that kills its worker every time fails instead of looping."""
        self._redo(tenant, lambda: self._relaunch(tenant, job_key, why))

    def _relaunch(self, tenant: str, job_key: str, why: str) -> None:
        with self._lock:
            state = self.state(tenant)
            job = state.running.get(job_key)
            if job is None or self._fenced(tenant, job_key, f"relaunch ({why})"):
                return
            if job.attempts >= MAX_ATTEMPTS:
                self._finish(tenant, job_key, error=f"{why}; gave up after {job.attempts} attempts")
                return
            job = state.running[job_key] = job.model_copy(update={"attempts": job.attempts + 1})
            self._save(tenant)
            log.info("event=recalibration_relaunch tenant=%s job=%s attempt=%d why=%r", tenant, job_key,
                     job.attempts, why)
            self._start(state, job)

    def poll(self, tenant: str) -> None:
        """Act on every change the tenant's log recorded after the cursor, in sequence order."""
        self._redo(tenant, lambda: self._poll(tenant))

    def _poll(self, tenant: str) -> None:
        with self._lock:
            while changes := self.read(tenant, self.state(tenant).cursor):
                self._observe(tenant, changes)

    def _observe(self, tenant: str, changes: Iterable[Change]) -> None:
        """Act on a page of the tenant's changes in order; those at or before the cursor are ignored."""
        with self._lock:
            state = self.state(tenant)
            news = sorted((c for c in changes if c.seq > state.cursor), key=lambda c: c.seq)
            if not news:
                return
            admitted = False
            for change in news:
                key = (tenant, change.asset_id)
                if (at := change.data.get("event_time")) and change.kind in ("twin.state", "twin.drift"):
                    self._reached[key] = max(datetime.fromisoformat(at) if isinstance(at, str) else at,
                                             self._reached.get(key, datetime.min.replace(tzinfo=UTC)))
                if change.kind == "twin.drift" and not change.data.get("drift"):
                    self._scores.pop(key, None)  # cleared: a later latch counts its own episode's scores
                elif isinstance(score := change.data.get("drift_score"), int | float) and math.isfinite(score):
                    self._scores[key] = max(score, self._scores.get(key, 0.0))
                trigger = trigger_of(change)
                if trigger is not None:
                    admitted |= self._admit(tenant, state, trigger)
            state.cursor = news[-1].seq
            if admitted or state.cursor - self._saved.get(tenant, 0) >= SAVE_EVERY:
                if self._fenced(tenant, "-", "admit"):
                    return
                self._save(tenant)  # the cursor and what it admitted, in one write
            self._pump(tenant, state)

    def finish(self, tenant: str, job_key: str, *, run_id: str | None = None, candidate: str | None = None,
               error: str | None = None) -> None:
        """A job ended: record its outcome and start what waits for its slot."""
        self._redo(tenant, lambda: self._finish(tenant, job_key, run_id=run_id, candidate=candidate, error=error))

    def _finish(self, tenant: str, job_key: str, *, run_id: str | None = None, candidate: str | None = None,
                error: str | None = None) -> None:
        with self._lock:
            state = self.state(tenant)
            if job_key not in state.running or self._fenced(tenant, job_key, "end"):
                return
            job = state.running.pop(job_key)
            job = job.model_copy(update={"state": "failed" if error else "succeeded", "finished": self.clock(),
                                         "run_id": run_id, "candidate": candidate, "error": error})
            state.finished = [*state.finished, job][-KEEP_FINISHED:]
            self._save(tenant)
            log.info("event=recalibration_%s tenant=%s job=%s candidate=%s run_id=%s error=%s", job.state, tenant,
                     job_key, candidate, run_id, error)
            self._pump(tenant, state)

    def _fenced(self, tenant: str, job_key: str, what: str) -> bool:
        """Whether another service took the store over (`fence`): its backend resumed the tenant's recalibrations from
        the state document (`resume`: it relaunches the running ones), so this one records no job's `what` there and
        launches nothing beside it (logged). From a read of the lease made now: `what` rewrites the document, and a
        verdict up to a second old (`serve_apps.backend.FENCE_CHECK_S`) let a job end or relaunch, or a change the
        fenced log wrote within that second admit a trigger and launch its calibration, over the state the successor
        resumed. Asked only before a write: a poll that admits, drops and launches nothing reads no lease."""
        if not fenced(self.fence, fresh=True):
            return False
        log.warning("event=recalibration_held tenant=%s job=%s what=%r: this service no longer holds its store; the "
                    "service that took it over resumed its recalibrations", tenant, job_key, what)
        return True

    def _admit(self, tenant: str, state: TenantState, trigger: DriftTrigger) -> bool:
        """Add the trigger to its type's pending calibration, unless the policy says no (logged)."""
        policy = self.policies(tenant, trigger.type_name)
        why = None
        if policy is None or not policy.enabled:
            why = "no enabled policy for its asset type"
        elif self.clock() - state.covered.get(trigger.asset_id, -float("inf")) < policy.cooldown_s:
            why = f"cooling down ({policy.cooldown_s:g} s after its last recalibration)"
        elif any(trigger.asset_id in {t.asset_id for t in ts} for ts in state.pending.values()) or any(
                trigger.asset_id in {t.asset_id for t in j.triggers} for j in state.running.values()):
            why = "already covered by a pending or running recalibration"
        if why is not None:
            log.info("event=recalibration_skipped tenant=%s asset_id=%s seq=%d reason=%r", tenant,
                     trigger.asset_id, trigger.seq, why)
            return False
        state.pending.setdefault(f"{trigger.type_name}@{trigger.type_version}", []).append(trigger)
        return True

    def waiting(self, tenant: str) -> bool:
        """Whether triggers wait (for a slot, or for their twin's event time to pass the latch by `settle_s`):
        the backend then polls on every state change, not only on latches."""
        with self._lock:
            return bool(self.state(tenant).pending)

    def _settled(self, tenant: str, trigger: DriftTrigger, policy: RecalibrationPolicy) -> bool:
        """Whether the twin's event time has run `settle_s` past the trigger's latch."""
        if trigger.event_time is None or policy.settle == 0:
            return True
        reached = self._reached.get((tenant, trigger.asset_id))
        return reached is not None and reached >= trigger.event_time + timedelta(seconds=policy.settle)

    def _strong(self, tenant: str, trigger: DriftTrigger, policy: RecalibrationPolicy) -> bool:
        """Whether the alarm reached the policy's `min_drift_score`: checked once the twin settled, against the
        highest score seen while latched (at the latch itself the score is ~1, whatever the fault)."""
        if policy.min_drift_score is None:
            return True
        return max(trigger.drift_score, self._scores.get((tenant, trigger.asset_id), 0.0)) >= policy.min_drift_score

    def _drop(self, tenant: str, state: TenantState, model_ref: str, weak: list[DriftTrigger],
              policy: RecalibrationPolicy) -> None:
        for t in weak:
            log.info("event=recalibration_skipped tenant=%s asset_id=%s seq=%d reason=%r", tenant, t.asset_id, t.seq,
                     f"drift score {max(t.drift_score, self._scores.get((tenant, t.asset_id), 0.0)):.3g} below the "
                     f"policy's {policy.min_drift_score:g}")
        _take_pending(state, model_ref, weak)
        self._save(tenant)

    def _pump(self, tenant: str, state: TenantState) -> None:
        """Start pending calibrations whose twins have settled while their type has free slots (strongest
        alarm first)."""
        for model_ref in sorted(state.pending, key=lambda r: state.pending[r][0].seq):
            type_name = model_ref.partition("@")[0]
            policy = self.policies(tenant, type_name)
            if policy is None or not policy.enabled:
                continue  # the policy went away: keep the triggers until it is back
            while True:
                ready = [t for t in state.pending.get(model_ref, []) if self._settled(tenant, t, policy)]
                if weak := [t for t in ready if not self._strong(tenant, t, policy)]:
                    if self._fenced(tenant, "-", f"drop weak triggers of {model_ref}"):
                        return
                    self._drop(tenant, state, model_ref, weak, policy)
                    ready = [t for t in ready if t not in weak]
                free = policy.max_concurrent_jobs - sum(
                    j.model_ref.partition("@")[0] == type_name for j in state.running.values())
                if not ready or free <= 0:
                    break
                if self._fenced(tenant, "-", f"launch a calibration of {model_ref}"):
                    return
                triggers = sorted(ready, key=lambda t: (-t.drift_score, t.seq))
                group = triggers[:1] if free > 1 else triggers  # the last slot takes all the ready rest
                _take_pending(state, model_ref, group)
                reserved = {j.candidate_version for j in state.running.values() if j.model_ref == model_ref}
                lead = group[0]
                end = None if lead.event_time is None else lead.event_time + timedelta(seconds=policy.settle)
                job = RecalJob(job_key=f"recal-{tenant}-{min(t.seq for t in group)}", tenant=tenant,
                               model_ref=model_ref, asset_id=lead.asset_id,
                               candidate_version=self.choose_version(tenant, model_ref, reserved),
                               triggers=sorted(group, key=lambda t: t.seq), started=self.clock(), window_end=end)
                state.running[job.job_key] = job
                for t in group:
                    state.covered[t.asset_id] = job.started
                self._save(tenant)  # reserved before it runs: a restart relaunches, never re-admits
                self._start(state, job)

    def close(self) -> None:
        """Cancel the deferred launches (the backend stops): their jobs stay running in the state document, so the
        next backend relaunches them (`resume`) instead of this one failing them on its way down."""
        with self._lock:
            for cancel in self._retries.values():
                cancel()
            self._retries.clear()

    def _start(self, state: TenantState, job: RecalJob) -> None:
        policy = self.policies(job.tenant, job.model_ref.partition("@")[0])
        try:
            if policy is None:
                raise RuntimeError("its policy was removed")
            self.launch(job, policy)
        except Exception as exc:  # a job that cannot start fails; the trigger never stops
            from serve_apps.store_errors import store_outage  # here: the SDK imports this module, without FastAPI

            error = scrub_locations(f"{type(exc).__name__}: {exc}")[:500]
            if (store_outage(exc) or isinstance(exc, TimeoutError)) and job.attempts < MAX_ATTEMPTS:
                self._defer(job, error)
                return
            log.exception("event=recalibration_launch_failed tenant=%s job=%s", job.tenant, job.job_key)
            self._finish(job.tenant, job.job_key, error=error)
            return
        log.info("event=recalibration_started tenant=%s job=%s model=%s asset_id=%s triggers=%d candidate=%s",
                 job.tenant, job.job_key, job.model_ref, job.asset_id, len(job.triggers), job.candidate_version)

    def _defer(self, job: RecalJob, error: str) -> None:
        """Launch `job` again later (`relaunch`): the store failed its launch (its window's read or write, its audit
        intent), or the twin's shard left its state reads unanswered within `shard_read_timeout_s` (a `TimeoutError`:
        hung or stalled), which says nothing of the fit. Failing it would lose the trigger, for the twin stays
        latched."""
        delay_s = LAUNCH_RETRY_S * job.attempts
        log.warning("event=recalibration_launch_deferred tenant=%s job=%s attempt=%d retry_in_s=%g error=%r", job.tenant,
                    job.job_key, job.attempts, delay_s, error)
        key = (job.tenant, job.job_key)

        def retry() -> None:
            with self._lock:
                if self._retries.pop(key, None) is None:
                    return  # cancelled meanwhile (`close`)
                self.relaunch(job.tenant, job.job_key, f"its launch met a store outage: {error}")

        self._retries[key] = self.later(delay_s, retry)


