"""One service writes a store: a second one (another shard count, or another Ray cluster while the
holder renews its heartbeat) is refused, a stale shard is fenced, a change of shard count is an
explicit takeover that recovers every twin, and a crashed holder's lease expires."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace

import pytest
import ray

from actors import StoreLeased, TwinService
from actors import lease
from actors.lease import acquire_lease
from actors.recovery import registration_record
from actors.shard import TwinShard
from actors.telemetry import validated_table
from raytwin.statestore import Heartbeat, Lease, StateStore, StoreFenced
from tests.fixtures_connectors import wait_for
from tests.fixtures_lease import renewing
from tests.test_twins import (  # noqa: F401 (a fixture)
    TWIN_OPTS,
    artifact,
    assert_same_state,
    asset,
    events,
    jax_on_cpu_like_the_shards,
    reference,
)

TWINS = [f"m{i}" for i in range(6)]


def test_reshard_refuses_a_store_a_live_service_serves(ray_session, tmp_path, artifact, monkeypatch):
    """The runbook's `raytwin twins reshard` took a live service's store at once: every write that service took
    then failed (500 `internal`, until someone restarted it). (The reshard, in this process, watches the heartbeat
    for 4 s, not 6: still two of the shard's 2 s renewals, and it refuses only after seeing one.)"""
    from typer.testing import CliRunner

    from actors.cli import twins_app

    monkeypatch.setattr(lease, "EXPIRY_S", 4.0)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.1)  # how often this process reads it
    url = str(tmp_path / "store")
    live = TwinService(url, shards=1, **TWIN_OPTS)
    try:
        live.register_many([(asset("m0"), artifact)])
        result = CliRunner().invoke(twins_app, ["reshard", url, "--shards", "2"])
        said = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # the message, out of its box
        assert result.exit_code == 2 and "its shards renewed the lease" in said, result.output
        assert "stop it first" in said and "`--force` takes the store from it anyway" in said
        assert live.store.read_lease() == live.lease  # untouched: the service writes on
        assert live.ingest("acme", events("m0", 3)).accepted == 3
        root = str(tmp_path / "served")  # a `raytwin serve` store, its twins under twins/: leased afresh, it
        StateStore(f"{root}/twins").write_lease(live.lease)  # "succeeded" with 0 twins and fenced nothing
        result = CliRunner().invoke(twins_app, ["reshard", root, "--shards", "2", "--force"])
        said = "".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # the message, out of its box
        assert result.exit_code == 2 and f"itstwinsareat{root}/twins" in said, result.output
        assert StateStore(root).read_lease() is None
    finally:
        live.close()


