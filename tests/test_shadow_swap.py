"""Shadow evaluation of a candidate model on live events, and hot swaps at an event-time boundary.

References are independent of the code under test where possible: the kernel's own NIS for the
scorer, the filters run directly (old version before the boundary, the carried-over estimate, new
version after) for the swap, and a run without shadow for the served state.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actors.recovery import registration_record
from actors.shard import TwinShard
from actors.swap import SwapRefused, check_compatible, map_state
from actors.telemetry import validated_table
from actors.twin import Twin, logged_event, replay
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.lifecycle import Actor, LifecyclePolicy, ModelLifecycle, TransitionRecord
from raytwin.registry import ModelRegistry
from raytwin.shadow import InnovationStats, compare, conclude, score_event
from raytwin.sim import BATTERY_ECM, THERMAL_RC, simulate

T0 = datetime(2026, 3, 1, tzinfo=UTC)
STEP_S = 300.0
TRUE_R_IO = 2.0e-2
OPTS = {"allowed_lateness_s": 6 * STEP_S, "checkpoint_every": 8}
PROCESS_STD = {"T_in": 1e-3, "T_m": 1e-4}


@pytest.fixture(autouse=True)
def jax_on_cpu_like_the_shards():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> ModelRegistry:
    return ModelRegistry(str(tmp_path_factory.mktemp("registry")))


@pytest.fixture(scope="module")
def versions(registry):
    """zone@1.0.0 with the default (wrong) R_io, zone@1.1.0 with the true one."""
    at = AssetType.from_model(THERMAL_RC)
    return (registry.register("zone", "1.0.0", at),
            registry.register("zone", "1.1.0", at, {"R_io": TRUE_R_IO}))


def asset(asset_id: str) -> Asset:
    """A zone whose dynamics have (almost) no process noise, and a filter told so."""
    return Asset(id=asset_id, tenant="acme", type_name="thermal_rc", type_version="1.0.0",
                 metadata={f"process_std.{k}": str(v) for k, v in PROCESS_STD.items()})


def stream(asset_id: str, n: int, seed: int = 0) -> list[TelemetryEvent]:
    """A zone with the true R_io, heated 4 of every 10 readings, measured every 5 min with 0.05 K noise."""
    rng = np.random.default_rng(seed)
    t_out = 278.0 + 8.0 * np.sin(np.arange(n) / 12.0)
    q_h = 6000.0 * (np.arange(n) % 10 < 4)
    u = np.column_stack([t_out, q_h, np.zeros(n)])
    params = THERMAL_RC.param_vector({"R_io": TRUE_R_IO})
    x = simulate(THERMAL_RC, np.array([293.15, 293.15]), np.repeat(u, 5, axis=0), params, 60.0, dtype=jnp.float64)
    return [TelemetryEvent(asset_id=asset_id, event_time=T0 + timedelta(seconds=STEP_S * k), sequence=k,
                           measurements={"T_in": {"value": float(x[5 * k, 0] + rng.normal(0, 0.05)), "unit": "K"},
                                         "T_out": {"value": float(t_out[k]), "unit": "K"},
                                         "Q_h": {"value": float(q_h[k]), "unit": "W"}})
            for k in range(n)]


def shard(path) -> TwinShard:
    return TwinShard(str(path), 0, 1, allowed_lateness_s=OPTS["allowed_lateness_s"], snapshot_every=16,
                     checkpoint_every=OPTS["checkpoint_every"])


def test_score_event_nis_is_the_filter_kernels_nis(versions):
    twin = Twin("acme", "z", versions[0], **OPTS)
    for e in stream("z", 12):  # the default process noise: the adapted factor is part of the prediction
        ev = twin.pending(logged_event(e, twin.artifact.asset_type))
        nis, sq, loglik, dims = score_event(twin.filter, twin.fs, ev.key[0] / 1e6, ev.values, True)
        twin.apply([ev])
        assert dims == 1 and nis == pytest.approx(twin.fs.divergence.nis_last, rel=1e-9, abs=1e-12)
        assert loglik == pytest.approx(-0.5 * (nis + np.log(2 * np.pi * sq / nis)))  # one output: S = e^2 / NIS


def test_shadow_prefers_the_true_model_and_leaves_served_state_bit_identical(tmp_path, registry, versions):
    wrong, true = versions
    with_shadow, without = shard(tmp_path / "a"), shard(tmp_path / "b")
    for s in (with_shadow, without):
        s.register("acme", "z1", registration_record(asset("z1"), wrong, None, None))
    evs = stream("z1", 160)
    for s in (with_shadow, without):
        s.ingest("acme", validated_table(evs[:20]))
    with_shadow.start_shadow("run-1", "acme", ["z1"], true.model_dump(mode="json"), 120)
    for k in range(20, 160, 25):
        batch = evs[k:k + 25]
        random.Random(k).shuffle(batch)  # arrival order within a batch does not matter
        for s in (with_shadow, without):
            s.ingest("acme", validated_table(batch))
    a, b = with_shadow.state("acme", "z1"), without.state("acme", "z1")
    assert a == b  # every field, bit for bit: the shadow never touched the served twin

    run_id, [report] = with_shadow.shadow_report("acme", true.ref)
    assert run_id == "run-1" and report.done and report.candidate.events == report.production.events == 120
    p, c = report.production, report.candidate
    assert c.loglik_per_update > p.loglik_per_update + 1.0
    assert abs(c.nis_per_dim - 1) < abs(p.nis_per_dim - 1) and c.rmse < p.rmse

    # concluded on the lifecycle log as evidence; the policy's margin lets it advance to staging
    lc = ModelLifecycle(registry)
    author = Actor(id="calibrator", tenant="acme")
    lc.submit(true.ref, author, "calibrated on the live stream")
    lc.set_policy("acme", LifecyclePolicy(shadow_auto_stage_margin=1.0))
    comparison = compare(InnovationStats(*report.production_stats), InnovationStats(*report.candidate_stats))
    read_before = lc.records("zone")  # what a second concluder (a DELETE beside the service's round) read
    records = conclude(lc, true.ref, "acme", run_id, comparison, twins=1)
    assert [r.action for r in records] == ["evaluate", "stage"] and all(r.actor == "system" for r in records)
    assert records[0].evidence.shadow_metrics["loglik_gain"] == pytest.approx(comparison.loglik_gain)
    assert conclude(lc, true.ref, "acme", run_id, comparison, twins=1) == []  # recorded once per run
    assert conclude(lc, true.ref, "acme", run_id, comparison, twins=1, records=read_before) == []  # its read was stale
    assert lc.stage(true.ref) == "staging" and lc.verify("zone").revision == 2


def direct_reference(old_art, new_art, evs: list[TelemetryEvent], boundary: datetime, noise=None):
    """The filters run directly: the old version on events before the boundary, the estimate carried
    over, the new version on the rest."""
    old = Twin("acme", "r", old_art, noise=noise, **OPTS)
    new = Twin("acme", "r", new_art, noise=noise, **OPTS)
    rows = lambda twin, part: [twin.pending(logged_event(e, old_art.asset_type)) for e in part]  # noqa: E731
    before = sorted(rows(old, [e for e in evs if e.event_time < boundary]), key=lambda e: e.key)
    after = sorted(rows(old, [e for e in evs if e.event_time >= boundary]), key=lambda e: e.key)
    f_old, f_new = old.filter, new.filter
    fs = f_old.assimilate_many(old.fs, [e.key[0] / 1e6 for e in before], [e.values for e in before],
                               [True] * len(before)).state(len(before) - 1)
    fs = map_state(fs, f_old, f_new, new.fs)
    return f_new.assimilate_many(fs, [e.key[0] / 1e6 for e in after], [e.values for e in after],
                                 [True] * len(after)).state(len(after) - 1)


def test_swap_mid_stream_with_late_events_equals_the_direct_reference(versions):
    old_art, new_art = versions
    evs = stream("z", 80, seed=3)
    boundary = evs[50].event_time
    twin = Twin("acme", "z", old_art, **OPTS)
    feed = lambda part: twin.apply([twin.pending(logged_event(e, old_art.asset_type)) for e in part])  # noqa: E731
    feed(evs[:47])
    twin.add_swap(int(boundary.timestamp() * 1e6), new_art)
    assert twin.view().model_ref == "zone@1.0.0"  # nothing at or after the boundary yet
    late = evs[47:50]  # before the boundary, arriving after the swap and mixed with later ones
    feed(evs[50:60] + late[:1])
    feed(late[1:] + evs[60:])
    ref = direct_reference(old_art, new_art, evs, boundary)
    assert twin.events_applied == 80 and twin.view().model_ref == "zone@1.1.0"
    assert np.array_equal(twin.fs.x, ref.x) and np.array_equal(twin.fs.P, ref.P)
    # a swap whose boundary lies among applied events re-applies them with the new version
    again = Twin("acme", "z", old_art, **OPTS)
    replay(again, [logged_event(e, old_art.asset_type) for e in evs[:55]])
    again.add_swap(int(boundary.timestamp() * 1e6), new_art)
    replay(again, [logged_event(e, old_art.asset_type) for e in evs[55:]])
    assert again.events_applied == 80 and np.array_equal(again.fs.x, ref.x) and np.array_equal(again.fs.P, ref.P)


def test_swap_refusals_say_why(versions):
    old_art, new_art = versions
    twin = Twin("acme", "z", old_art, **OPTS)
    twin.apply([twin.pending(logged_event(e, old_art.asset_type)) for e in stream("z", 40)])
    with pytest.raises(SwapRefused, match="watermark"):
        twin.add_swap(int(T0.timestamp() * 1e6), new_art)
    with pytest.raises(SwapRefused, match="same inputs and outputs"):
        check_compatible(THERMAL_RC, BATTERY_ECM)
    assert len(twin.segments) == 1 and twin.events_applied == 40
    twin.add_swap(int((T0 + timedelta(days=1)).timestamp() * 1e6), new_art)
    with pytest.raises(SwapRefused, match="must come after it"):
        twin.add_swap(int((T0 + timedelta(hours=20)).timestamp() * 1e6), new_art)


def test_hot_swap_on_a_shard_survives_a_restart_and_time_travels(tmp_path, versions):
    """The shard's swap is durable before it applies: a new shard on the store (a restart: recovery
    from snapshot + log + swaps) holds the same twin; time travel names the version that applied."""
    old_art, new_art = versions
    evs = stream("h1", 90, seed=7)
    boundary = evs[60].event_time
    at_us = int(boundary.timestamp() * 1e6)
    live = shard(tmp_path)
    live.register("acme", "h1", registration_record(asset("h1"), old_art, None, None))
    first = live.ingest("acme", validated_table(evs[:58]))
    assert live.swap_model("acme", "h1", new_art.model_dump(mode="json"), at_us).model_ref == "zone@1.0.0"
    assert live.swap_model("acme", "h1", new_art.model_dump(mode="json"), at_us).model_ref == "zone@1.0.0"  # retry
    with pytest.raises(SwapRefused, match="must come after it"):
        live.swap_model("acme", "h1", new_art.model_dump(mode="json"), at_us - 1)
    assert live.twins_of_model("acme", "zone") == ["h1"] and live.swap_model("acme", "x", {}, at_us) is None
    rest = live.ingest("acme", validated_table(evs[60:75] + evs[58:60] + evs[70:75]))  # late ones, re-deliveries
    assert (first.accepted, rest.accepted, rest.duplicates) == (58, 17, 5)
    restarted = shard(tmp_path)
    assert restarted.state("acme", "h1") == live.state("acme", "h1")
    restarted.ingest("acme", validated_table(evs[75:]))
    now = restarted.state("acme", "h1")
    assert now.events_applied == 90 and now.model_ref == "zone@1.1.0"
    ref = direct_reference(old_art, new_art, evs, boundary, {"process_std": PROCESS_STD})
    assert now.state == dict(zip(THERMAL_RC.state_names, ref.x.tolist()))
    assert restarted.state_at("acme", "h1", at_us - 1).model_ref == "zone@1.0.0"
    then = restarted.state_at("acme", "h1", at_us)
    assert then.model_ref == "zone@1.1.0" and then.events_applied == 61


class Direct:
    """A shard actor's handle on a `TwinShard` in this process: ``handle.method.remote(*args)`` defers the call and
    `ray.get` (patched: `direct_get`) makes it, so that `LiveModels` runs its calls in the order a test sets."""

    def __init__(self, shard: TwinShard):
        self.shard = shard

    def __getattr__(self, method: str) -> SimpleNamespace:
        return SimpleNamespace(remote=lambda *args: lambda: getattr(self.shard, method)(*args))


def direct_get(calls, timeout=None):
    return [call() for call in calls] if isinstance(calls, list) else calls()


class Zone(NamedTuple):
    """A shard whose twin z1 runs the first of the registered versions, and the lifecycle that promotes the others."""

    lc: ModelLifecycle
    live: TwinShard
    versions: list


def zone_versions(tmp_path, *versions: str) -> Zone:
    registry = ModelRegistry(str(tmp_path / "models"))
    arts = [registry.register("zone", v, AssetType.from_model(THERMAL_RC)) for v in versions]
    live = shard(tmp_path / "shard")
    live.register("acme", "z1", registration_record(asset("z1"), arts[0], None, None))
    return Zone(ModelLifecycle(registry), live, arts)


def promoted(lc: ModelLifecycle, art) -> TransitionRecord:
    """`art` moved to production, submitted by its author and promoted by an approver: the promotion's record."""
    author, approver = Actor(id="alice", tenant="acme"), Actor(id="bob", tenant="acme", roles=frozenset({"approver"}))
    return [lc.transition(art.ref, to, approver if to == "production" else author, "checked")
            for to in ("candidate", "staging", "production")][-1]


