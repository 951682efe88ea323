"""The change log, the change stream's resume and fell-behind rules, its end when its key is revoked,
preconditions and the catalog's compare-and-set, without Ray (the same code over HTTP: tests/test_serve_api.py;
the revocation also over HTTP here, the app served in this process)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import Response

import serve_apps.changes as changes_module
from raytwin.contracts import Asset, AssetType
from raytwin.sim import THERMAL_RC
from serve_apps.auth import KeyStore, Principal, Role, create_key, digest, load_keys, revoke_key
from serve_apps.backend import _asset_change
from serve_apps.catalog import Catalog
from serve_apps.change_stream import ChangeFilter, HeadWatcher, resume_point, sse_changes
from serve_apps.changes import ChangeLog, event_id
from serve_apps.conditional import EntityTags, Precondition, etag, state_etag
from serve_apps.errors import ApiError, Gone, PreconditionFailed, Unprocessable
from serve_apps.stream_auth import STREAM_AUTH_RECHECK_S, StreamCredential


def drafts(n: int, asset: str = "a", kind: str = "twin.state") -> list[dict]:
    return [{"kind": kind, "asset_id": asset, "type_name": "thermal_rc", "data": {"k": i}} for i in range(n)]


class ChangeLogBackend:
    """The `Backend` methods the change stream and `PUT /v1/assets/{id}` call, over a ChangeLog in this process:
    the log's heads and pages, and an update recording `asset.updated` as `Backend.update_asset` does."""

    def __init__(self, log: ChangeLog):
        self.log = log

    def change_heads(self, tenants: list[str]) -> dict[str, int]:
        return self.log.heads(tenants)

    def changes_after(self, tenant: str, after: int, limit: int):
        return self.log.read(tenant, after, limit)

    def update_asset(self, asset: Asset, pre: Precondition) -> int:
        (change,) = self.log.record(asset.tenant, [_asset_change("asset.updated", asset)])
        return change.seq


class LocalBackend(ChangeLogBackend):
    """What `BackendClient.call` does for the stream, against a ChangeLog in this process."""

    async def call(self, method: str, *args):
        return getattr(self, method)(*args)


def key_credential(root: Path, role: str = "reader", **options) -> tuple[StreamCredential, Path, list[ApiError]]:
    """A stream's credential (as `deps.streaming` makes it, needing `role`) of a new key of tenant acme with `role`
    in ``root/keys.json`` (`options`: `recheck_s`, `clock`), that file, and the stream ends the credential audits."""
    keys_file = root / "keys.json"
    record, key = create_key(keys_file, "acme", role, owner="alice")
    audited: list[ApiError] = []

    async def audit(refusal: ApiError) -> None:
        audited.append(refusal)

    who = Principal(key_id=record.key_id, tenant="acme", role=role)
    return (StreamCredential(KeyStore(keys_file), who, digest(key), Role[role], "change_stream", "r-1", audit,
                             **options), keys_file, audited)


def parse(frames: list[str]) -> list[dict]:
    out = []
    for f in frames:
        fields = dict(line.split(": ", 1) for line in f.strip().splitlines() if not line.startswith(":"))
        out.append({"id": fields.get("id"), "event": fields.get("event"),
                    "data": json.loads(fields["data"]) if "data" in fields else None})
    return out


async def take(stream, n: int) -> list[str]:
    """The next `n` frames, leaving out bare `id:` frames (resume points without an event)."""
    out: list[str] = []
    while len(out) < n:
        f = await anext(stream)
        if not f.startswith("id: ") or "\nevent: " in f:
            out.append(f)
    return out


def ids(log: ChangeLog, *seqs: int) -> list[str]:
    """The event ids of changes `seqs` written by `log` (0: the start of the log)."""
    return [event_id(s, log.generation) if s else "0" for s in seqs]


def test_log_is_gapless_durable_and_continues_after_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(changes_module, "PARTITION", 4)  # segments spread over several store folders
    log = ChangeLog(str(tmp_path), memory=3)
    log.record("acme", drafts(3))
    log.record("acme", drafts(6, kind="asset.updated"))  # one segment crossing two folders
    log.record("globex", drafts(2))
    assert log.head("acme") == 9 and log.head("globex") == 2
    stored = log.store.read("acme", 0, 100)  # before the in-memory window: from the store
    assert [c.seq for c in stored] == list(range(1, 10))
    assert [c.revision for c in stored[3:]] == list(range(4, 10))  # catalog kinds: revision = seq
    page = log.read("acme", 6, 100)
    assert [c.seq for c in page.changes] == [7, 8, 9] and page.oldest == 7 and page.head == 9
    behind = log.read("acme", 2, 100)
    assert behind.fell_behind and behind.changes == [] and behind.oldest == 7
    assert [c.seq for c in log.store.read("acme", 4, 2)] == [5, 6]
    assert [c.seq for c in log.store.read("acme", 8, 10)] == [9] and log.read("acme", 9, 10).changes == []
    assert [c.asset_id for c in log.store.read("globex", 0, 10)] == ["a", "a"]

    restarted = ChangeLog(str(tmp_path), memory=3)
    assert restarted.head("acme") == 9 and restarted.read("acme", 5, 100).fell_behind  # memory starts empty
    assert [c.seq for c in restarted.store.read("acme", 5, 100)] == [6, 7, 8, 9]
    assert [c.seq for c in restarted.record("acme", drafts(1))] == [10]
    assert [c.seq for c in restarted.read("acme", 9, 100).changes] == [10]
    assert [c.seq for c in restarted.store.read("acme", 0, 100)] == list(range(1, 11))
    restarted.reserve("acme", 20)  # a catalog revision from a write whose log segment was lost
    assert [c.seq for c in restarted.record("acme", drafts(1))] == [21]


def test_a_log_whose_newest_folder_a_killed_writer_left_empty_continues_its_sequence(tmp_path, monkeypatch):
    """A backend killed between a new folder's creation and its first segment (SIGKILL in a trial: the folder held
    only the writer's hidden temporary file): the next one read its log as empty and numbered changes from 1 again."""
    monkeypatch.setattr(changes_module, "PARTITION", 4)
    log = ChangeLog(str(tmp_path))
    log.record("acme", drafts(3))
    left = tmp_path / "acme" / f"{1:010d}"  # the folder of change 4, with what the killed writer left
    left.mkdir()
    (left / ".0000000000000004-0000000000000004.jsonl.1234.0a1b.tmp").write_text("{")
    restarted = ChangeLog(str(tmp_path))
    assert restarted.head("acme") == 3 and [c.seq for c in restarted.record("acme", drafts(2))] == [4, 5]
    assert [c.seq for c in restarted.store.read("acme", 0, 10)] == [1, 2, 3, 4, 5]


def test_a_failed_write_records_nothing_and_concurrent_writers_get_distinct_seqs(tmp_path):
    log = ChangeLog(str(tmp_path))

    def refuse(seq: int):
        raise PreconditionFailed("no")

    with pytest.raises(PreconditionFailed):
        log.write("acme", refuse)
    assert log.head("acme") == 0
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: log.record("acme", drafts(2, asset=f"a{i}")), range(40)))
    seqs = [c.seq for c in ChangeLog(str(tmp_path)).store.read("acme", 0, 1000)]
    assert seqs == list(range(1, 81))


def test_appends_that_wait_for_a_slow_write_share_the_next_segment(tmp_path):
    log = ChangeLog(str(tmp_path))
    written, entered, release = [], threading.Event(), threading.Event()
    write = log.store.write

    def slow_write(tenant, changes, epoch):  # the first segment write hangs until ten more appends have queued
        if not written:
            entered.set()
            release.wait()
        written.append([c.seq for c in changes])
        write(tenant, changes, epoch)

    log.store.write = slow_write
    with ThreadPoolExecutor(11) as pool:
        first = pool.submit(log.record, "acme", drafts(1))
        entered.wait()
        rest = [pool.submit(log.record, "acme", drafts(2, asset=f"a{i}")) for i in range(10)]
        while len(log._queue.get("acme", [])) < 10:
            time.sleep(0.001)
        release.set()
        assert [c.seq for c in first.result()] == [1]
        got = sorted(c.seq for f in rest for c in f.result())
    assert got == list(range(2, 22)) and written == [[1], list(range(2, 22))]  # 11 appends, 2 store writes
    assert all(len({c.asset_id for c in f.result()}) == 1 for f in rest)  # each caller gets its own changes


def test_stream_resumes_exactly_and_a_slow_reader_falls_behind_once(tmp_path):
    async def scenario():
        log = ChangeLog(str(tmp_path), memory=5)
        backend = LocalBackend(log)
        watcher = HeadWatcher(backend, poll_s=0.01)
        credential = key_credential(tmp_path)[0]
        log.record("acme", drafts(3))

        def open_stream(after: int, flt: ChangeFilter = ChangeFilter()):
            return sse_changes(backend, log.store, watcher, "acme", after, ids(log, after)[0],
                               log.read("acme", after, 2), flt, 2, credential)

        stream = open_stream(0)
        first = parse(await take(stream, 3))
        assert [f["id"] for f in first] == ids(log, 1, 2, 3) and first[0]["event"] == "twin.state"
        log.record("acme", drafts(10))  # the reader is idle while the log moves 10 past it (5 kept in memory)
        behind = parse(await take(stream, 1))[0]
        assert behind["event"] == "fell_behind" and behind["id"] is None
        assert behind["data"]["last_event_id"] == ids(log, 3)[0] and behind["data"]["head"] == 13
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

        resumed = parse(await take(open_stream(3), 10))  # from the store, then memory
        assert [f["id"] for f in resumed] == ids(log, *range(4, 14))

        log.record("acme", drafts(2, asset="b") + drafts(1, asset="c"))
        only_b = open_stream(13, ChangeFilter(asset_ids=frozenset({"b"})))
        got = parse([await anext(only_b) for _ in range(4)])
        assert [(f["id"], f["event"]) for f in got] == list(zip(ids(log, 13, 14, 15, 16),
                                                                [None, "twin.state", "twin.state", None]))
        await only_b.aclose()

        families = ChangeFilter(kinds=frozenset({"asset"}), type_name="thermal_rc")
        log.record("acme", drafts(1, kind="job.succeeded") + drafts(1, kind="asset.created"))
        assert parse(await take(open_stream(16, families), 1))[0]["id"] == ids(log, 18)[0]

    asyncio.run(scenario())


def test_entity_tags_and_preconditions():
    assert EntityTags.parse('"3", "5"').matches(5) and not EntityTags.parse('"3"').matches(5)
    assert not EntityTags.parse('W/"5"').matches(5)  # weak tags never match for writes
    assert EntityTags.parse('W/"5"', weak=True).matches(5) and EntityTags.parse('"3", W/"5"', weak=True).matches(5)
    assert not EntityTags.parse("5", weak=True).matches(5) and not EntityTags.parse('W/"4"', weak=True).matches(5)
    assert not EntityTags.parse("5").matches(5)  # unquoted: not an entity tag
    assert EntityTags.parse("*").matches(1) and not EntityTags.parse("*").matches(None)
    Precondition(if_match=EntityTags.parse('"4"')).check(4, "asset x")
    with pytest.raises(PreconditionFailed, match="revision 5") as err:
        Precondition(if_match=EntityTags.parse('"4"')).check(5, "asset x")
    assert err.value.details == [{"header": "If-Match", "current_revision": 5}]
    with pytest.raises(PreconditionFailed, match="asset x does not exist") as err:
        Precondition(if_match=EntityTags.parse("*")).check(None, "asset x")
    assert "If-None-Match: *" in str(err.value) and 'If-Match: "' not in str(err.value)  # no ETag to quote
    create_only = Precondition(if_none_match=EntityTags.parse("*"))
    create_only.check(None, "asset x")
    with pytest.raises(PreconditionFailed, match="already exists"):
        create_only.check(2, "asset x")


def test_catalog_revisions_compare_and_set_and_survive_a_reload(tmp_path):
    catalog = Catalog(str(tmp_path))
    thermal = AssetType.from_model(THERMAL_RC)
    assert catalog.put_type("acme", thermal, 1)
    zone = Asset(id="zone", tenant="acme", type_name=thermal.name, type_version=thermal.version)
    catalog.create_asset(zone, 2)
    stale = Precondition(if_match=EntityTags.parse('"1"'))
    moved = zone.model_copy(update={"metadata": {"floor": "3"}})
    with pytest.raises(PreconditionFailed):
        catalog.update_asset(moved, 3, stale)
    assert catalog.get_asset("acme", "zone") == zone and catalog.revision("acme", "assets", "zone") == 2
    catalog.update_asset(moved, 3, Precondition(if_match=EntityTags.parse('"2"')))
    with pytest.raises(PreconditionFailed):
        catalog.put_type("acme", thermal, 4, Precondition(if_none_match=EntityTags.parse("*")))
    reloaded = Catalog(str(tmp_path))
    assert reloaded.get_asset("acme", "zone") == moved and reloaded.revision("acme", "assets", "zone") == 3
    assert reloaded.revision("acme", "types", thermal.key) == 1
    with pytest.raises(PreconditionFailed):
        reloaded.delete_asset("acme", "zone", 4, stale)
    reloaded.delete_asset("acme", "zone", 4, Precondition(if_match=EntityTags.parse('"3"')))
    assert reloaded.revision("acme", "assets", "zone") is None


def test_a_catalog_write_whose_log_segment_a_crash_lost_is_recorded_at_its_revision_by_the_next_backend(tmp_path):
    """A backend crashed between an asset's catalog file (revision 4) and its change-log segment; the next one only
    continued the log after 4, so a stream caught up at 3 resumed to a hole: a 'deleted by the retention' `gone`
    event (a resync of everything, no retention configured), and the asset's change was never sent."""
    from serve_apps.backend import record_lost_catalog_changes

    class Crash(BaseException):
        """The process dies: no handler runs."""

    def crash(*args):
        raise Crash

    log, catalog = ChangeLog(str(tmp_path / "changes")), Catalog(str(tmp_path / "catalog"))
    thermal = AssetType.from_model(THERMAL_RC)
    zone = Asset(id="zone", tenant="acme", type_name=thermal.name, type_version=thermal.version)
    log.write("acme", lambda seq: catalog.put_type("acme", thermal, seq) and [{"kind": "asset_type.created"}])
    log.record("acme", drafts(2))
    log.store.write = crash
    with pytest.raises(Crash):
        log.write("acme", lambda seq: catalog.create_asset(zone, seq) and [_asset_change("asset.created", zone)])
    resumed_at = ids(log, 3)[0]

    restarted, reloaded = ChangeLog(str(tmp_path / "changes")), Catalog(str(tmp_path / "catalog"))
    record_lost_catalog_changes(restarted, reloaded, "acme", pytest.fail)  # (no delete to finish)
    record_lost_catalog_changes(restarted, reloaded, "acme", pytest.fail)  # nothing twice
    restarted.record("acme", drafts(1, asset="next"))

    async def resume() -> list[dict]:
        backend = LocalBackend(restarted)
        stream = sse_changes(backend, restarted.store, HeadWatcher(backend, poll_s=0.01), "acme", 3, resumed_at,
                             restarted.read("acme", 3, 2), ChangeFilter(), 2, key_credential(tmp_path)[0])
        return parse(await take(stream, 2))

    got = asyncio.run(resume())
    assert [(f["event"], f["data"]["seq"], f["data"]["asset_id"]) for f in got] == [("asset.created", 4, "zone"),
                                                                                    ("twin.state", 5, "next")]
    assert got[0]["data"]["revision"] == reloaded.revision("acme", "assets", "zone") == 4
    assert Asset.model_validate(got[0]["data"]["data"]["asset"]) == zone


