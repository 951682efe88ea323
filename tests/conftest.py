"""Shared fixtures: one local S3-compatible server and one local Ray instance per test session; a real
two-node Ray cluster, a Ray Serve instance and an application on it shared by the modules that ask for them, which
run back to back (`tests/shared_resources.py`). Every test, and every module's fixtures, must stop the RayTwin
background threads they start (`_no_background_thread_left`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from benchmarks.local_s3 import local_s3, new_bucket
from cluster.local import LocalCluster, LocalClusterInfo
from raytwin.ports import free_port
from tests.fixtures_cluster import cluster_processes
from tests.fixtures_serve import served_default
from tests.shared_resources import SharedResource, close_unless_next_uses, group_users


class WriterKilled(BaseException):
    """A writer's process dying part way: nothing after it runs, no `except Exception` handler catches it."""


@pytest.fixture(autouse=True)
def _unwrapped_cli_errors(monkeypatch):
    """Typer's error box is 80 columns wide and breaks a longer word (a path under pytest's temporary directory,
    whose length each machine's run counter decides) across its lines, which a test reading the message joins
    with a space: as wide as no message needs, so a message's words stay whole on every machine."""
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 1_000)


BACKGROUND_THREADS = ("store-watch", "temp-sweep", "shadow-conclusions", "lifecycle-audit", "change-catch-up", "store-probe",
                      "connector-supervise", "raytwin-lease-heartbeat", "raytwin-ingest-source", "down-", "pump-",
                      "opcua-", "twin-write-settle")
"""The names (or their starts) of the threads RayTwin's objects start and stop (`threading.Thread(name=...)` in
the product code); not ``raytwin-metrics``, the process's own until it exits."""

THREAD_STOP_GRACE_S = 30.0
"""How long a thread that is stopping may take to end (a store watch's pass in progress: `Backend.close` waits
`FENCE_READ_S` for it). Waited only while such a thread is still alive."""


_reported: set[threading.Thread] = set()
"""The threads a guard failed a test for already: not again for every wider block around it."""


def _background(threads: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threads - _reported if t.is_alive() and t.name.startswith(BACKGROUND_THREADS)]


@contextmanager
def _no_background_thread_left(what: str) -> Iterator[None]:
    """Fails if a RayTwin background thread started in the block is still running after it (and a grace period):
    a backend's store watch a benchmark left running set another test's fence gauge (CI's one failure) long after
    the test that leaked it had passed. Threads already running before the block are not its own."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_STOP_GRACE_S
    for thread in _background(set(threading.enumerate()) - before):
        thread.join(max(deadline - time.monotonic(), 0.0))
    if left := _background(set(threading.enumerate()) - before):
        _reported.update(left)
        pytest.fail(f"{what} left RayTwin background threads running: {', '.join(sorted(t.name for t in left))}; "
                    "stop what started them at its end (`Backend.close`, `TwinService.close`, `Pump.stop`, ...)",
                    pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_no_background_thread(request) -> Iterator[None]:
    """The module's fixtures (torn down before this one) stop what they started."""
    with _no_background_thread_left(f"the fixtures of {request.module.__name__}"):
        yield


@pytest.fixture(autouse=True)
def _test_leaves_no_background_thread(request) -> Iterator[None]:
    """The test and its function-scoped fixtures stop what they started (the wider fixtures, set up before this
    one, own theirs)."""
    with _no_background_thread_left(request.node.nodeid):
        yield