@pytest.mark.parametrize("lands", ["between the start's reads of the log and the twins", "before the start's swap",
                                   "during the start's swap"])
def test_the_starts_finishing_of_an_interrupted_swap_leaves_the_twins_on_a_promotion_landing_meanwhile(
        tmp_path, monkeypatch, lands):
    """The backend's start finishes a promotion's interrupted swap (1.1.0 in production, the twin still on 1.0.0)
    while the ingress promotes 1.2.0 and swaps the twins to it, its boundary taken before the start's: the twin ends
    on 1.2.0. The start's swap, planned on what it read, undid the new promotion's, or came first with its later
    boundary and made the twin refuse it: the twin ran 1.1.0 for good under 1.2.0's production."""
    from actors.live_models import LiveModels
    from serve_apps.audit import AuditLog
    from serve_apps.promotions import finish_interrupted_swaps

    lc, live, (_, interrupted, new) = zone_versions(tmp_path, "1.0.0", "1.1.0", "1.2.0")
    promote = partial(promoted, lc)
    promote(interrupted)  # ...and the backend died before the swap
    monkeypatch.setattr("ray.get", direct_get)
    models = LiveModels([Direct(live)])
    hooked = "swap_marks" if lands.startswith("between") else "swap"
    start_call, boundary = getattr(models, hooked), datetime.now(UTC) - timedelta(minutes=1)

    def ingress_promotes() -> None:  # recorded, then its twins swapped (`swap_on_promotion`)
        promote(new)
        models.swap("acme", new, boundary)

    def promotion_beside(*args, **kwargs):  # the start's call, with the ingress's promotion landing at `lands`
        monkeypatch.setattr(models, hooked, start_call)
        if lands == "during the start's swap":
            outcome = start_call(*args, **kwargs)
            ingress_promotes()  # (refused by the twin: the start's swap has the later boundary)
            return outcome
        ingress_promotes()
        return start_call(*args, **kwargs)

    monkeypatch.setattr(models, hooked, promotion_beside)
    done = finish_interrupted_swaps(lc, models, "acme", AuditLog(str(tmp_path / "store")))
    assert live.twins_of_model("acme", "zone", running=new.ref) == ["z1"]
    if lands == "before the start's swap":
        assert "after this swap was planned" in done[interrupted.ref].refused["z1"]
    elif lands == "during the start's swap":
        assert [s.asset_id for s in done[new.ref].states] == ["z1"]
    else:
        assert done == {}


