"""Failover of a twin shard: reads while it restarts are answered from the durable store, marked
stale; writes sent meanwhile are applied once it is back, each event exactly once.

References are independent of the service: the same `Twin` code run in-process over the events
(as in tests/test_twins.py), compared bit for bit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray

from actors import TwinService, UnknownTwin
from actors import service as service_module
from actors.failover import compilation_cache
from actors.progress import probed_actor
from actors.recovery import durable_state
from actors.shadow import shadow_twin
from actors.shard import TwinShardProcess
from actors.twin import logged_event, replay
from raytwin.contracts import AssetType
from raytwin.lifecycle import Actor, ModelLifecycle
from raytwin.registry import ModelRegistry
from raytwin.shadow import InnovationStats, compare, conclude
from raytwin.sim import THERMAL_RC
from serve_apps.asset_queries import LiveStates
from serve_apps.config import ServeConfig
from serve_apps import twin_reads
from serve_apps.twin_reads import TwinReader
from tests.test_twins import (  # noqa: F401 (fixtures)
    STEP_S,
    artifact,
    assert_same_state,
    asset,
    events,
    jax_on_cpu_like_the_shards,
    newer_version,
    reference,
    sealed_view,
)

OPTS = {"allowed_lateness_s": 5 * STEP_S, "checkpoint_every": 4}


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory, artifact):
    """One shard, snapshots every 8 events; Ray's call retries off (`max_task_retries=0`), so a
    call that meets the restarting shard fails and the service's own resend is what is tested."""
    root = tmp_path_factory.mktemp("failover")
    svc = TwinService(str(root / "twins"), shards=1, snapshot_every=8, max_task_retries=0, **OPTS)
    yield svc
    svc.close()


def test_reads_during_a_restart_are_stale_and_writes_meanwhile_apply_exactly_once(service, artifact):
    service.register(asset("f1"), artifact)
    service.register(asset("f2"), artifact)  # never gets an event: no snapshot, its prior is durable
    evs = events("f1", 60, seed=3)
    assert service.ingest("acme", evs[:40]).accepted == 40
    service.flush()
    snap = service.store.latest_snapshot("acme", "f1")
    assert snap is not None and 0 < snap.revision < 40
    live = service.state("acme", "f1")
    assert not live.stale and live.revision == 40

    [shard] = service.shard_handles
    os.kill(ray.get(shard.pid.remote()), signal.SIGKILL)
    stale = service.state("acme", "f1")  # answered while the shard restarts, not after
    assert stale.stale and stale.revision == snap.revision
    # the API's read path (Serve ingress replicas read shards directly) answers the same, also for queries
    reader = TwinReader(ServeConfig(store_url=service.store.url.removesuffix("/twins"), keys_file="unused.json",
                                    twin_shards=1, state_cache_s=0))
    assert asyncio.run(reader.state("acme", "f1")) == stale.model_dump(mode="json")
    queried = asyncio.run(LiveStates(reader).get("acme", ["f1", "f2"]))
    assert queried["f1"] == {"state": stale.state, "std": stale.std, "revision": snap.revision, "stale": True}
    assert queried["f2"]["stale"] and queried["f2"]["revision"] == 0
    prior = service.state("acme", "f2")
    with pytest.raises(UnknownTwin):
        service.state("acme", "ghost")
    # the references are computed after the reads: their filter compiles in this process took longer than
    # a restart that loads its kernels serialized, and the reads must happen while the shard is down
    # the snapshot's state is the uninterrupted run over the events it covers
    assert_same_state(stale, reference(artifact, "f1", evs[:snap.revision], **OPTS).view())
    assert prior.stale and prior.revision == 0 and prior.state == reference(artifact, "f2", [], **OPTS).view().state

    # sent while the shard restarts: new events and re-deliveries of acknowledged ones
    report = service.ingest("acme", evs[30:])
    assert (report.accepted, report.duplicates, report.rejected) == (20, 10, 0)
    after = service.state("acme", "f1")
    assert not after.stale and after.events_applied == 60
    assert_same_state(after, reference(artifact, "f1", evs, **OPTS).view())
    assert service.dead_letters("acme").num_rows == 0


@ray.remote(max_retries=0)
def _refused(*_args) -> None:
    raise ray.exceptions.ActorUnavailableError("The actor is restarting.", None)


class _RestartingShard:
    """A shard handle whose calls Ray refuses, as it refuses a call that meets a restarting actor
    once the call's retries are spent (in the test above that race is timing-dependent)."""

    class state:  # noqa: N801 - the actor method's name
        @staticmethod
        def remote(*args: object) -> ray.ObjectRef:
            ref = _refused.remote(*args)
            ray.wait([ref], timeout=60)  # refused before the read looks (a task's first worker can take seconds)
            return ref

    states = state  # the bulk read of queries