def test_second_service_is_refused_stale_writers_are_fenced_and_reshard_keeps_every_event(ray_session, tmp_path,
                                                                                            artifact):
    url = str(tmp_path / "store")
    first = TwinService(url, shards=1, **TWIN_OPTS)
    evs = {a: events(a, 20, seed=i) for i, a in enumerate(TWINS)}
    try:
        first.register_many([(asset(a), artifact) for a in TWINS])
        first.ingest("acme", [e for a in TWINS for e in evs[a][:10]])
        attached = TwinService(url, shards=1, **TWIN_OPTS)  # the same service (Serve backend, CLI): attaches
        assert attached.lease == first.lease and attached.state("acme", "m0").revision == 10

        with pytest.raises(StoreLeased, match=f"leased to service {first.lease.owner} .*1 shards.*takeover=True"):
            TwinService(url, shards=2, **TWIN_OPTS)
        stray = TwinShard(url, 0, 1, allowed_lateness_s=600.0, snapshot_every=16)  # a writer without the lease
        with pytest.raises(StoreFenced, match="leased to service"):
            stray.ingest("acme", validated_table(evs["m0"][10:]))

        # the migration: take the store over with 2 shards; the old shard is stopped
        resharded = TwinService(url, shards=2, takeover=True, **TWIN_OPTS)
        assert resharded.lease.epoch == first.lease.epoch + 1
        with pytest.raises(ray.exceptions.RayActorError):
            first.state("acme", "m0")
        stale = TwinShard(url, 0, 1, allowed_lateness_s=600.0, snapshot_every=16, fence=first.lease.fence)
        log_files = resharded.store.fs.glob(f"{resharded.store.root}/log/**/seg-*")
        for write in (lambda: stale.ingest("acme", validated_table(evs["m0"][10:])), stale.flush,
                      lambda: stale.register("acme", "new", registration_record(asset("new"), artifact, None, None))):
            with pytest.raises(StoreFenced, match=f"epoch {first.lease.epoch}\\)"):
                write()
        assert log_files and resharded.store.fs.glob(f"{resharded.store.root}/log/**/seg-*") == log_files  # nothing written

        report = resharded.ingest("acme", [e for a in TWINS for e in evs[a][5:]])  # 5 re-deliveries each
        assert (report.accepted, report.duplicates) == (60, 30)
        for a in TWINS:
            assert_same_state(resharded.state("acme", a), reference(artifact, a, evs[a], **TWIN_OPTS).view())
        resharded.close()
        assert resharded.store.read_lease().released  # a closed service's store is free for any service
        assert acquire_lease(resharded.store, 5, "raytwin", takeover=False).epoch == resharded.lease.epoch + 1
    finally:
        first.close()


def test_reshard_command_moves_a_live_store_to_a_new_shard_count(ray_session, tmp_path, artifact):
    from typer.testing import CliRunner

    from raytwin.cli import app

    url = str(tmp_path / "store")
    evs = {a: events(a, 12, seed=i) for i, a in enumerate(TWINS[:3])}
    old = TwinService(url, shards=1, **TWIN_OPTS)
    try:
        old.register_many([(asset(a), artifact) for a in evs])
        old.ingest("acme", [e for a in evs for e in evs[a]])
        result = CliRunner().invoke(app, ["twins", "reshard", url, "--shards", "2", "--force"])  # `old` still serves
        assert result.exit_code == 0, result.output
        assert "3 twin(s) recovered on 2 shard(s)" in result.output and "free for a service with 2" in result.output
        new = TwinService(url, shards=2, **TWIN_OPTS)  # no takeover needed: the command released the store
        try:
            for a in evs:
                assert_same_state(new.state("acme", a), reference(artifact, a, evs[a], **TWIN_OPTS).view())
        finally:
            new.close()
    finally:
        old.close()


def test_a_service_of_another_ray_cluster_is_refused_while_the_holder_renews_and_takes_over_once_it_stops(
        ray_session, tmp_path, artifact, monkeypatch):
    """Two `raytwin serve` on one store, each with its own Ray, both attached to one lease and answered on one
    port: the lease now names its Ray session, and a service of another one waits for the holder's heartbeat."""
    monkeypatch.setattr(lease, "EXPIRY_S", 1.5)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.1)
    url = str(tmp_path / "store")
    service = TwinService(url, shards=1, **TWIN_OPTS)
    try:
        service.register_many([(asset("m0"), artifact)])
        first = service.store.read_heartbeat()
        assert first is not None and first.renews(service.lease) and service.lease.cluster == ray_session.get_runtime_context().get_session_name()
        wait_for(lambda: service.store.read_heartbeat().at_s > first.at_s,  # within 2 s, not a fixed sleep
                 "the shard process renews the heartbeat (every 2 s, its own `HEARTBEAT_S`)")
    finally:
        service.close()

    # a holder in another cluster that keeps renewing (its shards, simulated here) is not taken over
    store = StateStore(url)
    other = replace(store.read_lease(), owner="other", epoch=9, cluster="session_other", released=False)
    store.write_lease(other)
    stop = threading.Event()
    renewer = renewing(store, other, stop.is_set)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLeased, match="of Ray cluster session session_other .*another Ray cluster than this one: stop that service first"):
            TwinService(url, shards=1, **TWIN_OPTS)
        assert time.monotonic() - started >= 1.5  # it waited for a crash to show before refusing
        with pytest.raises(StoreLeased, match=r"serve from its cluster \(`raytwin serve --address`\)"):
            lease.check_not_served_elsewhere(store, cluster="")  # `raytwin serve` before starting a Ray of its own
        assert store.read_lease() == other
    finally:
        stop.set()
        renewer.join()

    # once it stops renewing (crashed), the store is taken with a new epoch and its shards are fenced
    taken = TwinService(url, shards=1, **TWIN_OPTS)
    try:
        assert taken.lease.epoch == other.epoch + 1 and taken.lease.cluster != other.cluster
        assert taken.state("acme", "m0") is not None
        stale = TwinShard(url, 0, 1, allowed_lateness_s=600.0, snapshot_every=16, fence=other.fence)
        with pytest.raises(StoreFenced, match="epoch 9\\)"):
            stale.flush()
    finally:
        taken.close()


