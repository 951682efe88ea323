"""Ingestion: Parquet (local and S3) and NDJSON-over-HTTP sources, contract rejects to dead
letters, and the bounded in-flight window."""

from __future__ import annotations

import gc
import math
import json
import re
import sys
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors import IngestReport, TwinService, events_to_table, ndjson_http_source, telemetry
from actors import ingest as ingest_module
from actors.ingest import ROWS_BY_CONTRACT_BELOW, Dispatcher, ShardRouter, lingering_chunks, validate_batch
from actors.telemetry import (
    VALIDATED_SCHEMA,
    Entries,
    Normalized,
    bytes_table,
    normalize_entries,
    parse_rows,
    rows_table,
    si_map,
    table_bytes,
    validate_table,
    validated_table,
)
from raytwin.contracts import Asset, AssetType, ContractError, TelemetryEvent, normalize_measurements
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK
from raytwin.statestore import TIME
from raytwin.storage import filesystem

T0 = datetime(2026, 4, 1, tzinfo=UTC)


def tank_events(asset_id: str, n: int, start: int = 0, level_mm: float = 500.0) -> list[TelemetryEvent]:
    """Event k measures the upper tank at `level_mm` - k mm (below 0 the two-tank EKF refuses the update)."""
    return [TelemetryEvent(asset_id=asset_id, event_time=T0 + timedelta(seconds=k), sequence=k,
                           measurements={"h1": {"value": level_mm - k, "unit": "mm"}, "q_in": {"value": 0.1, "unit": "L/s"}})
            for k in range(start, start + n)]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    artifact = ModelRegistry(str(tmp_path_factory.mktemp("reg"))).register("tank", "1.0.0",
                                                                           AssetType.from_model(TWO_TANK))
    svc = TwinService(str(tmp_path_factory.mktemp("store")), shards=2, batch_size=16)
    for a in ("t1", "t2", "t3", "p1", "p2"):
        svc.register(Asset(id=a, tenant="acme", type_name="two_tank", type_version="1.0.0"), artifact)
    yield svc
    svc.close()


def test_parse_rows_rejects_with_reasons():
    good = events_to_table(tank_events("t1", 1)).to_pylist()[0]
    rows = [good, {**good, "event_time": None}, {**good, "measurements": json.dumps({"h1": {"value": 1, "unit": "mm"}})},
            {**good, "measurements": [("h1", {"value": float("nan"), "unit": "mm"})]}, {"_unparsed": "garbage"}]
    events, rejects = parse_rows(rows)
    assert len(events) == 2 and events[1].measurements["h1"].value == 1.0
    assert len(rejects) == 3
    assert rejects[0]["reason"].startswith("event_time:")
    assert rejects[1]["reason"].startswith("measurements.h1.value:")
    assert "_unparsed" in rejects[2]["reason"] and "garbage" in rejects[2]["raw"]


def test_column_check_agrees_with_the_contract_row_by_row():
    """`validate_table` (column-wise) must accept and reject exactly what `parse_rows` (the pydantic
    contract per row) does, with the same reasons, and keep source order."""
    good = events_to_table(tank_events("t1", 1)).to_pylist()[0]
    m = lambda *pairs: [(n, {"value": v, "unit": u}) for n, v, u in pairs]  # noqa: E731
    rows = [
        good, {**good, "event_time": None}, {**good, "sequence": -1}, {**good, "idempotency_key": None},
        {**good, "idempotency_key": ""}, {**good, "idempotency_key": "k" * 257}, {**good, "asset_id": "bad id!"},
        {**good, "asset_id": None}, {**good, "quality": "meh"}, {**good, "quality": None},
        {**good, "quality": "bad", "sequence": 7}, {**good, "measurements": None}, {**good, "measurements": []},
        {**good, "measurements": m(("h1", float("nan"), "mm"))}, {**good, "measurements": m(("h1", 1.0, "furlong"))},
        {**good, "measurements": [("h1", None)]}, {**good, "measurements": m(("h1", 1.0, None))},
        {**good, "measurements": m(("h1", 1.0, "mm"), ("h1", 2.0, "mm")), "sequence": 8},  # the contract keeps the last
        {**good, "event_time": datetime(2100, 1, 1, tzinfo=UTC)}, {**good, "sequence": 9},
    ]
    table = pa.Table.from_pylist(rows, schema=events_to_table([]).schema)
    valid, rejects = validate_table(table)
    events, expected = parse_rows(rows)
    assert [r["reason"].split(" is more than")[0] for r in rejects] == [
        r["reason"].split(" is more than")[0] for r in expected]
    assert [(r["asset_id"], r["idempotency_key"], r["raw"]) for r in rejects] == [
        (r["asset_id"], r["idempotency_key"], r["raw"]) for r in expected]
    assert valid.drop_columns(["ingest_time"]).equals(validated_table(events).drop_columns(["ingest_time"]))
    assert [r["sequence"] for r in valid.to_pylist()] == [0, 0, 0, 7, 8, 9] and len(rejects) == 14
    assert valid.column("idempotency_key").to_pylist()[:2] == ["t1:0", "t1:0"]  # filled in as the contract does


