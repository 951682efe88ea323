"""Drift-triggered recalibration without Ray: policy validation, and the trigger (`serve_apps.recalibration`)
driven by change-log pages and a fake clock: storms bounded and coalesced, cooldowns, restarts that
neither lose nor repeat a trigger, and old lifecycle records keeping their hashes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from raytwin.recalibration import PolicyError, PolicyStore, RecalibrationPolicy
from serve_apps.changes import Change
from serve_apps.recalibration import RecalJob, Recalibrator

T0 = datetime(2026, 2, 1, tzinfo=UTC)
POLICY = RecalibrationPolicy(free=["R_io"], max_concurrent_jobs=2, cooldown_s=3600.0, settle_s=0.0)


@pytest.mark.parametrize("field, value, message", [
    ("cooldown_s", -1.0, "greater than or equal to 0"),
    ("window_s", 10.0, "greater than or equal to 60"),
    ("window_s", float("inf"), "less than or equal to"),
    ("max_concurrent_jobs", 0, "greater than or equal to 1"),
    ("max_trials", 10_000, "less than or equal to 1000"),
    ("min_drift_score", 0.5, "greater than or equal to 1"),
    ("free", [], "at least 1 item"),
    ("free", ["R_io", "R_io"], "free parameters repeat"),
    ("noise_std", {"T_in": 0.0}, "greater than 0"),
    ("budget", 3, "Extra inputs are not permitted"),
])
def test_policies_with_nonsense_bounds_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValidationError) as err:
        RecalibrationPolicy.model_validate({"free": ["R_io"], field: value})
    assert message in str(err.value) and field in str(err.value)


def test_policy_names_are_checked_against_the_model_and_stored_per_tenant(tmp_path):
    with pytest.raises(PolicyError, match=r"\['R_xx'\] are not parameters of thermal_rc@1.0.0; it has"):
        RecalibrationPolicy(free=["R_xx"]).check_model(["R_io", "C_in"], ["T_in"], "thermal_rc@1.0.0")
    with pytest.raises(PolicyError, match=r"noise_std names \['T_m'\], not outputs"):
        RecalibrationPolicy(free=["R_io"], noise_std={"T_m": 0.1}).check_model(["R_io"], ["T_in"], "thermal_rc@1")
    store = PolicyStore(str(tmp_path))
    store.put("acme", "thermal_rc", POLICY, set_by="key-ops")
    assert store.get("acme", "thermal_rc") == POLICY
    assert store.get_stored("acme", "thermal_rc") == (POLICY, "key-ops")  # its candidates name who set it
    (tmp_path / "acme" / "legacy.json").write_text(POLICY.model_dump_json())  # stored before setters were kept
    assert store.get_stored("acme", "legacy") == (POLICY, None)
    assert store.get("globex", "thermal_rc") is None  # tenants' policies never mix
    (tmp_path / "acme" / "thermal_rc.json").write_text('{"free": ["R_io"], "cooldown_s": -5}')
    with pytest.raises(PolicyError, match="acme/thermal_rc.json is invalid: .*cooldown_s"):
        store.get("acme", "thermal_rc")


class World:
    """A change log, a fake clock and a launcher that records jobs instead of running them."""

    def __init__(self, root, policy: RecalibrationPolicy | None = POLICY):
        self.root, self.policy = root, policy
        self.log: list[Change] = []
        self.now = 1_000_000.0
        self.launched: list[RecalJob] = []
        self.trigger = self.restart()

    def restart(self) -> Recalibrator:
        self.trigger = Recalibrator(
            str(self.root), None, policies=lambda tenant, type_name: self.policy if tenant == "acme" else None,
            launch=lambda job, policy: self.launched.append(job),
            choose_version=lambda tenant, ref, reserved: f"1.0.{len(self.launched) + 1}",
            read=lambda tenant, after: [c for c in self.log if c.seq > after][:50], clock=lambda: self.now)
        return self.trigger

    def drift(self, asset_ids: list[str], score: float = 1.5, raised: bool = True, poll: bool = True) -> None:
        for asset_id in asset_ids:
            self.log.append(Change(
                seq=len(self.log) + 1, kind="twin.drift", time=T0, asset_id=asset_id, type_name="thermal_rc",
                type_version="1.0.0", revision=7, data={
                    "drift": raised, "diverged": False, "nis_mean": 3.0, "nis_last": 9.0,
                    "drift_score": score + len(self.log) / 1e4,
                    "event_time": (T0 + timedelta(hours=len(self.log))).isoformat()}))
            self.log.append(Change(seq=len(self.log) + 1, kind="twin.state", time=T0, asset_id=asset_id,
                                   type_name="thermal_rc", type_version="1.0.0", revision=7))
        if poll:
            self.trigger.poll("acme")

    def finish(self, job: RecalJob) -> None:
        self.trigger.finish("acme", job.job_key, run_id="calibration-20260201T000000Z-00000000",
                            candidate=f"thermal_rc@{job.candidate_version}")


def stored(root) -> tuple[str, str]:
    """The name and content of the tenant's state document as stored: its newest revision, the only one kept."""
    (path,) = (root / "acme" / "trigger-state").iterdir()
    return path.name, path.read_text()