def test_lost_catalog_changes_are_recovered_as_the_create_update_or_delete_they_were(tmp_path):
    """Catalog writes whose log segments crashes lost (the files written, the log not), recovered by the next backend:
    a create was sent as `asset.updated` (a subscriber keeping a set of assets never added it), and a delete left no
    entry, so its change was never sent at all (the subscriber kept a deleted asset for good). Each is now recorded
    as what it was, from the kind its record names; a delete's tombstone goes once the log holds its change and its
    twin is unregistered (a crash between them left the twin registered), and an asset written before records named
    it is recorded as an update, as before."""
    from serve_apps.backend import record_lost_catalog_changes

    store = tmp_path / "catalog"
    log, catalog = ChangeLog(str(tmp_path / "changes")), Catalog(str(store))
    thermal, spare = AssetType.from_model(THERMAL_RC), AssetType.from_model(THERMAL_RC).model_copy(
        update={"name": "spare"})
    zone, gone, done, new, old = (Asset(id=i, tenant="acme", type_name=thermal.name, type_version=thermal.version)
                                  for i in ("zone", "gone", "done", "new", "old"))
    log.write("acme", lambda seq: catalog.put_type("acme", thermal, seq) and [{"kind": "asset_type.created"}])
    log.write("acme", lambda seq: catalog.put_type("acme", spare, seq) and [{"kind": "asset_type.created"}])
    for asset in (zone, gone, done):
        log.write("acme", lambda seq: catalog.create_asset(asset, seq) and [_asset_change("asset.created", asset)])
    log.write("acme", lambda seq: [_asset_change("asset.deleted", catalog.delete_asset("acme", "done", seq))])
    # (a crash before its twin's unregistration: done's tombstone stays, its change recorded at 6)
    moved = zone.model_copy(update={"metadata": {"floor": "3"}})
    catalog.create_asset(new, 7)  # the lost writes: each a crash after its catalog file
    catalog.update_asset(moved, 8)
    catalog.delete_asset("acme", "gone", 9)
    catalog.delete_type("acme", spare.name, spare.version, 10)
    catalog.create_asset(old, 11)
    (store / "catalog/acme/assets/old.json").write_text(json.dumps({"revision": 11, "asset": old.model_dump(
        mode="json")}))  # as a version before the field wrote it

    restarted, reloaded = ChangeLog(str(tmp_path / "changes")), Catalog(str(store))
    unregistered: list[tuple[str, str]] = []
    for _ in range(2):  # nothing twice
        record_lost_catalog_changes(restarted, reloaded, "acme", lambda *twin: unregistered.append(twin))
    assert sorted(unregistered) == [("acme", "done"), ("acme", "gone")]  # their twins, which a crash left registered
    recovered = restarted.store.read("acme", 6, 10)
    assert [(c.seq, c.kind, c.asset_id or c.type_name) for c in recovered] == [
        (7, "asset.created", "new"), (8, "asset.updated", "zone"), (9, "asset.deleted", "gone"),
        (10, "asset_type.deleted", "spare"), (11, "asset.updated", "old")]
    assert Asset.model_validate(recovered[1].data["asset"]) == moved
    assert Asset.model_validate(recovered[2].data["asset"]) == gone
    assert AssetType.model_validate(recovered[3].data["asset_type"]) == spare
    assert sorted(p.name for p in (store / "catalog/acme/assets").iterdir()) == ["new.json", "old.json", "zone.json"]
    assert [p.name for p in (store / "catalog/acme/types").iterdir()] == [f"{thermal.key}.json"]
    assert Catalog(str(store)).tombstones == {} and reloaded.tombstones == {}


def test_a_delete_whose_twins_shard_hangs_at_start_keeps_its_tombstone_and_the_backend_starts(tmp_path, caplog):
    """A crash between a delete's change and its twin's unregistration is finished by the next backend's start; a
    shard that left that unregister unanswered (hung) raised there and kept the whole service from starting. The
    delete now waits, its tombstone kept, for the next start (or a retry of the delete), which finishes it."""
    from concurrent.futures import Future

    from actors.service import ShardUnanswered
    from serve_apps.backend import record_lost_catalog_changes

    log, catalog = ChangeLog(str(tmp_path / "changes")), Catalog(str(tmp_path / "catalog"))
    thermal = AssetType.from_model(THERMAL_RC)
    log.write("acme", lambda seq: catalog.put_type("acme", thermal, seq) and [{"kind": "asset_type.created"}])
    for name in ("gone", "stuck"):
        asset = Asset(id=name, tenant="acme", type_name=thermal.name, type_version=thermal.version)
        log.write("acme", lambda seq: catalog.create_asset(asset, seq) and [_asset_change("asset.created", asset)])
        log.write("acme", lambda seq: [_asset_change("asset.deleted", catalog.delete_asset("acme", name, seq))])

    def hung_for_stuck(tenant: str, asset_id: str) -> None:
        if asset_id == "stuck":
            raise ShardUnanswered("twin shard 0 left the unregister unanswered within 3 s", Future())

    with caplog.at_level("WARNING", logger="raytwin.serve"):
        record_lost_catalog_changes(log, catalog, "acme", hung_for_stuck)
    assert list(catalog.tombstones) == [("acme", "assets", "stuck")]  # gone's delete finished
    assert "event=deleted_twin_unregister_deferred tenant=acme asset=stuck" in caplog.text
    unregistered: list[tuple[str, str]] = []
    record_lost_catalog_changes(log, Catalog(str(tmp_path / "catalog")), "acme", lambda *twin: unregistered.append(twin))
    assert unregistered == [("acme", "stuck")] and Catalog(str(tmp_path / "catalog")).tombstones == {}


def _deleting_backend(tmp_path: Path, unregister) -> tuple:
    """(a `Backend` with what `delete_asset` uses, over the catalog and change log under `tmp_path`, with asset zone
    created; the twins it ended moves of): its twins' `unregister` is `unregister`."""
    from types import SimpleNamespace

    from serve_apps.backend import Backend
    from serve_apps.twin_writes import TwinWrites

    ended: list[str] = []
    backend = Backend.__new__(Backend)
    backend.check_writable = lambda: None
    backend._lock, backend._publish, backend._twin_marks = threading.Lock(), threading.Lock(), {("acme", "zone"): 3}
    backend._twin_writes = TwinWrites()
    backend.config = SimpleNamespace(shard_read_timeout_s=5.0, shard_write_timeout_s=15.0, shard_create_timeout_s=60.0)
    backend.catalog, backend.changes = Catalog(str(tmp_path / "catalog")), ChangeLog(str(tmp_path / "changes"))
    backend.twins = SimpleNamespace(unregister=lambda tenant, asset_id, timeout_s=None: unregister(tenant, asset_id))
    backend.moves = SimpleNamespace(end=lambda tenant, asset_id: ended.append(asset_id))
    if not backend.catalog.tenants():
        thermal = AssetType.from_model(THERMAL_RC)
        zone = Asset(id="zone", tenant="acme", type_name=thermal.name, type_version=thermal.version)
        backend.changes.write("acme", lambda seq: backend.catalog.put_type("acme", thermal, seq) and [
            {"kind": "asset_type.created"}])
        backend.changes.write("acme", lambda seq: backend.catalog.create_asset(zone, seq) and [
            _asset_change("asset.created", zone)])
    return backend, ended


def test_a_delete_whose_shard_was_killed_mid_unregister_answers_its_success_once(tmp_path):
    """A shard killed mid-`unregister` comes back without the twin, and Ray resends the call: it finds no twin, and
    `TwinService.unregister` raises `UnknownTwin`. The delete had landed (catalog tombstone, `asset.deleted` in the
    log), yet `delete_asset` let that error through: the client got a 500 for a done delete, and its tombstone and
    move were left for the next start. The delete answers its success; the client's retry, 404; one change."""
    from actors.state import UnknownTwin
    from serve_apps.errors import NotFound

    def resent_unregister(tenant: str, asset_id: str) -> None:  # as `TwinService.unregister` when the shard answers
        unregistered.append((tenant, asset_id))  # False: the restarted shard holds no such twin
        raise UnknownTwin(f"no twin {asset_id!r} for tenant {tenant!r}")

    unregistered: list[tuple[str, str]] = []
    backend, ended = _deleting_backend(tmp_path, resent_unregister)
    backend.delete_asset("acme", "zone", Precondition())
    assert unregistered == [("acme", "zone")] and ended == ["zone"] and backend._twin_marks == {}
    assert backend.catalog.tombstones == {}  # finished now, not left for the next start
    with pytest.raises(NotFound):  # the client's retry: the asset is gone
        backend.delete_asset("acme", "zone", Precondition())
    assert [c.kind for c in backend.changes.store.read("acme", 2, 10)] == ["asset.deleted"]


def test_a_retried_delete_whose_unregister_failed_with_a_shard_error_finishes_it_and_answers_404_once(tmp_path):
    """A shard error other than `UnknownTwin` (Ray's retries used up, a shard deadline) failed a delete's unregister
    after its tombstone and `asset.deleted` were written: the client got the error, its retry a bare 404, and the twin
    stayed registered until the next backend's start. The retry now finishes the delete it finds (twin, tombstone,
    move, marks), then answers 404 as documented; the log holds one `asset.deleted`."""
    from serve_apps.errors import NotFound

    class ShardDeadline(Exception):
        pass

    def unregister(tenant: str, asset_id: str) -> None:
        unregistered.append((tenant, asset_id))
        if len(unregistered) == 1:
            raise ShardDeadline("shard twins-0 did not answer")

    unregistered: list[tuple[str, str]] = []
    backend, ended = _deleting_backend(tmp_path, unregister)
    with pytest.raises(ShardDeadline):
        backend.delete_asset("acme", "zone", Precondition())
    assert set(Catalog(str(tmp_path / "catalog")).tombstones) == {("acme", "assets", "zone")} and ended == []
    with pytest.raises(NotFound):  # the client's retry
        backend.delete_asset("acme", "zone", Precondition())
    assert unregistered == [("acme", "zone")] * 2 and ended == ["zone"] and backend._twin_marks == {}
    assert backend.catalog.tombstones == {} == Catalog(str(tmp_path / "catalog")).tombstones  # nothing left to start
    with pytest.raises(NotFound):  # a retry after it: nothing more to do
        backend.delete_asset("acme", "zone", Precondition())
    assert len(unregistered) == 2
    assert [c.kind for c in backend.changes.store.read("acme", 2, 10)] == ["asset.deleted"]


def test_a_create_of_an_id_whose_delete_left_its_twin_registered_finishes_that_delete_before_its_new_twin(tmp_path):
    """A delete whose unregister failed with a shard error left the twin registered; a create of the same id then
    registered its twin onto it (an identical registration attaches: the new asset ran the deleted one's state and
    history) and overwrote the tombstone, so no start unregistered it either. The create now finishes the delete
    first: the old twin unregistered, then the new one registered; the log holds the delete, then the create."""
    class ShardDeadline(Exception):
        pass

    def unregister(tenant: str, asset_id: str) -> None:
        calls.append(("unregister", asset_id))
        if len(calls) == 1:
            raise ShardDeadline("shard twins-0 did not answer")

    calls: list[tuple[str, str]] = []
    backend, ended = _deleting_backend(tmp_path, unregister)
    backend.twins.register = lambda asset, artifact, initial_state, timeout_s=None: calls.append(("register", asset.id))
    backend._require_production, backend._checked_artifact = lambda asset: None, lambda asset, state: "artifact"
    with pytest.raises(ShardDeadline):
        backend.delete_asset("acme", "zone", Precondition())
    zone = Asset(id="zone", tenant="acme", type_name=AssetType.from_model(THERMAL_RC).name,
                 type_version=AssetType.from_model(THERMAL_RC).version)
    backend.create_asset(zone, None, Precondition())
    assert calls == [("unregister", "zone"), ("unregister", "zone"), ("register", "zone")] and ended == ["zone"]
    assert backend.catalog.tombstones == {} == Catalog(str(tmp_path / "catalog")).tombstones
    assert [c.kind for c in backend.changes.store.read("acme", 2, 10)] == ["asset.deleted", "asset.created"]


def test_a_retried_delete_whose_change_the_log_could_not_write_keeps_its_tombstone_until_the_log_holds_it(tmp_path):
    """A delete whose tombstone landed but whose change-log write failed (a full disk): its retry must not end the
    delete (unregister, tombstone removed) before the log holds its change, or a crash then lost that change for
    good (no tombstone left to record it from at the next start). While the disk is full the retry fails and keeps
    all; once it takes writes, the retry writes the change, finishes the delete and answers 404."""
    from serve_apps.errors import NotFound

    unregistered: list[tuple[str, str]] = []
    backend, ended = _deleting_backend(tmp_path, lambda *twin: unregistered.append(twin))
    failures = [DISK_FULL, DISK_FULL]
    _failing_writes(backend.changes, failures)
    for _ in range(2):  # the delete, then its retry while the disk is still full
        with pytest.raises(OSError, match="No space left"):
            backend.delete_asset("acme", "zone", Precondition())
        assert unregistered == [] and set(Catalog(str(tmp_path / "catalog")).tombstones) == {("acme", "assets", "zone")}
    with pytest.raises(NotFound):  # the disk takes writes again
        backend.delete_asset("acme", "zone", Precondition())
    assert unregistered == [("acme", "zone")] and ended == ["zone"] and backend.catalog.tombstones == {}
    assert [c.kind for c in backend.changes.store.read("acme", 2, 10)] == ["asset.deleted"]


def test_a_delete_whose_backend_was_killed_before_the_twin_is_finished_by_the_next_start_and_retried_as_404(
        tmp_path):
    """A backend killed between a delete's catalog and log writes and its twin's unregistration: the next backend's
    start (`record_lost_catalog_changes` with its `_unregister_deleted`, as `Backend.__init__` calls it) unregisters
    the twin and removes the tombstone, twice over without a second change; the client's retry of the DELETE gets
    404 (the asset is gone: the delete is done), and the change stream holds one `asset.deleted`."""
    from serve_apps.backend import record_lost_catalog_changes
    from serve_apps.errors import NotFound

    class Killed(Exception):
        pass

    def killed(tenant: str, asset_id: str) -> None:
        raise Killed

    crashed, _ = _deleting_backend(tmp_path, killed)
    with pytest.raises(Killed):
        crashed.delete_asset("acme", "zone", Precondition())
    unregistered: list[tuple[str, str]] = []
    backend, _ = _deleting_backend(tmp_path, lambda *twin: unregistered.append(twin))
    assert set(backend.catalog.tombstones) == {("acme", "assets", "zone")}
    for _ in range(2):  # (a second start: nothing again)
        record_lost_catalog_changes(backend.changes, backend.catalog, "acme", backend._unregister_deleted)
    assert unregistered == [("acme", "zone")] and backend.catalog.tombstones == {}
    with pytest.raises(NotFound):
        backend.delete_asset("acme", "zone", Precondition())
    assert [c.kind for c in ChangeLog(str(tmp_path / "changes")).store.read("acme", 2, 10)] == ["asset.deleted"]


class _Held:
    """A shard call its hung shard leaves unanswered: `_held_get` times it out (and fails the test where `ray.get` is
    given no timeout: it would wait for good); `outcome`, completed by the test, is the shard's late answer."""

    def __init__(self) -> None:
        from concurrent.futures import Future

        self.outcome: Future = Future()

    def future(self):
        return self.outcome


def _held_get(ref, timeout=None):
    from ray.exceptions import GetTimeoutError

    assert timeout is not None, "ray.get without a timeout on a hung shard waits forever"
    raise GetTimeoutError(f"Get timed out: some object(s) not ready after {timeout} s")


def _hung_twins(monkeypatch, backend) -> dict[str, _Held]:
    """`backend.twins`, a `TwinService` over one shard that leaves every register and unregister unanswered (`_Held`,
    by method and asset id in the dict returned)."""
    from types import SimpleNamespace

    from actors.service import TwinService

    held: dict[str, _Held] = {}

    def call(method: str):
        return SimpleNamespace(remote=lambda tenant, asset_id, *rest: held.setdefault(f"{method} {asset_id}", _Held()))

    monkeypatch.setattr("actors.service.ray.get", _held_get)
    monkeypatch.setattr("actors.service.registration_record", lambda *args: {})
    twins = TwinService.__new__(TwinService)
    twins._shards = [SimpleNamespace(register=call("register"), unregister=call("unregister"))]
    twins.router = SimpleNamespace(shards=1)
    backend.twins = twins
    backend._require_production, backend._checked_artifact = lambda asset: None, lambda asset, state: "artifact"
    return held


def _settled(backend, asset_id: str) -> None:
    """Wait (generously: a settle runs on a thread of its own) until the twin's late write is settled."""
    deadline = time.monotonic() + 30
    while not backend._twin_writes.idle("acme", asset_id):
        assert time.monotonic() < deadline, f"the late write of {asset_id} was never settled"
        time.sleep(0.01)


def test_a_create_its_shard_leaves_unanswered_is_503_outcome_unknown_and_holds_no_lock_then_settles(tmp_path,
                                                                                                 monkeypatch):
    """`create_asset` waited on the twin's registration without a deadline under `Backend._lock`: a hung shard held
    every tenant's asset writes, and a cleanup after the Ingress deadline would have left a twin without its asset.
    Past `shard_create_timeout_s` it is 503 `twin_unavailable` saying the outcome is unknown, the lock free; the asset
    stays recorded, its twin's other writes are refused until the shard answers, and then the asset is deleted only if
    the shard refused its twin."""
    from serve_apps.shard_deadline import TwinUnavailable

    backend, _ = _deleting_backend(tmp_path, pytest.fail)
    held = _hung_twins(monkeypatch, backend)
    thermal = AssetType.from_model(THERMAL_RC)
    refused, kept = (Asset(id=a, tenant="acme", type_name=thermal.name, type_version=thermal.version)
                     for a in ("pump", "fan"))
    for asset in (refused, kept):
        with pytest.raises(TwinUnavailable, match=f"outcome unknown: the registration of twin {asset.id} left "
                                                  "unanswered within 60 s") as unknown:
            backend.create_asset(asset, None, Precondition())
        assert unknown.value.headers == {"Retry-After": "2"} and f"GET /v1/assets/{asset.id}" in unknown.value.message
    assert backend._lock.acquire(blocking=False), "a hung shard holds the catalog's lock"
    backend._lock.release()
    assert {a.id for a in backend.catalog.list_assets("acme", None, None, None, None)} == {"zone", "pump", "fan"}
    with pytest.raises(TwinUnavailable, match="its shard has not answered an earlier write yet"):
        backend.delete_asset("acme", "pump", Precondition())  # would stop a twin the late registration then makes
    assert "unregister pump" not in held

    held["register pump"].outcome.set_exception(RuntimeError("the shard refused the twin"))
    held["register fan"].outcome.set_result(None)
    _settled(backend, "pump")
    _settled(backend, "fan")
    assert {a.id for a in backend.catalog.list_assets("acme", None, None, None, None)} == {"zone", "fan"}
    assert [(c.kind, c.asset_id) for c in backend.changes.store.read("acme", 2, 10)] == [
        ("asset.created", "pump"), ("asset.created", "fan"), ("asset.deleted", "pump")]