class _Beats:
    """A store whose heartbeat reads answer `beats` in turn, then the last one again (`renewing`: renewed
    before each read, as a live holder's shards renew it)."""

    url = "memory://store"

    def __init__(self, *beats: Heartbeat | None, renewing: bool = False) -> None:
        self.beats, self.renewing = list(beats), renewing

    renewals = StateStore.renewals  # the watch over these reads

    def read_heartbeat(self) -> Heartbeat | None:
        if len(self.beats) > 1:
            return self.beats.pop(0)
        if self.renewing and (last := self.beats[0]) is not None:
            self.beats[0] = replace(last, at_s=last.at_s + 0.05)
        return self.beats[0]


def test_a_heartbeat_overwritten_by_a_previous_holders_shard_is_no_crash_of_the_live_holder(monkeypatch):
    """The previous service's dying shard can write its heartbeat once after the new holder's: that
    moment must not let a third cluster take a store whose holder keeps renewing (CI saw it)."""
    monkeypatch.setattr(lease, "EXPIRY_S", 0.3)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    held = Lease(owner="b", epoch=2, shards=1, namespace="raytwin", acquired_at="", acquired_by="", cluster="B")
    previous = Heartbeat("a", 1, "A", time.time())
    renewal = Heartbeat("b", 2, "B", time.time())
    with pytest.raises(StoreLeased, match="another Ray cluster than this one"):
        lease._refuse_if_renewed(_Beats(renewal, previous, renewal, renewing=True), held)
    lease._refuse_if_renewed(_Beats(previous), held)  # no renewal of it in a whole expiry: gone
    lease._refuse_if_renewed(_Beats(None), held)
    lease._refuse_if_renewed(_Beats(renewal), held)  # stopped renewing
    lease._refuse_if_renewed(_Beats(replace(renewal, at_s=time.time() + 3600)), held)  # whatever its clock said


@pytest.mark.parametrize("skew_s", [30.0, -30.0], ids=["newcomer_clock_ahead", "newcomer_clock_behind"])
def test_crash_detection_never_compares_two_hosts_clocks(tmp_path, monkeypatch, skew_s):
    """The newcomer compared the holder's renewal time with its own clock: a host 6 s ahead took a live store
    at once (fencing the running service), one behind refused a crashed holder's ("renewed the lease -28.8 s
    ago"). It watches the heartbeat change on its own clock instead: both skews decide as equal clocks do."""
    monkeypatch.setattr(lease, "EXPIRY_S", 0.5)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    store = StateStore(str(tmp_path / "twins"))
    held = Lease(owner="live", epoch=3, shards=1, namespace="raytwin", acquired_at="", acquired_by="", cluster="A")
    store.write_lease(held)
    holder_clock = time.time
    monkeypatch.setattr(time, "time", lambda: holder_clock() + skew_s)  # this host's clock
    stop = threading.Event()
    renewer = renewing(store, held, stop.is_set, clock=holder_clock)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLeased, match=r"renewed the lease 0\.\d s ago, as seen from this host"):
            lease.check_not_served_elsewhere(store, cluster="B")
        assert time.monotonic() - started >= 0.5 and store.read_lease() == held
    finally:
        stop.set()
        renewer.join()
    started = time.monotonic()  # the holder crashed: its last heartbeat stays, with its clock's time
    taken = acquire_lease(store, 1, "raytwin", False, cluster="B")
    assert (taken.epoch, taken.cluster) == (held.epoch + 1, "B") and time.monotonic() - started >= 0.5


