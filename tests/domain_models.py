"""A model that is not defined everywhere, for the tests of refused updates (`raytwin.estimation.scan_kernels`):
`thermal_rc` whose air temperature's derivative carries ``0 * sqrt(BOUND_K - T_in)``, NaN once the air is
above `BOUND_K` (a model written for a range its asset leaves)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from raytwin.sim import THERMAL_RC
from raytwin.sim.thermal import _derivative

BOUND_K = 300.0
"""The air temperature above which the model's derivative is NaN (26.85 degC)."""


def _bounded_derivative(x, u, c):
    d_in, d_m = _derivative(x, u, c)
    return (d_in + 0.0 * jnp.sqrt(BOUND_K - x[0]), d_m)


BOUNDED_RC = dataclasses.replace(THERMAL_RC, name="bounded_rc", derivative=_bounded_derivative)