def test_a_delete_whose_twin_stop_is_unanswered_is_503_keeps_its_tombstone_and_ends_once_the_shard_answers(
        tmp_path, monkeypatch):
    """`delete_asset` waited on the twin's unregister without a deadline under `Backend._lock`. Past
    `shard_write_timeout_s` it is 503 saying the asset is deleted and its twin stops once the shard answers; its
    tombstone stays, a create of the id is refused meanwhile (its registration would attach to the twin still
    there), other twins' writes go on, and the shard's answer ends the delete."""
    from serve_apps.shard_deadline import TwinUnavailable

    backend, _ = _deleting_backend(tmp_path, pytest.fail)
    held = _hung_twins(monkeypatch, backend)
    with pytest.raises(TwinUnavailable, match="outcome unknown: the stop of twin zone left unanswered within 15 s.*"
                                              "the asset is deleted"):
        backend.delete_asset("acme", "zone", Precondition())
    assert set(backend.catalog.tombstones) == {("acme", "assets", "zone")}
    thermal = AssetType.from_model(THERMAL_RC)
    zone = Asset(id="zone", tenant="acme", type_name=thermal.name, type_version=thermal.version)
    with pytest.raises(TwinUnavailable, match="its shard has not answered an earlier write yet"):
        backend.create_asset(zone, None, Precondition())
    assert "register zone" not in held
    held["unregister zone"].outcome.set_result(True)
    _settled(backend, "zone")
    assert backend.catalog.tombstones == {} == Catalog(str(tmp_path / "catalog")).tombstones
    assert backend._twin_marks == {}
    assert [c.kind for c in backend.changes.store.read("acme", 2, 10)] == ["asset.deleted"]


def _unanswered(what: str, held: _Held):
    """A `TwinService` method whose shard leaves it unanswered: `ShardUnanswered` with `held`'s outcome, once given a
    deadline (the test fails where none is given: the call would wait for good)."""
    from actors.service import ShardUnanswered

    def call(*args):
        timeout_s = args[2] if len(args) > 2 else None  # (asset, artifact, timeout_s) or (tenant, asset_id, timeout_s)
        assert timeout_s is not None, f"{what} waits on a hung shard without a deadline"
        raise ShardUnanswered(f"{what} left unanswered within {timeout_s:g} s", held.outcome)

    return call


def _moving_backend(tmp_path: Path) -> tuple:
    """(`_deleting_backend` with type version thermal_rc@1.0.1 published too, that version, the steps its stand-in
    journal of moves took: begin, settle, try_settle, end)."""
    from types import SimpleNamespace

    backend, _ = _deleting_backend(tmp_path, pytest.fail)
    newer = AssetType.from_model(THERMAL_RC).model_copy(update={"version": "1.0.1"})
    backend.changes.write("acme", lambda seq: backend.catalog.put_type("acme", newer, seq) and [
        {"kind": "asset_type.created"}])
    moves: list[str] = []
    backend.moves = SimpleNamespace(**{step: (lambda step: lambda *args: moves.append(step))(step)
                                       for step in ("begin", "settle", "try_settle", "end")})
    return backend, newer, moves


def test_a_retype_its_shard_leaves_unanswered_is_503_and_its_move_is_settled_by_the_shards_answer_not_a_read(
        tmp_path):
    """`update_asset` waited on the twin's move without a deadline under `Backend._lock`. Past `shard_create_timeout_s`
    it is 503, outcome unknown, the lock free; the move stays journaled: a read does not settle it meanwhile (it would
    drop a move the shard may still make), another write of the twin is refused, and the shard's answer settles it."""
    from types import SimpleNamespace

    from serve_apps.shard_deadline import TwinUnavailable

    backend, newer, moves = _moving_backend(tmp_path)
    backend.type_evolution = SimpleNamespace(require_version=lambda *args: None)
    backend._require_production, backend._checked_artifact = lambda asset: None, lambda asset, state: "artifact"
    held = _Held()
    backend.twins = SimpleNamespace(retype=_unanswered("the move of twin zone to thermal_rc@1.0.1", held))
    moved = Asset(id="zone", tenant="acme", type_name=newer.name, type_version="1.0.1")
    with pytest.raises(TwinUnavailable, match="outcome unknown: the move of twin zone to thermal_rc@1.0.1 left "
                                              "unanswered within 60 s.*its type_version says whether the twin moved"):
        backend.update_asset(moved, Precondition())
    assert backend._lock.acquire(blocking=False), "a hung shard holds the catalog's lock"
    backend._lock.release()
    assert moves == ["settle", "begin"]
    assert backend.get_asset("acme", "zone").type_version == "1.0.0" and moves == ["settle", "begin"]  # not settled
    with pytest.raises(TwinUnavailable, match="its shard has not answered an earlier write yet"):
        backend.update_asset(moved, Precondition())
    held.outcome.set_result(True)
    _settled(backend, "zone")
    assert moves == ["settle", "begin", "settle"]


def test_a_migration_its_shard_leaves_unanswered_is_503_and_holds_no_lock_its_move_settled_by_the_answer(tmp_path):
    """`TypeEvolution.migrate` waited on the twin's migration without a deadline under `Backend._lock`. Past
    `shard_create_timeout_s` it is 503, outcome unknown, the lock free and the move journaled until the shard's answer
    settles it."""
    from types import SimpleNamespace

    from raytwin.migration import MigrationRequest
    from serve_apps.evolution import TypeEvolution
    from serve_apps.shard_deadline import TwinUnavailable

    backend, newer, moves = _moving_backend(tmp_path)
    artifact = SimpleNamespace(model=lambda: THERMAL_RC, asset_type=newer, ref="thermal_rc@1.0.1")
    backend._require_production, backend._checked_artifact = lambda asset: None, lambda asset, state: artifact
    backend._artifact = lambda tenant, asset: artifact
    held = _Held()
    migrate = _unanswered("the migration of twin zone to thermal_rc@1.0.1", held)
    backend.twins = SimpleNamespace(migrate=lambda asset, target, plan, *timeout: migrate(asset, target, *timeout))
    evolution = TypeEvolution.__new__(TypeEvolution)
    evolution.backend = backend
    with pytest.raises(TwinUnavailable, match="outcome unknown: the migration of twin zone to thermal_rc@1.0.1 left "
                                              "unanswered within 60 s.*its type_version says whether the twin moved"):
        evolution.migrate("acme", "zone", MigrationRequest(type_version="1.0.1"), Precondition())
    assert backend._lock.acquire(blocking=False), "a hung shard holds the catalog's lock"
    backend._lock.release()
    assert moves == ["settle", "begin"] and backend.catalog.get_asset("acme", "zone").type_version == "1.0.0"
    held.outcome.set_result((None, None))
    _settled(backend, "zone")
    assert moves == ["settle", "begin", "settle"]


def test_a_drift_clear_its_shard_leaves_unanswered_is_503_and_its_change_is_recorded_once_the_shard_answers(
        tmp_path):
    """`clear_drift` (and the read of the twin's state before a first write) waited on the shard without a deadline.
    A state read past `shard_read_timeout_s` is 503 with nothing done; a clear past `shard_write_timeout_s` is 503,
    outcome unknown, and its `twin.drift` change is recorded once the shard answers."""
    from types import SimpleNamespace

    from serve_apps.shard_deadline import TwinUnavailable

    backend, _ = _deleting_backend(tmp_path, pytest.fail)
    backend.moves = SimpleNamespace(try_settle=lambda *args: None)
    held = _Held()
    backend.twins = SimpleNamespace(state=_hung_state, clear_drift=_unanswered("the drift clear of twin zone", held))
    backend._twin_marks = {}
    with pytest.raises(TwinUnavailable, match="left the read of its state unanswered within 5 s.*nothing was done"):
        backend.clear_drift("acme", "zone")
    backend._twin_marks = {("acme", "zone"): (3, True)}
    with pytest.raises(TwinUnavailable, match="outcome unknown: the drift clear of twin zone left unanswered within "
                                              "15 s.*its drift flag says whether the clear was applied"):
        backend.clear_drift("acme", "zone")
    held.outcome.set_result(_thermal("zone", revision=3, drift=False))
    _settled(backend, "zone")
    assert [(c.kind, c.data["drift"]) for c in backend.changes.store.read("acme", 2, 10)] == [("twin.drift", False)]
    assert backend._twin_marks == {("acme", "zone"): (3, False)}


def _hung_state(tenant: str, asset_id: str, timeout_s: float | None = None):
    from ray.exceptions import GetTimeoutError

    assert timeout_s is not None, "a state read waits on a hung shard without a deadline"
    raise GetTimeoutError(f"Get timed out: some object(s) not ready after {timeout_s} s")


def _failing_removals(catalog: Catalog, failures: list[Exception]) -> None:
    """Make the catalog's file removals raise `failures` in turn (one per removal), then remove again; raised by its
    filesystem, as a store's errors are. The catalog's own reference is replaced: the shared filesystem is not."""
    fs = catalog.fs

    class Failing:
        def rm_file(self, path, **kwargs):
            if failures:
                raise failures.pop()
            fs.rm_file(path, **kwargs)

        def __getattr__(self, name):
            return getattr(fs, name)

    catalog.fs = Failing()


STORE_EIO = OSError(5, "Input/output error")


def test_a_delete_whose_tombstone_removal_failed_is_finished_by_its_retry_a_create_or_the_next_start(tmp_path):
    """A delete's tombstone removal failed after its change and twin were done: the tombstone left memory first, so
    its retry saw no pending delete and answered a bare 404 and the file stayed until the next start. The tombstone
    now stays until its file is gone: the retried DELETE removes it (then 404), as a create of the id does first, and
    a start finds the file otherwise; one `asset.deleted` each time."""
    from serve_apps.backend import record_lost_catalog_changes
    from serve_apps.errors import NotFound

    catalog_dir = tmp_path / "catalog"
    unregistered: list[tuple[str, str]] = []
    backend, _ = _deleting_backend(tmp_path, lambda *twin: unregistered.append(twin))
    _failing_removals(backend.catalog, [STORE_EIO])
    backend.delete_asset("acme", "zone", Precondition())  # done: the removal's failure is logged only
    assert set(backend.catalog.tombstones) == {("acme", "assets", "zone")} == set(Catalog(str(catalog_dir)).tombstones)
    with pytest.raises(NotFound):  # the client's retry
        backend.delete_asset("acme", "zone", Precondition())
    assert backend.catalog.tombstones == {} == Catalog(str(catalog_dir)).tombstones
    assert unregistered == [("acme", "zone")] * 2  # (a twin the retry does not find is answered as done)

    backend.twins.register = lambda asset, artifact, initial_state, timeout_s=None: None
    backend._require_production, backend._checked_artifact = lambda asset: None, lambda asset, state: "artifact"
    thermal = AssetType.from_model(THERMAL_RC)
    zone = Asset(id="zone", tenant="acme", type_name=thermal.name, type_version=thermal.version)
    backend.create_asset(zone, None, Precondition())
    _failing_removals(backend.catalog, [STORE_EIO])
    backend.delete_asset("acme", "zone", Precondition())
    backend.create_asset(zone, None, Precondition())  # finishes the delete, then creates
    assert backend.catalog.tombstones == {} and Catalog(str(catalog_dir)).get_asset("acme", "zone")

    _failing_removals(backend.catalog, [STORE_EIO])
    backend.delete_asset("acme", "zone", Precondition())
    restarted, _ = _deleting_backend(tmp_path, lambda *twin: None)
    record_lost_catalog_changes(restarted.changes, restarted.catalog, "acme", restarted._unregister_deleted)
    assert restarted.catalog.tombstones == {} == Catalog(str(catalog_dir)).tombstones
    assert [c.kind for c in ChangeLog(str(tmp_path / "changes")).store.read("acme", 2, 10)] == [
        "asset.deleted", "asset.created", "asset.deleted", "asset.created", "asset.deleted"]


def test_a_type_delete_cut_short_is_finished_by_its_retried_delete_or_the_next_start(tmp_path, monkeypatch):
    """A type delete has three writes: its tombstone, its change, the tombstone's removal. A crash between any two
    left a tombstone that the next start finishes (recorded if the log lacks it, then removed); but a log write or a
    removal that failed in a running backend left it for that start only: the retried DELETE answered 404 and kept
    the tombstone (and a change the log had not written yet). The retry now writes that change, removes the
    tombstone, then answers 404; the log holds one `asset_type.deleted` per delete."""
    from types import SimpleNamespace

    import serve_apps.backend as backend_module
    from serve_apps.backend import record_lost_catalog_changes
    from serve_apps.errors import NotFound

    backend, _ = _deleting_backend(tmp_path, pytest.fail)
    backend.config = SimpleNamespace(shard_read_timeout_s=1.0)
    backend.twins.models, backend._registry = None, lambda tenant: None
    monkeypatch.setattr(backend_module, "twins_running", lambda *args: [])  # no twin runs it, no lifecycle needs it
    monkeypatch.setattr(backend_module, "refuse_held_type", lambda *args: None)
    monkeypatch.setattr(backend_module, "ModelLifecycle", lambda registry: None)
    spare = AssetType.from_model(THERMAL_RC).model_copy(update={"name": "spare"})
    catalog_dir, tombstone = tmp_path / "catalog", ("acme", "types", spare.key)

    def publish() -> None:
        backend.changes.write("acme", lambda seq: backend.catalog.put_type("acme", spare, seq) and [
            {"kind": "asset_type.created"}])

    def deleted_types() -> int:
        return [c.kind for c in ChangeLog(str(tmp_path / "changes")).store.read("acme", 2, 20)].count(
            "asset_type.deleted")

    publish()
    _failing_writes(backend.changes, [DISK_FULL])
    with pytest.raises(OSError, match="No space left"):  # its change's write failed: kept, with its tombstone
        backend.delete_type("acme", spare.name, spare.version, Precondition())
    assert set(Catalog(str(catalog_dir)).tombstones) == {tombstone} and deleted_types() == 0
    with pytest.raises(NotFound):  # the disk takes writes again: the retry
        backend.delete_type("acme", spare.name, spare.version, Precondition())
    assert backend.catalog.tombstones == {} == Catalog(str(catalog_dir)).tombstones and deleted_types() == 1

    publish()
    _failing_removals(backend.catalog, [STORE_EIO])
    backend.delete_type("acme", spare.name, spare.version, Precondition())  # done: the removal's failure logged
    assert set(Catalog(str(catalog_dir)).tombstones) == {tombstone}
    with pytest.raises(NotFound):
        backend.delete_type("acme", spare.name, spare.version, Precondition())
    assert backend.catalog.tombstones == {} == Catalog(str(catalog_dir)).tombstones and deleted_types() == 2

    publish()
    _failing_writes(backend.changes, [DISK_FULL])
    with pytest.raises(OSError, match="No space left"):
        backend.delete_type("acme", spare.name, spare.version, Precondition())
    restarted, _ = _deleting_backend(tmp_path, pytest.fail)  # the backend stopped with the change unwritten
    record_lost_catalog_changes(restarted.changes, restarted.catalog, "acme", pytest.fail)
    assert restarted.catalog.tombstones == {} == Catalog(str(catalog_dir)).tombstones and deleted_types() == 3


def test_a_delete_refused_for_the_assets_that_need_it_names_them_in_bounded_details_and_says_what_to_do(tmp_path):
    """An app developer's find: deleting an asset others point at, or a type assets use, answered 409 with `details`
    holding every referring asset's id as a bare string (every other error's details are objects), unbounded (a type
    of 100,000 assets: 100,000 ids in one error body), and the asset's message said nothing of what to do. Now one
    object: the first 20 ids and the count, and the message names the fix."""
    from serve_apps.errors import Conflict
    from raytwin.contracts import Relationship

    catalog = Catalog(str(tmp_path))
    thermal = AssetType.from_model(THERMAL_RC)
    catalog.put_type("acme", thermal, 1)
    catalog.create_asset(Asset(id="site", tenant="acme", type_name=thermal.name, type_version=thermal.version), 2)
    for n in range(25):
        catalog.create_asset(Asset(id=f"zone-{n:02d}", tenant="acme", type_name=thermal.name,
                                   type_version=thermal.version, relationships=[Relationship(kind="part_of",
                                                                                             target="site")]), 3 + n)
    with pytest.raises(Conflict, match="remove their relationships to it") as refused:
        catalog.delete_asset("acme", "site", 28)
    assert refused.value.details == [{"assets": [f"zone-{n:02d}" for n in range(20)], "count": 25}]
    with pytest.raises(Conflict, match="or delete them first") as refused:
        catalog.check_delete_type("acme", thermal.name, thermal.version)
    assert refused.value.details == [{"assets": ["site", *(f"zone-{n:02d}" for n in range(19))], "count": 26}]


