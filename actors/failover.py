"""Fast failover of twin shards: what a restarted shard costs, and how the service bridges the gap.

When a shard's process dies, Ray starts a new one, which imports JAX, compiles the filter kernels
and rebuilds its twins from snapshot + log (`actors.recovery`); its twins cannot answer until then.
Measured on the 2-core development machine (see actors/README.md, *Failover*): the compiles were
most of it, so shard processes keep XLA's executables in a persistent cache on the node
(`compilation_cache`), and reads during the gap are answered from the last durable state, marked
stale (`actor_restarting` tells a restart from a busy shard), instead of waiting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
from ray._raylet import ActorID, WorkerID
from ray.core.generated import gcs_pb2

from raytwin.executables import DIR_ENV

CACHE_DIR_ENV = "RAYTWIN_JAX_CACHE_DIR"
"""Where shard processes keep compiled kernels (default ``~/.cache/raytwin/jax``); empty: no cache."""

EXECUTABLES_SUBDIR = "raytwin-executables"
"""The serialized filter kernels' folder in that directory (JAX's cache only touches its own files)."""

JAX_SUBDIR = "xla-1-cpu"
"""JAX's own cache folder in that directory: executables made by one-CPU backends, as shards start theirs
(`raytwin.sim.cpu.backend_cpu_count`). JAX's cache key does not hold that size: a folder shared with processes of
default-sized backends would hand shards executables that split every loop across threads."""


def compilation_cache_dir() -> str | None:
    """The persistent compilation cache directory of shard processes, None when switched off."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured is not None:
        return configured or None
    return str(Path.home() / ".cache" / "raytwin" / "jax")


def compilation_cache(options: dict[str, Any]) -> dict[str, Any]:
    """Ray actor `options` whose process keeps JAX's compiled executables on disk.

    Set through the actor's runtime environment, so only the shard processes use the cache (a
    library importer's global JAX settings are left alone). Every kernel is cached, however fast it
    compiled: a restarted shard otherwise recompiled each of them (~70 % of its restart); JAX's files go in
    `JAX_SUBDIR`, apart from those of processes whose backend is not sized for one CPU. The filter
    kernels are also kept serialized (`raytwin.executables`; in `EXECUTABLES_SUBDIR`, or where
    ``RAYTWIN_EXECUTABLES_DIR`` says, empty: not kept): loading them skips the tracing and lowering
    that finding them in JAX's cache still costs."""
    directory = compilation_cache_dir()
    if directory is None:
        return options
    runtime_env = dict(options.get("runtime_env") or {})
    executables = os.environ.get(DIR_ENV, str(Path(directory) / EXECUTABLES_SUBDIR))
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}),
                               "JAX_COMPILATION_CACHE_DIR": str(Path(directory) / JAX_SUBDIR),
                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", DIR_ENV: executables}
    return {**options, "runtime_env": runtime_env}


def actor_restarting(handle: Any) -> bool:
    """Whether Ray's control store (GCS) reports the actor as restarting (its process died and a new
    one is starting). Not a first start: a service just created answers from its recovered twins,
    as before, and not a dead actor: its calls fail.

    Why not an error or a timeout: calls to a restarting actor queue until it is back, and a slow
    answer may come from a busy shard that is alive, whose state must not be replaced by an older
    one. Ray has no public call for this without its dashboard, hence its internal state API."""
    info = ray._private.state.actors(actor_id=handle._actor_id.hex())
    return bool(info) and info.get("State") == "RESTARTING"


def actor_worker(handle: Any) -> tuple[bytes, int] | None:
    """(worker ID, PID) of the process that runs the actor, per Ray's control store (GCS); None while it has none
    (not placed yet). What `worker_alive` watches: the actor's name comes free before its process has exited. Ray's
    internal state API, as `actor_restarting`: the public one needs the dashboard."""
    raw = ray._private.state.state._connect_and_get_accessor().get_actor_info(ActorID(handle._actor_id.binary()))
    info = gcs_pb2.ActorTableData.FromString(raw) if raw else None
    return (info.address.worker_id, info.pid) if info and info.address.worker_id else None


def worker_alive(worker_id: bytes) -> bool:
    """Whether GCS still counts the worker process alive: its node's raylet reports it dead once the process's
    connection to it closes, as the process exits (on any node: no PID of another host to look at)."""
    raw = ray._private.state.state._connect_and_get_accessor().get_worker_info(WorkerID(worker_id))
    return raw is not None and gcs_pb2.WorkerTableData.FromString(raw).is_alive


def process_age_s() -> float:
    """Seconds since this process started (Linux `/proc`; 0.0 elsewhere): the start-up log reports
    it so an operator sees how much of a restart was process start and imports."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
