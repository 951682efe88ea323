"""`raytwin.storage.replace_file`, through which every small record of the store is written: a write that dies
part way leaves the previous record whole (on local disk, where a file written in place is empty or partial until
its writer finishes, for good if it never does), and the store's writers use it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest

from connectors.spec import ConnectorStore, Desired
from raytwin.contracts import Asset, AssetType
from raytwin.sim import THERMAL_RC
from raytwin.statestore import Heartbeat, StateStore
from raytwin.storage import STALE_TEMP_S, filesystem, remove_stale_temp_files, replace_file, write_once
from serve_apps.catalog import Catalog


def test_a_write_killed_half_way_leaves_the_previous_content_and_no_listed_file(tmp_path, killed_mid_write):
    fs, root = filesystem(str(tmp_path))
    path = f"{root}/deep/record.json"
    replace_file(fs, path, b'{"v": 1}')  # its folders made
    with killed_mid_write():
        replace_file(fs, path, json.dumps({"v": 2, "padding": "x" * 100}).encode())
    assert json.loads(fs.cat_file(path)) == {"v": 1}
    assert fs.glob(f"{root}/deep/*.json") == [path]  # the half a killed writer left is hidden, not a record
    replace_file(fs, path, b'{"v": 3}')
    assert json.loads(fs.cat_file(path)) == {"v": 3}


def test_a_failed_write_leaves_the_previous_content_and_nothing_beside_it(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    replace_file(filesystem(str(tmp_path))[0], str(path), b"old")

    def disk_full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        replace_file(filesystem(str(tmp_path))[0], str(path), b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["record.json"]


def test_what_a_killed_writer_left_is_removed_once_no_live_writer_can_hold_it(tmp_path, killed_mid_write):
    """A writer killed between its hidden file and the rename left that file for good (the change log's, the
    lease's, the catalog's folders...). The sweep removes those older than `STALE_TEMP_S` by their mtime, and nothing
    younger (a live writer's, here or on another host), nor any other file, hidden or not."""
    fs, root = filesystem(str(tmp_path))
    for path in (f"{root}/changes/acme/0000000000/record.json", f"{root}/twins/lease.json"):
        with killed_mid_write():
            replace_file(fs, path, b"x" * 64)
    with killed_mid_write():
        write_once(fs, f"{root}/registry/log/00001.json", b"y" * 64)
    left = sorted(p for p in tmp_path.rglob(".*.tmp"))
    assert len(left) == 3
    (tmp_path / "changes/acme/.recorded.json").write_bytes(b"{}")
    (tmp_path / "twins/.lease.json.tmp").write_bytes(b"")  # hidden, not a writer's name
    replace_file(fs, f"{root}/twins/lease.json", b"{}")
    kept = {p for p in tmp_path.rglob("*") if p.is_file()} - set(left)
    old = time.time() - STALE_TEMP_S - 60
    for path in [*left[:2], *kept]:
        os.utime(path, (old, old))
    assert remove_stale_temp_files(fs, root) == 2
    assert sorted(p for p in tmp_path.rglob(".*.tmp") if p not in kept) == left[2:]  # young: a live writer's
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == kept | set(left[2:])
    assert remove_stale_temp_files(fs, root) == 0
    assert remove_stale_temp_files(fsspec.filesystem("memory"), "/none") == 0  # no such file on an object store


def test_on_an_object_store_the_record_is_put_once_with_nothing_beside_it():
    fs = fsspec.filesystem("memory")
    replace_file(fs, "/replace-file-test/a/record.json", b"one")
    replace_file(fs, "/replace-file-test/a/record.json", b"two")
    assert fs.cat_file("/replace-file-test/a/record.json") == b"two"
    assert fs.ls("/replace-file-test/a", detail=False) == ["/replace-file-test/a/record.json"]
    fs.rm("/replace-file-test", recursive=True)


def _store_case(write: Callable[[StateStore, int], None], read: Callable[[StateStore], int]):
    return lambda root: (lambda v: write(StateStore(root), v)), lambda root: read(StateStore(root))


_TYPE = AssetType.from_model(THERMAL_RC)


def _write_asset(root: str, v: int) -> None:
    catalog = Catalog(root)  # loaded from the store: a reload meets what a killed writer left
    catalog.put_type("acme", _TYPE, 1)
    asset = Asset(id="zone", tenant="acme", type_name=_TYPE.name, type_version=_TYPE.version, metadata={"v": str(v)})
    (catalog.update_asset if catalog.revision("acme", "assets", "zone") else catalog.create_asset)(asset, v + 1)


Writer = Callable[[str], Callable[[int], None]]
Reader = Callable[[str], Any]
CASES: dict[str, tuple[Writer, Reader]] = {
    "registration": _store_case(lambda s, v: s.save_registration("acme", "a", {"v": v}),
                                lambda s: s.load_registration("acme", "a")["v"]),
    "model swaps": _store_case(lambda s, v: s.save_model_swaps("acme", "a", [{"at_us": v}]),
                               lambda s: s.load_model_swaps("acme", "a")[0]["at_us"]),
    "drift clear": _store_case(lambda s, v: s.save_drift_clear("acme", "a", (v, 0, "k")),
                               lambda s: s.load_drift_clears("acme", "a")[-1][0]),
    "deletion": _store_case(lambda s, v: s.save_deletion("acme", "a", v), lambda s: s.history_floors("acme")["a"]),
    "shadow": _store_case(lambda s, v: s.save_shadow("acme", "ref", "a", {"v": v}),
                          lambda s: [r["v"] for *_, r in s.load_shadows()]),
    "lease heartbeat": _store_case(lambda s, v: s.write_heartbeat(Heartbeat("svc", v, "c", 0.0)),
                                   lambda s: s.read_heartbeat().epoch),
    "catalog asset": (lambda root: lambda v: _write_asset(root, v),
                      lambda root: Catalog(root).get_asset("acme", "zone").metadata["v"]),
    "connector desired state": (
        lambda root: lambda v: ConnectorStore(root).set_desired("acme", "c", Desired.running if v == 1 else Desired.paused),
        lambda root: ConnectorStore(root).desired("acme", "c")),
}


@pytest.mark.parametrize("case", CASES)
def test_the_stores_records_survive_a_writer_killed_half_way(tmp_path: Path, killed_mid_write, case: str):
    """Each of these was written in place on local disk: killed part way, it was left empty or partial for good
    (model swaps are read by stale reads and every restart, the catalog by every backend start)."""
    writer, reader = CASES[case]
    root = str(tmp_path / "store")
    writer(root)(1)
    before = reader(root)
    with killed_mid_write():
        writer(root)(2)
    assert reader(root) == before
    writer(root)(3)
    assert reader(root) != before


def test_a_revision_saved_from_an_older_read_is_refused_even_where_pruning_freed_its_number(tmp_path):
    """`raytwin.revisions`: a save is the revision after the one read, created only where that number is free; saves
    delete the older revisions, so a writer that read one of those finds its number free again: it is refused all
    the same (a newer revision is there once its own landed), and its file removed."""
    from raytwin.revisions import DocumentMoved, Revisions

    fs, root = filesystem(str(tmp_path))
    docs = Revisions(fs, f"{root}/doc", legacy=f"{root}/doc.json")
    (tmp_path / "doc.json").write_bytes(b"before revisions")
    assert docs.read() == (0, b"before revisions")
    for revision in (1, 2, 3):
        docs.write(revision, b"v%d" % revision)
    with pytest.raises(DocumentMoved):
        docs.write(3, b"from revision 2")  # its number taken
    with pytest.raises(DocumentMoved):
        docs.write(2, b"from revision 1")  # its number free again: revision 2 was deleted
    assert docs.read() == (3, b"v3") and sorted(os.listdir(tmp_path)) == ["doc"]
    assert os.listdir(tmp_path / "doc") == [f"{3:016d}.json"]