def test_an_etag_read_before_a_restore_of_the_store_never_matches_other_content_under_its_revision(tmp_path):
    """The store is copied with asset zone at revision 2; the service writes revision 3 (a client reads its ETag),
    then the copy is restored and another write gets revision 3 again. Before, both ETags were "3", so the
    client's If-Match succeeded against content it never saw; now the ETag names the content too: 412, while the
    ETag of what the restored store holds matches. Twin states alike: one revision, other states, other ETags."""
    import shutil

    thermal = AssetType.from_model(THERMAL_RC)
    zone = Asset(id="zone", tenant="acme", type_name=thermal.name, type_version=thermal.version)
    live = Catalog(str(tmp_path / "store"))
    live.put_type("acme", thermal, 1)
    live.create_asset(zone, 2)
    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    lost = zone.model_copy(update={"metadata": {"floor": "3"}})
    live.update_asset(lost, 3)
    seen = etag(3, content=lost.model_dump(mode="json"))  # what GET /v1/assets/zone answered
    restored = Catalog(str(tmp_path / "copy"))
    other = zone.model_copy(update={"metadata": {"floor": "4"}})
    restored.update_asset(other, 3)
    with pytest.raises(PreconditionFailed, match="does not match If-Match") as refused:
        restored.update_asset(zone, 4, Precondition(if_match=EntityTags.parse(seen)))
    assert refused.value.details == [{"header": "If-Match", "current_revision": 3}]
    assert restored.get_asset("acme", "zone") == other
    restored.update_asset(zone, 4, Precondition(if_match=EntityTags.parse(etag(3, content=other.model_dump(
        mode="json")))))
    view = {"revision": 5, "state": {"T_in": 293.0}, "std": {"T_in": 0.1}, "event_time": "2026-01-05T12:00:00Z"}
    assert state_etag(view) == state_etag(dict(view)) != state_etag({**view, "state": {"T_in": 294.0}})


def test_a_drift_clear_changes_a_twin_states_etag_so_if_none_match_reads_the_cleared_alarm():
    """A drift clear changes a twin's divergence report, not its revision, state or std: the weak ETag of GET
    .../state and .../divergence stayed the same, so a client holding the alarm's ETag got 304 and kept the alarm."""
    from actors.state import DivergenceReport, TwinState

    def view(drift: bool) -> dict:
        report = DivergenceReport(nis_mean=9.0, nis_last=9.0, residual_mean={}, residual_rms={}, drift=drift,
                                  diverged=False)
        return TwinState(tenant="acme", asset_id="zone-1", model_ref="room@1.0.0", revision=7, event_time=None,
                         state={"T": 1.0}, std={"T": 0.1}, covariance=[[0.01]], divergence=report,
                         events_applied=7).model_dump(mode="json")

    alarm, cleared = state_etag(view(True)), state_etag(view(False))
    assert alarm != cleared and alarm.startswith('W/"7-') and cleared.startswith('W/"7-')
    answer = Response(headers={"ETag": cleared})
    assert Precondition(if_none_match=EntityTags.parse(alarm, weak=True)).read(answer, 7, "the state") is None


def test_retention_deletes_old_directories_and_a_stream_never_skips_what_it_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(changes_module, "PARTITION", 4)
    log = ChangeLog(str(tmp_path), memory=2, retention_s=3600)
    for n in (3, 4, 2):  # one segment each, in directories 0 (1-3), 1 (4-7), 2 (8-9)
        log.record("acme", drafts(n))  # (the first append's retention pass found nothing old enough)
    assert log.store.first_seq("acme") == 1
    later = changes_module.datetime.now(changes_module.UTC) + changes_module.timedelta(hours=2)
    assert log.store.prune("acme", later) == 7  # two hours on, all but the newest directory is past the retention
    assert log.store.first_seq("acme") == 8 and log.store.last_seq("acme") == 9
    assert [c.seq for c in log.store.read("acme", 0, 10)] == [8, 9]
    assert log.store.prune("acme", later) == 0  # the newest directory stays, whatever its age
    log.record("acme", drafts(1))
    assert log.head("acme") == 10 and ChangeLog(str(tmp_path)).head("acme") == 10  # the sequence goes on

    async def resume_from(after: int) -> dict:
        backend = LocalBackend(log)
        stream = sse_changes(backend, log.store, HeadWatcher(backend, poll_s=0.01), "acme", after,
                             ids(log, after)[0], log.read("acme", after, 5), ChangeFilter(), 5,
                             key_credential(tmp_path)[0])
        return parse(await take(stream, 1))[0]

    gone = asyncio.run(resume_from(2))  # changes 3..7 were deleted: said, not skipped
    assert gone["event"] == "gone" and gone["id"] is None
    assert gone["data"]["last_event_id"] == ids(log, 2)[0] and gone["data"]["oldest"] == 8
    assert asyncio.run(resume_from(7))["id"] == ids(log, 8)[0]  # from the oldest kept change on: resumed as usual


def test_a_resume_point_from_before_a_restore_of_the_store_is_refused_not_skipped_past(tmp_path):
    """The store is copied at change 5, the service goes on to 10 (a client keeps event id 8), then the copy is
    restored: the log continues from 5 and its new changes 6..10 reuse the numbers. Before, resuming after 8 was
    accepted and skipped the new 9 and 10 (and resumed after content the client never saw); now that id, and one
    ahead of the restored log, are refused (410, saying where the log is now), while ids of changes the copy holds,
    across an ordinary restart too, resume as before."""
    import shutil

    live = ChangeLog(str(tmp_path / "store"))
    live.record("acme", drafts(5))
    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    live.record("acme", drafts(5, asset="lost"))
    seen, ahead = ids(live, 8, 10)
    restored = ChangeLog(str(tmp_path / "copy"))
    restored.record("acme", drafts(5, asset="new"))
    assert restored.generation != live.generation and restored.head("acme") == 10

    def resume(log: ChangeLog, after: int, given: str | None) -> str:
        return asyncio.run(resume_point(LocalBackend(log), log.store, "acme", after, given, log.head("acme")))

    for stale in (seen, ahead):
        with pytest.raises(Gone, match="restored from an earlier copy") as refused:
            resume(restored, 8, stale)
        assert refused.value.details[0]["head"] == ids(restored, 10)[0]
    assert resume(restored, 4, ids(live, 4)[0]) == ids(live, 4)[0]  # in the copy: the same change
    assert resume(restored, 8, "8") == ids(restored, 8)[0]  # a plain number: unchecked, as before generations
    with pytest.raises(Unprocessable, match="ahead of this tenant's change log"):
        resume(restored, 11, "11")
    assert resume(ChangeLog(str(tmp_path / "store")), 8, seen) == seen  # a restart is not a restore


def test_a_segment_that_reaches_into_the_next_directory_is_read_from_any_point_inside_it(tmp_path, monkeypatch):
    """A group commit's segment lies in the directory of its first change: resuming inside it, past the
    directory boundary, reads the rest of it (it was skipped, and a stream called the changes deleted)."""
    monkeypatch.setattr(changes_module, "PARTITION", 4)
    log = ChangeLog(str(tmp_path), memory=1)
    for n in (2, 3, 2, 3):  # 1-2 and 3-5 in directory 0 (the latter reaching into 1's numbers), 6-7, 8-10
        log.record("acme", drafts(n))
    for after in range(0, 10):
        assert [c.seq for c in log.store.read("acme", after, 20)] == list(range(after + 1, 11)), after
    assert log.store.first_seq("acme") == 1


def test_open_streams_are_bounded_per_replica_and_tenant_and_freed_however_they_end():
    """Streams hold request slots for hours: one reader's ~130 idle streams hung every request of every tenant.
    A replica keeps slots for requests (config refuses max_streams >= max_ongoing_requests)."""
    import gc

    from serve_apps.admission import Admission
    from serve_apps.config import ServeConfig
    from serve_apps.errors import RateLimited
    from serve_apps.stream_slots import StreamSlots, StreamsOverloaded

    async def frames():
        yield "id: 1\n\n"
        yield "id: 2\n\n"

    slots = StreamSlots(Admission(max_streams=3, max_streams_per_tenant=2, retry_after_s=2))

    async def scenario() -> None:
        a1, a2 = slots.hold("acme", frames()), slots.hold("acme", frames())
        with pytest.raises(RateLimited, match="your tenant has 2 change streams open on this replica") as limited:
            slots.hold("acme", frames())
        assert limited.value.headers == {"Retry-After": "2"}
        b1 = slots.hold("globex", frames())
        with pytest.raises(StreamsOverloaded, match="3 change streams open, its limit") as full:
            slots.hold("initech", frames())
        assert (full.value.status, full.value.code) == (503, "overloaded")
        assert [f async for f in a1] == ["id: 1\n\n", "id: 2\n\n"]  # ended: its slot is free
        assert slots.open == {"acme": 1, "globex": 1}
        await anext(b1)
        await b1.aclose()  # the client went away mid-stream
        del a2  # dropped before its first frame
        gc.collect()
        assert not slots.open

    asyncio.run(scenario())
    with pytest.raises(ValueError, match=r"admission.max_streams \(32\) must be below autoscaling.max_ongoing"):
        ServeConfig(store_url="s", keys_file="k", admission={"max_streams": 32})


def test_a_stream_checks_its_key_once_per_interval_and_refuses_as_a_new_request_would(tmp_path):
    """The key was checked only when the stream connected. Now each interval's check answers what a new request with
    the key would get: 401 once revoked, 503 while the keys file cannot be read; 403 for a key moved to another
    tenant (its event ids were the old tenant's) or below the stream's role."""
    now = [0.0]
    credential, keys_file, audited = key_credential(tmp_path, clock=lambda: now[0])

    async def ended_at(t: float) -> ApiError | None:
        now[0] = t
        return await credential.ended()

    assert asyncio.run(ended_at(STREAM_AUTH_RECHECK_S)) is None  # still valid
    revoke_key(keys_file, credential.who.key_id)
    assert asyncio.run(ended_at(1.9 * STREAM_AUTH_RECHECK_S)) is None  # checked less than an interval ago
    revoked = asyncio.run(ended_at(2 * STREAM_AUTH_RECHECK_S))
    assert (revoked.status, revoked.code) == (401, "unauthorized") and revoked.headers["WWW-Authenticate"] == "Bearer"
    assert "revoked" in revoked.message and audited == [revoked]

    def edited(credential: StreamCredential, **change: str) -> ApiError | None:
        (record,) = [r for r in load_keys(keys_file) if r.key_id == credential.who.key_id]
        others = [r for r in load_keys(keys_file) if r.key_id != credential.who.key_id]
        keys_file.write_text(json.dumps([r.model_dump(mode="json") for r in [*others, record.model_copy(
            update=change)]]))
        return credential.refusal()

    moved = edited(key_credential(tmp_path)[0], tenant="globex")
    assert (moved.status, moved.code) == (403, "forbidden") and "moved from tenant 'acme'" in moved.message
    writer = key_credential(tmp_path, "writer")[0]
    lowered = edited(writer, role="reader")
    assert lowered.status == 403 and "role 'reader' may not do this (needs writer)" in lowered.message
    keys_file.write_text("[{")  # a hand edit's typo: no key can be checked, none goes on
    broken = writer.refusal()
    assert (broken.status, broken.code) == (503, "unavailable")


def test_an_idle_stream_wakes_to_check_its_key_and_ends_with_an_error_event(tmp_path, caplog):
    """An idle stream waited `HEARTBEAT_S` (15 s) for its tenant's log, checking nothing: it wakes every interval
    now, sends its keep-alive no more often than before, and ends within an interval of the revocation."""

    async def scenario() -> tuple[list[dict], float, float, list[ApiError]]:
        log = ChangeLog(str(tmp_path / "changes"))
        backend = LocalBackend(log)
        credential, keys_file, audited = key_credential(tmp_path, recheck_s=0.05)
        stream = sse_changes(backend, log.store, HeadWatcher(backend, poll_s=0.01), "acme", 0, "0",
                             log.read("acme", 0, 5), ChangeFilter(), 5, credential, heartbeat_s=0.3)
        assert await anext(stream) == "id: 0\n\n"
        t0 = time.monotonic()
        assert await anext(stream) == ": keep-alive\n\n"  # one per heartbeat, though it woke every 0.05 s
        quiet = time.monotonic() - t0
        revoke_key(keys_file, credential.who.key_id)
        revoked = time.monotonic()
        async with asyncio.timeout(20 * credential.recheck_s):  # without the check: keep-alives forever
            frames = [f async for f in stream]
        return parse(frames), quiet, time.monotonic() - revoked, audited

    with caplog.at_level(logging.WARNING, logger="raytwin.serve.auth"):
        frames, quiet, took, audited = asyncio.run(scenario())
    assert quiet >= 0.3 and took < 1.0
    (end,) = frames
    assert end["event"] == "error" and end["id"] is None
    assert end["data"]["status"] == 401 and end["data"]["error"]["code"] == "unauthorized"
    assert end["data"]["error"]["request_id"] == "r-1" and "revoked" in end["data"]["error"]["message"]
    assert [a.code for a in audited] == ["unauthorized"]
    assert "event=stream_ended_by_auth stream=change_stream" in caplog.text


def test_a_revoked_key_ends_its_open_change_stream_over_http_and_the_sdk_raises(tmp_path, monkeypatch, caplog):
    """An outside tester's find: a key revoked while its stream was open kept receiving its tenant's changes for as
    long as the stream stayed open (`/v1/health` with it answered 401 at once). Now no change reaches it later than
    `STREAM_AUTH_RECHECK_S` (1 s here, not 2: each stream waits it out) after the revocation, though another key
    keeps changing the tenant; the stream ends with an `error` event of the 401 a new request gets, logged and
    audited; the SDK raises it, not reconnecting."""
    import functools

    import serve_apps.deps as deps
    from client import RayTwinClient
    from client.errors import Unauthorized
    from tests.fixtures_http import served
    from tests.fixtures_serve import in_process_app

    recheck_s = 1.0
    monkeypatch.setattr(deps, "StreamCredential", functools.partial(StreamCredential, recheck_s=recheck_s))
    backend = ChangeLogBackend(ChangeLog(str(tmp_path / "changes")))
    app, auth = in_process_app(backend, tmp_path)
    svc = app.state.services
    svc.changes, svc.change_store = HeadWatcher(svc.backend, poll_s=0.01), backend.log.store
    keys = {name: headers["Authorization"].split()[1] for name, headers in auth.items()}
    key_ids = {name: svc.keys.authenticate(key).key_id for name, key in keys.items()}
    slack_s = 2.0  # from the server's decision to the client's read, on a busy machine
    stop = threading.Event()

    def keep_changing(base: str) -> None:  # the admin key updates pump-1 every 50 ms
        with httpx.Client(base_url=base, timeout=30.0) as admin:
            n = 0
            while not stop.is_set():
                body = {"type_name": "thermal_rc", "type_version": "1.0.0", "metadata": {"n": str(n)}}
                assert admin.put("/v1/assets/pump-1", json=body, headers=auth["admin"]).status_code == 200
                n += 1
                time.sleep(0.05)

    with served(app) as base, ThreadPoolExecutor(1) as pool, caplog.at_level(logging.WARNING):
        changing = pool.submit(keep_changing, base)
        try:
            with httpx.Client(base_url=base, timeout=30.0) as http:
                with http.stream("GET", "/v1/changes", headers=auth["reader"]) as stream:
                    assert stream.status_code == 200
                    events = iter_events(stream)
                    assert next(events)[1]["event"] == "asset.updated"  # the stream delivers
                    revoke_key(tmp_path / "keys.json", key_ids["reader"])
                    revoked = time.monotonic()
                    assert http.get("/v1/health", headers=auth["reader"]).status_code == 401
                    after = []
                    for at, event in events:  # until it ends, or long past the bound (without the check: forever)
                        after.append((at, event))
                        if at - revoked > 3 * recheck_s:
                            break
                request_id = stream.headers["x-raytwin-request-id"]
                with RayTwinClient(base, keys["writer"]) as sdk:
                    follow = sdk.changes()
                    assert next(follow).kind == "asset.updated"
                    revoke_key(tmp_path / "keys.json", key_ids["writer"])
                    sdk_revoked = time.monotonic()
                    with pytest.raises(Unauthorized, match="revoked .* while this stream was open") as raised:
                        for _ in follow:
                            if time.monotonic() - sdk_revoked > 3 * recheck_s:
                                break
                    sdk_took = time.monotonic() - sdk_revoked
        finally:
            stop.set()
        changing.result()
    *delivered, (ended, end) = after
    assert end["event"] == "error" and end["data"]["status"] == 401
    assert end["data"]["error"]["code"] == "unauthorized" and end["data"]["error"]["request_id"] == request_id
    assert ended - revoked < recheck_s + slack_s
    assert all(at - revoked < recheck_s + slack_s for at, _ in delivered)
    last = max([int(e["id"].split("-")[0]) for _, e in delivered] or [0])
    assert backend.log.head("acme") > last + 5  # changes went on after the stream's last one, and did not reach it
    assert raised.value.status == 401 and sdk_took < recheck_s + slack_s
    ends = [r for r in svc.audit.records("acme") if r.action == "change_stream.end"]
    assert sorted(r.key_id for r in ends) == sorted([key_ids["reader"], key_ids["writer"]])
    assert all((r.details["http_status"], r.details["code"]) == (401, "unauthorized") for r in ends)
    assert f"key_id={key_ids['reader']} tenant=acme status=401" in caplog.text