def test_a_starting_service_waits_for_another_clusters_holder_that_is_stopping(tmp_path, monkeypatch):
    """A replaced RayService's pods renew the store's lease while they terminate: the new cluster's backend
    waits for them (`lease_wait_s`, serve's `store_lease_wait_s`) and takes the store once they stop, where
    it was refused after one expiry before."""
    monkeypatch.setattr(lease, "EXPIRY_S", 0.5)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    store = StateStore(str(tmp_path / "twins"))
    old = Lease(owner="old", epoch=3, shards=1, namespace="raytwin", acquired_at="", acquired_by="", cluster="A")
    store.write_lease(old)
    stops_at = time.monotonic() + 1.5
    renewer = renewing(store, old, lambda: time.monotonic() >= stops_at)  # its pods terminating
    try:
        with pytest.raises(StoreLeased, match="another Ray cluster than this one"):
            acquire_lease(store, 1, "raytwin", False, cluster="B")  # by default: one expiry, then refused
        assert time.monotonic() < stops_at
        taken = acquire_lease(store, 1, "raytwin", False, cluster="B", wait_s=30.0)
        assert time.monotonic() >= stops_at  # it waited for the holder to stop, not for the whole wait
        assert (taken.epoch, taken.cluster) == (old.epoch + 1, "B") and store.read_lease() == taken
    finally:
        renewer.join()


def test_a_store_failing_the_heartbeat_logs_each_failure_with_its_error_and_the_traceback_once(tmp_path, monkeypatch,
                                                                                                  caplog):
    """An outside test's read-only store: each shard logged a 40-line traceback every 2 s (250 each in 4 minutes),
    and its line, `event=lease_heartbeat_failed store=...`, named no error, though health's reason sends the
    operator there for it. A renewal after failures says so."""
    import errno
    from types import SimpleNamespace

    from raytwin import metrics

    monkeypatch.setattr(metrics, "STORE_FAILURES", SimpleNamespace(inc=lambda **tags: None))
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(lease, "ray_cluster", lambda: "A")
    store = StateStore(str(tmp_path / "twins"))
    held = Lease(owner="live", epoch=3, shards=1, namespace="raytwin", acquired_at="", acquired_by="", cluster="A")
    store.write_lease(held)
    outcomes = iter(["read_only", "read_only", "read_only", "renewed", "read_only"])

    def renew(beat: Heartbeat) -> None:
        if (outcome := next(outcomes, None)) is None:  # then taken over: the thread ends
            raise StoreFenced("leased to service next (epoch 4)")
        if outcome == "read_only":
            raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store, "write_heartbeat", renew)
    with caplog.at_level("INFO", logger=lease.log.name):
        lease.renew_heartbeat(store, held.fence).join(10)
    lines = [(r.getMessage(), bool(r.exc_info)) for r in caplog.records if "event=lease_heartbeat" in r.getMessage()]
    failed = "event=lease_heartbeat_failed store=%s error=read_only failure=OSError: [Errno 30] Read-only file system"
    assert lines == [(failed % store.url, True), (failed % store.url, False), (failed % store.url, False),
                     (f"event=lease_heartbeat_renewed store={store.url} failures=3", False),
                     (failed % store.url, True)], lines