def test_a_latch_starts_one_job_whose_triggers_carry_the_detector_statistics(tmp_path):
    w = World(tmp_path)
    w.drift(["z1"])
    w.drift(["z1"], raised=False)  # a clear is no trigger
    (job,) = w.launched
    (t,) = job.triggers
    assert (job.asset_id, job.model_ref, job.candidate_version) == ("z1", "thermal_rc@1.0.0", "1.0.1")
    assert (t.seq, t.asset_id, t.event_time, t.revision, t.nis_mean, t.nis_last) == (1, "z1", T0, 7, 3.0, 9.0)
    assert t.drift_score == pytest.approx(1.5)
    w.finish(job)
    done = w.trigger.snapshot("acme")
    assert not done.running and not done.pending and done.finished[0].candidate == "thermal_rc@1.0.1"


def test_a_calibration_waits_until_its_twin_ran_settle_s_past_the_latch(tmp_path):
    """A fault precedes its latch by hours: by default the window is the `window_s` after the latch (the
    policy's `settle_s`), so the job starts once the twin's event time got there, and fits up to there."""
    w = World(tmp_path, POLICY.model_copy(update={"settle_s": None, "window_s": 6 * 3600.0}))
    w.drift(["z1"])  # latched at T0
    assert w.launched == [] and w.trigger.waiting("acme")

    def state_change(hours: float) -> None:
        w.log.append(Change(seq=len(w.log) + 1, kind="twin.state", time=T0, asset_id="z1", type_name="thermal_rc",
                            type_version="1.0.0", revision=8, data={"event_time": (T0 + timedelta(hours=hours))
                                                                    .isoformat()}))
        w.trigger.poll("acme")

    state_change(5.9)
    assert w.launched == []
    w.restart()  # what it waits for survives a restart: the trigger is pending on the store
    state_change(6.0)
    (job,) = w.launched
    assert job.window_end == T0 + timedelta(hours=6) and not w.trigger.waiting("acme")
    assert RecalibrationPolicy(free=["R_io"], window_s=3600.0).settle == 3600.0  # null: window_s


def test_a_storm_starts_at_most_max_concurrent_jobs_and_coalesces_the_rest_by_type(tmp_path):
    w = World(tmp_path)
    storm = [f"z{k}" for k in range(1000)]
    w.drift(storm)  # 1,000 latches at once, read in pages of 50
    assert len(w.launched) == 2  # max_concurrent_jobs
    covered = [t.asset_id for j in w.launched for t in j.triggers]
    assert sorted(covered) != sorted(storm)  # the first pages' twins; later latches wait...
    pending = w.trigger.snapshot("acme").pending
    assert list(pending) == ["thermal_rc@1.0.0"]  # ...as one pending calibration per type
    w.drift(["z1", storm[-1]])  # latching again while covered: nothing new
    assert len(w.launched) == 2 and len(w.trigger.snapshot("acme").pending["thermal_rc@1.0.0"]) == 1000 - len(covered)
    w.finish(w.launched[0])  # a slot frees: ONE job covers every waiting twin, on the strongest alarm
    assert len(w.launched) == 3
    last = w.launched[2]
    assert sorted(covered + [t.asset_id for t in last.triggers]) == sorted(storm)
    assert last.asset_id == max(last.triggers, key=lambda t: t.drift_score).asset_id
    assert not w.trigger.snapshot("acme").pending


