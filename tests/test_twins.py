"""Live twins: ordering, de-duplication, late events, tenants, time travel and crash recovery.

References are computed in-process with the same `Twin` code applied to the distinct events in
key order, without Ray; twin states must match them bit for bit.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import jax
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from actors import TwinService, TwinState, UnknownTwin
from actors import service as service_module
from actors.progress import Busy, CallClock, probe_call, probed_actor, timed_calls
from actors.recovery import registration_record
from actors.shard import TwinShard, TwinShardProcess, asset_codes
from actors.telemetry import validated_table
from actors.twin import (CONFLICT, DUPLICATE, TOO_LATE, Restarted, Twin, _assimilate_next, apply_many, logged_event,
                         replay, state_view)
from raytwin import statestore
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.estimation import PackedState
from raytwin.registry import ModelArtifact, ModelRegistry
from raytwin.statestore import Snapshot, StateStore, from_micros, parse_snapshot_name, to_micros
from raytwin.sim import THERMAL_RC
from serve_apps.config import ServeConfig
from tests.domain_models import BOUNDED_RC

T0 = datetime(2026, 2, 1, tzinfo=UTC)
STEP_S = 60.0


@pytest.fixture(autouse=True)
def jax_on_cpu_like_the_shards():
    """Shards run JAX on the CPU (`raytwin.sim.cpu.CPU_ONLY_ENV`): in-process references do too, so
    that states compare bit for bit on a machine with a GPU as well."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    registry = ModelRegistry(str(tmp_path_factory.mktemp("registry")))
    return registry.register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))


def asset(asset_id: str, tenant: str = "acme") -> Asset:
    return Asset(id=asset_id, tenant=tenant, type_name="thermal_rc", type_version="1.0.0")


def events(asset_id: str, n: int, seed: int = 0, start: int = 0) -> list[TelemetryEvent]:
    rng = np.random.default_rng(seed)
    return [
        TelemetryEvent(
            asset_id=asset_id, event_time=T0 + timedelta(seconds=STEP_S * k), sequence=k,
            measurements={"T_in": {"value": 20.0 + 0.02 * k + rng.normal(0, 0.05), "unit": "degC"},
                          "T_out": {"value": 5.0 + rng.normal(), "unit": "degC"},
                          "Q_h": {"value": 1.5 * (k % 10 < 4), "unit": "kW"}},
        )
        for k in range(start, start + n)
    ]


def reference(art, asset_id: str, evs: list[TelemetryEvent], tenant: str = "acme", **kw) -> Twin:
    """The uninterrupted, in-order run: the filter over the distinct events (the first of each
    identity: event time, sequence, idempotency key) sorted by key."""
    twin = Twin(tenant, asset_id, art, **kw)
    distinct: dict = {}
    for e in evs:
        distinct.setdefault((e.event_time, e.sequence, e.idempotency_key), logged_event(e, art.asset_type))
    return replay(twin, sorted(distinct.values(), key=lambda e: e.key))


def feed(twin: Twin, batch: list[TelemetryEvent]) -> list[str | None]:
    """What a shard does with a batch, minus persistence: classify, then apply the applicable."""
    pending = [twin.pending(logged_event(e, twin.artifact.asset_type)) for e in batch]
    verdicts = twin.classify(pending)
    twin.apply([e for e, v in zip(pending, verdicts) if v is None])
    return verdicts


def assert_same_state(a, b) -> None:
    assert a.state == b.state and a.covariance == b.covariance and a.events_applied == b.events_applied
    assert a.divergence == b.divergence and a.event_time == b.event_time


# --------------------------------------------------------------------------- pure twin ----
def test_shuffled_and_duplicated_events_give_bit_identical_state(artifact):
    evs = events("z1", 120)
    ordered = reference(artifact, "z1", evs, checkpoint_every=8)
    shuffled = Twin("acme", "z1", artifact, checkpoint_every=8, allowed_lateness_s=1e6)
    stream = evs + random.Random(1).sample(evs, 30)  # 30 re-deliveries
    random.Random(2).shuffle(stream)
    verdicts = [v for i in range(0, len(stream), 7) for v in feed(shuffled, stream[i:i + 7])]
    assert verdicts.count(DUPLICATE) == 30 and verdicts.count(None) == 120
    assert_same_state(shuffled.view(), ordered.view())
    assert shuffled.view().revision == 120


def test_identity_is_key_time_and_sequence_and_other_content_is_a_conflict(artifact):
    """Same identity and content: duplicate; same identity, other content: conflict (in one batch
    or later); the same idempotency key with another time: a new event."""
    twin = Twin("acme", "z1", artifact, allowed_lateness_s=1e6)
    e = events("z1", 1)[0]
    other = TelemetryEvent(**{**e.model_dump(), "quality": "uncertain"})  # the same values, other quality
    later = e.model_copy(update={"event_time": e.event_time + timedelta(seconds=STEP_S)})
    assert feed(twin, [e, other, e]) == [None, CONFLICT, DUPLICATE]
    assert feed(twin, [later, other, e]) == [None, CONFLICT, DUPLICATE]
    assert twin.view().revision == 2


def test_late_events_merge_within_lateness_and_too_late_ones_are_refused(artifact):
    evs = events("z1", 40)
    twin = Twin("acme", "z1", artifact, allowed_lateness_s=10 * STEP_S, checkpoint_every=4)
    held_back = {33, 35}
    assert feed(twin, [e for e in evs if e.sequence not in held_back]) == [None] * 38
    # watermark = 39*60 - 600 s -> events >= 29 are within lateness
    assert feed(twin, [evs[35], evs[33]]) == [None, None]
    assert_same_state(twin.view(), reference(artifact, "z1", evs).view())
    before = twin.view()
    # older than the watermark: refused whether new or a forgotten re-delivery (the shard then
    # checks the durable log to tell the two apart)
    assert feed(twin, [evs[5]]) == [TOO_LATE]
    assert feed(twin, [evs[20].model_copy(update={"idempotency_key": "new"})]) == [TOO_LATE]
    assert_same_state(twin.view(), before)
    # bounded memory: only events after the oldest retained (sealed) checkpoint are kept
    assert len(twin.window) <= 10 + 4 and twin.checkpoints[0].key[0] < twin.watermark_us


def test_shard_process_freezes_its_heap_before_the_first_batch_after_registrations(tmp_path, artifact):
    """Full garbage collections must not scan JAX, Ray and the twins during live batches."""
    level = logging.getLogger("raytwin").level  # the process class sets up its logging
    shard = TwinShardProcess(str(tmp_path), 0, 1, allowed_lateness_s=3600.0, snapshot_every=16)
    try:
        shard.register("acme", "z1", registration_record(asset("z1"), artifact, None, None))
        assert not shard.heap_frozen
        assert shard.ingest("acme", validated_table(events("z1", 3))).accepted == 3
        assert shard.heap_frozen and gc.get_freeze_count() > 0
        shard.register("acme", "z2", registration_record(asset("z2"), artifact, None, None))
        assert not shard.heap_frozen  # frozen again before the next batch
    finally:
        gc.unfreeze()
        logging.getLogger("raytwin").setLevel(level)


def test_a_shard_logs_exactly_its_accepted_rows_whether_or_not_it_accepted_every_row(tmp_path, artifact):
    """A batch whose every row is accepted, in order (a live batch), is logged as it came; one with rows
    refused (a duplicate, an unknown twin) logs the accepted rows alone: the same rows either way."""
    shard = TwinShard(str(tmp_path), 0, 1, allowed_lateness_s=3600.0, snapshot_every=16)
    for a in ("z1", "z2"):
        shard.register("acme", a, registration_record(asset(a), artifact, None, None))
    z1, z2 = events("z1", 4), events("z2", 4, seed=1)
    assert shard.ingest("acme", validated_table([z1[0], z2[0], z1[1], z2[1]])).accepted == 4
    mixed = [z2[2], z1[1], events("z9", 1)[0], z1[2], z2[3], z1[3]]  # z1[1] again, an unknown twin
    report = shard.ingest("acme", validated_table(mixed))
    assert (report.accepted, report.duplicates, report.rejected) == (4, 1, 1)
    logged = shard.store.read_events_many("acme", {"z1": None, "z2": None})
    for a, evs in (("z1", z1), ("z2", z2)):
        assert [e.key for e in logged[a]] == [(to_micros(e.event_time), e.sequence, e.idempotency_key) for e in evs]
        assert [e.values for e in logged[a]] == [logged_event(e, artifact.asset_type).values for e in evs]


def stepped(evs: list[TelemetryEvent]) -> list[TelemetryEvent]:
    """The events with the room air 2 K warmer from k = 40 on: a drift alarm."""
    return [e.model_copy(update={"measurements": {**e.measurements, "T_in": e.measurements["T_in"].model_copy(
        update={"value": e.measurements["T_in"].value + 2.0 * (e.sequence >= 40)})}}) for e in evs]


@pytest.mark.parametrize("before_clear, late, clears", [(80, None, 1), (88, None, 1), (92, None, 1), (88, 85, 1),
                                                        (88, None, 2), (88, 85, 2)])
def test_drift_clear_survives_a_shard_restart_from_an_older_snapshot(tmp_path, artifact, before_clear, late, clears):
    """The clear is recorded in the store and replayed in place: the restarted shard (snapshot + log)
    holds the live one's state bit for bit, not a latched alarm; without the record it latches again.
    Found by a chaos trial, where a restart changed the twin's state: `late`, an event before the clear sent
    after it (the live twin rewound to a checkpoint the clear had changed and re-applied the events before the
    clear unalarmed, the process noise adapting where the alarm froze it); `clears` 2, a second clear 4 events
    after the first, no snapshot between them (the store kept the last clear alone)."""
    from actors.shard import TwinShard

    def shard() -> TwinShard:
        return TwinShard(str(tmp_path), 0, 1, allowed_lateness_s=LATENESS_S, snapshot_every=16, checkpoint_every=8)

    live = shard()
    live.register("acme", "z1", registration_record(asset("z1"), artifact, None, None))
    first = [e for e in stepped(events("z1", before_clear)) if e.sequence != late]
    live.ingest("acme", validated_table(first))
    assert live.state("acme", "z1").divergence.drift
    assert not live.clear_drift("acme", "z1").divergence.drift
    end = before_clear + 4 * (clears - 1)
    for start in range(before_clear, end, 4):
        live.ingest("acme", validated_table(stepped(events("z1", 4, start=start))))
        live.clear_drift("acme", "z1")
    # evidence after the clear counts; its checkpoints before the clear become sealed now: they are not
    # snapshots (a restart replays the clear where it happened)
    again = [e for e in stepped(events("z1", before_clear)) if e.sequence == late]
    assert live.ingest("acme", validated_table(again + stepped(events("z1", 4, start=end)))).accepted == 4 + (
        late is not None)
    assert live.store.latest_snapshot("acme", "z1").revision < before_clear  # recovery starts before the clear
    now = live.state("acme", "z1")
    assert_same_state(shard().state("acme", "z1"), now)
    live.store.fs.rm(live.store._drift_clear_path("acme", "z1"))
    assert shard().state("acme", "z1").divergence.drift  # what a restart did before the clear was durable


def test_drift_clears_before_the_pruned_history_are_dropped_and_no_read_of_the_twin_changes(tmp_path, artifact):
    """The clear record (and the live twin's list) grew one key per clear for good, the record rewritten whole and
    read whole at each clear and recovery. Keys before the tenant's pruned history cut are dropped, as the live twin's
    before its oldest checkpoint: recovery and a read back in time give the same state bit for bit with the trimmed
    record as with every key, and a read before the cut is still refused."""
    from raytwin.statestore import HistoryPruned

    def shard() -> TwinShard:
        return TwinShard(str(tmp_path), 0, 1, allowed_lateness_s=LATENESS_S, snapshot_every=16, checkpoint_every=8)

    def sent(start: int, n: int) -> list[TelemetryEvent]:  # a day starts at event 100, the air 3 K warmer again
        return [e.model_copy(update={"event_time": e.event_time - timedelta(minutes=100), "measurements": {
            **e.measurements, "T_in": e.measurements["T_in"].model_copy(
                update={"value": e.measurements["T_in"].value + 3.0 * (e.sequence >= 100)})}})
                for e in stepped(events("z1", n, start=start))]

    def us(k: int) -> int:
        return to_micros(sent(k, 1)[0].event_time)

    live = shard()
    live.register("acme", "z1", registration_record(asset("z1"), artifact, None, None))
    for start, n in ((0, 80), (80, 10), (90, 50), (140, 8)):  # cleared after events 79, 89, 139, 147
        live.ingest("acme", validated_table(sent(start, n)))
        if start == 90:
            assert live.state("acme", "z1").divergence.drift  # latched again: the clear at 139 decides the state
            assert live.store.prune("acme", sent(100, 1)[0].event_time.date()).history_from is not None
        live.clear_drift("acme", "z1")
    keys = {k: (us(k), k, sent(k, 1)[0].idempotency_key) for k in (79, 89, 139, 147)}
    assert live.store.load_drift_clears("acme", "z1") == [keys[139], keys[147]]  # those of the day pruned dropped
    assert live.twins["acme", "z1"].clears == [keys[139], keys[147]]  # before its oldest checkpoint: dropped
    assert live.store.latest_snapshot("acme", "z1", at_or_before_us=us(143)).key < keys[139]  # replays the clear

    def reads() -> list[TwinState]:
        return [shard().state("acme", "z1"), shard().state_at("acme", "z1", us(143))]

    trimmed = reads()
    assert_same_state(trimmed[0], live.state("acme", "z1"))
    live.store.fs.pipe_file(live.store._drift_clear_path("acme", "z1"), json.dumps(
        {"key": list(keys[147]), "keys": [list(k) for k in keys.values()]}).encode())  # every clear kept
    for a, b in zip(reads(), trimmed):
        assert_same_state(a, b)
    with pytest.raises(HistoryPruned):
        shard().state_at("acme", "z1", us(95))