def test_a_revoked_key_ends_its_file_downloads_mid_transfer_and_the_sdk_raises_unauthorized(tmp_path, monkeypatch,
                                                                                            caplog):
    """File downloads checked their key at the start only: a key revoked while it downloaded a large run or job file
    kept receiving it to the end. Now a download checks its key as a change stream does, every
    `STREAM_AUTH_RECHECK_S` (0.2 s here; the client's disk paced so that the whole file would take many of them):
    once revoked, the server cuts the connection, and the SDK's resend gets the 401 and raises `Unauthorized` (not
    `CorruptDownload`), with nothing written; the end is logged and audited as ``file_download.end``."""
    import functools
    import random

    import serve_apps.deps as deps
    from client import RayTwinClient
    from client.downloads import CHUNK_BYTES, StreamedFile
    from client.errors import Unauthorized
    from tests.fixtures_http import served
    from tests.fixtures_serve import JobFiles, in_process_app, saved_run, succeeded_job

    recheck_s = 0.2
    monkeypatch.setattr(deps, "StreamCredential", functools.partial(StreamCredential, recheck_s=recheck_s))
    data = random.Random(5).randbytes(40 * CHUNK_BYTES)
    run_id = "calibration-20261205T150000Z-1a2b3c4d"
    saved_run(tmp_path / "store" / "runs" / "acme", run_id, {"search/part-000000.parquet": data})
    app, auth = in_process_app(JobFiles(tmp_path, succeeded_job(tmp_path, {"part-000000.parquet": data},
                                                                recorded=False)), tmp_path)
    svc = app.state.services
    keys = {name: headers["Authorization"].split()[1] for name, headers in auth.items()}
    written: list[int] = []
    revoking: list[str] = []
    revoked_at: list[float] = []
    write = StreamedFile.write

    def slow_disk(self: StreamedFile, chunk: bytes) -> None:  # 50 ms a MiB: the whole file would take 2 s
        write(self, chunk)
        written.append(len(chunk))
        if len(written) == 2:  # mid-download: the key is revoked
            revoke_key(tmp_path / "keys.json", svc.keys.authenticate(revoking[0]).key_id)
            revoked_at.append(time.monotonic())
        time.sleep(0.05)

    monkeypatch.setattr(StreamedFile, "write", slow_disk)
    downloads = (("reader", lambda sdk, target: sdk.download_run_file(run_id, "search/part-000000.parquet", target)),
                 ("writer", lambda sdk, target: sdk.download_job_file("j1", "part-000000.parquet", target)))
    with served(app) as base, caplog.at_level(logging.WARNING):
        for name, download in downloads:
            written.clear(), revoking.clear(), revoked_at.clear()
            revoking.append(keys[name])
            target = tmp_path / f"{name}.parquet"
            with RayTwinClient(base, keys[name]) as sdk, pytest.raises(Unauthorized, match="unknown API key") as err:
                download(sdk, target)
            took = time.monotonic() - revoked_at[0]
            assert err.value.status == 401 and sum(written) < len(data) / 2, (name, sum(written), took)
            assert took < 10 * recheck_s + 1.0, took  # the rest of the file would have taken 1.9 s
            assert not target.exists() and not list(tmp_path.glob(".*.part"))
    ends = [r for r in svc.audit.records("acme") if r.action == "file_download.end"]
    assert sorted(r.target for r in ends) == sorted([f"/v1/runs/{run_id}/files/search/part-000000.parquet",
                                                     "/v1/jobs/j1/files/part-000000.parquet"])
    assert all((r.details["http_status"], r.details["code"]) == (401, "unauthorized") for r in ends)
    assert "event=stream_ended_by_auth stream=file_download" in caplog.text


def iter_events(response: httpx.Response):
    """(monotonic time received, event) for each frame with an `event:` line of an open SSE response."""
    frame: dict = {}
    for line in response.iter_lines():
        if line == "":
            if "event" in frame:
                yield time.monotonic(), frame
            frame = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            frame[key] = json.loads(value) if key == "data" else value


DISK_FULL = OSError(28, "No space left on device")


def _failing_writes(log: ChangeLog, failures: list[Exception], landed: bool = False) -> None:
    """Make the log's segment writes raise `failures` in turn (one per write), then write again (the store is back).
    Raised by the store's filesystem, under the storage layer, as a disk's errors are (`replace_file` raises them as
    `StoreIOError`); `landed`: after the segment was written (a timeout after the store took the PUT). Its checkpoints
    of recorded marks are written."""
    fs = log.store.fs

    class Failing:
        def pipe_file(self, path, data, **kwargs):
            if landed:
                fs.pipe_file(path, data, **kwargs)
            if failures and path.endswith(".jsonl"):
                raise failures.pop()
            if not landed:
                fs.pipe_file(path, data, **kwargs)

        def __getattr__(self, name):
            return getattr(fs, name)

    log.store.fs = Failing()


def test_a_change_whose_write_failed_is_written_first_with_the_next_append_or_a_flush(tmp_path):
    """A full disk failed the change-log write after the shard applied a batch: the change was dropped, and the
    client's resend (all duplicates) recorded none, so the stream never had that state change."""
    log = ChangeLog(str(tmp_path))
    failures = [DISK_FULL]
    _failing_writes(log, failures)
    with pytest.raises(OSError, match="No space left"):
        log.record("acme", drafts(2, asset="a"))
    assert log.head("acme") == 0 and log.unwritten() == 2
    log.flush(["acme"])  # the store takes writes again (a resend, the backend's retry pass)
    assert log.unwritten() == 0 and [(c.seq, c.data["k"]) for c in log.store.read("acme", 0, 10)] == [(1, 0), (2, 1)]

    failures.append(DISK_FULL)
    with pytest.raises(OSError):
        log.record("acme", drafts(1, asset="b"))
    changed = log.write("acme", lambda seq: [{"kind": "asset.updated", "asset_id": "c", "data": {"rev": seq}}])
    assert [(c.seq, c.revision, c.data["rev"]) for c in changed] == [(4, 4, 4)]  # the kept change went first
    stored = log.store.read("acme", 0, 10)
    assert [(c.seq, c.asset_id) for c in stored] == [(1, "a"), (2, "a"), (3, "b"), (4, "c")]  # none lost nor doubled


def test_a_change_write_that_failed_after_it_landed_is_read_once_and_keeps_its_number(tmp_path):
    """A segment write that raised after the store took it (a timeout after the PUT landed; a folder sync failing
    after the rename): its changes were written again renumbered with the next append, so the store held them twice
    and every reader of it (a stream replaying history, a restarted backend) got them twice; a catalog change's
    segment was replaced by the next change under its number (lost, and a reader that had read it skipped the next)."""
    log = ChangeLog(str(tmp_path))
    failures = [TimeoutError("read timeout")]
    _failing_writes(log, failures, landed=True)
    with pytest.raises(OSError, match="read timeout"):
        log.record("acme", drafts(2, asset="a"))
    log.record("acme", drafts(1, asset="b"))
    failures.append(TimeoutError("read timeout"))
    with pytest.raises(OSError, match="read timeout"):
        log.write("acme", lambda seq: [{"kind": "asset.updated", "asset_id": "c", "data": {"rev": seq}}])
    (d,) = log.write("acme", lambda seq: [{"kind": "asset.updated", "asset_id": "d", "data": {"rev": seq}}])
    expected = [(1, "a", 1), (2, "a", 2), (3, "b", 3), (4, "c", 4), (5, "d", 5)]
    assert d.seq == d.data["rev"] == 5 and log.head("acme") == 5 and log.unwritten() == 0
    for read in (log.store.read, ChangeLog(str(tmp_path)).store.read):
        assert [(c.seq, c.asset_id, c.revision) for c in read("acme", 0, 10)] == expected
    assert [(c.seq, c.asset_id, c.revision) for c in log.read("acme", 0, 10).changes] == expected  # the ring

    log.store.write("acme", log.store.read("acme", 2, 2))  # a segment an older version wrote again: 3-4 beside 3-3
    assert [c.seq for c in log.store.read("acme", 0, 10)] == [1, 2, 3, 4, 5]  # each change read once


class _Shard:
    """A stand-in for the twin shards, holding twin zone-3: applies the events it has not seen (its revision counts
    them) and counts the others as duplicates; `calls` counts the batches it was sent; `drift`: its drift flag."""

    def __init__(self) -> None:
        self.seen: set = set()
        self.calls = 0
        self.drift = False

    def assets(self, tenant, timeout_s=None):
        return ["zone-3"]

    def states(self, tenant, asset_ids, timeout_s=None):
        return [self.state(tenant, a) for a in asset_ids if a == "zone-3"]

    def marks(self, tenant, timeout_s=None):
        return {"zone-3": (len(self.seen), self.drift)}

    def ingest(self, tenant, events, states=False):
        from actors.state import IngestReport

        self.calls += 1
        new = {e.key for e in events} - self.seen
        self.seen |= new
        if not new:
            return IngestReport(duplicates=len(events))
        return IngestReport(accepted=len(new), duplicates=len(events) - len(new), states=[self.state(tenant, "zone-3")])

    def state(self, tenant, asset_id, timeout_s=None):
        return _thermal("zone-3", len(self.seen), self.drift)


def _batch(n: int, first: int = 0) -> list:
    """`n` events of twin zone-3 (the stand-in shard reads no more of them than their keys)."""
    from types import SimpleNamespace

    return [SimpleNamespace(asset_id="zone-3", key=k) for k in range(first, first + n)]


def _backend_over(shard: _Shard, log: ChangeLog):
    """`Backend.apply` over the stand-in shard and `log`."""
    from types import SimpleNamespace

    from serve_apps.backend import Backend
    from serve_apps.twin_writes import TwinWrites

    backend = Backend.__new__(Backend)
    backend._publish, backend._twin_marks, backend.changes, backend.twins = threading.Lock(), {}, log, shard
    backend._applying, backend._twin_writes = Counter(), TwinWrites()
    backend.jobs, backend._started = SimpleNamespace(ended=[], jobs={}), None  # no job to catch up
    backend.config = SimpleNamespace(shard_read_timeout_s=5.0, shard_write_timeout_s=15.0)
    backend.recalibration = SimpleNamespace(trigger=SimpleNamespace(waiting=lambda tenant: False,
                                                                    poll=lambda tenant: None))
    return backend


class _Passes(threading.Event):
    """A `Backend._watch_stop` for `Backend._follow_changes`: `passes` waits that return at once, then closed."""

    def __init__(self, passes: int) -> None:
        super().__init__()
        self.left = passes

    def wait(self, timeout: float | None = None) -> bool:
        self.left -= 1
        if self.left < 0:
            self.set()
        return self.is_set()


def _twin_changes(log: ChangeLog) -> list[tuple]:
    """(kind, revision, drift) of each change of tenant acme on the store, oldest first."""
    return [(c.kind, c.revision, c.data.get("drift")) for c in log.store.read("acme", 0, 100)]


def test_a_batch_applied_before_its_change_write_failed_answers_503_and_its_resend_records_the_change(tmp_path):
    """`Backend.apply` over a stand-in for the shards: the change write fails once after the batch was applied."""
    from actors.state import IngestReport
    from serve_apps.store_errors import StoreUnavailable

    backend = _backend_over(_Shard(), ChangeLog(str(tmp_path)))
    _failing_writes(backend.changes, [DISK_FULL])
    events = _batch(20)
    with pytest.raises(StoreUnavailable, match="events were applied, but their change record was not written") as e:
        backend.apply("acme", events)
    assert "disk is full" in e.value.message and e.value.headers["Retry-After"] == "5"
    assert backend.apply("acme", events) == IngestReport(duplicates=20).model_dump(mode="json", exclude={"states"})
    recorded = backend.changes.store.read("acme", 0, 10)
    assert [(c.kind, c.asset_id, c.revision) for c in recorded] == [("twin.state", "zone-3", 20)]


def test_a_tenants_telemetry_is_refused_while_too_many_of_its_changes_wait_for_a_failed_write(tmp_path):
    """A change kept after a failed change-log write lives in the backend's memory only, and each batch applied
    while the store failed kept one more, without bound. Once `max_unwritten` wait, the tenant's batches are
    refused (503) before the shards apply them, until the kept changes are written."""
    from serve_apps.store_errors import StoreUnavailable

    shard = _Shard()
    backend = _backend_over(shard, ChangeLog(str(tmp_path), max_unwritten=2))
    _failing_writes(backend.changes, [DISK_FULL] * 3)
    for first in (0, 10):  # applied, their changes kept
        with pytest.raises(StoreUnavailable, match="events were applied, but their change record was not written"):
            backend.apply("acme", _batch(10, first))
    with pytest.raises(StoreUnavailable, match="2 changes of tenant acme wait for the change log's write") as e:
        backend.apply("acme", _batch(10, 20))
    assert shard.calls == 2 and e.value.headers["Retry-After"] == "5"  # refused before the shards were sent it
    assert "full disk" in e.value.message and "nothing of it applied" in e.value.message
    backend.changes.check_room("globex")  # another tenant's telemetry goes on
    backend._flush_changes()  # the store watch's pass: the store still fails
    backend._flush_changes()  # it takes writes again
    backend.apply("acme", _batch(10, 20))
    recorded = backend.changes.store.read("acme", 0, 10)
    assert [(c.seq, c.revision) for c in recorded] == [(1, 10), (2, 20), (3, 30)]  # none lost nor doubled


def test_a_change_kept_by_a_backend_that_crashed_is_recorded_once_by_the_next_backend(tmp_path):
    """A batch applied while the change-log write failed (kept in memory) raised the twin's drift flag; the backend
    crashed before the store took writes again. The next backend seeded its marks from the twin's current state,
    so the state and the drift alarm (which the recalibration trigger reads) never reached the log."""
    from serve_apps.store_errors import StoreUnavailable

    shard = _Shard()
    crashed = _backend_over(shard, ChangeLog(str(tmp_path)))
    crashed.apply("acme", _batch(10))  # recorded
    _failing_writes(crashed.changes, [DISK_FULL, DISK_FULL])
    shard.drift = True
    with pytest.raises(StoreUnavailable, match="events were applied"):
        crashed.apply("acme", _batch(10, 10))  # applied, its changes kept; then the backend is gone, no flush
    assert crashed.changes.unwritten() == 2

    restarted = _backend_over(shard, ChangeLog(str(tmp_path)))
    restarted._catch_up("acme")
    restarted._catch_up("acme")  # a retry of the pass records nothing more
    restarted.apply("acme", _batch(5, 20))
    assert _twin_changes(restarted.changes) == [("twin.state", 10, False), ("twin.state", 20, True),
                                                ("twin.drift", 20, True), ("twin.state", 25, True)]


def test_a_connectors_readings_are_recorded_by_the_backends_pass_once_and_not_while_it_is_fenced(tmp_path):
    """A connector's readings reach the shards without the backend's ingest call, which records telemetry's changes:
    a twin fed by a device showed no twin.state nor twin.drift on the change stream until the backend's next start.
    The backend's pass over the tenants with a connector records them once, reading the states of moved twins only;
    nothing while another service holds the store, and nothing of a twin an API batch is applied to meanwhile (that
    call records it, and answers only once its change is on the store)."""
    from types import SimpleNamespace

    from raytwin.statestore import StoreFenced

    shard = _Shard()
    backend = _backend_over(shard, ChangeLog(str(tmp_path)))
    backend.apply("acme", _batch(10))  # through the API: recorded with its call
    assert not backend._applying
    read, states = [], shard.states
    shard.states = lambda tenant, ids, timeout_s: read.append(list(ids)) or states(tenant, ids)
    shard.seen |= set(range(10, 15))  # a connector's batch, applied by the shards directly, raised the drift flag
    shard.drift = True

    def fenced() -> None:
        raise StoreFenced("another service holds the store")

    backend.check_writable = fenced
    backend._record_connector_changes({"acme"})
    assert _twin_changes(backend.changes) == [("twin.state", 10, False)] and read == []
    backend.check_writable = lambda: None
    backend._applying[("acme", "zone-3")] += 1  # an API batch of the twin in flight
    backend._record_connector_changes({"acme"})
    assert _twin_changes(backend.changes) == [("twin.state", 10, False)] and read == [["zone-3"]]
    backend._applying.clear()
    backend._record_connector_changes({"acme"})
    backend._record_connector_changes({"acme"})  # nothing moved since: nothing recorded, no state read
    assert _twin_changes(backend.changes) == [("twin.state", 10, False), ("twin.state", 15, True),
                                              ("twin.drift", 15, True)]
    assert read == [["zone-3"]] * 2