def test_cooldown_and_disabled_policies_suppress_latches(tmp_path):
    w = World(tmp_path)
    w.drift(["z1"])
    w.finish(w.launched[0])
    w.now += 3599.0
    w.drift(["z1"])  # within the cooldown
    assert len(w.launched) == 1
    w.now += 2.0
    w.drift(["z1"])
    assert len(w.launched) == 2
    w.policy = POLICY.model_copy(update={"min_drift_score": 5.0})
    w.drift(["z9"])  # score 1.5 < 5
    w.policy = None
    w.drift(["z8"])
    assert len(w.launched) == 2


def test_a_restart_neither_loses_nor_repeats_a_trigger(tmp_path):
    w = World(tmp_path, POLICY.model_copy(update={"max_concurrent_jobs": 1}))
    w.drift(["a"])
    w.drift(["b"])  # pending behind a's job
    w.drift(["c"], poll=False)  # recorded in the log, the backend died before acting on it
    (running,) = w.launched
    w.launched.clear()
    w.restart().resume("acme")  # a fresh trigger from the store: relaunches a, reads c after the cursor
    assert [(j.job_key, j.candidate_version) for j in w.launched] == [(running.job_key, running.candidate_version)]
    state = w.trigger.snapshot("acme")
    assert state.cursor == len(w.log) and [t.asset_id for t in state.pending["thermal_rc@1.0.0"]] == ["b", "c"]
    w.restart().resume("acme")  # again: the same job relaunched (it finishes what it registered), no new ones
    assert len(w.launched) == 2 and w.launched[1].job_key == running.job_key
    w.finish(w.launched[1])
    assert [t.asset_id for t in w.launched[2].triggers] == ["b", "c"]  # b and c: one job, each once