def test_a_failed_renewal_of_the_heartbeat_is_counted_by_its_error_class(tmp_path, monkeypatch):
    """A full disk failed every renewal of the shards' heartbeat with a warning in their log alone: no metric
    counted it, so nothing paged while an idle service's store took no writes."""
    import errno
    from types import SimpleNamespace

    from raytwin import metrics

    counted: list[dict[str, str]] = []
    first = threading.Event()
    monkeypatch.setattr(metrics, "STORE_FAILURES", SimpleNamespace(inc=lambda **tags: counted.append(tags) or
                                                                   first.set()))
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(lease, "ray_cluster", lambda: "A")
    store = StateStore(str(tmp_path / "twins"))
    held = Lease(owner="live", epoch=3, shards=1, namespace="raytwin", acquired_at="", acquired_by="", cluster="A")
    store.write_lease(held)

    def disk_full(beat: Heartbeat) -> None:
        store.write_lease(replace(held, owner="next", epoch=4))  # then taken over: the next renewal ends the thread
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "write_heartbeat", disk_full)
    lease.renew_heartbeat(store, held.fence)
    assert first.wait(10), "the failed renewal was not counted"
    assert counted == [{"operation": "write", "error": "disk_full"}]


class _KilledActor:
    """Ray as `stop_actors` sees one actor killed: its name free at once, its process exiting `polls` checks later
    (None: never)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, polls: int | None):
        self.polls, self.events = polls, []
        monkeypatch.setattr(ray, "get_actor", self.get_actor)
        monkeypatch.setattr(ray, "kill", lambda handle, no_restart: self.events.append("killed"))
        monkeypatch.setattr(lease, "actor_worker", lambda handle: (b"w1", 4242))
        monkeypatch.setattr(lease, "worker_alive", self.alive)

    def get_actor(self, name: str, namespace: str) -> object:
        if "killed" in self.events:
            raise ValueError(f"Failed to look up actor {name}")
        return object()

    def alive(self, worker_id: bytes) -> bool:
        if self.polls == 0:
            self.events.append("exited")
            return False
        self.polls = None if self.polls is None else self.polls - 1
        return True


def test_stopped_actors_are_waited_for_until_their_processes_exit_not_only_their_names(monkeypatch):
    """Found by the chaos trial: `stop_actors` returned once the killed shard's name came free, which Ray frees before
    the process exits (7 of 8 tries: still running, writing for 4-10 ms more), so its successor of the same lease
    epoch could recover before a write of the old one in flight landed. It returns once the process has exited."""
    killed = _KilledActor(monkeypatch, polls=3)
    lease.stop_actors(["shard-0"], "ns")
    assert killed.events == ["killed", "exited"]


def test_an_actor_restarted_between_its_worker_read_and_its_kill_is_waited_for_in_its_new_process(monkeypatch):
    """A shard that crashed and restarted between `stop_actors`' read of its worker and the kill runs in a new
    process, which the kill ends: waiting only for the old (already dead) one returned while the new one ran on,
    beside the successor shard. GCS names the new process once the actor is dead; it is waited for."""
    killed = _KilledActor(monkeypatch, polls=3)
    monkeypatch.setattr(lease, "actor_worker", lambda handle: (b"w2", 4343) if "killed" in killed.events
                        else (b"w1", 4242))
    monkeypatch.setattr(lease, "worker_alive", lambda worker_id: worker_id == b"w2" and killed.alive(worker_id))
    lease.stop_actors(["shard-0"], "ns")
    assert killed.events == ["killed", "exited"]


def test_actors_that_outlive_the_stop_wait_fail_the_stop_naming_them(monkeypatch, caplog):
    """Past its bound, `stop_actors` no longer returns as if they had stopped: no successor starts beside them."""
    _KilledActor(monkeypatch, polls=None)
    with pytest.raises(lease.ActorsNotStopped, match=r"shard-0 \(pid 4242\) of namespace ns still run 0.05 s"):
        lease.stop_actors(["shard-0"], "ns", wait_s=0.05)
    assert "event=actor_stop_timeout namespace=ns actors=shard-0 (pid 4242)" in caplog.text