def test_the_backends_connector_pass_asks_rays_gcs_for_the_tenants_every_ten_seconds_not_every_second(tmp_path,
                                                                                                        monkeypatch):
    """The pass runs every second on every backend: it listed every named actor of the cluster (a GCS call) at each
    one, connectors or not. It asks once per `CONNECTOR_TENANTS_S`, keeps the tenants found while the GCS does not
    answer, and asks no shard while no tenant has a connector."""
    from types import SimpleNamespace

    shard = _Shard()
    shard.router = SimpleNamespace(namespace="raytwin")
    backend = _backend_over(shard, ChangeLog(str(tmp_path)))
    backend._catch_up_changes, backend.check_writable = lambda tenants, jobs_done: [], lambda: None
    asked, marked, found = [], [], [set(), {"acme"}, RuntimeError("GCS down"), {"acme"}]

    def listing(namespace: str) -> set[str]:
        asked.append(namespace)
        answer = found[min(len(asked), len(found)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    marks = shard.marks
    shard.marks = lambda tenant, timeout_s=None: marked.append(tenant) or marks(tenant, timeout_s)
    monkeypatch.setattr("serve_apps.backend.connector_tenants", listing)
    backend._watch_stop = _Passes(25)
    backend._follow_changes([])
    assert asked == ["raytwin"] and marked == []  # 25 passes well within 10 s: one question, no tenant, no shard
    monkeypatch.setattr("serve_apps.backend.CONNECTOR_TENANTS_S", 0.0)
    backend._watch_stop = _Passes(25)
    backend._follow_changes([])
    assert len(asked) == 1 + 25 and marked == ["acme"] * 25  # the GCS failing once: the tenants found before kept


def test_a_twin_batch_applied_before_a_takeover_is_recorded_by_the_successors_catch_up_not_the_fenced_backend(
        tmp_path):
    """A batch its shards applied right before another service took the store over: the fenced backend's change write
    is refused (503 `store_fenced`), and the successor's catch-up records the twin's state once."""
    from raytwin.statestore import StoreFenced

    taken: list[str] = []

    def fence(fresh: bool = False) -> None:
        if taken:
            raise StoreFenced(taken[0])

    shard = _Shard()
    fenced = _backend_over(shard, ChangeLog(str(tmp_path), fence=fence))
    fenced.apply("acme", _batch(10))
    taken.append("service b (epoch 2) took the store over")
    with pytest.raises(StoreFenced, match="took the store over"):
        fenced.apply("acme", _batch(5, 10))
    successor = _backend_over(shard, ChangeLog(str(tmp_path)))
    successor._catch_up("acme")
    successor._catch_up("acme")  # a retry of the pass records nothing more
    fenced._flush_changes()
    assert _twin_changes(successor.changes) == [("twin.state", 10, False), ("twin.state", 15, False)]
    assert [c.generation for c in successor.changes.store.read("acme", 0, 10)] == [fenced.changes.generation,
                                                                                  successor.changes.generation]


def test_a_backend_restarted_over_a_clean_log_catches_up_nothing(tmp_path):
    """Every change recorded (a drift raised, then cleared: its twin.drift at the same revision): the next backend's
    catch-up pass and the twin's next batch duplicate none of them."""
    shard = _Shard()
    first = _backend_over(shard, ChangeLog(str(tmp_path)))
    first.apply("acme", _batch(10))
    shard.drift = True
    first.apply("acme", _batch(10, 10))
    shard.drift = False
    first.twins.clear_drift = lambda tenant, asset_id, timeout_s: shard.state(tenant, asset_id)
    first.get_asset = lambda tenant, asset_id: None
    first.clear_drift("acme", "zone-3")
    recorded = [("twin.state", 10, False), ("twin.state", 20, True), ("twin.drift", 20, True),
                ("twin.drift", 20, False)]
    assert _twin_changes(first.changes) == recorded

    restarted = _backend_over(shard, ChangeLog(str(tmp_path)))
    restarted._catch_up("acme")
    restarted.apply("acme", _batch(10))  # a resend: duplicates
    assert _twin_changes(restarted.changes) == recorded
    restarted.apply("acme", _batch(1, 20))
    assert _twin_changes(restarted.changes) == [*recorded, ("twin.state", 21, False)]


def test_recorded_marks_come_from_the_checkpoint_and_the_log_after_it(tmp_path, monkeypatch):
    """The marks are checkpointed (a failed checkpoint write is retried, the appends go on) and read back with the
    changes after the checkpoint only; a checkpoint not of the log (a store restored from a copy) is not used, nor
    is a log without one (a store from before the marks): their twins' current states are adopted instead."""
    def twin(asset: str, revision: int, drift: bool, kind: str = "twin.state") -> dict:
        return {"kind": kind, "asset_id": asset, "revision": revision, "data": {"drift": drift}}

    log = ChangeLog(str(tmp_path))
    log.record("acme", [twin("a", 3, False), twin("b", 5, True), twin("b", 5, True, "twin.drift")])
    def disk_full(*args) -> None:
        raise DISK_FULL

    write_marks = log.store.write_marks
    monkeypatch.setattr(log.store, "write_marks", disk_full)
    log.checkpoint(force=True)  # fails: logged, kept for the next pass
    monkeypatch.setattr(log.store, "write_marks", write_marks)
    log.record("acme", [twin("a", 4, False)])
    log.checkpoint(force=True)
    log.record("acme", [twin("c", 1, True), {"kind": "asset.deleted", "asset_id": "b"}])  # after the checkpoint
    saved = log.store.read_marks("acme")
    assert (saved["seq"], saved["twins"]) == (4, {"a": [4, False], "b": [5, True]})

    read = []
    store_read = log.store.read
    restarted = ChangeLog(str(tmp_path))
    monkeypatch.setattr(restarted.store, "read", lambda *args: read.append(args[1]) or store_read(*args))
    assert restarted.recorded("acme") == {"a": (4, False), "c": (1, True)}
    assert restarted.recorded_mark("acme", "d") == (0, False)  # no change recorded since its creation
    assert min(read) == 3  # the checkpoint's change (seq 4) and after it only

    other = tmp_path / "other"  # the checkpoint of a log whose head the restored copy does not hold
    other_log = ChangeLog(str(other))
    other_log.record("acme", [twin("a", 1, False)])
    (other / "acme" / ".recorded.json").write_text(json.dumps({"seq": 1, "generation": "0ther", "twins": {}}))
    legacy = ChangeLog(str(other))
    assert legacy.recorded("acme") is None and legacy.recorded_mark("acme", "a") is None
    legacy.adopt("acme", {"a": (7, True)})
    legacy.checkpoint()
    assert ChangeLog(str(other)).recorded("acme") == {"a": (7, True)}


def test_a_twin_whose_state_is_older_than_its_log_records_its_next_batch(tmp_path):
    """A store copied file by file can hold a change log newer than the twins' state: the recorded revision is then
    ahead of the twin's, and its next batches, taken as older than the recorded state, were never recorded."""
    shard = _Shard()
    first = _backend_over(shard, ChangeLog(str(tmp_path)))
    first.apply("acme", _batch(30))
    shard.seen = set(range(10))  # the twin as the copy of its state left it: revision 10, the log's at 30
    restarted = _backend_over(shard, ChangeLog(str(tmp_path)))
    restarted._catch_up("acme")
    restarted.apply("acme", _batch(5, 10))
    assert _twin_changes(restarted.changes) == [("twin.state", 30, False), ("twin.state", 15, False)]


def test_the_catch_up_pass_is_tried_again_while_a_twins_shard_restarts(tmp_path, monkeypatch, caplog):
    """A twin read while its shard restarts is its last durable state, maybe behind: the pass waits for the live one,
    and its warning says it is tried again (every start logged a bare `GetTimeoutError` while shards came up)."""
    from types import SimpleNamespace

    from serve_apps import backend as backend_module
    from serve_apps.store_errors import StoreUnavailable

    monkeypatch.setattr(backend_module, "FENCE_WATCH_S", 0.0)
    monkeypatch.setattr(backend_module, "connector_tenants", lambda namespace: set())
    shard = _Shard()
    crashed = _backend_over(shard, ChangeLog(str(tmp_path)))
    _failing_writes(crashed.changes, [DISK_FULL])
    with pytest.raises(StoreUnavailable):
        crashed.apply("acme", _batch(10))
    restarted = _backend_over(shard, ChangeLog(str(tmp_path)))
    restarted.check_writable, restarted._watch_stop = lambda: None, _Passes(3)
    restarted.twins.router = SimpleNamespace(namespace="raytwin")
    live, reads = shard.state, []
    shard.state = lambda tenant, asset_id: live(tenant, asset_id).model_copy(update={"stale": not reads.append(1)
                                                                                     and len(reads) == 1})
    with caplog.at_level("WARNING", logger="raytwin.serve"):
        restarted._follow_changes(["acme"])
    assert len(reads) == 2 and _twin_changes(restarted.changes) == [("twin.state", 10, False)]
    warned = [r.getMessage() for r in caplog.records if "event=change_catch_up_failed" in r.getMessage()]
    assert len(warned) == 1 and "retry_in_s=0 " in warned[0] and "tried again until it passes" in warned[0]



def test_a_tenant_whose_catch_up_is_retried_holds_back_its_own_connector_changes_only(tmp_path, monkeypatch):
    """The start's catch-up of every tenant ran before the connector pass: one tenant whose shard never came back (its
    catch-up retried) held back the device-fed changes of all tenants. Now the pass records the tenants caught up,
    asks nothing of the stuck one's shards, and tries its catch-up again every `FENCE_WATCH_S`."""
    from types import SimpleNamespace

    from serve_apps import backend as backend_module

    monkeypatch.setattr(backend_module, "FENCE_WATCH_S", 0.0)
    shard = _Shard()
    shard.router = SimpleNamespace(namespace="raytwin")
    backend = _backend_over(shard, ChangeLog(str(tmp_path)))
    backend.apply("acme", _batch(10))
    backend.check_writable, backend._watch_stop = lambda: None, _Passes(3)
    listed, marked, assets = [], [], shard.assets

    def stuck_assets(tenant: str, timeout_s: float | None = None) -> list[str]:
        listed.append(tenant)
        if tenant == "stuck":
            raise TimeoutError("the shard of tenant stuck does not answer")
        return assets(tenant, timeout_s)

    def connected(namespace: str) -> set[str]:  # asked after the start's catch-up: a device's readings arrived since
        shard.seen |= set(range(10, 15))
        return {"acme", "stuck"}

    marks = shard.marks
    shard.assets = stuck_assets
    shard.marks = lambda tenant, timeout_s=None: marked.append(tenant) or marks(tenant, timeout_s)
    monkeypatch.setattr(backend_module, "connector_tenants", connected)
    backend._follow_changes(["acme", "stuck"])
    assert _twin_changes(backend.changes) == [("twin.state", 10, False), ("twin.state", 15, False)]
    assert marked == ["acme"] * 3 and listed == ["acme", "stuck"] + ["stuck"] * 3

class _ShardHandles:
    """Stand-ins for the actor handles of `shards` twin shards holding `twins` (tenant acme): `full_states.remote`
    answers at once (`ray.get` of its answer is itself, `_without_ray`) and `calls[i]` lists the ids each call to
    shard i asked for; shards in `restarting` refuse (`ActorUnavailableError`), those `hung` never answer (every wait
    for them times out). No `state`: a call per twin fails."""

    def __init__(self, shards: int, twins: dict, restarting: frozenset = frozenset(), hung: frozenset = frozenset()):
        from types import SimpleNamespace

        from ray.exceptions import ActorUnavailableError, GetTimeoutError

        def full_states(i: int, tenant: str, ids: list[str]):
            self.calls[i].append(list(ids))
            if i in restarting:
                return ActorUnavailableError("restarting", None)
            if i in hung:
                return GetTimeoutError("Get timed out: some object(s) not ready")
            return [twins[a] for a in ids if tenant == "acme" and a in twins]

        self.calls: list[list[list[str]]] = [[] for _ in range(shards)]
        self.handles = [SimpleNamespace(full_states=SimpleNamespace(remote=lambda t, ids, i=i: full_states(i, t, ids)))
                        for i in range(shards)]


def _without_ray(monkeypatch, shards: _ShardHandles):
    """A `TwinService` over the stand-in handles, `ray.get` answering their answers (raising an error one is)."""
    from types import SimpleNamespace

    from actors.service import TwinService

    def get(ref, timeout=None):
        if isinstance(ref, Exception):
            raise ref
        return ref

    monkeypatch.setattr("actors.service.ray.get", get)
    twins = TwinService.__new__(TwinService)
    twins._shards, twins.router, twins.stale_after_s = shards.handles, SimpleNamespace(shards=len(shards.handles)), 1.0
    return twins


def _thermal(asset_id: str, revision: int, drift: bool = False):
    from actors.state import DivergenceReport, TwinState

    divergence = DivergenceReport(nis_mean=1.0, nis_last=1.0, residual_mean={}, residual_rms={}, drift=drift,
                                  diverged=False)
    return TwinState(tenant="acme", asset_id=asset_id, model_ref="thermal_rc@1.0.0", revision=revision,
                     event_time=None, state={"T": 20.0}, std={"T": 0.1}, covariance=[[0.01]], divergence=divergence,
                     events_applied=revision)


def test_a_hung_shard_fails_the_catch_up_past_the_shard_read_deadline_not_holds_it(tmp_path, monkeypatch):
    """The catch-up read the twins' states (`TwinService.states`) waiting on a live shard however long: one that hung
    after answering its marks held the thread that follows every tenant's changes for good. Past
    `shard_read_timeout_s` it fails (`GetTimeoutError`): its caller logs it and tries again next pass."""
    from ray.exceptions import GetTimeoutError

    from actors.routing import shard_index

    twins = {f"zone-{i}": _thermal(f"zone-{i}", revision=1) for i in range(8)}
    assert {shard_index("acme", a, 2) for a in twins} == {0, 1}
    shards = _ShardHandles(2, twins, hung=frozenset({1}))
    backend = _backend_over(_Shard(), ChangeLog(str(tmp_path)))
    backend.twins = _without_ray(monkeypatch, shards)
    backend.twins.assets = lambda tenant, timeout_s=None: sorted(twins)
    backend.config.shard_read_timeout_s = 0.0  # past at the first wait: no clock in the test
    waits = []

    def restarting(shard) -> bool:  # a hung shard is alive, not restarting
        waits.append(shard)
        assert len(waits) < 3, "the catch-up waits on a hung shard without end"
        return False

    monkeypatch.setattr("actors.service.actor_restarting", restarting)
    with pytest.raises(GetTimeoutError):
        backend._catch_up("acme")
    assert waits == [shards.handles[1]]


def test_the_catch_up_reads_the_twins_in_one_shard_call_per_batch_not_one_per_twin(tmp_path, monkeypatch):
    """A starting backend's catch-up read each twin's state with a shard call of its own: 100,000 calls at 100,000
    twins. It reads them in one call per shard and `STATES_BATCH` twins, and records what it did before: one
    twin.state per twin ahead of the log, a twin.drift with it where the flag differs from the recorded one."""
    from actors.routing import shard_index
    from actors.service import STATES_BATCH

    n = 2 * STATES_BATCH + 500
    twins = {f"zone-{i}": _thermal(f"zone-{i}", revision=1 + i % 3, drift=i % 500 == 0) for i in range(n)}
    shards = _ShardHandles(2, twins)
    backend = _backend_over(_Shard(), ChangeLog(str(tmp_path)))
    backend.twins = _without_ray(monkeypatch, shards)
    backend.twins.assets = lambda tenant, timeout_s=None: sorted(twins)
    backend.changes.record("acme", [{"kind": "twin.state", "asset_id": "zone-1", "revision": 2, "data": {}}])
    backend._catch_up("acme")

    held = [sum(1 for a in twins if shard_index("acme", a, 2) == i) for i in range(2)]
    assert [len(c) for c in shards.calls] == [-(-h // STATES_BATCH) for h in held]  # ceil: 2 calls each, 4 in all
    assert all(len(ids) <= STATES_BATCH for c in shards.calls for ids in c)
    recorded = backend.changes.store.read("acme", 1, 2 * n)
    assert sorted(c.asset_id for c in recorded if c.kind == "twin.state") == sorted(set(twins) - {"zone-1"})
    assert {c.asset_id for c in recorded if c.kind == "twin.drift"} == {f"zone-{i}" for i in range(0, n, 500)}
    assert all(c.revision == twins[c.asset_id].revision for c in recorded)
    backend._catch_up("acme")
    assert backend.changes.head("acme") == 1 + len(recorded)  # a retry records nothing more


def test_a_batched_state_read_of_a_restarting_shard_answers_its_twins_last_durable_states(monkeypatch):
    """`TwinService.states` as `state` answers one twin: the twins of a restarting shard from the store, stale."""
    from actors.routing import shard_index

    twins = {f"z{i}": _thermal(f"z{i}", revision=i) for i in range(20)}
    shards = _ShardHandles(2, twins, restarting=frozenset({1}))
    service = _without_ray(monkeypatch, shards)
    monkeypatch.setattr("actors.service.durable_state",
                        lambda store, tenant, a: twins[a].model_copy(update={"revision": 0, "stale": True})
                        if a in twins else None)
    service.store = None
    got = {s.asset_id: (s.revision, s.stale) for s in service.states("acme", [*twins, "gone"], batch=4)}
    on = {a: shard_index("acme", a, 2) for a in [*twins, "gone"]}
    assert got == {a: (0, True) if on[a] == 1 else (twins[a].revision, False) for a in twins}
    held = [sum(1 for a in on if on[a] == i) for i in range(2)]
    assert [[len(ids) for ids in c] for c in shards.calls] == [[4] * (h // 4) + [h % 4] * (h % 4 > 0) for h in held]


def _take_lease(tmp_path):
    """Take the lease of the store at `tmp_path` over, as a starting service's twins do (another Ray cluster's): the
    service that held it is fenced from then on."""
    import uuid
    from datetime import UTC, datetime

    from raytwin.statestore import Lease, StateStore

    leases = StateStore(str(tmp_path / "twins"))
    held = leases.read_lease()
    mine = Lease(owner=uuid.uuid4().hex[:8], epoch=1 if held is None else held.epoch + 1, shards=1, namespace="ns",
                 acquired_at=datetime.now(UTC).isoformat(), acquired_by="test:1", cluster=uuid.uuid4().hex[:8])
    leases.write_lease(mine)
    return mine


def _job_backend(tmp_path, slots: int = 3, lease=None):
    """A `Backend` started now over the store at `tmp_path`, under `lease` (None: it takes the store's lease over, as a
    restarted service does): its change log, fenced by the lease as the backend builds it, and its job queue (its jobs
    recovered from the store, as at a start; `slots` of them run at once, of one tenant too) telling it the jobs that
    end."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from raytwin.statestore import StateStore
    from serve_apps.backend import Backend
    from serve_apps.config import ServeConfig
    from serve_apps.jobs import JobQueue

    mine = lease or _take_lease(tmp_path)
    backend = Backend.__new__(Backend)
    backend.config = ServeConfig(store_url=str(tmp_path), keys_file="unused.json")
    backend.twins, backend.connector_ops = SimpleNamespace(lease=mine), SimpleNamespace(hold=lambda why: None)
    backend._lease_reads = lambda timeout_s: StateStore(str(tmp_path / "twins")).read_lease()
    backend._fence, backend._fence_checked = None, -math.inf
    backend.changes = backend._change_log()
    backend.jobs = JobQueue(backend.config, slots, on_finish=backend._job_finished, tenant_limit=slots,
                            fence=backend.check_writable)
    backend._started = datetime.now(UTC)
    return backend


def _job_changes(backend) -> list[tuple[str, str]]:
    """(kind, job id) of each job change of tenant acme on the store, oldest first."""
    return [(c.kind, c.data["job_id"]) for c in backend.changes.store.read("acme", 0, 100) if c.kind.startswith("job.")]


def test_a_job_change_lost_with_a_backend_that_crashed_is_recorded_once_by_the_next_backend(tmp_path):
    """A job ended while the change-log write failed (kept in memory), and the backend crashed before the store took
    writes again: the stream never had the job's end. Nor the end of the jobs the restart failed. The next backend
    records each once, and none of the jobs whose change was written."""
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        crashed = _job_backend(tmp_path)
        held = HeldJobs(crashed.jobs)
        recorded, lost, running, queued = (_submit(crashed.jobs, "acme") for _ in range(4))
        await held.finish(recorded)
        crashed.changes.checkpoint(force=True)  # names `recorded`; the changes after it are read at the next start
        _failing_writes(crashed.changes, [DISK_FULL])
        await held.finish(lost)  # its record says succeeded; its change is kept in memory, then the backend is gone
        assert crashed.changes.unwritten() == 1 and _job_changes(crashed) == [("job.succeeded", recorded)]

        restarted = _job_backend(tmp_path, slots=1)  # marks `running` and `queued` failed
        restarted._catch_up_jobs("acme")
        restarted._catch_up_jobs("acme")  # a retry of the pass records nothing more
        caught_up = [("job.succeeded", recorded), ("job.succeeded", lost)]
        assert _job_changes(restarted)[:2] == caught_up
        assert sorted(_job_changes(restarted)[2:]) == sorted([("job.failed", running), ("job.failed", queued)])
        held = HeldJobs(restarted.jobs)
        after, cancelled = (_submit(restarted.jobs, "acme") for _ in range(2))
        restarted.jobs.cancel("acme", cancelled, "key-acme")  # a job's end is recorded cancelled while queued too
        await held.finish(after)  # they end after the start: recorded as they end, never by the catch-up
        restarted._catch_up_jobs("acme")
        everything = _job_changes(restarted)
        assert everything[4:] == [("job.cancelled", cancelled), ("job.succeeded", after)]

        again = _job_backend(tmp_path)  # no checkpoint since the first: read from the changes after it
        again._catch_up_jobs("acme")
        assert _job_changes(again) == everything

    asyncio.run(scenario())


def test_a_job_change_lost_hours_before_a_restart_is_caught_up_after_jobs_the_restart_recorded_first(
        tmp_path, monkeypatch):
    """The catch-up took every job that ended over `JOB_WINDOW_S` before the newest job with a change as recorded:
    after a service down for hours, a job of the restarted backend that ended before its catch-up ran (which waits on
    the store, and on the other tenants' catch-up) made the lost job's change one of those, for good once a checkpoint
    named that job. The jobs' floor is checkpointed now and moves only after a catch-up: the lost job is recorded, by
    the next backend too, once; from then on the floor follows the newest job, and the checkpoint drops older ones."""
    from datetime import datetime, timedelta

    from serve_apps import jobs as jobs_module
    from serve_apps.changes import JOB_WINDOW_S
    from tests.test_serve_jobs import HeldJobs, _submit

    class TwoHoursAgo(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) - timedelta(hours=2)

    async def scenario() -> None:
        monkeypatch.setattr(jobs_module, "datetime", TwoHoursAgo)
        crashed = _job_backend(tmp_path)
        held = HeldJobs(crashed.jobs)
        recorded, lost = (_submit(crashed.jobs, "acme") for _ in range(2))
        await held.finish(recorded)
        crashed.changes.checkpoint(force=True)
        _failing_writes(crashed.changes, [DISK_FULL])
        await held.finish(lost)  # its change kept in memory; the backend is gone, the service down for two hours
        monkeypatch.setattr(jobs_module, "datetime", datetime)

        restarted = _job_backend(tmp_path)
        held = HeldJobs(restarted.jobs)
        later = _submit(restarted.jobs, "acme")
        await held.finish(later)  # recorded before the catch-up ran
        restarted.changes.checkpoint(force=True)  # then it crashed too

        again = _job_backend(tmp_path)
        for _ in range(2):  # a retry of the pass records nothing more
            again._catch_up_jobs("acme")
        assert _job_changes(again) == [("job.succeeded", j) for j in (recorded, later, lost)]
        held = HeldJobs(again.jobs)
        newest = _submit(again.jobs, "acme")
        await held.finish(newest)
        again.changes.checkpoint(force=True)
        saved = json.loads((tmp_path / "changes" / "acme" / ".recorded.json").read_text())
        assert set(saved["jobs"]) == {later, newest}
        assert datetime.fromisoformat(saved["jobs_floor"]) == again.jobs.jobs[newest].finished - timedelta(
            seconds=JOB_WINDOW_S)

    asyncio.run(scenario())


def test_a_log_whose_checkpoint_names_no_jobs_takes_its_jobs_as_recorded_and_names_them_from_then_on(tmp_path):
    """A checkpoint written before the marks named jobs cannot tell which job's change was lost: its jobs are taken as
    recorded, as before, and the next checkpoint names them."""
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        first = _job_backend(tmp_path)
        held = HeldJobs(first.jobs)
        ended = _submit(first.jobs, "acme")
        await held.finish(ended)
        first.changes.checkpoint(force=True)
        marks = tmp_path / "changes" / "acme" / ".recorded.json"
        saved = json.loads(marks.read_text())
        assert set(saved["jobs"]) == {ended}
        marks.write_text(json.dumps({k: saved[k] for k in ("seq", "generation", "twins")}))  # as written before
        _submit(first.jobs, "acme")  # failed by the restart

        restarted = _job_backend(tmp_path)
        assert restarted.changes.recorded_jobs("acme") is None
        restarted._catch_up_jobs("acme")
        assert _job_changes(restarted) == [("job.succeeded", ended)]
        restarted.changes.checkpoint(force=True)
        assert set(json.loads(marks.read_text())["jobs"]) == set(restarted.jobs.jobs)

    asyncio.run(scenario())


def test_a_saved_event_id_resumes_through_after_too_and_the_sdk_raises_a_streams_refusal_typed(tmp_path):
    """An app developer's find: `?after=<seq>-<generation>` (a saved `Change.event_id`, what a browser's
    `EventSource` can only send in its URL) answered 422 "Input should be a valid integer", though the guide says to
    resume with `Last-Event-ID` or `?after=<id>`; now it resumes, and a stale one is 410, as the header is. And the
    SDK's `changes()`, refused at connect over a real connection (410, 401), raised httpx's `ResponseNotRead` (the
    refusal was parsed before its body was read): now `Gone` and `Unauthorized`, sync and async."""
    from client import AsyncRayTwinClient, RayTwinClient
    from client.errors import Gone as GoneError
    from client.errors import Unauthorized
    from tests.fixtures_http import served
    from tests.fixtures_serve import in_process_app

    backend = ChangeLogBackend(ChangeLog(str(tmp_path / "changes")))
    backend.log.record("acme", drafts(5))
    app, auth = in_process_app(backend, tmp_path)
    svc = app.state.services
    svc.changes, svc.change_store = HeadWatcher(svc.backend, poll_s=0.01), backend.log.store
    second, stale = ids(backend.log, 2)[0], "2-deadbeef"
    key = auth["reader"]["Authorization"].split()[1]

    async def follow_async(after: str) -> None:
        async with AsyncRayTwinClient(base, key) as api:
            async for _ in api.changes(after=after):
                break

    with served(app) as base, httpx.Client(base_url=base, timeout=30.0) as http:
        with http.stream("GET", "/v1/changes", params={"after": second}, headers=auth["reader"]) as stream:
            assert stream.status_code == 200
            assert next(iter_events(stream))[1]["data"]["seq"] == 3
        refused = http.get("/v1/changes", params={"after": stale}, headers=auth["reader"])
        assert refused.status_code == 410 and refused.json()["error"]["details"][0]["last_event_id"] == stale
        assert http.get("/v1/changes", params={"after": "2-x y"}, headers=auth["reader"]).status_code == 422
        with RayTwinClient(base, key) as api:
            assert next(api.changes(after=second)).seq == 3
            with pytest.raises(GoneError, match="no longer has"):
                next(api.changes(after=stale))
        with RayTwinClient(base, "rtk_unknown") as api, pytest.raises(Unauthorized):
            next(api.changes())
        with pytest.raises(GoneError, match="no longer has"):
            asyncio.run(follow_async(stale))


def test_a_fenced_backend_writes_nothing_to_the_change_log_and_its_successor_records_the_jobs_it_could_not(tmp_path):
    """Another service took the store over: the fenced backend's jobs went on ending, and it appended their changes
    to the change log beside the successor's, numbering changes the successor numbered too, and its checkpoint of
    recorded marks replaced the successor's. Its log's writes are refused as its other writes are (`check_writable`),
    and nothing is lost: the successor's catch-up records the job that ended between the takeover and its backend's
    start (its record not saved either: that start failed it) and the job that start failed while it ran, once each;
    what the fenced one kept (a refused write) it never writes."""
    from raytwin.statestore import StoreFenced
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path)
        held = HeldJobs(fenced.jobs)
        recorded, ended, running = (_submit(fenced.jobs, "acme") for _ in range(3))
        await held.finish(recorded)
        taken = _take_lease(tmp_path)  # the successor's twins take the store over
        fenced._fence_checked = -math.inf  # a second later: the fence check's cached verdict is read afresh
        await held.finish(ended)  # its change refused, its record not saved
        successor = _job_backend(tmp_path, slots=1, lease=taken)  # the successor's backend starts: fails `running`
        await held.finish(running)
        assert fenced.changes.unwritten() == 0  # its jobs' ends held: their changes are not recorded either
        applied = []
        with pytest.raises(StoreFenced, match="took the store over"):
            fenced.changes.write("acme", lambda seq: applied.append(seq) or drafts(1))
        with pytest.raises(StoreFenced, match="took the store over"):
            fenced.changes.record("acme", drafts(1))  # a twin's change (its batch applied before the fence): kept
        fenced._flush_changes()  # the store watch's pass: refused, quietly
        assert applied == [] and fenced.changes.unwritten() == 1
        assert fenced.changes.recorded("globex") == {}  # a tenant with no log yet: no first checkpoint written either
        assert not (tmp_path / "changes" / "globex").exists()
        assert _job_changes(successor) == [("job.succeeded", recorded)]

        successor._catch_up_jobs("acme")
        successor._catch_up_jobs("acme")  # a retry of the pass records nothing more
        successor.changes.checkpoint(force=True)
        marks = tmp_path / "changes" / "acme" / ".recorded.json"
        checkpointed = marks.read_text()
        fenced._flush_changes()
        fenced.changes.checkpoint(force=True)  # a clean stop of the fenced one: its marks are of a log it no longer has
        assert marks.read_text() == checkpointed
        assert set(json.loads(checkpointed)["jobs"]) == {recorded, ended, running}
        stored = successor.changes.store.read("acme", 0, 100)
        assert [(c.seq, c.generation) for c in stored] == [(1, fenced.changes.generation),
                                                           *((s, successor.changes.generation) for s in (2, 3))]
        assert _job_changes(successor)[0] == ("job.succeeded", recorded)
        assert sorted(_job_changes(successor)[1:]) == sorted([("job.failed", ended), ("job.failed", running)])

    asyncio.run(scenario())


@pytest.mark.parametrize("force", [True, False], ids=["at_close", "due"])
def test_a_checkpoint_within_a_second_of_a_takeover_writes_no_marks_over_its_successors(tmp_path, force):
    """The change log's checkpoint passed the fence check's verdict, kept for a second (`FENCE_CHECK_S`): a backend
    closed (or whose marks fell due) within a second of a takeover wrote its recorded marks over the successor's. A
    checkpoint reads the lease afresh now: the successor's marks stay."""
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path)
        held = HeldJobs(fenced.jobs)
        ended, running = (_submit(fenced.jobs, "acme") for _ in range(2))
        await held.finish(ended)  # its change written: marks to checkpoint
        fenced.check_writable()  # it holds the store, and keeps that verdict...
        fenced._fence_checked = time.monotonic() + 3600  # ...however slow this machine is until the checkpoint
        successor = _job_backend(tmp_path)  # takes the store over; its start fails `running`
        successor._catch_up_jobs("acme")
        successor.changes.checkpoint(force=True)
        marks = tmp_path / "changes" / "acme" / ".recorded.json"
        checkpointed = marks.read_text()
        fenced.changes.checkpoint_s = 0.0  # its marks are due at the store watch's next pass
        fenced.changes.checkpoint(force=force)  # `force`: its close's
        assert marks.read_text() == checkpointed
        assert set(json.loads(checkpointed)["jobs"]) == {ended, running}

    asyncio.run(scenario())


def test_a_job_that_ends_within_a_second_of_a_takeover_saves_no_record_over_its_successors(tmp_path):
    """The fence check's verdict is kept for a second (`FENCE_CHECK_S`): a job that ended within a second of a
    takeover saved its end (succeeded) over the record in which the successor's start failed it, and appended its
    change beside the successor's log. A job's end reads the lease afresh now: nothing of it is written."""
    from serve_apps.jobs import JobRecord
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path, slots=1)
        held = HeldJobs(fenced.jobs)
        running = _submit(fenced.jobs, "acme")
        fenced.check_writable()  # it holds the store, and keeps that verdict...
        fenced._fence_checked = time.monotonic() + 3600  # ...however slow this machine is until the job ends
        successor = _job_backend(tmp_path)  # takes the store over; its start fails the job
        await held.finish(running)
        record = JobRecord.model_validate_json((tmp_path / "jobs" / "acme" / running / "job.json").read_text())
        assert (record.state, fenced.jobs.jobs[running].state) == ("failed", "succeeded")
        successor._catch_up_jobs("acme")
        assert _job_changes(successor) == [("job.failed", running)]

    asyncio.run(scenario())


def test_a_job_end_written_in_the_takeover_window_replaces_no_change_of_the_successor(tmp_path):
    """A job's end reads the lease afresh and then writes: a takeover between the two (the process paused, the store
    slow) lets the fenced backend write once. The worst case, pinned: its record landed over the one in which the
    successor's start failed the job (the store said succeeded, the successor failed), and its change took the number
    the successor's log had given the job's `job.failed` and replaced that segment. Both are claimed exclusively now:
    the job's end (`end.json`) and the segment; the fenced backend's end is refused, and with it its change."""
    from serve_apps.jobs import JobRecord, read_records
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path, slots=1)
        held = HeldJobs(fenced.jobs)
        first, running = (_submit(fenced.jobs, "acme") for _ in range(2))
        await held.finish(first)  # change 1; `running` starts
        fenced._lease_reads = lambda timeout_s: fenced.twins.lease  # every read of the lease made before the takeover
        successor = _job_backend(tmp_path)  # takes the store over; its start fails `running`
        successor._catch_up_jobs("acme")  # change 2: its job.failed
        await held.finish(running)  # in the window: the fenced backend finds its store held, and writes
        record = JobRecord.model_validate_json((tmp_path / "jobs" / "acme" / running / "job.json").read_text())
        stored = {job.job_id: job.state for job in read_records(successor.jobs.fs, successor.jobs.root)}
        assert (record.state, stored[running], successor.jobs.jobs[running].state) == ("failed",) * 3
        stored = successor.changes.store.read("acme", 0, 100)
        assert [(c.seq, c.kind, c.data["job_id"], c.generation) for c in stored] == [
            (1, "job.succeeded", first, fenced.changes.generation),
            (2, "job.failed", running, successor.changes.generation)]
        assert fenced.changes.unwritten() == 0  # its end refused, its change is not recorded either

    asyncio.run(scenario())


def test_a_job_started_in_the_takeover_window_is_not_shown_running_again_after_the_successor_ended_it(tmp_path):
    """A queued job starts on the fenced backend's cached lease verdict (up to a second old), so a job that ends in
    the takeover window starts the next one, whose `running` record replaced the one in which the successor's start
    failed it: `raytwin jobs list` showed it running again, and a restarted successor failed it a second time. The
    ended record claimed by the successor (`end.json`) is what every reader takes."""
    from serve_apps.jobs import read_records
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path, slots=1)
        held = HeldJobs(fenced.jobs)
        running, queued = (_submit(fenced.jobs, "acme") for _ in range(2))
        fenced._lease_reads = lambda timeout_s: fenced.twins.lease  # every read of the lease made before the takeover
        successor = _job_backend(tmp_path)  # takes the store over; its start fails both
        failed = {j: successor.jobs.jobs[j].model_dump() for j in (running, queued)}
        await held.finish(running)  # in the window: its end is refused, and `queued` starts, its record written
        assert fenced.jobs.jobs[queued].state == "running"
        assert {job.job_id: job.state for job in read_records(successor.jobs.fs, successor.jobs.root)} == {
            running: "failed", queued: "failed"}
        restarted = _job_backend(tmp_path, lease=successor.twins.lease)  # the successor's backend, restarted
        assert {j: restarted.jobs.jobs[j].model_dump() for j in (running, queued)} == failed  # not failed again

    asyncio.run(scenario())


def test_a_checkpoint_written_in_the_takeover_window_over_the_successors_loses_nothing_of_what_it_recorded(tmp_path):
    """A checkpoint reads the lease afresh and then writes: a takeover between the two lets the fenced backend's marks
    replace the successor's. The worst case, pinned: nothing is lost by it. The fenced marks are true of the log up to
    their change, which is in the log, so the successor restarted over them reads its own changes after it and knows
    every twin state and job it recorded, as from its own checkpoint."""
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path)
        held = HeldJobs(fenced.jobs)
        ended, running = (_submit(fenced.jobs, "acme") for _ in range(2))
        await held.finish(ended)  # change 1, the fenced log's: its marks are due
        fenced._lease_reads = lambda timeout_s: fenced.twins.lease  # every read of the lease made before the takeover
        successor = _job_backend(tmp_path)  # takes the store over; its start fails `running`
        successor._catch_up_jobs("acme")  # change 2: job.failed
        successor.changes.record("acme", drafts(2, asset="z1"))  # changes 3, 4: a twin's states
        successor.changes.checkpoint(force=True)
        fenced.changes.checkpoint(force=True)  # in the window: its marks (of change 1) replace the successor's
        marks = json.loads((tmp_path / "changes" / "acme" / ".recorded.json").read_text())
        assert (marks["seq"], marks["generation"]) == (1, fenced.changes.generation)
        restarted = _job_backend(tmp_path, lease=successor.twins.lease)  # the successor's backend, restarted
        assert restarted.changes.recorded("acme") == successor.changes.recorded("acme") == {"z1": (4, False)}
        assert set(restarted.changes.recorded_jobs("acme").ended) == {ended, running}
        restarted._catch_up_jobs("acme")
        assert _job_changes(restarted) == [("job.succeeded", ended), ("job.failed", running)]  # none twice

    asyncio.run(scenario())


def test_a_segment_is_written_again_as_it_was_but_never_over_another_logs(tmp_path):
    """The segment write behind every change: one written again with its bytes (a try that landed) is done; one whose
    name holds another log's segment is refused, which stays. (`write_once` on S3, `If-None-Match: *`:
    tests/test_lifecycle.py::test_exclusive_writes_have_one_winner.)"""
    from raytwin.statestore import StoreFenced
    from serve_apps.changes import Change, ChangeStore

    store = ChangeStore(str(tmp_path))
    ours, theirs = ([Change(seq=1, revision=1, kind="twin.state", asset_id="a", time=datetime.now(UTC),
                            generation=g, data={})] for g in ("ours", "theirs"))
    store.write("acme", theirs)
    store.write("acme", theirs)  # written again as it was
    with pytest.raises(StoreFenced, match="changes 1-1 of tenant acme are another log's"):
        store.write("acme", ours)
    assert [c.generation for c in store.read("acme", 0, 10)] == ["theirs"]


def test_a_fenced_segment_landed_first_under_the_successors_numbers_leaves_its_log_writing_after_it(tmp_path):
    """Two logs whose segments name no epoch (or one epoch): in the takeover window the fenced backend's segment may
    land first under the name the successor's log gives its next change: the successor's write was refused
    (`StoreFenced`) and kept, and written again as it was, refused again, for good: every later change of the tenant
    too (telemetry answered 503 `store_fenced` by the service that holds the store). The log that holds the store
    numbers its changes after the fenced one's; the fenced log's next write is refused, and a reader of the store gets
    each change once, in order. (Logs of two epochs never share a name: the next tests.)"""
    from raytwin.statestore import StoreFenced

    holds = {"fenced": True}

    def fenced_check(fresh: bool = False) -> None:
        if fresh or not holds["fenced"]:  # its verdict up to a second old; a read of the lease now finds it taken
            raise StoreFenced("another service took the store over")

    fenced = ChangeLog(str(tmp_path), fence=fenced_check)
    fenced.record("acme", drafts(1))  # change 1
    successor = ChangeLog(str(tmp_path), fence=lambda fresh=False: None)
    assert successor.head("acme") == 1  # read at its first change of the tenant
    fenced.record("acme", drafts(1, asset="f"))  # in the window: change 2 lands first
    assert [c.seq for c in successor.record("acme", drafts(1, asset="s"))] == [3]
    assert [c.seq for c in successor.record("acme", drafts(1, asset="s"))] == [4]
    holds["fenced"] = False  # a second later
    with pytest.raises(StoreFenced):
        fenced.record("acme", drafts(1, asset="f"))
    stored = successor.store.read("acme", 0, 10)
    assert [(c.seq, c.asset_id, c.generation) for c in stored] == [
        (1, "a", fenced.generation), (2, "f", fenced.generation), (3, "s", successor.generation),
        (4, "s", successor.generation)]
    assert successor.unwritten() == 0 and successor.head("acme") == 4


def test_a_job_cancelled_within_a_second_of_a_takeover_saves_no_record_over_its_successors(tmp_path):
    """A cancel passed the fence check's verdict, kept for a second: a queued job cancelled within a second of a
    takeover saved its end (cancelled) over the record in which the successor's start failed it, and appended its
    change beside the successor's log. A cancel reads the lease afresh now: refused (503), nothing of it written."""
    from raytwin.statestore import StoreFenced
    from serve_apps.jobs import JobRecord
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path, slots=1)
        HeldJobs(fenced.jobs)
        running, queued = (_submit(fenced.jobs, "acme") for _ in range(2))
        fenced.check_writable()  # it holds the store, and keeps that verdict...
        fenced._fence_checked = time.monotonic() + 3600  # ...however slow this machine is until the cancel
        successor = _job_backend(tmp_path)  # takes the store over; its start fails both jobs
        with pytest.raises(StoreFenced, match="took the store over"):
            await fenced.cancel_job("acme", queued, "key-acme")
        record = JobRecord.model_validate_json((tmp_path / "jobs" / "acme" / queued / "job.json").read_text())
        assert (record.state, fenced.jobs.jobs[queued].state) == ("failed", "queued")
        successor._catch_up_jobs("acme")
        assert sorted(_job_changes(successor)) == sorted([("job.failed", running), ("job.failed", queued)])

    asyncio.run(scenario())


