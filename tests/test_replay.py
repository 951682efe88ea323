"""A replayed backlog (events older than the lateness window, sent again by an at-least-once
producer) through a shard's log key index (`raytwin.keyindex`), on a local directory and on S3 (moto).

Shards run in-process (`TwinShard`, no Ray): the index is the shard's own. References are the
same `Twin` code applied to the distinct events in key order (tests/test_twins.py); the log rows
are counted from the store itself.
"""

from __future__ import annotations

import errno
import logging
import os
from datetime import UTC, datetime, timedelta

import jax
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from actors.recovery import registration_record
from actors.shard import TwinShard
from actors.telemetry import validated_table
from actors.twin import Twin, logged_event, replay
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.keyindex import INDEX_FILE, LogKeyIndex, Logged, content_digest
from raytwin.registry import ModelRegistry
from raytwin.sim import THERMAL_RC
from raytwin.statestore import LoggedEvent, StateStore, log_table, to_micros
from raytwin.store_failures import StoreIOError

T0 = datetime(2026, 5, 4, 22, 0, tzinfo=UTC)  # 2 h before midnight: a backlog spans two day partitions
STEP_S = 60.0
OPTS = {"allowed_lateness_s": 600.0, "snapshot_every": 32, "checkpoint_every": 8}
ASSETS = ("r1", "r2", "r3")
N = 180  # events per twin: 3 h, so all but the last 10 minutes are beyond the window


@pytest.fixture(autouse=True)
def jax_on_cpu_like_the_shards():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return ModelRegistry(str(tmp_path_factory.mktemp("registry"))).register("zone", "1.0.0",
                                                                           AssetType.from_model(THERMAL_RC))


def events(asset_id: str, start: int, n: int, seed: int = 0, key: str = "") -> list[TelemetryEvent]:
    rng = np.random.default_rng([seed, start])
    return [TelemetryEvent(asset_id=asset_id, event_time=T0 + timedelta(seconds=STEP_S * k), sequence=k,
                           idempotency_key=f"{asset_id}:{key}{k}",
                           measurements={"T_in": {"value": 20.0 + 0.01 * k + rng.normal(0, 0.05), "unit": "degC"},
                                         "T_out": {"value": 5.0 + rng.normal(), "unit": "degC"}})
            for k in range(start, start + n)]


def reference(artifact, asset_id: str, evs: list[TelemetryEvent]):
    twin = Twin("acme", asset_id, artifact, allowed_lateness_s=OPTS["allowed_lateness_s"],
                checkpoint_every=OPTS["checkpoint_every"])
    distinct = {(e.event_time, e.sequence, e.idempotency_key): logged_event(e, artifact.asset_type) for e in evs}
    return replay(twin, sorted(distinct.values(), key=lambda e: e.key)).view()


def new_shard(url: str) -> TwinShard:
    return TwinShard(url, 0, 1, **OPTS)


def ingest(shard: TwinShard, evs: list[TelemetryEvent], batch: int = 100) -> tuple[int, int, int, int]:
    """(accepted, duplicates, rejected, conflicts) summed over batches of `batch` events."""
    total = np.zeros(4, dtype=int)
    for i in range(0, len(evs), batch):
        r = shard.ingest("acme", validated_table(evs[i:i + batch]))
        total += (r.accepted, r.duplicates, r.rejected, r.conflicts)
    return tuple(total.tolist())


def log_rows(store: StateStore) -> int:
    return sum(len(evs) for evs in store.read_events_many("acme", dict.fromkeys(ASSETS)).values())


@pytest.fixture(scope="module", params=["local", "s3"])
def backlog(request, tmp_path_factory, artifact):
    """A store whose twins applied `N` events each, interleaved across twins like a live stream."""
    url = (str(tmp_path_factory.mktemp("replay") / "store") if request.param == "local"
           else request.getfixturevalue("s3_module_url") + "/replay")
    shard = new_shard(url)
    for a in ASSETS:
        shard.register("acme", a, registration_record(Asset(id=a, tenant="acme", type_name="thermal_rc",
                                                            type_version="1.0.0"), artifact, None, None))
    sent = [e for k in range(N) for e in (events(a, k, 1)[0] for a in ASSETS)]
    assert ingest(shard, sent, batch=60) == (len(sent), 0, 0, 0)
    return url, shard, sent