def test_a_replay_of_one_event_at_a_drift_clears_point_clears_there(artifact):
    """A recovery whose snapshot is one event before a clear replays that event alone: it clears at it as the
    live twin did, not on the one-event path (`takes_next`, `_each_next`), which knows no clears."""
    evs = [logged_event(e, artifact.asset_type) for e in stepped(events("z1", 60))]
    live = Twin("acme", "z1", artifact)
    replay(live, evs)
    assert live.drift
    live.clear_drift()
    recovered = Twin("acme", "z1", artifact)
    replay(recovered, evs[:-1])
    recovered.replay_clears([live.last_key])
    last = recovered.pending(evs[-1])
    assert not recovered.takes_next(last.key)
    recovered.apply([last])
    assert not recovered.drift
    assert_same_state(recovered.view(), live.view())


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """`tests.domain_models.BOUNDED_RC`: NaN above 300 K."""
    registry = ModelRegistry(str(tmp_path_factory.mktemp("bounded")))
    return registry.register("bounded", "1.0.0", AssetType.from_model(BOUNDED_RC))


def heated(evs: list[TelemetryEvent], degc: float) -> list[TelemetryEvent]:
    """The events with the room air measured at `degc`."""
    return [e.model_copy(update={"measurements": {**e.measurements, "T_in": e.measurements["T_in"].model_copy(
        update={"value": degc})}}) for e in evs]


class CountedDeadLetters:
    """Records `metrics.DEAD_LETTERS.inc` by (stage, reason) in this process."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], float] = {}

    def inc(self, value: float = 1.0, *, stage: str, reason: str) -> None:
        self.counts[stage, reason] = self.counts.get((stage, reason), 0.0) + value

    def zero(self, *tag_sets: dict[str, str]) -> None:
        pass


BOUNDED_OPTS = {"allowed_lateness_s": 2 * STEP_S, "snapshot_every": 4, "checkpoint_every": 2}


def bounded_shard(store: str, bounded) -> TwinShard:
    """A shard (snapshots every 4 events, sealed after 2 minutes) holding twin b1 of `BOUNDED_RC`."""
    shard = TwinShard(store, 0, 1, **BOUNDED_OPTS)
    shard.register("acme", "b1", registration_record(
        Asset(id="b1", tenant="acme", type_name="bounded_rc", type_version="1.0.0"), bounded, None, None))
    return shard


def test_events_the_model_is_not_defined_for_are_refused_and_later_ones_apply(tmp_path, bounded, caplog,
                                                                               monkeypatch):
    """The researcher's case: the air measured at 40 degC, where the model's derivative is NaN. Before, the
    twin became NaN for good and ingest said "accepted". Now each such event is refused (dead letter, report,
    warning, metric reason `non_finite`), the twin keeps its last finite state, later events apply, and a
    restarted shard (snapshot + log replay, which refuses the same events) holds the live state bit for bit."""
    from raytwin import metrics

    counted = CountedDeadLetters()
    monkeypatch.setattr(metrics, "DEAD_LETTERS", counted)
    live = bounded_shard(str(tmp_path), bounded)
    evs = events("b1", 25)
    assert live.ingest("acme", validated_table(evs[:10])).accepted == 10
    before = live.state("acme", "b1")
    with caplog.at_level(logging.WARNING, logger="raytwin.twins"):
        report = live.ingest("acme", validated_table(heated(evs[10:20], 40.0)))
    assert (report.accepted, report.rejected) == (0, 10)
    first = report.reasons[0].reason
    assert first.startswith("non-finite update: the model's update of b1 at 2026-02-01T00:10:00+00:00 gave ")
    assert "for T_in, T_m: the model is not defined there" in first and "keeps its state before this event" in first
    assert caplog.text.count("event=update_refused") == 10
    assert counted.counts["shard", "non_finite"] == 10
    letters = live.store.read_dead_letters("acme").column("reason").to_pylist()
    assert len(letters) == 10 and all(r.startswith("non-finite update") for r in letters)
    kept = live.state("acme", "b1")
    assert kept.state == before.state and not kept.divergence.diverged
    assert all(kept.std[n] > before.std[n] for n in kept.std)  # less certain for the time it could not follow

    report = live.ingest("acme", validated_table(evs[20:]))
    assert (report.accepted, report.rejected) == (5, 0)
    now = live.state("acme", "b1")
    assert all(math.isfinite(v) for v in now.state.values()) and not now.divergence.diverged
    assert now.revision == 25  # refused events keep their place in the order (they are logged)
    assert live.store.latest_snapshot("acme", "b1").revision > 10  # recovery replays some refused events
    assert_same_state(TwinShard(str(tmp_path), 0, 1, **BOUNDED_OPTS).state("acme", "b1"), now)


def test_a_twin_given_an_hours_old_reading_first_tracks_the_fresh_ones_after_it(tmp_path):
    """The tester's case (an OPC UA source's queued reading 3 h old, then live ones): a two_tank twin's
    prediction over the 3 h drains its tanks to 0 where the EKF's covariance is NaN. The first fresh reading was
    refused and the twin kept the old level; now none is refused, the twin is finite and tracks the fresh
    levels, and its state equals the same events' replay (what recovery applies)."""
    from raytwin.sim import TWO_TANK

    tanks = ModelRegistry(str(tmp_path)).register("tank", "1.0.0", AssetType.from_model(TWO_TANK))
    old = TelemetryEvent(asset_id="t1", event_time=T0 - timedelta(hours=3), sequence=0,
                         measurements={"h1": {"value": 0.5, "unit": "m"}, "h2": {"value": 0.4, "unit": "m"}})
    fresh = [TelemetryEvent(asset_id="t1", event_time=T0 + timedelta(seconds=k), sequence=k + 1,
                            measurements={"h1": {"value": 0.45, "unit": "m"}, "h2": {"value": 0.35, "unit": "m"},
                                          "q_in": {"value": 1.2e-4, "unit": "m^3/s"}}) for k in range(5)]
    twin = Twin("acme", "t1", tanks)
    applied = []
    for batch in ([old], fresh):
        pending = [twin.pending(logged_event(e, tanks.asset_type)) for e in batch]
        assert twin.classify(pending) == [None] * len(pending)
        applied.append(apply_many([(twin, pending)]))
    assert [a.refused for a in applied] == [[], []]  # nothing refused
    # the first fresh reading restarted the filter, 3 h after the old one: the shard counts and logs it
    assert applied[0].restarted == [] and applied[1].restarted == [Restarted(twin, pending[0], 3 * 3600.0)]
    state = twin.view()
    assert twin.fs.divergence.restarts == state.divergence.restarts == 1 and not state.divergence.diverged
    assert all(math.isfinite(v) for v in [*state.state.values(), *state.std.values()])
    assert abs(state.state["h1"] - 0.45) < 5e-3 and abs(state.state["h2"] - 0.35) < 5e-3
    assert_same_state(reference(tanks, "t1", [old, *fresh]).view(), state)


