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
