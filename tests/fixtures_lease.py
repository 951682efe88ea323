"""A lease holder's shards renewing the store's heartbeat, for tests of whoever watches it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from raytwin import statestore
from raytwin.statestore import Heartbeat, Lease, StateStore

WATCH_EXPIRY_S = 1.0
"""`LEASE_EXPIRY_S` for the tests whose watcher must see `renewing`'s heartbeat renewed: 20 of its renewals. At 0.2 s
one heartbeat write the disk held up (fsyncs of 0.16 s seen on a loaded 2-core machine) read as a stopped holder,
and the lifecycle CLI wrote beside a "running" service. A holder that stopped takes this long to be seen so."""


def watched_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's lease watched as a service's is (`StateStore.live_holder`), in `WATCH_EXPIRY_S`, not 6 s."""
    monkeypatch.setattr(statestore, "LEASE_EXPIRY_S", WATCH_EXPIRY_S)
    monkeypatch.setattr(statestore, "LEASE_HEARTBEAT_S", 0.02)


def renewing(store: StateStore, held: Lease, until: Callable[[], bool],
             clock: Callable[[], float] = time.time) -> threading.Thread:
    """A started thread renewing `held`'s heartbeat as its shards would (every 0.05 s, with the time of
    `clock`: the holder's host's), until `until()`."""
    def renew() -> None:
        while not until():
            store.write_heartbeat(Heartbeat(held.owner, held.epoch, held.cluster, clock()))
            time.sleep(0.05)

    store.write_heartbeat(Heartbeat(held.owner, held.epoch, held.cluster, clock()))
    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    return renewer