class CountedRestarts:
    """Records `metrics.FILTER_RESTARTS.inc` by simulator in this process, and the simulators exported at 0."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.zeroed: list[str] = []

    def inc(self, value: float = 1.0, *, simulator: str) -> None:
        self.counts[simulator] = self.counts.get(simulator, 0.0) + value

    def zero(self, *tag_sets: dict[str, str]) -> None:
        self.zeroed += [tags["simulator"] for tags in tag_sets]


def test_a_shard_counts_logs_and_reports_a_filter_restarted_after_a_gap(tmp_path, caplog, monkeypatch):
    """An operator sees a twin re-anchored on a fresh reading after a gap its prediction did not survive: the
    shard counts it by simulator (`metrics.FILTER_RESTARTS`), logs `event=filter_restarted` with the twin and
    the gap, and the twin's divergence report (the API's) gives its `restarts`. A late event that re-applies the
    restarted one (a rewind to the prior: no checkpoint in between) does not count it again. The series is exported
    at 0 for the simulators the shard runs, when a twin of one first comes (a registration) and when a shard
    starts: a first restart then shows in `increase()`, which the alert on restarts reads."""
    from raytwin import metrics
    from raytwin.sim import TWO_TANK

    counted = CountedRestarts()
    monkeypatch.setattr(metrics, "FILTER_RESTARTS", counted)
    tanks = ModelRegistry(str(tmp_path / "registry")).register("tank", "1.0.0", AssetType.from_model(TWO_TANK))
    shard = TwinShard(str(tmp_path / "store"), 0, 1, **{**BOUNDED_OPTS, "checkpoint_every": 64})
    assert counted.zeroed == []  # no twin, no simulator
    shard.register("acme", "t1", registration_record(
        Asset(id="t1", tenant="acme", type_name="two_tank", type_version="1.0.0"), tanks, None, None))
    assert counted.zeroed == ["two_tank"]
    levels = {"h1": {"value": 0.45, "unit": "m"}, "h2": {"value": 0.35, "unit": "m"}}
    at = [T0, T0 + timedelta(hours=3), T0 + timedelta(hours=3, seconds=20), T0 + timedelta(hours=3, seconds=10)]
    evs = [TelemetryEvent(asset_id="t1", event_time=t, sequence=k, measurements=levels) for k, t in enumerate(at)]
    with caplog.at_level(logging.WARNING, logger="raytwin.twins"):
        for e in evs:  # the last one late
            assert shard.ingest("acme", validated_table([e])).accepted == 1
    assert counted.counts == {"two_tank": 1.0}
    assert caplog.text.count("event=filter_restarted") == 1
    assert "tenant=acme asset=t1 event_time=2026-02-01T03:00:00+00:00 gap_s=10800.000" in caplog.text
    assert shard.state("acme", "t1").divergence.restarts == 1
    assert counted.zeroed == ["two_tank"]  # once per process
    counted.zeroed.clear()
    TwinShard(str(tmp_path / "store"), 0, 1, **{**BOUNDED_OPTS, "checkpoint_every": 64})  # a restarted shard
    assert counted.zeroed == ["two_tank"] and counted.counts == {"two_tank": 1.0}  # replay counts nothing


def test_a_state_outside_its_declared_range_is_named_in_the_divergence_report():
    """A cell held at 2.5 A for an hour past what it holds: the model integrates the current with nothing pulling
    its charge back, so soc reaches -0.5, finite and outside the range the model declares (-0.1 to 1.1: values a
    cell cannot take). The twin's report names it (`outside_range`) instead of showing a plausible-looking healthy
    twin; the estimate itself is not clamped (a model's `project` holds its hard limits). In range, or NaN (a
    diverged filter, which `diverged` says), nothing is named."""
    from raytwin.estimation import ExtendedKalmanFilter
    from raytwin.sim import BATTERY_ECM

    f = ExtendedKalmanFilter(BATTERY_ECM, BATTERY_ECM.param_vector())
    start = f.initial(inputs={"i": 2.5})._replace(t=0.0)
    drained = f.predict(start, 3600.0)
    assert np.isfinite(drained.x).all() and drained.x[0] < BATTERY_ECM.states[0].lower
    view = lambda fs: state_view("acme", "b1", "cell@1.0.0", BATTERY_ECM, fs, None, 1).divergence  # noqa: E731
    assert view(start).outside_range == [] and view(drained).outside_range == ["soc"]
    assert view(start._replace(x=np.array([1.2, 0.0, 100.5]))).outside_range == ["soc", "v2"]  # above, too
    assert view(start._replace(x=np.array([np.nan, 0.0, 0.0]))).outside_range == []


def test_twins_taking_one_event_each_get_the_bits_of_the_general_path(artifact, bounded, monkeypatch):
    """A call where each twin takes one event after its last (a live batch's usual shape) is applied as
    columns over all twins (`actors.twin._assimilate_next`): the same states, checkpoints, windows and
    refused events as the general path (a `Twin._plan` per twin), from the prior and from packed states,
    with bad quality, a missing reading, checkpoints, pruning and events the model refuses. A checkpoint at a
    run's last event keeps that row packed, copied out of its dispatch's rows (`PackedState.detached`)."""
    import actors.twin as twin_module

    def twins() -> list[Twin]:
        return [Twin("acme", f"z{i}", artifact, checkpoint_every=3, allowed_lateness_s=2 * STEP_S) for i in range(4)] + [
            Twin("acme", "b1", bounded, checkpoint_every=3, allowed_lateness_s=2 * STEP_S)]

    streams = [events(f"z{i}", 12, seed=i) for i in range(4)] + [events("b1", 12, seed=9)]
    streams[1][4] = streams[1][4].model_copy(update={"quality": "bad"})
    streams[2][5] = streams[2][5].model_copy(update={"measurements": {"T_in": streams[2][5].measurements["T_in"]}})
    streams[4][6:9] = heated(streams[4][6:9], 40.0)
    columnar = []
    monkeypatch.setattr(twin_module, "_assimilate_next", lambda *a: columnar.append(1) or _assimilate_next(*a))
    results = []
    for each_next in (twin_module._each_next, lambda todo: False):
        monkeypatch.setattr(twin_module, "_each_next", each_next)
        live, refused = twins(), []
        for k in range(12):
            batch = [(t, [t.pending(logged_event(s[k], t.artifact.asset_type))]) for t, s in zip(live, streams)]
            refused += [(r.twin.asset_id, r.event.key, r.why) for r in apply_many(batch).refused]
        results.append((live, refused))
    (fast, fast_refused), (general, general_refused) = results
    assert len(columnar) == 12 and len(fast_refused) == 3 and fast_refused == general_refused
    for a, b in zip(fast, general, strict=True):
        assert_same_state(a.view(), b.view())
        for x, y in zip((a.fs.x, a.fs.P, a.fs.u), (b.fs.x, b.fs.P, b.fs.u)):
            assert x.tobytes() == y.tobytes()
        assert [(c.key, c.events_applied, c.fs.x.tobytes(), c.fs.P.tobytes(), c.fs.u.tobytes(), repr(c.fs.divergence))
                for c in a.checkpoints] == [(c.key, c.events_applied, c.fs.x.tobytes(), c.fs.P.tobytes(),
                                             c.fs.u.tobytes(), repr(c.fs.divergence)) for c in b.checkpoints]
        taken = [c.state for twin in (a, b) for c in twin.checkpoints if c.key is not None]
        assert taken and all(type(s) is PackedState and len(s.rows.carry) == 1 for s in taken)
        assert [e.key for e in a.window] == [e.key for e in b.window]
        assert (a.last_key, a.max_time_us, a.drift) == (b.last_key, b.max_time_us, b.drift)


def test_takes_next_is_an_event_classify_accepts_and_apply_runs_without_a_rewind_or_a_swap(artifact):
    """`Twin.takes_next` (the shard's live path decides an event with it instead of `classify`) is exactly:
    `classify` accepts the event alone and `apply_many` would run it as the twin's next (`_each_next`), for
    a fresh twin, re-deliveries, late events inside and beyond the window, ties on time and sequence, a
    twin whose later events run another model and a migration floor."""
    import actors.twin as twin_module

    fresh = Twin("acme", "z0", artifact, allowed_lateness_s=5 * STEP_S)
    fed = Twin("acme", "z1", artifact, allowed_lateness_s=5 * STEP_S, checkpoint_every=3)
    feed(fed, events("z1", 12))
    swapped = Twin("acme", "z2", artifact, allowed_lateness_s=5 * STEP_S)
    feed(swapped, events("z2", 4))
    swapped.add_swap(to_micros(T0 + timedelta(seconds=STEP_S * 20)), artifact)
    floored = Twin("acme", "z3", artifact, allowed_lateness_s=5 * STEP_S)
    floored.floor = (to_micros(T0 + timedelta(seconds=STEP_S * 30)), 0, "")
    last_us, seq, key = fed.last_key
    values = fed.window[-1].values
    keys = [fed.last_key, fed.window[-3].key, (last_us - 2 * 60_000_000, 99, "new"),
            (last_us - 9 * 60_000_000, 0, "old"), (last_us, seq, key + "x"), (last_us, seq + 1, ""),
            (last_us + 1, 0, key), (to_micros(T0 + timedelta(seconds=STEP_S * 40)), 0, "far")]
    decided = []
    for twin in (fresh, fed, swapped, floored):
        for k in keys:
            ev = twin_module.Pending(k, values, "good")
            expected = twin.classify([ev]) == [None] and twin_module._each_next([(twin, [ev])])
            assert twin.takes_next(k) == expected, (twin.asset_id, k)
            decided.append(expected)
    assert any(decided) and not all(decided)


def test_asset_codes_are_what_arrows_dictionary_encoding_gives():
    """The shard's asset ids and row codes (a Python dict) equal Arrow's `dictionary_encode`'s, chunks included."""
    column = pa.chunked_array([["b", "a", "b"], ["c", "a", "d"]])
    encoded = column.combine_chunks().dictionary_encode()
    assets, code = asset_codes(column)
    assert assets == encoded.dictionary.to_pylist() == ["b", "a", "c", "d"]
    assert code.dtype == encoded.indices.to_numpy().dtype and code.tolist() == encoded.indices.to_pylist()


def test_a_shard_deciding_live_rows_without_classify_gives_what_classify_gives(tmp_path, monkeypatch):
    """A batch with one row a twin (a live call's shape) is admitted with `Twin.takes_next` where it applies
    next (the whole batch at once where every row does: `TwinShard._admit_next`): the same reports, change records, states, drift flags, log and dead letters as deciding every
    row with `classify`, over batches with re-deliveries, conflicts, late, very late and misfit rows."""
    from benchmarks.shard_call import TENANT, messy_rows, raw_table
    from actors.telemetry import validate_table

    rng, sent = random.Random(3), []
    batches = [validate_table(raw_table(messy_rows(rng, 6, step, sent)))[0] for step in range(60)]
    taken = []

    def run(store: str) -> tuple:
        shard = TwinShard(store, 0, 1, allowed_lateness_s=600.0, snapshot_every=5, checkpoint_every=3)
        art = ModelRegistry(f"{store}/registry").register("zone", "1.0.0", AssetType.from_model(THERMAL_RC))
        assets = [f"zone-{i:05d}" for i in range(6)]
        shard.register_many([(TENANT, a, registration_record(
            Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), art, None, None))
            for a in assets])
        reports = [(shard.ingest(TENANT, b, states=True), sorted(shard.drifting)) for b in batches]
        letters = shard.store.read_dead_letters(TENANT).drop_columns("dead_lettered_at").to_pylist()
        return (reports, [shard.state(TENANT, a) for a in assets], sorted(map(repr, letters)),
                [shard.store.read_events(TENANT, a) for a in assets])

    real, admit_next, at_once = Twin.takes_next, TwinShard._admit_next, []
    monkeypatch.setattr(Twin, "takes_next", lambda twin, key: taken.append(real(twin, key)) or taken[-1])
    monkeypatch.setattr(TwinShard, "_admit_next", staticmethod(lambda *a: at_once.append(admit_next(*a)) or at_once[-1]))
    live = run(str(tmp_path / "live"))
    monkeypatch.setattr(Twin, "takes_next", lambda twin, key: False)
    assert live == run(str(tmp_path / "classified"))
    assert taken.count(True) > 50 and taken.count(False) > 5
    assert at_once.count(True) > 5  # whole batches admitted at once (`TwinShard._admit_next`)


def test_a_live_batch_over_twins_of_two_models_gets_the_states_of_separate_batches(tmp_path, artifact):
    """One row a twin over twins whose models measure different columns (a thermal zone: 4, a two-tank
    system: 3), a live call's shape on a shard of mixed types, is applied (it raised a ValueError: the columnar
    path stacked the rows into one matrix) with the states each model's rows give in batches of their own."""
    from raytwin.sim import TWO_TANK

    tanks = ModelRegistry(str(tmp_path / "registry")).register("tank", "1.0.0", AssetType.from_model(TWO_TANK))
    at = [T0 + timedelta(seconds=STEP_S * k) for k in range(4)]
    zones = events("z1", 4)
    levels = [TelemetryEvent(asset_id="t1", event_time=t, sequence=k, measurements={
        "h1": {"value": 0.45 - 0.01 * k, "unit": "m"}, "q_in": {"value": 1e-4, "unit": "m^3/s"}})
        for k, t in enumerate(at)]

    def run(store: str, batches: list[list[TelemetryEvent]]) -> list[TwinState]:
        shard = TwinShard(store, 0, 1, **BOUNDED_OPTS)
        shard.register("acme", "z1", registration_record(asset("z1"), artifact, None, None))
        shard.register("acme", "t1", registration_record(
            Asset(id="t1", tenant="acme", type_name="two_tank", type_version="1.0.0"), tanks, None, None))
        assert sum(shard.ingest("acme", validated_table(b)).accepted for b in batches) == 8
        return [shard.state("acme", a) for a in ("z1", "t1")]

    together = run(str(tmp_path / "together"), [[z, t] for z, t in zip(zones, levels)])
    for a, b in zip(together, run(str(tmp_path / "apart"), [[e] for e in zones + levels]), strict=True):
        assert_same_state(a, b)


class _AfterMidnight(datetime):
    """The store's clock 30 s into the next UTC day: a retry that comes just after midnight."""

    @classmethod
    def now(cls, tz=None):
        today = datetime.now(UTC).date()
        return datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1, seconds=30)


@pytest.mark.parametrize(("crash_after", "retry_tomorrow"), [("append_log", False), ("write_dead_letters", False),
                                                             ("write_dead_letters", True)])
def test_a_shard_killed_between_its_log_and_dead_letter_writes_loses_and_doubles_no_dead_letter(
        tmp_path, bounded, monkeypatch, crash_after, retry_tomorrow):
    """The shard dies right after one of its two writes of a batch whose events the filter refuses; Ray restarts
    it (snapshot + log) and retries the call. Before, the log was written first: the retry found the refused
    events logged, called them duplicates, and their dead letters were never written. Now each refused event
    has exactly one dead letter either way (the retry's replace the killed call's file), also when the retry
    comes after UTC midnight (its file went to the next day's partition, beside the first: two copies)."""
    live = bounded_shard(str(tmp_path), bounded)
    evs = events("b1", 20)
    live.ingest("acme", validated_table(evs[:10]))
    write = getattr(live.store, crash_after)

    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        raise SystemExit("shard process killed")

    setattr(live.store, crash_after, write_then_die)
    batch = validated_table(heated(evs[10:], 40.0))
    with pytest.raises(SystemExit):
        live.ingest("acme", batch)
    live.store.close_segments()
    if retry_tomorrow:
        monkeypatch.setattr(statestore, "datetime", _AfterMidnight)
    retried = bounded_shard(str(tmp_path), bounded).ingest("acme", batch)
    assert retried.accepted == 0 and retried.rejected + retried.duplicates == 10
    letters = StateStore(str(tmp_path)).read_dead_letters("acme")
    assert sorted(letters.column("idempotency_key").to_pylist()) == sorted(e.idempotency_key for e in evs[10:])
    assert all(r.startswith("non-finite update") for r in letters.column("reason").to_pylist())


def test_a_twin_an_older_version_left_nan_recovers_from_its_last_finite_snapshot(tmp_path, bounded):
    """A version before refused updates stored such a twin's NaN state in its snapshots. Recovery (a shard
    restart) and reads while the shard is down pass over non-finite snapshots to the last finite one (or the
    prior): the log replay refuses the events that broke it, so the twin recovers with every event kept."""
    from actors.recovery import durable_state
    from actors.twin import decode_snapshot

    live = bounded_shard(str(tmp_path), bounded)
    evs = events("b1", 30)
    for part in (evs[:10], heated(evs[10:20], 40.0), evs[20:]):
        live.ingest("acme", validated_table(part))
    now, store = live.state("acme", "b1"), live.store
    fault_us = to_micros(evs[10].event_time)
    directory = store._asset_dir("snapshots", "acme", "b1")
    corrupted = 0
    for name in store.fs.ls(directory, detail=False):  # every snapshot from the fault on, as that version left them
        us, _ = parse_snapshot_name(name.rsplit("/", 1)[-1])
        if us >= fault_us:
            snap = store.latest_snapshot("acme", "b1", at_or_before_us=us)
            store.write_snapshot("acme", "b1", Snapshot(snap.key, snap.revision, {
                **snap.payload, "x": [math.nan] * 2, "P": [[math.nan] * 2] * 2}))
            corrupted += 1
    assert corrupted >= 2 and not np.isfinite(decode_snapshot(store.latest_snapshot("acme", "b1").payload).x).any()
    restarted = TwinShard(str(tmp_path), 0, 1, **BOUNDED_OPTS)
    assert_same_state(restarted.state("acme", "b1"), now)
    stale = durable_state(store, "acme", "b1")
    assert all(math.isfinite(v) for v in stale.state.values()) and 0 < stale.revision <= 10