def test_a_recalibration_task_starts_only_after_its_audit_intent(tmp_path, monkeypatch):
    """The task (which fits, registers and submits a candidate) was audited as started after it was started: a store
    failing in between left it running with no record. Without its intent no task starts (the launch fails, as any
    launch that fails); started, its intent and its outcome share an action id."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from serve_apps import recalibration_jobs
    from serve_apps.audit import AuditLog
    from serve_apps.store_errors import StoreUnavailable
    from tests.fixtures_serve import AuditWrites

    started = []
    task = SimpleNamespace(remote=lambda work: started.append(work) or SimpleNamespace(future=Future))
    monkeypatch.setattr(recalibration_jobs, "recalibration_task", SimpleNamespace(options=lambda **kw: task))
    w = World(tmp_path)
    w.drift(["a"])
    (job,) = w.launched
    jobs = recalibration_jobs.RecalibrationJobs.__new__(recalibration_jobs.RecalibrationJobs)  # its launch only
    jobs.audit = AuditLog(str(tmp_path / "store"))
    store, jobs.audit.fs = jobs.audit.fs, AuditWrites(jobs.audit.fs, ok=0)
    with pytest.raises(StoreUnavailable, match="recalibration.start of thermal_rc@1.0.0 was not done"):
        jobs._run(job, "the work", T0)
    assert started == []
    jobs.audit.fs = store
    jobs._run(job, "the work", T0)
    assert started == ["the work"]
    intent, outcome = jobs.audit.records("acme")
    assert (intent.action, intent.key_id, intent.phase, outcome.phase) == ("recalibration.start", "system", "intent",
                                                                          "outcome")
    assert intent.action_id == outcome.action_id and intent.details["candidate_version"] == job.candidate_version
    assert outcome.details == {**intent.details, "status": "done"}


def test_a_job_lost_with_its_worker_is_launched_again_at_most_three_times(tmp_path):
    """A task that died with its worker or node (SIGKILL, OOM) says nothing of the fit: launched again,
    a bounded number of times, rather than failed with the drift trigger lost (the twin stays latched)."""
    from concurrent.futures import Future

    import ray

    from serve_apps.audit import AuditLog
    from serve_apps.recalibration_jobs import RecalibrationJobs

    w = World(tmp_path)
    w.drift(["a"])
    (job,) = w.launched
    jobs = RecalibrationJobs.__new__(RecalibrationJobs)  # only its outcome handling, over this trigger
    jobs.trigger, jobs.audit = w.trigger, AuditLog(str(tmp_path / "store"))
    lost = Future()
    lost.set_exception(ray.exceptions.NodeDiedError("the node it was running on is dead"))
    jobs._finished("acme", job.job_key, lost)
    jobs._finished("acme", job.job_key, lost)
    assert [j.job_key for j in w.launched] == [job.job_key] * 3
    assert w.trigger.snapshot("acme").running[job.job_key].attempts == 3
    jobs._finished("acme", job.job_key, lost)
    state = w.trigger.snapshot("acme")
    assert not state.running and len(w.launched) == 3
    assert state.finished[-1].error.endswith("the node it was running on is dead; gave up after 3 attempts")

    w.drift(["b"])
    failed_fit = Future()
    failed_fit.set_exception(ValueError("the window holds 3 usable events"))
    jobs._finished("acme", w.launched[-1].job_key, failed_fit)  # the fit's own failure: final at once
    assert w.trigger.snapshot("acme").finished[-1].error == "ValueError: the window holds 3 usable events"
    audited = [(r.action, r.key_id) for r in jobs.audit.records("acme")]  # the system's actions are audited too
    assert audited == [("recalibration.lost", "system")] * 3 + [("recalibration.fail", "system")]

    w.drift(["c"])
    unreadable = Future()  # a store error names the store's path: the tenant reads the error (audit, GET)
    unreadable.set_exception(FileNotFoundError(2, "No such file or directory", f"{tmp_path}/store/windows/c.parquet"))
    jobs._finished("acme", w.launched[-1].job_key, unreadable)
    said = "FileNotFoundError: [Errno 2] No such file or directory: '<store>'"
    assert w.trigger.snapshot("acme").finished[-1].error == said
    assert jobs.audit.records("acme")[-1].details == {"error": said}


@pytest.mark.parametrize("taken_over", ["before", "within_the_second"])
def test_a_fenced_backend_neither_ends_nor_relaunches_a_recalibration_its_successor_resumed(tmp_path, taken_over):
    """Another service took the store over and resumed the tenant's recalibrations (relaunching the running one): the
    fenced backend's task then ended, or was lost, and it saved the tenant's state document over the successor's
    (the job finished, or relaunched once more beside the successor's). It does neither: the document is the
    successor's, and so are the launches. `within_the_second`: the backend's fence check (`check_writable`) keeps its
    verdict for a second, saying this service holds the store; the trigger asks for a read of the lease made now
    (`fresh`) before either, which says not."""
    from raytwin.statestore import StoreFenced

    w = World(tmp_path)
    w.drift(["z1"])
    (job,) = w.launched
    fenced = w.trigger

    def taken(fresh: bool = False) -> None:
        if fresh or taken_over == "before":
            raise StoreFenced("service b (epoch 2) took the store over")

    fenced.fence = taken
    successor = w.restart()
    successor.resume("acme")  # relaunches the running job: attempt 2
    saved = stored(tmp_path)
    fenced.relaunch("acme", job.job_key, "its task was lost with its worker")
    w.trigger = fenced
    w.finish(job)
    assert stored(tmp_path) == saved
    assert [j.job_key for j in w.launched] == [job.job_key] * 2
    assert successor.snapshot("acme").running[job.job_key].attempts == 2


def test_a_fenced_backend_admits_no_trigger_and_launches_nothing_within_the_second_of_a_takeover(tmp_path):
    """A change the fenced backend's log wrote within a second of a takeover (its fence check's verdict kept that
    long) was polled: its latch admitted, the tenant's state document saved over the successor's and a calibration
    launched beside the successor's service. Each write of the document reads the lease first: none happens."""
    from raytwin.statestore import StoreFenced

    w = World(tmp_path)
    w.drift(["z1"])  # the successor's state, as the fenced one saved it before the takeover
    saved = stored(tmp_path)

    def taken(fresh: bool = False) -> None:
        if fresh:
            raise StoreFenced("service b (epoch 2) took the store over")

    w.trigger.fence = taken
    w.drift(["z2"])
    assert [j.asset_id for j in w.launched] == ["z1"]
    assert stored(tmp_path) == saved


