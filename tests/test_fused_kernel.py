"""The fused Pallas sweep kernel (`sweeps.fused`) against the XLA path, in Pallas' interpret mode on
the CPU (no GPU needed): the same metrics within float32 rounding for the thermal sweep, the
compensated battery sweep and the paper's Lorenz ensemble (RK4 and Tsit5), the same divergence
flags, and the engine's per-platform choice and fallback for kits Pallas refuses."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from benchmarks.lorenz import LORENZ, PAPER_BETA, lorenz_kit
from raytwin.models import TSIT5
from raytwin.sim import BATTERY_ECM, THERMAL_RC
from sweeps import engine
from sweeps.engine import Bases, chunk_metrics, kernel_for
from sweeps.fused import FusedKernelUnsupported, triton_lowering
from raytwin.signals import RandomLevels
from sweeps.kits import Kit, kit_for
from sweeps.space import Dimension

THERMAL_STEPS = 240  # 4 h at 60 s
N = 300  # 2 blocks of 256 scenarios: the second one padded


def both(kit, bases, dims, rows, step_s, n_steps, dtype="float32"):
    """(XLA, fused) metrics of the same chunk."""
    run = lambda kernel: chunk_metrics(kit, bases, dims, rows, step_s, n_steps, len(rows), dtype,  # noqa: E731
                                       kernel=kernel)
    return run("xla"), run("pallas")


def assert_same_within_rounding(xla, fused, rtol=2e-6, counts=()):
    """Continuous metrics within float32 rounding of the XLA path; durations within one step."""
    assert xla.keys() == fused.keys()
    np.testing.assert_array_equal(fused[engine.DIVERGED], xla[engine.DIVERGED])
    for name, ref in xla.items():
        if name == engine.DIVERGED:
            continue
        tol = counts[name] if name in counts else None
        if tol is not None:
            np.testing.assert_allclose(fused[name], ref, rtol=0, atol=tol, err_msg=name)
        else:
            scale = np.nanmax(np.abs(ref))
            np.testing.assert_allclose(fused[name], ref, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.fixture(scope="module")
def thermal():
    kit = kit_for(THERMAL_RC).compile(THERMAL_STEPS * 60.0)
    bases = Bases(dict(kit.start_state), THERMAL_RC.default_params(), kit.default_inputs())
    dims = [Dimension(name="C_in", target="param", mode="scale", low=0.7, high=1.3),
            Dimension(name="T_out_mean", target="input", low=263.15, high=283.15)]
    rng = np.random.default_rng(3)
    rows = np.column_stack([rng.uniform(0.7, 1.3, N), rng.uniform(263.15, 283.15, N)])
    return kit, bases, dims, rows


def test_thermal_sweep_fused_equals_xla_within_float32_rounding(thermal):
    xla, fused = both(*thermal, 60.0, THERMAL_STEPS)
    assert not xla[engine.DIVERGED].any() and np.ptp(xla["energy_kwh"]) > 1.0  # a real spread of scenarios
    assert_same_within_rounding(xla, fused, counts={"discomfort_s": 60.0})


def test_thermal_sweep_fused_in_float64_agrees_to_float64_rounding(thermal):
    kit, bases, dims, rows = thermal
    xla, fused = both(kit, bases, dims, rows[:40], 60.0, THERMAL_STEPS, "float64")
    assert_same_within_rounding(xla, fused, rtol=1e-12, counts={"discomfort_s": 60.0})


def test_divergence_is_flagged_the_same_way_in_the_fused_kernel(thermal):
    """Admissible but unstable parameters at 60 s (tests/test_sweep_kits.py): NaN metrics, flagged."""
    kit, bases, _, _ = thermal
    dims = [Dimension(name="C_in", target="param", values=[1e5, 2e6]),
            Dimension(name="R_im", target="param", values=[2e-4, 2e-3])]
    xla, fused = both(kit, bases, dims, np.array([[1e5, 2e-4], [2e6, 2e-3]]), 60.0, THERMAL_STEPS)
    assert fused[engine.DIVERGED].tolist() == [True, False]
    assert all(math.isnan(fused[m][0]) and math.isfinite(fused[m][1]) for m in kit.metric_names)
    assert_same_within_rounding(xla, fused, counts={"discomfort_s": 60.0})


def test_battery_sweep_with_compensated_soc_fused_equals_xla():
    """The battery's state of charge is Kahan-summed in float32: the kernel carries the same error terms."""
    kit = kit_for(BATTERY_ECM).compile(600.0)
    bases = Bases(dict(kit.start_state), BATTERY_ECM.default_params(), kit.default_inputs())
    dims = [Dimension(name="current_a", target="input", low=1.0, high=7.5)]
    xla, fused = both(kit, bases, dims, np.linspace(1.0, 7.5, 20)[:, None], 1.0, 600)
    assert_same_within_rounding(xla, fused, counts={"undervoltage_s": 1.0})
    np.testing.assert_allclose(fused["soc_min"], xla["soc_min"], rtol=0, atol=2e-7)  # ~1 ulp at soc 0.9