def test_the_starts_finishing_of_an_interrupted_swap_goes_after_a_boundary_a_clock_ahead_set(tmp_path, monkeypatch):
    """1.1.0's swap landed at a boundary a day ahead of this host's clock (another replica's host), then 1.2.0 was
    promoted and the backend died before its swap. The start's swap at its own clock came before the twin's last
    boundary: refused, the twin ran 1.1.0 under 1.2.0's production until a later start. Now it goes a microsecond
    after that boundary."""
    from actors.live_models import LiveModels
    from raytwin.statestore import to_micros
    from serve_apps.audit import AuditLog
    from serve_apps.promotions import finish_interrupted_swaps

    lc, live, (_, ahead, interrupted) = zone_versions(tmp_path, "1.0.0", "1.1.0", "1.2.0")
    monkeypatch.setattr("ray.get", direct_get)
    models, later = LiveModels([Direct(live)]), datetime.now(UTC) + timedelta(days=1)
    for art in (ahead, interrupted):
        promoted(lc, art)
    models.swap("acme", ahead, later)  # (and 1.2.0's swap never ran)

    done = finish_interrupted_swaps(lc, models, "acme", AuditLog(str(tmp_path / "store")))
    assert done[interrupted.ref].refused == {}
    assert live.twins_of_model("acme", "zone", running=interrupted.ref) == ["z1"]
    assert live.swap_marks("acme", "zone")["z1"] == (interrupted.ref, to_micros(later) + 1)


