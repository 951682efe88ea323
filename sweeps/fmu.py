"""Sweeps and calibrations of registered FMUs, as data: specs that a run record stores and replays.

The JAX path (`sweeps.runner`) fuses generated inputs and streamed metrics into one XLA kernel;
an FMU is a black box stepped by fmpy, so it runs on `raytwin.fmu`'s Ray tasks instead (one FMU
instance per worker, reset between scenarios). What stays the same is everything a user keeps:
the model is a registry artifact (``name@version``, its simulator a stored FMU whose SHA-256 the
registry pins), the scenarios are a seeded `ScenarioSpace`, and `sweeps.runs` writes the same
`RunRecord` (model hash, FMU hash, spec, seeds, output hashes) and reruns it bit for bit.

- `FmuSweepSpec`: scenario ``i`` = the artifact's parameters, then `parameters`, `start_state`
  and `inputs` (held constant over the horizon), then the space's row ``i`` (``param``,
  ``state`` or ``input`` dimensions; ``scale`` multiplies the base value). Output: one Parquet
  file, a row per scenario with its dimension values, ``final/min/max/mean`` of every output
  (`raytwin.fmu.batch.METRICS`) and ``error`` (the reason a scenario failed, null otherwise).
- `FmuCalibrationSpec`: telemetry as Parquet (``t_s`` uniform, the observed outputs and any FMU
  inputs, held per step), free parameters with bounds, searched by Ray Tune + Nelder-Mead
  (`raytwin.fmu.calibrate_fmu`). Output: ``calibration.json`` (fitted parameters, loss).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from raytwin import units
from raytwin.contracts import Finite, Identifier, Spec, whole_steps
from raytwin.fmu import FmuModel, FmuScenario, calibrate_fmu, run_fmu_sweep
from raytwin.fmu.batch import METRICS
from raytwin.registry import ModelArtifact
from raytwin.sim.model import Input, Param, State
from raytwin.storage import canonical_json, filesystem, make_folder, replace_file
from sweeps.calibration import (MAX_TRIALS, CalibrationError, TuneSeed, declared_columns, no_finite_loss, read_telemetry,
                                too_few_samples)
from sweeps.limits import MAX_SCENARIOS, check_size
from sweeps.runner import ensure_ray, part_name, write_parquet
from sweeps.space import ScenarioSpace
from sweeps.spec import allowed_values, range_problems, resolve_model

Interface = Literal["CoSimulation", "ModelExchange"]
CALIBRATION_FILE = "calibration.json"


class FmuSpecError(ValueError):
    """An FMU sweep or calibration that does not fit its model (unknown names, not an FMU, free ranges
    outside the declared bounds) or that no trial could fit."""


def registered_fmu(model: str, registry_url: str) -> tuple[ModelArtifact, FmuModel]:
    """The artifact ``name@version`` and its FMU; refuses an artifact whose simulator is JAX code."""
    artifact = resolve_model(model, registry_url)
    fmu = artifact.model()
    if not isinstance(fmu, FmuModel):
        raise FmuSpecError(f"{model}: simulator {artifact.asset_type.simulator!r} is not an FMU; "
                           "sweep it with sweeps.SweepSpec, calibrate it with sweeps.CalibrationSpec")
    return artifact, fmu


def _unknown(kind: str, given: set[str], known: tuple[str, ...]) -> list[str]:
    extra = sorted(given - set(known))
    return [f"unknown {kind}(s) {extra}; known: {list(known)}"] if extra else []


def _registered_ranges(artifact: ModelArtifact, fmu: FmuModel
                       ) -> tuple[dict[str, Param], dict[str, Input], dict[str, State]]:
    """The FMU's parameters, inputs and states with the bounds and plausible ranges its registered asset
    type declares (the FMU's min/max unless declared otherwise), in the FMU's units: what a sweep may
    give them, as for a JAX model."""
    declared = artifact.asset_type

    def ranged(var, q) -> Any:
        if q is None:
            return var
        bound = lambda b, default: default if b is None else units.to_unit(b, q.unit, var.unit)  # noqa: E731
        return dataclasses.replace(var, lower=bound(q.lower, -math.inf), upper=bound(q.upper, math.inf))

    return ({p.name: ranged(p, declared.parameters.get(p.name)) for p in fmu.params},
            {i.name: ranged(i, declared.inputs.get(i.name)) for i in fmu.inputs},
            {s.name: ranged(s, declared.states.get(s.name)) for s in fmu.states})


class _FmuRunSpec(Spec):
    """What every FMU run names: the registered model (``name@version``), its registry, whose asset
    it is for, and the start values and parameters that override the registered ones."""

    engine: Literal["fmu"] = "fmu"
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*@\d+\.\d+\.\d+$")]
    registry_url: Annotated[str, Field(min_length=1)]
    tenant: Identifier = "default"
    asset_id: Identifier | None = None
    start_state: dict[str, Finite] = Field(default_factory=dict)
    parameters: dict[str, Finite] = Field(default_factory=dict)
    interface: Interface = "CoSimulation"


class FmuSweepSpec(_FmuRunSpec):
    """A what-if sweep of a registered FMU (see module docstring)."""

    inputs: dict[str, Finite] = Field(default_factory=dict)
    space: ScenarioSpace
    horizon_s: Annotated[Finite, Field(gt=0)]
    step_s: Annotated[Finite, Field(gt=0)]
    chunk_size: Annotated[int, Field(ge=1, le=4096)] = 16

    @model_validator(mode="after")
    def _steps(self) -> FmuSweepSpec:
        whole_steps(self.horizon_s, self.step_s)
        return self

    @property
    def n_steps(self) -> int:
        return round(self.horizon_s / self.step_s)

    def scenarios(self, artifact: ModelArtifact, fmu: FmuModel) -> list[FmuScenario]:
        """Every scenario of the space, in index order; unknown names refused with the known ones."""
        known = {"param": fmu.param_names, "state": fmu.state_names, "input": fmu.input_names}
        problems = (_unknown("parameter", set(self.parameters), fmu.param_names)
                    + _unknown("state", set(self.start_state), fmu.state_names)
                    + _unknown("input", set(self.inputs), fmu.input_names)
                    + [f"dimension {d.column}: unknown; known {d.target}s: {list(known[d.target])}"
                       for d in self.space.dimensions if d.name not in known[d.target]])
        if problems:
            raise FmuSpecError(f"sweep over FMU {fmu.name}: " + "; ".join(problems))
        start = {s.name: s.nominal for s in fmu.states if s.nominal is not None}
        inputs = {i.name: i.nominal for i in fmu.inputs if i.nominal is not None}
        base = {"param": {**artifact.parameters, **self.parameters}, "state": {**start, **self.start_state},
                "input": {**inputs, **self.inputs}}
        problems = range_problems(allowed_values(*_registered_ranges(artifact, fmu)), base,
                                  {"parameters": ("param", self.parameters), "inputs": ("input", self.inputs)},
                                  self.space.dimensions)
        if problems:  # as for a JAX model, the start state (a twin's live one) is not checked: it is what it is
            raise FmuSpecError(f"sweep over FMU {fmu.name}: " + "; ".join(problems))
        out = []
        for row in self.space.rows(0, self.space.size):
            values = {target: dict(v) for target, v in base.items()}
            for d, x in zip(self.space.dimensions, row):
                scaled = d.mode == "scale"
                if scaled and d.name not in values[d.target]:
                    raise FmuSpecError(f"dimension {d.column} scales a value the FMU does not give: set it absolutely")
                values[d.target][d.name] = float(x) * values[d.target][d.name] if scaled else float(x)
            held = {n: np.full(self.n_steps, v) for n, v in values["input"].items()}
            out.append(FmuScenario(self.n_steps, self.step_s, values["state"], values["param"], held))
        return out


def check_fmu_sweep_size(spec: FmuSweepSpec, max_scenarios: int = MAX_SCENARIOS) -> None:
    """`sweeps.limits.check_size` of `spec` (its values: the `error` column, and `METRICS` for each output), as for a
    JAX sweep: a huge design would be drawn in the driver, one scenario object each. Before the FMU is loaded (a
    download and a read of its description): the message gives what each of its outputs adds."""
    check_size(spec.space, spec.n_steps, 1, max_scenarios=max_scenarios, per_output=len(METRICS))


def run_fmu_spec(spec: FmuSweepSpec, out_url: str, storage_options: dict | None = None, *,
                 max_scenarios: int = MAX_SCENARIOS) -> tuple[dict, dict]:
    """Run the sweep on Ray and write its table under `out_url`: (file name -> sha256, summary). A sweep of more
    than `max_scenarios` scenarios is refused (`sweeps.limits.SweepTooLarge`) before its design is drawn."""
    check_fmu_sweep_size(spec, max_scenarios)
    artifact, fmu = registered_fmu(spec.model, spec.registry_url)
    scenarios = spec.scenarios(artifact, fmu)
    ensure_ray()
    t0 = time.monotonic()
    result = run_fmu_sweep(fmu, scenarios, chunk_size=spec.chunk_size, interface=spec.interface, keep_outputs=False)
    elapsed = time.monotonic() - t0
    rows = spec.space.rows(0, spec.space.size)
    table = pa.table({
        "scenario": np.arange(len(scenarios), dtype=np.int64),
        **{col: rows[:, j] for j, col in enumerate(spec.space.columns)},
        **result.metrics,
        "error": pa.array(result.errors, type=pa.string()),
    })
    name = part_name(0)
    fs, root = filesystem(out_url, storage_options)
    make_folder(fs, root)
    digest = write_parquet(table, f"{out_url.rstrip('/')}/{name}", storage_options)
    summary = {"scenarios": len(scenarios), "failed": len(result.failed), "workers": len(result.instantiations),
               "elapsed_s": round(elapsed, 3),
               "scenario_steps_per_s": round(len(scenarios) * spec.n_steps / elapsed, 1), "platforms": result.platforms}
    return {name: digest}, summary


class FmuCalibrationSpec(_FmuRunSpec):
    """A calibration of a registered FMU against telemetry (see module docstring)."""

    telemetry: Annotated[str, Field(min_length=1)]
    free: Annotated[dict[str, tuple[Finite, Finite]], Field(min_length=1)]  # name -> (lower, upper)
    num_samples: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 4
    max_evaluations: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 200
    seed: TuneSeed = 0

    @model_validator(mode="after")
    def _bounds(self) -> FmuCalibrationSpec:
        bad = [n for n, (lo, hi) in self.free.items() if not lo < hi]
        if bad:
            raise ValueError(f"free parameter(s) {bad}: need lower < upper")
        return self


def _outside_bounds(free: dict[str, tuple[float, float]], artifact: ModelArtifact) -> list[str]:
    """The free ranges that leave the parameters' declared bounds (the registered asset type's, from
    `FmuModel.declare`): a search there runs the FMU where it is not meant to work."""
    declared = artifact.asset_type.parameters
    return [f"free {name} [{lo:g}, {hi:g}] leaves its declared bounds [{declared[name].lower:g}, "
            f"{declared[name].upper:g}]: search within them" for name, (lo, hi) in free.items()
            if name in declared and not declared[name].lower <= lo < hi <= declared[name].upper]


def calibrate_fmu_spec(spec: FmuCalibrationSpec, out_url: str, storage_options: dict | None = None) -> tuple[dict, dict]:
    """Fit the free parameters to the telemetry and write ``calibration.json``: (file -> sha256, summary)."""
    artifact, fmu = registered_fmu(spec.model, spec.registry_url)
    table, _ = read_telemetry(spec.telemetry, storage_options)
    problems = (_unknown("parameter", set(spec.free) | set(spec.parameters), fmu.param_names)
                + _unknown("state", set(spec.start_state), fmu.state_names)
                + _outside_bounds(spec.free, artifact))
    if "t_s" not in table.column_names:
        problems.append(f"telemetry {spec.telemetry} has no t_s column")
    if missing := [n for n in fmu.input_names if n not in table.column_names]:  # were held at their start values
        problems.append(f"telemetry lacks input column(s) {missing}: the FMU would run with them held at their start "
                        "values, not as the asset was driven; give each input's measured values (a constant column "
                        "holds one)")
    observed = [c for c in table.column_names if c in fmu.output_names]
    if not observed:
        problems.append(f"telemetry columns {table.column_names} hold none of the outputs {list(fmu.output_names)}")
    if problems:
        raise FmuSpecError(f"calibration of FMU {fmu.name}: " + "; ".join(problems))
    t = table["t_s"].to_numpy().astype(np.float64)
    steps = np.diff(t)
    if t.size < 3 or steps[0] <= 0 or not np.allclose(steps, steps[0], rtol=1e-9, atol=0):
        raise FmuSpecError("telemetry t_s must be uniformly spaced and increasing (>= 3 samples); resample first")
    if (few := too_few_samples(t.size, len(spec.free))) is not None:
        raise FmuSpecError(f"calibration of FMU {fmu.name}: {few}")
    try:  # in the FMU's declared units, converted from a column's field-metadata unit where it names one
        columns = declared_columns(f"FMU {fmu.name}", [v for v in (*fmu.inputs, *fmu.outputs)
                                                        if v.name in table.column_names], table)
    except CalibrationError as exc:
        raise FmuSpecError(str(exc)) from None
    held = {n: columns[n][:-1] for n in fmu.input_names if n in columns}
    scenario = FmuScenario(t.size - 1, float(steps[0]), dict(spec.start_state),
                           {**artifact.parameters, **spec.parameters}, held, start_time=float(t[0]))
    ensure_ray()
    fit = calibrate_fmu(fmu, scenario, {n: columns[n] for n in observed}, spec.free, num_samples=spec.num_samples,
                        seed=spec.seed, interface=spec.interface, max_evaluations=spec.max_evaluations)
    if not math.isfinite(fit.loss):
        raise FmuSpecError(no_finite_loss(f"FMU {fmu.name}", "every FMU run failed (e.g. diverged)",
                                          "narrow the free ranges or check start_state and parameters"))
    body = canonical_json({"parameters": fit.params, "loss": fit.loss, "observed": observed})
    fs, root = filesystem(out_url, storage_options)
    make_folder(fs, root)
    replace_file(fs, f"{root}/{CALIBRATION_FILE}", body)
    summary = {"parameters": fit.params, "loss": fit.loss, "trials": fit.trials, "evaluations": fit.evaluations,
               "platforms": fit.platforms}
    return {CALIBRATION_FILE: hashlib.sha256(body).hexdigest()}, summary
