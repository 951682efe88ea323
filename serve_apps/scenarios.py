"""What-if scenarios: turn `Scenario` contracts into simulator arrays, run them, summarise them.

`prepare` resolves everything that depends on the catalog and the twin (parameters from the
model artifact plus overrides, start state from the twin or the request, inputs from the signal
specs) into a `PreparedBatch` of plain NumPy arrays; `run_batch` is then a pure function of that
batch (so an async job is a Ray task over it, reproducible from its inputs). One batch = scenarios
of one asset with one horizon and step, simulated together with `raytwin.sim.simulate_batch`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Annotated, Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from raytwin.contracts import AssetType, Contract, ContractError, Finite, Scenario
from raytwin.registry import ModelArtifact
from raytwin.sim import get_model, simulate_batch, unstack
from serve_apps.errors import Unprocessable

QUANTILES = (0.05, 0.5, 0.95)


class SweepRequest(Contract):
    """Scenarios of one asset: an explicit list, and/or a base scenario crossed with a parameter grid."""

    scenarios: list[Scenario] = Field(default_factory=list)
    base: Scenario | None = None
    parameter_grid: dict[str, Annotated[list[Finite], Field(min_length=1)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _some(self) -> SweepRequest:
        if not self.scenarios and self.base is None:
            raise ValueError("give `scenarios`, or `base` (with an optional `parameter_grid`)")
        if self.parameter_grid and self.base is None:
            raise ValueError("`parameter_grid` needs a `base` scenario")
        return self

    def size(self) -> int:
        grid = int(np.prod([len(v) for v in self.parameter_grid.values()])) if self.parameter_grid else 1
        return len(self.scenarios) + (grid if self.base is not None else 0)

    def expand(self) -> list[Scenario]:
        out = list(self.scenarios)
        if self.base is not None:
            names = list(self.parameter_grid)
            for combo in itertools.product(*(self.parameter_grid[n] for n in names)):
                overrides = {**self.base.parameter_overrides, **dict(zip(names, combo))}
                out.append(self.base.model_copy(update={"parameter_overrides": overrides}))
        return out


@dataclass(frozen=True)
class PreparedBatch:
    """Everything a run needs, as arrays in model order and SI units."""

    simulator: str
    model_ref: str
    content_hash: str
    step_s: float
    n_steps: int
    x0: np.ndarray  # (B, n_states)
    inputs: np.ndarray  # (B, n_steps, n_inputs)
    params: np.ndarray  # (B, n_params)
    overrides: list[dict[str, float]]

    @property
    def size(self) -> int:
        return self.x0.shape[0]

    @property
    def work(self) -> int:
        return self.size * self.n_steps


def check_batch(scenarios: list[Scenario]) -> None:
    first = scenarios[0]
    for i, s in enumerate(scenarios):
        if (s.asset_id, s.horizon_s, s.step_s) != (first.asset_id, first.horizon_s, first.step_s):
            raise Unprocessable(f"scenario {i}: a sweep covers one asset with one horizon_s and step_s "
                                f"({first.asset_id}, {first.horizon_s}, {first.step_s})")


def prepare(scenarios: list[Scenario], artifact: ModelArtifact,
            live_states: dict[datetime | None, dict[str, float]]) -> PreparedBatch:
    """Arrays for `scenarios` (validated against the artifact's asset type: 422 on misfit).

    `live_states` maps each ``start_time`` of the scenarios that start from "live" to the twin's
    state then (``None``: its current state).
    """
    check_batch(scenarios)
    asset_type: AssetType = artifact.asset_type
    model = artifact.model()
    x0, inputs, params = [], [], []
    for i, s in enumerate(scenarios):
        try:
            inputs.append(s.input_series(asset_type))
            params.append(model.param_vector({**artifact.parameters, **s.parameter_overrides}))
        except (ContractError, KeyError) as exc:
            raise Unprocessable(f"scenario {i}: {exc}") from None
        if s.start_state == "live":
            x0.append([live_states[s.start_time][n] for n in model.state_names])
        else:
            x0.append([s.start_state[n] for n in model.state_names])
    return PreparedBatch(
        simulator=model.name, model_ref=artifact.ref, content_hash=artifact.content_hash,
        step_s=scenarios[0].step_s, n_steps=scenarios[0].n_steps,
        x0=np.asarray(x0, np.float64), inputs=np.stack(inputs), params=np.asarray(params, np.float64),
        overrides=[dict(s.parameter_overrides) for s in scenarios],
    )


@dataclass(frozen=True)
class BatchResult:
    states: np.ndarray  # (B, n_steps + 1, n_states), from the start state
    outputs: np.ndarray  # (B, n_steps, n_outputs), at the start of each step (with that step's input)


def run_batch(batch: PreparedBatch) -> BatchResult:
    """Simulate the batch in float64 (what-if answers are compared with telemetry, so accuracy wins)."""
    model = get_model(batch.simulator)
    states = simulate_batch(model, batch.x0, batch.inputs, batch.params, batch.step_s, dtype=jnp.float64)
    outputs = _observer(batch.simulator)(states[:, :-1], batch.inputs, batch.params[:, None, :])
    return BatchResult(states=states, outputs=np.asarray(outputs))


@cache
def _observer(simulator: str):
    """Jitted outputs of a batch of trajectories, (B, T, S) x (B, T, I) x (B, 1, P) -> (B, T, O)."""
    model = get_model(simulator)
    return jax.jit(lambda x, u, p: jnp.stack(model.observe(unstack(x), unstack(u), unstack(p)), -1))


def summary_table(batch: PreparedBatch, result: BatchResult) -> pa.Table:
    """One row per scenario: its parameter overrides, then final/min/max/mean of each state and output."""
    model = get_model(batch.simulator)
    cols: dict[str, Any] = {"scenario": np.arange(batch.size, dtype=np.int64)}
    for name in sorted({k for o in batch.overrides for k in o}):
        cols[f"param.{name}"] = np.asarray([o.get(name, np.nan) for o in batch.overrides], dtype=np.float64)
    for kind, names, values in (("state", model.state_names, result.states),
                                ("output", model.output_names, result.outputs)):
        for j, name in enumerate(names):
            series = values[:, :, j]
            cols[f"{kind}.{name}.final"] = series[:, -1]
            cols[f"{kind}.{name}.min"] = series.min(axis=1)
            cols[f"{kind}.{name}.max"] = series.max(axis=1)
            cols[f"{kind}.{name}.mean"] = series.mean(axis=1)
    return pa.table(cols)


def quantiles(table: pa.Table) -> dict[str, dict[str, float]]:
    """Ensemble quantiles (5/50/95%) of every metric column (uncertainty bands over the sweep)."""
    out = {}
    for name in table.column_names:
        if name.startswith(("state.", "output.")):
            values = table.column(name).to_numpy()
            out[name] = {f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}
    return out

