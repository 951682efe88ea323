"""``raytwin models``: the declared models, one model's declaration, and the checks registration runs.

JAX is imported by the commands, not by this module, so ``raytwin --help`` stays fast.
"""

from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from raytwin.fmu.describe import FmuModel

models_app = typer.Typer(no_args_is_help=True)
MODEL_REF = "A declared model name, an import path package.module:MODEL, or a stored FMU's URL (.../fmus/<sha256>.fmu)."


def importable_working_directory() -> None:
    """Model modules in the working directory import, as with ``python -m`` (a model module next to you
    loads), for every command that names a model (here and in `sweeps.cli`; Ray's workers get the
    driver's ``sys.path``)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def resolve_model(ref: str):
    """The model at `ref` (a declared name or package.module:MODEL), or exit 2 with the one-line reason."""
    from raytwin.sim import UnknownModelError, get_model
    from raytwin.sim.model import ModelCheckError

    importable_working_directory()
    try:
        return get_model(ref)
    except (UnknownModelError, ModelCheckError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@models_app.command("list")
def list_models() -> None:
    """The models declared in the ``raytwin.models`` entry-point group: name, version, import path."""
    from raytwin.sim.discovery import declared

    for name, path in sorted(declared().items()):
        model = resolve_model(name)
        typer.echo(f"{name}\t{model.version}\t{path}\t{model.description}")


def _bounds(lower: float, upper: float) -> str:
    fmt = lambda v: f"{v:g}" if math.isfinite(v) else ("-inf" if v < 0 else "inf")  # noqa: E731
    return f"[{fmt(lower)}, {fmt(upper)}]"


@models_app.command("show")
def show(ref: str = typer.Argument(..., help=MODEL_REF)) -> None:
    """A model's declaration: variables with units and ranges, parameters with defaults and bounds, step; for a
    stored FMU (its URL, ``.../fmus/<sha256>.fmu``) also its FMI version, interfaces and hash."""
    from raytwin.fmu.describe import FmuModel

    model = resolve_model(ref)
    typer.echo(f"{model.name} {model.version}: {model.description}")
    if isinstance(model, FmuModel):  # it integrates itself: no RK4 step limit to state
        typer.echo(f"FMU {model.name} (FMI {model.fmi_version}, {', '.join(model.interfaces)}), sha256 "
                   f"{model.fmu_hash}")
        typer.echo(f"default_dt {model.default_dt:g} s")
    else:
        typer.echo(f"default_dt {model.default_dt:g} s" + (f" ({model.dt_limit})" if model.dt_limit else ""))
    for kind, variables in (("states", model.states), ("inputs", model.inputs), ("outputs", model.outputs)):
        typer.echo(f"{kind}:")
        for v in variables:
            extra = ", ".join(f"{k}={getattr(v, k):g}" for k in ("nominal", "prior_std", "process_std",
                                                               "measurement_std") if getattr(v, k, None) is not None)
            typer.echo(f"  {v.name} [{v.unit}] {_bounds(v.lower, v.upper)} {v.description}"
                       + (f" ({extra})" if extra else ""))
    typer.echo("params:")
    for p in model.params:
        typer.echo(f"  {p.name} [{p.unit}] default {p.default:g} {_bounds(p.lower, p.upper)} {p.description}")


@models_app.command("check")
def check(
    ref: str = typer.Argument(..., help=MODEL_REF),
    dt: float = typer.Option(None, help="The step to check [s] (default: the model's default_dt; a stored FMU's "
                             "probe always runs at its default_dt, the step it registers with)."),
) -> None:
    """Run the checks registration runs (names, shapes, floating-point types, units, finiteness at the parameter
    corners, jit/vmap/jacfwd, RK4 stability; for a stored FMU, its probe run at the default parameters); exit 1
    with a one-line reason when one fails."""
    from raytwin.fmu.describe import FmuModel
    from raytwin.sim.checks import check_model
    from raytwin.sim.model import ModelCheckError

    model = resolve_model(ref)
    if isinstance(model, FmuModel):
        _check_fmu(model)
        return
    try:
        report = check_model(model, dt=dt)
    except ModelCheckError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for line in report.lines():
        typer.echo(line)


def _check_fmu(model: FmuModel) -> None:
    """What registering a stored FMU runs (`FmuModel.check_registration`: `PROBE_STEPS` default steps at the
    default parameters, finite and inside the declared ranges); the JAX checks (jit, jacfwd, RK4) mean nothing
    for a black box that integrates itself. Exit 1 with the reason when it fails."""
    from raytwin.fmu.describe import PROBE_STEPS
    from raytwin.sim.model import ModelCheckError

    defaults = [p.default for p in model.params]
    try:
        model.check_registration(defaults)
    except ModelCheckError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{model.name} {model.version}: FMU {model.fmu_hash[:12]}... (FMI {model.fmi_version})")
    typer.echo(f"probe run: {PROBE_STEPS} steps of {model.default_dt:g} s ({model.interfaces[0]}) at "
               f"{dict(zip(model.param_names, defaults))}: {len(model.states)} states and {len(model.outputs)} "
               "outputs finite, within the declared ranges")
