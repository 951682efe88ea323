"""The RayTwin application on the shared Serve proxy (the `serve_proxy` fixture of `tests/conftest.py`), and the
app in this process in front of a backend object (`in_process`: routes tested without Serve)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

KEYS = (("admin", "acme", "admin", ()), ("approver", "acme", "admin", ("approver",)),
        ("writer", "acme", "writer", ()), ("reader", "acme", "reader", ()), ("other", "globex", "admin", ()))
"""The keys `in_process` makes: (name, tenant, role, grants), each held by a person of its name (its owner)."""
NODE_BROKERS = ["127.0.0.1/32"]
"""`ServeConfig.connector_hosts` of the services whose tenants' connectors use a broker or server on this machine:
the default refuses loopback (a tenant reaches nothing on the node), so these list it, as an operator opens a
broker on the node."""

TEST_MODELS = {"*": ["tests"]}
"""`ServeConfig.model_packages` of the app `in_process` makes: the tests' own models (`tests.schema_models`) are
asset types' simulators, as an operator lists a package of models its tenants may name by import path."""


@contextmanager
def deployed(config: dict[str, Any], name: str = "raytwin") -> Iterator[None]:
    """The application built from `config` (`ServeConfig` fields) at route ``/`` of the shared proxy, deleted
    at the end, also when a module's set-up fails half-way (the next module deploys at ``/`` too)."""
    from ray import serve

    from serve_apps.app import build_app

    try:
        serve.run(build_app(config), name=name, route_prefix="/")
        yield
    finally:
        serve.delete(name)


@contextmanager
def served_default(proxy: str, tmp_path_factory: Any) -> Iterator[tuple[str, Path]]:
    """An application of the default limits with one twin shard and one Ingress replica on the shared proxy:
    (base URL, data root). Shared by tests/test_serve_lifecycle.py and tests/test_serve_recalibration.py (the
    `serve_default` fixture of `tests/conftest.py`), each with tenants of its own (`tenant_keys`)."""
    root = tmp_path_factory.mktemp("serve-default")
    (root / "keys.json").write_text("[]")  # the modules add their keys; the app reads the file again when it changes
    config = {"store_url": str(root / "store"), "keys_file": str(root / "keys.json"), "twin_shards": 1,
              "namespace": "raytwin-default-tests", "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    with deployed(config):
        yield proxy, root


def tenant_keys(root: Path, keys: Iterable[tuple[str, str, str, tuple[str, ...]]]) -> dict[str, str]:
    """Keys (name, tenant, role, grants), each held by a person of its name, added to ``root/keys.json``: key by
    name."""
    from serve_apps.auth import create_key

    return {name: create_key(root / "keys.json", tenant, role, grants, owner=name)[1]
            for name, tenant, role, grants in keys}


class InProcessHandle:
    """A `DeploymentHandle` stand-in: `handle.method.remote(*args)` runs the backend's code here."""

    def __init__(self, backend: Any):
        self.backend = backend

    def __getattr__(self, method: str) -> Any:
        async def remote(*args: Any) -> Any:
            result = getattr(self.backend, method)(*args)
            return await result if inspect.isawaitable(result) else result
        return type("Method", (), {"remote": staticmethod(remote)})


def serve_config(root: Path) -> Any:
    """The `ServeConfig` of `in_process_app`'s services: store in ``root/store``, keys in ``root/keys.json``."""
    from serve_apps.config import ServeConfig

    return ServeConfig(store_url=str(root / "store"), keys_file=str(root / "keys.json"), rate_per_s=1000,
                       rate_burst=1000, model_packages=TEST_MODELS)


def in_process_app(backend: Any, root: Path) -> tuple[Any, dict[str, dict[str, str]]]:
    """The API app in this process in front of `backend` (an object with the `Backend` methods the tested routes
    call; no Ray needed), its store and keys (`KEYS`, in ``root/keys.json``) under `root`: (app, headers by key
    name); its services are ``app.state.services``."""
    from raytwin.storage import filesystem
    from serve_apps.api import create_api
    from serve_apps.audit import AuditLog
    from serve_apps.auth import KeyStore, create_key
    from serve_apps.deps import BackendClient, Services
    from serve_apps.limits import TokenBuckets
    from serve_apps.twin_reads import TwinReader

    keys_file = root / "keys.json"
    keys = {name: create_key(keys_file, tenant, role, grants, owner=name)[1] for name, tenant, role, grants in KEYS}
    config = serve_config(root)
    app = create_api()
    app.state.services = Services(
        config=config, keys=KeyStore(config.keys_file), backend=BackendClient(InProcessHandle(backend)),
        audit=AuditLog(config.store_url), buckets=TokenBuckets(1000, 1000), fs=filesystem(config.store_url)[0],
        twins=TwinReader(config), changes=None, change_store=None)
    return app, {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}


@contextmanager
def in_process(backend: Any, root: Path) -> Iterator[tuple[Any, dict[str, dict[str, str]], Any]]:
    """`in_process_app` behind a test client: (test client, headers by key name, services)."""
    from fastapi.testclient import TestClient

    app, auth = in_process_app(backend, root)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, auth, app.state.services


def job_results(root: Path, job_id: str = "j1") -> Path:
    """Where `in_process_app`'s config (store under `root`) keeps scenario job `job_id`'s (tenant acme) result files."""
    return root / "store" / "jobs" / "acme" / job_id / "results"


def succeeded_job(root: Path, files: dict[str, bytes], job_id: str = "j1", recorded: bool = True) -> Any:
    """A succeeded scenario job (`JobRecord`) of tenant acme whose result `files` are written where `in_process_app`'s
    config (store under `root`) keeps them (`job_results`), with their SHA-256 recorded (`recorded` False: none, as
    a job recorded before jobs kept them)."""
    import hashlib
    from datetime import UTC, datetime

    from serve_apps.jobs import JobRecord

    results = job_results(root, job_id)
    for name, data in files.items():
        results.mkdir(parents=True, exist_ok=True)
        (results / name).write_bytes(data)
    outputs = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()} if recorded else {}
    return JobRecord(job_id=job_id, kind="scenario", tenant="acme", key_id="k", asset_id="zone-1",
                     model_ref="thermal_rc@1.0.0", content_hash="ab" * 32, scenarios=1, n_steps=60, state="succeeded",
                     submitted=datetime.now(UTC), result_url=str(results), outputs=outputs)