@pytest.mark.parametrize("order", ["the later record's swap first", "the earlier record's boundary later",
                                   "the earlier record's swap between the later's read and swap"])
def test_two_promotions_swapping_in_the_other_order_than_their_records_leave_the_twins_on_production(
        tmp_path, monkeypatch, order):
    """Replica A promotes 1.1.0, then replica B 1.2.0 (two records, in that order); their routes' swaps reach the
    shard in the other order, or A's host clock is ahead of B's. Unconditional, A's swap undid B's or B's was refused
    (its boundary before A's): the twin ran 1.1.0 under 1.2.0's production until the next start. Now each route swaps
    only while its version is production and the twin stands where it was read: the twin ends on 1.2.0, and A's
    answer says why it was left."""
    import asyncio
    from contextlib import asynccontextmanager

    from actors.live_models import LiveModels
    from serve_apps import routes_shadow

    lc, live, (_, first, second) = zone_versions(tmp_path, "1.0.0", "1.1.0", "1.2.0")
    monkeypatch.setattr("ray.get", direct_get)
    models, audited = LiveModels([Direct(live)]), []
    real_swap, clock = models.swap, {first.ref: T0 + timedelta(seconds=1), second.ref: T0}  # A's host is ahead

    @asynccontextmanager
    async def audit(request, who, action, target, **attempted):
        audited.append((target, outcome := {}))
        yield outcome

    monkeypatch.setattr(routes_shadow, "_lifecycle", lambda svc, tenant: lc)
    monkeypatch.setattr(routes_shadow, "live_models", lambda svc: models)
    monkeypatch.setattr(routes_shadow, "datetime", SimpleNamespace(now=lambda tz: clock[promoting[-1]]))
    promoting: list[str] = []

    def promote(art) -> None:  # the route: the record, then its swap
        promoting.append(art.ref)
        record = promoted(lc, art)
        asyncio.run(routes_shadow.swap_on_promotion(_svc(audit), None, SimpleNamespace(tenant="acme"), record))

    def b_lands_inside_a(*args, **kwargs):  # A's swap, called: B's promotion lands first, or beside B's own swap
        if order == "the later record's swap first":
            monkeypatch.setattr(models, "swap", real_swap)
            promote(second)
            return real_swap(*args, **kwargs)
        outcome = {}
        monkeypatch.setattr(models, "swap", lambda *b_args, **b_kwargs: (  # B's swap: A's lands just before it
            monkeypatch.setattr(models, "swap", real_swap), outcome.update(a=real_swap(*args, **kwargs)),
            real_swap(*b_args, **b_kwargs))[-1])
        promote(second)
        return outcome["a"]

    if order == "the earlier record's boundary later":
        promote(first)
        promote(second)
    else:
        monkeypatch.setattr(models, "swap", b_lands_inside_a)
        promote(first)
    assert live.twins_of_model("acme", "zone", running=second.ref) == ["z1"]
    swaps = {target: outcome for target, outcome in audited}
    assert swaps[second.ref]["swapped"] == ["z1"] and swaps[second.ref]["refused"] == {}
    if order == "the later record's swap first":
        assert swaps[first.ref] == {"swapped": [], "refused": {"z1": (
            f"{first.ref} is no longer production ({second.ref} is: promoted or rolled back to meanwhile); that "
            "transition's swap moves the twin")}}
    else:
        assert swaps[first.ref] == {"swapped": ["z1"], "refused": {}}