@pytest.mark.parametrize("cut_to", [0.0, 0.5], ids=["empty", "truncated"])
def test_an_unreadable_snapshot_is_skipped_and_its_shards_other_twins_recover(tmp_path, artifact, cut_to, caplog):
    """A zero-length or cut snapshot (a crash during a non-atomic write, a full disk) put its whole shard in a
    recovery crash loop and failed the twin's stale reads: recovery and reads pass over it to the snapshot
    before it (replaying the log after that), and one error line names the file and where recovery started."""
    from actors.recovery import durable_state

    opts = {"allowed_lateness_s": 2 * STEP_S, "snapshot_every": 8, "checkpoint_every": 2}
    shard = TwinShard(str(tmp_path), 0, 1, **opts)
    for seed, a in enumerate(("s1", "s2")):
        shard.register("acme", a, registration_record(asset(a), artifact, None, None))
        for start in (0, 10, 20):  # a snapshot per call at most
            shard.ingest("acme", validated_table(events(a, 10, seed=seed, start=start)))
    before = {a: shard.state("acme", a) for a in ("s1", "s2")}
    directory = shard.store._asset_dir("snapshots", "acme", "s1")
    *_, previous, newest = sorted(os.listdir(directory), key=parse_snapshot_name)
    with open(f"{directory}/{newest}", "r+b") as f:
        f.truncate(int(cut_to * os.path.getsize(f"{directory}/{newest}")))
    with caplog.at_level(logging.ERROR, logger="raytwin.store"):
        restarted = TwinShard(str(tmp_path), 0, 1, **opts)
        for a in ("s1", "s2"):
            assert_same_state(restarted.state("acme", a), before[a])
        stale = durable_state(shard.store, "acme", "s1")
    assert stale.stale and stale.revision == parse_snapshot_name(previous)[1]
    [record] = [r for r in caplog.records if "event=snapshot_unreadable" in r.getMessage()]
    assert record.levelno == logging.ERROR and f"file={newest}" in record.getMessage()
    assert f"starts_from={previous}" in record.getMessage()


# ------------------------------------------------------------------------ on Ray ----
LATENESS_S = 10 * STEP_S
TWIN_OPTS = {"allowed_lateness_s": LATENESS_S, "checkpoint_every": 8}


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory, artifact):
    svc = TwinService(str(tmp_path_factory.mktemp("twins")), shards=2, snapshot_every=16, **TWIN_OPTS)
    for a in ("z1", "z2"):
        svc.register(asset(a), artifact)
    svc.register(asset("z1", tenant="beta"), artifact)
    yield svc
    svc.close()


def test_a_prior_outside_the_types_plausible_ranges_is_refused_before_anything_is_stored(artifact):
    """A twin must not start where its telemetry would be refused: 2930 K and -1e308 K were accepted."""
    with pytest.raises(ValueError, match=r"initial_state.T_in=2930 K outside the plausible range \[173.15, 473.15\] "
                                         r"K; initial_state.T_m=-1e\+308 K outside"):
        registration_record(asset("hot"), artifact, {"T_in": 2930.0, "T_m": -1e308}, None)
    assert registration_record(asset("ok"), artifact, {"T_in": 473.15, "T_m": 173.15}, None)["initial_state"]


def test_register_is_idempotent_and_tenants_are_isolated(service, artifact):
    service.register(asset("z1"), artifact)  # attach: no error, no reset
    with pytest.raises(ValueError, match="different"):
        service.register(asset("z1"), artifact, initial_state={"T_in": 300.0, "T_m": 300.0})
    assert service.assets("acme") == ["z1", "z2"] and service.assets("beta") == ["z1"]
    for tenant, asset_id in (("beta", "z2"), ("gamma", "z1"), ("acme", "nope")):
        with pytest.raises(UnknownTwin, match=f"no twin '{asset_id}' for tenant '{tenant}'"):
            service.state(tenant, asset_id)
    service.register(asset("tmp"), artifact)
    service.unregister("acme", "tmp")
    with pytest.raises(UnknownTwin):
        service.unregister("acme", "tmp")


def test_service_dedups_merges_late_events_dead_letters_and_time_travels(service, artifact):
    evs = events("z2", 60, seed=3)
    beta = events("z1", 5, seed=4)
    report = service.ingest("acme", [e for e in evs if e.sequence != 55])
    assert (report.accepted, report.duplicates, report.rejected) == (59, 0, 0)
    # 55 is late but within lateness; 50-54 are duplicates, and so is 10, older than the watermark
    # and forgotten in memory, but found in the durable log
    report = service.ingest("acme", evs[50:56] + [evs[10]])
    assert (report.accepted, report.duplicates, report.rejected) == (1, 6, 0)
    report = service.ingest("acme", [evs[10].model_copy(update={"idempotency_key": "z2:late"})])
    assert report.rejected == 1 and report.reasons[0].reason.startswith("too late: event time ")
    service.ingest("beta", beta)

    state = service.state("acme", "z2")
    ref = reference(artifact, "z2", evs, **TWIN_OPTS)
    assert_same_state(state, ref.view())
    assert state.revision == 60 and state.model_ref == "zone@1.0.0"
    assert service.state("beta", "z1").events_applied == 5 and service.state("acme", "z1").events_applied == 0

    dead = service.dead_letters("acme").to_pylist()
    assert [d["idempotency_key"] for d in dead] == ["z2:late"] and dead[0]["reason"] == report.reasons[0].reason
    newest = service.state("acme", "z2").event_time.isoformat()  # nothing newer was ingested since
    assert dead[0]["reason"] == (f"too late: event time {evs[10].event_time.isoformat()} is more than the allowed "
                                 f"lateness ({LATENESS_S:g} s) before the newest event time the twin applied ({newest}), "
                                 "and the event is not in the log; a twin applies events in time order, so send events "
                                 "within the lateness window (the service's allowed_lateness_s)")
    assert '"sequence":10' in dead[0]["raw"]

    # time travel: the durable snapshots + log give the state of a replay up to that time
    service.flush()
    assert service.store.latest_snapshot("acme", "z2") is not None
    for k in (0, 20, 47):
        t = T0 + timedelta(seconds=STEP_S * k + 1)
        assert_same_state(service.state_at("acme", "z2", t),
                          reference(artifact, "z2", evs[: k + 1], **TWIN_OPTS).view())
    assert service.state_at("acme", "z2", T0 - timedelta(days=1)).event_time is None


def test_reused_keys_are_new_events_and_conflicting_redeliveries_are_dead_lettered(service, artifact):
    """A rebooted device re-uses idempotency keys with new times: applied live, recovered and kept
    by compaction (revision 130 everywhere). A re-delivery of an applied identity with other
    content is a conflict, dead-lettered, whether still in memory or only in the log."""
    from actors.recovery import recover

    service.register(asset("reboot"), artifact)
    try:
        first = events("reboot", 100, seed=21)
        rebooted = [e.model_copy(update={"event_time": e.event_time + timedelta(seconds=STEP_S * 100)})
                    for e in events("reboot", 30, seed=22)]  # sequences 0..29 again: keys reboot:0..29
        assert service.ingest("acme", first).accepted == 100
        report = service.ingest("acme", rebooted)
        assert (report.accepted, report.duplicates, report.rejected) == (30, 0, 0)

        def changed(e):
            return TelemetryEvent(**{**e.model_dump(), "measurements": {"T_in": {"value": 99.0, "unit": "degC"}}})

        # rebooted[20] is in the twin's window; first[10] is beyond it, found in the log
        report = service.ingest("acme", [changed(rebooted[20]), changed(first[10]), rebooted[21], first[11]])
        assert (report.accepted, report.duplicates, report.rejected, report.conflicts) == (0, 2, 2, 2)
        assert [r.reason.split(" (event time")[0] for r in report.reasons] == [
            "conflict: idempotency key 'reboot:20' was already applied with different content",
            "conflict: idempotency key 'reboot:10' was already applied with different content"]
        assert "must give them distinct sequences or keys" in report.reasons[0].reason
        dead = service.dead_letters("acme").filter(pc.field("asset_id") == "reboot").to_pylist()
        assert [d["idempotency_key"] for d in dead] == ["reboot:20", "reboot:10"] and '99.0' in dead[0]["raw"]

        live = service.state("acme", "reboot")
        assert live.revision == 130
        assert_same_state(live, reference(artifact, "reboot", first + rebooted, **TWIN_OPTS).view())
        record = service.store.load_registration("acme", "reboot")
        assert_same_state(recover(service.store, record, **TWIN_OPTS).view(), live)
        service.store.compact(tenant="acme")
        assert_same_state(recover(service.store, record, **TWIN_OPTS).view(), live)
    finally:
        service.unregister("acme", "reboot")


def test_unknown_assets_and_bad_units_are_dead_lettered(service):
    bad_unit = TelemetryEvent(asset_id="z1", event_time=T0, sequence=1, idempotency_key="bad-unit",
                              measurements={"T_in": {"value": 1.0, "unit": "V"}})
    report = service.ingest("acme", [events("ghost", 1)[0], bad_unit])
    assert report.rejected == 2 and report.accepted == 0
    reasons = {r.idempotency_key: r.reason for r in report.reasons}
    assert reasons["ghost:0"] == "unknown twin 'ghost' for tenant 'acme'"
    assert "cannot convert 'V' to 'K'" in reasons["bad-unit"]


def test_the_python_api_refuses_a_retype_the_twins_history_does_not_replay_on(service, artifact, tmp_path):
    """Only the HTTP API checked that a twin's logged history means the same on the new type version:
    `TwinService.retype` replayed a room's temperatures on a two-tank model. The service checks now, so
    every caller is refused alike (`IncompatibleReplay`, naming each difference and the migration), with
    nothing changed; a version the history replays on is taken."""
    from raytwin.compat import IncompatibleReplay
    from raytwin.sim.tanks import TWO_TANK

    registry = ModelRegistry(str(tmp_path / "models"))
    tanks = registry.register("zone", "2.0.0", AssetType.from_model(TWO_TANK, name="thermal_rc", version="2.0.0"))
    service.register(asset("rt-api"), artifact)
    assert service.ingest("acme", events("rt-api", 20, seed=29)).accepted == 20
    before, record = service.state("acme", "rt-api"), service.store.load_registration("acme", "rt-api")
    with pytest.raises(IncompatibleReplay) as refused:
        service.retype(asset("rt-api").model_copy(update={"type_version": "2.0.0"}), tanks)
    assert [(d.where, d.change) for d in refused.value.differences] == [
        ("states.T_in", "removed"), ("states.T_m", "removed"), ("states.h1", "added"), ("states.h2", "added"),
        ("inputs.T_out", "removed"), ("inputs.Q_h", "removed"), ("inputs.Q_sol", "removed"),
        ("outputs.T_in", "removed")]
    message = str(refused.value)
    assert message.startswith("asset rt-api: its twin's history cannot be replayed unchanged on thermal_rc@2.0.0, "
                              "which differs from thermal_rc@1.0.0 in states.T_in removed (or renamed), ")
    assert "outputs.T_in removed (or renamed)" in message and "move it with TwinService.migrate" in message
    again = pickle.loads(pickle.dumps(refused.value))  # raised in a Ray task, it reaches the caller as itself
    assert (type(again), str(again), again.differences) == (IncompatibleReplay, message, refused.value.differences)
    assert service.state("acme", "rt-api") == before and service.store.load_registration("acme", "rt-api") == record

    newer = newer_version(tmp_path)
    service.retype(asset("rt-api").model_copy(update={"type_version": "1.1.0"}), newer)
    moved = service.state("acme", "rt-api")
    assert (moved.model_ref, moved.revision) == (newer.ref, 20)


def ranged(tmp_path, version: str, state: str, parameters: dict[str, float] | None = None,
           **bounds: float) -> ModelArtifact:
    """Version `version` of the zones' type (a retype replays on it) with the plausible range of `state` (and of
    its output, if measured) bounded by `bounds` (lower, upper), and `parameters` (other dynamics)."""
    base = AssetType.from_model(THERMAL_RC, version=version)
    bounded = {state: base.states[state].model_copy(update=bounds)}
    outputs = {**base.outputs, **{n: q for n, q in bounded.items() if n in base.outputs}}
    return ModelRegistry(str(tmp_path / "models")).register(
        "zone", version, base.model_copy(update={"states": {**base.states, **bounded}, "outputs": outputs}), parameters)


