"""What a sweep is: the model, where it starts, its base values and its scenario space.

A `SweepSpec` is complete and JSON-serialisable, so a run record that stores it can re-execute
the sweep exactly. Models are referenced either as a registry artifact (``name@1.2.3`` with
`registry_url`, e.g. the calibrated parameters of an asset) or as a bare simulator name (its
typical parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from raytwin.contracts import AssetType, DateTime, Finite, Identifier, Spec, whole_steps
from raytwin.registry import ModelArtifact, ModelRegistry
from raytwin.sim import get_model
from raytwin.sim.ranges import Allowed, allowed_values, outside
from raytwin.sim.tableau import TABLEAUS
from raytwin.scenario_metrics import Metric
from raytwin.signals import CLOCK_INPUT, Signal, clock_seconds
from sweeps.kits import Kit, KitParameter, kit_for
from sweeps.space import Dimension, ScenarioSpace
from sweeps.stability import check_sweep_step

MAX_CHUNK = 16384
"""Scenarios per chunk by default: measured fastest batch for the thermal model on CPU."""
MAX_TRAJECTORY_SAMPLES = 20_000_000
"""Full trajectories are for a selected subset: at most this many (scenario, step) samples per sweep
(held in memory by one task: ~0.5 GB for a three-state model in float64)."""


def resolve_model(model: str, registry_url: str | None = None) -> ModelArtifact:
    """The artifact for ``name@version`` in `registry_url`, or a bare simulator with its defaults."""
    if "@" in model:
        if registry_url is None:
            raise ValueError(f"model {model!r} is a registry reference: give registry_url")
        return ModelRegistry(registry_url).get(model)
    sim = get_model(model)
    return ModelArtifact(
        name=sim.name, version=sim.version, asset_type=AssetType.from_model(sim), parameters=sim.default_params()
    )


class ModelStart(Spec):
    """What a run of a model from a start point names (a sweep, a recommendation): the model (a registry
    ref with `registry_url`, or a built-in name), whose tenant and asset, and the base values."""

    model: Annotated[str, Field(min_length=1)]
    registry_url: str | None = None
    tenant: Identifier = "default"
    asset_id: Identifier | None = None
    start_state: dict[str, Finite] | None = None
    parameters: dict[str, Finite] = Field(default_factory=dict)
    inputs: dict[str, Finite] = Field(default_factory=dict, description="The kit's parameters (input-signal "
                                      "parameters and metric thresholds)")
    start_time: DateTime | None = Field(None, description="The wall-clock time of t = 0 (a twin's state's event "
                                        "time): signals with `clock: true` follow it (the thermal kit's outdoor "
                                        "temperature and sun); None: t = 0 is a Monday 00:00 UTC, or "
                                        f"inputs.{CLOCK_INPUT} seconds after it")

    @model_validator(mode="after")
    def _one_clock(self) -> ModelStart:
        if self.start_time is not None and CLOCK_INPUT in self.inputs:
            raise ValueError(f"inputs.{CLOCK_INPUT} and start_time both set the clock: leave {CLOCK_INPUT} out (a "
                             "run from a twin's live state starts at its state's time; from an explicit state, "
                             "give one of them)")
        return self

    def kit_inputs(self, kit: Kit) -> dict[str, float]:
        """The kit parameters' base values: the kit's defaults, the clock of `start_time` (a traced value:
        one compiled kernel serves every start time), then `inputs`."""
        clock = {CLOCK_INPUT: clock_seconds(self.start_time)} \
            if self.start_time is not None and CLOCK_INPUT in kit.parameters else {}
        return {**kit.default_inputs(), **clock, **self.inputs}


MAX_FLOAT32_STEPS = 1 << 24
"""Steps a float32 sweep may take: float32 holds whole numbers exactly up to 2^24, and past it sums of
per-step increments (time, integral metrics) stall."""


class SweepSpec(ModelStart):
    """A what-if sweep: every scenario of `space` applied on top of the base values.

    Base values: `start_state` (e.g. a twin's live ``TwinState.state``; default: the kit's),
    `parameters` (override the model artifact's), `inputs` (the kit's parameters: input-signal
    parameters and metric thresholds, see `sweeps.kits`). `signals` replace the model kit's
    signal of some inputs and `metrics`, when given, its metrics (data, see `sweeps.kits`); a
    parameter name they use that the kit lacks is declared by giving its value in `inputs`.
    `trajectories` lists scenario indices whose full state trajectories are also written.
    `solver` integrates this sweep's steps with an explicit Runge-Kutta tableau of
    `raytwin.sim.tableau.TABLEAUS` (``"tsit5"``; ``"rk4"`` as a tableau) instead of the model's own
    (the built-in RK4 unless the model names one); the step is still checked against the RK4
    stability limit.
    """

    signals: dict[str, Signal] = Field(default_factory=dict)
    metrics: list[Metric] = Field(default_factory=list)
    space: ScenarioSpace
    horizon_s: Annotated[Finite, Field(gt=0)]
    step_s: Annotated[Finite, Field(gt=0)]
    dtype: Literal["float32", "float64"] = "float32"
    chunk_size: Annotated[int, Field(ge=1, le=1 << 22)] = MAX_CHUNK
    trajectories: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    allow_unstable: bool = False  # run a step beyond the RK4 stability limit (sweeps.stability) with a warning
    solver: Literal["rk4", "tsit5"] | None = None  # an explicit RK tableau for this sweep (None: the model's own)

    @property
    def n_steps(self) -> int:
        return round(self.horizon_s / self.step_s)

    @property
    def batch_size(self) -> int:
        """Scenarios per chunk: `chunk_size`, or fewer for a smaller sweep (no padding to compute)."""
        return min(self.chunk_size, self.space.size)

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        whole_steps(self.horizon_s, self.step_s)
        if self.dtype == "float32" and self.n_steps > MAX_FLOAT32_STEPS:
            raise ValueError(f"{self.n_steps} steps: in float32 a run's time and its integral metrics stop adding "
                             f"up beyond {MAX_FLOAT32_STEPS} steps (2^24; a 1e9-step energy came out 35x too low); "
                             "use a longer step_s or a shorter horizon_s (or, outside the HTTP API, dtype "
                             "float64)")
        if self.start_time is not None and any(d.name == CLOCK_INPUT for d in self.space.dimensions):
            raise ValueError(f"a dimension sweeps {CLOCK_INPUT} and start_time sets it (a run from a twin's live "
                             "state starts at its state's time; sweep the start hour from an explicit start_state)")
        if "@" not in self.model:
            self.check_against(self.model)
        bad = [i for i in self.trajectories if i >= self.space.size]
        if bad:
            raise ValueError(f"trajectories {bad} outside the {self.space.size} scenarios")
        if len(set(self.trajectories)) != len(self.trajectories):
            raise ValueError("trajectories lists a scenario twice")
        if len(self.trajectories) * (self.n_steps + 1) > MAX_TRAJECTORY_SAMPLES:
            raise ValueError(f"{len(self.trajectories)} full trajectories of {self.n_steps} steps are too many "
                             f"(> {MAX_TRAJECTORY_SAMPLES} samples); select fewer scenarios")
        return self

    def kit(self, simulator: str) -> Kit:
        """The sweep's kit: the model's, with this spec's `signals` and `metrics` (one object per
        distinct declaration in a process, so its kernel compiles once)."""
        used = {n for sig in self.signals.values() for n in sig.references()}
        used |= {n for m in self.metrics for n in m.references()}
        declared = tuple(sorted(used & set(self.inputs)))
        signals = json.dumps({k: v.model_dump() for k, v in sorted(self.signals.items())})
        metrics = json.dumps([m.model_dump() for m in self.metrics])
        return _custom_kit(simulator, signals, metrics, declared, self.solver)

    def check_against(self, simulator: str, base_parameters: Mapping[str, float] | None = None) -> None:
        """Refuse names the simulator or its kit does not have, values they do not admit, and a step
        beyond the RK4 stability limit of the parameter box (`check_sweep_step`): run by the spec itself
        for a bare simulator, and once a registry model is resolved (by the runner and the HTTP API)
        around the artifact's `base_parameters`."""
        self._check_names(simulator)
        problems = self._value_problems(self.kit(simulator), base_parameters or {})
        if problems:
            raise ValueError(f"sweep over {simulator}: " + "; ".join(problems))
        check_sweep_step(self, simulator, dict(base_parameters or {}))

    def _check_names(self, simulator: str) -> None:
        kit = self.kit(simulator)
        known = {"state": set(kit.model.state_names), "param": set(kit.model.param_names), "input": set(kit.parameters)}
        problems = []
        for target, given in (("state", self.start_state or {}), ("param", self.parameters), ("input", self.inputs)):
            unknown = set(given) - known[target]
            if unknown:
                problems.append(f"unknown {target} name(s) {sorted(unknown)}; known: {sorted(known[target])}")
        if self.start_state is not None and set(self.start_state) != known["state"]:
            problems.append(f"start_state must give exactly {sorted(known['state'])}")
        for d in self.space.dimensions:
            if d.name not in known[d.target]:
                problems.append(f"dimension {d.column}: unknown; known {d.target}s: {sorted(known[d.target])}")
        if problems:
            raise ValueError(f"sweep over {simulator}: " + "; ".join(problems))

    def _value_problems(self, kit: Kit, base_parameters: Mapping[str, float]) -> list[str]:
        """`parameters`, `inputs` and each dimension's values against the parameters' bounds and the kit
        parameters' and states' plausible ranges (`range_problems`), and `start_state`: a scenario whose
        state is outside its plausible range is reported as diverged, so a start outside it (given, or a
        twin's live state) would report every scenario diverged at its first step instead of saying why."""
        model = kit.model
        allowed = allowed_values({p.name: p for p in model.params}, kit.parameters, {v.name: v for v in model.states})
        base = {"param": {**model.default_params(), **base_parameters, **self.parameters},
                "input": self.kit_inputs(kit), "state": self.start_state or kit.states0}
        return range_problems(allowed, base, {"parameters": ("param", self.parameters),
                                              "inputs": ("input", self.inputs),
                                              "start_state": ("state", self.start_state or {})},
                              self.space.dimensions)