def _svc(audited) -> SimpleNamespace:
    """The `Services` that `swap_on_promotion` uses: its audit steps (`audited`) and the shard read deadline."""
    return SimpleNamespace(audited=audited, config=SimpleNamespace(shard_read_timeout_s=5.0))


def _collected(audited: list[dict]):
    """`Services.audited` that appends each step's outcome to `audited`."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def audit(request, who, action, target, **attempted):
        audited.append(outcome := {})
        yield outcome

    return audit


class Hung:
    """A shard actor's handle that leaves every call unanswered: `hung_get` times it out, or fails the test where
    `ray.get` is given no timeout (it would wait forever)."""

    def __getattr__(self, method: str) -> SimpleNamespace:
        return SimpleNamespace(remote=lambda *args: Hung)


class SwapHangs(Direct):
    """`Direct`, but the shard leaves the swap of twin `hung` unanswered (`Hung`): it hung after the twins were read."""

    def __init__(self, shard: TwinShard, hung: str):
        super().__init__(shard)
        self.hung = hung

    @property
    def swap_model(self) -> SimpleNamespace:
        direct = super().__getattr__("swap_model")
        return SimpleNamespace(remote=lambda tenant, asset_id, *rest: (
            Hung if asset_id == self.hung else direct.remote(tenant, asset_id, *rest)))


def hung_get(calls, timeout=None):
    from ray.exceptions import GetTimeoutError

    if calls is Hung or (isinstance(calls, list) and Hung in calls):
        assert timeout is not None, "ray.get without a timeout on a hung shard waits forever"
        raise GetTimeoutError(f"Get timed out: some object(s) not ready after {timeout} s")
    return direct_get(calls, timeout)


def test_a_hung_shard_leaves_a_promotions_swap_unfinished_and_said_not_hung(tmp_path, monkeypatch):
    """`LiveModels.swap_marks` waited on every shard without a deadline: one hung shard hung the promotion's answer
    (recorded already) and the backend's start. Within `shard_read_timeout_s` the route answers what it swapped and
    why the rest is unfinished (audited); the start gives the tenant's swaps up to the next start."""
    import asyncio

    from ray.exceptions import GetTimeoutError

    from actors.live_models import LiveModels
    from actors.routing import shard_index
    from serve_apps import routes_shadow
    from serve_apps.audit import AuditLog
    from serve_apps.promotions import finish_interrupted_swaps

    lc, live, (old, new) = zone_versions(tmp_path, "1.0.0", "1.1.0")
    record = promoted(lc, new)
    handles = [Hung(), Hung()]
    handles[shard_index("acme", "z1", 2)] = Direct(live)
    monkeypatch.setattr("ray.get", hung_get)
    models, audited = LiveModels(handles), []
    audit = _collected(audited)
    monkeypatch.setattr(routes_shadow, "_lifecycle", lambda svc, tenant: lc)
    monkeypatch.setattr(routes_shadow, "live_models", lambda svc: models)
    outcome = asyncio.run(routes_shadow.swap_on_promotion(_svc(audit), None, SimpleNamespace(tenant="acme"), record))
    assert (outcome.states, outcome.refused) == ([], {}) and live.twins_of_model("acme", "zone", running=old.ref) == ["z1"]
    assert outcome.unfinished == (
        "a twin shard left the read of which twins run zone unanswered for 5 s (hung or stalled): the twins not named "
        f"here were not asked and keep the version they run; the service's next start swaps them to {new.ref} if that "
        "is production")
    assert audited == [{"swapped": [], "refused": {}, "unfinished": outcome.unfinished}]
    with pytest.raises(GetTimeoutError):
        finish_interrupted_swaps(lc, models, "acme", AuditLog(str(tmp_path / "store")), timeout_s=5.0)


