"""The hot path: one jitted, vmapped rollout per chunk of scenarios, metrics folded in the scan.

Inputs are generated inside the scan from per-scenario input parameters and metrics are
accumulated in the carry (``keep_trajectory=False``), all in struct-of-arrays form so XLA fuses
a whole RK4 step with the input generation and the metric update. Chunks are padded to a fixed
size, so each (kit, chunk size, steps) compiles once per process and scenario i always sits at
the same position of the same chunk.

Divergence: a per-scenario flag in the carry records whether every state stayed finite and
within its declared plausible range (`State.lower` / `upper`) after every step. A scenario that
left it gets NaN metrics and ``diverged = True`` (an unstable step or parameter set yields finite
garbage such as 1e266 K, never a result).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from raytwin.sim import rollout
from raytwin.sim.cpu import batch_jit
from raytwin.sim.precision import in_dtype_precision
from sweeps.kits import SweepKit
from sweeps.space import Dimension


@dataclass(frozen=True)
class Bases:
    """Base values of a sweep before its dimensions are applied (all float64, SI units)."""

    state: dict[str, float]
    params: dict[str, float]
    inputs: dict[str, float]


@in_dtype_precision
def scenario_arrays(kit: SweepKit, bases: Bases, dims: list[Dimension], rows: np.ndarray, dtype) -> tuple:
    """(x0, params, input params) for `rows` of dimension values, in `dtype`.

    Start states are per-scenario arrays (the scan carries one state per scenario anyway). A
    parameter or input parameter that no dimension sets is one scalar for the whole chunk: the
    kernel then keeps it in a register instead of streaming a constant array from memory at
    every step (4 of 14 such values in the benchmark sweep: 1.15x, bit-identical metrics).
    """
    n = rows.shape[0]
    values = {
        "state": {k: np.full(n, v) for k, v in bases.state.items()},
        "param": dict(bases.params),
        "input": dict(bases.inputs),
    }
    for j, d in enumerate(dims):
        column = values[d.target]
        column[d.name] = column[d.name] * rows[:, j] if d.mode == "scale" else rows[:, j].copy()
    cast = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731
    x0 = tuple(cast(values["state"][k]) for k in kit.model.state_names)
    params = tuple(cast(values["param"][k]) for k in kit.model.param_names)
    inputs = {k: cast(v) for k, v in values["input"].items()}
    return x0, params, inputs


DIVERGED = "diverged"
"""Result column: the scenario left its states' plausible range (its metrics are NaN)."""

SCAN_UNROLL = {"gpu": 8}
"""RK4 steps per scan iteration by platform (default 1). Measured on the sweep kernel (numbers in
sweeps/README.md): on an H100, 8 steps per iteration launch 8x fewer kernels and ran 1.5x faster
(32: no faster, 10x the compile time); on CPU every unroll tried was slower (0.29-0.41x)."""


KERNELS = {"gpu": "pallas"}
"""The sweep kernel by platform (default ``"xla"``): on GPUs the fused Pallas kernel (`sweeps.fused`:
one program per block of scenarios for the whole horizon, states and accumulators in registers),
falling back to XLA for a kit it cannot compile; elsewhere the XLA scan, which is also the reference
the fused kernel is tested against (in Pallas' interpret mode on CPUs)."""
Kernel = Literal["auto", "xla", "pallas"]


def kernel_for(array: jax.Array, kernel: Kernel = "auto") -> str:
    """The kernel that runs on the platform `array` lives on: `kernel`, or for ``"auto"`` `KERNELS`'s."""
    if kernel not in ("auto", "xla", "pallas"):
        raise ValueError(f"kernel must be 'auto', 'xla' or 'pallas', got {kernel!r}")
    if kernel != "auto":
        return kernel
    (device,) = array.devices()
    return KERNELS.get(device.platform, "xla")


def scan_unroll(array: jax.Array) -> int:
    """The `SCAN_UNROLL` for the platform `array` lives on."""
    (device,) = array.devices()
    return SCAN_UNROLL.get(device.platform, 1)


def plausible(kit: SweepKit, x: tuple):
    """True where every state is finite and within its declared range (NaN fails every comparison)."""
    flags = [jnp.isfinite(xi) if math.isinf(s.lower) and math.isinf(s.upper)
             else (xi >= s.lower) & (xi <= s.upper) for s, xi in zip(kit.model.states, x, strict=True)]
    return functools.reduce(jnp.logical_and, flags)


def initial(kit: SweepKit, x0: tuple, ip) -> tuple:
    """The carry a scenario starts with: (metric accumulators, plausible so far)."""
    return kit.init(x0, ip), plausible(kit, x0)


