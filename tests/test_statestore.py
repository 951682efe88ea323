"""The durable store: event log de-duplication and ordering, snapshots by time, dead letters,
registrations, on a local directory and on S3 (moto)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest

from raytwin import statestore
from raytwin.keyindex import Logged, LogKeyIndex, content_digest
from raytwin.statestore import (
    Heartbeat,
    HistoryPruned,
    Lease,
    LoggedEvent,
    Snapshot,
    StateStore,
    _date,
    column_micros,
    from_micros,
    log_table,
    parse_snapshot_name,
    to_micros,
)

T0 = datetime(2026, 3, 1, 23, 59, 0, tzinfo=UTC)


def _ev(k: int, seconds: float, key: str | None = None) -> LoggedEvent:
    us = to_micros(T0 + timedelta(seconds=seconds))
    return LoggedEvent((us, k, key or f"a:{k}"), "good", {"h1": 0.1 * k, "q_in": 1e-4}, us)


def test_micros_round_trip_is_exact():
    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert from_micros(to_micros(t)) == t
    assert to_micros(datetime(1970, 1, 1, tzinfo=UTC)) == 0


def test_column_micros_are_the_numbers_an_arrow_cast_gives_and_nulls_are_refused():
    """`column_micros` reads a timestamp column as its NumPy view instead of an Arrow cast (a live shard call
    read four): the same int64 microseconds, chunks joined, before the epoch too; a column with a null is
    refused (a cast would keep it a null)."""
    import numpy as np
    import pyarrow as pa

    values = [0, 1, -5, to_micros(T0), 2**62]
    column = pa.chunked_array([pa.array(values[:2], statestore.TIME), pa.array(values[2:], statestore.TIME)])
    for c in (column, column.combine_chunks(), pa.chunked_array([], statestore.TIME)):
        got, want = column_micros(c), c.cast(pa.int64()).to_numpy()
        assert got.dtype == np.int64 and got.tolist() == want.tolist()
    with pytest.raises(ValueError, match="without nulls"):
        column_micros(pa.array([1, None], statestore.TIME))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return StateStore(str(tmp_path / "store"))
    return StateStore(request.getfixturevalue("s3_url") + "/store")


def test_event_log_dedups_sorts_and_filters(store):
    # two batches, the second re-delivers k=2 and crosses midnight (two date partitions)
    assert store.append_log("acme", log_table([("a", _ev(3, 30)), ("a", _ev(1, 10)), ("a", _ev(2, 20))])) == 3
    store.append_log("acme", log_table([("a", _ev(2, 20)), ("a", _ev(4, 90)), ("b", _ev(9, 5, "b:9"))]))
    events = store.read_events("acme", "a")
    assert [e.key[1] for e in events] == [1, 2, 3, 4]
    assert events[0].values == {"h1": 0.1, "q_in": 1e-4}
    assert [e.key[1] for e in store.read_events("acme", "a", after=events[1].key)] == [3, 4]
    assert [e.key[1] for e in store.read_events("acme", "a", until_us=events[2].key[0])] == [1, 2, 3]
    assert store.read_events("other", "a") == []
    assert store.find_event("acme", "a", events[3].key) == events[3]
    assert store.find_event("acme", "a", (events[3].key[0], 4, "a:missing")) is None
    assert store.find_event("acme", "a", (events[3].key[0] + 1, 4, "a:4")) is None  # same key, another time
    if store._local:
        dates = sorted(p.rsplit("=", 1)[-1] for p in store.fs.glob(f"{store.root}/log/tenant=acme/date=*"))
        assert dates == ["2026-03-01", "2026-03-02"]


def test_a_log_write_marks_the_assets_its_caller_names_and_writes_no_marker_twice(tmp_path, monkeypatch):
    """`append_log` with its rows' asset ids given (a shard has them) marks those, without reading them off the
    column; a batch of assets all marked already writes no marker."""
    store = StateStore(str(tmp_path / "store"))
    written = []
    monkeypatch.setattr(statestore, "write_markers", lambda fs, folder, names: written.append(names))
    store.append_log("acme", log_table([("a", _ev(1, 10)), ("b", _ev(2, 20, "b:2"))]), ["b", "a"])
    store.append_log("acme", log_table([("a", _ev(3, 30))]), ["a"])
    store.append_log("acme", log_table([("c", _ev(4, 40, "c:4")), ("a", _ev(5, 50))]))  # read off the column
    assert written == [["asset_id=a", "asset_id=b"], ["asset_id=c"]]
    assert [e.key[1] for e in store.read_events("acme", "a")] == [1, 3, 5]


def test_a_replay_from_a_key_lists_only_the_days_from_that_key_on(store, monkeypatch):
    """A twin's replay after its snapshot (recovery, a read of a past state, a shadow catching up) lists and reads
    the log's partitions of the snapshot's day and later, not every day of its tenant's history."""
    for day in range(5):
        store.append_log("acme", log_table([("a", _ev(day, day * 86_400 + 30)), ("b", _ev(day, day * 86_400 + 40))]))
    store.close_segments()
    everything = store.read_events("acme", "a")
    listed = []
    files = store._files
    monkeypatch.setattr(store, "_files", lambda directory: listed.append(directory) or files(directory))
    after = everything[2].key  # on T0's third day (T0 is a minute before midnight)
    assert store.read_events("acme", "a", after=after) == everything[3:]
    assert [d.rsplit("/", 1)[-1] for d in listed] == ["date=2026-03-03", "date=2026-03-04", "date=2026-03-05"]
    assert store.read_events("acme", "a", after=after, until_us=everything[3].key[0]) == everything[3:4]
    listed.clear()
    assert store.read_events_many("acme", {"a": everything[4].key, "b": None}) == {
        "a": [], "b": store.read_events("acme", "b")}  # one asset from its start: every day
    assert listed == [f"{store.root}/log/tenant=acme"] * 2