def test_a_shard_hung_on_a_swap_leaves_the_promotion_unfinished_and_said_not_hung(tmp_path, monkeypatch, caplog):
    """`LiveModels.swap` waited on each twin's swap without a deadline: a shard that hung between the read of the
    twins and their swap hung the promotion's answer (recorded already) and the backend's start. Within
    `shard_read_timeout_s` the twins that answered are swapped and named, the unanswered one in `unfinished`
    (audited), by the route and by the start alike; a swap that reads the twins itself raises past it."""
    import asyncio

    from ray.exceptions import GetTimeoutError

    from actors.live_models import LiveModels
    from serve_apps import routes_shadow
    from serve_apps.audit import AuditLog
    from serve_apps.promotions import finish_interrupted_swaps

    lc, live, (old, new) = zone_versions(tmp_path, "1.0.0", "1.1.0")
    live.register("acme", "z2", registration_record(asset("z2"), old, None, None))
    record = promoted(lc, new)
    monkeypatch.setattr("ray.get", hung_get)
    models, audited = LiveModels([SwapHangs(live, "z1")]), []
    monkeypatch.setattr(routes_shadow, "_lifecycle", lambda svc, tenant: lc)
    monkeypatch.setattr(routes_shadow, "live_models", lambda svc: models)
    outcome = asyncio.run(routes_shadow.swap_on_promotion(_svc(_collected(audited)), None,
                                                          SimpleNamespace(tenant="acme"), record))
    unanswered = (f"the shards of twins z1 left their swap to {new.ref} unanswered for 5 s (hung or stalled): each "
                  "takes it when its shard gets to it, unless another swap moved the twin meanwhile, and runs the "
                  "version it ran until then")
    assert ([s.asset_id for s in outcome.states], outcome.refused) == (["z2"], {})
    assert outcome.unfinished == (f"{unanswered}; the service's next start swaps those still behind to {new.ref} if "
                                  "that is production")
    assert audited == [{"swapped": ["z2"], "refused": {}, "unfinished": outcome.unfinished}]
    assert live.twins_of_model("acme", "zone", running=old.ref) == ["z1"]

    [started] = finish_interrupted_swaps(lc, models, "acme", AuditLog(str(tmp_path / "store")), timeout_s=5.0).values()
    assert (started.states, started.refused, started.unfinished) == ([], {}, unanswered)
    assert f"event=interrupted_swap_unfinished tenant=acme model={new.ref}: {unanswered}" in caplog.text
    with pytest.raises(GetTimeoutError):  # a swap of every twin of the model: its read of them, unanswered
        LiveModels([Hung()]).swap("acme", new, T0, timeout_s=5.0)


def test_a_hung_shard_makes_the_shadow_routes_503_and_the_conclusion_round_fail_not_hang(tmp_path, monkeypatch):
    """`LiveModels`' shadow calls waited on every shard without a deadline: one hung shard held each start, read and
    stop of an evaluation for good (an admission slot each) and the backend's conclusion thread. Within
    `shard_read_timeout_s` the routes answer 503 `twin_unavailable` with `Retry-After`, and the round fails (logged by
    the backend, tried again next round)."""
    from ray.exceptions import GetTimeoutError

    from actors.live_models import LiveModels
    from serve_apps import routes_shadow
    from serve_apps.audit import AuditLog
    from serve_apps.shadow_conclusions import conclude_running
    from tests.fixtures_serve import in_process

    registry = ModelRegistry(str(tmp_path / "store" / "registry" / "acme"))
    lc = ModelLifecycle(registry)
    lc.submit(registry.register("zone", "1.0.1", AssetType.from_model(THERMAL_RC)).ref,
              Actor(id="alice", tenant="acme"), "fitted")
    models = LiveModels([Hung()])
    monkeypatch.setattr("ray.get", hung_get)
    monkeypatch.setattr(routes_shadow, "live_models", lambda svc: models)
    url = "/v1/models/zone/versions/1.0.1/shadow"
    with in_process(SimpleNamespace(check_writable=lambda: None), tmp_path) as (http, auth, svc):
        answers = [http.get(url, headers=auth["reader"]),
                   http.post(url, json={"events": 5, "sample": 1}, headers=auth["writer"]),
                   http.delete(url, headers=auth["writer"])]
    for answer in answers:
        assert (answer.status_code, answer.json()["error"]["code"], answer.headers.get("Retry-After")) == (
            503, "twin_unavailable", "2"), answer.text
        assert "unanswered within 5 s" in answer.json()["error"]["message"]
    with pytest.raises(GetTimeoutError):
        conclude_running(models, lambda tenant: lc, AuditLog(str(tmp_path / "store")), set(), timeout_s=5.0)