def test_a_fenced_save_in_the_takeover_window_puts_back_no_state_and_runs_no_calibration_twice(tmp_path):
    """The fenced backend read the lease (it held the store), then the successor took over, resumed the tenant and ran
    a calibration; the fenced save (its task's end) then replaced the successor's document with its older state, and
    the successor, restarted before its next save, read that latch again after the older cursor and ran its
    calibration a second time. The save is conditional on the revision read: refused, the end is redone on the
    document as stored, which the fenced backend's next read of the lease stops."""
    from raytwin.statestore import StoreFenced

    w = World(tmp_path)
    w.drift(["z1"])
    (job,) = w.launched
    fenced, reads = w.trigger, []

    def fence(fresh: bool = False) -> None:  # the read before its save finds the store its own, every later one not
        reads.append(fresh)
        if len(reads) > 1:
            raise StoreFenced("service b (epoch 2) took the store over")

    fenced.fence = fence
    w.restart().resume("acme")  # the successor relaunches z1's job...
    w.drift(["z2"])  # ...and runs z2's calibration
    saved = stored(tmp_path)
    w.trigger = fenced
    w.finish(job)
    assert stored(tmp_path) == saved
    w.restart().resume("acme")  # restarted before its next save: relaunches the two, admits nothing again
    assert [(j.asset_id, j.attempts) for j in w.launched] == [("z1", 1), ("z1", 2), ("z2", 1), ("z1", 3), ("z2", 2)]


def test_a_fenced_save_landed_after_its_successor_read_the_state_is_acted_on_not_replaced(tmp_path):
    """The other order: the fenced backend's save (a latch admitted and its calibration launched on a lease read of
    just before the takeover) landed after the successor read the tenant's document. The successor's save, replacing
    it, dropped that job (its end, sent to the fenced backend, was never recorded) and launched the latch's calibration
    again. Its save is refused, and it acts on the document as stored: it relaunches that job, and launches nothing
    for its latch."""
    w = World(tmp_path)
    w.drift(["z1"])
    fenced = w.trigger
    successor = w.restart()
    successor.state("acme")  # read at its start
    w.trigger = fenced
    w.drift(["z2"])  # the fenced backend launches z2's calibration, and its save lands
    w.trigger = successor
    successor.poll("acme")
    assert [(j.asset_id, j.attempts) for j in w.launched] == [("z1", 1), ("z2", 1), ("z2", 2)]
    assert {j.asset_id: j.attempts for j in successor.snapshot("acme").running.values()} == {"z1": 1, "z2": 2}
    assert stored(tmp_path)[0] == f"{5:016d}.json"  # the fenced backend's four saves, then the successor's relaunch


def test_a_state_document_saved_before_revisions_loads_and_is_replaced_by_the_first(tmp_path):
    """A store written before the document had revisions keeps it at ``trigger-state.json``: it is read as revision
    0, and the first save replaces it."""
    w = World(tmp_path)
    w.drift(["z1"])
    (path,) = (tmp_path / "acme" / "trigger-state").iterdir()
    legacy = tmp_path / "acme" / "trigger-state.json"
    path.rename(legacy)
    (tmp_path / "acme" / "trigger-state").rmdir()
    restarted = w.restart()
    assert list(restarted.snapshot("acme").running) == [w.launched[0].job_key]
    w.finish(w.launched[0])
    assert not legacy.exists() and stored(tmp_path)[0] == f"{1:016d}.json"
    assert not w.restart().snapshot("acme").running


def test_a_job_that_cannot_start_fails_and_frees_its_slot(tmp_path):
    w = World(tmp_path, POLICY.model_copy(update={"max_concurrent_jobs": 1}))

    def refuse(job, policy):
        raise ValueError(f"{tmp_path}/store/recalibration/acme/windows/{job.job_key}.parquet: the window holds 3 "
                         "usable events")

    w.trigger.launch = refuse
    w.drift(["a", "b"])  # one page: one job for both (one slot)
    w.drift(["c"])
    state = w.trigger.snapshot("acme")
    assert [(j.state, [t.asset_id for t in j.triggers]) for j in state.finished] == [
        ("failed", ["a", "b"]), ("failed", ["c"])]
    assert not state.running and not state.pending
    assert state.finished[0].error == "ValueError: <store>: the window holds 3 usable events"  # no store location


