"""Batch work yields the CPU to the live path: sweep chunks and calibration trials run their threads at the
kernel's idle priority, so a twin shard's ingest call on the same node runs the moment it wakes.

Why: a sweep's or a calibration's tasks take every core Ray gives them, and Ray starts every worker at one
niceness (15), twin shards included. On a node that also holds shards, each of their calls then waited its
turn behind the batch threads: the live path's p95 grew with the batch work beside it (benchmarks/RESULTS.md,
*Batch work beside the live path*). Under Linux's `SCHED_IDLE` a batch thread still gets every cycle nothing
else wants, and is preempted at once by anything that does.

Only processes that run batch work and nothing else may call `yield_to_live`: a thread cannot raise its
priority back without privilege, so a Ray worker that took it keeps it for every later task. The workers are
kept apart by their runtime environment (`batch_worker`: Ray never hands a task to a worker of another
environment), and `yield_to_live` does nothing in a process without that mark.

`RAYTWIN_BATCH_CPU_PRIORITY`: ``idle`` (the default, `SCHED_IDLE`), ``low`` (niceness 19: batch threads still
get a share beside busy live work) or ``normal`` (unchanged: batch work competes as before).
"""

from __future__ import annotations

import logging
import os
from contextlib import suppress
from functools import cache
from typing import Any, Literal

log = logging.getLogger("raytwin.cpu_priority")

BATCH_WORKER_ENV = {"RAYTWIN_BATCH_WORKER": "1"}
"""The mark of a worker process that runs batch work alone (`batch_worker`)."""
PRIORITY_ENV = "RAYTWIN_BATCH_CPU_PRIORITY"
Priority = Literal["idle", "low", "normal"]
PRIORITIES: tuple[str, ...] = Priority.__args__
_THREADS = "/proc/self/task"


def batch_worker(options: dict[str, Any]) -> dict[str, Any]:
    """Ray task/actor `options` with `BATCH_WORKER_ENV` (and `PRIORITY_ENV` as this process sees it) added to
    their runtime_env's env_vars: such tasks get workers of their own, which `yield_to_live` may lower."""
    runtime_env = dict(options.get("runtime_env") or {})
    marks = {**BATCH_WORKER_ENV, **({PRIORITY_ENV: os.environ[PRIORITY_ENV]} if PRIORITY_ENV in os.environ else {})}
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **marks}
    return {**options, "runtime_env": runtime_env}


def batch_priority() -> Priority:
    """The priority `PRIORITY_ENV` asks for (default ``idle``); a clear error for another value."""
    value = os.environ.get(PRIORITY_ENV, "idle").strip().lower()
    if value not in PRIORITIES:
        raise ValueError(f"{PRIORITY_ENV}={os.environ[PRIORITY_ENV]!r} is not one of {', '.join(PRIORITIES)}: "
                         "idle runs batch work only on CPU time the live path leaves, low at niceness 19, normal "
                         "beside it as an equal")
    return value  # type: ignore[return-value]


@cache
def yield_to_live(*, dedicated: bool = False) -> Priority | None:
    """Put every thread of this batch worker (and those it starts later, which inherit it) at `batch_priority`;
    the priority taken, or None where this is not a batch worker or the OS has no such setting. A batch worker
    is a process with the `BATCH_WORKER_ENV` mark, or, `dedicated`, one its caller knows runs nothing else (a
    Tune trial's actor). Once per process (it cannot be undone)."""
    marked = os.environ.get("RAYTWIN_BATCH_WORKER") == "1"
    if not (marked or dedicated) or not hasattr(os, "sched_setscheduler"):
        return None
    priority = batch_priority()
    if priority == "normal":
        return priority
    tids = [int(t) for t in os.listdir(_THREADS)] if os.path.isdir(_THREADS) else [0]
    for tid in tids:
        with suppress(ProcessLookupError):  # a thread that has exited since the listing
            if priority == "idle":
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.setpriority(os.PRIO_PROCESS, tid, 19)
    log.info("event=batch_priority priority=%s threads=%d", priority, len(tids))
    return priority