def test_json_rows_take_the_column_path_with_the_contracts_verdicts():
    """Parsed-JSON rows (NDJSON) are checked through Arrow when Arrow holds them exactly; the verdicts
    and reasons are the contract's, and rows Arrow would read loosely go row by row."""
    good = tank_events("t1", 1)[0].model_dump(mode="json")
    m = lambda v, u: {"h1": {"value": v, "unit": u}}  # noqa: E731
    checked = [
        good, {**good, "sequence": 3, "idempotency_key": None}, {**good, "sequence": -1}, {**good, "asset_id": "bad id!"},
        {**good, "quality": "meh"}, {**good, "measurements": {}}, {**good, "measurements": m(1.0, "furlong")},
        {**good, "event_time": "2100-01-01T00:00:00Z"}, {**good, "sequence": 4, "measurements": m(2, "mm")},
    ]
    assert rows_table(checked) is not None
    valid, rejects = _by_columns(checked)  # `validate_batch` takes this path from `ROWS_BY_CONTRACT_BELOW` rows
    events, expected = parse_rows(checked)
    assert [r["reason"].split(" is more than")[0] for r in rejects] == [
        r["reason"].split(" is more than")[0] for r in expected] and len(rejects) == 6
    assert valid.equals(validated_table(events))
    for loose in ({**good, "event_time": "2026-04-01T00:00:00"},  # no zone: Arrow would read it as UTC
                  {**good, "measurements": {"h1": {"value": 1.0, "unit": "mm", "note": "x"}}},  # Arrow drops "note"
                  {**good, "operator": "me"}, {**good, "sequence": "5"}, {**good, "schema_version": 2}):
        assert rows_table([good, loose]) is None
        (valid, rejects), (events, expected) = validate_batch([good, loose]), parse_rows([good, loose])
        assert valid.equals(validated_table(events)) and rejects == expected


@pytest.mark.parametrize("where", ["local", "s3"])
def test_ingest_parquet_dataset(service, tmp_path, where, request):
    base = str(tmp_path / "incoming") if where == "local" else request.getfixturevalue("s3_url") + "/incoming"
    fs, root = filesystem(base)
    fs.makedirs(root, exist_ok=True)
    asset_id = f"t{1 if where == 'local' else 2}"
    table = events_to_table(tank_events(asset_id, 40))
    bad = pa.Table.from_pylist([{**table.slice(0, 1).to_pylist()[0], "asset_id": "not a valid id!"}],
                               schema=table.schema)
    pq.write_table(pa.concat_tables([table.slice(0, 25), bad]), f"{root}/part-0.parquet", filesystem=fs)
    pq.write_table(table.slice(20), f"{root}/part-1.parquet", filesystem=fs)  # 5 overlapping = duplicates
    report = service.ingest_parquet("acme", base)
    assert (report.accepted, report.duplicates, report.rejected) == (40, 5, 1)
    assert "asset_id" in report.reasons[0].reason
    state = service.state("acme", asset_id)
    assert state.events_applied == 40 and state.event_time == T0 + timedelta(seconds=39)
    dead = service.dead_letters("acme").to_pylist()
    assert any("not a valid id!" in d["raw"] for d in dead)


def test_a_slow_stream_is_handed_over_after_the_linger_time_not_when_a_batch_fills():
    first_chunk_seen = threading.Event()

    def slow_source():
        yield {"k": 1}
        # a live stream that pauses: the first event must not wait for the batch to fill
        # generous: it ends when the chunk comes (50 ms on time); only a held-back event waits it out
        assert first_chunk_seen.wait(timeout=60), "the first event was held back 60 s while the source paused"
        yield {"k": 2}
        yield {"k": 3}

    chunks = []
    for chunk in lingering_chunks(slow_source(), size=1000, linger_s=0.05):
        chunks.append([item["k"] for item in chunk])
        first_chunk_seen.set()
    assert chunks[0] == [1]
    assert [k for c in chunks for k in c] == [1, 2, 3]


def test_lingering_chunks_respect_the_size_and_keep_order():
    chunks = list(lingering_chunks(({"k": k} for k in range(25)), size=10, linger_s=60.0))
    assert [len(c) for c in chunks] == [10, 10, 5]  # a long linger never delays a full chunk or the end
    assert [item["k"] for c in chunks for item in c] == list(range(25))


def test_a_failing_stream_source_raises_in_the_consumer_after_what_it_read():
    def broken():
        yield {"k": 1}
        raise ConnectionError("stream dropped")

    seen = []
    with pytest.raises(ConnectionError, match="stream dropped"):
        for chunk in lingering_chunks(broken(), size=10, linger_s=60.0):
            seen += chunk
    assert seen == [{"k": 1}]  # handed over at once (a failed source ends its chunk), then the error


def test_ingest_ndjson_over_http(service):
    lines = [e.model_dump_json() for e in tank_events("t3", 30)] + ["this is not json", ""]
    body = ("\n".join(lines) + "\n").encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            for i in range(0, len(body), 512):  # chunks: the client must stream across them
                self.wfile.write(body[i:i + 512])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        report = service.ingest_stream("acme", ndjson_http_source(f"http://127.0.0.1:{server.server_port}/events"))
    finally:
        server.shutdown()
    assert (report.accepted, report.rejected) == (30, 1)
    assert service.state("acme", "t3").events_applied == 30
    assert "this is not json" in service.dead_letters("acme").to_pylist()[-1]["raw"]


def test_a_stream_is_consumed_with_the_heap_frozen_and_left_as_it_was(service):
    """Full garbage collections of the caller's process must not stall a live stream."""
    frozen_while_read = []

    def source():
        frozen_while_read.append(gc.get_freeze_count())
        yield from (json.loads(e.model_dump_json()) for e in tank_events("t2", 5, start=500, level_mm=1000.0))

    assert gc.get_freeze_count() == 0
    assert service.ingest_stream("acme", source()).accepted == 5
    assert frozen_while_read[0] > 0 and gc.get_freeze_count() == 0


