"""Float64 where RayTwin needs it, without changing JAX's settings for the rest of the process.

JAX computes in float32 unless ``jax_enable_x64`` is on. Filtering, validation, calibration and
what-if answers need float64, but flipping the global flag at import would change every other JAX
computation of the user's process. So float64 work runs inside ``jax.enable_x64(True)``, JAX's own
context manager: it applies to the current thread and is part of the jit cache key, so a kernel
traced in float64 is never reused in float32 (or the other way round).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import jax
import numpy as np

P = ParamSpec("P")
R = TypeVar("R")


def float64() -> AbstractContextManager[Any]:
    """A block in which JAX computes in float64 (this thread only)."""
    return jax.enable_x64(True)


def precision(dtype: Any) -> AbstractContextManager[Any]:
    """`float64` for a 64-bit `dtype`; otherwise leave the setting as it is."""
    return float64() if np.dtype(dtype).itemsize == 8 else nullcontext()


def in_float64(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run inside `float64` (for jitted kernels: traced and run in double precision)."""

    @wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with float64():
            return fn(*args, **kwargs)

    return call


def in_dtype_precision(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run in the precision of its ``dtype`` argument (kernels that take the dtype they compute in)."""
    signature = inspect.signature(fn)

    @wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with precision(signature.bind(*args, **kwargs).arguments["dtype"]):
            return fn(*args, **kwargs)

    return call


def float64_callback(fn: Callable[..., Any], shape: tuple[int, ...], *args: Any, vmap_method: str = "sequential"
                     ) -> jax.Array:
    """``jax.pure_callback(fn, float64[shape], *args)`` for a kernel traced in float64, leaving JAX's
    precision setting alone on every thread.

    XLA may run a callback on one of its own threads and converts its arguments there before `fn`
    runs, and its results after `fn` returns, to the precision set on that thread: float64 would
    become float32 wherever float64 is off, and switching it on there for good would change a
    user's float32 callbacks that XLA later runs on the same thread. So float64 arguments and the
    result cross as their bits (pairs of uint32, which no setting converts) and are bitcast back on
    the other side; `fn` gets NumPy float64 arrays and runs in a `float64` scope, left when it returns.
    """
    import jax.numpy as jnp

    def host(*packed: Any) -> np.ndarray:
        a = [_unpacked(np.asarray(x)) if f else x for x, f in zip(packed, is_float64)]
        with float64():
            out = np.ascontiguousarray(fn(*a), dtype=np.float64)
        return out.view(np.uint32).reshape(*out.shape, 2)

    arrays = [jnp.asarray(x) for x in args]
    is_float64 = [x.dtype == jnp.float64 for x in arrays]
    packed = [jax.lax.bitcast_convert_type(x, jnp.uint32) if f else x for x, f in zip(arrays, is_float64)]
    bits = jax.pure_callback(host, jax.ShapeDtypeStruct((*shape, 2), jnp.uint32), *packed, vmap_method=vmap_method)
    return jax.lax.bitcast_convert_type(bits, jnp.float64)


def _unpacked(bits: np.ndarray) -> np.ndarray:
    """float64 values from their bits as pairs of uint32 (last axis), the layout `bitcast_convert_type` gives."""
    return np.ascontiguousarray(bits).view(np.float64).reshape(bits.shape[:-1])