def test_a_retype_is_refused_when_the_new_ranges_exclude_the_replayed_state_or_logged_readings(
        service, artifact, tmp_path):
    """A version that only narrowed T_in's plausible range passed the replay check: the twin ran on it from a state
    its own type calls implausible (a sweep from "live" started there), its logged readings replayed unchecked.
    Now a range that excludes the state the replay ends in or a logged reading is refused, naming each, the value
    and the new range, and nothing changes; a narrowing that still holds the history and state is taken."""
    from raytwin.compat import IncompatibleReplay

    service.register(asset("rt-range"), artifact)
    logged = events("rt-range", 20, seed=29)  # T_in rises from about 293.15 K to 293.55 K
    assert service.ingest("acme", logged).accepted == 20
    before, record = service.state("acme", "rt-range"), service.store.load_registration("acme", "rt-range")
    assert before.state["T_in"] > 293.3
    with pytest.raises(IncompatibleReplay) as refused:
        service.retype(asset("rt-range").model_copy(update={"type_version": "3.0.0"}),
                       ranged(tmp_path, "3.0.0", "T_in", upper=293.3))
    assert [(d.where, d.change) for d in refused.value.differences] == [("states.T_in", "range"),
                                                                        ("outputs.T_in", "range")]
    message = str(refused.value)  # the same model: the replay ends where the twin is
    assert f"states.T_in: the replay ends at {before.state['T_in']:g} K" in message
    assert "outside the plausible range [173.15, 293.3] K of 3.0.0" in message
    above = [v for v in (e.measurements["T_in"].value + 273.15 for e in logged) if v > 293.3]
    assert f"outputs.T_in: {len(above)} logged readings ({above[0]:g}, " in message
    assert "move it with TwinService.migrate" in message
    assert service.state("acme", "rt-range") == before and service.store.load_registration("acme", "rt-range") == record

    service.retype(asset("rt-range").model_copy(update={"type_version": "3.1.0"}),
                   ranged(tmp_path, "3.1.0", "T_in", upper=300.0))
    assert (service.state("acme", "rt-range").model_ref, service.state("acme", "rt-range").revision) == (
        "zone@3.1.0", 20)


def test_a_retype_is_refused_when_the_new_model_replays_the_twin_out_of_its_own_ranges(service, artifact, tmp_path):
    """The ranges were checked against the twin's live state, the old model's: a version whose dynamics differ
    replayed the log into a state its own type calls implausible and was taken (a sweep from "live" then started
    there, every scenario diverging). Here the building mass couples ten times more weakly to the air (R_im) and
    T_m's range starts at 294.5 K: the old model's live T_m (295.6 K) lies in it, the new model's replay ends at
    293.9 K and passes lower. Refused, naming T_m, the replayed values and the range, and saying what to do; the
    twin stays on its version, its registration, snapshot and state as they were, serving."""
    from raytwin.compat import IncompatibleReplay

    weak = ranged(tmp_path, "2.0.0", "T_m", {"R_im": 0.02}, lower=294.5)
    service.register(asset("rt-dyn"), artifact)
    logged = events("rt-dyn", 20, seed=31)
    assert service.ingest("acme", logged).accepted == 20
    before, record = service.state("acme", "rt-dyn"), service.store.load_registration("acme", "rt-dyn")
    snap = service.store.latest_snapshot("acme", "rt-dyn")
    replayed = reference(weak, "rt-dyn", logged, **TWIN_OPTS)  # what the shard's replay on the new version gives
    end = replayed.view().state["T_m"]
    assert before.state["T_m"] > 294.5 > end
    with pytest.raises(IncompatibleReplay) as refused:
        service.retype(asset("rt-dyn").model_copy(update={"type_version": "2.0.0"}), weak)
    assert [(d.where, d.change) for d in refused.value.differences] == [("states.T_m", "range")]
    message = str(refused.value)
    passed = [f"{c.fs.x[1]:g} K at {from_micros(c.key[0]).isoformat()}" for c in replayed.checkpoints[-2:]]
    assert f"states.T_m: the replay ends at {end:g} K (and passed {', '.join(passed)})" in message
    assert "outside the plausible range [294.5, 473.15] K of 2.0.0" in message
    assert "move it with TwinService.migrate with a MigrationPlan, which maps and converts its state, or publish a " \
           "version whose plausible ranges hold them" in message
    assert service.state("acme", "rt-dyn") == before and service.store.load_registration("acme", "rt-dyn") == record
    assert service.store.latest_snapshot("acme", "rt-dyn") == snap
    assert service.ingest("acme", events("rt-dyn", 5, seed=31, start=20)).accepted == 5  # served as before
    assert (service.state("acme", "rt-dyn").model_ref, service.state("acme", "rt-dyn").revision) == (artifact.ref, 25)


def test_a_shards_retype_checks_the_very_readings_its_replay_applies(tmp_path, artifact):
    """The service checked the readings it read from the log before the shard replayed it, so events ingested in
    between were replayed on the new version unchecked. The shard checks those its replay applies: a retype sent
    to it when only the readings ingested last lie outside the new range (as if after the service's checks) is
    refused, naming them, and nothing changes."""
    from raytwin.compat import IncompatibleReplay

    shard = TwinShard(str(tmp_path / "store"), 0, 1, allowed_lateness_s=LATENESS_S, snapshot_every=8,
                      checkpoint_every=8)
    record = registration_record(asset("late"), artifact, None, None)
    shard.register("acme", "late", record)
    evs = events("late", 40, seed=37)
    readings = [logged_event(e, artifact.asset_type).values["T_in"] for e in evs]
    upper = max(readings[:30])  # holds the first 30 readings
    later = [v for v in readings[30:] if v > upper]
    assert shard.ingest("acme", validated_table(evs)).accepted == 40 and later
    before, snap = shard.state("acme", "late"), shard.store.latest_snapshot("acme", "late")
    moved = registration_record(asset("late").model_copy(update={"type_version": "2.0.0"}),
                                ranged(tmp_path, "2.0.0", "T_in", upper=upper), None, None)
    with pytest.raises(IncompatibleReplay) as refused:
        shard.retype("acme", "late", moved)
    assert f"outputs.T_in: {len(later)} logged reading{'s' * (len(later) != 1)} ({later[0]:g}" in str(refused.value)
    assert shard.store.load_registration("acme", "late") == record
    assert shard.store.latest_snapshot("acme", "late") == snap
    assert_same_state(shard.state("acme", "late"), before)


HOLD_S = 120.0
"""How long `_HeldAroundItsLogWrite` holds a call for a kill that does not come (a failing test), and how long a
test waits for a call to be held."""


def hold_file(store_url: str, when: str) -> str:
    """The file that makes `_HeldAroundItsLogWrite` hold the ingest call of the event it names ("asset_id
    sequence") `when` ("before" or "after") its durable log write; once held, `<file>.held` holds the pid."""
    return f"{store_url}.hold-{when}-log"