def test_snapshots_latest_before_time(store):
    assert store.latest_snapshot("acme", "a") is None
    for k in (1, 3, 2):
        store.write_snapshot("acme", "a", Snapshot(_ev(k, 100 * k).key, k, {"x": [float(k)], "P": [[1.0]]}))
    assert store.latest_snapshot("acme", "a").revision == 3
    snap = store.latest_snapshot("acme", "a", at_or_before_us=_ev(0, 250).key[0])
    assert snap.revision == 2 and snap.payload == {"x": [2.0], "P": [[1.0]]} and snap.key == _ev(2, 200).key
    assert store.latest_snapshot("acme", "a", at_or_before_us=_ev(0, 50).key[0]) is None


def test_dead_letters_and_registrations(store):
    assert store.read_dead_letters().num_rows == 0
    store.write_dead_letters("acme", [{"asset_id": "a", "idempotency_key": "a:1", "reason": "too late",
                                       "raw": json.dumps({"x": 1})}])
    store.write_dead_letters("beta", [{"asset_id": "b", "idempotency_key": None, "reason": "bad", "raw": "{}"}])
    acme = store.read_dead_letters("acme").to_pylist()
    assert [(r["tenant"], r["asset_id"], r["reason"], json.loads(r["raw"])) for r in acme] == [
        ("acme", "a", "too late", {"x": 1})]
    assert store.read_dead_letters().num_rows == 2

    store.save_registration("acme", "a", {"v": 1})
    store.save_registration("beta", "b:1", {"v": 2})
    assert store.load_registration("acme", "a") == {"v": 1}
    assert store.registrations() == [("acme", "a", {"v": 1}), ("beta", "b:1", {"v": 2})]
    store.delete_registration("acme", "a")
    assert store.load_registration("acme", "a") is None


def test_dead_letters_written_again_keep_the_first_writes_day_and_time(store, monkeypatch):
    """A shard's retry writes its batch's dead letters again under the same name (`dead_letter_stem`): they replace
    the first try's, in its day's partition (also just after midnight) and with its time, their place in a
    connector's listing (`serve_apps.dead_letters`): the retry's own time moved them to the newest, so a client
    paging through them missed them."""
    def write(when: datetime, stem: str | None) -> None:
        monkeypatch.setattr(statestore, "datetime", type("Clock", (datetime,), {"now": staticmethod(lambda tz: when)}))
        store.write_dead_letters("acme", [{"asset_id": "a", "idempotency_key": stem, "reason": "bad", "raw": "{}"}],
                                 stem)

    late, noon = datetime(2026, 11, 9, 23, 59, 30, 123456, tzinfo=UTC), datetime(2026, 11, 10, 12, tzinfo=UTC)
    for when, stem in ((late, "part-1"), (late + timedelta(minutes=2), "part-1"), (noon, "part-2"),
                       (noon + timedelta(minutes=1), "part-2"), (noon + timedelta(minutes=2), None)):
        write(when, stem)
    rows = store.read_dead_letters("acme").to_pylist()
    assert [(r["idempotency_key"], str(r["date"]), r["dead_lettered_at"]) for r in rows] == [
        ("part-1", "2026-11-09", late), ("part-2", "2026-11-10", noon),
        (None, "2026-11-10", noon + timedelta(minutes=2))]


