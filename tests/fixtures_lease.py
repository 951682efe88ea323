"""A lease holder's shards renewing the store's heartbeat, for tests of whoever watches it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from raytwin.statestore import Heartbeat, Lease, StateStore


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