def test_ingest_table_task_and_table_through_the_service(service):
    from actors.ingest import ingest_table

    table = events_to_table(tank_events("t3", 10, start=1000, level_mm=1500.0))
    report = ray.get(ingest_table.remote(service.router, "acme", table.slice(0, 6), batch_size=4))
    assert (report.accepted, report.duplicates, report.rejected) == (6, 0, 0)
    report = service.ingest("acme", table)  # a pyarrow.Table straight into the facade
    assert (report.accepted, report.duplicates) == (4, 6)
    assert service.state("acme", "t3").event_time == T0 + timedelta(seconds=1009)


@ray.remote(max_concurrency=3)
class SlowShard:
    """Stands in for twin shards that are slow to apply: `delay_s` per call, or per asset of the
    call's first row; it records the order in which calls start and end."""

    def __init__(self, delay_s: float = 0.02, delay_by_asset: dict[str, float] | None = None):
        self.delay_s, self.delay_by_asset = delay_s, delay_by_asset or {}
        self.log: list[tuple[str, str]] = []

    def ingest(self, tenant, events, states=False):
        import time

        asset = bytes_table(events).column("asset_id")[0].as_py()
        self.log.append(("start", asset))
        time.sleep(self.delay_by_asset.get(asset, self.delay_s))
        self.log.append(("end", asset))
        return IngestReport(accepted=bytes_table(events).num_rows)

    def calls(self) -> list[tuple[str, str]]:
        return self.log


def test_dispatcher_bounds_in_flight_calls(ray_session, tmp_path):
    slow = SlowShard.remote()  # one threaded actor stands in for three shards (a process start is costly)
    shards = [slow, slow, slow]
    router = ShardRouter(str(tmp_path), shards=3, namespace="unused")
    d = Dispatcher(router, "acme", max_in_flight=2, batch_size=2, handles=shards)
    most = 0
    for k in range(0, 60, 3):  # each batch: one event of each of three assets
        d.send(validated_table([e for j in range(3) for e in tank_events(f"a{(k + j) % 7}", 1, start=k + j)]))
        most = max(most, len(d.busy))
        assert len(d.busy) <= 2
    assert d.finish().accepted == 60 and not d.busy and most == 2
    with pytest.raises(ValueError):
        Dispatcher(router, "acme", max_in_flight=0, handles=shards)


def test_a_busy_shard_does_not_hold_up_the_rows_of_the_others(ray_session, tmp_path):
    """Rows for an idle shard are sent at once, not after the busy shard's call completes (shard
    0 is busy and comes first in shard order, which is what used to hold shard 1's rows up)."""
    from actors.routing import shard_index

    first, second = (next(f"a{i}" for i in range(100) if shard_index("acme", f"a{i}", 2) == s) for s in (0, 1))
    shard = SlowShard.remote(delay_s=0.0, delay_by_asset={first: 1.0})
    router = ShardRouter(str(tmp_path), shards=2, namespace="unused")
    d = Dispatcher(router, "acme", max_in_flight=2, handles=[shard, shard])
    d.send(validated_table(tank_events(first, 1)))  # shard 0 busy for a second
    d.send(validated_table([*tank_events(first, 1, start=1), *tank_events(second, 1)]))
    assert d.finish().accepted == 3
    log = ray.get(shard.calls.remote())
    assert sorted(log) == sorted([("start", first), ("end", first)] * 2 + [("start", second), ("end", second)])
    assert log.index(("start", second)) < log.index(("end", first))  # shard 1 did not wait for shard 0
    assert log[-2:] == [("start", first), ("end", first)]  # shard 0's calls one after the other


@ray.remote
class FullDiskShard:
    """Stands in for a shard whose log write fails: its disk is full."""

    def ingest(self, tenant, events, states=False):
        raise OSError(28, "No space left on device")


def test_the_shard_backlog_gauge_goes_back_down_after_failed_shard_calls(ray_session, tmp_path):
    """`raytwin_shard_backlog_events` counted the events of every failed call (a full disk) for as long as the
    process lived: 280 on an idle service after 14 refused batches of 20."""
    from actors.ingest import _BACKLOG
    from actors.routing import shard_index

    first, second = (next(f"a{i}" for i in range(100) if shard_index("acme", f"a{i}", 2) == s) for s in (0, 1))
    router = ShardRouter(str(tmp_path), shards=2, namespace="unused")
    handles = [FullDiskShard.remote(), SlowShard.remote(delay_s=0.5)]  # shard 1 still busy when shard 0 fails
    before = [_BACKLOG.of(0), _BACKLOG.of(1)]
    for _ in range(3):
        d = Dispatcher(router, "acme", max_in_flight=2, handles=handles)
        with pytest.raises(OSError, match="No space left"):
            d.send(validated_table([*tank_events(first, 20), *tank_events(second, 5)]))
            d.finish()
        assert not d.busy
    assert [_BACKLOG.of(0), _BACKLOG.of(1)] == before


def test_batches_travel_as_arrow_ipc_bytes_and_read_back_equal():
    table = validated_table(tank_events("a1", 5))
    payload = table_bytes(table)
    assert isinstance(payload, bytes) and bytes_table(payload).equals(table)
    assert bytes_table(payload).schema == VALIDATED_SCHEMA and bytes_table(table) is table