def range_problems(allowed: Mapping[str, Mapping[str, Allowed]], base: Mapping[str, Mapping[str, float]],
                   fixed: Mapping[str, tuple[str, Mapping[str, float]]], dimensions: Iterable[Dimension]) -> list[str]:
    """Fixed values (spec field -> (target, values)) and each dimension's extremes (with mode "scale":
    times its target's `base` value) outside `allowed`: a negative resistance is no what-if, and its
    results would look like valid data."""
    problems = [p for field, (target, given) in fixed.items() for p in outside(field, allowed[target], given)]
    for d in dimensions:
        ok, b = allowed[d.target].get(d.name), base[d.target].get(d.name)
        if d.mode == "scale" and b == 0:
            problems.append(f"dimension {d.column}: scales {d.name}, whose base value is 0, so every scenario "
                            f"has {d.name}=0 (its column would show the factors); sweep it with mode \"absolute\"")
            continue
        if ok is None or (b is None and d.mode == "scale"):
            continue
        bad = ", ".join(f"{v:g}" for v in dict.fromkeys(d.extremes()) if d.applied(v, b) not in ok)
        if not bad:
            continue
        if d.mode == "absolute":
            problems.append(f"dimension {d.column}: value {bad} outside {ok}")
        else:
            low, high = sorted((ok.lower / b, ok.upper / b))
            problems.append(f"dimension {d.column}: scale {bad} of {d.name}={b:g}{ok.unit_text} outside "
                            f"[{low:g}, {high:g}] ({ok})")
    return problems


@functools.cache
def _custom_kit(simulator: str, signals: str, metrics: str, declared: tuple[str, ...],
                solver: str | None = None) -> Kit:
    """The model's kit with replaced signals / metrics (JSON), new parameters `declared` and, if named, the
    `solver` tableau in its model."""
    kit = kit_for(get_model(simulator))
    if solver is not None:
        kit = dataclasses.replace(kit, model=dataclasses.replace(kit.model, solver=TABLEAUS[solver]))
    if signals != "{}" or metrics != "[]":
        unknown = set(json.loads(signals)) - set(kit.model.input_names)
        if unknown:
            raise ValueError(f"signals for unknown input(s) {sorted(unknown)}; inputs: {list(kit.model.input_names)}")
        extra = {name: KitParameter(default=0.0, description="declared by the sweep") for name in declared
                 if name not in kit.parameters}
        kit = dataclasses.replace(kit, inputs={**kit.inputs, **json.loads(signals)},
                                  metrics=tuple(json.loads(metrics)) or kit.metrics,
                                  parameters={**kit.parameters, **extra})
    return kit