def _failing_launches(tmp_path, failures: list[Exception]) -> tuple:
    """(a `World` whose launches raise `failures` in turn, then launch; the launches it deferred, (delay, retry))."""
    w = World(tmp_path)
    deferred: list[tuple[float, Callable[[], None]]] = []
    w.trigger.later = lambda delay_s, fn: deferred.append((delay_s, fn)) or (lambda: deferred.remove((delay_s, fn)))

    def launch(job, policy):
        if failures:
            raise failures.pop(0)
        w.launched.append(job)

    w.trigger.launch = launch
    return w, deferred


def test_a_launch_the_store_failed_is_deferred_and_launched_again_not_failed(tmp_path):
    """A store outage at launch (its window's read or write, its audit intent) says nothing of the fit: the job stays
    running and is launched again later, at most `MAX_ATTEMPTS` launches in all; failing it would lose the trigger,
    for the twin stays latched. A backend that stops cancels what it deferred: the next one relaunches the job."""
    import errno

    from raytwin.store_failures import StoreIOError
    from serve_apps.recalibration import LAUNCH_RETRY_S, MAX_ATTEMPTS
    from serve_apps.store_errors import StoreUnavailable

    failures: list[Exception] = [
        StoreIOError(errno.EROFS, "Read-only file system", operation="write", error="read_only"),
        StoreUnavailable("recalibration.start of thermal_rc@1.0.0 was not done", error="unreachable")]
    w, deferred = _failing_launches(tmp_path, failures)
    w.drift(["a"])
    (job,) = w.trigger.snapshot("acme").running.values()
    assert not w.launched and [d for d, _ in deferred] == [LAUNCH_RETRY_S]  # not failed: deferred
    deferred.pop()[1]()  # the timer fires: launched again, and the store refuses once more
    assert not w.launched and [d for d, _ in deferred] == [2 * LAUNCH_RETRY_S]
    deferred.pop()[1]()
    assert [j.job_key for j in w.launched] == [job.job_key] and w.launched[0].attempts == MAX_ATTEMPTS == 3
    assert not w.trigger.snapshot("acme").finished
    w.finish(w.launched[0])

    failures[:] = [StoreIOError(errno.EROFS, "Read-only file system", operation="write", error="read_only")] * 3
    w.drift(["b"])  # an outage longer than its launches: it fails then, as any launch that cannot start
    while deferred:
        deferred.pop()[1]()
    assert w.trigger.snapshot("acme").finished[-1].error.startswith("StoreIOError")

    failures.append(StoreIOError(errno.ETIMEDOUT, "timed out", error="timeout"))
    w.drift(["c"])  # deferred, then the backend stops: the job stays running for the next one to relaunch
    assert len(deferred) == 1
    w.trigger.close()
    assert not deferred and "c" in {j.asset_id for j in w.trigger.snapshot("acme").running.values()}
    w.restart().resume("acme")
    assert w.launched[-1].asset_id == "c"


def test_a_launch_whose_twin_shard_left_its_state_unanswered_is_deferred_not_failed(tmp_path):
    """A launch reads the twin's state and its state at the window's start (`RecalibrationJobs._launch`), each within
    `shard_read_timeout_s`: a hung shard's `GetTimeoutError` says nothing of the fit, so the job is launched again
    later, as after a store outage, rather than failed with the trigger lost."""
    from ray.exceptions import GetTimeoutError

    from serve_apps.recalibration import LAUNCH_RETRY_S

    w, deferred = _failing_launches(tmp_path, [GetTimeoutError("the past state of twin a left unanswered within 5 s")])
    w.drift(["a"])
    assert not w.launched and [d for d, _ in deferred] == [LAUNCH_RETRY_S] and not w.trigger.snapshot("acme").finished
    deferred.pop()[1]()
    assert [j.asset_id for j in w.launched] == ["a"]


def test_lifecycle_records_without_triggers_keep_their_hash():
    """Evidence gained `triggers`: a record written before must still verify."""
    from raytwin.lifecycle import Evidence, TransitionRecord, record_hash

    body = dict(seq=0, prev_hash="0" * 64, model="m", tenant="acme", version="1.0.0", action="submit",
                from_stage=None, to_stage="candidate", displaced=None, actor="k1", actor_roles=[], automatic=False,
                time="2026-02-01T00:00:00Z", reason="r", evidence={"run_ids": [], "fit_report": None,
                                                                   "shadow_metrics": {}})
    old = TransitionRecord.model_validate({**body, "hash": record_hash(body)})
    assert old.computed_hash() == old.hash
    with_trigger = old.model_copy(update={"evidence": Evidence(triggers=[{
        "seq": 1, "asset_id": "z1", "type_name": "m", "type_version": "1.0.0", "event_time": T0,
        "drift_score": 1.2, "nis_mean": 2.0, "nis_last": 3.0}])})
    assert with_trigger.computed_hash() != old.hash  # the trigger is covered by the chain