def accumulator(kit: SweepKit, coeffs: tuple, ip, dt):
    """``fold(acc, t, x, u, x_next) -> acc``: one step's metric updates and divergence flag (the
    XLA scan and the fused kernel, `sweeps.fused`, fold with this same function)."""
    return lambda acc, t, x, u, x_next: (kit.update(acc[0], x_next, u, coeffs, ip, dt), acc[1] & plausible(kit, x_next))


def finish(kit: SweepKit, acc: tuple, dt) -> tuple:
    """(metrics..., diverged): the metrics of the accumulators, NaN where the scenario diverged."""
    metrics, ok = acc
    return *(jnp.where(ok, m, jnp.nan) for m in kit.finalize(metrics, dt)), ~ok


def _run_one(kit: SweepKit, n_steps: int, unroll: int, keep_trajectory: bool, x0, params, ip, dt):
    return rollout(
        kit.model, x0, params, dt, n_steps,
        lambda k, t, x: kit.inputs(t, x, ip),
        accumulate=accumulator(kit, kit.model.coefficients(params), ip, dt),
        acc0=initial(kit, x0, ip),
        keep_trajectory=keep_trajectory,
        unroll=unroll,
    )


def _scenario_axes(*args) -> tuple:
    """`vmap` axes: 0 for per-scenario arrays, None for values shared by the chunk (scalars)."""
    return jax.tree_util.tree_map(lambda a: 0 if jnp.ndim(a) else None, args)


def _metrics_fn(kit: SweepKit, n_steps: int, unroll: int, x0, params, ip, dt):
    def one(x0, params, ip):
        return finish(kit, _run_one(kit, n_steps, unroll, False, x0, params, ip, dt).accumulated, dt)

    return jax.vmap(one, in_axes=_scenario_axes(x0, params, ip))(x0, params, ip)


def _trajectories_fn(kit: SweepKit, n_steps: int, unroll: int, x0, params, ip, dt):
    def one(x0, params, ip):
        return _run_one(kit, n_steps, unroll, True, x0, params, ip, dt).trajectory

    return jax.vmap(one, in_axes=_scenario_axes(x0, params, ip))(x0, params, ip)


_metrics = batch_jit(_metrics_fn, static_argnames=("kit", "n_steps", "unroll"))
_trajectories = batch_jit(_trajectories_fn, static_argnames=("kit", "n_steps", "unroll"))


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
    """Pad to `size` rows by repeating the last row (valid values; the padding is dropped)."""
    n = rows.shape[0]
    if n > size:
        raise ValueError(f"{n} rows do not fit a chunk of {size}")
    if n == size:
        return rows
    out = np.empty((size, rows.shape[1]), order="F")  # column-major, as `ScenarioSpace.rows` gives them
    out[:n], out[n:] = rows, rows[-1]
    return out


@in_dtype_precision
def chunk_metrics(
    kit: SweepKit, bases: Bases, dims: list[Dimension], rows: np.ndarray, step_s: float, n_steps: int,
    chunk_size: int, dtype: str, kernel: Kernel = "auto",
) -> dict[str, np.ndarray]:
    """Metrics of the scenarios in `rows` (padded to `chunk_size`), by metric name, and `diverged`
    (NaN metrics where True). `kernel`: see `KERNELS` (``"pallas"`` on a CPU runs interpreted: tests)."""
    x0, params, ip = scenario_arrays(kit, bases, dims, _padded(rows, chunk_size), dtype)
    dt = jnp.asarray(step_s, dtype=dtype)
    out = None
    if kernel_for(x0[0], kernel) == "pallas":
        from sweeps import fused

        fn = fused.compiled(kit, n_steps, x0, params, ip, dt)
        if kernel == "pallas" and isinstance(fn, str):
            raise fused.FusedKernelUnsupported(f"kit for {kit.model.name}: the fused kernel cannot run it ({fn}); "
                                               "use kernel='xla' or 'auto'")
        out = None if isinstance(fn, str) else fn(x0, params, ip, dt)
    if out is None:
        out = _metrics(kit, n_steps, scan_unroll(x0[0]), x0, params, ip, dt)
    n = rows.shape[0]
    return {name: np.asarray(v)[:n] for name, v in zip((*kit.metric_names, DIVERGED), out, strict=True)}


@in_dtype_precision
def trajectories(
    kit: SweepKit, bases: Bases, dims: list[Dimension], rows: np.ndarray, step_s: float, n_steps: int, dtype: str
) -> dict[str, np.ndarray]:
    """Full state trajectories, each (len(rows), n_steps + 1) including the start state."""
    x0, params, ip = scenario_arrays(kit, bases, dims, rows, dtype)
    traj = _trajectories(kit, n_steps, scan_unroll(x0[0]), x0, params, ip, jnp.asarray(step_s, dtype=dtype))
    return {
        name: np.concatenate([np.asarray(s0)[:, None], np.asarray(s)], axis=1)
        for name, s0, s in zip(kit.model.state_names, x0, traj)
    }
