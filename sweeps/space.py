"""Scenario spaces: grids, random samples and Latin hypercubes over named dimensions.

A space is a pure description (pydantic, JSON-serialisable for run records). `rows(start, stop)`
returns the dimension values of scenarios ``start..stop-1`` and depends only on (space, index):
grid points come from the index itself, random samples from a per-scenario key
``fold_in(PRNGKey(seed), index)``, Latin hypercube samples from one design drawn with `seed`.
So scenario i gets the same values whichever chunk or worker asks for it, and in a rerun.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Annotated, Literal

import jax
import numpy as np
from pydantic import Field, model_validator

from raytwin.contracts import Contract, Finite
from raytwin.sim.precision import in_float64

Target = Literal["param", "input", "state"]
SEED_MAX = 2**63 - 1
"""The largest seed of a space: `jax.random.key` takes a signed 64-bit integer (a larger seed failed the sweep
with an OverflowError, a 500 over HTTP)."""
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class Dimension(Contract):
    """One swept quantity.

    `target` says what it changes: a model parameter, an input-signal parameter of the sweep kit
    (e.g. ``T_out_mean``) or a start-state variable. With ``mode="scale"`` the sampled value
    multiplies the base value (e.g. parameters +-30%: low 0.7, high 1.3); with "absolute" it
    replaces it. Grids use `values` or `levels` points between `low` and `high` (geometric
    when `log`); random and LHS sample uniformly in [low, high] (in log space when `log`).
    """

    name: Annotated[str, Field(min_length=1)]
    target: Target
    mode: Literal["absolute", "scale"] = "absolute"
    low: Finite | None = None
    high: Finite | None = None
    log: bool = False
    levels: Annotated[int, Field(ge=1)] | None = None
    values: Annotated[list[Finite], Field(min_length=1)] | None = None

    @property
    def column(self) -> str:
        """Column name of this dimension in the results (``param.C_in``, ``input.T_out_mean``)."""
        return f"{self.target}.{self.name}"

    @model_validator(mode="after")
    def _range(self) -> Dimension:
        if self.values is None:
            if self.low is None or self.high is None:
                raise ValueError(f"dimension {self.name}: give low and high, or explicit values")
            if not self.low <= self.high:
                raise ValueError(f"dimension {self.name}: low {self.low} > high {self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"dimension {self.name}: log sampling needs low > 0")
        return self

    def extremes(self) -> tuple[float, float]:
        """Its least and greatest value: every grid point and sample lies between them."""
        if self.values is not None:
            return min(self.values), max(self.values)
        return float(self.low), float(self.high)  # type: ignore[arg-type]  # both given: `_range` checked

    def applied(self, value: float, base: float) -> float:
        """What `value` of this dimension sets its target to, the target's base value being `base`."""
        return value * base if self.mode == "scale" else value

    def grid_values(self) -> np.ndarray:
        if self.values is not None:
            return np.asarray(self.values, dtype=np.float64)
        if self.levels is None:
            raise ValueError(f"dimension {self.name}: a grid needs `values` or `levels`")
        space = np.geomspace if self.log else np.linspace
        return space(self.low, self.high, self.levels)

    def from_unit(self, u: np.ndarray) -> np.ndarray:
        """Map uniform samples in [0, 1) onto the dimension's range."""
        if self.values is not None:
            idx = np.minimum((u * len(self.values)).astype(np.int64), len(self.values) - 1)
            return np.asarray(self.values, dtype=np.float64)[idx]
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            return np.exp(lo + u * (hi - lo))
        return self.low + u * (self.high - self.low)


class ScenarioSpace(Contract):
    """A set of scenarios: ``method`` over `dimensions`; `n` for random and LHS (grids: the product)."""

    method: Literal["grid", "random", "lhs"]
    dimensions: Annotated[list[Dimension], Field(min_length=1)]
    n: Annotated[int, Field(ge=1)] | None = None
    seed: Seed = 0

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioSpace:
        columns = [d.column for d in self.dimensions]
        if len(set(columns)) != len(columns):
            raise ValueError(f"duplicate dimensions: {columns}")
        if self.method == "grid":
            if self.n is not None:
                raise ValueError("a grid's size is the product of its dimensions' levels; do not give n")
            for d in self.dimensions:
                d.grid_values()  # raises if the grid is undefined
        elif self.n is None:
            raise ValueError(f"method {self.method!r} needs n (the number of scenarios)")
        return self

    @property
    def columns(self) -> list[str]:
        return [d.column for d in self.dimensions]

    @property
    def size(self) -> int:
        if self.method == "grid":
            return math.prod(len(d.grid_values()) for d in self.dimensions)
        return int(self.n)

    @cached_property
    def _lhs_design(self) -> np.ndarray:
        from scipy.stats import qmc  # here, not at import: scipy.stats is ~0.5 s of every API process's start

        return qmc.LatinHypercube(d=len(self.dimensions), rng=np.random.default_rng(self.seed)).random(self.size)

    @property
    def indexed(self) -> bool:
        """Whether a scenario's values follow from its index alone (grid, random), so any process can
        compute any chunk's rows; an LHS design is drawn for the whole space at once."""
        return self.method != "lhs"

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Values of scenarios ``start..stop-1``, shape (stop - start, n_dimensions), float64, in
        column-major order (each dimension's values contiguous: chunks read them column by column)."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"scenarios {start}..{stop} outside 0..{self.size}")
        idx = np.arange(start, stop, dtype=np.int64)
        out = np.empty((stop - start, len(self.dimensions)), order="F")
        if self.method == "grid":
            grids = [d.grid_values() for d in self.dimensions]
            for j, (g, i) in enumerate(zip(grids, np.unravel_index(idx, [len(g) for g in grids]), strict=True)):
                out[:, j] = g[i]
            return out
        unit = (_uniform_columns(self.seed, idx, len(self.dimensions)) if self.method == "random"
                else self._lhs_design[start:stop].T)
        for j, d in enumerate(self.dimensions):
            out[:, j] = d.from_unit(unit[j])
        return out


@jax.jit
def _uniform_per_index(key, idx, template):
    draw = lambda i: jax.random.uniform(jax.random.fold_in(key, i), template.shape, dtype=template.dtype)  # noqa: E731
    return jax.vmap(draw)(idx).T  # (dimension, scenario): each dimension's samples contiguous


@in_float64  # float64 samples, as recorded runs were drawn
def _uniform_columns(seed: int, idx: np.ndarray, n_dims: int) -> np.ndarray:
    """Uniform [0, 1) samples, shape (n_dims, len(idx)): column i is drawn from the key
    fold_in(seed, idx[i]), so a scenario's values do not depend on the chunk it is drawn in."""
    template = np.zeros(n_dims, dtype=np.float64)
    key = jax.random.key(seed, impl="threefry2x32")
    return np.asarray(_uniform_per_index(key, idx.astype(np.uint32), template))