def test_a_replayed_backlog_is_applied_once_and_found_through_the_index(backlog, artifact):
    url, shard, sent = backlog
    before = {a: shard.state("acme", a) for a in ASSETS}
    rows = log_rows(shard.store)
    # the whole backlog again, shuffled into other batches: every event a re-delivery
    replayed = [sent[i] for i in np.random.default_rng(1).permutation(len(sent))]
    assert ingest(shard, replayed, batch=128) == (0, len(sent), 0, 0)
    assert shard.key_index.rebuilds >= 1  # no index yet: built from the log files, once per partition
    assert log_rows(shard.store) == rows == len(sent)
    for a in ASSETS:
        state = shard.state("acme", a)
        assert state == before[a] and state.events_applied == N
        ref = reference(artifact, a, [e for e in sent if e.asset_id == a])
        assert state.state == ref.state and state.covariance == ref.covariance


def test_mixed_batches_apply_new_events_and_tell_old_ones_apart(backlog, artifact):
    url, shard, sent = backlog
    r1 = [e for e in sent if e.asset_id == "r1"]
    changed = TelemetryEvent(**{**r1[5].model_dump(), "measurements": {"T_in": {"value": 99.0, "unit": "degC"}}})
    reused_key = r1[6].model_copy(update={"sequence": 10_000})  # same key, another identity, old time
    fresh = events("r1", N, 3, seed=5)
    batch = [r1[4], fresh[0], changed, sent[-1], reused_key, fresh[1], r1[4], fresh[2]]
    report = shard.ingest("acme", validated_table(batch))
    assert (report.accepted, report.duplicates, report.rejected, report.conflicts) == (3, 3, 2, 1)
    assert [r.reason.split(":")[0] for r in report.reasons] == ["conflict", "too late"]
    assert report.reasons[0].reason.startswith("conflict: idempotency key 'r1:5' was already applied with different "
                                               f"content (event time {r1[5].event_time.isoformat()}, sequence ")
    assert [r.index for r in report.reasons] == [None, None]  # a table's rows: no caller's list to point into
    # once the window moved past them, the new events are found through the index, in the log
    # files written after it was built
    later = events("r1", N + 30, 3, seed=6)
    assert shard.ingest("acme", validated_table(later)).accepted == 3
    again = shard.ingest("acme", validated_table([fresh[0], r1[7], fresh[2]]))
    assert (again.accepted, again.duplicates, again.rejected) == (0, 3, 0)
    state = shard.state("acme", "r1")
    ref = reference(artifact, "r1", r1 + fresh + later)
    assert state.events_applied == N + 6 and state.state == ref.state and state.covariance == ref.covariance


def test_the_index_survives_restarts_and_is_rebuilt_when_missing_corrupt_or_stale(backlog):
    url, shard, sent = backlog
    old = [e for e in sent if e.asset_id == "r2"][:40]  # 22:00-22:39: the first day's partition
    store = shard.store
    index_path = f"{store.root}/log/tenant=acme/date=2026-05-04/{INDEX_FILE}"
    assert store.fs.exists(index_path)

    def replay_on_a_restarted_shard() -> int:
        restarted = new_shard(url)
        assert ingest(restarted, old) == (0, len(old), 0, 0)
        return restarted.key_index.rebuilds

    assert replay_on_a_restarted_shard() == 0  # loaded from the persisted index
    store.fs.rm(index_path)
    assert replay_on_a_restarted_shard() == 1 and store.fs.exists(index_path)
    store.fs.pipe_file(index_path, b"PAR1 not an index PAR1")
    assert replay_on_a_restarted_shard() == 1
    store.compact(tenant="acme")  # the files the index names are gone: merged into compact-* files
    assert replay_on_a_restarted_shard() == 1
    assert replay_on_a_restarted_shard() == 0