def _hold_if_named(path: str, rows: pa.Table) -> None:
    """Hold here, in the shard's process, if `rows` hold the event `path` names: the file is consumed first, so
    the call's retry after the kill runs through."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        asset_id, sequence = f.read().split()
    if (asset_id, int(sequence)) not in zip(rows.column("asset_id").to_pylist(), rows.column("sequence").to_pylist()):
        return
    os.remove(path)
    with open(f"{path}.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(f"{path}.tmp", f"{path}.held")  # whole, for the test to read
    time.sleep(HOLD_S)  # until the test kills this process


class _HeldAroundItsLogWrite(TwinShardProcess):
    """A shard whose ingest call holds just before or just after the log write of a batch (`hold_file`): a kill
    aimed at the middle of a batch, between applying its events and logging them or between logging them and
    answering, which a kill timed from outside cannot aim at on a loaded machine."""

    def __init__(self, store_url: str, *args, **kwargs):
        super().__init__(store_url, *args, **kwargs)
        append = self.store.append_log

        def held_around(tenant: str, rows: pa.Table, *rest) -> int:
            _hold_if_named(hold_file(store_url, "before"), rows)
            logged = append(tenant, rows, *rest)
            _hold_if_named(hold_file(store_url, "after"), rows)
            return logged

        self.store.append_log = held_around


def held_pid(path: str, running) -> int:
    """The pid of the shard process whose call holds at `path` (`_HeldAroundItsLogWrite`), once it does; the
    ingestion `running` is still waiting for that call then."""
    deadline = time.monotonic() + HOLD_S
    while not os.path.exists(f"{path}.held"):
        if running.done():
            running.result()  # its error, if it failed
            raise AssertionError(f"the ingestion ended without reaching the hold at {path}")
        assert time.monotonic() < deadline, f"no ingest call reached the hold at {path} in {HOLD_S:g} s"
        time.sleep(0.01)
    assert not running.done()
    with open(f"{path}.held") as f:
        return int(f.read())


def test_killed_shard_recovers_without_losing_or_double_applying(ray_session, tmp_path, artifact, monkeypatch):
    """ray.kill while an ingest call holds a batch applied but not logged, then SIGKILL of the restarted shard's
    worker process while one holds a batch logged but not answered (`_HeldAroundItsLogWrite`): each call is sent
    again, the first batch applied once after the recovery, the second a duplicate of the log."""
    import ray

    monkeypatch.setattr(service_module, "TwinShardActor", probed_actor(_HeldAroundItsLogWrite))
    store_url = str(tmp_path / "store")
    opts = {"allowed_lateness_s": 5 * STEP_S, "checkpoint_every": 4}
    svc = TwinService(store_url, shards=1, snapshot_every=8, batch_size=4, **opts)
    try:
        svc.register(asset("k1"), artifact)
        svc.register(asset("k2"), artifact)
        evs = sorted(events("k1", 100, seed=5) + events("k2", 100, seed=6), key=lambda e: (e.event_time, e.asset_id))
        [shard] = svc.shard_handles
        first = svc.ingest("acme", evs[:40])
        before, after = hold_file(store_url, "before"), hold_file(store_url, "after")
        for path, held in ((before, evs[80]), (after, evs[130])):  # k1's 40th and 65th events
            with open(path, "w") as f:
                f.write(f"{held.asset_id} {held.sequence}")
        pids = [ray.get(shard.pid.remote())]
        running = ThreadPoolExecutor(1).submit(svc.ingest, "acme", evs[40:] + evs[30:40])  # ends with 10 re-deliveries
        pids.append(held_pid(before, running))
        ray.kill(shard, no_restart=False)
        pids.append(held_pid(after, running))
        os.kill(pids[-1], signal.SIGKILL)
        report = running.result(timeout=300)
        pids.append(ray.get(shard.pid.remote()))
        assert pids[0] == pids[1] != pids[2] != pids[3] != pids[0]  # the kills hit the held calls
        # every event reported once (a call Ray gave up on is sent again, its first report lost), none lost: the
        # re-deliveries and the batch logged before the SIGKILL are duplicates
        assert (first.accepted + report.accepted + report.duplicates, report.rejected) == (210, 0)
        assert report.duplicates >= 14

        for asset_id in ("k1", "k2"):
            state = svc.state("acme", asset_id)
            assert_same_state(state, reference(artifact, asset_id, [e for e in evs if e.asset_id == asset_id],
                                               **opts).view())
            assert state.events_applied == 100
        assert svc.dead_letters("acme").num_rows == 0
        assert svc.store.latest_snapshot("acme", "k1").revision >= 80  # recovery used snapshot + log
        # a fresh service (new actors) recovers the same state from the store alone
        svc.close()
        svc = TwinService(store_url, shards=1, snapshot_every=8, **opts)
        assert_same_state(svc.state("acme", "k2"),
                          reference(artifact, "k2", [e for e in evs if e.asset_id == "k2"], **opts).view())
    finally:
        svc.close()


READINESS_TIMEOUT_S = ServeConfig.model_fields["readiness_timeout_s"].default  # what `/v1/health/ready` waits


@contextmanager
def stalled_read(path: str) -> Iterator[None]:
    """The store file at `path` as a named pipe: whoever opens it waits (a store read that does not return)
    until the block ends; then the read fails (the store's reader seeks, which a pipe cannot)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mkfifo(path)
    try:
        yield
    finally:
        fd, deadline = None, time.monotonic() + 60
        while fd is None and time.monotonic() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:  # no reader: not there yet, or its open restarting after a SIGSTOP
                if e.errno != errno.ENXIO:
                    raise
                time.sleep(0.01)
        os.unlink(path)
        if fd is not None:
            os.close(fd)


def test_readiness_answers_past_a_shards_backlog_but_not_for_a_stopped_or_stuck_shard(ray_session, tmp_path,
                                                                                       artifact, caplog):
    """The probe was an ordinary shard call: queued behind a SIGSTOPped-then-resumed shard's telemetry backlog,
    it read as not answering for minutes, and readiness took a healthy, busy service out of rotation. It now
    answers beside the shard's calls, which still run one at a time in order; a shard stopped, or stuck in one
    call past the bound, still does not count."""
    import ray

    svc = TwinService(str(tmp_path / "store"), shards=1, snapshot_every=8, batch_size=4, **TWIN_OPTS)
    pool = ThreadPoolExecutor(1)
    try:
        svc.register(asset("k1"), artifact)
        [shard] = svc.shard_handles
        pid = ray.get(shard.pid.remote())  # now: while the read stalls, only the probe answers
        assert ray.get(shard.probe.remote()) is None  # idle
        record = registration_record(asset("slow"), artifact, None, None)
        with stalled_read(svc.store._registration_path("acme", "slow")):
            stalled = shard.register.remote("acme", "slow", record)  # its store read waits
            while (busy := ray.get(shard.probe.remote())) is None:
                pass
            assert busy.call == "register"
            backlog = pool.submit(svc.ingest, "acme", events("k1", 40))  # 10 calls queued behind it
            assert svc.shards_answering(READINESS_TIMEOUT_S, stuck_s=3600.0) == 1  # busy, not stuck: ready

            seen = ray.get(shard.probe.remote()).running_s  # the same call, longer in it by the next probe
            with caplog.at_level(logging.WARNING, logger="raytwin.twins"):
                assert svc.shards_answering(10.0, stuck_s=seen) == 0
            assert "event=shard_stuck shard=0 call=register" in caplog.text

            os.kill(pid, signal.SIGSTOP)
            try:
                assert svc.shards_answering(READINESS_TIMEOUT_S, stuck_s=3600.0) == 0
            finally:
                os.kill(pid, signal.SIGCONT)
            assert not backlog.done()  # nothing ran beside the stalled call: the probe alone has a thread
        with pytest.raises(ray.exceptions.RayTaskError, match="not seekable"):
            ray.get(stalled)
        assert backlog.result(timeout=60).accepted == 40
        assert svc.state("acme", "k1").events_applied == 40
        assert svc.shards_answering(READINESS_TIMEOUT_S, stuck_s=3600.0) == 1
        assert ray.get(shard.probe.remote()) is None
    finally:
        pool.shutdown(wait=False)
        svc.close()


def test_a_shards_calls_are_timed_as_one_call_each_and_its_probe_is_not():
    """What the probe reports (`actors.progress`): the outermost public call and its age, until it ends, even by an
    error; the probe itself never shows as the shard's call."""

    @timed_calls
    class Calls:
        def __init__(self) -> None:
            self.call_clock = CallClock()

        def outer(self) -> Busy | None:
            return self.inner()

        def inner(self) -> Busy | None:
            return self.probe()

        def fails(self) -> None:
            raise RuntimeError("store down")

        @probe_call
        def probe(self) -> Busy | None:
            return self.call_clock.busy()

    calls = Calls()
    assert calls.probe() is None
    busy = calls.outer()
    assert busy.call == "outer" and busy.running_s >= 0
    with pytest.raises(RuntimeError, match="store down"):
        calls.fails()
    assert calls.probe() is None
    public = {n for n in dir(TwinShardProcess) if not n.startswith("_") and callable(getattr(TwinShardProcess, n))}
    assert {n for n in public if hasattr(getattr(TwinShardProcess, n), "__wrapped__")} == public - {"probe"}


def test_cli_time_travel_and_dead_letters(service, artifact):
    from typer.testing import CliRunner

    from actors.cli import twins_app

    evs = events("z1", 12, seed=11, start=200)
    service.ingest("acme", evs + [events("ghost", 1)[0].model_copy(update={"idempotency_key": "cli-ghost"})])
    runner = CliRunner()
    at = (evs[5].event_time + timedelta(seconds=1)).isoformat()
    result = runner.invoke(twins_app, ["state-at", service.store.url, "acme", "z1", "--at", at])
    assert result.exit_code == 0, result.output
    shown = TwinState.model_validate_json(result.stdout)  # log lines go to stderr
    assert_same_state(shown, reference(artifact, "z1", evs[:6], **TWIN_OPTS).view())
    assert runner.invoke(twins_app, ["state-at", service.store.url, "beta", "z2"]).exit_code == 2
    result = runner.invoke(twins_app, ["dead-letters", service.store.url, "--tenant", "acme", "--limit", "1"])
    assert result.exit_code == 0 and "cli-ghost" in result.output and "unknown twin" in result.output


def test_log_compaction_while_twins_run_changes_no_state(service, artifact):
    """`raytwin twins compact` on a live store: the twins, a re-delivered batch, time travel and a
    recovery from the store alone all see the same events after it as before."""
    from typer.testing import CliRunner

    from actors.cli import twins_app
    from actors.recovery import recover

    service.register(asset("c1"), artifact)
    try:
        evs = events("c1", 30, seed=12, start=400)
        for i in range(0, 30, 5):  # six batches appended to the shard's log segment
            service.ingest("acme", evs[i:i + 5])
        service.flush()  # closes the segment: compaction takes closed ones
        before = service.state("acme", "c1")
        parent = service.store.url.rsplit("/", 1)[0]  # a wrong path (a typo, the directory above): refused
        for wrong in (service.store.url + "x", parent):
            refused = CliRunner().invoke(twins_app, ["compact", wrong, "--tenant", "acme"])
            assert refused.exit_code == 2 and f"no twin store at {wrong} " in refused.output
        result = CliRunner().invoke(twins_app, ["compact", service.store.url, "--tenant", "acme"])
        assert result.exit_code == 0, result.output
        assert "compacted" in result.stdout and "files ->" in result.stdout
        assert not [p for p in service.store.fs.glob(f"{service.store.root}/log/tenant=acme/date=*/*")
                    if p.rsplit("/", 1)[-1].startswith(("part-", "seg-"))]
        again = service.ingest("acme", evs[10:15])  # re-delivered after compaction: still duplicates
        assert again.accepted == 0
        assert_same_state(service.state("acme", "c1"), before)
        rebuilt = recover(service.store, service.store.load_registration("acme", "c1"), allowed_lateness_s=0.0,
                          checkpoint_every=1_000_000)
        assert_same_state(rebuilt.view(), before)
    finally:
        service.unregister("acme", "c1")


def test_prune_keeps_live_and_recovered_state_and_refuses_time_travel_across_the_cut(service, artifact):
    from typer.testing import CliRunner

    from actors.cli import twins_app
    from actors.recovery import recover
    from raytwin.statestore import HistoryPruned

    service.register(asset("p1", tenant="gamma"), artifact)
    try:
        service.ingest("gamma", events("p1", 80, seed=13, start=1420))  # 23:40 on day 1 to 00:59 on day 2
        service.flush()  # snapshots of the sealed checkpoints
        before = service.state("gamma", "p1")
        result = CliRunner().invoke(twins_app, ["prune", service.store.url, "gamma", "--before", "2026-03-01"])
        assert result.exit_code == 0, result.output
        assert "history before 2026-02-02 pruned: 1 partition(s)" in result.stdout  # held back by p1's snapshot
        assert_same_state(service.state("gamma", "p1"), before)
        rebuilt = recover(service.store, service.store.load_registration("gamma", "p1"), allowed_lateness_s=0.0,
                          checkpoint_every=1_000_000)
        assert_same_state(rebuilt.view(), before)
        with pytest.raises(HistoryPruned, match="pruned"):
            service.state_at("gamma", "p1", T0 + timedelta(hours=23, minutes=50))
        assert service.state_at("gamma", "p1", T0 + timedelta(days=2)).events_applied == 80
    finally:
        service.unregister("gamma", "p1")


def test_twin_before_1970_snapshots_time_travels_and_prunes(service, artifact):
    """Negative event times: snapshot names sort and parse, so `state_at` and `prune` work."""
    from raytwin.statestore import HistoryPruned

    service.register(asset("old", tenant="delta"), artifact)
    try:
        start = datetime(1969, 12, 31, 23, 0, tzinfo=UTC)
        evs = [e.model_copy(update={"event_time": e.event_time - T0 + start}) for e in events("old", 80, seed=14)]
        for part in (evs[:50], evs[50:]):  # a snapshot sealed before midnight, one after
            service.ingest("delta", part)
            service.flush()
        snaps = service.store.fs.ls(service.store._asset_dir("snapshots", "delta", "old"), detail=False)
        assert any("/snap-." in p for p in snaps) and any("/snap-0" in p for p in snaps)
        at = start + timedelta(minutes=55, seconds=1)  # after the pre-1970 snapshot
        assert_same_state(service.state_at("delta", "old", at), reference(artifact, "old", evs[:56], **TWIN_OPTS).view())
        before = service.state("delta", "old")
        done = service.store.prune("delta", datetime(1970, 1, 2).date())
        assert done.history_from is not None and done.held_back_by == ["old"]
        assert_same_state(service.state("delta", "old"), before)
        with pytest.raises(HistoryPruned):
            service.state_at("delta", "old", start + timedelta(minutes=5))
        assert service.state_at("delta", "old", start + timedelta(days=1)).events_applied == 80
    finally:
        service.unregister("delta", "old")


def test_failed_log_write_mid_batch_never_leaves_memory_behind_the_store(ray_session, tmp_path, artifact):
    """A batch spanning two days is logged in two day partitions; the second write fails after the
    first is durable: the shard re-reads the twin whose events are durable before its next call."""
    from actors.shard import TwinShard

    shard = TwinShard(str(tmp_path), 0, 1, allowed_lateness_s=LATENESS_S, snapshot_every=1000, checkpoint_every=8)
    for a in ("f1", "f2"):
        shard.register("acme", a, registration_record(asset(a), artifact, None, None))
    e1, e2 = events("f1", 6, seed=7), events("f2", 6, seed=8, start=24 * 60)  # f2's events are a day later
    segments = shard.store._segments
    real_write, calls = segments.append, []

    def flaky_write(directory, table):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError("store unavailable")
        real_write(directory, table)

    segments.append = flaky_write
    with pytest.raises(OSError):
        shard.ingest("acme", validated_table(e1 + e2))
    segments.append = real_write
    assert f"date={T0.date().isoformat()}" in calls[0]  # f1's day was written first
    assert shard.state("acme", "f1").events_applied == 6  # the durable half is applied
    assert shard.state("acme", "f2").events_applied == 0
    report = shard.ingest("acme", validated_table(e1 + e2))  # the source re-delivers the failed batch
    assert (report.accepted, report.duplicates) == (6, 6)
    for a, evs in (("f1", e1), ("f2", e2)):
        assert_same_state(shard.state("acme", a), reference(artifact, a, evs, **TWIN_OPTS).view())


def test_twins_in_lockstep_spread_their_snapshots_over_calls(tmp_path, artifact):
    """Twins fed at one rate reach `snapshot_every` together: each writes its snapshots at a phase of
    its own, so no call writes most of them; twins whose first snapshots are due at once write at most
    `SNAPSHOTS_PER_CALL` a call. Recovery gives the same states either way."""
    from actors.shard import SNAPSHOTS_PER_CALL, TwinShard, snapshot_phase

    every, ids = 16, [f"l{i}" for i in range(4 * SNAPSHOTS_PER_CALL)]
    opts = {"allowed_lateness_s": 2 * STEP_S, "checkpoint_every": 2, "snapshot_every": every}
    assert len({snapshot_phase("acme", a, every) for a in ids}) > every // 2  # spread, not one phase
    shard = TwinShard(str(tmp_path), 0, 1, **opts)
    for a in ids:
        shard.register("acme", a, registration_record(asset(a), artifact, None, None))
    evs = {a: events(a, 60, seed=i) for i, a in enumerate(ids)}

    def files() -> int:
        return sum(len(shard.store.fs.ls(shard.store._asset_dir("snapshots", "acme", a), detail=False))
                   if shard.store.fs.exists(shard.store._asset_dir("snapshots", "acme", a)) else 0 for a in ids)

    def lockstep(shard, start: int, stop: int) -> list[int]:
        """Each call: every twin's next two events; returns the snapshot files each call wrote."""
        counts = [files()]
        for k in range(start, stop, 2):
            shard.ingest("acme", validated_table([e for a in ids for e in evs[a][k:k + 2]]))
            counts.append(files())
        return [b - a for a, b in zip(counts, counts[1:])]

    written = lockstep(shard, 0, 40)
    # each twin's first snapshot as soon as it has a sealed state (so a read while the shard restarts is not its
    # prior), capped per call; from then on no call reaches the cap (in one phase, 32 twins would write 8 a call)
    first = [n for n in written if n][:len(ids) // SNAPSHOTS_PER_CALL]
    later = written[written.index(first[0]) + len(first):]
    assert first == [SNAPSHOTS_PER_CALL] * len(first) and sum(written) >= 2 * len(ids)
    assert max(later) < SNAPSHOTS_PER_CALL
    restarted = TwinShard(str(tmp_path), 0, 1, **opts)  # it knows its twins' last snapshots: not all due
    assert max(lockstep(restarted, 40, 44)) < SNAPSHOTS_PER_CALL
    fresh = TwinShard(str(tmp_path), 0, 1, **opts)
    for a in ids:
        assert_same_state(fresh.state("acme", a), restarted.state("acme", a))


def test_a_shard_call_reports_only_the_twins_it_changed(tmp_path, artifact):
    """`ingest(states=True)` carries the state of each twin that accepted events in the call, and none of a twin
    whose every row was refused or a re-delivery: a unit misfit, a duplicate in its window, one beyond it (decided
    from the log). The admission accepts a twin whose rows all apply whole: not one whose rows all went."""
    shard = TwinShard(str(tmp_path), 0, 1, allowed_lateness_s=2 * STEP_S, snapshot_every=500)
    for a in "abcd":
        shard.register("acme", a, registration_record(asset(a), artifact, None, None))
    evs = {a: events(a, 8, seed=i) for i, a in enumerate("abcd")}
    shard.ingest("acme", validated_table([e for a in "abcd" for e in evs[a][:6]]))
    misfit = TelemetryEvent(asset_id="c", event_time=T0 + timedelta(seconds=STEP_S * 6), sequence=6,
                            measurements={"T_in": {"value": 1.0, "unit": "kW"}})
    report = shard.ingest("acme", validated_table([evs["a"][6], evs["b"][5], misfit, evs["d"][0], evs["a"][7]]),
                          states=True)
    assert (report.accepted, report.duplicates, report.rejected) == (2, 2, 1)
    assert [(s.asset_id, s.events_applied) for s in report.states] == [("a", 8)]
    assert [shard.state("acme", a).events_applied for a in "abcd"] == [8, 6, 6, 6]


def test_a_shards_batched_reads_answer_what_its_single_read_does_and_queries_their_views(tmp_path, artifact):
    """`full_states` (the change log's catch-up: every twin at a backend's start) answers `state` of each twin asked
    for, drift flag included, in one call; `states` (queries) the same twins' views, as before; `marks` (the backend's
    pass over twins that connectors feed) each of the tenant's twins' revision and drift flag, as `state` has them."""
    shard = TwinShard(str(tmp_path), 0, 1, allowed_lateness_s=LATENESS_S, snapshot_every=500)
    for tenant, a in (("acme", "a"), ("acme", "b"), ("beta", "c")):
        shard.register(tenant, a, registration_record(asset(a, tenant), artifact, None, None))
    shard.ingest("acme", validated_table(events("b", 3)))
    asked = ["b", "c", "nope", "a"]  # c is another tenant's
    assert shard.full_states("acme", asked) == [shard.state("acme", "b"), shard.state("acme", "a")]
    assert shard.full_states("acme", asked)[0].revision == 3
    assert shard.states("acme", asked) == {a: shard.state("acme", a).query_view() for a in ("b", "a")}
    assert set(shard.states("acme", asked)["a"]) == {"state", "std", "revision"}
    assert shard.marks("acme") == {a: (shard.state("acme", a).revision, shard.state("acme", a).divergence.drift)
                                   for a in ("a", "b")} == {"a": (0, False), "b": (3, False)}


def test_an_asset_created_again_after_its_deletion_is_a_new_twin_whatever_its_old_history(tmp_path, artifact):
    """Deleted and created again, an asset id is a new twin: its revision restarts at its prior, the same file
    ingested again is its events (not duplicates of the deleted twin's), and that holds after a restart and
    after a compaction merged the two histories' rows of equal identity; the old rows stay in the log."""
    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=4, checkpoint_every=8)  # the old twin snapshots
    old = events("again", 12, seed=12)
    shard = TwinShard(str(tmp_path), 0, 1, **opts)
    shard.register("acme", "again", registration_record(asset("again"), artifact, None, None))
    assert shard.ingest("acme", validated_table(old)).accepted == 12
    shard.flush()
    assert shard.unregister("acme", "again")
    prior = {"T_in": 280.0, "T_m": 281.0}
    shard.register("acme", "again", registration_record(asset("again"), artifact, prior, None))
    fresh = shard.state("acme", "again")
    assert (fresh.revision, fresh.event_time, fresh.state) == (0, None, prior)

    resent = events("again", 12, seed=12) + events("again", 2, seed=14, start=12)  # stamped now, as a server does
    again = shard.ingest("acme", validated_table(resent))
    assert (again.accepted, again.duplicates) == (14, 0)  # the same file again: the new twin's events
    expected = reference(artifact, "again", resent, initial_state=prior, allowed_lateness_s=LATENESS_S,
                         checkpoint_every=8).view()
    assert_same_state(shard.state("acme", "again"), expected)
    late = TelemetryEvent(asset_id="again", event_time=T0 + timedelta(seconds=STEP_S * 20), sequence=20,
                          ingest_time=datetime(2026, 3, 1, tzinfo=UTC), measurements={"T_in": {"value": 21.0, "unit": "degC"}})
    skewed = shard.ingest("acme", validated_table([late, *old[:1]]))  # stamped before the deletion: not the new twin's
    assert skewed.accepted == 0 and skewed.reasons[0].reason.startswith("clock_skew: ingest time 2026-03-01")
    assert len(skewed.reasons) == 2 and "not after the deletion of the asset's previous twin" in skewed.reasons[1].reason
    shard.flush()

    restarted = TwinShard(str(tmp_path), 0, 1, **opts)
    assert_same_state(restarted.state("acme", "again"), expected)
    compacted = restarted.store.compact(tenant="acme")
    assert [(c.rows_in, c.rows_out) for c in compacted if c.partition.startswith("log/")] == [(26, 26)]  # both kept
    assert_same_state(TwinShard(str(tmp_path), 0, 1, **opts).state("acme", "again"), expected)




@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_new_twin_reads_none_of_the_log_yet_an_id_the_log_holds_replays_its_rows(request, tmp_path, artifact,
                                                                                   monkeypatch, where):
    """Registering a twin whose asset id the log never held reads none of the log (its recovery read every file
    of its tenant's history), while an id the log holds rows of, with no deletion record (a deletion cut short
    before it was recorded, or made before deletions were), still replays them: rows logged before their
    assets were marked too, once the log was read for them."""
    url = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_url") + "/store"
    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=1000)  # no snapshot: recovery replays from the start
    shard = TwinShard(url, 0, 1, **opts)
    for a in ("z1", "z2"):
        shard.register("acme", a, registration_record(asset(a), artifact, None, None))
        assert shard.ingest("acme", validated_table(events(a, 12, seed=int(a[1:])))).accepted == 12
    before = {a: shard.state("acme", a) for a in ("z1", "z2")}
    scanned: list[str] = []
    relisting = StateStore._relisting
    monkeypatch.setattr(StateStore, "_relisting",
                        lambda self, dirs, read: scanned.extend(dirs) or relisting(self, dirs, read))  # every log read

    shard.register("acme", "z3", registration_record(asset("z3"), artifact, None, None))
    assert scanned == [] and shard.state("acme", "z3").events_applied == 0

    store = shard.store  # z1 logged by an earlier version (unmarked), then both deletions cut short
    store.fs.rm([f"{store.root}/logged/tenant=acme/asset_id=z1", f"{store.root}/logged/tenant=acme/_complete"])
    for a in ("z1", "z2"):
        store.delete_registration("acme", a)
    restarted = TwinShard(url, 0, 1, **opts)
    for a in ("z2", "z1"):
        restarted.register("acme", a, registration_record(asset(a), artifact, None, None))
        assert_same_state(restarted.state("acme", a), before[a])
    assert scanned  # the log, read once for its asset ids
    scanned.clear()
    restarted.register("acme", "z4", registration_record(asset("z4"), artifact, None, None))
    assert scanned == [] and restarted.state("acme", "z4").events_applied == 0


