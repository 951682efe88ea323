"""Serialized kernels (`raytwin.executables`): reused only under their key, bit-identical, never taken
from JAX's persistent cache (whose executables serialize without their code), damaged entries replaced."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raytwin import executables
from raytwin.executables import StoredKernel, kernel_identity
from raytwin.sim import THERMAL_RC, TWO_TANK


@jax.jit
def _kernel(x, y):
    return jnp.cumsum(jnp.sin(x) * y)


@jax.jit
def _callback_kernel(x):
    return jax.pure_callback(lambda v: np.asarray(v) * 2.0, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


class _Counting:
    """A jitted function whose lowerings (traces) are counted."""

    def __init__(self, jitted):
        self.jitted, self.lowered = jitted, 0

    def lower(self, *args, **kwargs):
        self.lowered += 1
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.jitted(*args, **kwargs)


ARGS = (np.linspace(0.0, 3.0, 16, dtype=np.float32), np.full(16, 1.5, dtype=np.float32))


def test_a_new_process_loads_the_stored_kernel_without_tracing_and_gets_the_same_bits(tmp_path):
    before = executables.kernel_counts()
    first = _Counting(_kernel)
    want = np.asarray(StoredKernel(first, "k", tmp_path)(*ARGS))
    assert first.lowered == 1 and len(list(tmp_path.glob("*.xla"))) == 1
    again = _Counting(_kernel)  # what a restarted process has: nothing in memory
    got = np.asarray(StoredKernel(again, "k", tmp_path)(*ARGS))
    assert again.lowered == 0
    after = executables.kernel_counts()  # what a shard's start-up log reports
    assert (after["compiled"] - before["compiled"], after["loaded"] - before["loaded"]) == (1, 1)
    assert np.array_equal(got, want) and np.array_equal(got, np.asarray(_kernel(*ARGS)))


def test_another_identity_or_shape_is_another_entry(tmp_path):
    StoredKernel(_Counting(_kernel), "k", tmp_path)(*ARGS)
    other = _Counting(_kernel)
    StoredKernel(other, "changed model", tmp_path)(*ARGS)
    longer = _Counting(_kernel)
    StoredKernel(longer, "k", tmp_path)(*(np.tile(a, 2) for a in ARGS))
    assert other.lowered == 1 and longer.lowered == 1 and len(list(tmp_path.glob("*.xla"))) == 3


def test_a_damaged_entry_is_compiled_again_and_replaced(tmp_path, caplog):
    StoredKernel(_Counting(_kernel), "k", tmp_path)(*ARGS)
    [entry] = tmp_path.glob("*.xla")
    entry.write_bytes(entry.read_bytes()[:1000])  # e.g. a disk that filled up
    again = _Counting(_kernel)
    with caplog.at_level(logging.WARNING, logger="raytwin.executables"):
        got = StoredKernel(again, "k", tmp_path)(*ARGS)
    assert again.lowered == 1 and "stored_kernel_unusable" in caplog.text
    assert np.array_equal(np.asarray(got), np.asarray(_kernel(*ARGS)))
    third = _Counting(_kernel)
    StoredKernel(third, "k", tmp_path)(*ARGS)
    assert third.lowered == 0  # the replacement loads


def test_a_stored_kernel_that_fails_its_first_call_is_dropped_and_compiled_again(tmp_path, monkeypatch, caplog):
    StoredKernel(_Counting(_kernel), "k", tmp_path)(*ARGS)

    def broken(*_):
        raise jax.errors.JaxRuntimeError("NOT_FOUND: Function negate_bitcast_fusion not found")

    monkeypatch.setattr(executables, "deserialize_and_load", lambda *payload: broken)
    again = _Counting(_kernel)
    with caplog.at_level(logging.WARNING, logger="raytwin.executables"):
        got = StoredKernel(again, "k", tmp_path)(*ARGS)
    assert again.lowered == 1 and "NOT_FOUND" in caplog.text
    assert np.array_equal(np.asarray(got), np.asarray(_kernel(*ARGS)))
    monkeypatch.undo()
    third = _Counting(_kernel)
    StoredKernel(third, "k", tmp_path)(*ARGS)
    assert third.lowered == 0  # the new entry loads


def test_an_entry_written_for_another_key_is_not_used(tmp_path):
    StoredKernel(_Counting(_kernel), "k", tmp_path)(*ARGS)
    [entry] = tmp_path.glob("*.xla")
    text, payload = pickle.loads(entry.read_bytes())
    entry.write_bytes(pickle.dumps((text.replace("k", "x", 1), payload)))
    again = _Counting(_kernel)
    StoredKernel(again, "k", tmp_path)(*ARGS)
    assert again.lowered == 1


def test_an_entry_made_by_a_backend_sized_for_other_cpus_is_not_used(tmp_path, monkeypatch):
    """XLA compiles its loops' split across the backend's CPUs into the executable (a one-CPU shard's kernel has
    none); JAX's own cache key leaves that out, the store's does not."""
    StoredKernel(_Counting(_kernel), "k", tmp_path)(*ARGS)
    sized_for = executables.backend_cpu_count()
    monkeypatch.setattr(executables, "backend_cpu_count", lambda: sized_for + 1)
    executables._environment.cache_clear()
    try:
        other = _Counting(_kernel)
        StoredKernel(other, "k", tmp_path)(*ARGS)
    finally:
        executables._environment.cache_clear()
    assert other.lowered == 1 and len(list(tmp_path.glob("*.xla"))) == 2


def test_a_kernel_that_calls_back_into_python_is_remembered_as_not_storable(tmp_path):
    x = np.arange(4.0, dtype=np.float32)
    first = _Counting(_callback_kernel)
    assert np.array_equal(np.asarray(StoredKernel(first, "cb", tmp_path)(x)), x * 2)
    again = _Counting(_callback_kernel)
    assert np.array_equal(np.asarray(StoredKernel(again, "cb", tmp_path)(x)), x * 2)
    assert again.lowered == 0  # goes straight to jax.jit, no compile to find out again


def test_the_least_recently_used_entries_go_when_the_store_is_full(tmp_path):
    for i, name in enumerate(["old", "mid", "new"]):
        (tmp_path / f"{name}.xla").write_bytes(b"x" * 100)
        os.utime(tmp_path / f"{name}.xla", ns=(i * 10**9, i * 10**9))
    executables._evict(tmp_path, 250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid.xla", "new.xla"]


def test_kernel_identity_follows_the_filter_the_model_value_and_its_code():
    thermal = kernel_identity("ekf", THERMAL_RC)
    assert thermal == kernel_identity("ekf", THERMAL_RC)
    assert thermal != kernel_identity("ukf", THERMAL_RC)
    assert thermal != kernel_identity("ekf", dataclasses.replace(THERMAL_RC, default_dt=THERMAL_RC.default_dt / 2))
    assert thermal != kernel_identity("ekf", TWO_TANK)
    assert kernel_identity("ekf", THERMAL_RC, lambda: 0) is None  # not picklable: never stored


_SCRIPT = """
import logging, sys
import numpy as np, jax
jax.config.update("jax_log_compiles", True)
compiles = []
class Count(logging.Handler):
    def emit(self, record):
        compiles.append(record.getMessage()) if record.getMessage().startswith("Compiling") else None
