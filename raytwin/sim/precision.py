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

    XLA may run a callback on one of its own threads and converts the results there, *after* `fn`
    returns, to the precision set on that thread: float64 results would become float32 (and be
    refused) wherever float64 is off, and switching it on there for good would change a user's
    float32 callbacks that XLA later runs on the same thread. So the result crosses as its bits
    (pairs of uint32, which no setting converts) and is bitcast back to float64 in the kernel;
    `fn` itself runs in a `float64` scope, left when it returns.
    """
    import jax.numpy as jnp

    def host(*a: Any) -> np.ndarray:
        with float64():
            out = np.ascontiguousarray(fn(*a), dtype=np.float64)
        return out.view(np.uint32).reshape(*out.shape, 2)

    bits = jax.pure_callback(host, jax.ShapeDtypeStruct((*shape, 2), jnp.uint32), *args, vmap_method=vmap_method)
    return jax.lax.bitcast_convert_type(bits, jnp.float64)