@ray.remote(max_concurrency=4)
class GatedShard:
    """Stands in for a shard whose calls block until `release` (no sleeps, no timing): it records
    each call's sequences in the order the calls arrive."""

    def __init__(self):
        self.gate = threading.Event()
        self.arrived = threading.Condition()
        self.log: list[list[int]] = []

    def ingest(self, tenant, events, states=False):
        with self.arrived:
            self.log.append(bytes_table(events).column("sequence").to_pylist())
            self.arrived.notify_all()
        self.gate.wait()
        return IngestReport(accepted=bytes_table(events).num_rows)

    def release(self) -> None:
        self.gate.set()

    def calls(self, at_least: int = 0) -> list[list[int]]:
        """The calls so far, once at least `at_least` have arrived."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.log) >= at_least)
            return list(self.log)


def test_rows_offered_while_a_shard_is_busy_go_out_as_one_call_when_it_completes(ray_session, tmp_path):
    """A live stream keeps collecting while a shard works: what arrives meanwhile is held, in
    source order, and sent as one call (not one call per batch queued behind the busy one)."""
    shard = GatedShard.remote()
    router = ShardRouter(str(tmp_path), shards=1, namespace="unused")
    d = Dispatcher(router, "acme", max_in_flight=2, batch_size=100, handles=[shard])
    releaser = threading.Timer(60.0, lambda: shard.release.remote())  # a blocking `offer` fails, never hangs
    releaser.start()
    try:
        d.offer(validated_table(tank_events("a1", 2)))
        d.offer(validated_table(tank_events("a1", 3, start=2)))  # returns: the shard is busy, the rows wait
        d.offer(validated_table(tank_events("a1", 4, start=5)))
        assert d.holding and ray.get(shard.calls.remote(1)) == [[0, 1]]
        shard.release.remote()
        while not d.await_shard(timeout_s=1.0):
            pass
        d.dispatch()
        assert not d.holding and d.finish().accepted == 9
    finally:
        releaser.cancel()
    assert ray.get(shard.calls.remote()) == [[0, 1], list(range(2, 9))]


def test_held_rows_are_capped_at_a_batch_and_go_out_in_calls_of_at_most_batch_size(ray_session, tmp_path):
    shard = GatedShard.remote()
    shard.release.remote()
    router = ShardRouter(str(tmp_path), shards=1, namespace="unused")
    d = Dispatcher(router, "acme", max_in_flight=1, batch_size=4, handles=[shard])
    for k in range(0, 30, 3):
        d.offer(validated_table(tank_events("a1", 3, start=k)))
        assert sum(t.num_rows for parts in d.held.values() for t in parts) <= 4  # backpressure: memory bounded
    assert d.finish().accepted == 30
    calls = ray.get(shard.calls.remote())
    assert [k for c in calls for k in c] == list(range(30)) and max(map(len, calls)) <= 4


# ---------------------------------------------------------------- poison rows, verdicts, times, bounds ----
def json_rows(asset_id: str, n: int, start: int = 0) -> list[dict]:
    return [json.loads(e.model_dump_json(exclude={"ingest_time"})) for e in tank_events(asset_id, n, start)]


def test_poison_rows_are_dead_lettered_and_never_block_a_stream(service):
    """A sequence beyond int64, a 400-digit number, a lone surrogate, a row that is no object, nesting
    JSON cannot write back: each used to raise out of `ingest_stream`, so the rows after it were
    neither applied nor dead-lettered, and every re-delivery failed the same way."""
    good = json_rows("p1", 6)
    deep: object = 1.0
    for _ in range(5000):
        deep = [deep]
    poison = [
        ({**good[0], "sequence": 2**63, "idempotency_key": "p1:overflow"}, "less than or equal to 9223372036854775807"),
        ({**good[0], "sequence": 90, "measurements": {"h1": {"value": 10**400, "unit": "mm"}}}, "too large for a 64-bit"),
        ({**good[0], "sequence": 91, "idempotency_key": "\ud800"}, "not valid Unicode"),
        (["not", "an", "object"], "must be a JSON object, not list"),
        ({**good[0], "sequence": 92, "measurements": {"h1": {"value": deep, "unit": "mm"}}}, "expected a number, not a list"),
    ]
    stream = [good[0], good[1], poison[0][0], good[2], *[p for p, _ in poison[1:]], good[3], good[4], good[5]]
    first = service.ingest_stream("acme", iter(stream))
    again = service.ingest_stream("acme", iter(stream))  # an at-least-once producer re-delivers
    assert (first.accepted, first.duplicates, first.rejected) == (6, 0, len(poison))
    assert (again.accepted, again.duplicates, again.rejected) == (0, 6, len(poison))
    for report in (first, again):
        for (_, reason), reject in zip(poison, report.reasons):
            assert reason in reject.reason
    assert report.reasons[0].idempotency_key == "p1:overflow"
    state = service.state("acme", "p1")
    assert state.events_applied == 6 and state.event_time == T0 + timedelta(seconds=5)
    raws = [d["raw"] for d in service.dead_letters("acme").to_pylist()]
    assert sum("9223372036854775808" in r for r in raws) == 2 and sum('"unserializable": "dict"' in r for r in raws) == 2


def test_poison_rows_in_tables_are_dead_lettered(service):
    """The same through `ingest` with Arrow tables: a uint64 sequence beyond int64 (the whole table is
    checked by the contract) and a timestamp before year 1 (which Python cannot hold)."""
    rows = events_to_table(tank_events("p1", 3, start=10)).to_pylist()
    unsigned = pa.Table.from_pylist([rows[0], {**rows[1], "sequence": 2**63}, rows[2]],
                                    schema=events_to_table([]).schema.set(2, pa.field("sequence", pa.uint64())))
    report = service.ingest("acme", unsigned)
    assert (report.accepted, report.rejected) == (2, 1) and "9223372036854775807" in report.reasons[0].reason
    table = events_to_table(tank_events("p1", 3, start=20))
    times = table.column("event_time").cast(pa.int64()).to_pylist()
    table = table.set_column(1, "event_time", pa.array([times[0], -2**63, times[2]], pa.int64()).cast(TIME))
    report = service.ingest("acme", table)
    assert (report.accepted, report.rejected) == (2, 1) and report.reasons[0].reason.startswith("event_time:")
    assert service.state("acme", "p1").events_applied == 10


GOOD_ROW = json_rows("t1", 1)[0]
M = lambda v, u="mm", name="h1": {name: {"value": v, "unit": u}}  # noqa: E731
NESTED: object = 1.0
for _ in range(3000):
    NESTED = [NESTED]
TRICKY_JSON = {
    "value true": {**GOOD_ROW, "measurements": M(True)}, "value false": {**GOOD_ROW, "measurements": M(False)},
    "sequence 3.0": {**GOOD_ROW, "sequence": 3.0}, "sequence true": {**GOOD_ROW, "sequence": True},
    "sequence text": {**GOOD_ROW, "sequence": "3"}, "sequence 2^63": {**GOOD_ROW, "sequence": 2**63},
    "sequence 2^63-1": {**GOOD_ROW, "sequence": 2**63 - 1}, "sequence -1": {**GOOD_ROW, "sequence": -1},
    "sequence 5000 digits": {**GOOD_ROW, "sequence": 10**5000},
    "no sequence": {k: v for k, v in GOOD_ROW.items() if k != "sequence"},
    "value 400 digits": {**GOOD_ROW, "measurements": M(10**400)}, "value 2^53+1": {**GOOD_ROW, "measurements": M(2**53 + 1)},
    "value -0.0": {**GOOD_ROW, "measurements": M(-0.0)}, "value text": {**GOOD_ROW, "measurements": M("1.0")},
    "value list": {**GOOD_ROW, "measurements": M([1.0])}, "value object": {**GOOD_ROW, "measurements": M({"a": 1})},
    "value null": {**GOOD_ROW, "measurements": M(None)}, "value 1e308": {**GOOD_ROW, "measurements": M(1e308)},
    "value inf": {**GOOD_ROW, "measurements": M(float("inf"))}, "value nested": {**GOOD_ROW, "measurements": M(NESTED)},
    "entry a number": {**GOOD_ROW, "measurements": {"h1": 5}}, "unit a number": {**GOOD_ROW, "measurements": M(1.0, 5)},
    "unit compound": {**GOOD_ROW, "measurements": M(1.0, "L/s", "q_in")},
    "unit prefixed": {**GOOD_ROW, "measurements": M(1.0, "um")},
    "unit degC/s": {**GOOD_ROW, "measurements": M(1.0, "degC/s")},
    "unit m m": {**GOOD_ROW, "measurements": M(1.0, "m m")},
    "unit empty": {**GOOD_ROW, "measurements": M(1.0, "")}, "unit null": {**GOOD_ROW, "measurements": M(1.0, None)},
    "no measurements": {**GOOD_ROW, "measurements": {}}, "measurements text": {**GOOD_ROW, "measurements": "junk"},
    "key surrogate": {**GOOD_ROW, "idempotency_key": "\ud800"}, "key a number": {**GOOD_ROW, "idempotency_key": 5},
    "asset a number": {**GOOD_ROW, "asset_id": 5}, "asset surrogate": {**GOOD_ROW, "asset_id": "\ud800"},
    "asset with a space": {**GOOD_ROW, "asset_id": "t 1"}, "asset empty": {**GOOD_ROW, "asset_id": ""},
    "asset starting with a dash": {**GOOD_ROW, "asset_id": "-t1"}, "asset of 129": {**GOOD_ROW, "asset_id": "t" * 129},
    "asset of 128": {**GOOD_ROW, "asset_id": "t" * 128}, "asset of 300": {**GOOD_ROW, "asset_id": "t" * 300},
    "name surrogate": {**GOOD_ROW, "measurements": M(1.0, name="\ud800")},
    "year 0": {**GOOD_ROW, "event_time": "0000-01-01T00:00:00Z"},
    "year 1 at +01:00": {**GOOD_ROW, "event_time": "0001-01-01T00:00:00+01:00"},
    "offset +01": {**GOOD_ROW, "event_time": "2026-04-01T00:00:00+01"},
    "nanoseconds": {**GOOD_ROW, "event_time": "2026-04-01T00:00:00.123456789Z"},
    "space separator": {**GOOD_ROW, "event_time": "2026-04-01 00:00:00Z"}, "time a number": {**GOOD_ROW, "event_time": 5},
    "no zone": {**GOOD_ROW, "event_time": "2026-04-01T00:00:00"},
    "future event and ingest": {**GOOD_ROW, "event_time": "2099-01-01T00:00:00Z", "ingest_time": "2099-01-01T00:00:00Z"},
    "future ingest": {**GOOD_ROW, "ingest_time": "2099-01-01T00:00:00Z"},
    "ingest after year 9999": {**GOOD_ROW, "ingest_time": "9999-12-31T23:59:59-01:00"},
    "earlier ingest": {**GOOD_ROW, "ingest_time": "2026-03-01T00:00:00Z"},
    "no event_time": {k: v for k, v in GOOD_ROW.items() if k != "event_time"},
    "a list": [1, 2], "a string": "junk", "null": None, "mixed keys": {1: 2, "a": 3},
}


def _verdicts(valid: pa.Table, rejects: list[dict]) -> tuple[list[str], list[tuple]]:
    """Accepted rows (repr: -0.0 is not 0.0) without the clock-dependent ingest time; rejects without the
    clock (and without the `schema_version` column that sends an Arrow table to the contract)."""
    return ([repr(r) for r in valid.drop_columns(["ingest_time"]).to_pylist()],
            [(r["asset_id"], r["idempotency_key"], re.sub(r" after .*", "", r["reason"]),
              r["raw"].replace('"schema_version": 1, ', "")) for r in rejects])


def _validated(rows: list, columns_from: int) -> tuple[pa.Table, list[dict]]:
    """`validate_batch`, switching to the column check at `columns_from` rows (not `ROWS_BY_CONTRACT_BELOW`)."""
    with mock.patch.object(ingest_module, "ROWS_BY_CONTRACT_BELOW", columns_from):
        return validate_batch(rows)


def _by_columns(rows: list) -> tuple[pa.Table, list[dict]]:
    """`validate_batch`'s column path for dict rows, whatever their number (the contract's for rows it cannot read)."""
    return _validated(rows, 0)


def _by_contract(rows: list) -> tuple[pa.Table, list[dict]]:
    """`validate_batch`'s contract path, row by row, whatever the number of rows."""
    return _validated(rows, sys.maxsize)