def test_a_new_type_version_replays_the_twins_history_on_its_model(tmp_path, artifact):
    """An asset's PUT with another type version keeps its twin's history: the new model replays every
    event from the same prior (what the old model derived, its snapshots, goes); after a restart too."""
    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=4, checkpoint_every=8)
    registry = ModelRegistry(str(tmp_path / "models"))
    newer = registry.register("zone", "1.1.0", AssetType.from_model(THERMAL_RC, version="1.1.0"), {"R_io": 0.02})
    prior = {"T_in": 290.0, "T_m": 289.0}
    evs = events("rt", 12, seed=15)
    shard = TwinShard(str(tmp_path / "store"), 0, 1, **opts)
    shard.register("acme", "rt", registration_record(asset("rt"), artifact, prior, None))
    assert shard.ingest("acme", validated_table(evs)).accepted == 12
    shard.flush()
    moved = asset("rt").model_copy(update={"type_version": "1.1.0"})
    assert shard.retype("acme", "rt", registration_record(moved, newer, prior, None))
    expected = reference(newer, "rt", evs, initial_state=prior, allowed_lateness_s=LATENESS_S, checkpoint_every=8)
    assert shard.state("acme", "rt").revision == 12 and shard.state("acme", "rt").model_ref == newer.ref
    assert_same_state(shard.state("acme", "rt"), expected.view())
    shard.flush()
    assert_same_state(TwinShard(str(tmp_path / "store"), 0, 1, **opts).state("acme", "rt"), expected.view())
    assert not shard.retype("acme", "ghost", registration_record(moved, newer, None, None))


def newer_version(tmp_path) -> ModelArtifact:
    """Version 1.1.0 of the zones' type: the same states, inputs and outputs (a retype replays on it), other parameters."""
    return ModelRegistry(str(tmp_path / "models")).register(
        "zone", "1.1.0", AssetType.from_model(THERMAL_RC, version="1.1.0"), {"R_io": 0.02})


def sealed_view(twin: Twin, tenant: str = "acme") -> TwinState:
    """What a read from the store answers for `twin` once its sealed checkpoint is durable (`durable_state`)."""
    from actors.twin import state_view

    sealed = twin.checkpoints[0]  # the oldest checkpoint kept: no accepted event can precede it
    assert 0 < sealed.events_applied < twin.events_applied and sealed.key is not None
    return state_view(tenant, twin.asset_id, twin.artifact.ref, twin.filter.model, sealed.fs, sealed.key,
                      sealed.events_applied, stale=True)


def test_a_retyped_twin_read_while_its_shard_is_down_shows_its_replayed_history(tmp_path, artifact, monkeypatch,
                                                                                 caplog):
    """A retype removes the old model's snapshots and replays the history on the new one, which had none until
    its next events: a read while its shard was down (`durable_state`) answered its prior (revision 0, no event
    time) though it had 2000 events. The replay's sealed state is committed with the new registration, so a
    read answers it whether or not its snapshot file was written: a store error then holds the retype
    (logged), a restart recovers it, and the next flush finishes it (the old model's snapshots removed)."""
    from actors import retype as retyping
    from actors.recovery import durable_state

    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=8, checkpoint_every=8)
    newer = newer_version(tmp_path)
    shard = TwinShard(str(tmp_path / "store"), 0, 1, **opts)
    history = {a: events(a, 40, seed=17) for a in ("rs", "broken")}
    for asset_id, evs in history.items():
        shard.register("acme", asset_id, registration_record(asset(asset_id), artifact, None, None))
        assert shard.ingest("acme", validated_table(evs)).accepted == 40
    moved = {a: registration_record(asset(a).model_copy(update={"type_version": "1.1.0"}), newer, None, None)
             for a in history}
    expected = {a: reference(newer, a, evs, allowed_lateness_s=LATENESS_S, checkpoint_every=8)
                for a, evs in history.items()}

    assert shard.retype("acme", "rs", moved["rs"])
    assert_same_state(durable_state(shard.store, "acme", "rs"), sealed_view(expected["rs"]))
    assert shard.store.load_registration("acme", "rs") == moved["rs"]  # finished: no retype mark left

    def store_down(*args):
        raise OSError("store unreachable")

    monkeypatch.setattr(shard.store, "write_snapshot", store_down)
    with caplog.at_level(logging.WARNING, logger="raytwin.twins"):
        assert shard.retype("acme", "broken", moved["broken"])  # the retype holds: its registration is saved
    assert "event=retype_unfinished" in caplog.text and "asset=broken" in caplog.text
    assert_same_state(shard.state("acme", "broken"), expected["broken"].view())
    assert retyping.pending(shard.store.load_registration("acme", "broken"))
    assert_same_state(durable_state(shard.store, "acme", "broken"), sealed_view(expected["broken"]))
    with caplog.at_level(logging.WARNING, logger="raytwin.twins"):
        shard.ingest("acme", validated_table(events("broken", 1, seed=17, start=40)))  # snapshots wait: no write
    assert retyping.pending(shard.store.load_registration("acme", "broken"))
    monkeypatch.undo()
    shard.flush()
    assert shard.store.load_registration("acme", "broken") == moved["broken"]
    assert durable_state(shard.store, "acme", "broken").model_ref == newer.ref
    assert_same_state(TwinShard(str(tmp_path / "store"), 0, 1, **opts).state("acme", "broken"),
                      shard.state("acme", "broken"))


def test_a_retype_whose_replay_fails_leaves_the_twin_on_its_old_version(tmp_path, artifact, monkeypatch):
    """A retype whose replay raised had saved the new registration and dropped the twin from memory: it
    answered nothing (unknown) until its shard restarted, then on a model it never ran live. The replay comes
    first now: it fails with `RetypeFailed`, the twin serves its old version as before, its registration,
    snapshots and drift clear untouched, and a restart recovers the same twin."""
    import actors.shard as shard_module
    from actors.recovery import durable_state
    from actors.retype import RetypeFailed

    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=8, checkpoint_every=8)
    newer = newer_version(tmp_path)
    shard = TwinShard(str(tmp_path / "store"), 0, 1, **opts)
    record = registration_record(asset("rf"), artifact, None, None)
    shard.register("acme", "rf", record)
    evs = events("rf", 60, seed=19)
    assert shard.ingest("acme", validated_table(evs[:40])).accepted == 40
    shard.clear_drift("acme", "rf")
    before, snap = shard.state("acme", "rf"), shard.store.latest_snapshot("acme", "rf")
    clear, durable = shard.store.load_drift_clears("acme", "rf"), durable_state(shard.store, "acme", "rf")
    assert snap is not None and clear

    real = shard_module.recover

    def diverging(store, record, **kw):
        if record["artifact"]["version"] == "1.1.0":
            raise FloatingPointError("the new model's replay diverged")
        return real(store, record, **kw)

    monkeypatch.setattr(shard_module, "recover", diverging)
    moved = registration_record(asset("rf").model_copy(update={"type_version": "1.1.0"}), newer, None, None)
    with pytest.raises(RetypeFailed, match=r"twin acme/rf stays on its type version, serving as before: replaying "
                                           r"its history on zone@1.1.0 failed \(FloatingPointError: the new model"):
        shard.retype("acme", "rf", moved)
    assert shard.store.load_registration("acme", "rf") == record
    assert shard.store.latest_snapshot("acme", "rf") == snap and shard.store.load_drift_clears("acme", "rf") == clear
    assert_same_state(shard.state("acme", "rf"), before)
    assert durable_state(shard.store, "acme", "rf") == durable
    assert shard.ingest("acme", validated_table(evs[40:])).accepted == 20  # served as before
    live = shard.state("acme", "rf")
    assert live.model_ref == artifact.ref and live.events_applied == 60
    monkeypatch.undo()
    assert_same_state(TwinShard(str(tmp_path / "store"), 0, 1, **opts).state("acme", "rf"), live)