class JobFiles:
    """A stand-in backend that knows some succeeded jobs of `in_process_app`'s store under `root` (the job file routes
    ask it for `get_job` only)."""

    def __init__(self, root: Path, *jobs: Any):
        self.config = serve_config(root)
        self.jobs = {job.job_id: job for job in jobs}

    def get_job(self, tenant: str, job_id: str) -> Any:
        from serve_apps.errors import NotFound

        job = self.jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"job {job_id} not found")
        return job

    def job_status(self, tenant: str, job_id: str) -> Any:
        return self.get_job(tenant, job_id).stored_status(self.config)  # as `Backend.job_status` answers one


def saved_run(runs_root: Path, run_id: str, files: dict[str, bytes]) -> None:
    """A succeeded calibration run of tenant acme in `runs_root` (a store's ``runs/acme``) whose output `files` are
    stored and recorded with their SHA-256."""
    import hashlib
    from datetime import UTC, datetime

    from sweeps.runs import RunRecord, RunStore

    runs = RunStore(str(runs_root))
    out = Path(runs.output_url(run_id))
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    now = datetime.now(UTC)
    runs.save(RunRecord(run_id=run_id, kind="calibration", status="succeeded", user="u", tenant="acme",
                        asset_id="zone-1", model_ref="thermal_rc@1.0.0", model_hash="ab" * 32, seeds={},
                        package_versions={}, code_version="x", started=now, finished=now, output_url=str(out),
                        outputs={name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
                        spec={"model": "thermal_rc@1.0.0"}))


class AuditWrites:
    """The audit log's store taking its first `ok` writes, the others failing as a full disk does."""

    def __init__(self, fs, ok: int):
        self.fs, self.ok = fs, ok

    def pipe_file(self, path: str, data: bytes, **kwargs) -> None:
        from raytwin.storage import replace_file

        if self.ok == 0:
            raise OSError(28, "No space left on device")
        self.ok -= 1
        replace_file(self.fs, path, data)
