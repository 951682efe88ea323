"""Ingestion: Parquet (local and S3) and NDJSON-over-HTTP sources, contract rejects to dead
letters, and the bounded in-flight window."""

from __future__ import annotations

import gc
import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors import IngestReport, TwinService, events_to_table, ndjson_http_source
from actors.ingest import Dispatcher, ShardRouter, lingering_chunks, validate_batch
from actors.telemetry import parse_rows, rows_table, validate_table, validated_table
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK
from raytwin.storage import filesystem

T0 = datetime(2026, 4, 1, tzinfo=UTC)


def tank_events(asset_id: str, n: int, start: int = 0) -> list[TelemetryEvent]:
    return [TelemetryEvent(asset_id=asset_id, event_time=T0 + timedelta(seconds=k), sequence=k,
                           measurements={"h1": {"value": 500.0 - k, "unit": "mm"}, "q_in": {"value": 0.1, "unit": "L/s"}})
            for k in range(start, start + n)]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    artifact = ModelRegistry(str(tmp_path_factory.mktemp("reg"))).register("tank", "1.0.0",
                                                                           AssetType.from_model(TWO_TANK))
    svc = TwinService(str(tmp_path_factory.mktemp("store")), shards=2, batch_size=16)
    for a in ("t1", "t2", "t3"):
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
    valid, rejects = validate_batch(checked)
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
        assert first_chunk_seen.wait(timeout=10), "the first event was held back while the source paused"
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


def test_a_failing_stream_source_raises_in_the_consumer():
    def broken():
        yield {"k": 1}
        raise ConnectionError("stream dropped")

    with pytest.raises(ConnectionError, match="stream dropped"):
        list(lingering_chunks(broken(), size=10, linger_s=0.01))


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
        yield from (json.loads(e.model_dump_json()) for e in tank_events("t2", 5, start=500))

    assert gc.get_freeze_count() == 0
    assert service.ingest_stream("acme", source()).accepted == 5
    assert frozen_while_read[0] > 0 and gc.get_freeze_count() == 0


def test_ingest_table_task_and_table_through_the_service(service):
    from actors.ingest import ingest_table

    table = events_to_table(tank_events("t3", 10, start=1000))
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

    def ingest(self, tenant, events):
        import time

        asset = events.column("asset_id")[0].as_py()
        self.log.append(("start", asset))
        time.sleep(self.delay_by_asset.get(asset, self.delay_s))
        self.log.append(("end", asset))
        return IngestReport(accepted=len(events))

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