def test_a_page_of_a_connectors_newest_dead_letters_reads_only_the_days_that_hold_it(store, monkeypatch):
    """A poison device may leave millions of dead letters: a page of a connector's newest reads the tenant's days
    newest first until it has `limit` of the connector's, never the older days, and is still the last rows of
    `read_dead_letters` (across a day boundary, the newest day holding fewer; at a time many rows share)."""
    from typer.testing import CliRunner

    from actors.cli import twins_app
    from serve_apps.dead_letters import connector_dead_letters, ranked
    from serve_apps.schemas import DeadLetter

    def letters(tenant: str, when: datetime, *reasons: str) -> None:
        monkeypatch.setattr(statestore, "datetime", type("Clock", (datetime,), {"now": staticmethod(lambda tz: when)}))
        store.write_dead_letters(tenant, [{"asset_id": "pump-1", "idempotency_key": f"{when:%d%H%M}:{i}",
                                           "reason": r, "raw": "{}"} for i, r in enumerate(reasons)])

    web, webx = "mqtt://web/site/pump-1/telemetry: payload is not JSON", "mqtt://webx/a: not its own"
    days = [datetime(2026, 11, d, 12, tzinfo=UTC) for d in range(1, 11)]
    for when in days[:-1]:  # web's: 3 at 12:00, 2 at 12:05 a day
        letters("acme", when, web, webx, web, web)
        letters("acme", when + timedelta(minutes=5), web, webx, web)
    letters("acme", days[-1], webx, web, webx)  # the newest day: 1 of web's
    letters("beta", days[-1], *[web] * 5)  # another tenant's, at the same time
    fields = list(DeadLetter.model_fields)
    everything = store.read_dead_letters()

    def newest(tenant: str, limit: int, day: str | None = None) -> list[dict]:
        rows = [{k: r[k] for k in fields} for r in store.read_dead_letters(tenant).to_pylist()
                if r["reason"].startswith("mqtt://web/") and day in (None, r["date"])]
        return [row for _, row in ranked(rows)[:limit]]  # newest first, as a page lists them

    read: list[str] = []
    files_dataset = statestore.files_dataset

    def spy(fs, paths, *args, **kwargs):
        read.extend(paths)
        return files_dataset(fs, paths, *args, **kwargs)

    def page(limit: int, day: str | None = None) -> tuple[list[dict], set[str]]:
        expected = newest("acme", limit, day)
        read.clear()
        with monkeypatch.context() as spying:
            spying.setattr(statestore, "files_dataset", spy)
            rows = [d.model_dump() for d in connector_dead_letters(store, "acme", "web", day, limit).dead_letters]
        assert rows == expected and all("/tenant=acme/" in p for p in read)
        return rows, {p.split("/date=")[1][:10] for p in read}

    for compacted in (False, True):  # part files; then compacted ones, sorted by time
        rows, dates = page(4)
        assert [r["idempotency_key"][:6] for r in rows] == ["101200", "091205", "091205", "091200"]
        assert dates == {"2026-11-09", "2026-11-10"}  # not the 8 days before
        rows, dates = page(1000, "2026-11-03")
        assert len(rows) == 5 and dates == {"2026-11-03"}
        assert len(page(1000)[0]) == 9 * 5 + 1 and page(1, "2026-10-31") == ([], set())
        assert store.newest_dead_letters(None, 7).to_pylist() == everything.slice(everything.num_rows - 7).to_pylist()
        if not compacted:
            assert len(store.compact(min_files=1)) == 11
            everything = store.read_dead_letters()

    walked, cursor = [], None  # page after page: each reads from its cursor's day back, never a newer day
    while True:
        read.clear()
        with monkeypatch.context() as spying:
            spying.setattr(statestore, "files_dataset", spy)
            got = connector_dead_letters(store, "acme", "web", None, 12, cursor)
        if cursor is not None:
            assert max(p.split("/date=")[1][:10] for p in read) <= walked[-1]["dead_lettered_at"].date().isoformat()
        walked += [d.model_dump() for d in got.dead_letters]
        if (cursor := got.next_cursor) is None:
            break
    assert walked == newest("acme", 1000) and len(walked) == 9 * 5 + 1

    store.save_registration("acme", "pump-1", {})  # (a twin store, for the CLI)
    out = CliRunner().invoke(twins_app, ["dead-letters", store.url, "--tenant", "acme", "--day", "2026-11-03",
                                         "--limit", "2"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0] == "the newest 2 dead letter(s) of 2026-11-03"
    assert [json.loads(line)["idempotency_key"] for line in out.output.splitlines()[1:]] == ["031205:1", "031205:2"]


def _as_before_markers(store: StateStore) -> StateStore:
    """The store as written before dead letters' sources were marked (the same rows, no markers), opened afresh (a
    store knows the tenants it saw marked)."""
    store.fs.rm(f"{store.root}/dead_letter_sources", recursive=True)
    return StateStore(store.url, store.storage_options)


def test_a_connectors_few_dead_letters_are_read_again_from_their_days_alone(store, monkeypatch):
    """A connector with fewer dead letters than a page's `limit` has the times of every day of its tenant read where
    its days are not marked (its older ones may lie anywhere), but its rows are then read from the days that hold
    them alone, not from every day again; a read from `since` on (a restarted connector's,
    `connectors.seen_letters`) reads no day before it, and still finds a letter that a retry just after midnight
    wrote into the day before's partition with its own time (as retries did before they kept the first try's)."""
    from connectors.seen_letters import SeenLetters
    from serve_apps.dead_letters import connector_dead_letters

    def letters(when: datetime, *reasons: str, stem: str | None = None) -> None:
        monkeypatch.setattr(statestore, "datetime", type("Clock", (datetime,), {"now": staticmethod(lambda tz: when)}))
        store.write_dead_letters("acme", [{"asset_id": "pump-1", "idempotency_key": f"{when:%d%H%M}:{i}",
                                           "reason": r, "raw": f"{when:%d%H%M}:{i}"} for i, r in enumerate(reasons)],
                                 stem)

    web, poison = "mqtt://web/site/pump-1/telemetry: not JSON", "mqtt://poison/site/pump-1/telemetry: not JSON"
    for d in range(1, 11):
        letters(datetime(2026, 11, d, 12, tzinfo=UTC), poison, poison, *([web] if d in (4, 6) else []))
    letters(datetime(2026, 11, 9, 23, 59, tzinfo=UTC), poison, stem="retried")  # the retry's first try
    monkeypatch.setattr(store, "_first_try", lambda tenant, stem, now: (now.date() - timedelta(days=1), now))
    letters(datetime(2026, 11, 10, 0, 30, tzinfo=UTC), poison, stem="retried")  # lands beside it, on the 9th
    store = _as_before_markers(store)
    rows = store.read_dead_letters("acme").to_pylist()
    read, scanned = _files_read(monkeypatch)

    def days(paths: list[str]) -> list[str]:
        return sorted({p.split("/date=")[1][:10] for p in paths})

    found = [d.idempotency_key for d in connector_dead_letters(store, "acme", "web", None, 1000).dead_letters[::-1]]
    assert found == [r["idempotency_key"] for r in rows if r["reason"] == web] == ["041200:2", "061200:2"]
    assert len(days(scanned)) == 10 and days(read) == ["2026-11-04", "2026-11-06"]

    read.clear(), scanned.clear()
    since = datetime(2026, 11, 10, 0, 10, tzinfo=UTC)
    seen = SeenLetters.recent(store, "acme", "poison", since)
    expected = SeenLetters([r["raw"] for r in rows if r["reason"] == poison and r["dead_lettered_at"] >= since])
    assert list(seen._seen) == list(expected._seen) and len(seen._seen) == 3  # 00:30 (on the 9th), 12:00 twice
    assert days(scanned) == days(read) == ["2026-11-09", "2026-11-10"]


def test_a_connectors_few_dead_letters_are_read_from_the_days_marked_with_it_alone(store, monkeypatch):
    """A connector with fewer dead letters than a page had the times of every day of its tenant read (a year of a
    poison device's: 365 days, 0.3 s): the days of each connector's dead letters are marked as they are written,
    and once the tenant's days are marked whole only the connector's are read, with the same answer; dead letters
    written before markers are read whole, as before, until they are marked."""
    from serve_apps.dead_letters import connector_dead_letters

    def letters(day: int, *reasons: str) -> None:
        when = datetime(2026, 11, day, 12, tzinfo=UTC)
        monkeypatch.setattr(statestore, "datetime", type("Clock", (datetime,), {"now": staticmethod(lambda tz: when)}))
        store.write_dead_letters("acme", [{"asset_id": "pump-1", "idempotency_key": f"{day}:{i}", "reason": r,
                                           "raw": "{}"} for i, r in enumerate(reasons)])

    web, poison, api = "mqtt://web/site/pump-1/telemetry: not JSON", "mqtt://poison/x: not JSON", "out of range"
    for d in range(1, 11):
        letters(d, poison, api, *([web] if d in (4, 6) else []))
    scanned: list[str] = []
    batches = statestore._batches
    monkeypatch.setattr(statestore, "_batches", lambda fs, paths, *a, **k: scanned.extend(paths) or batches(
        fs, paths, *a, **k))

    def page(on: StateStore, name: str = "web") -> list[str]:
        scanned.clear()
        return [d.idempotency_key for d in connector_dead_letters(on, "acme", name, None, 1000).dead_letters[::-1]]

    def days() -> list[str]:
        return sorted({p.split("/date=")[1][:10] for p in scanned})

    before = _as_before_markers(store)
    assert page(before) == ["4:2", "6:2"] and len(days()) == 10  # not marked whole yet: every day, as before
    before.mark_dead_letter_sources("acme")
    assert page(before) == ["4:2", "6:2"] and days() == ["2026-11-04", "2026-11-06"]
    assert page(before, "nobody") == [] and scanned == []
    letters(11, web)  # after marking: marked by its writer
    assert page(before) == ["4:2", "6:2", "11:0"] and days() == ["2026-11-04", "2026-11-06", "2026-11-11"]

    before = _as_before_markers(store)
    assert page(before) == ["4:2", "6:2", "11:0"] and len(days()) == 11
    before.mark_dead_letter_sources("acme")
    assert page(before) == ["4:2", "6:2", "11:0"] and len(days()) == 3
    assert page(before, "poison") == [f"{d}:0" for d in range(1, 11)] and len(days()) == 10



def test_a_new_tenants_dead_letters_are_marked_whole_from_its_first(store, monkeypatch):
    """A tenant's days were marked whole at a connector's start alone: until then a new tenant's connector pages
    read every day, and that start read every dead letter of a tenant that ingested over HTTP before it. A tenant
    without dead letters is marked whole by its first writer (other writers' first dead letters of it after that
    change nothing); one with dead letters written before markers stays unmarked, whoever writes after them."""
    from serve_apps.dead_letters import connector_dead_letters

    def letters(on: StateStore, tenant: str, day: int, *reasons: str) -> None:
        when = datetime(2026, 11, day, 12, tzinfo=UTC)
        monkeypatch.setattr(statestore, "datetime", type("Clock", (datetime,), {"now": staticmethod(lambda tz: when)}))
        on.write_dead_letters(tenant, [{"asset_id": "pump-1", "idempotency_key": f"{day}:{i}", "reason": r,
                                        "raw": "{}"} for i, r in enumerate(reasons)])

    web, api = "mqtt://web/site/pump-1/telemetry: not JSON", "out of range"
    other = StateStore(store.url, store.storage_options)  # another writer (an ingestion replica, a shard)
    letters(store, "beta", 1, web, api)
    for d in range(1, 9):  # a new tenant's, from both
        letters(store if d % 2 else other, "gamma", d, api, *([web] if d == 3 else []))
    listed, listing = [], StateStore._dead_letter_days
    monkeypatch.setattr(StateStore, "_dead_letter_days", lambda self, *a: listed.append(a) or listing(self, *a))
    for d in (9, 10):  # as ingestion writes them: a store opened for each write
        letters(StateStore(store.url, store.storage_options), "gamma", d, api)
    assert listed == []  # its days were listed by its first writes in this process alone
    read, scanned = _files_read(monkeypatch)

    def page(tenant: str) -> tuple[list[str], list[str]]:
        scanned.clear()
        found = [d.idempotency_key for d in connector_dead_letters(StateStore(store.url, store.storage_options),
                                                                   tenant, "web", None, 1000).dead_letters]
        return found, sorted({p.split("/date=")[1][:10] for p in scanned})

    assert page("gamma") == (["3:1"], ["2026-11-03"])  # its first writer marked it whole: web's day alone
    read.clear()
    StateStore(store.url, store.storage_options).mark_dead_letter_sources("gamma")  # a connector's first start
    assert read == []

    _as_before_markers(store)  # beta's first dead letters: written before markers
    monkeypatch.setattr(statestore, "_DEAD_LETTERED", set())  # by a process that has written none since
    letters(other, "beta", 2, api)
    assert page("beta") == (["1:0"], ["2026-11-01", "2026-11-02"])  # not marked whole: every day, as before


def test_a_sources_day_is_marked_once_by_a_process_and_old_days_at_once_by_source(store, monkeypatch):
    """Ingestion and a connector's sink open a store for each write: the sources of its dead letters are marked once
    per day by the process, not on every write (a folder's two syncs on local disk, a PUT on an object store, each);
    dead letters written before markers have each source's days marked in one write (one PUT each, concurrent)."""
    def letters(on: StateStore, day: int, *reasons: str) -> None:
        when = datetime(2026, 11, day, 12, tzinfo=UTC)
        monkeypatch.setattr(statestore, "datetime", type("Clock", (datetime,), {"now": staticmethod(lambda tz: when)}))
        on.write_dead_letters("acme", [{"asset_id": "pump-1", "idempotency_key": f"{day}:{i}", "reason": r,
                                        "raw": "{}"} for i, r in enumerate(reasons)])

    web, poison = "mqtt://web/site/pump-1/telemetry: not JSON", "mqtt://poison/x: not JSON"
    written: list[tuple[str, list[str]]] = []
    write_markers = statestore.write_markers
    monkeypatch.setattr(statestore, "write_markers", lambda fs, folder, names: written.append(
        (folder.rsplit("/", 1)[-1], sorted(names))) or write_markers(fs, folder, names))
    for d in (1, 1, 2, 2):
        letters(StateStore(store.url, store.storage_options), d, web, poison)
    assert written == [("tenant=acme", ["_complete"])] + [
        (f"source={s}", [f"date=2026-11-0{d}"]) for d in (1, 2) for s in ("poison", "web")]

    written.clear()
    _as_before_markers(store).mark_dead_letter_sources("acme")
    days = ["date=2026-11-01", "date=2026-11-02"]
    assert sorted(written) == [("source=poison", days), ("source=web", days), ("tenant=acme", ["_complete"])]

def _parts(store, kind: str, tenant: str) -> list[str]:
    store.fs.invalidate_cache()
    names = (p.rsplit("/", 1)[-1] for p in store.fs.glob(f"{store.root}/{kind}/tenant={tenant}/date=*/*"))
    return sorted(n for n in names if n.startswith(("part-", "compact-", "seg-")))


def _log_two_days(store) -> None:
    # three batches over two days; the third re-delivers a:2 and a:4
    store.append_log("acme", log_table([("b", _ev(7, 15, "b:7")), ("a", _ev(1, 10)), ("a", _ev(2, 20))]))
    store.append_log("acme", log_table([("a", _ev(3, 30)), ("a", _ev(4, 90)), ("b", _ev(8, 95, "b:8"))]))
    store.append_log("acme", log_table([("a", _ev(2, 20)), ("a", _ev(4, 90)), ("a", _ev(5, 100))]))


def test_compaction_merges_part_files_and_changes_no_read(store):
    """On an object store the log is a file per batch; on local disk a segment per writer and day,
    which compaction takes once closed however few there are."""
    local = store._local
    _log_two_days(store)
    store.append_log("beta", log_table([("z", _ev(1, 10, "z:1"))]))  # one file: below min_files
    for i in range(3):
        store.write_dead_letters("acme", [{"asset_id": "a", "idempotency_key": f"a:{i}", "reason": "bad", "raw": "{}"}])
    before = {a: store.read_events("acme", a) for a in ("a", "b")}
    letters = store.read_dead_letters("acme").to_pylist()
    assert len(_parts(store, "log", "acme")) == (2 if local else 5)  # 2 + 2 + 1 files (day 1, day 2)

    done = {c.partition: c for c in store.compact()}
    beta = {"log/tenant=beta/date=2026-03-01"} if local else set()
    assert set(done) == {"log/tenant=acme/date=2026-03-01", "log/tenant=acme/date=2026-03-02",
                         f"dead_letters/tenant=acme/date={datetime.now(UTC).date().isoformat()}", *beta}
    day1 = done["log/tenant=acme/date=2026-03-01"]
    assert (day1.files_in, day1.files_out, day1.rows_in, day1.rows_out) == (1 if local else 3, 1, 5, 4)  # a:2 once
    assert all(p.startswith("compact-") and p.endswith(".parquet") for p in _parts(store, "log", "acme"))
    assert _parts(store, "log", "beta")[0].startswith("compact-" if local else "part-")
    assert {a: store.read_events("acme", a) for a in ("a", "b")} == before
    assert store.read_dead_letters("acme").to_pylist() == letters
    assert store.find_event("acme", "a", before["a"][3].key) == before["a"][3]
    assert store.compact() == []  # nothing left to merge


def test_a_read_racing_a_compaction_lists_again(store, monkeypatch):
    """The reader lists the files, then a compaction replaces them before it opens one."""
    _log_two_days(store)
    expected = store.read_events("acme", "a")
    read, raced, attempts = statestore.read_files, [], []

    def racing_read(fs, paths, *args, **kwargs):
        attempts.append(paths)
        if not raced:
            with monkeypatch.context() as m:
                m.setattr(statestore, "read_files", read)  # the compaction's own reads
                raced.extend(store.compact())
        return read(fs, paths, *args, **kwargs)

    monkeypatch.setattr(statestore, "read_files", racing_read)
    assert store.read_events("acme", "a") == expected
    assert raced and len(attempts) == 2  # the first listing's files were gone: listed and read again


def test_a_compaction_that_dies_before_deleting_loses_and_repeats_nothing(store, monkeypatch):
    _log_two_days(store)
    expected = store.read_events("acme", "a")
    with monkeypatch.context() as m:
        m.setattr(store.fs, "rm", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError, match="killed"):
            store.compact()
    assert store.read_events("acme", "a") == expected  # merged rows and part files both present
    assert [c.files_in for c in store.compact()] == ([1, 1] if store._local else [3, 2])  # the files again
    assert store.read_events("acme", "a") == expected
    assert all(p.startswith("compact-") for p in _parts(store, "log", "acme"))


def test_prune_keeps_what_recovery_needs_and_refuses_reads_across_the_cut(store):
    _log_two_days(store)  # day 1: 2026-03-01, day 2: 2026-03-02
    store.write_dead_letters("acme", [{"asset_id": "a", "idempotency_key": "a:0", "reason": "bad", "raw": "{}"}])
    for asset_id in ("a", "b"):
        store.save_registration("acme", asset_id, {"asset": asset_id})
    held = store.prune("acme", date(2026, 3, 10))
    assert (held.history_from, held.held_back_by, held.partitions_deleted) == (None, ["a", "b"], 0)  # no snapshots

    snap = {"x": [1.0], "P": [[1.0]]}
    store.write_snapshot("acme", "a", Snapshot(_ev(1, 10).key, 1, snap))  # day 1
    store.write_snapshot("acme", "a", Snapshot(_ev(4, 90).key, 4, snap))  # day 2
    store.write_snapshot("acme", "b", Snapshot(_ev(8, 95, "b:8").key, 2, snap))
    done = store.prune("acme", date(2026, 3, 10))
    assert done.history_from == date(2026, 3, 2) and done.held_back_by == ["a", "b"]  # cut back to the snapshots
    assert (done.partitions_deleted, done.snapshots_deleted) == (1, 1)  # day 1's log; a's day-1 snapshot
    assert store.read_dead_letters("acme").num_rows == 1  # dead-lettered today: kept
    assert [e.key[1] for e in store.read_events("acme", "a", after=_ev(4, 90).key)] == [5]  # recovery: unchanged
    assert store.latest_snapshot("acme", "a").revision == 4
    with pytest.raises(HistoryPruned, match="2026-03-02"):
        store.read_events("acme", "a")  # a replay from the prior would skip day 1
    with pytest.raises(HistoryPruned):
        store.read_events("acme", "a", after=_ev(1, 10).key, until_us=_ev(4, 90).key[0])
    store.append_log("acme", log_table([("new", _ev(1, 200, "new:1"))]))
    assert len(store.read_events("acme", "new")) == 1  # a twin the cut never touched replays from its prior
    assert store.prune("acme", date(2026, 2, 1)).history_from == date(2026, 3, 2)  # the cut never moves back
    assert store.read_events("beta", "a") == []  # other tenants untouched


def _artifact(model: str, version: str) -> dict:
    return {"name": model, "version": version}  # what `model_versions` reads of a stored artifact


def test_model_versions_are_those_twins_run_and_their_retained_history_applied(store):
    """What model retention must keep: the version each twin runs now (a refused swap leaves it on an old one),
    and those its history was applied by, until `prune` cut that history; other models' and tenants' twins and
    deleted twins need none."""
    day1, day2, day3 = (to_micros(datetime(2026, 3, d, 12, tzinfo=UTC)) for d in (1, 2, 3))
    store.save_registration("acme", "a", {"artifact": _artifact("zone", "1.0.0")})
    store.save_model_swaps("acme", "a", [{"at_us": day3, "artifact": _artifact("zone", "1.2.0")},  # stored unordered
                                         {"at_us": day1, "artifact": _artifact("zone", "1.1.0")}])
    store.save_registration("acme", "b", {"artifact": _artifact("zone", "1.1.0")})  # its swaps were all refused
    store.save_registration("acme", "c", {"artifact": _artifact("pump", "1.0.0")})
    store.save_registration("globex", "a", {"artifact": _artifact("zone", "0.9.0")})
    store.save_registration("acme", "gone", {"artifact": _artifact("zone", "0.1.0")})
    store.delete_registration("acme", "gone")
    assert store.model_versions("acme", "zone") == {"1.0.0": ["a"], "1.1.0": ["a", "b"], "1.2.0": ["a"]}
    assert store.model_versions("acme", "pump") == {"1.0.0": ["c"]}
    assert store.model_versions("acme", "none") == {} and store.model_versions("beta", "zone") == {}

    store._replace_json(store._retention_path("acme"), {"history_from_us": day2, "assets": ["a"]})  # as `prune` does
    # a's eras: 1.0.0 until day 1 (history gone: no read or run can reach it), 1.1.0 day 1 to 3, 1.2.0 from day 3
    assert store.model_versions("acme", "zone") == {"1.1.0": ["a", "b"], "1.2.0": ["a"]}


@pytest.mark.parametrize("skew_s", [3600.0, -3600.0], ids=["holder_clock_ahead", "holder_clock_behind"])
def test_live_holder_is_a_service_whose_shards_renew_the_lease_whatever_its_hosts_clock(tmp_path, monkeypatch,
                                                                                         skew_s):
    """Commands that must not write behind a running service (`raytwin registry`) ask whether one holds the store.
    It compared the heartbeat's time (the holder's host's clock) with this host's: a holder whose clock was behind
    by more than the expiry showed as stopped, and the command wrote behind its back; a crashed one whose clock was
    ahead showed as running. It watches the heartbeat change on this host's clock instead."""
    import threading
    import time
    from dataclasses import replace

    from tests.fixtures_lease import renewing, watched_quickly

    watched_quickly(monkeypatch)
    holder_clock = lambda: time.time() + skew_s  # noqa: E731
    store = StateStore(str(tmp_path / "store"))
    assert store.live_holder() is None  # never served
    lease = Lease(owner="o1", epoch=3, shards=2, namespace="ns", acquired_at="2026-03-01T00:00:00+00:00",
                  acquired_by="host:1", cluster="session_a")
    store.write_lease(lease)
    assert store.live_holder() is None  # leased, but no shard ever renewed it
    stop = threading.Event()
    renewer = renewing(store, lease, stop.is_set, clock=holder_clock)
    try:
        assert store.live_holder() == lease
    finally:
        stop.set()
        renewer.join()
    assert store.live_holder() is None  # it stopped renewing: crashed, its last heartbeat stays
    previous = replace(lease, owner="o0", epoch=2)
    stop.clear()
    renewer = renewing(store, previous, stop.is_set, clock=holder_clock)
    try:
        assert store.live_holder() is None  # a previous holder's dying shard renews, not the lease's
    finally:
        stop.set()
        renewer.join()
    store.write_lease(replace(lease, released=True))
    assert store.live_holder() is None  # stopped cleanly


def test_live_holder_watches_the_service_that_took_the_store_over_while_it_watched(tmp_path, monkeypatch):
    """A takeover while the command watched the old holder go quiet: the new holder runs, and is found."""
    import time

    monkeypatch.setattr(statestore, "LEASE_EXPIRY_S", 0.2)
    monkeypatch.setattr(statestore, "LEASE_HEARTBEAT_S", 0.02)
    old = Lease(owner="o1", epoch=3, shards=2, namespace="ns", acquired_at="", acquired_by="", cluster="A")
    new = Lease(owner="o2", epoch=4, shards=2, namespace="ns", acquired_at="", acquired_by="", cluster="B")

    class TakenOver(StateStore):
        """Its lease reads `old` once, then `new`, whose shards renew the heartbeat before each read."""
        leases = [old]

        def read_lease(self) -> Lease | None:
            return self.leases.pop(0) if self.leases else new

        def read_heartbeat(self) -> Heartbeat | None:
            return Heartbeat(new.owner, new.epoch, new.cluster, time.time())

    assert TakenOver(str(tmp_path / "store")).live_holder() == new


def _log_as(store: StateStore, ev: LoggedEvent, name: str) -> None:
    """Log one event in a part file of this name (readers list files by name)."""
    store._write_part(log_table([("a", ev)]), f"{store.root}/log/tenant=acme/date={_date(ev.key[0])}", name)


def test_log_files_of_earlier_versions_are_read_indexed_and_compacted(store):
    """Live batches are appended to segments on local disk (Arrow IPC part files on object stores);
    a store written before holds Parquet and Arrow IPC part files in the same partitions: reads, the
    key index and compaction take them all."""
    older, old, new = _ev(1, 10), _ev(2, 20), _ev(3, 30)
    store.append_log("acme", log_table([("a", new)]))
    directory = f"{store.root}/log/tenant=acme/date={T0.date().isoformat()}"
    store._write(log_table([("a", older)]), directory, "part-written-by-0.x")  # Parquet
    store._write_part(log_table([("a", old)]), directory, "part-written-by-0.y")  # an Arrow IPC file per batch
    assert sorted(n.rsplit(".", 1)[-1] for n in _parts(store, "log", "acme")) \
        == sorted(["arrows" if store._local else "arrow", "arrow", "parquet"])
    assert store.read_events("acme", "a") == [older, old, new]
    assert store.find_event("acme", "a", old.key) == old
    index = LogKeyIndex(store)
    assert index.lookup("acme", [("a", e.key, content_digest(e.quality, e.values.items())) for e in (older, old, new)]) \
        == [Logged.SAME] * 3
    [done] = store.compact()
    assert (done.files_in, done.rows_out) == (3, 3) and all(n.endswith(".parquet") for n in _parts(store, "log", "acme"))
    assert store.read_events("acme", "a") == [older, old, new]


@pytest.mark.parametrize("names", [["part-a", "part-b", "part-c", "part-d"], ["part-d", "part-c", "part-b", "part-a"]])
def test_one_row_per_event_identity_whatever_the_file_order(tmp_path, names):
    """Rows with one identity (asset, time, sequence, key) but other content: recovery and
    compaction keep the first ingested (then the least content), never what was listed first; a
    key re-used with another time is another event."""
    store = StateStore(str(tmp_path / "store"))
    first = _ev(1, 10)
    later = LoggedEvent(first.key, "good", {"h1": 9.0}, first.ingest_us + 1)  # same identity, other content
    tie = LoggedEvent(first.key, "bad", {"h1": 0.1, "q_in": 1e-4}, first.ingest_us)  # tied on ingest time
    reused = LoggedEvent((first.key[0] + 30_000_000, 1, "a:1"), "good", {"h1": 5.0}, first.ingest_us + 2)
    for ev, name in zip((later, first, tie, reused), names):
        _log_as(store, ev, name)
    expected = [tie, reused]  # tied on ingest time: "bad" < "good" in the content order
    assert store.read_events("acme", "a") == expected
    assert store.find_event("acme", "a", first.key) == tie
    [done] = store.compact()
    assert (done.rows_in, done.rows_out) == (4, 2)
    assert store.read_events("acme", "a") == expected


def test_snapshot_names_sort_and_parse_before_1970(tmp_path):
    """Negative event times get names that sort before later ones; legacy names still read."""
    store = StateStore(str(tmp_path / "store"))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    snap = {"x": [1.0], "P": [[1.0]]}
    for rev, hours in ((1, -48), (2, -1), (3, 1)):
        store.write_snapshot("acme", "a", Snapshot((to_micros(epoch + timedelta(hours=hours)), rev, f"a:{rev}"), rev, snap))
    directory = store._asset_dir("snapshots", "acme", "a")
    names = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(directory, detail=False))
    assert [parse_snapshot_name(n)[1] for n in names] == [1, 2, 3]  # sorted as strings = by time
    assert store.latest_snapshot("acme", "a").revision == 3
    assert store.latest_snapshot("acme", "a", at_or_before_us=to_micros(epoch - timedelta(minutes=30))).revision == 2
    assert store.latest_snapshot("acme", "a", at_or_before_us=to_micros(epoch - timedelta(hours=2))).revision == 1
    assert parse_snapshot_name("snap--0000000000000000100-000000000007.parquet") == (-100, 7)  # the old encoding
    assert parse_snapshot_name("snap-00000000000000000100-000000000007.parquet") == (100, 7)
    store.save_registration("acme", "a", {"asset": "a"})
    store.append_log("acme", log_table([("a", LoggedEvent((to_micros(epoch - timedelta(hours=47)), 1, "a:1"),
                                                          "good", {"h1": 1.0}, 0))]))
    done = store.prune("acme", date(1970, 1, 1))
    assert (done.history_from, done.snapshots_deleted, done.partitions_deleted) == (date(1970, 1, 1), 2, 1)
    assert store.latest_snapshot("acme", "a").revision == 3


def _files_read(monkeypatch) -> tuple[list[str], list[str]]:
    """The paths `statestore.read_files` reads and `statestore._batches` scans from now on, in the order asked."""
    read: list[str] = []
    scanned: list[str] = []
    read_files, batches = statestore.read_files, statestore._batches
    monkeypatch.setattr(statestore, "read_files", lambda fs, paths, *a, **k: read.extend(paths) or read_files(
        fs, paths, *a, **k))
    monkeypatch.setattr(statestore, "_batches", lambda fs, paths, *a, **k: scanned.extend(paths) or batches(
        fs, paths, *a, **k))
    return read, scanned