@pytest.fixture
def killed_mid_write(monkeypatch) -> Callable[[], AbstractContextManager[None]]:
    """`with killed_mid_write(): <a store write>`: the write's first synced file (`raytwin.storage.replace_file`)
    keeps half its bytes and its writer dies there (`WriterKilled`, expected). A write that syncs nothing (one in
    place) is not killed, and the block fails."""
    real = os.fsync

    def dies_half_way(fd: int) -> None:
        monkeypatch.setattr(os, "fsync", real)
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        raise WriterKilled

    @contextmanager
    def killed() -> Iterator[None]:
        monkeypatch.setattr(os, "fsync", dies_half_way)
        try:
            with pytest.raises(WriterKilled):
                yield
        finally:
            monkeypatch.setattr(os, "fsync", real)

    return killed


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback; RayTwin finds it through RAYTWIN_S3_ENDPOINT_URL."""
    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    """A fresh, empty bucket for one test."""
    return new_bucket(s3_endpoint)


@pytest.fixture(scope="module")
def s3_module_url(s3_endpoint) -> str:
    """A fresh, empty bucket shared by the tests of one module."""
    return new_bucket(s3_endpoint)


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """The port of the session Ray's metrics export (Prometheus text at ``/metrics``)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, ray_metrics_port):
    """One local Ray for the whole session (a start costs seconds); workers see the S3 endpoint.
    Its metrics agent exports on `ray_metrics_port` every second (Ray's default: 10 s). Its Serve proxy
    passes the client's own X-Request-ID on as RayTwin's proxy callback does (`serve_apps.limits`), without
    the overload gate, which its tests build themselves."""
    import ray

    from serve_apps import limits
    from serve_apps.serve_env import PROXY_CALLBACK_ENV

    with pytest.MonkeyPatch.context() as env:  # read by the processes Ray starts, not by later subprocesses
        env.setenv(PROXY_CALLBACK_ENV, f"{limits.__name__}:{limits.client_request_id_middlewares.__name__}")
        ray.init(num_cpus=2, include_dashboard=False, namespace="raytwin-tests", logging_level="WARNING",
                 _metrics_export_port=ray_metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    for resource in SHARED.values():  # what runs on this Ray (the last test's teardown ends the session's fixtures
        resource.close()  # before `pytest_runtest_teardown` closes them)
    ray.shutdown()


@pytest.fixture
def cancelled_tasks(monkeypatch) -> list:
    """The refs `ray.cancel` is called with during the test (each still cancelled): what an interrupted run stopped."""
    import ray

    cancelled, real_cancel = [], ray.cancel

    def recording_cancel(ref, **kwargs):
        cancelled.append(ref)
        real_cancel(ref, **kwargs)

    monkeypatch.setattr(ray, "cancel", recording_cancel)
    return cancelled


REFERENCE_FMU_MODELS = {2: ("VanDerPol", "Dahlquist", "BouncingBall", "Feedthrough", "Stair"),
                        3: ("VanDerPol", "Dahlquist", "Feedthrough", "StateSpace")}
"""The Reference FMUs the session builds, per FMI version."""


@pytest.fixture(scope="session")
def reference_fmus(tmp_path_factory) -> dict[tuple[int, str], str]:
    """(FMI version, model) -> built .fmu path, from ../shared/reference-fmus (a few seconds per FMI
    version; fails, never skips, without CMake or the sources)."""
    from raytwin.fmu.reference import build_reference_fmus

    out = tmp_path_factory.mktemp("reference-fmus")
    return {(v, m): str(p) for v, models in REFERENCE_FMU_MODELS.items()
            for m, p in build_reference_fmus(out, v, models).items()}


@contextmanager
def _two_node_cluster() -> Iterator[LocalClusterInfo]:
    """A head and one worker node (1 CPU each) as separate `ray start` processes, reached only over HTTP;
    every node is stopped at the end, also when a test failed."""
    with LocalCluster(num_workers=1, cpus_per_node=1, object_store_mb=100) as info:
        yield info
    assert cluster_processes(info.temp_dir) == []


@contextmanager
def _serve_proxy() -> Iterator[str]:
    """Ray Serve (controller and HTTP proxy) on the session's Ray, on a free loopback port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


SHARED = {"serve_default": SharedResource(served_default), "local_cluster": SharedResource(_two_node_cluster),
          "serve_proxy": SharedResource(_serve_proxy)}
"""Closed in this order: an application on Serve before Serve."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for fixture, resource in SHARED.items():
        group_users(items, fixture, resource)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    try:
        return (yield)  # the test's own fixtures first (a module's Serve application is deleted there)
    finally:
        close_unless_next_uses(SHARED, nextitem)


def pytest_sessionfinish() -> None:
    for resource in SHARED.values():  # an interrupted session
        resource.close()


@pytest.fixture(scope="module")
def local_cluster() -> LocalClusterInfo:
    """The two-node cluster (`_two_node_cluster`), shared with the modules before and after that use it."""
    return SHARED["local_cluster"].get()


@pytest.fixture(scope="module")
def serve_proxy(ray_session) -> str:
    """Base URL of Ray Serve's HTTP proxy, shared with the modules before and after that use it: a module
    deploys its own application (`serve.run`, route prefix ``/``) and deletes it (`serve.delete`) at its end."""
    return SHARED["serve_proxy"].get()


@pytest.fixture(scope="module")
def serve_default(serve_proxy, tmp_path_factory) -> tuple[str, Path]:
    """An application of the default limits (`tests.fixtures_serve.served_default`), shared with the modules before
    and after that use it: each module's tenants are its own."""
    return SHARED["serve_default"].get(serve_proxy, tmp_path_factory)