def test_a_diverged_twins_latch_is_a_trigger_without_its_non_finite_statistics():
    from serve_apps.recalibration import trigger_of

    change = Change(seq=4, kind="twin.drift", time=T0, asset_id="z1", type_name="thermal_rc", type_version="1.0.0",
                    revision=3, data={"drift": True, "diverged": True, "nis_mean": float("nan"),
                                      "nis_last": float("inf"), "event_time": T0.isoformat()})
    t = trigger_of(change)
    assert (t.seq, t.nis_mean, t.nis_last, t.drift_score, t.event_time) == (4, None, None, 1.0, T0)
    assert trigger_of(change.model_copy(update={"kind": "twin.state"})) is None


def test_the_window_a_calibration_fits_keeps_the_policys_window_and_sample_budget(tmp_path):
    """`window_s` and `max_samples` bound what the calibration reads (the budget's data half; `max_trials`
    is the Tune trial count, checked through the fit report in tests/test_serve_recalibration.py)."""
    import numpy as np
    import pyarrow as pa

    from raytwin.statestore import LOG_BATCH_SCHEMA, StateStore
    from sweeps.recalibration import window_table

    store, names, step = StateStore(str(tmp_path)), ["T_out", "Q_h", "Q_sol", "T_in"], 300.0
    times = [T0 + timedelta(seconds=step * k) for k in range(100)]
    rows = [{"asset_id": "z1", "event_time": t, "sequence": k, "idempotency_key": f"k{k}",
             "quality": "bad" if k == 95 else "good", "ingest_time": t,
             "values": [(n, float(100 * k + j)) for j, n in enumerate(names)]} for k, t in enumerate(times)]
    store.append_log("acme", pa.Table.from_pylist(rows, schema=LOG_BATCH_SCHEMA))
    policy = RecalibrationPolicy(free=["R_io"], window_s=5 * 3600.0, max_samples=20)

    table, first = window_table(store, "acme", "z1", names, times[99], policy.window_s, policy.max_samples)
    assert table.num_rows == 20 and first == times[80]  # the newest 20 of the 59 usable in the last 5 h
    assert table.column("t_s").to_pylist() == [step * k for k in range(20)]  # the bad one interpolated over
    assert table.column("T_in").to_pylist()[-1] == 100 * 99 + 3
    wide, start = window_table(store, "acme", "z1", names, times[99], 1e6, 1000)
    assert wide.num_rows == 100 and start == times[0] and np.isfinite(wide.column("T_in").to_numpy()).all()


def test_the_window_fits_the_samples_after_an_outage_not_a_line_drawn_across_it(tmp_path):
    """A connector down for 5 h of a day's window was interpolated over: 60 straight-line samples of T_in and Q_h
    fitted as measurements."""
    import pyarrow as pa

    from raytwin.statestore import LOG_BATCH_SCHEMA, StateStore
    from sweeps.recalibration import RecalibrationError, window_table

    store, names, step = StateStore(str(tmp_path)), ["T_out", "Q_h", "Q_sol", "T_in"], 300.0
    ks = [*range(0, 40), *range(100, 130)]  # nothing from step 40 to 99
    times = {k: T0 + timedelta(seconds=step * k) for k in ks}
    rows = [{"asset_id": "z1", "event_time": times[k], "sequence": k, "idempotency_key": f"k{k}", "quality": "good",
             "ingest_time": times[k], "values": [(n, float(k)) for n in names]} for k in ks]
    store.append_log("acme", pa.Table.from_pylist(rows, schema=LOG_BATCH_SCHEMA))
    table, first = window_table(store, "acme", "z1", names, times[129], 1e6, 1000)
    assert first == times[100] and table.num_rows == 30
    assert table.column("T_in").to_pylist() == [float(k) for k in range(100, 130)]
    with pytest.raises(RecalibrationError, match=r"^twin 'z1': the window's newest 5 events follow a gap of 18300 s "
                                                 r"without telemetry \(over 10 steps of 300 s\); at least 10"):
        window_table(store, "acme", "z1", names, times[104], 1e6, 1000)


