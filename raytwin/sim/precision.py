"""Float64 where RayTwin needs it, without changing JAX's settings for the rest of the process.

JAX computes in float32 unless ``jax_enable_x64`` is on. Filtering, validation, calibration and
what-if answers need float64, but flipping the global flag at import would change every other JAX
computation of the user's process. So float64 work runs inside ``jax.enable_x64(True)``, JAX's own
context manager: it applies to the current thread and is part of the jit cache key, so a kernel
traced in float64 is never reused in float32 (or the other way round).
"""

from __future__ import annotations

import inspect
import threading
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


_callback_thread = threading.local()


def host_callback(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` as a float64 `jax.pure_callback` target. XLA may run a callback on one of its own threads
    and checks the results there *after* `fn` returns, converting them to float32 where float64 is
    off on that thread; so the first callback a thread of XLA's runs switches float64 on for that
    thread for good. A callback run on the caller's thread (inside `float64`) changes nothing."""

    @wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if (not jax.config.jax_enable_x64 and threading.current_thread() is not threading.main_thread()
                and not getattr(_callback_thread, "float64", False)):
            float64().__enter__()  # never left: this is a thread of XLA's, not the caller's
            _callback_thread.float64 = True
        return fn(*args, **kwargs)

    return call