def test_a_fenced_segment_its_successors_listing_does_not_show_yet_is_numbered_past_not_refused_for_good(tmp_path):
    """The successor renumbered its refused changes after the store's newest as listed: a listing that did not show
    the fenced segment yet (an object store's cached listing) gave them the refused name again, refused again, in a
    loop that held the log's lock for good. They are numbered past the refused name whatever the listing says."""
    reads = []

    def holder(fresh: bool = False) -> None:
        reads.append(fresh)
        if len(reads) > 20:  # (without the fix: the same name refused on and on; ended here)
            raise AssertionError("the log renumbered its changes to the refused name again and again")

    fenced = ChangeLog(str(tmp_path), fence=lambda fresh=False: None)
    fenced.record("acme", drafts(1))  # change 1
    successor = ChangeLog(str(tmp_path), fence=holder)
    assert successor.head("acme") == 1
    successor.store.last_seq = lambda tenant: 1  # its listing, cached before the fenced segment landed
    fenced.record("acme", drafts(1, asset="f"))  # in the window: change 2 lands first
    assert [c.seq for c in successor.record("acme", drafts(1, asset="s"))] == [3]
    assert [(c.seq, c.asset_id) for c in successor.store.read("acme", 0, 10)] == [(1, "a"), (2, "f"), (3, "s")]
    assert reads.count(True) == 1 and successor.unwritten() == 0