def test_an_identity_logged_with_several_contents_is_confirmed_from_the_rows(tmp_path):
    """A conflicting re-delivery logged before a crash: the index cannot say which content the
    twin applied (the first ingested), so it asks for the rows; other identities are exact."""
    store = StateStore(str(tmp_path / "store"))
    us = to_micros(T0)
    first = LoggedEvent((us, 1, "a:1"), "good", {"T_in": 293.0}, us)
    other = LoggedEvent((us, 1, "a:1"), "good", {"T_in": 300.0}, us + 5)
    store.append_log("acme", log_table([("a", first), ("a", LoggedEvent((us, 2, "a:2"), "bad", {"T_in": 1.0}, us))]))
    index = LogKeyIndex(store)

    def ask(*queries):
        return index.lookup("acme", [(a, key, content_digest(q, v.items())) for a, key, q, v in queries])

    assert ask(("a", first.key, "good", first.values), ("a", (us, 2, "a:2"), "good", {"T_in": 1.0}),
               ("a", (us, 3, "a:2"), "bad", {"T_in": 1.0}), ("b", first.key, "good", first.values)) == [
        Logged.SAME, Logged.CONFIRM, Logged.ABSENT, Logged.ABSENT]
    store.append_log("acme", log_table([("a", other)]))
    assert ask(("a", first.key, "good", first.values)) == [Logged.CONFIRM]
    assert store.find_events("acme", [("a", first.key), ("a", (us, 9, "a:9"))]) == {("a", first.key): first}


def test_a_damaged_index_is_rebuilt_but_the_store_failing_its_read_is_an_outage(tmp_path, monkeypatch, caplog):
    """Any error reading the index rebuilt it: the store failing the read too, which re-read the partition's whole
    log from that failing store. An outage now raises `StoreIOError`; a damaged index (a failed page checksum,
    which pyarrow raises as an OSError too) is still rebuilt."""
    store = StateStore(str(tmp_path / "store"))
    us = to_micros(T0)
    event = LoggedEvent((us, 1, "a:1"), "good", {"T_in": 293.0}, us)
    store.append_log("acme", log_table([("a", event)]))
    query = [("a", event.key, content_digest("good", event.values.items()))]
    assert LogKeyIndex(store).lookup("acme", query) == [Logged.SAME]  # built from the log, and written
    index_path = f"{store.root}/log/tenant=acme/date={T0.date().isoformat()}/{INDEX_FILE}"
    read = LocalFileSystem.cat_file

    def index_unreadable(fs, path, *args, **kwargs):
        if path.endswith(INDEX_FILE):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return read(fs, path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(LocalFileSystem, "cat_file", index_unreadable)
        index = LogKeyIndex(store)
        with pytest.raises(StoreIOError) as raised:
            index.lookup("acme", query)
    assert (raised.value.operation, raised.value.error, index.rebuilds) == ("read", "io", 0)

    data = bytearray(store.fs.cat_file(index_path))
    data[data.index(content_digest("good", event.values.items()))] ^= 0xFF  # in the page: its checksum fails
    store.fs.pipe_file(index_path, bytes(data))
    index = LogKeyIndex(store)
    with caplog.at_level(logging.WARNING, logger="raytwin.store"):
        assert index.lookup("acme", query) == [Logged.SAME]
    assert index.rebuilds == 1 and "event=key_index_unreadable" in caplog.text and "OSError(" in caplog.text


def test_a_twin_registered_again_reads_its_own_deletion_alone(tmp_path, artifact, monkeypatch):
    """A twin registered again after its deletion starts after the old twin's history (`StateStore.history_floors`):
    its registration and recovery read its own deletion record, not that of every twin its tenant ever deleted."""
    shard = new_shard(str(tmp_path / "store"))

    def record(asset_id: str) -> dict:
        return registration_record(Asset(id=asset_id, tenant="acme", type_name="thermal_rc", type_version="1.0.0"),
                                   artifact, None, None)

    shard.register("acme", "a", record("a"))
    assert ingest(shard, events("a", 0, 5)) == (5, 0, 0, 0)
    assert shard.unregister("acme", "a")
    for i in range(20):
        shard.store.save_deletion("acme", f"gone-{i}", 0)
    read: list[str] = []
    fs = shard.store.fs
    for name in ("cat", "cat_file", "glob", "find", "ls"):
        monkeypatch.setattr(fs, name, lambda path, *a, _real=getattr(fs, name), **k: read.extend(
            [path] if isinstance(path, str) else path) or _real(path, *a, **k))
    assert shard.register("acme", "a", record("a"))
    deleted = [p for p in read if "/deleted/" in p]
    assert deleted and all(p.endswith("/deleted/tenant=acme/asset_id=a.json") for p in deleted), deleted
    assert shard.state("acme", "a").revision == 0  # afresh: the old twin's five events are not its history