def test_a_hung_shard_makes_a_partial_fits_promotion_503_before_anything_is_recorded(tmp_path, monkeypatch):
    """Promoting a version fitted on some twins' telemetry reads which twins run the model (to refuse it over the
    others without `"fleet"`) with no deadline: a hung shard held the request. Within `shard_read_timeout_s` it is 503
    `twin_unavailable` with `Retry-After`, and the version's stage is untouched."""
    import asyncio

    from actors.live_models import LiveModels
    from raytwin.lifecycle import Evidence
    from raytwin.recalibration import DriftTrigger
    from serve_apps import routes_models, routes_shadow
    from serve_apps.shard_deadline import TwinUnavailable

    registry = ModelRegistry(str(tmp_path / "models"))
    lc, fitted = ModelLifecycle(registry), registry.register("zone", "1.0.1", AssetType.from_model(THERMAL_RC))
    trigger = DriftTrigger(seq=1, asset_id="z1", type_name="zone", type_version="1.0.0", event_time=None,
                           drift_score=2.0, nis_mean=3.0, nis_last=3.0)
    lc.submit(fitted.ref, Actor(id="recalibration", tenant="acme"), "drift", Evidence(triggers=[trigger]))
    monkeypatch.setattr("ray.get", hung_get)
    monkeypatch.setattr(routes_shadow, "live_models", lambda svc: LiveModels([Hung()]))
    with pytest.raises(TwinUnavailable, match="unanswered within 5 s .* nothing was recorded") as refused:
        asyncio.run(routes_models._refuse_partial_fit(_svc(None), SimpleNamespace(tenant="acme"), lc, "zone", "1.0.1"))
    assert refused.value.headers == {"Retry-After": "2"} and lc.stage(fitted.ref) == "candidate"


def test_shadow_resumes_after_a_shard_restart_with_the_uninterrupted_statistics(tmp_path, versions):
    """A shard restarted mid-evaluation (a new shard on the store, what Ray's restart runs) resumes the
    shadow from its checkpoint and the event log: its statistics equal those of a shard that never
    restarted, bit for bit, and its verdict is recorded; a stopped evaluation stays stopped."""
    wrong, true = versions
    evs = stream("z1", 150, seed=11)
    restarted_dir, uninterrupted = tmp_path / "a", shard(tmp_path / "b")
    live = shard(restarted_dir)
    for s in (live, uninterrupted):
        s.register("acme", "z1", registration_record(asset("z1"), wrong, None, None))
        s.ingest("acme", validated_table(evs[:20]))
        s.start_shadow("run-r", "acme", ["z1"], true.model_dump(mode="json"), 100)
    for part in (evs[20:45], evs[45:55]):  # checkpointed after a batch 16 scored events on: at 25, not at 35
        for s in (live, uninterrupted):
            s.ingest("acme", validated_table(part))

    restarted = shard(restarted_dir)
    run_id, [resumed] = restarted.shadow_report("acme", true.ref)
    _, [reference] = uninterrupted.shadow_report("acme", true.ref)
    assert run_id == "run-r" and resumed.resumed_at is not None and resumed.restarted_at is None
    assert resumed.candidate_stats == reference.candidate_stats and resumed.candidate.events == 35
    assert resumed.production_stats == reference.production_stats
    redelivered = restarted.ingest("acme", validated_table(evs[45:110]))  # 10 re-deliveries, 55 new
    assert (redelivered.accepted, redelivered.duplicates) == (55, 10)
    uninterrupted.ingest("acme", validated_table(evs[55:110]))
    for s in (restarted, uninterrupted):
        s.ingest("acme", validated_table(evs[110:]))

    served = restarted.state("acme", "z1")
    assert served == uninterrupted.state("acme", "z1") and served.events_applied == 150  # none lost or doubled
    _, [done] = restarted.shadow_report("acme", true.ref)
    _, [reference] = uninterrupted.shadow_report("acme", true.ref)
    assert done.done and done.candidate.events == done.production.events == 100
    assert (done.production_stats, done.candidate_stats) == (reference.production_stats, reference.candidate_stats)

    registry = ModelRegistry(str(tmp_path / "registry"))  # the same artifacts, a lifecycle of this test's own
    registry.register("zone", "1.1.0", AssetType.from_model(THERMAL_RC), {"R_io": TRUE_R_IO})
    lc = ModelLifecycle(registry)
    lc.submit(true.ref, Actor(id="calibrator", tenant="acme"), "calibrated on the live stream")
    comparison = compare(InnovationStats(*done.production_stats), InnovationStats(*done.candidate_stats))
    [evaluated] = conclude(lc, true.ref, "acme", run_id, comparison, twins=1)
    assert evaluated.action == "evaluate" and "candidate better than production over 100 events" in evaluated.reason

    assert restarted.stop_shadow("acme", true.ref)
    assert shard(restarted_dir).shadow_report("acme", true.ref) is None  # stopped: not resumed again


def test_a_shadow_whose_log_after_its_checkpoint_was_pruned_restarts_its_count(tmp_path, versions):
    """The fallback: the events after the shadow's checkpoint are gone (`prune`), so the restarted shard
    starts that twin's statistics afresh from its recovered state and says so (`restarted_at`)."""
    wrong, true = versions
    evs = stream("z2", 330, seed=5)  # five-minute readings from midnight: event 288 starts the second day
    make = lambda: TwinShard(str(tmp_path), 0, 1, snapshot_every=64, **OPTS)  # noqa: E731 (shadow checkpoints too)
    live = make()
    live.register("acme", "z2", registration_record(asset("z2"), wrong, None, None))
    live.ingest("acme", validated_table(evs[:260]))
    live.start_shadow("run-p", "acme", ["z2"], true.model_dump(mode="json"), 100)  # checkpointed on day one
    live.ingest("acme", validated_table(evs[260:310]))
    live.flush()  # the twin's newest snapshot is on day two, so day one may go
    assert live.store.prune("acme", (T0 + timedelta(days=1)).date()).history_from is not None

    restarted = make()
    _, [report] = restarted.shadow_report("acme", true.ref)
    assert report.restarted_at is not None and report.resumed_at is None and report.candidate.events == 0
    restarted.ingest("acme", validated_table(evs[310:]))
    _, [report] = restarted.shadow_report("acme", true.ref)
    assert report.candidate.events == report.production.events == 20 and not report.done
    assert restarted.state("acme", "z2").events_applied == 330