@pytest.mark.parametrize("name", TRICKY_JSON)
def test_a_json_rows_verdict_does_not_depend_on_its_neighbours(name):
    """`{"value": true}` was taken as 1.0 and `"sequence": 3.0` as 3 next to clean rows (the column path)
    but refused next to a row that forced the contract's row-by-row path: a row's verdict, reason and
    values must be the same whichever path its batch takes."""
    row, forcing = TRICKY_JSON[name], {"_unparsed": "forces the row-by-row path"}
    (clean_valid, clean_rejects), (mixed_valid, mixed_rejects) = _verdicts(*_by_columns([GOOD_ROW, row])), _verdicts(
        *_by_contract([forcing, row]))
    assert clean_valid[1:] == mixed_valid and clean_rejects == mixed_rejects[1:]


def test_small_batches_are_checked_by_the_contract_with_the_same_verdicts(monkeypatch):
    """Below `ROWS_BY_CONTRACT_BELOW` dict rows `validate_batch` skips the column check (its fixed cost is
    more than the contract's for a few rows); at or above it the columns are used. Verdicts as above."""
    rows = [GOOD_ROW, *TRICKY_JSON.values()]
    small, large = rows[:ROWS_BY_CONTRACT_BELOW - 1], [*rows, *json_rows("t2", ROWS_BY_CONTRACT_BELOW)]
    expected = [_verdicts(*_by_contract(batch)) for batch in (small, large)]
    calls = []
    monkeypatch.setattr(ingest_module, "rows_table", lambda batch: calls.append(len(batch)) or rows_table(batch))
    assert [_verdicts(*validate_batch(batch)) for batch in (small, large)] == expected and calls == [len(large)]