class _Counted:
    """Stands in for `raytwin.metrics` where a module records stale reads; keeps the counts by read."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.STALE_READS = self

    def inc(self, value: float = 1.0, read: str = "") -> None:
        self.counts[read] = self.counts.get(read, 0) + value


def test_a_read_that_ray_refuses_during_a_restart_is_answered_stale(service, artifact, monkeypatch):
    service.register(asset("r1"), artifact)
    assert service.ingest("acme", events("r1", 40, seed=5)).accepted == 40
    service.flush()
    snap = service.store.latest_snapshot("acme", "r1")
    counted = _Counted()  # operators see reads answered stale (`ray_raytwin_stale_reads_total`)
    monkeypatch.setattr(service_module, "metrics", counted)
    monkeypatch.setattr(twin_reads, "metrics", counted)
    monkeypatch.setattr(service, "_shard", lambda tenant, asset_id: _RestartingShard())
    stale = service.state("acme", "r1")
    assert stale.stale and stale.revision == snap.revision
    with pytest.raises(UnknownTwin):
        service.state("acme", "ghost")
    reader = TwinReader(ServeConfig(store_url=service.store.url.removesuffix("/twins"), keys_file="unused.json",
                                    twin_shards=1, state_cache_s=0))
    reader._shard = lambda tenant, asset_id: _RestartingShard()
    assert asyncio.run(reader.state("acme", "r1")) == stale.model_dump(mode="json")
    # queries read many twins in one call per shard: the same durable state, marked stale
    got = asyncio.run(LiveStates(reader).get("acme", ["r1", "ghost"]))
    assert got == {"r1": {"state": stale.state, "std": stale.std, "revision": snap.revision, "stale": True}}
    assert counted.counts == {"state": 2, "query": 1}  # the unknown twins were not answered


def test_a_shadow_evaluation_survives_a_sigkilled_shard(service, artifact, tmp_path):
    """Started, checkpointed, 5 events scored after the checkpoint, then SIGKILL: the restarted shard
    resumes the shadow and it concludes with the statistics of an uninterrupted in-process run."""
    registry = ModelRegistry(str(tmp_path))
    candidate = registry.register("zone", "1.1.0", AssetType.from_model(THERMAL_RC), {"R_io": 2.0e-2})
    service.register(asset("s1"), artifact)
    evs = events("s1", 50, seed=5)
    service.ingest("acme", evs[:10])
    run_id, ids = service.models.start_shadow("acme", candidate, events=30, asset_ids=["s1"])
    for part in (evs[10:30], evs[30:35]):  # checkpointed at 20 scored events (every 8, per batch), not at 25
        assert service.ingest("acme", part).accepted == len(part)

    [shard] = service.shard_handles
    os.kill(ray.get(shard.pid.remote()), signal.SIGKILL)
    report = service.ingest("acme", evs[25:])  # sent while it restarts: 10 re-deliveries, 15 new
    assert (report.accepted, report.duplicates, report.rejected) == (15, 10, 0)
    served = service.state("acme", "s1")
    assert not served.stale and served.events_applied == 50  # no event lost or applied twice
    assert_same_state(served, reference(artifact, "s1", evs, **OPTS).view())

    shadow = service.models.shadow("acme", candidate.ref)
    [twin] = shadow.twins
    assert shadow.run_id == run_id and ids == ["s1"] and shadow.done and twin.resumed_at is not None
    assert shadow.comparison.candidate.events == shadow.comparison.production.events == 30
    uninterrupted = reference(artifact, "s1", evs[:10], **OPTS)
    expected = shadow_twin(uninterrupted, candidate, 30)
    for part in (evs[10:30], evs[30:]):
        batch = [uninterrupted.pending(logged_event(e, artifact.asset_type)) for e in part]
        replay(uninterrupted, [logged_event(e, artifact.asset_type) for e in part])
        expected.observe(batch)
    assert (twin.production_stats, twin.candidate_stats) == (tuple(expected.production.stats),
                                                              tuple(expected.candidate.stats))

    lifecycle = ModelLifecycle(registry)
    lifecycle.submit(candidate.ref, Actor(id="calibrator", tenant="acme"), "fit on the live stream")
    comparison = compare(InnovationStats(*twin.production_stats), InnovationStats(*twin.candidate_stats))
    [record] = conclude(lifecycle, candidate.ref, "acme", run_id, comparison, twins=1)
    assert record.action == "evaluate" and record.evidence.shadow_metrics["events"] == 30
    assert service.models.stop_shadow("acme", candidate.ref)


def armed(store_url: str) -> str:
    """The file that arms `_KilledAtItsNextSnapshot` (beside its store)."""
    return f"{store_url}.kill-at-next-snapshot"


class _KilledAtItsNextSnapshot(TwinShardProcess):
    """A shard whose process is SIGKILLed as it next writes a snapshot once `armed` exists: the crash between a
    retype and its snapshot, a window a kill sent from outside cannot aim at. Its restart is not killed."""

    def __init__(self, store_url: str, *args, **kwargs):
        super().__init__(store_url, *args, **kwargs)
        write = self.store.write_snapshot

        def killed_when_armed(*snapshot):
            if os.path.exists(armed(store_url)):
                os.remove(armed(store_url))
                os.kill(os.getpid(), signal.SIGKILL)
            write(*snapshot)

        self.store.write_snapshot = killed_when_armed


def test_a_shard_killed_between_a_retype_and_its_snapshot_comes_back_on_the_new_version(
        ray_session, tmp_path, artifact, monkeypatch):
    """Killed after a retype's registration and before its snapshot: read from the store while the shard was
    down, the twin answered its prior (revision 0), and so it did after the restart until its next ingest (a
    restart wrote no snapshot). The registration carries the replay's snapshot now: a read while the shard is
    down answers the replayed state on the new version, and the restart recovers it and writes its snapshot."""
    monkeypatch.setattr(service_module, "TwinShardActor", probed_actor(_KilledAtItsNextSnapshot))
    store_url = str(tmp_path / "twins")
    svc = TwinService(store_url, shards=1, snapshot_every=8, max_task_retries=0, **OPTS)
    try:
        svc.register(asset("k1"), artifact)
        evs = events("k1", 40, seed=31)
        assert svc.ingest("acme", evs).accepted == 40
        newer, moved = newer_version(tmp_path), asset("k1").model_copy(update={"type_version": "1.1.0"})
        open(armed(store_url), "w").close()
        with pytest.raises((ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            svc.retype(moved, newer)  # the call died with its shard (no retries here)
        assert not os.path.exists(armed(store_url))  # it was killed where armed
        expected = reference(newer, "k1", evs, **OPTS)
        assert_same_state(durable_state(svc.store, "acme", "k1"), sealed_view(expected))  # what a stale read answers
        deadline = time.monotonic() + 120
        while (state := svc.state("acme", "k1")).stale:
            assert time.monotonic() < deadline, "the shard is not back"
            time.sleep(0.2)
        assert state.model_ref == newer.ref
        assert_same_state(state, expected.view())
        assert_same_state(durable_state(svc.store, "acme", "k1"), sealed_view(expected))  # before any ingest
        svc.retype(moved, newer)  # the caller, not told the outcome, sends it again: done already
        assert_same_state(svc.state("acme", "k1"), expected.view())
    finally:
        svc.close()


def test_durable_state_of_an_unknown_twin_is_none(service):
    assert durable_state(service.store, "acme", "ghost") is None
    assert durable_state(service.store, "other-tenant", "f1") is None
    assert durable_state(service.store, "acme", "..") is None  # names no store path outside the twin's


def test_a_restart_whose_recovery_fails_is_tried_again_not_left_dead(service, artifact):
    """A store error while a restarted shard recovers (an S3 timeout) must not leave it dead for good: Ray
    does not restart an actor whose constructor raised, so the process exits, Ray starts it again, and once
    the store reads the shard is back (RESTARTING meanwhile, which the shard-down alert pages)."""
    service.register(asset("f9"), artifact)
    path = f"{service.store.root}/twins/tenant=acme/asset_id=f9.json"
    good = service.store.fs.cat_file(path)
    [shard] = service.shard_handles
    actor_id = shard._actor_id.hex()
    restarts = lambda: ray._private.state.actors(actor_id=actor_id)["NumRestarts"]  # noqa: E731
    before = restarts()
    service.store.fs.pipe_file(path, b"{ not json")
    try:
        os.kill(ray.get(shard.pid.remote()), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while restarts() < before + 2:  # the first restart's recovery failed, and it was started again
            assert ray._private.state.actors(actor_id=actor_id)["State"] != "DEAD", "the shard died for good"
            assert time.monotonic() < deadline, "no second restart"
            time.sleep(0.2)
    finally:
        service.store.fs.pipe_file(path, good)
    deadline = time.monotonic() + 120
    while (state := service.state("acme", "f9")).stale:
        assert time.monotonic() < deadline, "the shard is not back"
        time.sleep(0.2)
    assert state.revision == 0 and not state.stale


def test_a_promotion_whose_swap_a_crash_interrupted_is_finished_at_start(service, tmp_path):
    """The log says 1.1.0 is in production, the twin still runs 1.0.0 (the backend died between the two):
    the start finishes the swap, audited as the system's, and a second start changes nothing."""
    from serve_apps.audit import AuditLog
    from serve_apps.promotions import finish_interrupted_swaps

    registry = ModelRegistry(str(tmp_path / "models"))
    old = registry.register("office", "1.0.0", AssetType.from_model(THERMAL_RC))
    new = registry.register("office", "1.1.0", AssetType.from_model(THERMAL_RC), {"R_io": 0.02})
    service.register(asset("p1"), old)
    lifecycle = ModelLifecycle(registry)
    author, approver = Actor(id="alice", tenant="acme"), Actor(id="bob", tenant="acme", roles=frozenset({"approver"}))
    lifecycle.submit(new.ref, author, "calibrated")
    lifecycle.transition(new.ref, "staging", author, "looks right")
    lifecycle.transition(new.ref, "production", approver, "approved")  # ...and the backend died here
    audit = AuditLog(str(tmp_path / "store"))
    done = finish_interrupted_swaps(lifecycle, service.models, "acme", audit)
    assert [s.asset_id for s in done[new.ref].states] == ["p1"] and done[new.ref].refused == {}
    assert service.models.twins_of_model("acme", "office", other_than=new.ref) == []  # events from now: 1.1.0
    intent, record = audit.records("acme")  # its intent before the swap, its outcome after
    assert (intent.phase, record.phase, intent.action_id) == ("intent", "outcome", record.action_id)
    assert (record.action, record.key_id, record.target, record.details["swapped"]) == (
        "model.swap", "system", new.ref, ["p1"])
    assert finish_interrupted_swaps(lifecycle, service.models, "acme", audit) == {}


