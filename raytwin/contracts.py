"""Data contracts: versioned pydantic v2 models for asset types, assets, telemetry and scenarios.

All contracts forbid unknown fields, refuse NaN/inf, require timezone-aware timestamps (stored in
UTC) and check units against `raytwin.units`. Telemetry is checked against its asset type with
`normalize_measurements`, which converts safe units (degC -> K, mV -> V, ...) to the type's units.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from raytwin import units
from raytwin.fields import JSON_KINDS, Contract, Finite, Unit
from raytwin.signals import CLOCK_INPUT, OpenLoopSignal, Series, signal_function

SCHEMA_VERSION = 1
MAX_FUTURE_SKEW = timedelta(minutes=5)
"""Telemetry stamped further than this after the server's clock (or its earlier ingest time) is refused as
'from the future'; so is an ingest time further than this after the server's clock."""
MAX_SEQUENCE = 2**63 - 1
"""The largest `TelemetryEvent.sequence`: the log stores it as a signed 64-bit integer."""
MAX_SCENARIO_STEPS = 10_000_000
MAX_RUN_WORK = 10**10
"""Scenario-steps (scenarios x steps) one run may ask for by default: ~10 min of a 2-core node's sweep
throughput. The API's `max_run_work` and `raytwin sweep run --max-work`."""

IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"
Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]
SemVer = Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")]
SimulatorRef = Annotated[str, Field(
    pattern=r"^([A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}|\S{0,1900}/[0-9a-f]{64}\.fmu)$",
    description="A model name, an import path package.module:MODEL, or the URL of a stored FMU "
                "(<store>/fmus/<sha256>.fmu, raytwin.fmu.store_fmu).",
)]


def _storable(text: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate, e.g. from a JSON `\\ud800` escape):
    Arrow and Parquet cannot store it, so it would fail the whole batch it travels in."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_storable)]


def _utc(ts: datetime) -> datetime:
    try:
        return ts.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00: before the first representable UTC time
        raise ValueError("time is outside the range of representable UTC times") from None


UtcTime = Annotated[AwareDatetime, AfterValidator(_utc)]

RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: Any) -> Any:
    """A `datetime`, or text in RFC 3339 with an offset: pydantic alone would also take a number or
    numeric text as Unix seconds (``0.5`` -> 1970)."""
    if isinstance(value, datetime) or (isinstance(value, str) and RFC3339.fullmatch(value)):
        return value
    raise ValueError("expected an RFC 3339 date-time with an offset, e.g. 2026-01-05T12:00:00Z or "
                     "2026-01-05T13:00:00+01:00 (in a URL, + is %2B)")


DateTime = Annotated[UtcTime, BeforeValidator(_rfc3339)]
"""A point in time as OpenAPI's `date-time` format means it (RFC 3339, with an offset), in UTC."""


MAX_WHOLE_STEPS = 2**53
"""Steps a horizon may hold at most: beyond, a float no longer tells whole numbers apart (and no run ends)."""


def _absolute_zero(unit: str) -> float | None:
    """Absolute zero in `unit` if it is a temperature unit (K, degC, degF), else None."""
    return units.to_unit(0.0, "K", unit) if units.canonical(unit) == units.canonical("K") else None


def whole_steps(horizon_s: float, step_s: float) -> int:
    """The number of steps of `step_s` in `horizon_s`, refusing a horizon that is not a whole number, and a
    count no run could take (`MAX_WHOLE_STEPS`: 1e300 s of 1e-300 s steps overflowed into a 500)."""
    n = horizon_s / step_s
    if not n <= MAX_WHOLE_STEPS:
        raise ValueError(f"horizon_s {horizon_s:g} in steps of {step_s:g} s is {n:.3g} steps, more than any run "
                         f"can take (at most {MAX_WHOLE_STEPS:.3g}); use a longer step_s or a shorter horizon_s")
    if n < 1 - 1e-9:  # "not a whole number of steps" did not say that the horizon holds none
        raise ValueError(f"horizon_s {horizon_s:g} is shorter than one step of {step_s:g} s: give a horizon_s of one "
                         f"or more whole steps, or a step_s of at most horizon_s that divides it")
    if abs(n - round(n)) > 1e-9 * max(n, 1.0):
        raise ValueError(f"horizon_s {horizon_s} is not a whole number of steps of {step_s} s")
    return round(n)