def test_asset_id_verdicts_are_the_same_once_remembered():
    """The column check remembers each asset id's verdict (`actors.telemetry._known_ids`): a batch
    checked again, its ids now known, gets the same verdicts, reasons and values."""
    rows = [GOOD_ROW, *(TRICKY_JSON[name] for name in TRICKY_JSON if name.startswith("asset"))]
    first = _verdicts(*_by_columns(rows))
    assert _verdicts(*_by_columns(rows)) == first and len(first[0]) == 2  # GOOD_ROW and the 128-char id


def test_remembered_asset_ids_stay_bounded(monkeypatch):
    """The memo holds at most `_KNOWN_IDS_MAX` ids, none longer than `_KNOWN_ID_CHARS`: a stream of ever
    new or very long ids costs a pattern check each time, not memory; the verdicts stay the same."""
    monkeypatch.setattr(telemetry, "_known_ids", {})
    monkeypatch.setattr(telemetry, "_KNOWN_IDS_MAX", 3)
    for k in range(4):
        ids = [f"m{k}-{i}" for i in range(5)] + ["x" * 300, "bad id"]
        valid, rejects = _by_columns([{**GOOD_ROW, "asset_id": a} for a in ids])
        assert valid.column("asset_id").to_pylist() == ids[:5] and len(rejects) == 2
        assert len(telemetry._known_ids) <= 3 and all(len(a) <= telemetry._KNOWN_ID_CHARS for a in telemetry._known_ids)


def _ts(us: int) -> pa.Scalar:
    return pa.scalar(us, pa.int64()).cast(TIME)


GOOD_ARROW = {**events_to_table(tank_events("t1", 1)).to_pylist()[0], "ingest_time": None}
FAR = datetime(2099, 1, 1, tzinfo=UTC)
TRICKY_ARROW = {
    "-0.0": {**GOOD_ARROW, "measurements": [("h1", {"value": -0.0, "unit": "mm"})]},
    "nan": {**GOOD_ARROW, "measurements": [("h1", {"value": float("nan"), "unit": "mm"})]},
    "sequence int64 max": {**GOOD_ARROW, "sequence": 2**63 - 1}, "sequence int64 min": {**GOOD_ARROW, "sequence": -2**63},
    "event int64 min": {**GOOD_ARROW, "event_time": _ts(-2**63)}, "event int64 max": {**GOOD_ARROW, "event_time": _ts(2**63 - 1)},
    "event year 1": {**GOOD_ARROW, "event_time": datetime(1, 1, 1, tzinfo=UTC)},
    "event before year 1": {**GOOD_ARROW, "event_time": _ts(-62_135_596_800_000_001)},
    "future event and ingest": {**GOOD_ARROW, "event_time": FAR, "ingest_time": FAR},
    "future ingest": {**GOOD_ARROW, "ingest_time": FAR},
    "ingest int64 max": {**GOOD_ARROW, "ingest_time": _ts(2**63 - 1)}, "ingest int64 min": {**GOOD_ARROW, "ingest_time": _ts(-2**63)},
    "earlier ingest": {**GOOD_ARROW, "ingest_time": T0 - timedelta(days=1)},
    "asset null": {**GOOD_ARROW, "asset_id": None}, "asset with a newline": {**GOOD_ARROW, "asset_id": "t1\n"},
}