@pytest.mark.parametrize("solver", [None, TSIT5], ids=["rk4", "tsit5"])
def test_lorenz_ensemble_of_the_paper_fused_equals_xla_and_the_exact_solution(solver):
    """bench_lorenz_gpu.jl's problem: u0 (1, 0, 0), beta 2.666, rho = range(0, 21) per trajectory,
    dt 0.001 over [0, 1], float32, end state only."""
    model = LORENZ if solver is None else dataclasses.replace(LORENZ, solver=solver)
    kit = lorenz_kit(model).compile(1.0)
    bases = Bases({"x": 1.0, "y": 0.0, "z": 0.0}, {**LORENZ.default_params(), "beta": PAPER_BETA}, {})
    dims = [Dimension(name="rho", target="param", values=[0.0])]
    rho = np.linspace(0.0, 21.0, 64)
    xla, fused = both(kit, bases, dims, rho[:, None], 0.001, 1000)
    assert_same_within_rounding(xla, fused, rtol=2e-5)  # 1,000 float32 steps; |state| up to ~20

    def rhs(t, u, r):  # from the equations
        return [10.0 * (u[1] - u[0]), r * u[0] - u[1] - u[0] * u[2], u[0] * u[1] - PAPER_BETA * u[2]]

    for i in (0, 31, 63):
        exact = solve_ivp(rhs, (0.0, 1.0), [1.0, 0.0, 0.0], method="DOP853", rtol=1e-12, atol=1e-12,
                          args=(rho[i],)).y[:, -1]
        got = [fused[f"{n}_final"][i] for n in "xyz"]
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-4 * max(1.0, np.abs(exact).max()))


def test_the_engine_chooses_pallas_on_gpus_only_and_refuses_unknown_kernels(thermal):
    kit, bases, dims, rows = thermal
    x0, *_ = engine.scenario_arrays(kit, bases, dims, rows[:2], "float32")
    assert kernel_for(x0[0]) == ("pallas" if x0[0].devices().pop().platform == "gpu" else "xla")
    assert engine.KERNELS == {"gpu": "pallas"}
    with pytest.raises(ValueError, match="kernel must be 'auto', 'xla' or 'pallas'"):
        kernel_for(x0[0], "triton")


def test_a_kit_pallas_refuses_runs_on_xla_under_auto_and_fails_clearly_when_pallas_is_forced(
        thermal, monkeypatch, caplog):
    """Random signals are tables captured by the kit's functions: Pallas refuses captured arrays."""
    _, bases, dims, rows = thermal
    declared = kit_for(THERMAL_RC)
    kit = dataclasses.replace(declared, inputs={**declared.inputs, "Q_sol": RandomLevels(low=0.0, high=800.0,
                                                                                           hold_s=3600.0)})
    compiled = Kit.compile(kit, THERMAL_STEPS * 60.0)
    with caplog.at_level(logging.WARNING, logger="raytwin.sweeps"), \
            pytest.raises(FusedKernelUnsupported, match="captures constants.*use kernel='xla'"):
        chunk_metrics(compiled, bases, dims, rows[:8], 60.0, THERMAL_STEPS, 8, "float32", kernel="pallas")
    assert "event=fused_kernel_fallback model=thermal_rc" in caplog.text
    monkeypatch.setitem(engine.KERNELS, "cpu", "pallas")  # as on a GPU: auto picks the fused kernel
    auto = chunk_metrics(compiled, bases, dims, rows[:8], 60.0, THERMAL_STEPS, 8, "float32")
    xla = chunk_metrics(compiled, bases, dims, rows[:8], 60.0, THERMAL_STEPS, 8, "float32", kernel="xla")
    for name in xla:
        np.testing.assert_array_equal(auto[name], xla[name])


@pytest.mark.parametrize("model", ["thermal_rc", "battery_ecm", "lorenz_tsit5"])
def test_the_kernel_lowers_to_one_triton_kernel_for_cuda_without_a_gpu(model):
    """JAX lowers across platforms: Pallas' Triton lowering accepts each kit here, on a CPU-only machine,
    as one Triton custom call with the whole horizon in one loop (an scf.for over the steps)."""
    if model == "lorenz_tsit5":
        kit = lorenz_kit(dataclasses.replace(LORENZ, solver=TSIT5)).compile(1.0)
        bases = Bases({"x": 1.0, "y": 0.0, "z": 0.0}, LORENZ.default_params(), {})
        dims = [Dimension(name="rho", target="param", values=[0.0])]
    else:
        simulator = THERMAL_RC if model == "thermal_rc" else BATTERY_ECM
        kit = kit_for(simulator).compile(3600.0)
        bases = Bases(dict(kit.start_state), simulator.default_params(), kit.default_inputs())
        dims = [Dimension(name=simulator.params[0].name, target="param", mode="scale", values=[1.0])]
    x0, params, ip = engine.scenario_arrays(kit, bases, dims, np.linspace(0.5, 1.0, 512)[:, None], "float32")
    text = triton_lowering(kit, 60, x0, params, ip, np.float32(1.0))
    assert text.count("__gpu$xla.gpu.triton") == 1 and "grid_x = 2" in text and "num_warps = 4" in text
    assert "scf" in text and "while" not in text  # the steps are a loop inside the kernel, not an XLA loop