@ray.remote(num_cpus=0)
class EarlierReplica:
    """A process serving a store's twins, as the backend replica an upgrade of the Serve application replaces."""

    def __init__(self, store_url: str):
        self.service = TwinService(store_url, shards=1, **OPTS)

    def shard(self):
        [shard] = self.service.shard_handles
        return shard

    def register_and_ingest(self, asset_id: str, artifact, evs) -> int:
        self.service.register(asset(asset_id), artifact)
        return self.service.ingest("acme", evs).accepted


def test_the_backend_replaces_the_shards_another_process_started_and_loses_no_twin(ray_session, artifact, tmp_path):
    """Found by a redeploy while the backend drained a request: the new replica attached to the old replica's shards
    by name (old code), and once the old replica exited they died with it (their owner), so every twin call of the
    new backend failed for good. A service that owns its shards (the backend's) starts its own in their place now,
    recovering every twin from the store, and they outlive the earlier process."""
    url = str(tmp_path / "twins")
    earlier = EarlierReplica.remote(url)
    assert ray.get(earlier.register_and_ingest.remote("u1", artifact, events("u1", 12, seed=5))) == 12
    old_shard = ray.get(earlier.shard.remote())
    service = TwinService(url, shards=1, own_shards=True, **OPTS)
    try:
        assert service.shard_handles != [old_shard]
        ray.kill(earlier)  # the earlier replica exits: shards it started end with it
        deadline = time.monotonic() + 60
        while ray._private.state.actors(actor_id=old_shard._actor_id.hex())["State"] != "DEAD":
            assert time.monotonic() < deadline, "the earlier replica's shard outlived it"
            time.sleep(0.1)
        state = service.state("acme", "u1")
        assert (state.revision, state.stale) == (12, False)
        assert TwinService(url, shards=1, own_shards=True, **OPTS).shard_handles == service.shard_handles  # its own
    finally:
        service.close()


def test_shard_processes_keep_compiled_kernels_in_the_configured_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("RAYTWIN_EXECUTABLES_DIR", raising=False)
    monkeypatch.setenv("RAYTWIN_JAX_CACHE_DIR", str(tmp_path))
    env = compilation_cache({"runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}})["runtime_env"]["env_vars"]
    assert env == {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-1-cpu"),
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "RAYTWIN_EXECUTABLES_DIR": str(tmp_path / "raytwin-executables")}
    monkeypatch.setenv("RAYTWIN_EXECUTABLES_DIR", "")  # serialized kernels off, JAX's cache on
    assert compilation_cache({})["runtime_env"]["env_vars"]["RAYTWIN_EXECUTABLES_DIR"] == ""
    monkeypatch.setenv("RAYTWIN_JAX_CACHE_DIR", "")
    assert compilation_cache({"name": "x"}) == {"name": "x"}