def test_the_window_holds_inputs_as_the_filter_does(tmp_path):
    """Inputs measured now and then (or never: a site without a solar sensor) are zero-order held as the twin's
    filter holds them; an output never measured is named in the error."""
    import pyarrow as pa

    from raytwin.statestore import LOG_BATCH_SCHEMA, StateStore
    from sweeps.recalibration import RecalibrationError, held_inputs, window_table

    store, step = StateStore(str(tmp_path)), 300.0
    times = [T0 + timedelta(seconds=step * k) for k in range(12)]

    def values(k: int) -> list:  # Q_h every third event from the second, Q_sol never
        return [("T_in", 293.0 + k), ("T_out", 270.0 + k)] + ([("Q_h", 100.0 * k)] if k % 3 == 1 else [])

    rows = [{"asset_id": "z1", "event_time": t, "sequence": k, "idempotency_key": f"k{k}", "quality": "good",
             "ingest_time": t, "values": values(k)} for k, t in enumerate(times)]
    store.append_log("acme", pa.Table.from_pylist(rows, schema=LOG_BATCH_SCHEMA))
    from sweeps.spec import resolve_model

    held = held_inputs(resolve_model("thermal_rc"))
    assert set(held) == {"T_out", "Q_h", "Q_sol"}
    names = ["T_out", "Q_h", "Q_sol", "T_in"]
    table, first = window_table(store, "acme", "z1", names, times[-1], 1e6, 1000, held=held)
    assert first == times[0] and table.num_rows == 12
    assert table.column("Q_h").to_pylist() == [100.0] * 4 + [400.0] * 3 + [700.0] * 3 + [1000.0] * 2
    assert table.column("Q_sol").to_pylist() == [held["Q_sol"]] * 12
    assert table.column("T_in").to_pylist() == [293.0 + k for k in range(12)]
    with pytest.raises(RecalibrationError, match=r"holds 0 usable events of 12 \(each needs \['T_out', 'Q_h', "
                                                 r"'Q_sol', 'T_in'\] measured; never measured in it: \['Q_sol'\]\)"):
        window_table(store, "acme", "z1", names, times[-1], 1e6, 1000)  # nothing held


def test_a_state_document_a_newer_version_wrote_still_loads(tmp_path):
    """A rollback to an older version must start: fields it does not know are left out, not refused."""
    import json

    w = World(tmp_path)
    w.drift(["z1"])
    (path,) = (tmp_path / "acme" / "trigger-state").iterdir()
    doc = json.loads(path.read_text())
    (job,) = doc["running"].values()
    job["field_of_a_later_version"] = 1
    doc["another_later_field"] = {}
    path.write_text(json.dumps(doc))
    assert list(w.restart().snapshot("acme").running) == [job["job_key"]]


def test_min_drift_score_is_the_score_the_alarm_reached_not_the_score_at_the_latch(tmp_path):
    """A live stream latches at a score of ~1 whatever the fault: a policy's min_drift_score is checked once
    the twin settled, against the highest score seen while latched."""
    w = World(tmp_path, POLICY.model_copy(update={"settle_s": 3600.0, "min_drift_score": 2.0}))
    w.drift(["strong", "weak"], score=1.05)  # latched at T0 + 0 h and T0 + 2 h (World's event times)

    def state_change(asset_id: str, hours: float, score: float) -> None:
        w.log.append(Change(seq=len(w.log) + 1, kind="twin.state", time=T0, asset_id=asset_id, type_name="thermal_rc",
                            type_version="1.0.0", revision=9, data={
                                "event_time": (T0 + timedelta(hours=hours)).isoformat(), "drift_score": score}))
        w.trigger.poll("acme")

    state_change("strong", 0.5, 3.4)
    state_change("weak", 2.5, 1.3)
    assert w.launched == []  # neither settled yet
    state_change("strong", 1.0, 3.6)
    state_change("weak", 3.0, 1.4)
    (job,) = w.launched
    assert job.asset_id == "strong" and not w.trigger.snapshot("acme").pending  # the weak alarm was dropped
