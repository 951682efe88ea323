"""Whether a value its writer rewrites every few seconds is still rewritten, on this process's monotonic clock.

The holder of a store's lease has its shards rewrite the lease heartbeat every `LEASE_HEARTBEAT_S`. Three readers
ask whether that still happens: a service of another Ray cluster deciding whether the holder crashed
(`actors.lease`), health deciding whether the store still takes writes (`serve_apps.backend`), and the lifecycle
CLI deciding whether a service holds the store (`StateStore.live_holder`). Each compares the values it reads, never
the heartbeat's time with its own clock: that time is the holder's host's clock, and a host whose clock ran 6 s
ahead took a live store at once while one behind refused a crashed holder's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RenewalWatch(Generic[T]):
    """Feed it each value read (`quiet_for`): it says once no renewal was seen for `quiet_s`. A renewal is a value
    other than the one read before that `renews` accepts (default: any); one it does not accept (a previous
    holder's dying shard overwrote the heartbeat) neither counts as a renewal nor restarts the quiet time."""

    def __init__(self, quiet_s: float, renews: Callable[[T], bool] = lambda _value: True):
        self.quiet_s = quiet_s
        self._renews = renews
        self._seen: T | None = None
        self._quiet_since: float | None = None  # the last renewal's time, or the first read's
        self.renewed_at: float | None = None
        """When the last renewal was seen (monotonic time; None: none yet)."""

    def quiet_for(self, value: T, now: float) -> float | None:
        """Seconds without a renewal as of `now` (this process's `time.monotonic()`), counted from the first value
        fed, once they reach `quiet_s`; None while a renewal (or the first value) is more recent."""
        if self._quiet_since is None:
            self._quiet_since = now
        elif value != self._seen and self._renews(value):
            self._quiet_since = self.renewed_at = now
        self._seen = value
        quiet = now - self._quiet_since
        return quiet if quiet >= self.quiet_s else None


def renewals(read: Callable[[], T], quiet_s: float, every_s: float,
             renews: Callable[[T], bool] = lambda _value: True) -> Iterator[float | None]:
    """Watch the value `read` returns for renewals (`RenewalWatch`), reading it every `every_s`: after each read but
    the first, yields when the last renewal was seen (monotonic time; None: none yet); ends once none was seen for
    `quiet_s` (its writer stopped). Each reader ends the watch on its own condition as well: at the first renewal,
    or at a deadline."""
    watch = RenewalWatch(quiet_s, renews)
    watch.quiet_for(read(), time.monotonic())
    while True:
        time.sleep(every_s)
        if watch.quiet_for(read(), time.monotonic()) is not None:
            return
        yield watch.renewed_at