@pytest.mark.parametrize("name", TRICKY_ARROW)
def test_an_arrow_rows_verdict_does_not_depend_on_the_path(name):
    """The same for Arrow tables: the column check (with the contract for the rows it refuses) against
    the contract alone (a `schema_version` column makes the table not column-checkable)."""
    table = pa.Table.from_pylist([GOOD_ARROW, TRICKY_ARROW[name]], schema=VALIDATED_SCHEMA)
    by_contract = table.append_column("schema_version", pa.array([1, 1], pa.int64()))
    assert _verdicts(*validate_table(table)) == _verdicts(*validate_table(by_contract))


def test_the_column_unit_check_refuses_what_the_contract_refuses():
    """`normalize_entries` (the shard's column path) and `normalize_measurements` agree on every entry,
    plausible ranges included (the shard raises if they disagree)."""
    asset_type = AssetType.from_model(TWO_TANK)
    cases = [("h1", 500.0, "mm"), ("h1", 1e300, "mm"), ("h1", -1000.0, "mm"), ("h1", -1000.001, "mm"),
             ("h1", 1000.0, "m"), ("h1", 1e308, "m"), ("q_in", 1e308, "L/s"), ("q_in", 1.0, "L/s"),
             ("h1", 1.0, "L/s"), ("h3", 1.0, "m")]
    events = [TelemetryEvent(asset_id="t1", event_time=T0, sequence=k, measurements={n: {"value": v, "unit": u}})
              for k, (n, v, u) in enumerate(cases)]
    table = validated_table(events)
    entries = Entries.of(table.column("measurements").combine_chunks())
    misfit = normalize_entries(entries, np.zeros(len(events), dtype=np.int64),
                               [(asset_type, ("q_in", "h1", "h2"))]).misfit
    refused = []
    for e in events:
        try:
            normalize_measurements(e, asset_type)
            refused.append(False)
        except ContractError:
            refused.append(True)
    assert misfit.tolist() == refused == [False, True, False, True, False, True, True, False, True, True]


def test_the_unit_check_reuses_a_columns_codes_only_while_the_next_column_is_equal():
    """`normalize_entries` keeps the last measurement names' and units' encodings for the next batch that carries
    equal columns (a stream's usual batch) and encodes a column that differs afresh: batches of other names,
    orders and units in turn each get the verdicts and SI values of their own."""
    asset_type = AssetType.from_model(TWO_TANK)
    targets = [(asset_type, ("q_in", "h1", "h2"))]
    batches = [[("h1", 500.0, "mm"), ("q_in", 1.0, "L/s")], [("h1", 500.0, "mm"), ("q_in", 1.0, "L/s")],
               [("q_in", 1.0, "L/s"), ("h1", 500.0, "mm")], [("h1", 0.5, "m"), ("q_in", 1.0, "kg")],
               [("h3", 1.0, "m"), ("h1", 2.0, "m")], [("h1", 500.0, "mm"), ("q_in", 1.0, "L/s")]]
    seen = []
    for rows in batches:
        events = [TelemetryEvent(asset_id="t1", event_time=T0, sequence=k, measurements={n: {"value": v, "unit": u}})
                  for k, (n, v, u) in enumerate(rows)]
        entries = Entries.of(validated_table(events).column("measurements").combine_chunks())
        got = normalize_entries(entries, np.zeros(len(events), dtype=np.int64), targets)
        codes = telemetry._NAME_CODES.of(entries.names)
        seen.append(codes)
        want = [normalize_measurements(e, asset_type) if n in asset_type.measurable() and u != "kg" else None
                for e, (n, _, u) in zip(events, rows)]
        assert got.misfit.tolist() == [w is None for w in want]
        assert [got.si[i] for i, w in enumerate(want) if w] == [w[n] for w, (n, _, _) in zip(want, rows) if w]
    assert seen[1] is not seen[0] and seen[1][1] is seen[0][1]  # equal names: the codes reused
    assert seen[2][1].tolist() == [0, 1] and seen[2][0] == ["q_in", "h1"]  # another order: encoded afresh


