"""The guard every test runs under (`tests.conftest._no_background_thread_left`): a RayTwin background thread a
test leaves running fails that test, not a later one whose gauges it sets."""

from __future__ import annotations

import threading

import pytest

from tests import conftest


def test_a_background_thread_left_running_fails_the_block_that_started_it(monkeypatch):
    monkeypatch.setattr(conftest, "THREAD_STOP_GRACE_S", 0.2)
    stop = threading.Event()
    try:
        with pytest.raises(pytest.fail.Exception, match="block left RayTwin background threads running: store-watch"):
            with conftest._no_background_thread_left("block"):
                threading.Thread(target=stop.wait, name="store-watch", daemon=True).start()
                threading.Thread(target=stop.wait, name="not-raytwins", daemon=True).start()  # not named: not ours
    finally:
        stop.set()


def test_a_thread_that_ends_within_the_grace_period_passes(monkeypatch):
    """A store watch's pass in progress when its backend closed ends soon after: no failure."""
    monkeypatch.setattr(conftest, "THREAD_STOP_GRACE_S", 5.0)
    stop = threading.Event()
    with conftest._no_background_thread_left("block"):
        threading.Thread(target=stop.wait, name="store-watch", daemon=True).start()
        threading.Timer(0.1, stop.set).start()  # its stop, set as the block ends


def test_every_named_thread_the_product_starts_is_guarded():
    """Each ``threading.Thread(name=...)`` of the product's packages is one the guard knows (`BACKGROUND_THREADS`), or
    the metrics thread the process keeps: a new one left out would leak unnoticed again."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    names = []
    for package in ("raytwin", "actors", "serve_apps", "connectors", "sweeps", "cluster", "client"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "Thread":
                    name = next((k.value for k in node.keywords if k.arg == "name"), None)
                    if isinstance(name, ast.JoinedStr):  # f"pump-{name}": its constant start
                        name = name.values[0] if name.values and isinstance(name.values[0], ast.Constant) else None
                    if isinstance(name, ast.Constant):
                        names.append((f"{path.relative_to(root)}:{node.lineno}", name.value))
    assert len(names) >= 10  # (the walk found the product's threads)
    unguarded = [(where, n) for where, n in names if not n.startswith(conftest.BACKGROUND_THREADS)
                 and n != "raytwin-metrics"]
    assert not unguarded, f"add these thread names to tests/conftest.py's BACKGROUND_THREADS: {unguarded}"