logging.getLogger("jax").addHandler(Count())
from raytwin.estimation import ExtendedKalmanFilter
from raytwin.sim import THERMAL_RC
f = ExtendedKalmanFilter(THERMAL_RC, THERMAL_RC.param_vector())
out = f.assimilate_many(f.initial(), np.arange(3.0), np.ones((3, len(f.measured_names))), np.ones(3, bool))
print(len(compiles), np.asarray(out.x).tobytes().hex(), np.asarray(out.P).tobytes().hex())
"""


def test_twin_processes_store_real_compiles_even_when_jax_cache_has_them(tmp_path):
    """Three processes as on a node: one fills JAX's persistent cache, the next stores the filter's
    kernel (which JAX's cache would have answered with an executable that cannot be reloaded), the
    third loads it without tracing; all three give the same bits."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop(executables.DIR_ENV, None)

    def run(**extra: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", _SCRIPT], env={**env, **extra}, capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split()

    plain = run()
    stored = run(**{executables.DIR_ENV: str(tmp_path / "executables")})
    loaded = run(**{executables.DIR_ENV: str(tmp_path / "executables")})
    assert int(stored[0]) >= 1 and len(list((tmp_path / "executables").glob("*.xla"))) == 1
    assert int(loaded[0]) == 0, "the stored kernel was traced and compiled again"
    assert plain[1:] == stored[1:] == loaded[1:]


@pytest.mark.parametrize("kind", ["ekf", "ukf"])
def test_both_filters_store_their_kernels_where_the_process_has_a_store(kind, monkeypatch, tmp_path):
    from raytwin import estimation, ukf

    monkeypatch.setenv(executables.DIR_ENV, str(tmp_path))
    kernels = (estimation._kernels.__wrapped__(THERMAL_RC) if kind == "ekf"
               else ukf._ukf_kernels.__wrapped__(THERMAL_RC, ukf.default_dynamics(THERMAL_RC)))
    assert isinstance(kernels.assimilate.__wrapped__, StoredKernel)
    monkeypatch.delenv(executables.DIR_ENV)
    assert not isinstance(estimation._kernels.__wrapped__(THERMAL_RC).assimilate.__wrapped__, StoredKernel)


def test_threads_calling_a_new_kernel_at_once_load_it_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    StoredKernel(_Counting(_kernel), "k", tmp_path)(*ARGS)
    kernel, loads = StoredKernel(_Counting(_kernel), "k", tmp_path), []
    load = kernel._load
    kernel._load = lambda *a: loads.append(1) or load(*a)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: np.asarray(kernel(*ARGS)), range(8)))
    assert len(loads) == 1 and all(np.array_equal(r, results[0]) for r in results)
