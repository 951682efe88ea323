"""The fused per-scenario sweep kernel: one Pallas program per block of scenarios, whole horizon.

On a GPU the XLA path (`sweeps.engine`, a ``vmap``-ed ``lax.scan``) launches kernels for every scan
iteration and moves each scenario's state, parameters and metric accumulators through GPU memory
between them; on an H100 that bounded the thermal sweep at ~6 % of float32 peak. Here each Pallas
program loads its block of scenarios once, runs all ``n_steps`` in a ``fori_loop`` with states,
parameters, compensation terms and accumulators held as values (registers on a GPU), and writes
only the final accumulators. A step is exactly the XLA path's step: the same
`raytwin.sim.integrate.advance` (the model's solver, compensated sums) and the same kit functions
and divergence fold (`sweeps.engine.accumulator`, `finish`), so only the compiler differs.

Platforms: Triton (through Pallas) on GPUs; on a CPU, Pallas runs the kernel in interpret mode,
which checks the kernel against the XLA path without a GPU (tests) but is not a fast path, and
`triton_lowering` lowers it for CUDA without a GPU (JAX lowers across platforms), which proves
Triton accepts a kit. Kits
whose functions capture array constants (random or scheduled signals, series: their tables) or use
operations Triton cannot lower are refused by Pallas at lowering; `compiled` reports why and the
engine runs the XLA path instead.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from raytwin.sim.integrate import advance, compensated_index
from sweeps.engine import accumulator, finish, initial
from sweeps.kits import SweepKit

log = logging.getLogger("raytwin.sweeps")

BLOCK = 256
"""Scenarios per Pallas program (per GPU thread block: 4 warps, two scenarios per thread)."""
NUM_WARPS = 4


def _per_scenario(leaf: Any) -> bool:
    return jnp.ndim(leaf) == 1


def _kernel_call(kit: SweepKit, n_steps: int, block: int, num_warps: int, interpret: bool, x0, params, ip, dt):
    """(metrics..., diverged) of every scenario: one Pallas program per block of `block` scenarios
    computes the final accumulators (the last block padded with copies of the last scenario);
    `finish` turns them into metrics as on the XLA path."""
    from jax.experimental import pallas as pl

    model = kit.model
    dtype = jnp.result_type(*x0)
    leaves, tree = jax.tree_util.tree_flatten((x0, params, ip, dt))
    per = [_per_scenario(leaf) for leaf in leaves]
    n = x0[0].shape[0]
    padded = math.ceil(n / block) * block
    args = [jnp.pad(leaf, (0, padded - n), mode="edge") if p else jnp.reshape(leaf, (1,))
            for leaf, p in zip(leaves, per, strict=True)]
    in_specs = [pl.BlockSpec((block,), lambda i: (i,)) if p else pl.BlockSpec((1,), lambda i: (0,)) for p in per]

    # the accumulators' structure and dtypes, as the kernel builds them (bool flags are stored as int32)
    block_x0 = tuple(jax.ShapeDtypeStruct((block,), dtype) for _ in x0)
    block_ip = jax.tree_util.tree_map(lambda v: v[:1] if jnp.ndim(v) else v, ip)
    acc_shape = jax.eval_shape(functools.partial(initial, kit), block_x0, block_ip)
    acc_leaves, acc_tree = jax.tree_util.tree_flatten(acc_shape)
    stored = [jnp.int32 if leaf.dtype == jnp.bool_ else leaf.dtype for leaf in acc_leaves]

    def kernel(*refs):
        values = [r[...] if p else r[0] for r, p in zip(refs[:len(args)], per, strict=True)]
        x0_, params_, ip_, dt_ = jax.tree_util.tree_unflatten(tree, values)
        x = tuple(jnp.broadcast_to(xi, (block,)) for xi in x0_)
        coeffs = model.coefficients(params_)
        index = compensated_index(model, dtype)
        fold = accumulator(kit, coeffs, ip_, dt_)

        def step(k, carry):
            x, error, acc = carry
            t = k.astype(dtype) * dt_
            u = kit.inputs(t, x, ip_)
            x_next, error = advance(model, index, x, error, u, coeffs, dt_)
            return x_next, error, fold(acc, t, x, u, x_next)

        error0 = tuple(jnp.zeros_like(x[i]) for i in index)
        _, _, acc = jax.lax.fori_loop(0, n_steps, step, (x, error0, initial(kit, x, ip_)))
        for ref, leaf in zip(refs[len(args):], jax.tree_util.tree_leaves(acc), strict=True):
            ref[...] = jnp.broadcast_to(leaf, (block,)).astype(ref.dtype)

    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        compiler_params = plt.CompilerParams(num_warps=num_warps, num_stages=1)
    out = pl.pallas_call(
        kernel,
        grid=(padded // block,),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((block,), lambda i: (i,)) for _ in stored],
        out_shape=[jax.ShapeDtypeStruct((padded,), d) for d in stored],
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"sweep_{model.name}",
    )(*args)
    acc = jax.tree_util.tree_unflatten(acc_tree, [o[:n].astype(leaf.dtype) for o, leaf in zip(out, acc_leaves,
                                                                                               strict=True)])
    return finish(kit, acc, dt)


_fused = jax.jit(_kernel_call, static_argnames=("kit", "n_steps", "block", "num_warps", "interpret"))


def _signature(*args) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((jnp.shape(leaf), jnp.result_type(leaf)) for leaf in leaves)


@functools.cache
def _compile(kit: SweepKit, n_steps: int, block: int, num_warps: int, interpret: bool, signature: tuple,
             platform: str):
    tree, shapes = signature
    specs = jax.tree_util.tree_unflatten(tree, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    try:
        return _fused.lower(kit, n_steps, block, num_warps, interpret, *specs).compile()
    except Exception as exc:  # noqa: BLE001 (any lowering failure means: run the XLA path)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("event=fused_kernel_fallback model=%s platform=%s reason=%r", kit.model.name, platform, reason)
        return reason


def compiled(kit: SweepKit, n_steps: int, x0, params, ip, dt, *, block: int = BLOCK, num_warps: int = NUM_WARPS):
    """The fused kernel compiled for these arguments' shapes on the platform they live on (interpret
    mode on a CPU), as ``fn(x0, params, ip, dt) -> (metrics..., diverged)``; or, where Pallas refuses
    the kit, a string saying why (the caller runs the XLA path). Cached per kit, steps and shapes.
    `block` scenarios per program, `num_warps` warps each: the launch shape (`benchmarks/fused_tuning.py`)."""
    (device,) = x0[0].devices()
    return _compile(kit, n_steps, block, num_warps, device.platform == "cpu", _signature(x0, params, ip, dt),
                    device.platform)


def triton_lowering(kit: SweepKit, n_steps: int, x0, params, ip, dt, *, block: int = BLOCK,
                    num_warps: int = NUM_WARPS) -> str:
    """The kernel lowered for CUDA GPUs (StableHLO text holding the Triton kernel), computed on any
    machine: JAX lowers across platforms, so a CPU-only CI proves that Pallas' Triton lowering accepts
    the kit (it raises where it does not). Compiling the Triton IR to GPU code needs a GPU."""
    specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                                   (x0, params, ip, dt))
    return _fused.trace(kit, n_steps, block, num_warps, False, *specs).lower(lowering_platforms=("cuda",)).as_text()


class FusedKernelUnsupported(ValueError):
    """A kit the fused kernel cannot compile (e.g. a signal table captured as a constant)."""