class _Crash(BaseException):
    """The shard's process dying at that point: nothing after it runs, no handler catches it."""


def test_a_retype_a_crash_cut_short_after_its_commit_is_finished_by_the_restarted_shard(tmp_path, artifact,
                                                                                          monkeypatch):
    """Killed after the new registration was written and before the old model's snapshots and drift clear
    were removed: a read from the store answers the new model's replayed state (not the old model's
    snapshot under the new version), and the restarted shard recovers the twin on the new version, removes
    what the old model derived and keeps the replay's snapshot. The same retype sent again changes nothing."""
    from actors import retype as retyping
    from actors.recovery import durable_state

    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=8, checkpoint_every=8)
    newer = newer_version(tmp_path)
    shard = TwinShard(str(tmp_path / "store"), 0, 1, **opts)
    shard.register("acme", "rc", registration_record(asset("rc"), artifact, None, None))
    evs = events("rc", 40, seed=23)
    assert shard.ingest("acme", validated_table(evs)).accepted == 40
    shard.clear_drift("acme", "rc")
    old_snapshot = shard.store.latest_snapshot("acme", "rc")
    assert old_snapshot is not None and shard.store.load_drift_clears("acme", "rc") != []

    def crash(*args):
        raise _Crash

    monkeypatch.setattr(shard.store, "forget_twin", crash)
    moved = registration_record(asset("rc").model_copy(update={"type_version": "1.1.0"}), newer, None, None)
    with pytest.raises(_Crash):
        shard.retype("acme", "rc", moved)
    monkeypatch.undo()
    del shard
    expected = reference(newer, "rc", evs, allowed_lateness_s=LATENESS_S, checkpoint_every=8)
    store = StateStore(str(tmp_path / "store"))
    assert retyping.pending(store.load_registration("acme", "rc"))
    assert store.latest_snapshot("acme", "rc") == old_snapshot  # still there: the old model's, not read
    down = durable_state(store, "acme", "rc")
    assert down.model_ref == newer.ref
    assert_same_state(down, sealed_view(expected))

    restarted = TwinShard(str(tmp_path / "store"), 0, 1, **opts)
    assert_same_state(restarted.state("acme", "rc"), expected.view())
    assert store.load_registration("acme", "rc") == moved and store.load_drift_clears("acme", "rc") == []
    assert store.latest_snapshot("acme", "rc").revision == expected.checkpoints[0].events_applied
    assert_same_state(durable_state(store, "acme", "rc"), sealed_view(expected))
    assert restarted.retype("acme", "rc", moved)  # the caller's retry: done already
    assert_same_state(restarted.state("acme", "rc"), expected.view())


class _Kills:
    """Counts the durable effects of store writes on local disk (a file renamed into place, a file removed) and
    raises `_Crash` before those numbered in `at`: a process killed there, what came before on disk, nothing after."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: set[int]):
        from fsspec.implementations.local import LocalFileSystem

        self.at, self.done = at, 0
        rename = os.replace

        def replace(*args: object, **kwargs: object) -> None:
            self.effect()
            rename(*args, **kwargs)

        def rm(fs: LocalFileSystem, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
            path = fs._strip_protocol(path)  # a folder file by file: a kill can stop its removal half-way
            for folder, _, files in sorted(os.walk(path)) if recursive and os.path.isdir(path) else ():
                for name in sorted(files):
                    self.effect()
                    os.remove(os.path.join(folder, name))
            self.effect()
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(LocalFileSystem, "rm", rm)

    def effect(self) -> None:
        self.done += 1
        if self.done in self.at:
            raise _Crash


def test_a_retype_killed_before_any_of_its_writes_and_again_after_it_ends_once_on_the_new_version(
        tmp_path, artifact, monkeypatch):
    """A chaos trial's sweep, kept (the test above kills at one point): the shard killed before each durable effect
    of a retype (its marked registration, the old model's snapshot and drift clear removed file by file, the
    replay's snapshot, the registration unmarked), and in a second run also at the effect after it (the restarted
    shard finishing the retype, or the resent one), restarted each time and the retype resent, as by a caller whose
    call died. Every run ends as the uninterrupted retype: the new model's replay of every event once, live and
    recovered, its registration unmarked, nothing of the old model's left, a read from the store on the new
    version. A `finish` that unmarked the registration before writing the replay's snapshot, killed between, left
    the twin without a snapshot for good: this fails then, the test above does not."""
    from actors.recovery import durable_state

    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=32, checkpoint_every=8)
    newer = newer_version(tmp_path)
    template = str(tmp_path / "template")
    shard = TwinShard(template, 0, 1, **opts)
    shard.register("acme", "rk", registration_record(asset("rk"), artifact, None, None))
    evs = events("rk", 40, seed=29)
    assert shard.ingest("acme", validated_table(evs)).accepted == 40
    shard.clear_drift("acme", "rk")
    shard.flush()
    moved = registration_record(asset("rk").model_copy(update={"type_version": "1.1.0"}), newer, None, None)
    expected = reference(newer, "rk", evs, allowed_lateness_s=LATENESS_S, checkpoint_every=8)

    def run(store: str, at: set[int]) -> int:
        """The retype on a copy of the template store, killed before the effects `at`; how many effects it took."""
        shutil.copytree(template, store)
        with monkeypatch.context() as patched:
            kills = _Kills(patched, at)
            while True:  # (re)started and the retype (re)sent until it returns
                try:
                    shard = TwinShard(store, 0, 1, **opts)
                    assert shard.retype("acme", "rk", moved)
                    break
                except _Crash:
                    continue
        stored = StateStore(store)
        assert_same_state(shard.state("acme", "rk"), expected.view())
        assert_same_state(TwinShard(store, 0, 1, **opts).state("acme", "rk"), expected.view())
        assert stored.load_registration("acme", "rk") == moved and stored.load_drift_clears("acme", "rk") == []
        assert stored.latest_snapshot("acme", "rk").revision == expected.checkpoints[0].events_applied
        assert_same_state(durable_state(stored, "acme", "rk"), sealed_view(expected))
        return kills.done

    effects = run(str(tmp_path / "whole"), set())
    assert effects == 6  # registration marked, the old snapshot and its folder, drift clear, snapshot, registration
    for k in range(1, effects + 1):
        for at in ({k}, {k, k + 1}):
            run(str(tmp_path / f"killed-{min(at)}-{max(at)}"), at)


def test_a_twin_unregistered_by_a_shard_killed_before_its_deletion_record_is_not_resumed_when_registered_again(
        tmp_path, artifact, monkeypatch):
    """Found by the chaos trial: `unregister` deletes the registration, then records the deletion (the history
    floor that a twin registered again starts after), then removes the old snapshots. Killed between the first two,
    the restarted shard holds no such twin, the resent `unregister` finds none and records nothing, and the twin
    registered again resumes the deleted one's history: its 40 events and old snapshot. It must start afresh."""
    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=8, checkpoint_every=8)
    store = str(tmp_path / "store")
    record = registration_record(asset("ud"), artifact, None, None)
    shard = TwinShard(store, 0, 1, **opts)
    shard.register("acme", "ud", record)
    assert shard.ingest("acme", validated_table(events("ud", 40, seed=37))).accepted == 40
    with monkeypatch.context() as patched:
        _Kills(patched, {2})  # 1: the registration removed; 2: the deletion record renamed into place
        with pytest.raises(_Crash):
            shard.unregister("acme", "ud")
    restarted = TwinShard(store, 0, 1, **opts)
    assert not restarted.unregister("acme", "ud")  # the caller's resend: no such twin any more
    restarted.register("acme", "ud", record)
    assert restarted.state("acme", "ud").events_applied == 0
    assert restarted.store.latest_snapshot("acme", "ud") is None


def test_a_registration_rewritten_is_never_seen_half_written(tmp_path, killed_mid_write):
    """A restarted shard rewrites a registration (finishing a retype) while the driver answers stale reads from
    it: written in place on local disk, a read meanwhile found an empty file (JSONDecodeError), and a writer
    killed part way left it so for good. It is written beside and renamed now: the previous record stays whole."""
    store = StateStore(str(tmp_path / "store"))
    store.save_registration("acme", "hw", {"version": 1})
    with killed_mid_write():
        store.save_registration("acme", "hw", {"version": 2, "padding": "x" * 200})
    assert store.load_registration("acme", "hw") == {"version": 1}
    assert store.registrations() == [("acme", "hw", {"version": 1})]  # the part written is no registration
    store.save_registration("acme", "hw", {"version": 3})
    assert store.load_registration("acme", "hw") == {"version": 3}


def test_a_migrated_twin_retyped_continues_from_its_migration_point(tmp_path, artifact):
    """A retype's registration dropped the migration's starting point: the new model replayed the whole log,
    the events before the migration too, from the mapped state (as if they came after it). It keeps the
    migration now: the retyped twin equals one migrated straight to the new version at the same point with
    the same mapping and fed the same later events, live, after a restart and read from the store."""
    from actors.recovery import durable_state
    from raytwin.migration import FixedValue, plan_migration

    opts = dict(allowed_lateness_s=LATENESS_S, snapshot_every=8, checkpoint_every=8)
    registry = ModelRegistry(str(tmp_path / "models"))
    two, newer = (registry.register("zone", v, AssetType.from_model(THERMAL_RC, version=v), params)
                  for v, params in (("2.0.0", None), ("2.1.0", {"R_io": 0.02})))
    on = lambda asset_id, art: registration_record(  # noqa: E731
        asset(asset_id).model_copy(update={"type_version": art.asset_type.version}), art, None, None)
    kelvin = {"T_in": "K", "T_m": "K"}
    plan = plan_migration(kelvin, kelvin, {"T_m": FixedValue(value=25.0, unit="degC")}, two.asset_type)
    shard = TwinShard(str(tmp_path / "store"), 0, 1, **opts)
    for asset_id, target in (("mr", two), ("ref", newer)):  # the same history; "ref" migrates straight to 2.1.0
        shard.register("acme", asset_id, registration_record(asset(asset_id), artifact, None, None))
        assert shard.ingest("acme", validated_table(events(asset_id, 40, seed=31))).accepted == 40
        shard.migrate("acme", asset_id, on(asset_id, target), plan)
        assert shard.ingest("acme", validated_table(events(asset_id, 20, seed=32, start=40))).accepted == 20
    assert shard.state("acme", "mr").state != shard.state("acme", "ref").state  # the models differ

    assert shard.retype("acme", "mr", on("mr", newer))
    expected = shard.state("acme", "ref")
    retyped = shard.state("acme", "mr")
    assert retyped.model_ref == newer.ref and retyped.events_applied == 60
    assert_same_state(retyped, expected)
    assert shard.retype("acme", "mr", on("mr", newer))  # the same retype again: nothing changes
    assert_same_state(shard.state("acme", "mr"), expected)
    shard.flush()
    assert_same_state(durable_state(shard.store, "acme", "mr"), durable_state(shard.store, "acme", "ref"))
    assert_same_state(TwinShard(str(tmp_path / "store"), 0, 1, **opts).state("acme", "mr"), expected)


def test_a_twin_read_while_its_shard_restarts_shows_its_events_before_its_first_snapshot_point(tmp_path, artifact):
    """A twin with fewer events than `snapshot_every` had no snapshot, so a read while its shard restarted
    (`durable_state`) answered its prior, as if no event had been applied: its first snapshot is taken at once."""
    from actors.recovery import durable_state

    shard = TwinShard(str(tmp_path), 0, 1, allowed_lateness_s=2 * STEP_S, snapshot_every=1000, checkpoint_every=2)
    shard.register("acme", "s1", registration_record(asset("s1"), artifact, None, None))
    shard.ingest("acme", validated_table(events("s1", 12, seed=3)))
    stale = durable_state(shard.store, "acme", "s1")
    assert stale.stale and 0 < stale.events_applied <= 12
    assert stale.events_applied == shard.twins[("acme", "s1")].sealed_revision