def test_the_unit_check_reuses_a_conversion_only_for_equal_entries_types_and_columns(monkeypatch):
    """`normalize_entries` reuses the last batch's per-entry conversion for a batch that codes its entries alike
    for the same asset types and columns (a stream's usual batch), and converts afresh for another type, other
    columns or a row without a twin: the same entries get each case's own SI values, columns and verdicts, those
    of a process that saw no batch before."""
    two_tank = AssetType.from_model(TWO_TANK)
    h1_in_mm = two_tank.outputs["h1"].model_copy(update={"unit": "mm", "lower": 0.0, "upper": 400.0})
    in_mm = two_tank.model_copy(update={"outputs": {**two_tank.outputs, "h1": h1_in_mm}})
    rows = [("h1", 0.5, "m"), ("q_in", 1.0, "L/s"), ("h1", 0.3, "m")]
    events = [TelemetryEvent(asset_id="t1", event_time=T0, sequence=k, measurements={n: {"value": v, "unit": u}})
              for k, (n, v, u) in enumerate(rows)]
    entries = Entries.of(validated_table(events).column("measurements").combine_chunks())
    every_row, second_unknown = np.zeros(3, dtype=np.int64), np.array([0, -1, 0])
    usual, swapped = [(two_tank, ("q_in", "h1", "h2"))], [(two_tank, ("h1", "q_in", "h2"))]
    # each change after a case alike in all else: another type, other columns, a row without a twin
    cases = [(every_row, usual), (every_row, usual), (every_row, [(in_mm, ("q_in", "h1", "h2"))]),
             (every_row, usual), (every_row, swapped), (every_row, usual), (second_unknown, usual)]
    got, alone = [], []
    for row_target, targets in cases:
        got.append(normalize_entries(entries, row_target, targets))  # after the case before
        monkeypatch.setattr(telemetry, "_CONVERSIONS", telemetry._LastConversion())
        alone.append(normalize_entries(entries, row_target, targets))
        assert got[-1].si.tobytes() == alone[-1].si.tobytes()  # the same bits
        assert got[-1].column.tolist() == alone[-1].column.tolist()
        assert got[-1].misfit.tolist() == alone[-1].misfit.tolist()
    # the second batch's conversion is the first's (made last, by `alone`); the third's is its own
    assert got[1].column is alone[0].column and got[2].column is not alone[1].column
    assert [g.misfit.tolist() for g in got] == [[False] * 3] * 2 + [[True, False, False]] + [[False] * 3] * 4
    assert got[2].si[2] == pytest.approx(300.0) and got[0].si[2] == pytest.approx(0.3)
    assert [g.column.tolist() for g in got] == [[1, 0, 1]] * 4 + [[0, 1, 0], [1, 0, 1], [1, -1, 1]]
    assert math.isnan(got[6].si[1]) and not got[6].misfit[1]  # no twin: skipped, not refused
    # the same codes for other names or units: converted afresh
    for order, unit in ((("h1", "h2"), "m"), (("h2", "h1"), "m"), (("h2", "h1"), "mm")):
        other = [TelemetryEvent(asset_id="t1", event_time=T0, sequence=k, measurements={n: {"value": 0.5, "unit": unit}})
                 for k, n in enumerate(order)]
        entries = Entries.of(validated_table(other).column("measurements").combine_chunks())
        normalized = normalize_entries(entries, np.zeros(2, dtype=np.int64), usual)
        assert normalized.column.tolist() == [usual[0][1].index(n) for n in order]
        assert normalized.si.tolist() == pytest.approx([0.5 if unit == "m" else 0.0005] * 2)


@pytest.mark.parametrize("start", [0, 1])
def test_entries_read_a_missing_value_as_nan_and_the_si_map_keeps_each_rows_entries(start):
    """`Entries.of` reads a value column without nulls by its own buffer and one with nulls filled with NaN;
    `si_map` gives each row (of a batch sliced out of a larger one too) its entries' names and values."""
    item = pa.struct([("value", pa.float64()), ("unit", pa.string())])
    rows = [[("x", {"value": 9.0, "unit": "m"})], [("a", {"value": 1.5, "unit": "m"}), ("b", {"value": None, "unit": "m"})],
            [], [("c", {"value": -2.0, "unit": "s"})]]
    for nulls in (True, False):
        given = rows if nulls else [[(n, {**v, "value": 0.5 if v["value"] is None else v["value"]}) for n, v in r]
                                    for r in rows]
        entries = Entries.of(pa.array(given, pa.map_(pa.string(), item)).slice(start))
        want = [v["value"] for r in given[start:] for _, v in r]
        assert entries.value.tolist() == pytest.approx([math.nan if v is None else v for v in want], nan_ok=True)
        mapped = si_map(entries, Normalized(entries.value * 2, np.zeros(len(want), dtype=np.int64),
                                            np.zeros(len(given) - start, dtype=bool)))
        assert [[k for k, _ in r] for r in mapped.to_pylist()] == [[k for k, _ in r] for r in given[start:]]
        assert mapped.offsets.to_pylist() == np.cumsum([0, *map(len, given[start:])]).tolist()
        assert np.array_equal(mapped.items.to_numpy(zero_copy_only=False), entries.value * 2, equal_nan=True)


def test_far_future_times_and_implausible_values_are_dead_lettered_by_a_live_service(service):
    """A client-chosen ingest time equal to a 2099 event time used to jump the twin's event time to
    2099 (every real event after it refused as too late); T_in = 1e300 used to destroy the twin."""
    rows = json_rows("p2", 3)
    future = {**rows[0], "sequence": 50, "event_time": "2099-01-01T00:00:00Z", "ingest_time": "2099-01-01T00:00:00Z"}
    implausible = {**rows[0], "sequence": 51, "measurements": {"h1": {"value": 1e300, "unit": "mm"}}}
    report = service.ingest_stream("acme", iter([rows[0], future, implausible, rows[1]]))
    assert (report.accepted, report.rejected) == (2, 2)
    assert "after the server's clock" in report.reasons[0].reason
    assert "outside the plausible range [-1.0, 1000.0] m" in report.reasons[1].reason
    table = events_to_table(tank_events("p2", 1, start=60)).append_column("ingest_time", pa.array([FAR], TIME))
    report = service.ingest("acme", table)
    assert report.rejected == 1 and "ingest_time" in report.reasons[0].reason
    report = service.ingest("acme", [TelemetryEvent.model_validate(rows[2])])  # a real event after them: not too late
    assert report.accepted == 1
    state = service.state("acme", "p2")
    assert state.events_applied == 3 and state.event_time == T0 + timedelta(seconds=2)
    assert all(math.isfinite(v) for v in state.state.values()) and not state.divergence.diverged