class ContractError(ValueError):
    """Data that is well formed but does not fit its asset type (unknown field, unit mismatch)."""


def describe_error(exc: Exception) -> str:
    """A one-line, human-readable reason for a rejection (used in dead letters and HTTP errors)."""
    if isinstance(exc, ValidationError):
        return "; ".join(reasons(exc))
    return str(exc)


def reasons(exc: ValidationError) -> list[str]:
    """Each error as ``field: message``, a whole-model check's message alone, without pydantic's "Value error, ":
    the same reason for the same fault whatever the input (dead letters are told apart by it), no noise to skip."""
    out = []
    for err in exc.errors(include_url=False):
        message = _message(err)
        if err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        out.append(f"{loc}: {message}" if loc else message)
    return out


class SpecError(ValidationError):
    """A spec's refusal whose message is its reasons, one ``field: message`` line each (`reasons`): pydantic's
    own buried the one line that mattered under its input echo, error type and URL. A `ValidationError` (and so
    a `ValueError`), so code that catches either still does."""

    @property
    def reasons(self) -> list[str]:
        """Each error as ``field: message`` (a whole-spec check's message alone), without "Value error, "."""
        return reasons(self)

    def __str__(self) -> str:
        return "\n".join(self.reasons)


class Spec(Contract):
    """A spec users write by hand (a sweep, a calibration): constructing or validating one raises `SpecError`."""

    def __init__(self, /, **data: Any) -> None:
        with _spec_errors():
            super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        with _spec_errors():
            return super().model_validate(obj, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Any:
        with _spec_errors():
            return super().model_validate_json(json_data, **kwargs)


@contextlib.contextmanager
def _spec_errors() -> Iterator[None]:
    """A `ValidationError` raised within, as a `SpecError` (without pydantic's, chained: the same errors)."""
    try:
        yield
    except ValidationError as exc:
        raise SpecError.from_exception_data(exc.title, exc.errors()) from None  # type: ignore[arg-type]


def _message(err: Any) -> str:
    """Pydantic's message, but a length of text in characters: a constrained `Text` (a validator, then the length)
    says "Value should have at most 256 items after validation"."""
    ctx, text = err.get("ctx") or {}, isinstance(err.get("input"), str)
    if text and err["type"] in ("too_short", "too_long") and "actual_length" in ctx:
        least = err["type"] == "too_short"
        bound = ctx["min_length"] if least else ctx["max_length"]
        return (f"text should have {'at least' if least else 'at most'} {bound} character{'s' * (bound != 1)}, "
                f"not {ctx['actual_length']}")
    return err["msg"]


# ---------------------------------------------------------------- asset types and assets ----
class Quantity(Contract):
    """A variable of an asset type: unit and plausible range (in `unit`; None: the simulator's)."""

    unit: Unit
    description: str = ""
    lower: Finite | None = None
    upper: Finite | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Quantity:
        if self.lower is not None and self.upper is not None and not self.lower < self.upper:
            raise ValueError(f"need lower < upper, got [{self.lower}, {self.upper}]")
        return self

    def outside(self, value: float) -> bool:
        """Whether `value` (in `unit`) lies outside the plausible range (NaN counts as outside)."""
        return not ((self.lower is None or value >= self.lower) and (self.upper is None or value <= self.upper))


def _quantity(var: Any, declared: Quantity | None = None) -> Quantity:
    """`declared` (or a quantity of the simulator variable `var`) with any unset bound taken from `var`,
    converted to the declared unit."""
    unit = declared.unit if declared else var.unit
    bound = lambda v: None if not math.isfinite(v) else units.to_unit(v, var.unit, unit)  # noqa: E731
    lower = declared.lower if declared and declared.lower is not None else bound(var.lower)
    upper = declared.upper if declared and declared.upper is not None else bound(var.upper)
    return Quantity(unit=unit, description=declared.description if declared else var.description,
                    lower=lower, upper=upper)


class ParameterSpec(Contract):
    unit: Unit
    default: Finite
    lower: Finite
    upper: Finite
    description: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> ParameterSpec:
        if not self.lower <= self.default <= self.upper:
            raise ValueError(f"need lower <= default <= upper, got {self.lower} <= {self.default} <= {self.upper}")
        return self


TelemetryPolicy = Literal["accept", "refuse"]
DEFAULT_TELEMETRY_POLICY: TelemetryPolicy = "accept"


class AssetType(Contract):
    """A kind of asset: its variables with units, its parameters with bounds, its simulator (a model
    name declared in the ``raytwin.models`` entry-point group, an import path ``package.module:MODEL``,
    or a stored FMU's URL ``<store>/fmus/<sha256>.fmu``). Its units are its simulator's (a twin's values
    are its model's numbers); telemetry in another unit of the same dimension is converted on ingest."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: Identifier
    version: SemVer
    description: str = ""
    simulator: SimulatorRef
    states: dict[str, Quantity]
    inputs: dict[str, Quantity]
    outputs: dict[str, Quantity]
    parameters: dict[str, ParameterSpec]
    telemetry_policy: TelemetryPolicy = Field(
        default="accept",
        description="Telemetry sent for an older version of this type (the `X-RayTwin-Type-Version` header) once "
                    "an asset is on this one: `accept` it where its measurements are still this version's, or "
                    "`refuse` it with the reason (see raytwin.compat)")

    @field_validator("simulator")
    @classmethod
    def _known_simulator(cls, ref: str) -> str:
        """A declared model name or an import path ``package.module:MODEL`` that loads (one-line error)."""
        from raytwin.sim import get_model

        get_model(ref)
        return ref

    @model_validator(mode="after")
    def _matches_simulator(self) -> AssetType:
        from raytwin.sim import get_model

        model = get_model(self.simulator)
        for kind, expected in (
            ("states", model.states), ("inputs", model.inputs), ("outputs", model.outputs), ("parameters", model.params)
        ):
            declared = getattr(self, kind)
            names = [v.name for v in expected]
            if set(declared) != set(names):
                raise ValueError(f"{kind} {sorted(declared)} do not match simulator {model.name}: {names}")
            for v in expected:
                if units.canonical(declared[v.name].unit) != units.canonical(v.unit):
                    raise ValueError(f"{kind}.{v.name}: unit {declared[v.name].unit!r} is not {v.unit!r}, the "
                                     f"simulator {model.name}'s: declare {v.unit!r} (telemetry in other units of its "
                                     "dimension is converted on ingest)")
            # keep the simulator's variable order, whatever order the data came in; a variable's
            # plausible range defaults to the simulator's
            if kind == "parameters":
                object.__setattr__(self, kind, {n: declared[n] for n in names})
            else:
                object.__setattr__(self, kind, {v.name: _quantity(v, declared[v.name]) for v in expected})
        return self

    def check_units(self) -> None:
        """`ValueError` naming each variable declared in another unit than its simulator's, though of its dimension
        (`degC` for a model in K), or whose plausible range reaches below absolute zero: a twin's values are its model's numbers, never converted, so telemetry converted
        to the declared unit would be fed to the model as its own. Checked where a type is published or registered,
        not where a stored one is read: a store written before this check still loads."""
        from raytwin.sim import get_model

        model = get_model(self.simulator)
        wrong = [f"{kind}.{v.name}: unit {declared[v.name].unit!r} is not the simulator's {v.unit!r}"
                 for kind, variables in (("states", model.states), ("inputs", model.inputs),
                                         ("outputs", model.outputs), ("parameters", model.params))
                 for declared in (getattr(self, kind),) for v in variables
                 if not units.same_unit(declared[v.name].unit, v.unit)]
        if wrong:
            raise ValueError("; ".join(wrong) + ": an asset type declares the units its model computes in (telemetry "
                             "in other units of the same dimension is converted on ingest, each value naming its unit)")
        cold = [f"{kind}.{name}: lower {q.lower:g} {q.unit} is below absolute zero ({zero:g} {q.unit})"
                for kind in ("states", "inputs", "outputs") for name, q in getattr(self, kind).items()
                if q.lower is not None and (zero := _absolute_zero(q.unit)) is not None and q.lower < zero - 1e-9]
        if cold:
            raise ValueError("; ".join(cold) + ": a plausible range holds only values that can be measured (no "
                             "temperature lies below absolute zero); raise the lower bound")

    @classmethod
    def from_model(cls, model: Any, name: str | None = None, version: str | None = None) -> AssetType:
        """The asset type that exposes a simulator `raytwin.sim.Model` as it is (the simulator is
        stored as the model's declared name, or as the import path it is found at)."""
        from raytwin.sim import model_ref

        simulator = model_ref(model)
        _refuse_unbounded(model)
        return cls(
            name=name or model.name,
            version=version or model.version,
            description=model.description,
            simulator=simulator,
            states={v.name: _quantity(v) for v in model.states},
            inputs={v.name: _quantity(v) for v in model.inputs},
            outputs={v.name: _quantity(v) for v in model.outputs},
            parameters={
                p.name: ParameterSpec(unit=p.unit, default=p.default, lower=p.lower, upper=p.upper,
                                      description=p.description)
                for p in model.params
            },
        )

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def measurable(self) -> dict[str, Quantity]:
        """What telemetry may carry: the observed outputs and the measured inputs."""
        return {**self.outputs, **self.inputs}


def _refuse_unbounded(model: Any) -> None:
    """`ValueError` naming each parameter of `model` without finite bounds and how to give them (an FMU often
    declares none), instead of pydantic's "lower: Input should be a finite number" without the name."""
    unbounded = [p for p in model.params if not (math.isfinite(p.lower) and math.isfinite(p.upper))]
    if not unbounded:
        return
    ranges = ", ".join(f"{p.name} [{p.lower:g}, {p.upper:g}]" for p in unbounded)
    example = ", ".join(f'{p.name}={{"lower": ..., "upper": ...}}' for p in unbounded)
    fix = (f"give them with `.declare({example})` before `AssetType.from_model`" if hasattr(model, "declare")
           else "declare finite `lower` and `upper` in their `Param`s")
    raise ValueError(f"{model.name}: parameters without the finite bounds an asset type needs: {ranges}; {fix}")


RelationshipKind = Literal["contains", "feeds", "part_of"]


class Relationship(Contract):
    kind: RelationshipKind
    target: Identifier


class Asset(Contract):
    """One physical asset, owned by a tenant, bound to an asset type version."""

    schema_version: Literal[1] = SCHEMA_VERSION
    id: Identifier
    tenant: Identifier
    type_name: Identifier
    type_version: SemVer
    metadata: dict[str, str] = Field(default_factory=dict)
    relationships: list[Relationship] = Field(default_factory=list)

    @model_validator(mode="after")
    def _no_self_reference(self) -> Asset:
        if any(r.target == self.id for r in self.relationships):
            raise ValueError(f"asset {self.id} cannot be related to itself")
        return self


# ---------------------------------------------------------------------------- telemetry ----
class Measurement(Contract):
    """A value with its unit, ``{"value": 20.3, "unit": "degC"}``: the unit is always given, never assumed."""

    value: Finite
    unit: Unit

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        """Refuse a bare value (``"T_in": 293.4``) saying what a measurement is: pydantic's "Input should be a
        valid dictionary or instance of Measurement" did not say that its unit was missing, nor how to give it.
        The reason names the kind of value, never the value, so dead letters are told apart by it."""
        if isinstance(data, dict | Measurement):
            return data
        kind = JSON_KINDS.get(type(data), "a number" if isinstance(data, int | float) else type(data).__name__)
        raise ValueError(f'a measurement is an object with its unit, {{"value": <number>, "unit": "<unit>"}} (e.g. '
                         f'{{"value": 20.3, "unit": "degC"}}), not {kind}')


class TelemetryEvent(Contract):
    """One timestamped set of measurements from an asset.

    `sequence` is the source's per-asset counter; `idempotency_key` (default
    ``"{asset_id}:{sequence}"``) with `event_time` and `sequence` identifies the event, so
    re-deliveries (the same three) are applied once. Not the key alone: a device that reboots
    restarts its sequence and re-uses its default keys with new times, and those are new events.

    Times are the server's to bound: `event_time` and a given `ingest_time` may lie at most
    `MAX_FUTURE_SKEW` after the server's clock (whatever the other says: a client-chosen far-future
    ingest time must not let a far-future event in, which would make every real event after it too
    late), and `event_time` at most that after a given `ingest_time`; `ingest_time` defaults to the
    server's clock. The clock is ``datetime.now(UTC)`` unless the validation context gives ``"now"``
    (re-reading an already validated row: its verdict must not depend on when or where it is re-read).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    asset_id: Identifier
    event_time: DateTime
    ingest_time: DateTime | None = None
    sequence: Annotated[StrictInt, Field(ge=0, le=MAX_SEQUENCE)]
    idempotency_key: Annotated[Text, Field(min_length=1, max_length=256)] | None = None
    measurements: Annotated[dict[Text, Measurement], Field(min_length=1)]
    quality: Literal["good", "uncertain", "bad"] = "good"

    @model_validator(mode="after")
    def _defaults_and_clock(self, info: ValidationInfo) -> TelemetryEvent:
        now = (info.context or {}).get("now") or datetime.now(UTC)
        if self.ingest_time is not None and self.ingest_time - now > MAX_FUTURE_SKEW:
            raise ValueError(
                f"ingest_time {self.ingest_time.isoformat()} is more than {MAX_FUTURE_SKEW} after the server's "
                f"clock {now.isoformat()}"
            )
        late, what = (now, "the server's clock") if self.ingest_time is None or now < self.ingest_time else (
            self.ingest_time, "ingest time")
        if self.event_time - late > MAX_FUTURE_SKEW:
            raise ValueError(
                f"event_time {self.event_time.isoformat()} is more than {MAX_FUTURE_SKEW} after {what} "
                f"{late.isoformat()} (clock skew or a bad timestamp): correct the sender's clock (NTP) or the "
                "timestamps it sends"
            )
        object.__setattr__(self, "ingest_time", self.ingest_time or now)
        if self.idempotency_key is None:
            object.__setattr__(self, "idempotency_key", f"{self.asset_id}:{self.sequence}")
        return self


def normalize_measurements(event: TelemetryEvent, asset_type: AssetType) -> dict[str, float]:
    """The event's measurements converted to the asset type's units, or a `ContractError`: a name the
    type does not measure, an incompatible unit, or a value outside the quantity's plausible range
    (one broken sensor or typo, e.g. T_in = 1e300 degC, must not destroy a twin)."""
    allowed = asset_type.measurable()
    out: dict[str, float] = {}
    for name, m in event.measurements.items():
        if name not in allowed:
            raise ContractError(
                f"measurement {name!r} is not part of asset type {asset_type.key}; expected one of {sorted(allowed)}"
            )
        q = allowed[name]
        try:
            value = units.to_unit(m.value, m.unit, q.unit)
        except units.UnitError as exc:
            raise ContractError(f"measurement {name!r}: {exc}") from None
        if not math.isfinite(value) or q.outside(value):
            raise ContractError(f"measurement {name!r}: {m.value} {m.unit} is outside the plausible range "
                                f"[{q.lower}, {q.upper}] {q.unit} of asset type {asset_type.key}")
        out[name] = value
    return out


# ---------------------------------------------------------------------------- scenarios ----
START_TIME = ("with start_state 'live': the twin's state at this time (clock signals start at the state's time); "
              "with an explicit start_state: the wall-clock time of t = 0, where clock signals start (default: a "
              "Monday 00:00 UTC)")


class StartedFrom(BaseModel):
    """Which twin state a run from "live" started from. Why: its event time alone does not say whether the
    twin still holds that state (late events and restores change a state without moving its time); the
    revision and ETag compare with GET /v1/assets/{id}/state's."""

    start_revision: int | None = Field(None, description=(
        "From a twin's live state: the revision of the state the run started from (`revision` of GET "
        "/v1/assets/{id}/state; null: an explicit start_state)"))
    start_etag: str | None = Field(None, description=(
        "The ETag of that state, as GET /v1/assets/{id}/state sends it: the twin still holds the state this "
        "result is about while its ETag is this one (null: an explicit start_state)"))


class Scenario(Contract):
    """A what-if run: from a start state (or the twin's live state) under given inputs."""

    schema_version: Literal[1] = SCHEMA_VERSION
    asset_id: Identifier
    start_state: Literal["live"] | dict[str, Finite] = "live"
    start_time: DateTime | None = Field(None, description=START_TIME)
    horizon_s: Annotated[Finite, Field(gt=0)]
    step_s: Annotated[Finite, Field(gt=0)]
    inputs: dict[str, OpenLoopSignal] = Field(
        default_factory=dict, description="one signal per input of the asset type (raytwin.signals)")
    parameter_overrides: dict[str, Finite] = Field(default_factory=dict)
    seed: Annotated[StrictInt, Field(ge=0)] = 0

    @property
    def n_steps(self) -> int:
        return round(self.horizon_s / self.step_s)

    @model_validator(mode="after")
    def _steps(self) -> Scenario:
        n = whole_steps(self.horizon_s, self.step_s)
        if n > MAX_SCENARIO_STEPS:
            raise ValueError(f"{n} steps exceeds the limit of {MAX_SCENARIO_STEPS}")
        for name, sig in self.inputs.items():
            if isinstance(sig, Series) and sig.path is not None:
                raise ValueError(f"inputs.{name}: a scenario's series gives its values (one per step), not a "
                                 "file path: the server does not read files named by a request")
            if isinstance(sig, Series) and len(sig.values) != n:
                raise ValueError(f"inputs.{name}: series has {len(sig.values)} values for {n} steps")
            if sig.references():
                raise ValueError(f"inputs.{name}: {sorted(sig.references())} name sweep parameters; a "
                                 "scenario's signals take numbers")
        return self

    def check_against(self, asset_type: AssetType) -> None:
        """Refuse inputs, states or parameters the asset type does not have, in wrong units, or
        outside its plausible ranges (an explicit start state, and each input over the horizon)."""
        self._checked_inputs(asset_type, 0.0)

    def input_series(self, asset_type: AssetType, clock_s: float = 0.0) -> np.ndarray:
        """Inputs per step, shape (n_steps, n_inputs), in the asset type's units (zero-order hold),
        after `check_against`; clock signals started `clock_s` after a Monday 00:00 UTC
        (`raytwin.signals.clock_seconds` of the start state's time)."""
        return self._checked_inputs(asset_type, clock_s)

    def input_values(self, name: str, unit: str | None = None, clock_s: float = 0.0) -> np.ndarray:
        """Input `name` at the start of each step, in `unit` (default: the signal's), in float64: the
        formulas a sweep compiles into its scan, evaluated with NumPy (random signals drawn from
        their seed plus the scenario's `seed`)."""
        fn = signal_function(self.inputs[name], horizon_s=self.horizon_s, step_s=self.step_s,
                             offset=self.seed, unit=unit, xp=np)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by the range check
            t = self.step_s * np.arange(self.n_steps, dtype=np.float64)
            return np.asarray(fn(t, None, {CLOCK_INPUT: clock_s}), np.float64)

    def _checked_inputs(self, asset_type: AssetType, clock_s: float) -> np.ndarray:
        """`check_against`, returning the input series it evaluated to check their ranges."""
        problems = []
        for name, sig in self.inputs.items():
            if name not in asset_type.inputs:
                problems.append(f"unknown input {name!r} (inputs: {sorted(asset_type.inputs)})")
            elif sig.unit is not None and units.canonical(sig.unit) != units.canonical(asset_type.inputs[name].unit):
                problems.append(f"input {name!r}: unit {sig.unit!r} is not {asset_type.inputs[name].unit!r}")
        missing = set(asset_type.inputs) - set(self.inputs)
        if missing:
            problems.append(f"missing inputs {sorted(missing)}")
        if isinstance(self.start_state, dict):
            problems += start_state_problems(self.start_state, asset_type)
        for name, value in self.parameter_overrides.items():
            spec = asset_type.parameters.get(name)
            if spec is None:
                problems.append(f"unknown parameter {name!r}")
            elif not spec.lower <= value <= spec.upper:
                problems.append(f"parameter {name}={value} outside [{spec.lower}, {spec.upper}]")
        series = np.empty((self.n_steps, 0))
        if not problems:  # every input is known and convertible: evaluate, then check the ranges
            cols = []
            for name, q in asset_type.inputs.items():
                col = self.input_values(name, q.unit, clock_s)
                low, high = float(np.min(col)), float(np.max(col))
                if not (math.isfinite(low) and math.isfinite(high)) or q.outside(low) or q.outside(high):
                    problems.append(
                        f"input {name} spans [{low:g}, {high:g}] {q.unit} over the horizon, {plausible_range(q)}")
                cols.append(col)
            series = np.column_stack(cols) if cols else series
        if problems:
            raise ContractError(f"scenario for {self.asset_id} does not fit {asset_type.key}: " + "; ".join(problems))
        return series


def start_state_problems(start_state: dict[str, float], asset_type: AssetType) -> list[str]:
    """What is wrong with an explicit start state: missing or unknown states, values outside the
    plausible ranges (in the asset type's units)."""
    problems = []
    if set(start_state) != set(asset_type.states):
        problems.append(f"start_state must give exactly {sorted(asset_type.states)}")
    return problems + implausible_states(start_state, {n: q.unit for n, q in asset_type.states.items()}, asset_type,
                                         "start_state")


def implausible_states(values: dict[str, float], value_units: dict[str, str], asset_type: AssetType,
                       label: str) -> list[str]:
    """One line per value (in `value_units`: the type's, or its simulator's) outside its state's plausible
    range on `asset_type`, said in the type's units: a twin or scenario must not start from a state its
    telemetry would be refused for (a -65 K building)."""
    problems = []
    for name, value in values.items():
        q = asset_type.states.get(name)
        if q is not None and q.outside(converted := units.to_unit(value, value_units[name], q.unit)):
            problems.append(f"{label}.{name}={converted:g} {q.unit} {plausible_range(q)}")
    return problems


def plausible_range(q: Quantity) -> str:
    """'outside the plausible range [lower, upper] unit' for a message."""
    low, high = ("-inf" if q.lower is None else f"{q.lower:g}"), ("inf" if q.upper is None else f"{q.upper:g}")
    return f"outside the plausible range [{low}, {high}] {q.unit}"
