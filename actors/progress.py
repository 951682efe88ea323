"""A synchronous actor's progress, read by a probe that does not wait behind its calls.

Why: a twin shard runs its calls one at a time on one thread, so a readiness probe sent as an ordinary call
waits for every call queued before it: a shard resumed with a minute of telemetry backlog read as down for
that minute, and a load balancer took a healthy, busy service out of rotation (an overload made an outage).
A probe method in a concurrency group of its own (`PROBE_GROUP`, `probe_call`) runs on that group's thread
and answers at once. What it must still tell is a shard that stopped making progress (a store read that
never returns, a deadlock): the call it runs now and since when (`CallClock`), which every public method
records (`timed_calls`). A process that is stopped (SIGSTOP), dead or restarting answers nothing at all.

Ray runs a synchronous actor's default group in submission order on one thread whether or not the actor
has other groups (its `max_concurrency` stays 1), so only the probe methods run beside a call.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import ray

PROBE_GROUP = "probe"
"""The concurrency group of probe methods: one thread of its own in the actor (`ray.remote(concurrency_groups=...)`)."""
_PROBE_MARK = "__raytwin_probe__"

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


class Busy(NamedTuple):
    """The call an actor runs now (its method's name) and for how long (seconds)."""

    call: str
    running_s: float


class CallClock:
    """Which call the actor's call thread runs now and since when, readable from the probe's thread.

    Thread safety: only the call thread writes (`start`, `end`; the actor's default group runs one call at a
    time), and it replaces `_current` whole, one reference store, which another thread reads before or after,
    never half-way; the nesting depth is the call thread's alone."""

    def __init__(self) -> None:
        self._current: tuple[str, float] | None = None  # (method, time.monotonic() at its start)
        self._depth = 0

    def start(self, call: str) -> None:
        """A public method starts; one called by another is part of the outer call."""
        self._depth += 1
        if self._depth == 1:
            self._current = (call, time.monotonic())

    def end(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._current = None

    def busy(self) -> Busy | None:
        """The running call and its age; None between calls."""
        current = self._current  # read once: the call thread may replace it meanwhile
        return None if current is None else Busy(current[0], time.monotonic() - current[1])


def probe_call(method: F) -> F:
    """Put an actor method in `PROBE_GROUP`, untimed: it runs on that group's thread beside the running call, so
    it may read only state that is safe to read from another thread (`CallClock.busy`)."""
    setattr(method, _PROBE_MARK, True)
    return ray.method(concurrency_group=PROBE_GROUP)(method)


def probed_actor(cls: type) -> Any:
    """The Ray actor class of `cls`, whose probe calls need their group declared (a subclass's too)."""
    return ray.remote(concurrency_groups={PROBE_GROUP: 1})(cls)


def timed_calls(cls: C) -> C:
    """Make every public method of `cls` but its probe calls record itself in the instance's `call_clock` (a
    `CallClock` its constructor sets). In place, so the actor class keeps its name; a method added later is timed
    too, with no decorator to forget. Private methods are parts of calls, never calls."""
    for name, method in inspect.getmembers(cls, inspect.isfunction):
        static = isinstance(inspect.getattr_static(cls, name), staticmethod)  # no instance, no clock
        if not name.startswith("_") and not static and not getattr(method, _PROBE_MARK, False):
            setattr(cls, name, _timed(name, method))
    return cls


def _timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)  # Ray reads the signature through `__wrapped__`
    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.call_clock.start(name)
        try:
            return method(self, *args, **kwargs)
        finally:
            self.call_clock.end()

    return timed
