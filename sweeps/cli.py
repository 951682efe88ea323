"""Command line: ``raytwin sweep ...``, ``raytwin calibrate ...``, ``raytwin rerun RUN_ID``, ``raytwin runs ...``.

Every command connects to the Ray cluster of a Ray job (``ray job submit -- raytwin sweep run
spec.yaml``) or starts a local Ray. Specs are JSON or YAML files holding a `SweepSpec` /
`CalibrationSpec`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
import yaml
from pydantic import ValidationError

from raytwin.contracts import MAX_RUN_WORK, describe_error
from raytwin.models_cli import importable_working_directory
from sweeps.limits import MAX_SCENARIOS, SweepTooLarge, check_size

if TYPE_CHECKING:
    import pyarrow as pa

    from raytwin.sim import Model
    from sweeps.space import ScenarioSpace

sweep_app = typer.Typer(help="What-if scenario sweeps over a model.", no_args_is_help=True)
calibrate_app = typer.Typer(help="Fit model parameters to telemetry (Ray Tune + least squares).", no_args_is_help=True)
runs_app = typer.Typer(help="Recorded sweep and calibration runs.", no_args_is_help=True)

T = TypeVar("T")
RunsOption = Annotated[str, typer.Option("--runs", help="Runs root: a directory or fsspec URL.")]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _recorded(run: Callable[[], T], *refused: type[Exception]) -> T:
    """`run()`; a spec it refuses (`refused`, or a model that does not resolve or register: an unknown or
    unimportable model, a registry's refusal) is a usage error (exit 2) that shows the reason in one line."""
    from raytwin.registry import RegistryError
    from raytwin.sim import UnknownModelError

    try:
        return run()
    except RegistryError as exc:
        raise typer.BadParameter(exc.located()) from None
    except (*refused, UnknownModelError) as exc:
        raise typer.BadParameter(str(exc)) from None


def _unless_refused(run: Callable[[], T]) -> T:
    """`run()`; a fit the data refused (`sweeps.calibration.FitRefused`: it ran, on a valid spec) is no usage
    error: one line, exit 1."""
    from sweeps.calibration import FitRefused

    try:
        return run()
    except FitRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _terminate(signum: int, frame: object) -> None:
    from sweeps.runner import RunTerminated

    raise RunTerminated


@contextlib.contextmanager
def _sigterm_recorded() -> Iterator[None]:
    """Within it, SIGTERM (`raytwin job stop`) raises `sweeps.runner.RunTerminated`: the run is recorded
    `cancelled` and a sweep's chunk tasks are cancelled, as on Ctrl-C. Ray is started first: `ray.init` installs
    its own handler (``sys.exit``), under which a terminated run was recorded with the error "1" or "15"."""
    from raytwin.ray_connect import first_line, local_start_failure
    from sweeps.runner import ensure_ray

    try:
        ensure_ray()
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its node is slow to start
        address = os.environ.get("RAY_ADDRESS")
        typer.echo(f"error: cannot connect to the Ray cluster at {address}: {first_line(e)}" if address
                   else local_start_failure(e, "run this with RAY_ADDRESS=auto"), err=True)
        raise typer.Exit(1) from None
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _load(path: Path, spec_type, fmu_spec_type=None):
    """The spec in `path` (JSON or YAML); with `fmu_spec_type`, a spec saying ``engine: fmu`` is one
    of those (a registered FMU's run, `sweeps.fmu`), so the same command and Ray job run either."""
    importable_working_directory()
    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from None
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if fmu_spec_type is not None and isinstance(data, dict) and data.get("engine") == "fmu":
        spec_type = fmu_spec_type
    try:
        return spec_type.model_validate(data)
    except (ValidationError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {describe_error(exc)}") from None


def _check_size(space: ScenarioSpace, n_steps: int, metric_columns: int, max_scenarios: int, max_work: int,
                per_output: int = 0) -> None:
    """`sweeps.limits.check_size` with the limits named as this command's options; a sweep over one is a usage
    error."""
    try:
        check_size(space, n_steps, metric_columns, max_scenarios=max_scenarios, max_work=max_work,
                   option=lambda name, value: f"--{name.replace('_', '-')} {value}", per_output=per_output)
    except SweepTooLarge as exc:
        raise typer.BadParameter(str(exc)) from None


@sweep_app.command("run")
def sweep_run(
    spec: Annotated[Path, typer.Argument(help="SweepSpec as JSON or YAML.")],
    runs: RunsOption = "./runs",
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar.")] = None,
    max_scenarios: Annotated[int, typer.Option(
        min=1, help="Refuse a sweep of more scenarios (saying what it would write); raise it for a bigger one.")
    ] = MAX_SCENARIOS,
    max_work: Annotated[int, typer.Option(
        min=1, help="Refuse a sweep of more scenario-steps (scenarios x steps; default the API's max_run_work, "
        "1e10: ~10 min of a 2-core node); raise it for a longer one.")] = MAX_RUN_WORK,
) -> None:
    """Run a sweep, write its metrics dataset and run record; print the run id."""
    from raytwin.fmu.batch import METRICS
    from sweeps.fmu import FmuSpecError, FmuSweepSpec, registered_fmu
    from sweeps.runner import DIVERGED_ADVICE, SweepCancelled, prepare, rate_text
    from sweeps.runs import RunError, recorded_fmu_sweep, recorded_sweep
    from sweeps.spec import SweepSpec

    _setup_logging()
    parsed = _load(spec, SweepSpec, FmuSweepSpec)
    if isinstance(parsed, FmuSweepSpec):
        _check_size(parsed.space, parsed.n_steps, 1, max_scenarios, max_work, per_output=len(METRICS))  # error
        _recorded(lambda: registered_fmu(parsed.model, parsed.registry_url), FmuSpecError)  # before it is recorded
        with _sigterm_recorded():
            record = _recorded(lambda: recorded_fmu_sweep(parsed, runs=runs, max_scenarios=max_scenarios),
                               FmuSpecError, RunError)
        s = record.summary
        typer.echo(f"run {record.run_id}: {s['scenarios']} FMU scenarios ({s['failed']} failed) in {s['elapsed_s']} s "
                   f"on {s['workers']} worker(s) -> {record.output_url}")
        return
    # a registry model's names, values and step are checked once it resolves: here, as a bare simulator's are on load
    simulator, _ = _recorded(lambda: prepare(parsed), ValueError)
    _check_size(parsed.space, parsed.n_steps, len(parsed.kit(simulator).metrics) + 1, max_scenarios, max_work)  # + diverged
    try:
        with _sigterm_recorded():
            record = _recorded(lambda: recorded_sweep(parsed, runs=runs, progress=progress,
                                                      max_scenarios=max_scenarios), RunError)
    except SweepCancelled as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(130) from None
    s = record.summary
    typer.echo(f"run {record.run_id}: {s['scenarios']} scenarios in {s['elapsed_s']} s "
               f"({rate_text(s['scenarios_per_s'])}/s) -> {record.output_url}")
    if s["diverged"]:
        typer.echo(f"diverged: {s['diverged']} of {s['scenarios']} scenarios left their states' plausible range "
                   f"or turned NaN (metrics NaN, column `diverged`; left out of quantiles): {DIVERGED_ADVICE}")


@sweep_app.command("example")
def sweep_example(
    model: Annotated[str, typer.Argument(help="Simulator name (e.g. thermal_rc) or import path package.module:MODEL.")],
    n: Annotated[int, typer.Option(help="Scenarios (Latin hypercube).")] = 1000,
) -> None:
    """Print an example SweepSpec (JSON) to start from: the model kit's example, or one derived
    from the model's declaration."""
    from raytwin.models_cli import resolve_model
    from sweeps.kits import example_sweep, kit_for
    from sweeps.spec import SweepSpec

    from raytwin.contracts import describe_error

    example = example_sweep(kit_for(resolve_model(model)))
    try:
        spec = SweepSpec(model=model, horizon_s=example.horizon_s, step_s=example.step_s,
                         space={"method": "lhs", "n": n, "seed": 0, "dimensions": example.dimensions})
    except ValueError as exc:  # the model's declaration leaves the derived example nothing valid: one line, no trace
        typer.echo(f"error: the example derived from {model} is refused by its own checks: {describe_error(exc)}; "
                   "write the spec's dimensions by hand (sweeps/README.md)", err=True)
        raise typer.Exit(1) from None
    typer.echo(spec.model_dump_json(indent=2, exclude_defaults=True))


@sweep_app.command("quantiles")
def sweep_quantiles(
    dataset: Annotated[str, typer.Argument(help="A sweep output directory/URL, or a run id under --runs.")],
    runs: RunsOption = "./runs",
    metric: Annotated[list[str] | None, typer.Option(help="Metric column (repeatable); default all.")] = None,
    by: Annotated[list[str] | None, typer.Option(help="Dimension column to group by (repeatable).")] = None,
    q: Annotated[list[float] | None, typer.Option(help="Quantile in [0, 1] (repeatable).")] = None,
    bins: Annotated[list[str] | None, typer.Option(
        help="Bin a continuous --by column: COLUMN=N (equal-width bins) or COLUMN=E0,E1,... (edges); repeatable.")
    ] = None,
    max_groups: Annotated[int | None, typer.Option(
        help="Refuse more groups than this (default sweeps.aggregate.MAX_GROUPS, 10000): bin continuous columns.")
    ] = None,
    partial: Annotated[bool, typer.Option(
        help="Read a cancelled or failed run's output anyway (only the scenarios it wrote, in index order).")
    ] = False,
) -> None:
    """Quantiles (uncertainty bands) of the sweep metrics, optionally per group."""
    from sweeps.aggregate import DEFAULT_QUANTILES, MAX_GROUPS, quantiles
    from sweeps.runs import RunError, RunStore

    url = dataset
    if "/" not in dataset:
        try:
            store = RunStore(runs)
            record = store.load(dataset)
        except RunError as exc:
            raise typer.BadParameter(str(exc)) from None
        if record.kind != "sweep":  # else "no sweep results (part-*.parquet) under ...", as if the run lost them
            raise typer.BadParameter(f"run {dataset} is a {record.kind}, not a sweep: its outputs are "
                                     f"{', '.join(sorted(record.outputs)) or 'none'} (`raytwin runs show {dataset}`)")
        url = store.output_url(record.run_id)  # where the root lies now, not where the run wrote
    try:
        table = quantiles(url, metric or None, q=q or DEFAULT_QUANTILES, by=by or (), bins=_bins(bins or []),
                          max_groups=max_groups or MAX_GROUPS, partial=partial)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from None
    names = table.column_names
    typer.echo("\t".join(names))
    for row in table.to_pylist():
        typer.echo("\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in names))


def _bins(items: list[str]) -> dict[str, int | list[float]]:
    """``COLUMN=N`` or ``COLUMN=E0,E1,...`` options as `quantiles`' `bins`."""
    try:
        pairs = [item.split("=", 1) for item in items]
        return {col: int(v) if "," not in v else [float(e) for e in v.split(",")] for col, v in pairs}
    except ValueError:
        raise typer.BadParameter(f"--bins takes COLUMN=N or COLUMN=E0,E1,..., got {items}") from None


@calibrate_app.command("run")
def calibrate_run(
    spec: Annotated[Path, typer.Argument(help="CalibrationSpec as JSON or YAML.")],
    runs: RunsOption = "./runs",
) -> None:
    """Fit parameters; write calibration.json, fit.png and the run record; print the fit."""
    from sweeps.calibration import CalibrationError, CalibrationSpec
    from sweeps.fmu import FmuCalibrationSpec, FmuSpecError
    from sweeps.runs import RunError, recorded_calibration, recorded_fmu_calibration

    _setup_logging()
    parsed = _load(spec, CalibrationSpec, FmuCalibrationSpec)
    if isinstance(parsed, FmuCalibrationSpec):
        with _sigterm_recorded():
            record = _recorded(lambda: _unless_refused(lambda: recorded_fmu_calibration(parsed, runs=runs)),
                               FmuSpecError, CalibrationError, RunError)
        s = record.summary
        typer.echo(f"run {record.run_id}: loss {s['loss']:.4g} after {s['evaluations']} FMU runs -> {record.output_url}")
        for name, value in s["parameters"].items():
            typer.echo(f"  {name} = {value:.6g}")
        return
    with _sigterm_recorded():
        record = _recorded(lambda: _unless_refused(lambda: recorded_calibration(parsed, runs=runs)), CalibrationError,
                           RunError)
    typer.echo(f"run {record.run_id}: weighted RMSE {record.summary['weighted_rmse']:.4g} -> {record.output_url}")
    for name, rel in record.summary["rel_std"].items():
        typer.echo(f"  {name} = {record.summary['parameters'][name]:.6g} (+- {100 * rel:.2g}%)")
    if record.summary["noise_std_assumed"]:
        typer.echo(f"note: outputs {record.summary['noise_std_assumed']} declare no measurement_std and the spec "
                   "gives no noise_std: sigma 1 was assumed, so the +- above are only as right as that; set noise_std")
    if parsed.register_as is not None:  # the run's one write outside its folder: say where it went
        typer.echo(f"registered {parsed.register_as} in {parsed.registry_url} with the fitted parameters "
                   f"(published_by {parsed.registered_by}, unverified)")
    for warning in record.summary.get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)


@calibrate_app.command("synthetic")
def calibrate_synthetic(
    model: Annotated[str, typer.Argument(help="Simulator name (e.g. thermal_rc) or import path package.module:MODEL.")],
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    steps: Annotated[int, typer.Option(min=3, help="Samples (a calibration needs 5 per free parameter).")] = 2000,
    dt: Annotated[float | None, typer.Option(help="Sample period [s] > 0; default the model's step.")] = None,
    param: Annotated[list[str] | None, typer.Option(help="True parameter NAME=VALUE (repeatable).")] = None,
    noise: Annotated[list[str] | None, typer.Option(help="Output noise std OUTPUT=STD (repeatable).")] = None,
    seed: int = 0,
) -> None:
    """Write synthetic noisy telemetry with known parameters (solve_ivp ground truth); print its start state,
    which a CalibrationSpec of the data needs."""
    import numpy as np
    import pyarrow.parquet as pq

    from raytwin.models_cli import resolve_model
    from raytwin.sim import Model, ModelCheckError
    from raytwin.sim.checks import check_params
    from sweeps.kits import kit_for
    from sweeps.synthetic import synthetic_telemetry

    sim = resolve_model(model)
    if not isinstance(sim, Model):  # the ground truth integrates the model's JAX derivative, which an FMU has not
        raise typer.BadParameter(
            f"{sim.name} is an FMU: this command integrates a JAX model's equations with solve_ivp. Simulate the FMU "
            "itself (raytwin.fmu: cached_instance(model).run(FmuScenario(...))), add noise, and write t_s, its inputs "
            "and its outputs to Parquet (raytwin/fmu/README.md)", param_hint="MODEL")

    def pairs(items: list[str] | None, option: str, known: tuple[str, ...], nonnegative: bool) -> dict[str, float]:
        """``NAME=VALUE`` options as a dict; `known` names and finite values (`nonnegative` ones) only."""
        try:
            values = {k: float(v) for k, v in (item.split("=", 1) for item in items or [])}
        except ValueError:
            raise typer.BadParameter(f"expected NAME=VALUE pairs, got {items}", param_hint=option) from None
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise typer.BadParameter(f"unknown name(s) {unknown}; {sim.name} has {list(known)}", param_hint=option)
        bad = {k: v for k, v in values.items() if not math.isfinite(v) or (nonnegative and v < 0)}
        if bad:
            raise typer.BadParameter(f"{bad}: values must be finite numbers" + (" >= 0" if nonnegative else ""),
                                     param_hint=option)
        return values

    if dt is not None and not (math.isfinite(dt) and dt > 0):
        raise typer.BadParameter(f"{dt} is not a finite number of seconds > 0", param_hint="--dt")
    truth = pairs(param, "--param", sim.param_names, nonnegative=False)
    try:  # a calibration stays within the bounds: data of a value outside them can only end on a bound
        check_params(sim, np.asarray(sim.param_vector(truth)))
    except ModelCheckError as exc:
        raise typer.BadParameter(exc.reason, param_hint="--param") from None
    noise_std = pairs(noise, "--noise", sim.output_names, nonnegative=True)
    kit = kit_for(sim)
    start = kit.states0
    table = synthetic_telemetry(model, truth, start, steps, sim.default_dt if dt is None else dt, noise_std, seed)
    try:
        pq.write_table(table, out)
    except OSError as exc:
        raise typer.BadParameter(f"cannot write {out}: {exc}", param_hint="--out") from None
    typer.echo(f"wrote {table.num_rows} samples of {model} to {out}")
    typer.echo(f"start_state: {json.dumps(start)}")  # what a CalibrationSpec of this data needs (YAML or JSON)
    truth_used = dict(zip(sim.param_names, map(float, sim.param_vector(truth))))
    typer.echo(f"parameters: {json.dumps(truth_used)}")  # the ground truth a fit is checked against, defaults included
    typer.echo(_excited(sim, table, generic=not kit.excitation))


def _excited(sim: Model, table: pa.Table, generic: bool) -> str:
    """The line that says how far the data move each input: a parameter that only an input barely moved (a 6 kW
    heater's efficiency under the generic excitation's +-1 W around a zero nominal) cannot be fitted from it."""
    spans = ", ".join(f"{v.name} {min(table[v.name].to_pylist()):.4g} to {max(table[v.name].to_pylist()):.4g} {v.unit}"
                      for v in sim.inputs)
    if not spans:
        return "inputs: none"
    source = ("no kit: random levels within each input's nominal +- 50 %, +- 1 around a zero nominal; where that moves "
              "an input too little to fit a parameter, write your own data") if generic else "the kit's excitation"
    return f"inputs: {spans} ({source})"


def rerun(
    run_id: Annotated[str, typer.Argument(help="Run id (see `raytwin runs list`).")],
    runs: RunsOption = "./runs",
) -> None:
    """Re-execute a recorded run and show whether its outputs are identical (bit for bit)."""
    from sweeps.runs import RunError, RunStore
    from sweeps.runs import rerun as do_rerun

    _setup_logging()
    importable_working_directory()
    try:
        RunStore(runs).load(run_id)  # a mistyped id is said before Ray starts
        with _sigterm_recorded():  # Ray's start failure in one line, SIGTERM recorded as for `sweep run`
            report = do_rerun(run_id, runs=runs)
    except (RunError, ValueError) as exc:  # a spec or input that no longer resolves (CalibrationError, ...)
        raise typer.BadParameter(f"{run_id}: {exc}") from None
    if report.code_version_then != report.code_version_now:
        typer.echo(f"note: code version changed {report.code_version_then} -> {report.code_version_now}")
    if report.package_changes:
        changes = ", ".join(f"{name} {then} -> {now}" for name, (then, now) in sorted(report.package_changes.items()))
        typer.echo(f"note: package versions changed: {changes}")
    for caveat in report.caveats:
        typer.echo(f"note: {caveat}")
    if report.identical:
        typer.echo(f"identical: rerun {report.rerun} reproduced every output of {run_id} bit for bit")
    else:
        typer.echo(f"differs: rerun {report.rerun} differs from {run_id} in {', '.join(report.differing)}")
        raise typer.Exit(1)


rerun_app = typer.Typer(help="Re-execute a recorded run.")
rerun_app.command()(rerun)


@runs_app.command("list")
def runs_list(runs: RunsOption = "./runs") -> None:
    """Recorded runs, oldest first; none says where it looked, as a mistyped `--runs` would otherwise print nothing."""
    from sweeps.runs import RunStore

    store = RunStore(runs)
    records = store.list()
    if not records:
        typer.echo(f"no runs under {store.root} (give --runs the runs root they were written to)", err=True)
    for r in records:
        typer.echo(f"{r.run_id}\t{r.kind}\t{r.status}\t{r.model_ref}\t{r.tenant}\t{r.user}\t{r.started.isoformat()}")


@runs_app.command("diff")
def runs_diff(run_a: str, run_b: str, runs: RunsOption = "./runs") -> None:
    """What differs between two runs (spec, model, data, packages, code, outputs), a field a line."""
    from sweeps.runs import RunError, diff_runs

    try:
        differences = diff_runs(run_a, run_b, runs=runs)
    except RunError as exc:
        raise typer.BadParameter(str(exc)) from None
    for field, (a, b) in differences.items():
        typer.echo(f"{field}: {json.dumps(a)} -> {json.dumps(b)}")
    if not any(field.startswith("outputs.") for field in differences):
        typer.echo("outputs: identical")


@runs_app.command("show")
def runs_show(run_id: str, runs: RunsOption = "./runs") -> None:
    """The full run record as JSON."""
    from sweeps.runs import RunError, RunStore

    try:
        typer.echo(RunStore(runs).load(run_id).model_dump_json(indent=2))
    except RunError as exc:
        raise typer.BadParameter(str(exc)) from None