@pytest.mark.parametrize("fenced_n, successor_n", [(1, 3), (4, 2)])  # the fenced segment's name sorts first; last
def test_a_fenced_logs_segments_beside_its_successors_are_never_served(tmp_path, monkeypatch, fenced_n, successor_n):
    """In the takeover window the fenced backend's log and its successor's both number from the head they read: their
    segments overlap under different names (other last numbers). A reader took each number from the segment first by
    name, so a store replay showed fenced changes under the successor's numbers, or after its head. The successor's
    epoch, in its names, wins: the fenced segments are left out whichever name sorts first, one later in the window
    too, for a reader at any position and for a restart's head; over folders, the superseding segment in the one
    before."""
    monkeypatch.setattr(changes_module, "PARTITION", 4)
    fenced = ChangeLog(str(tmp_path), fence=lambda fresh=False: None, epoch=1)  # its verdict read before the takeover
    fenced.record("acme", drafts(2))  # changes 1-2
    successor = ChangeLog(str(tmp_path), fence=lambda fresh=False: None, epoch=2)
    assert successor.head("acme") == 2
    fenced.record("acme", drafts(fenced_n, asset="f"))  # in the window: from 3 on
    successor.record("acme", drafts(successor_n, asset="s"))  # from 3 on, beside it
    fenced.record("acme", drafts(1, asset="f"))  # later in the window: in the next folder
    want = [(1, "a"), (2, "a"), *((seq, "s") for seq in range(3, 3 + successor_n))]
    for after in range(len(want) + 1):
        assert [(c.seq, c.asset_id) for c in successor.store.read("acme", after, 100)] == want[after:]
    restarted = ChangeLog(str(tmp_path), fence=lambda fresh=False: None, epoch=2)
    assert restarted.head("acme") == 2 + successor_n and restarted.store.first_seq("acme") == 1
    assert [c.seq for c in restarted.record("acme", drafts(1, asset="s"))] == [3 + successor_n]
    assert [(c.seq, c.asset_id) for c in successor.store.read("acme", 0, 100)] == [*want, (3 + successor_n, "s")]


def test_a_store_written_before_segments_named_epochs_reads_and_its_fenced_segment_is_left_out(tmp_path):
    """Segments named without an epoch (`{first}-{last}.jsonl`, as before) are read as ever, and a log with an epoch
    goes on after them; one of them beside a successor's (an older version's backend fenced in the window) is left out
    as any lower epoch's: before, its name sorted first and it was served under the successor's number."""
    older = ChangeLog(str(tmp_path))  # names as an older version wrote them
    older.record("acme", drafts(2))
    assert [p.name for p in (tmp_path / "acme").rglob("*.jsonl")] == ["0000000000000001-0000000000000002.jsonl"]
    successor = ChangeLog(str(tmp_path), fence=lambda fresh=False: None, epoch=3)
    assert successor.head("acme") == 2
    older.record("acme", drafts(1, asset="f"))  # change 3, in the window
    successor.record("acme", drafts(2, asset="s"))  # changes 3-4
    assert [(c.seq, c.asset_id) for c in ChangeLog(str(tmp_path)).store.read("acme", 0, 10)] == [
        (1, "a"), (2, "a"), (3, "s"), (4, "s")]


def test_a_log_whose_lease_epoch_is_below_its_stores_segments_names_its_own_with_theirs(tmp_path):
    """A store whose lease was lost starts its epochs at 1 again: segments named with 1 after ones of epoch 5 would
    each be superseded, every change of the new service left out by readers. They are named with the store's."""
    ChangeLog(str(tmp_path), epoch=5).record("acme", drafts(2))
    ChangeLog(str(tmp_path), epoch=1).record("acme", drafts(2, asset="n"))
    assert [(c.seq, c.asset_id) for c in ChangeLog(str(tmp_path)).store.read("acme", 0, 10)] == [
        (1, "a"), (2, "a"), (3, "n"), (4, "n")]


def test_a_job_cancelled_in_the_takeover_window_is_refused_over_the_successors_end(tmp_path):
    """A cancel reads the lease afresh and then writes: a takeover between the two let the queued job's `cancelled`
    record replace the one in which the successor's start failed it. The successor claimed the job's end first: the
    cancel is refused (503 `store_fenced`), the record stays the successor's, and the fenced replica's memory the job
    as it was (it showed cancelled, marked before the refused save, while the store said failed)."""
    from raytwin.statestore import StoreFenced
    from serve_apps.jobs import read_records
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path, slots=1)
        HeldJobs(fenced.jobs)
        running, queued = (_submit(fenced.jobs, "acme") for _ in range(2))
        fenced._lease_reads = lambda timeout_s: fenced.twins.lease  # every read of the lease made before the takeover
        _job_backend(tmp_path)  # takes the store over; its start fails both jobs
        with pytest.raises(StoreFenced, match="ended by the service that took the store over"):
            await fenced.cancel_job("acme", queued, "key-acme")
        assert {job.job_id: job.state for job in read_records(fenced.jobs.fs, fenced.jobs.root)} == {
            running: "failed", queued: "failed"}
        kept = await fenced.get_job("acme", queued)
        assert (kept.state, kept.finished, kept.error) == ("queued", None, None)
        assert fenced.jobs.pending.position("acme", queued) is not None
        assert (fenced.jobs.counts[("acme", "queued")], fenced.jobs.counts[("acme", "cancelled")]) == (1, 0)

    asyncio.run(scenario())


def test_a_fenced_backend_saves_no_job_record_over_its_successors_and_starts_none_of_its_queued_jobs(tmp_path):
    """The fenced backend's job queue went on after the takeover: a job that ended there saved its record over the one
    the successor's start wrote (failed, and recorded so on the change log), its queued job started (saved as
    running, run beside the successor), and a cancel saved its record. It saves none of them: the store's records
    stay the successor's, and so do the changes of those jobs."""
    from raytwin.statestore import StoreFenced
    from serve_apps.jobs import JobRecord
    from tests.test_serve_jobs import HeldJobs, _submit

    async def scenario() -> None:
        fenced = _job_backend(tmp_path, slots=1)
        held = HeldJobs(fenced.jobs)
        running, queued, cancelled = (_submit(fenced.jobs, "acme") for _ in range(3))
        successor = _job_backend(tmp_path)  # takes the store over; its start fails the three
        fenced._fence_checked = -math.inf  # a second later: the fence check's cached verdict is read afresh
        await held.finish(running)
        assert fenced.jobs.jobs[queued].state == "queued" and list(held.futures) == [running]
        with pytest.raises(StoreFenced, match="took the store over"):
            await fenced.cancel_job("acme", cancelled, "key-acme")
        jobs = (running, queued, cancelled)
        stored = [JobRecord.model_validate_json((tmp_path / "jobs" / "acme" / j / "job.json").read_text()).state
                  for j in jobs]
        assert stored == ["failed"] * 3
        successor._catch_up_jobs("acme")
        assert sorted(_job_changes(successor)) == sorted(("job.failed", j) for j in jobs)

    asyncio.run(scenario())