def test_an_unregistered_twin_leaves_the_shadow_and_its_records_go(tmp_path, versions):
    """A sampled twin deleted mid-evaluation: the evaluation goes on with the others and concludes, its record
    is deleted (a restarted shard resumes only the others), and an evaluation left without twins ends."""
    wrong, true = versions
    live = shard(tmp_path)
    for a in ("u1", "u2"):
        live.register("acme", a, registration_record(asset(a), wrong, None, None))
    live.start_shadow("run-u", "acme", ["u1", "u2"], true.model_dump(mode="json"), 30)
    live.ingest("acme", validated_table(stream("u1", 10, seed=3) + stream("u2", 10, seed=4)))
    assert live.unregister("acme", "u2")
    live.ingest("acme", validated_table(stream("u1", 40, seed=3)[10:]))
    _, [only] = live.shadow_report("acme", true.ref)
    assert only.asset_id == "u1" and only.done
    _, [resumed] = shard(tmp_path).shadow_report("acme", true.ref)
    assert resumed.asset_id == "u1"
    key = ("acme", "u1")
    for start in range(40, 200, 10):  # calls after its first snapshot, most between two snapshot points
        live.ingest("acme", validated_table(stream("u1", start + 10, seed=3)[start:]))
    assert key in live.phases and key in live.between  # `_snapshot` found it between two snapshot points
    assert live.unregister("acme", "u1")
    assert live.shadow_report("acme", true.ref) is None and shard(tmp_path).shadow_report("acme", true.ref) is None
    assert not any(key in kept for kept in (live.durable_revision, live.phases, live.between))  # gone with the twin


def test_a_shadow_after_a_swap_compares_with_the_version_that_applies_the_next_events(versions):
    """After a promotion swapped a twin that had applied no event since, its shadow named the old version as
    production (the one of its last event) and scored it on events the new one applies; shadowing that old
    version then compared a model with itself and wrote an `evaluate` record that it won."""
    from actors.shadow import shadow_twin

    old_art, new_art = versions
    evs = stream("z", 10, seed=5)
    twin = Twin("acme", "z", old_art, **OPTS)
    twin.apply([twin.pending(logged_event(e, old_art.asset_type)) for e in evs])
    twin.add_swap(int((evs[-1].event_time + timedelta(minutes=1)).timestamp() * 1e6), new_art)
    assert twin.view().model_ref == "zone@1.0.0"  # no event applied by the new version yet
    shadow = shadow_twin(twin, old_art, events=5)
    assert shadow.report().production_ref == "zone@1.1.0" and shadow.report().candidate_ref == "zone@1.0.0"
    with pytest.raises(ValueError, match=r"^twin z runs zone@1.1.0 from its next event on: shadow a version"):
        shadow_twin(twin, new_art, events=5)


def test_a_shadow_runs_only_on_twins_of_the_candidates_model(tmp_path, versions):
    """A candidate of another model shadowed on a zone twin: its comparison with the zone's production was
    recorded as evidence on the other model's log (and could stage it); refused, naming the twins. A candidate
    of the same model measuring other columns is refused in the shadow's words, not the hot swap's."""
    from actors.shadow import ShadowRefused

    registry = ModelRegistry(str(tmp_path / "registry"))
    other = registry.register("other", "1.1.0", AssetType.from_model(THERMAL_RC))
    battery = registry.register("zone", "2.0.0", AssetType.from_model(BATTERY_ECM))
    live = shard(tmp_path / "store")
    for a in ("z1", "z2"):
        live.register("acme", a, registration_record(asset(a), versions[0], None, None))
    with pytest.raises(ShadowRefused, match=r"^twin\(s\) z1, z2 run no version of model other: a shadow evaluation "
                                            r"compares other@1.1.0 with its own model's production version"):
        live.start_shadow("run-o", "acme", ["z1", "z2"], other.model_dump(mode="json"), 5)
    with pytest.raises(ShadowRefused, match=r"^twin z1 cannot shadow zone@2.0.0: model .* measures .*: not the same "
                                            r"inputs and outputs; the candidate is scored on the twin's own events"):
        live.start_shadow("run-b", "acme", ["z1"], battery.model_dump(mode="json"), 5)
    assert live.shadow_report("acme", other.ref) is None and live.shadow_report("acme", battery.ref) is None
    live.start_shadow("run-z", "acme", ["z1"], versions[1].model_dump(mode="json"), 5)  # its own model's twin: fine
