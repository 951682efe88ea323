"""How throughput kernels use a CPU: vector width at compile time, one thread per core at run time;
and keeping the workers meant for CPUs off a node's GPU (`cpu_only`, `use_cpu_backend`).

Two measured facts about XLA's CPU backend (jaxlib 0.10) drive this module (numbers in
``sweeps/README.md``):

- XLA emits 256-bit vector code by default (it avoids AVX-512 clock throttling on older Intel
  parts). 512-bit code ran the fused sweep kernels 1.21-1.25x faster on the benchmark VM with
  bit-identical results (elementwise IEEE arithmetic either way). On a CPU without AVX-512, LLVM
  splits each vector into two halves.
- XLA sizes its intra-op thread pool, and splits every large fused loop into that many parallel
  tasks, from the CPU affinity of the thread that starts the backend, whatever
  ``--xla_cpu_multi_thread_eigen`` says. A one-CPU Ray task on a 2-core machine therefore ran each
  scan iteration as 2 tasks handed to a second thread: ~8 us of hand-off per iteration and a
  thread competing with the other worker's core. Starting the backend under a one-CPU affinity
  removes the split: 1.5-2.2x more scenario-steps per CPU-second per worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import suppress
from functools import cache, wraps
from typing import Any

import jax
from jax._src import xla_bridge  # no public call tells whether the backends have started

CPU_ONLY_ENV = {"JAX_PLATFORMS": "cpu"}
"""Environment of the Ray workers that run JAX on a CPU by design (twin shards, API replicas,
CPU sweep tasks). On a GPU node JAX would otherwise start its CUDA backend in each of them and
preallocate most of the GPU's memory, outside Ray's GPU accounting: seen on an H100 node, where a
restarted twin shard then failed to start its backend."""


def cpu_only(options: dict[str, Any]) -> dict[str, Any]:
    """Ray actor/task `options` with `CPU_ONLY_ENV` added to their runtime_env's env_vars."""
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **CPU_ONLY_ENV}
    return {**options, "runtime_env": runtime_env}


def use_cpu_backend() -> None:
    """Run JAX on the CPU in this process from now on (for workers whose options cannot carry
    `CPU_ONLY_ENV`, such as Tune trials); no effect once a backend has started."""
    jax.config.update("jax_platforms", "cpu")


CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": "512"}
"""XLA debug options for throughput kernels on CPU (not passed on other backends, which lack them)."""


def batch_jit(fun: Callable, *, static_argnames: tuple[str, ...] = ()) -> Callable:
    """`jax.jit` for throughput kernels over scenario batches: adds `CPU_COMPILER_OPTIONS` on CPU.

    The backend is looked up on the first call, not at import, so importing never starts JAX.
    """

    @cache
    def jitted() -> Callable:
        options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
        return jax.jit(fun, static_argnames=static_argnames, compiler_options=options)

    @wraps(fun)
    def call(*args, **kwargs):
        return jitted()(*args, **kwargs)

    return call


@cache
def start_single_core_backend() -> None:
    """Start this process's JAX backends sized for one core (see module docstring).

    For worker processes that own one CPU (a ``num_cpus=1`` sweep task, a twin shard). XLA reads the CPU count
    from the affinity of the thread that starts the backend, and the threads it starts inherit
    that affinity; so the starting thread is narrowed to one CPU only while the backends start,
    then it and every thread started meanwhile get its CPU set back, and the OS schedules the
    work on any of them. Once per process; has no effect where the backends already run (their
    pools exist) or where the OS has no per-thread affinity (outside Linux).
    """
    global _sized_for_one_cpu
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir(_THREADS) or xla_bridge.backends_are_initialized():
        return
    cpus = os.sched_getaffinity(0)
    before = set(os.listdir(_THREADS))
    os.sched_setaffinity(0, {min(cpus)})
    try:
        jax.devices()
        _sized_for_one_cpu = True
    finally:
        os.sched_setaffinity(0, cpus)
        for tid in set(os.listdir(_THREADS)) - before:
            with suppress(ProcessLookupError):  # a thread that has exited since the listing
                os.sched_setaffinity(int(tid), cpus)


_THREADS = "/proc/self/task"
_sized_for_one_cpu = False


def backend_cpu_count() -> int:
    """How many CPUs this process's XLA CPU backend splits its loops for: 1 where `start_single_core_backend`
    started it, else the CPUs this process may run on now (XLA's default, which it reads as its backend starts).

    XLA compiles that split into every executable and JAX's persistent cache does not key on it: an
    executable made by a backend of another size runs, split as that one was. So whatever keeps compiled
    executables across processes keeps them apart by this count (`raytwin.executables`, the shards' cache
    folder in `actors.failover`)."""
    if _sized_for_one_cpu:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
