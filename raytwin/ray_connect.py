"""Joining a running Ray cluster from a command: refuse at once where nothing listens at its address; stopping
the tasks a command started when it is interrupted (`cancel_tasks`), after its run is recorded (`cancels_deferred`).

`ray.init(address=...)` to an address where no Ray answers retries for minutes (over 3 minutes with Ray 2.60)
before it raises, with a log line every few seconds; a command an operator typed should say in seconds that
nothing listens there. A port that accepts is left to Ray (it may be a Ray that requires a token, whose refusal
is quick, or not a Ray at all, which Ray reports in its own time).
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["PROBE_TIMEOUT_S", "cancel_tasks", "cancels_deferred", "first_line", "local_start_failure", "unreachable"]

_deferred: contextvars.ContextVar[list | None] = contextvars.ContextVar("raytwin_deferred_cancels", default=None)

PROBE_TIMEOUT_S = 5.0


def unreachable(address: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why nothing answers at the Ray cluster `address` (as `ray.init` would take it), or None.

    None where Ray finds or starts the cluster itself (None, "auto", "local"); a `ray://` client address is
    checked alike (its server's host and port), and an address without a port is refused as one.
    """
    from ray._private.services import canonicalize_bootstrap_address, parse_address

    if address is None or address in ("auto", "local"):
        return None
    if address.startswith("ray://"):
        target = parse_address(address.removeprefix("ray://"))
    else:
        try:  # where Ray will connect: a loopback name becomes this node's address, as Ray rewrites it
            canonical = canonicalize_bootstrap_address(address)
        except Exception:  # noqa: BLE001 - Ray raises ValueError (no port) or a resolver's error
            canonical = None
        target = parse_address(canonical) if canonical else None
    if target is None:
        return f"{address!r} is not a Ray cluster address (host:port, ray://host:port or auto)"
    host, port = target
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        return f"nothing answers at {host}:{port} ({reason})"


def first_line(e: BaseException) -> str:
    """The first non-blank line of `e`'s message (its type's name if none): Ray's errors run to many lines."""
    return next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)


def local_start_failure(e: BaseException, join: str, temp_dir: str = "default RAY_TMPDIR/ray") -> str:
    """The one line a command prints when the local Ray it started did not come up, saying what to do: a node that
    took longer than the 30 s `ray.init` waits for it (hard-coded in Ray 2.60's `ray._private.node`, no setting
    raises it) is a loaded machine, where Ray's ~60-line traceback said nothing of the kind. `join` says how the
    command takes a Ray started by hand (`pass --address`)."""
    if "timed out" in str(e):
        hint = ("this machine is probably loaded: Ray waits 30 s for its node, and no setting raises that; retry "
                f"when it is less busy, or start Ray yourself, `ray start --head`, and {join}")
    else:
        hint = f"Ray's logs: session_latest/logs in its temporary directory ({temp_dir})"
    return f"error: the local Ray did not start: {first_line(e)} ({hint})"


def cancel_tasks(refs: Iterable[Any]) -> None:
    """Cancel (force: kill their workers) the Ray tasks of `refs` on Ctrl-C, SIGTERM or an error in their driver:
    otherwise they run on, holding the cluster's CPUs, until the driver exits, long after the run was
    recorded cancelled."""
    deferred = _deferred.get()
    if deferred is not None:
        deferred.extend(refs)
        return
    import ray

    for ref in refs:
        ray.cancel(ref, force=True)


@contextlib.contextmanager
def cancels_deferred() -> Iterator[None]:
    """Within it, `cancel_tasks` only notes its refs; they are cancelled as it exits, after the code inside has
    recorded how its run ended. Ray 2.60 can abort the calling process when a cancel races a task's completion (a
    CHECK in its task manager, "Tried to complete task that was not pending", a race ray-project/ray PR 54798 closed
    on another path): cancelling last, an abort costs the run its cleanup, never its record."""
    token = _deferred.set([])
    try:
        yield
    finally:
        refs = _deferred.get()
        _deferred.reset(token)
        cancel_tasks(refs)
