"""The Lorenz system (model ``lorenz``) and its sweep kit, on the public API only.

    dx/dt = sigma (y - x)
    dy/dt = rho x - y - x z
    dz/dt = x y - beta z

Written exactly as a model package would write it (`raytwin.models`, `sweeps.kits`): no RayTwin
internals. The kit's metrics are the end state (the paper's benchmark keeps only the end state,
``save_everystep = false``). Dimensionless states; time in seconds.

`PAPER_BETA` is the ``2.666f0`` that utkarsh530/GPUODEBenchmarks' ``bench_lorenz_gpu.jl`` hard-codes
(its diffrax script uses 8/3): the benchmark reproduces the Julia problem, so it sets beta to it.
"""

from __future__ import annotations


from raytwin.models import Model, Output, Param, State
from raytwin.scenario_metrics import Metric
from sweeps.kits import Kit, register_kit

PAPER_BETA = 2.666
"""beta in ``bench_lorenz_gpu.jl`` (``2.666f0 * u[3]``), the problem the benchmark reproduces."""


def _coefficients(p):
    return p  # sigma, rho, beta are used as they are


def _derivative(x, u, c):
    px, py, pz = x
    sigma, rho, beta = c
    return (sigma * (py - px), rho * px - py - px * pz, px * py - beta * pz)


def _output(x, u, c):
    return x


LORENZ = Model(
    name="lorenz",
    version="1.0.0",
    description="The Lorenz system (convection rolls; chaotic for rho > 24.74 at sigma 10, beta 8/3).",
    states=(
        State("x", "-", "convection intensity", -1e4, 1e4, nominal=1.0),
        State("y", "-", "horizontal temperature difference", -1e4, 1e4, nominal=0.0),
        State("z", "-", "vertical temperature difference", -1e4, 1e4, nominal=0.0),
    ),
    inputs=(),
    params=(
        Param("sigma", "-", 10.0, 0.0, 100.0, "Prandtl number"),
        Param("rho", "-", 28.0, 0.0, 100.0, "Rayleigh number (relative)"),
        Param("beta", "-", 8.0 / 3.0, 0.0, 10.0, "aspect-ratio factor"),
    ),
    outputs=tuple(Output(n, "-", f"observed {n}", -1e4, 1e4, measurement_std=0.01) for n in ("x", "y", "z")),
    coefficients=_coefficients,
    derivative=_derivative,
    output=_output,
    default_dt=0.001,
    dt_limit="RK4 is accurate for dt <= 0.01 at rho <= 28 (the benchmark uses 0.001)",
)


def lorenz_kit(model: Model = LORENZ) -> Kit:
    """The end state (x, y, z at the horizon) of `model`: `LORENZ`, or it with another solver
    (``dataclasses.replace(LORENZ, solver=TSIT5)``)."""
    metrics = tuple(Metric(name=f"{n}_final", kind="final", of=n, unit="-") for n in model.state_names)
    return Kit(model=model, inputs={}, metrics=metrics, start_state={"x": 1.0, "y": 0.0, "z": 0.0})


LORENZ_KIT = register_kit(lorenz_kit())

__all__ = ["LORENZ", "LORENZ_KIT", "PAPER_BETA", "lorenz_kit"]
