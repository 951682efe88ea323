"""What the change log costs telemetry, and what group commit buys on an object store.

1. Telemetry through the API's backend (`serve_apps.backend.Backend`, real twin shards on Ray,
   the store on local disk): requests of 10 events for one of 8 twins, one at a time and 8 at
   once. RayTwin: `Backend.ingest`, which applies the events (the shard's reply carries the twins'
   new states) and records those states in the change log before it returns. Baseline, in the same run, interleaved: the same requests
   through `TwinService.ingest` alone (what `Backend.ingest` did before the change log). Checked
   first: the log's ids have no gap and each twin's recorded revisions only grow, ending at the
   twin's revision.
2. `ChangeLog.record` on S3 (moto's server on loopback, when installed): one append at a time
   (one PUT each) against 8 threads appending at once (group commit: queued appends share a PUT).
"""

from __future__ import annotations

import itertools
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark, owned_backend
from benchmarks.local_s3 import local_s3, new_bucket
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.sim import THERMAL_RC
from serve_apps.changes import ChangeLog
from serve_apps.conditional import Precondition
from serve_apps.config import ServeConfig
from sweeps.runner import ensure_ray

TENANT, TWINS, EVENTS_PER_REQUEST, THREADS = "bench", 8, 10, 8
T0 = datetime(2026, 1, 5, tzinfo=UTC)


class Requests:
    """Fresh telemetry requests (never duplicates), round-robin over the twins."""

    def __init__(self, twins: int) -> None:
        self.sequence = itertools.count()
        self.asset = itertools.cycle(f"zone-{i}" for i in range(twins))

    def next(self) -> list[TelemetryEvent]:
        asset = next(self.asset)
        now = datetime.now(UTC)
        events = []
        for _ in range(EVENTS_PER_REQUEST):
            k = next(self.sequence)
            events.append(TelemetryEvent(asset_id=asset, sequence=k, event_time=T0 + timedelta(minutes=k),
                                         ingest_time=now,
                                         measurements={"T_in": {"value": 293.0 + (k % 7) * 0.1, "unit": "K"}}))
        return events


def check_log(backend) -> dict[str, int]:
    """Gapless ids; per twin, recorded revisions only grow and end at the twin's revision."""
    changes = backend.changes.store.read(TENANT, 0, 10**9)
    if [c.seq for c in changes] != list(range(1, len(changes) + 1)):
        raise AssertionError("change log ids have a gap")
    last: dict[str, int] = {}
    for c in changes:
        if c.kind == "twin.state":
            if c.revision <= last.get(c.asset_id, -1):
                raise AssertionError(f"{c.asset_id}: revision {c.revision} after {last[c.asset_id]}")
            last[c.asset_id] = c.revision
    for asset, revision in last.items():
        if backend.twins.state(TENANT, asset).revision != revision:
            raise AssertionError(f"{asset}: last recorded revision {revision} is not the twin's")
    return {"changes": len(changes), "twin_states": sum(c.kind == "twin.state" for c in changes),
            "drift_flips": sum(c.kind == "twin.drift" for c in changes)}  # the synthetic readings fit no model


def telemetry(ctx: BenchContext, result: BenchResult) -> None:
    ensure_ray()
    n, twins = (8, 2) if ctx.quick else (400, TWINS)
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-changes-") as tmp:
        config = ServeConfig(store_url=f"{tmp}/store", keys_file=f"{tmp}/keys.json", twin_shards=1,
                             namespace=f"bench-{uuid.uuid4().hex[:8]}")
        with owned_backend(config) as backend:
            thermal = AssetType.from_model(THERMAL_RC)
            backend.put_type(TENANT, thermal, Precondition(), "benchmark")
            for i in range(twins):
                asset = Asset(id=f"zone-{i}", tenant=TENANT, type_name=thermal.name, type_version=thermal.version)
                backend.create_asset(asset, None, Precondition())
            requests = Requests(twins)
            with_log = lambda: backend.apply(TENANT, requests.next())  # noqa: E731
            without = lambda: backend.twins.ingest(TENANT, requests.next())  # noqa: E731

            def serial(fn):
                return lambda: [fn() for _ in range(n)]

            def parallel(fn):
                def run():
                    with ThreadPoolExecutor(THREADS) as pool:
                        list(pool.map(lambda _: fn(), range(n)))
                return run

            timings = {}
            for label, fn in (("serial", serial), ("8 at once", parallel)):  # interleaved rounds
                for name, work in (("baseline", without), ("raytwin", with_log)):
                    timings[(label, name)], _ = ctx.measure(f"telemetry-{label}-{name}", fn(work))
            result.checks["log"] = {**check_log(backend), "twins": twins}
            for label in ("serial", "8 at once"):
                mine, base = timings[(label, "raytwin")], timings[(label, "baseline")]
                result.timings[f"telemetry_{label}_raytwin"] = mine
                result.timings[f"telemetry_{label}_baseline"] = base
                result.figures.append(Figure(
                    f"telemetry requests ({EVENTS_PER_REQUEST} events, {twins} twins), {label}, with the change log",
                    n / mine.median_s, "requests/s", baseline="TwinService.ingest alone (no change log)",
                    baseline_value=n / base.median_s))
                result.notes.append(f"{label}: {1e3 * (mine.median_s - base.median_s) / n:.2f} ms per request "
                                    "for the change log (the twins' states in the shard's reply, the log append)")


def group_commit(ctx: BenchContext, result: BenchResult) -> None:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        result.notes.append("group commit on S3: skipped (moto not installed: pip install 'moto[server]')")
        return
    with local_s3() as endpoint:
        options = {"client_kwargs": {"endpoint_url": endpoint}}
        bucket = new_bucket(endpoint)
        n = 8 if ctx.quick else 400
        draft = [{"kind": "twin.state", "asset_id": "zone-0", "data": {"state": {"T_in": 293.0, "T_m": 292.0}}}]
        logs = {}

        def serial():
            log = logs["serial"] = ChangeLog(f"{bucket}/{uuid.uuid4().hex}", options)
            for _ in range(n):
                log.record(TENANT, draft)

        def grouped():
            log = logs["grouped"] = ChangeLog(f"{bucket}/{uuid.uuid4().hex}", options)
            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(lambda _: log.record(TENANT, draft), range(n)))

        t_serial, _ = ctx.measure("changelog-s3-serial", serial, repeat=min(ctx.repeat, 3))
        t_grouped, _ = ctx.measure("changelog-s3-grouped", grouped, repeat=min(ctx.repeat, 3))
        store = logs["grouped"].store
        segments = len(store.fs.find(store.root))
        if [c.seq for c in store.read(TENANT, 0, n)] != list(range(1, n + 1)):
            raise AssertionError("group commit lost or reordered appends")
        result.checks["s3_grouped_segments"] = segments
        result.timings.update({"changelog_s3_serial": t_serial, "changelog_s3_grouped": t_grouped})
        result.figures.append(Figure(f"change-log appends on S3 (moto, loopback), {THREADS} threads, group commit",
                                     n / t_grouped.median_s, "appends/s", baseline="one append at a time (a PUT each)",
                                     baseline_value=n / t_serial.median_s))
        result.notes.append(f"group commit wrote {n} appends as {segments} segments")


@benchmark("changes", "Telemetry cost of the change log (Backend.ingest vs TwinService.ingest); group commit on S3")
def changes(ctx: BenchContext) -> BenchResult:
    result = BenchResult()
    telemetry(ctx, result)
    group_commit(ctx, result)
    return result
