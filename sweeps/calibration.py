"""Calibration: fit a model's parameters to recorded telemetry with Ray Tune, then refine.

1. Objective: weighted RMSE of simulated vs measured outputs, ``sqrt(mean(((y_sim - y)/sigma)^2))``,
   from the jitted float64 simulator driven by the *measured* inputs.
2. Global search with Ray Tune over log-uniform ranges around the prior (``prior / width`` to
   ``prior * width``, clipped to the parameter bounds): random or grid search (built in), or
   Optuna / HyperOpt when installed; trials are cut early by ASHA or HyperBand, whose
   "iterations" are growing windows of the data (a bad fit is already bad on the first quarter); a trial
   simulates the whole data once and reports each window's loss from its first rows (`window_losses`).
3. Refinement: Levenberg-Marquardt-type least squares (scipy ``trf``) on the log-parameters with
   the exact residual Jacobian from ``jax.jacfwd`` through the simulator.
4. Uncertainty (``uncertainty``): by default the prediction-error method (`sweeps.pem`): the fit is
   finished on the filter's innovation likelihood, with a factor on the model's declared process
   noise fitted alongside, and the covariance is its inverse Hessian, honest when the residuals are
   correlated (process noise in the asset: least squares' intervals were ~10x too narrow there);
   ``least_squares`` keeps ``cov = s^2 (J^T J)^-1`` at the least-squares optimum, right only for
   white residuals. Both are for the log-parameters: diagonal square roots are relative stds.
   Refinement and the prediction-error fit stay within the model's declared bounds, and a fit that
   ends on one is refused (the bound, not the data, put it there).

``register_as`` publishes the fit as a new version: one registered already is refused before the search (and, one
registered meanwhile, by the registration after the fit).

With ``max_concurrent_trials=1`` (the default; trials are cheap) the Tune phase is deterministic
for a seed, so a calibration reruns bit-for-bit: with concurrent trials ASHA's decisions depend
on the order in which results arrive.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from raytwin.contracts import Contract, Finite, Identifier, Spec
from raytwin.cpu_priority import yield_to_live
from raytwin.estimation import model_defaults
from raytwin.metrics import CALIBRATION_DURATION, CALIBRATIONS
from raytwin.registry import ModelRegistry, RegistryError, publisher_offline
from raytwin.sim import Model, ModelCheckError, get_model, rollout, unstack
from raytwin.sim.checks import check_params
from raytwin.sim.model import Var
from raytwin.sim.ranges import allowed_values, outside
from raytwin.sim.cpu import use_cpu_backend
from raytwin.sim.precision import in_float64
from raytwin.storage import canonical_json, filesystem, make_folder, replace_file
from raytwin.store_failures import StoreIOError, store_io
from raytwin.tune_output import fit_quietly
from raytwin.units import UnitError, to_unit
from sweeps.pem import pem_fit
from sweeps.spec import resolve_model

log = logging.getLogger("raytwin.calibration")
BAD_LOSS = 1.0e30  # reported for parameter sets whose simulation blows up (NaN)


MAX_TRIALS = 100_000
"""Tune trials one calibration may ask for (`num_samples`, or a grid's `grid_levels` ** free parameters):
Tune holds every trial in the driver's memory, and past this a search is a typo, not a plan."""
MIN_SAMPLES_PER_FREE = 5
"""Telemetry samples a calibration needs per free parameter, refused before the search: with 3 samples for 2 free
parameters the fit ended where the data could not hold it, and the refusal blamed a parameter bound."""
TUNE_SEED_MAX = 2**32 - 1
"""The largest calibration seed: Ray Tune's searchers seed NumPy's `RandomState`, which takes 32 bits (a larger
seed failed the calibration inside Tune with "Seed must be between 0 and 2**32 - 1")."""
TuneSeed = Annotated[int, Field(ge=0, le=TUNE_SEED_MAX)]


class CalibrationError(ValueError):
    """Calibration input that cannot work (unknown names, unusable telemetry, missing searcher)."""


class FitRefused(CalibrationError):
    """A fit that ran and whose result is refused (it ended on a declared bound, or the data do not identify
    its parameters): the spec was valid, the data decided; no result is written."""


class NoFiniteLoss(FitRefused):
    """The model gave NaN/inf at every parameter set the search tried (or at the refinement's start)."""


NO_FINITE_LOSS = "no trial produced a finite loss"


def no_finite_loss(what: str, why: str, check: str) -> str:
    """The one wording of a calibration none of whose trials could be scored (JAX models here, FMUs in
    `sweeps.fmu`): which model, what failed, and what to check."""
    return f"calibration of {what}: {NO_FINITE_LOSS}: {why}; {check}"


def too_few_samples(n_samples: int, n_free: int) -> str | None:
    """Why `n_samples` telemetry samples are too few to fit `n_free` parameters (`MIN_SAMPLES_PER_FREE`), or None;
    JAX and FMU calibrations (`sweeps.fmu`) alike."""
    needed = MIN_SAMPLES_PER_FREE * n_free
    if n_samples >= needed:
        return None
    return (f"{n_samples} telemetry samples for {n_free} free parameter(s): a calibration needs at least {needed} "
            f"({MIN_SAMPLES_PER_FREE} a free parameter); give a longer telemetry window or fewer free parameters")


CHECK_DOMAIN = ("check the model's domain at those values (e.g. a sqrt or log of a quantity that turns negative, "
                "a state leaving its declared range) and that the telemetry lies in the plausible range of the model's "
                "inputs and outputs (in their declared units); narrow search_width or fix the parameters that leave it")


class CalibrationSpec(Spec):
    """What to fit, to which data, and how to search (see module docstring)."""

    model: Annotated[str, Field(min_length=1)]
    registry_url: str | None = None
    tenant: Identifier = "default"
    asset_id: Identifier | None = None
    telemetry: Annotated[str, Field(min_length=1)]
    """Parquet: t_s (uniform) + one column per model input and output, in the model's declared units, or in
    the unit its field metadata names (``unit``), converted to the declared one (`declared_columns`)."""
    start_state: dict[str, Finite]
    start_std: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(default_factory=dict)
    """Std of `start_state` per state where it is an estimate (a twin's at the window start): the
    prediction-error filter starts with it and corrects those states from the data; unnamed: exact."""
    free: Annotated[list[str], Field(min_length=1)]
    parameters: dict[str, Finite] = Field(default_factory=dict)  # prior / fixed values over the model's
    noise_std: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    """Sigma of each output's residuals; an output not named: its declared ``measurement_std``, else 1."""
    search: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    num_samples: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 16
    grid_levels: Annotated[int, Field(ge=2)] = 3
    scheduler: Literal["asha", "hyperband", "fifo"] = "asha"
    windows: Annotated[int, Field(ge=1, le=10)] = 3
    search_width: Annotated[float, Field(gt=1)] = 2.0
    refine: bool = True
    uncertainty: Literal["prediction_error", "least_squares"] = "prediction_error"
    max_concurrent_trials: Annotated[int, Field(ge=1)] = 1
    trial_cpus: Annotated[float, Field(gt=0, le=64)] = 1.0
    """CPUs each Tune trial reserves (its placement group)."""
    seed: TuneSeed = 0
    register_as: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*@\d+\.\d+\.\d+$")] | None = None
    """Publish the fitted parameters as this ``name@version`` in `registry_url` (what sweeps then use)."""
    registered_by: Identifier | None = None
    """Who publishes the fit with `register_as` (the API key id its lifecycle actions use): recorded as the
    version's publisher, so the four-eyes rule refuses that principal the version's promotion. Nothing checks it (a
    calibration runs with the caller's storage credentials, no API key): the version records it as declared and
    unverified, beside the OS user and host that ran the fit (`raytwin.registry.publisher_offline`)."""

    @model_validator(mode="after")
    def _unique(self) -> CalibrationSpec:
        if len(set(self.free)) != len(self.free):
            raise ValueError(f"free parameters repeat: {self.free}")
        if self.register_as is not None and self.registry_url is None:
            raise ValueError("register_as needs registry_url")
        if self.register_as is not None and self.registered_by is None:
            raise ValueError("register_as needs registered_by: the principal publishing the fit (the API key id its "
                             "lifecycle actions use), recorded as the version's publisher so that it may not also "
                             "approve the version's promotion (four eyes)")
        if self.search == "grid" and self.grid_levels ** len(self.free) > MAX_TRIALS:
            raise ValueError(f"a grid of {self.grid_levels} levels over {len(self.free)} free parameters is "
                             f"{self.grid_levels ** len(self.free):,} trials, over {MAX_TRIALS:,}: use fewer levels, "
                             "or search random / optuna with num_samples")
        return self

    def order_dependence(self) -> str | None:
        """Why this search's result may change from run to run, or None: with trials run concurrently, ASHA's and
        HyperBand's stopping decisions and Optuna's and HyperOpt's suggestions follow the order results arrive in."""
        adaptive = [f"{what} {name}" for what, name, on in (
            ("scheduler", self.scheduler, self.scheduler != "fifo"),
            ("search", self.search, self.search in ("optuna", "hyperopt"))) if on]
        if self.max_concurrent_trials == 1 or not adaptive:
            return None
        return (f"max_concurrent_trials={self.max_concurrent_trials} with {' and '.join(adaptive)}: Tune's decisions "
                "follow the order in which concurrent trials report, so the fit is not reproducible bit for bit; "
                "max_concurrent_trials=1 (the default) makes it so")


OFFLINE_CALIBRATION = "offline calibration (raytwin calibrate, sweeps.calibration)"
"""How a calibration's `register_as` version was published, in its metadata (`raytwin.registry.PUBLISHED_VIA`)."""


class CalibrationResult(Contract):
    """Fitted parameters, their uncertainty and the fit quality (no timings: reruns compare it)."""

    model_ref: str
    free: list[str]
    parameters: dict[str, float]
    std: dict[str, float]
    rel_std: dict[str, float]
    correlation: list[list[float]]
    weighted_rmse: float
    rmse: dict[str, float]
    n_samples: int
    tune_best: dict[str, float]
    tune_best_loss: float
    tune_trials: int
    tune_trials_stopped: int
    refined: bool
    refine_evaluations: int = 0
    uncertainty: str = "least_squares"
    process_noise_scale: float | None = None
    """Prediction-error fits: the fitted factor on the declared process-noise variance."""
    noise_std: dict[str, float] = Field(default_factory=dict)
    """The sigma each output's residuals were weighted with (empty in results from before it was recorded)."""
    noise_std_assumed: list[str] = Field(default_factory=list)
    """Outputs with neither a spec `noise_std` nor a declared ``measurement_std``: sigma 1 was assumed, so
    their weight, and the reported uncertainty, are only as right as that guess."""
    warnings: list[str] = Field(default_factory=list)
    """What makes the reported uncertainty doubtful (a fit that does not match the data: `misfit_warning`);
    written to ``calibration.json`` only when there is one, so a fit without keeps its bytes."""


@dataclass(frozen=True)
class Problem:
    """The data and fixed values of one calibration, shipped once to every Tune trial."""

    simulator: str
    free_names: tuple[str, ...]
    free_index: np.ndarray
    base_params: np.ndarray
    x0: np.ndarray
    x0_std: np.ndarray  # the prediction-error filter's start std (NaN: exact, `START_STD_FRACTION` of the prior)
    u: np.ndarray  # (N, n_inputs)
    y: np.ndarray  # (N, n_outputs)
    sigma: np.ndarray  # (n_outputs,)
    dt: float
    sigma_assumed: tuple[str, ...] = ()  # outputs whose sigma is the fallback 1 (nothing given or declared)

    @property
    def model(self) -> Model:
        return get_model(self.simulator)

    @property
    def n(self) -> int:
        return self.y.shape[0]

    @property
    def n_sub(self) -> int:
        """RK4 sub-steps per sample interval: at most the model's ``default_dt`` each, as twins and the
        prediction-error fit integrate (one step per 0.5 s sample fitted a pendulum's length 90 sigma off)."""
        return substeps_per_sample(self.dt, self.model.default_dt)

    def windows(self, k: int) -> list[int]:
        """Data lengths for the scheduler's iterations: N/k, 2N/k, ..., N."""
        return [max(2, round(self.n * (i + 1) / k)) for i in range(k)]

    @in_float64
    def params(self, theta_log):
        return _params(self.base_params, tuple(self.free_index.tolist()), theta_log)

    def _args(self, theta_log, n: int) -> tuple:
        return (self.model, tuple(self.free_index.tolist()), jnp.asarray(theta_log), self.base_params, self.x0,
                self.u[:n], self.y[:n], self.sigma, self.dt, self.n_sub)

    @in_float64
    def residuals(self, theta_log, n: int) -> np.ndarray:
        """Weighted residuals (sim - measured) / sigma over the first n samples, flattened."""
        return np.asarray(_residuals(*self._args(theta_log, n)))

    @in_float64
    def jacobian(self, theta_log, n: int) -> np.ndarray:
        """d residuals / d log-parameters, exact (forward-mode AD through the simulator)."""
        return np.asarray(_jacobian(*self._args(theta_log, n)))

    @in_float64
    def predict(self, theta_log) -> np.ndarray:
        return np.asarray(_predict(self.model, self.x0, self.params(theta_log), self.u, self.dt, self.n_sub))

    def loss(self, theta_log: np.ndarray, n: int) -> float:
        return _rms(self.residuals(theta_log, n) ** 2)


def _rms(squares: np.ndarray) -> float:
    """The weighted RMSE from the squared residuals; NaN/inf (a simulation that blew up) scores `BAD_LOSS`."""
    value = float(np.sqrt(np.mean(squares)))
    return value if np.isfinite(value) else BAD_LOSS


def _params(base, free_index: tuple[int, ...], theta_log):
    return jnp.asarray(base).at[jnp.asarray(free_index)].set(jnp.exp(theta_log))


def substeps_per_sample(dt: float, default_dt: float) -> int:
    """RK4 sub-steps that split a sample interval `dt` into steps of at most `default_dt`."""
    return max(math.ceil(dt / default_dt - 1e-9), 1)


@partial(jax.jit, static_argnames=("model", "n_sub"))
def _predict(model: Model, x0, params, u, dt, n_sub: int):
    """Outputs at every sample: states x_0..x_{N-1} under inputs u_0..u_{N-2} (zero-order hold), each
    interval integrated in `n_sub` RK4 sub-steps of dt / n_sub."""
    p = unstack(params)
    held = jnp.repeat(u[:-1], n_sub, axis=0)
    run = rollout(model, unstack(x0), p, dt / n_sub, held.shape[0], unstack(held))
    states = tuple(jnp.concatenate([x0[i][None], s[n_sub - 1::n_sub]]) for i, s in enumerate(run.trajectory))
    return jnp.stack(model.output(states, unstack(u), model.coefficients(p)), axis=-1)


def _residuals_fn(model, free_index, theta_log, base, x0, u, y, sigma, dt, n_sub):
    pred = _predict(model, x0, _params(base, free_index, theta_log), u, dt, n_sub)
    return ((pred - y) / sigma).ravel()


_residuals = jax.jit(_residuals_fn, static_argnames=("model", "free_index", "n_sub"))
_jacobian = jax.jit(jax.jacfwd(_residuals_fn, argnums=2), static_argnames=("model", "free_index", "n_sub"))


def read_telemetry(url: str, storage_options: dict | None = None) -> tuple[pa.Table, str]:
    """The telemetry table at `url` and the SHA-256 of its bytes (the run record's input hash); a file
    that is missing or not Parquet is a `CalibrationError` (one line, not a traceback). The store failing the read
    is a `StoreIOError`: an outage to retry, not bad data to fix."""
    fs, path = filesystem(url, storage_options)
    try:
        with store_io("read"):
            data = fs.cat_file(path)
        return pq.read_table(io.BytesIO(data)), hashlib.sha256(data).hexdigest()
    except StoreIOError:
        raise
    except (OSError, pa.ArrowInvalid) as exc:
        raise CalibrationError(f"cannot read telemetry {url}: {exc}") from None


def build_problem(spec: CalibrationSpec, table: pa.Table, artifact_params: dict[str, float], simulator: str) -> Problem:
    model = get_model(simulator)
    unknown = set(spec.free) - set(model.param_names)
    if unknown:
        raise CalibrationError(f"free parameters {sorted(unknown)} not in {simulator}: {model.param_names}")
    if unknown := sorted(set(spec.parameters) - set(model.param_names)):
        raise CalibrationError(f"parameters names {unknown}, not parameters of {simulator}: {list(model.param_names)}")
    if set(spec.start_state) != set(model.state_names):
        raise CalibrationError(f"start_state must give exactly {list(model.state_names)}")
    _refuse_implausible_start(model, spec.start_state)
    if unknown := sorted(set(spec.start_std) - set(model.state_names)):
        raise CalibrationError(f"start_std names {unknown}, not states of {simulator}: {list(model.state_names)}")
    unknown = set(spec.noise_std) - set(model.output_names)
    if unknown:
        raise CalibrationError(f"noise_std names {sorted(unknown)}, not outputs of {simulator}: "
                               f"{list(model.output_names)}")
    if "t_s" not in table.column_names and "event_time" in table.column_names:
        micros = table["event_time"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
        table = table.append_column("t_s", pa.array((micros - micros[0]) / 1e6))
    needed = ["t_s", *model.input_names, *model.output_names]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise CalibrationError(f"telemetry lacks column(s) {missing}; needs {needed} (or event_time for t_s)")
    t = table["t_s"].to_numpy().astype(np.float64)
    steps = np.diff(t)
    if t.size < 3 or not np.allclose(steps, steps[0], rtol=1e-9, atol=0) or steps[0] <= 0:
        raise CalibrationError("telemetry t_s must be uniformly spaced and increasing (>= 3 samples); resample first")
    if (few := too_few_samples(t.size, len(spec.free))) is not None:
        raise CalibrationError(f"calibration of {simulator}: {few}")
    columns = declared_columns(model.name, (*model.inputs, *model.outputs), table)
    col = lambda names: (np.column_stack([columns[c] for c in names]) if names  # noqa: E731
                         else np.empty((t.size, 0)))  # a model without inputs: no column
    u, y = col(model.input_names), col(model.output_names)
    if not (np.isfinite(u).all() and np.isfinite(y).all()):
        raise CalibrationError("telemetry contains NaN/inf; drop or fill those samples first")
    _refuse_implausible(model, {**dict(zip(model.input_names, u.T)), **dict(zip(model.output_names, y.T))})
    base = np.asarray(model.param_vector({**artifact_params, **spec.parameters}), dtype=np.float64)
    try:  # as simulate, sweeps and the registry do: a fixed value out of bounds was run, and a free one blamed
        check_params(model, base)
    except ModelCheckError as exc:
        reason = exc.reason.replace("give values", "give `parameters` values")
        raise CalibrationError(f"calibration of {simulator}: {reason}") from None
    declared = {o.name: o.measurement_std for o in model.outputs if o.measurement_std is not None}
    sigma = {**declared, **spec.noise_std}
    return Problem(
        simulator=simulator,
        free_names=tuple(spec.free),
        free_index=np.asarray([model.param_names.index(n) for n in spec.free]),
        base_params=base,
        x0=np.asarray([spec.start_state[s] for s in model.state_names], dtype=np.float64),
        x0_std=np.asarray([spec.start_std.get(s, np.nan) for s in model.state_names], dtype=np.float64),
        u=u,
        y=y,
        sigma=np.asarray([sigma.get(o, 1.0) for o in model.output_names]),
        dt=float(steps[0]),
        sigma_assumed=tuple(o for o in model.output_names if o not in sigma),
    )


UNIT_METADATA = b"unit"
"""Parquet field-metadata key naming a telemetry column's unit (any unit `raytwin.units` reads: its grammar or a
`define`d symbol)."""


def _declared_unit(var: Var) -> str:
    """The unit `var`'s values are in, as `raytwin.units` spells it (``-`` for none)."""
    return var.unit or "-"


def declared_columns(model_name: str, variables: Iterable[Var], table: pa.Table) -> dict[str, np.ndarray]:
    """Each of `variables`' columns as float64 in its declared unit: as written, or converted from the unit
    its field metadata names (`UNIT_METADATA`), so telemetry recorded in W or K needs no rewrite for a model
    declared in kW or degC; an unknown or incompatible unit is a `CalibrationError`."""
    out = {}
    for var in variables:
        values = table[var.name].to_numpy().astype(np.float64)
        metadata = table.schema.field(var.name).metadata or {}
        if UNIT_METADATA in metadata:
            unit = metadata[UNIT_METADATA].decode()
            try:
                values = to_unit(values, unit, _declared_unit(var))
            except UnitError as exc:
                raise CalibrationError(f"telemetry column {var.name} of {model_name} (field metadata unit {unit!r}, "
                                       f"declared {_declared_unit(var)!r}): {exc}; write the column in a unit "
                                       "convertible to the declared one, or fix its metadata") from None
        out[var.name] = values
    return out


IMPLAUSIBLE_FRACTION = 0.5
"""Telemetry columns with more than this fraction of samples outside their variable's declared range are
refused: the bulk of the data, not a few noisy samples near a bound, is where the model is not meant to be
(a temperature in degC against a range in K)."""


def _refuse_implausible(model: Model, columns: dict[str, np.ndarray]) -> None:
    """`CalibrationError` naming the telemetry columns (model inputs and outputs) that lie mostly outside
    their declared range: the fit would chase values the model cannot produce (or NaN at them), and the
    refusal named parameters at their bounds instead of the units."""
    declared = {v.name: v for v in (*model.inputs, *model.outputs)}
    bad = []
    for name, values in columns.items():
        var = declared[name]
        outside = int(np.count_nonzero((values < var.lower) | (values > var.upper)))
        if outside > IMPLAUSIBLE_FRACTION * values.size:
            unit = f" {var.unit}" if var.unit not in ("", "-") else ""
            bad.append(f"{name} spans [{values.min():g}, {values.max():g}] ({outside} of {values.size} samples "
                       f"outside its declared range [{var.lower:g}, {var.upper:g}]{unit}; expected in "
                       f"{_declared_unit(var)})")
    if bad:
        raise CalibrationError(f"telemetry for {model.name} is implausible: {'; '.join(bad)}; telemetry is read in "
                               "the model's declared units (convert the column, or name its unit in the Parquet "
                               f"field metadata {UNIT_METADATA.decode()!r}), else widen the model's declared "
                               "range if such values are plausible")


def _refuse_implausible_start(model: Model, start_state: dict[str, float]) -> None:
    """`CalibrationError` naming the start states outside their plausible ranges (a temperature in degC against a
    range in K), as sweeps and `simulate` refuse them: the fit ran from there and blamed parameters at their bounds."""
    allowed = allowed_values({}, {}, {v.name: v for v in model.states})["state"]
    if bad := outside("start_state", allowed, start_state):
        raise CalibrationError(f"calibration of {model.name}: {'; '.join(bad)}: give the asset's state at the first "
                               "sample in the model's declared units, or widen the state's declared range if such "
                               "values are plausible")


# ------------------------------------------------------------------------ Tune phase ----
def _trial(config: dict[str, float], problem: Problem, windows: list[int]) -> None:
    from ray import tune

    yield_to_live(dedicated=True)  # a trial's actor runs trials alone: the twin shards beside it go first
    use_cpu_backend()  # a 1-CPU trial: on a GPU node, not a CUDA backend grabbing the GPU
    theta = np.log([config[name] for name in problem.free_names])
    for n, loss in zip(windows, window_losses(problem, theta, windows)):
        tune.report({"loss": loss, "window": n})


def window_losses(problem: Problem, theta_log: np.ndarray, windows: list[int]) -> list[float]:
    """`Problem.loss` of each window, from one simulation of the whole data: the simulation is causal, so a
    window's residuals are the whole run's first rows. One compile per trial process, not one per window length."""
    squares = problem.residuals(theta_log, problem.n).reshape(problem.n, -1) ** 2
    return [_rms(squares[:n].ravel()) for n in windows]


def _bounds(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """The model's declared (lower, upper) bounds of the free parameters."""
    specs = {p.name: p for p in problem.model.params}
    lo = np.array([specs[n].lower for n in problem.free_names])
    hi = np.array([specs[n].upper for n in problem.free_names])
    return lo, hi


def _log_bounds(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """`_bounds` for the log-parameters that refinement and the prediction-error fit move (a lower bound 0: -inf)."""
    lo, hi = _bounds(problem)
    with np.errstate(divide="ignore"):
        return np.log(lo), np.log(hi)


def _search(spec: CalibrationSpec, problem: Problem) -> tuple[dict, Any, int]:
    """(param_space, search algorithm, num_samples) for `spec.search`."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    limit = spec.max_concurrent_trials
    prior = problem.base_params[problem.free_index]
    lo, hi = _bounds(problem)
    s_lo = np.maximum(prior / spec.search_width, lo)
    s_hi = np.minimum(prior * spec.search_width, hi)
    names = problem.free_names
    if spec.search == "grid":
        space = {n: tune.grid_search([float(v) for v in np.geomspace(a, b, spec.grid_levels)])
                 for n, a, b in zip(names, s_lo, s_hi)}
        return space, BasicVariantGenerator(random_state=spec.seed, max_concurrent=limit), 1
    space = {n: tune.loguniform(float(a), float(b)) for n, a, b in zip(names, s_lo, s_hi)}
    if spec.search == "random":
        return space, BasicVariantGenerator(random_state=spec.seed, max_concurrent=limit), spec.num_samples
    try:
        if spec.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=spec.seed)
        else:
            from ray.tune.search.hyperopt import HyperOptSearch

            searcher = HyperOptSearch(random_state_seed=spec.seed)
        return space, ConcurrencyLimiter(searcher, max_concurrent=limit), spec.num_samples
    except (ImportError, AssertionError) as exc:
        package = "optuna" if spec.search == "optuna" else "hyperopt"
        raise CalibrationError(f"search {spec.search!r} needs the {package} package (pip install {package})") from exc


def _scheduler(spec: CalibrationSpec):
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler

    if spec.scheduler == "asha":
        return ASHAScheduler(max_t=spec.windows, grace_period=1, reduction_factor=2)
    if spec.scheduler == "hyperband":
        return HyperBandScheduler(max_t=spec.windows)
    return None


def tune_search(spec: CalibrationSpec, problem: Problem) -> tuple[dict[str, float], float, int, int]:
    """Best configuration on the full data, its loss, the number of trials and of early-stopped ones."""
    from ray import tune

    from sweeps.runner import ensure_ray
    from sweeps.tune_resources import trial_resources

    ensure_ray()
    space, search_alg, num_samples = _search(spec, problem)
    windows = problem.windows(spec.windows)
    storage = tempfile.mkdtemp(prefix="raytwin-tune-")
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, problem=problem, windows=windows),
                                trial_resources(spec.trial_cpus)),  # named: a killed search's can be removed
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="loss", mode="min", search_alg=search_alg, scheduler=_scheduler(spec),
                num_samples=num_samples, reuse_actors=True,
            ),
            run_config=tune.RunConfig(storage_path=storage, name="calibration", verbose=0),
        )
        grid = fit_quietly(tuner, log)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    finished = [r for r in grid if r.error is None and r.metrics and r.metrics.get("window") == problem.n]
    if not finished:
        errors = [str(r.error) for r in grid if r.error is not None][:3]
        raise CalibrationError(f"no Tune trial completed the full data window; errors: {errors}")
    scored = [r for r in finished if math.isfinite(r.metrics["loss"]) and r.metrics["loss"] < BAD_LOSS]
    if not scored:  # a NaN/inf simulation scores BAD_LOSS: such a "best" made scipy fail on its start point
        tried = "; ".join(_named(problem, np.log([r.config[n] for n in problem.free_names])) for r in list(grid)[:3])
        tried += f"{'; ...' if len(grid) > 3 else ''}, {len(grid)} in all"
        raise NoFiniteLoss(no_finite_loss(
            problem.simulator, f"its simulation was NaN/inf at every parameter set tried ({tried}; fixed: "
            f"{_named(problem, None)})", CHECK_DOMAIN))
    best = min(scored, key=lambda r: r.metrics["loss"])
    return ({n: float(best.config[n]) for n in problem.free_names}, float(best.metrics["loss"]),
            len(grid), len(grid) - len(finished))


# --------------------------------------------------------------------- refinement ----
def refine(problem: Problem, theta0_log: np.ndarray) -> tuple[np.ndarray, int]:
    """Least squares on the log-parameters with the jax.jacfwd Jacobian; (theta, evaluations)."""
    n = problem.n
    bounds = _log_bounds(problem)
    start = np.clip(theta0_log, bounds[0] + 1e-12, bounds[1] - 1e-12)
    if not np.all(np.isfinite(problem.residuals(start, n))):  # scipy said only "not finite in the initial point"
        raise NoFiniteLoss(f"calibration of {problem.simulator}: the refinement's start ({_named(problem, start)}) "
                           f"gives NaN/inf outputs; {CHECK_DOMAIN}")
    from scipy.optimize import least_squares  # here: the API processes that import this module never refine

    fit = least_squares(
        lambda th: problem.residuals(th, n),
        start,
        jac=lambda th: problem.jacobian(th, n),
        bounds=bounds, method="trf", x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=200,
    )
    return fit.x, int(fit.nfev)


def _named(problem: Problem, theta_log: np.ndarray | None) -> str:
    """``C_a=1.2e+06, R_aw=0.004``: the free parameters at `theta_log`, or with None the fixed ones."""
    if theta_log is None:
        free = set(problem.free_names)
        return ", ".join(f"{n}={v:g}" for n, v in zip(problem.model.param_names, problem.base_params) if n not in free)
    return ", ".join(f"{n}={v:.4g}" for n, v in zip(problem.free_names, np.exp(theta_log)))


def uncertainty(problem: Problem, theta_log: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(relative std, correlation) of the parameters from s^2 (J^T J)^-1 in log space."""
    n = problem.n
    r = problem.residuals(theta_log, n)
    jac = problem.jacobian(theta_log, n)
    dof = max(r.size - theta_log.size, 1)
    return _std_and_correlation(problem, (r @ r / dof) * np.linalg.pinv(jac.T @ jac))


START_STD_FRACTION = 1e-3
"""The prediction-error filter starts at `start_state` with this fraction of the declared prior std:
the start state is given (least squares takes it as exact); a wide prior let the filter re-estimate
the slow building-mass temperature and cost the slow parameters' precision."""


@in_float64
def prediction_error(problem: Problem, theta_log: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(log-parameters, process-noise factor, relative std, correlation) of the prediction-error fit
    (`sweeps.pem`) started from `theta_log`."""
    model = problem.model
    defaults = model_defaults(model)
    n_sub = problem.n_sub
    declared = lambda kind, names, fallback: np.array([defaults[kind].get(v, fallback) for v in names])  # noqa: E731
    exact = START_STD_FRACTION * declared("initial_std", model.state_names, 1.0)
    fit = pem_fit(model, tuple(problem.free_index.tolist()), n_sub, theta_log, problem.base_params, problem.x0,
                  np.diag(np.where(np.isnan(problem.x0_std), exact, problem.x0_std) ** 2),
                  problem.u, problem.y,
                  declared("process_std", model.state_names, 0.0) ** 2, problem.sigma**2, problem.dt / n_sub,
                  theta_bounds=_log_bounds(problem))
    if not np.isfinite(float(fit.nll)):
        raise CalibrationError("the prediction-error fit failed (non-finite likelihood); "
                               "use uncertainty='least_squares' or check the data")
    return (np.asarray(fit.theta_log), float(np.exp(fit.log_q_scale)),
            *_std_and_correlation(problem, np.asarray(fit.cov), np.asarray(fit.information)))


BOUND_TOLERANCE = 1e-6
"""A fitted log-parameter this close to the log of a declared bound sits on it (the bounded least squares
ends within ~1e-12 of a bound that stops it, the prediction-error fit exactly on it)."""


def _refuse_fit_on_bounds(problem: Problem, theta_log: np.ndarray) -> None:
    """Refuse a fit that ends on a declared bound: the bound stopped it there, not the data, so its value
    and uncertainty would mislead (and registering it would publish it as a fit)."""
    lo, hi = _log_bounds(problem)
    units = {p.name: "" if p.unit in ("", "-") else f" {p.unit}" for p in problem.model.params}
    hits = [f"{name}={np.exp(t):.6g}{units[name]} at its {'lower' if abs(t - a) <= BOUND_TOLERANCE else 'upper'} "
            f"bound (declared [{np.exp(a):g}, {np.exp(b):g}])"
            for name, t, a, b in zip(problem.free_names, theta_log, lo, hi)
            if min(abs(t - a), abs(t - b)) <= BOUND_TOLERANCE]
    if hits:
        raise FitRefused(f"the fit of {problem.simulator} reached declared bounds: {'; '.join(hits)}; "
                               "the data want a value outside them: widen the model's bounds if such a value is "
                               "plausible, else check the telemetry, start_state and fixed parameters")


COLLINEAR_EIGENVALUE = 1e-8
"""Smallest eigenvalue of the parameters' correlation matrix below which the data do not tell them apart
(correlations within ~1e-8 of +-1): a direction of parameter space that leaves the outputs unchanged."""


def _std_and_correlation(problem: Problem, cov: np.ndarray,
                         information: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(relative std, correlation) from the log-parameters' covariance, refused (`CalibrationError`) when
    the data do not identify the parameters: a covariance that is not positive definite (the inverse of a
    singular Hessian: negative or infinite variances, which read as "+- 0 %") or whose correlations are +-1
    along some direction (the pseudo-inverse of a singular J^T J: finite, and as false). Where the
    covariance is not even finite, the `information` matrix it was inverted from (if given) names the
    directions: its smallest eigenvalues' (a parameter that moves nothing has a zero row there)."""
    cov = 0.5 * (cov + cov.T)
    var = np.diag(cov)
    finite = np.all(np.isfinite(cov))
    if not finite or np.any(var <= 0):  # the unseen directions: the covariance's (almost) non-positive eigenvalues'
        # (0 where a pseudo-inverse cut them, negative from an inverted singular Hessian), or the information's smallest
        _refuse_unidentified(problem, _unseen(cov, 1e-12 * np.abs(cov).max()) if finite
                             else _null_directions(information))
    rel_std = np.sqrt(var)
    corr = cov / np.outer(rel_std, rel_std)
    if np.linalg.eigvalsh(corr)[0] < COLLINEAR_EIGENVALUE:  # scale-free: no parameter's units decide the direction
        _refuse_unidentified(problem, _unseen(corr, COLLINEAR_EIGENVALUE))
    return rel_std, corr


def _unseen(matrix: np.ndarray, below: float) -> np.ndarray:
    """The eigenvectors (columns) of the symmetric `matrix` whose eigenvalues are under `below`, at least the
    smallest one's: the directions the data do not see, as many as they are."""
    values, vectors = np.linalg.eigh(matrix)
    return vectors[:, :max(int(np.count_nonzero(values < below)), 1)]


def _null_directions(information: np.ndarray | None) -> np.ndarray | None:
    """The information matrix's null space (eigenvalues under `COLLINEAR_EIGENVALUE` times its largest, at least
    the smallest one's direction), or None where it is not known (not finite)."""
    if information is None or not np.all(np.isfinite(information)):
        return None
    information = 0.5 * (information + information.T)
    return _unseen(information, COLLINEAR_EIGENVALUE * max(float(np.abs(information).max()), 0.0))


class Unidentified(FitRefused):
    """The telemetry does not identify some free parameters (their covariance is singular)."""


def _refuse_unidentified(problem: Problem, directions: np.ndarray | None) -> None:
    """`CalibrationError` naming the parameters along `directions` (columns: the (log-)parameter space the data
    do not see), or every free parameter when it is not known (a covariance that is not even finite). Not
    from the information matrix as the covariance's pseudo-inverse: that cuts the covariance's smallest
    eigenvalues, the best-identified directions, and named a well-identified parameter. The advice follows
    the unseen space's dimension: one direction is pinned by fixing any one parameter along it (fixing all
    but one, as it said, threw away parameters the data identify)."""
    names = list(problem.free_names)
    unseen = len(names) if directions is None else directions.shape[1]
    if directions is not None:
        weights = np.linalg.norm(directions, axis=1)
        names = [n for n, w in zip(names, weights) if w >= 0.3 * weights.max()]
    unseen = min(unseen, len(names))
    if len(names) == 1:
        fix = "fix it (`parameters`) or add telemetry that moves it"
    elif directions is None:
        fix = "fix some of them (`parameters`), or add telemetry that moves them differently"
    elif unseen == len(names):
        fix = "fix them (`parameters`), or add telemetry that moves them"
    elif unseen == 1:
        fix = ("fix any one of them (`parameters`: they move along one direction the data do not see, which one "
               "fixed value pins), or add telemetry that moves them differently")
    else:
        fix = (f"fix {unseen} of them (`parameters`: the data do not see {unseen} independent directions; fix ones "
               "whose remaining set the data then identify), or add telemetry that moves them differently")
    raise Unidentified(
        f"the telemetry does not identify {', '.join(names)} of {problem.simulator}: changing "
        f"{'them together' if len(names) > 1 else 'it'} leaves the outputs (almost) unchanged, so fitted values "
        f"would be arbitrary and their uncertainty unbounded; {fix} (see the identifiability notes in "
        "sweeps/README.md)")


MISFIT_RMSE = 1.5
"""Weighted RMSE above which a fit is reported as not matching the data (`misfit_warning`). With the declared
noise right and a model that fits, it is ~1 (within ~1/sqrt(2N): 0.03 at 720 samples), so 1.5 (residual
variance 2.25x the declared noise's) is no chance. Not a chi-square test (p < 1e-3): at 4320 samples that
flags a weighted RMSE of 1.03, a noise_std 3 % off or the correlated residuals that process noise gives,
where the prediction-error intervals are still right."""


def misfit_warning(problem: Problem, weighted_rmse: float) -> str | None:
    """Why the reported intervals may be far too narrow, or None: they assume a model that fits the data, and
    a weighted RMSE well above 1 says it does not (an outside test: 3.29, C_a +- 1.2 %, the truth 8 sigma
    away). The intervals are left as computed; the warning goes into the result, the run record and the CLI."""
    if not weighted_rmse > MISFIT_RMSE:
        return None
    return (f"the fit does not match the data: weighted RMSE {weighted_rmse:.3g} where ~1 is expected for the "
            f"declared noise ({', '.join(f'{o}={s:g}' for o, s in zip(problem.model.output_names, problem.sigma))}, "
            f"over {MISFIT_RMSE:g} flagged): the intervals assume a model that fits and are likely far too narrow; "
            "check the fixed parameters, noise_std and the model (a missing input or dynamics)")


# ----------------------------------------------------------------------- outputs ----
def plot_fit(problem: Problem, theta_log: np.ndarray) -> bytes:
    """PNG of measured vs fitted outputs (deterministic bytes: no timestamp metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = problem.model
    pred = problem.predict(theta_log)
    t_h = problem.dt * np.arange(problem.n) / 3600.0
    outputs = model.outputs
    fig, axes = plt.subplots(len(outputs), 1, figsize=(10, 3.2 * len(outputs)), squeeze=False, sharex=True)
    for j, (ax, var) in enumerate(zip(axes[:, 0], outputs)):
        ax.plot(t_h, problem.y[:, j], ".", ms=2, alpha=0.5, label="measured")
        ax.plot(t_h, pred[:, j], "-", lw=1.2, label="fitted model")
        ax.set_ylabel(f"{var.name} [{var.unit}]")
        ax.legend(loc="best")
    axes[-1, 0].set_xlabel("time [h]")
    fig.suptitle(f"{model.name}: measured vs fitted")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


RESULT_FILE, PLOT_FILE = "calibration.json", "fit.png"


def calibrate(
    spec: CalibrationSpec, out_url: str, *, storage_options: dict | None = None
) -> tuple[CalibrationResult, dict[str, str], str]:
    """Fit, write ``calibration.json`` and ``fit.png`` under `out_url` (and register the fit if asked).

    Returns (result, {file: sha256}, telemetry sha256). Counted (outcome, duration) in
    `raytwin.metrics` when Ray runs.
    """
    # at 0 before the outcome (`Metric.zero`): a calibration's process (a CLI driver, a job's task) often counts
    # only that one, and a series first seen at 1 never shows in `increase()`, and so on the dashboard
    CALIBRATIONS.zero({"outcome": "succeeded"}, {"outcome": "failed"})
    CALIBRATION_DURATION.zero({})
    t0 = time.perf_counter()
    try:
        out = _calibrate(spec, out_url, storage_options)
    except BaseException:
        CALIBRATIONS.inc(outcome="failed")
        raise
    CALIBRATIONS.inc(outcome="succeeded")
    CALIBRATION_DURATION.observe_many(np.array([time.perf_counter() - t0]))
    return out


def _refuse_registered(spec: CalibrationSpec) -> None:
    """A `register_as` version registered already, refused before the search (its registration was refused only
    after the whole fit). The registration after the fit still refuses one registered meanwhile
    (`raytwin.registry.VersionConflict`)."""
    if spec.register_as is None:
        return
    name, version = spec.register_as.split("@")
    registry = ModelRegistry(spec.registry_url)
    if version in (known := registry.versions(name)):
        raise RegistryError(f"register_as {spec.register_as} is registered already (versions of {name}: "
                            f"{', '.join(known)}): give register_as a version not registered yet; nothing was "
                            "fitted", registry.url)


def _calibrate(spec: CalibrationSpec, out_url: str,
               storage_options: dict | None) -> tuple[CalibrationResult, dict[str, str], str]:
    artifact = resolve_model(spec.model, spec.registry_url)
    _refuse_registered(spec)
    table, data_hash = read_telemetry(spec.telemetry, storage_options)
    problem = build_problem(spec, table, artifact.parameters, artifact.asset_type.simulator)
    log.info("calibration start model=%s free=%s samples=%d search=%s scheduler=%s",
             artifact.ref, ",".join(spec.free), problem.n, spec.search, spec.scheduler)
    best, best_loss, trials, stopped = tune_search(spec, problem)
    log.info("calibration tune_done best_loss=%.6g trials=%d stopped_early=%d", best_loss, trials, stopped)
    theta = np.log([best[n] for n in problem.free_names])
    evaluations = 0
    if spec.refine:  # the stages after Tune's log nothing of their own: a minute's silence read as a hang
        log.info("calibration refine start (least squares)")
        theta, evaluations = refine(problem, theta)
        log.info("calibration refine done evaluations=%d", evaluations)
    q_scale = None
    try:
        if spec.uncertainty == "prediction_error":
            log.info("calibration prediction_error start")
            theta, q_scale, rel_std, corr = prediction_error(problem, theta)
            log.info("calibration prediction_error process_noise_scale=%.3g", q_scale)
        else:
            rel_std, corr = uncertainty(problem, theta)
    except Unidentified:  # a fit a bound stopped has a singular covariance too: the bound is the cause to name
        if spec.refine:
            _refuse_fit_on_bounds(problem, theta)
        raise
    if spec.refine or spec.uncertainty == "prediction_error":  # an optimum (a Tune grid point may lie on a bound)
        _refuse_fit_on_bounds(problem, theta)
    fitted = np.asarray(problem.params(theta))
    r = problem.residuals(theta, problem.n).reshape(problem.n, -1) * problem.sigma
    model = problem.model
    values = dict(zip(model.param_names, map(float, fitted)))
    weighted_rmse = problem.loss(theta, problem.n)
    warnings = [w for w in (misfit_warning(problem, weighted_rmse),) if w is not None]
    for warning in warnings:
        log.warning("calibration %s", warning)
    result = CalibrationResult(
        model_ref=artifact.ref,
        free=list(problem.free_names),
        parameters=values,
        std={n: float(values[n] * s) for n, s in zip(problem.free_names, rel_std)},
        rel_std={n: float(s) for n, s in zip(problem.free_names, rel_std)},
        correlation=corr.tolist(),
        weighted_rmse=weighted_rmse,
        rmse={o: float(np.sqrt(np.mean(r[:, j] ** 2))) for j, o in enumerate(model.output_names)},
        n_samples=problem.n,
        tune_best=best,
        tune_best_loss=best_loss,
        tune_trials=trials,
        tune_trials_stopped=stopped,
        refined=spec.refine,
        refine_evaluations=evaluations,
        uncertainty=spec.uncertainty,
        process_noise_scale=q_scale,
        noise_std=dict(zip(model.output_names, map(float, problem.sigma))),
        noise_std_assumed=list(problem.sigma_assumed),
        warnings=warnings,
    )
    log.info("calibration done weighted_rmse=%.6g %s", result.weighted_rmse,
             " ".join(f"{n}={values[n]:.6g}+-{100 * s:.2g}%" for n, s in result.rel_std.items()))
    if spec.register_as is not None:  # before the outputs: a refused registration leaves no outputs of a failed run
        name, version = spec.register_as.split("@")
        ModelRegistry(spec.registry_url).register(
            name, version, artifact.asset_type, result.parameters,
            metadata={"calibrated_from": artifact.ref, "telemetry_sha256": data_hash,
                      "weighted_rmse": repr(result.weighted_rmse),
                      **publisher_offline(spec.registered_by, OFFLINE_CALIBRATION)},  # (declared: marked unverified)
        )
        log.info("calibration registered model=%s", spec.register_as)
    fs, root = filesystem(out_url, storage_options)
    make_folder(fs, root)
    body = result.model_dump(mode="json", exclude=None if result.warnings else {"warnings"})
    files = {RESULT_FILE: canonical_json(body), PLOT_FILE: plot_fit(problem, theta)}
    for name, data in files.items():
        replace_file(fs, f"{root}/{name}", data)
    return result, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}, data_hash
