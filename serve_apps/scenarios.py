"""What-if runs of one asset: a single `Scenario`, or a sweep over a `ScenarioSpace`.

A single scenario is resolved by `prepare` into a `PreparedScenario` of plain NumPy arrays
(parameters from the asset's registered model plus overrides, start state from the twin or the
request, inputs from the signal specs), so running it is a pure function of that object: inline
in the ingress, or as a Ray task for an async job. A sweep becomes a `sweeps.SweepSpec` on the
asset's registered model (`sweep_spec`) and runs through `sweeps.runs.recorded_sweep`, which
writes a reproducible run record (``raytwin rerun RUN_ID``).
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field, ValidationError, model_validator

from raytwin import metrics
from raytwin.contracts import (
    START_TIME,
    Contract,
    ContractError,
    DateTime,
    Finite,
    Identifier,
    Scenario,
    describe_error,
    start_state_problems,
    whole_steps,
)
from raytwin.fmu import FmuModel
from raytwin.registry import ModelArtifact
from raytwin.signals import clock_seconds
from raytwin.sim import get_model, simulate, unstack
from raytwin.sim.checks import DivergedRunError, UnstableStepError, check_step
from raytwin.sim.precision import in_float64
from raytwin.storage import filesystem
from raytwin.store_failures import store_io
from serve_apps.errors import Diverged, Unprocessable, unwrap
from sweeps.aggregate import open_dataset, quantiles
from sweeps.fmu import FmuSweepSpec
from sweeps.runner import part_name
from sweeps.runs import recorded_fmu_sweep, recorded_sweep
from sweeps.space import ScenarioSpace
from sweeps.spec import SweepSpec


@dataclass(frozen=True)
class PreparedScenario:
    """Everything a run needs, as arrays in model order and SI units."""

    simulator: str
    model_ref: str
    content_hash: str
    step_s: float
    x0: np.ndarray  # (n_states,)
    inputs: np.ndarray  # (n_steps, n_inputs)
    params: np.ndarray  # (n_params,)
    overrides: dict[str, float]

    @property
    def n_steps(self) -> int:
        return self.inputs.shape[0]


def prepare(scenario: Scenario, artifact: ModelArtifact, live_state: dict[str, float] | None,
            clock: datetime | None = None) -> PreparedScenario:
    """Arrays for `scenario` (checked against the artifact's asset type: 422 on misfit).

    `live_state` is the twin's state (now or at ``scenario.start_time``) when the scenario
    starts from "live", and `clock` its time, where clock signals start (`raytwin.signals.CLOCK_INPUT`).
    """
    model = artifact.model()
    if isinstance(model, FmuModel):  # its stability check asked the FMU for a JAX solver: a 500 (AttributeError)
        raise Unprocessable(f"asset {scenario.asset_id}: its simulator is an FMU, and a what-if scenario integrates a "
                            "JAX model; sweep it instead (POST /v1/sweeps, one scenario; inputs held constant), "
                            "which runs the FMU on Ray workers as a job")
    try:
        inputs = scenario.input_series(artifact.asset_type, clock_seconds(clock))
        params = model.param_vector({**artifact.parameters, **scenario.parameter_overrides})
        check_step(model, scenario.step_s, params, inputs=inputs, what="step_s")
    except (ContractError, KeyError, UnstableStepError) as exc:
        raise Unprocessable(str(unwrap(exc))) from None
    start = live_state if scenario.start_state == "live" else scenario.start_state
    return PreparedScenario(
        simulator=artifact.asset_type.simulator, model_ref=artifact.ref, content_hash=artifact.content_hash,
        step_s=scenario.step_s,
        x0=np.asarray([start[n] for n in model.state_names], np.float64), inputs=inputs,
        params=np.asarray(params, np.float64), overrides=dict(scenario.parameter_overrides),
    )


@dataclass(frozen=True)
class ScenarioResult:
    states: np.ndarray  # (n_steps + 1, n_states), from the start state
    outputs: np.ndarray  # (n_steps, n_outputs), at the start of each step (with that step's input)


def run(prepared: PreparedScenario) -> ScenarioResult:
    """Simulate in float64: what-if answers are compared with telemetry, so accuracy wins.

    A trajectory that leaves the finite numbers raises `Diverged` (422 inline, a failed job
    otherwise): NaN or infinity is never an answer (JSON would even turn it into ``null``).
    """
    model = get_model(prepared.simulator)
    # the request's ranges are the asset type's (`Scenario.check_against`), which may differ from the
    # simulator's, and a live start is the twin's own estimate: simulate's range check is not this API's contract
    try:
        states = np.asarray(simulate(model, prepared.x0, prepared.inputs, prepared.params, prepared.step_s,
                                     dtype=jnp.float64, allow_implausible=True))
    except DivergedRunError as exc:  # a valid scenario: the API's 422 `diverged`, not a model's fault
        raise _diverged(prepared, exc.step, exc.states, "state") from None
    outputs = np.asarray(_observer(prepared.simulator)(states[:-1], prepared.inputs, prepared.params))
    _check_finite(prepared, outputs, model.output_names, "output")
    return ScenarioResult(states=states, outputs=outputs)


def _check_finite(prepared: PreparedScenario, series: np.ndarray, names: tuple[str, ...], kind: str) -> None:
    """Raise `Diverged` naming the first step (and its variables) where `series` is not finite."""
    bad = ~np.isfinite(series)
    if not bad.any():
        return
    step = int(np.argmax(bad.any(axis=1)))
    raise _diverged(prepared, step, [n for j, n in enumerate(names) if bad[step, j]], kind)


def _diverged(prepared: PreparedScenario, step: int, which: list[str], kind: str) -> Diverged:
    """`Diverged` naming the first step where the `kind` variables `which` are not finite."""
    return Diverged(f"the simulation diverged: {kind} {', '.join(which)} not finite at step {step} "
                    f"(t={step * prepared.step_s:g} s); try a smaller step_s", details=[
                        {"step": step, "time_s": step * prepared.step_s, kind + "s": which}])


@cache
def _observer(simulator: str):
    """Jitted outputs along a trajectory, (T, S) x (T, I) x (P,) -> (T, O)."""
    model = get_model(simulator)
    return in_float64(jax.jit(lambda x, u, p: jnp.stack(model.observe(unstack(x), unstack(u), tuple(p)), -1)))


def summary_table(prepared: PreparedScenario, result: ScenarioResult) -> pa.Table:
    """One row: the parameter overrides (``param.<name>``, as in sweeps) and final/min/max/mean of
    each state and of each output that is not also a state."""
    model = get_model(prepared.simulator)
    cols: dict[str, Any] = {"scenario": [0]}
    cols.update({f"param.{k}": [v] for k, v in sorted(prepared.overrides.items())})
    outputs = [(n, result.outputs[:, j]) for j, n in enumerate(model.output_names) if n not in model.state_names]
    for name, series in [*((n, result.states[:, j]) for j, n in enumerate(model.state_names)), *outputs]:
        cols.update({f"{name}_final": [series[-1]], f"{name}_min": [series.min()], f"{name}_max": [series.max()],
                     f"{name}_mean": [series.mean()]})
    return pa.table(cols)


@ray.remote(max_retries=2)
def scenario_to_store(prepared: PreparedScenario, out_url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """An async scenario job: simulate, write the summary as ``part-000000.parquet`` under `out_url` (its SHA-256 in
    `outputs`, as a sweep's run records its files', for the download to be checked)."""
    metrics.SCENARIO_STEPS.zero({"kind": "scenario"})  # a job's first in this worker shows on its panel
    t0 = time.perf_counter()
    table = summary_table(prepared, run(prepared))
    seconds = time.perf_counter() - t0
    metrics.SCENARIO_STEPS.inc(prepared.n_steps, kind="scenario")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs, root = filesystem(out_url, storage_options)
    with store_io("write"):
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{part_name(0)}", buf.getvalue())
    return {"quantiles": quantiles(out_url, storage_options=storage_options).to_pylist(), "compute_s": seconds,
            "steps": prepared.n_steps, "result_url": out_url, "run_id": None,
            "outputs": {part_name(0): hashlib.sha256(buf.getvalue()).hexdigest()}}


# ----------------------------------------------------------------------------------- sweeps --
class AssetSweep(Contract):
    """A what-if sweep of one asset (see `sweeps.SweepSpec`): its registered model and parameters,
    from its live (or past, or an explicit) state, over a scenario space."""

    asset_id: Identifier
    start_state: Literal["live"] | dict[str, Finite] = "live"
    start_time: DateTime | None = Field(None, description=START_TIME)
    horizon_s: Annotated[Finite, Field(gt=0)]
    step_s: Annotated[Finite, Field(gt=0)]
    inputs: dict[str, Finite] = Field(default_factory=dict, description="input-signal parameters of the sweep kit")
    parameters: dict[str, Finite] = Field(default_factory=dict, description="overrides of the model's parameters")
    space: ScenarioSpace
    trajectories: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _steps(self) -> AssetSweep:
        whole_steps(self.horizon_s, self.step_s)
        return self

    @property
    def work(self) -> int:
        return self.space.size * round(self.horizon_s / self.step_s)


def _spec_fields(sweep: AssetSweep, tenant: str, registry_url: str, artifact: ModelArtifact,
                 live_state: dict[str, float] | None) -> dict[str, Any]:
    """What a JAX and an FMU sweep spec both take from an asset sweep; 422 on an explicit start state
    outside the asset type's plausible ranges."""
    if isinstance(sweep.start_state, dict) and (problems := start_state_problems(sweep.start_state,
                                                                                  artifact.asset_type)):
        raise Unprocessable(f"sweep of {sweep.asset_id}: " + "; ".join(problems))
    return {"model": artifact.ref, "registry_url": registry_url, "tenant": tenant, "asset_id": sweep.asset_id,
            "start_state": live_state if sweep.start_state == "live" else sweep.start_state,
            "parameters": sweep.parameters, "inputs": sweep.inputs, "space": sweep.space,
            "horizon_s": sweep.horizon_s, "step_s": sweep.step_s}


def sweep_spec(sweep: AssetSweep, tenant: str, registry_url: str, artifact: ModelArtifact,
               live_state: dict[str, float] | None, clock: datetime | None = None) -> SweepSpec:
    """The `SweepSpec` for an asset sweep, checked before it runs or is queued (422 on names the model
    or its sweep kit lacks, values outside the parameters' bounds or the plausible ranges, a step beyond
    the stability limit of its parameter box, or an explicit start state outside the asset type's
    plausible ranges). Blocking (the stability check may compile): call it off the event loop."""
    fields = _spec_fields(sweep, tenant, registry_url, artifact, live_state)
    try:
        spec = SweepSpec(**fields, trajectories=sweep.trajectories, start_time=clock)
        spec.check_against(artifact.asset_type.simulator, artifact.parameters)
    except (ValidationError, ValueError) as exc:
        raise Unprocessable(describe_error(exc)) from None
    return spec


@ray.remote(num_cpus=0, max_retries=0)
def sweep_to_store(spec: SweepSpec, runs_url: str, storage_options: dict[str, Any], user: str,
                   run_id: str | None = None) -> dict[str, Any]:
    """A sweep as a recorded run (under `run_id`: a job names its run before it starts, so that a cancelled or
    failed one still links its record); it only coordinates (0 CPUs), its chunk tasks do the work (and retry)."""
    t0 = time.perf_counter()
    record = recorded_sweep(spec, runs=runs_url, storage_options=storage_options or None, user=user, progress=False,
                            run_id=run_id)
    return {"quantiles": quantiles(record.output_url, storage_options=storage_options or None).to_pylist(),
            "compute_s": time.perf_counter() - t0, "steps": spec.space.size * spec.n_steps,
            "result_url": record.output_url, "run_id": record.run_id, "outputs": record.outputs}


# ------------------------------------------------------------------------------- FMU sweeps --
def is_fmu(artifact: ModelArtifact) -> bool:
    """Whether the asset type's simulator is a stored FMU (stepped by fmpy, not a JAX kernel)."""
    return isinstance(artifact.model(), FmuModel)


def fmu_sweep_spec(sweep: AssetSweep, tenant: str, registry_url: str, artifact: ModelArtifact,
                   live_state: dict[str, float] | None) -> FmuSweepSpec:
    """The `sweeps.fmu.FmuSweepSpec` for an asset sweep whose simulator is an FMU.

    An FMU has no sweep kit: `inputs` and ``input`` dimensions name the FMU's own inputs (held
    constant over the horizon), and per-scenario trajectories are not recorded; anything else is
    a 422 that names what the FMU offers, raised before the job is queued.
    """
    if sweep.trajectories:
        raise Unprocessable(f"sweep of {sweep.asset_id}: an FMU sweep records per-scenario metrics only; "
                            "drop 'trajectories' (run single scenarios through the CLI to inspect them)")
    fields = _spec_fields(sweep, tenant, registry_url, artifact, live_state)
    try:
        spec = FmuSweepSpec(**fields)
        spec.scenarios(artifact, artifact.model())  # every name and scale checked now, not in the job
    except (ValidationError, ValueError) as exc:
        raise Unprocessable(describe_error(exc) if isinstance(exc, ValidationError) else str(exc)) from None
    return spec


@ray.remote(num_cpus=0, max_retries=0)
def fmu_sweep_to_store(spec: FmuSweepSpec, runs_url: str, storage_options: dict[str, Any], user: str,
                       run_id: str | None = None) -> dict[str, Any]:
    """An FMU sweep as a recorded run under `run_id`, as `sweep_to_store` (coordinates only; `raytwin.fmu`'s
    worker tasks step the FMU).

    Quantiles cover the metric columns; scenarios the FMU failed on have NaN metrics and a reason
    in the table's ``error`` column.
    """
    t0 = time.perf_counter()
    record = recorded_fmu_sweep(spec, runs=runs_url, storage_options=storage_options or None, user=user,
                                run_id=run_id)
    schema = open_dataset(record.output_url, storage_options or None).schema
    columns = [f.name for f in schema if pa.types.is_floating(f.type) and "." not in f.name]
    bands = quantiles(record.output_url, columns, storage_options=storage_options or None)
    return {"quantiles": bands.to_pylist(), "compute_s": time.perf_counter() - t0,
            "steps": spec.space.size * spec.n_steps, "result_url": record.output_url, "run_id": record.run_id,
            "outputs": record.outputs}
