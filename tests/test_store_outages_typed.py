"""Every store read and write above the storage layer raises the store's outages as `StoreIOError`, so that the API
answers them 503 `store_unavailable` by their type alone (`serve_apps.store_errors.store_failure`): the catalog, the
change and audit logs, the registry and lifecycle, jobs, runs, the connectors' records, the sweeps' outputs,
calibration's telemetry...

Each case injects an OSError (a full disk, a read-only store, a disk's I/O error, a refused connection) into the
fsspec or pyarrow call a module makes, as the store would raise it; no Ray, no Serve."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from raytwin.store_failures import FailureClass, Operation, StoreIOError
from serve_apps.store_errors import store_failure

_CLASS: dict[int, FailureClass] = {errno.ENOSPC: "disk_full", errno.EROFS: "read_only", errno.EACCES: "permission",
                                   errno.EIO: "io", errno.ECONNREFUSED: "unreachable"}


class Case(NamedTuple):
    """`prepare(store)` sets a module up on a healthy store and returns the call that reads or writes it; then
    `target.method` fails with `code`: the call must raise `StoreIOError` of `operation`."""

    prepare: Callable[[str], Callable[[], object]]
    method: str
    code: int
    operation: Operation
    target: object = LocalFileSystem


def _catalog(store: str):
    from serve_apps.catalog import Catalog

    return lambda: Catalog(store)


def _changes(store: str):
    from serve_apps.changes import Change, ChangeStore

    change = Change.model_validate({"seq": 1, "revision": 1, "kind": "asset.updated",
                                    "asset_id": "a", "time": "2026-01-05T00:00:00Z", "data": {}})
    changes = ChangeStore(store)
    return lambda: changes.write("acme", [change])


def _audit(store: str):
    from serve_apps.audit import AuditLog

    return lambda: AuditLog(store).page("acme")


def _registry(store: str):
    from raytwin.registry import ModelRegistry

    return lambda: ModelRegistry(store).get("thermal@1.0.0")


def _lifecycle(store: str):
    from raytwin.lifecycle import ModelLifecycle
    from raytwin.registry import ModelRegistry

    return lambda: ModelLifecycle(ModelRegistry(store)).records("thermal")


def _key_index(store: str):
    from raytwin.keyindex import LogKeyIndex
    from raytwin.statestore import StateStore

    index = LogKeyIndex(StateStore(store))
    return lambda: index.lookup("acme", [("a", (1_767_571_200_000_000, 0, "k"), b"")])


def _jobs(store: str):
    from raytwin.storage import filesystem
    from serve_apps.jobs import read_records

    return lambda: list(read_records(*filesystem(f"{store}/jobs")))  # (a generator: read as it is consumed)


def _runs(store: str):
    from sweeps.runs import RunStore

    return lambda: RunStore(store).load("run-1")


def _recalibration_policies(store: str):
    from raytwin.recalibration import PolicyStore

    return lambda: PolicyStore(store).get("acme", "thermal")


def _recalibration_trigger(store: str):
    from serve_apps.recalibration import Recalibrator

    return lambda: Recalibrator(store, None, None, None, None, None).state("acme")


def _deprecations(store: str):
    from serve_apps.deprecation import TypeDeprecations

    return lambda: TypeDeprecations(store)


def _asset_moves(store: str):
    from serve_apps.asset_moves import AssetMoves

    return lambda: AssetMoves(SimpleNamespace(config=SimpleNamespace(store_url=store, storage_options=None)))


def _cursor_secret(store: str):
    from serve_apps.asset_queries import cursor_secret

    return lambda: cursor_secret(store, None)


def _commands(store: str):
    from connectors.commands import CommandLedger

    os.makedirs(f"{store}/connectors/commands/tenant=acme")
    return lambda: CommandLedger(store).list("acme")


def _connectors(store: str):
    from connectors.spec import ConnectorStore

    connectors = ConnectorStore(store)
    connectors.claim("broker/client-1", "acme", "line-1")
    return lambda: connectors.release("broker/client-1", "acme", "line-1")


def _series(store: str):
    from raytwin.signals import Series

    return lambda: Series(path=f"{store}/setpoint.parquet", column="setpoint").points


def _fmu(store: str):
    from raytwin.fmu import store_fmu

    fmu = f"{store}/../pump.fmu"
    with open(fmu, "wb") as f:
        f.write(b"an FMU")
    return lambda: store_fmu(fmu, store)


def _sweep_results(store: str):
    from sweeps.aggregate import open_dataset

    os.makedirs(f"{store}/sweep")
    return lambda: open_dataset(f"{store}/sweep")


def _sweep_part(store: str):
    from sweeps.runner import write_parquet

    return lambda: write_parquet(pa.table({"x": [1.0]}), f"{store}/part-000000.parquet", None)


def _telemetry_window(store: str):
    from sweeps.recalibration import write_window

    return lambda: write_window(pa.table({"x": [1.0]}), f"{store}/windows/w.parquet")


def _calibration_telemetry(store: str):
    from sweeps.calibration import read_telemetry

    return lambda: read_telemetry(f"{store}/telemetry.parquet")


def _bulk_load(store: str):
    from actors.ingest import _parquet_batches

    return lambda: list(_parquet_batches(f"{store}/telemetry.parquet", None, 10))


CASES = {
    "catalog": Case(_catalog, "exists", errno.EIO, "read"),
    "change log": Case(_changes, "makedirs", errno.ENOSPC, "write"),
    "audit log": Case(_audit, "exists", errno.ECONNREFUSED, "read"),
    "registry": Case(_registry, "cat_file", errno.EACCES, "read"),
    "lifecycle": Case(_lifecycle, "exists", errno.EIO, "read"),
    "key index": Case(_key_index, "ls", errno.EIO, "read"),
    "jobs": Case(_jobs, "exists", errno.EIO, "read"),
    "runs": Case(_runs, "exists", errno.EIO, "read"),
    "recalibration policies": Case(_recalibration_policies, "exists", errno.EIO, "read"),
    "recalibration trigger": Case(_recalibration_trigger, "exists", errno.EIO, "read"),
    "deprecations": Case(_deprecations, "exists", errno.EIO, "read"),
    "asset moves": Case(_asset_moves, "glob", errno.EIO, "read"),
    "query cursor key": Case(_cursor_secret, "exists", errno.EROFS, "write"),
    "commands": Case(_commands, "ls", errno.EIO, "read"),
    "connectors": Case(_connectors, "rm", errno.EROFS, "write"),
    "series": Case(_series, "read_table", errno.EIO, "read", pq),
    "fmu": Case(_fmu, "put_file", errno.ENOSPC, "write"),
    "sweep results": Case(_sweep_results, "ls", errno.EIO, "read"),
    "sweep part": Case(_sweep_part, "open", errno.ENOSPC, "write"),
    "telemetry window": Case(_telemetry_window, "pipe_file", errno.EROFS, "write"),
    "bulk load": Case(_bulk_load, "dataset", errno.EIO, "read", ds),
    "calibration telemetry": Case(_calibration_telemetry, "cat_file", errno.EIO, "read"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_store_outage_above_the_storage_layer_raises_store_io_error_and_answers_503(case, tmp_path, monkeypatch):
    """These modules call fsspec and pyarrow directly: their store's failures were told from others' by the files
    their traceback names, and one whose text named none (another process's, as Ray copies it) answered 500."""
    store = str(tmp_path / "store")
    os.makedirs(store)
    call = case.prepare(store)
    failure = OSError(case.code, os.strerror(case.code))

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(case.target, case.method, fail)
    with pytest.raises(StoreIOError) as raised:
        call()
    assert raised.value.__cause__ is failure
    assert (raised.value.operation, raised.value.error) == (case.operation, _CLASS[case.code])
    answer = store_failure(raised.value)
    assert (answer.status, answer.code, answer.error) == (503, "store_unavailable", _CLASS[case.code])
    assert os.strerror(case.code) in answer.message and store not in answer.message
