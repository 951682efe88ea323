"""FMU sweeps and calibration on CPU Ray workers, one FMU instance per worker process.

A sweep splits its scenarios into chunks, one Ray task per chunk (1 CPU each); every task runs
its chunk on its process's cached instance (`cached_instance`), so instantiation is paid once
per worker, not per scenario. A scenario whose run fails (the FMU reports an error, an output
turns non-finite) is reported with its reason and no result; its instance is discarded and the
next scenario gets a fresh one. A worker that cannot get the FMU at all (its disk full, the store down:
`OPERATOR_FAULTS`) fails the sweep, or the calibration, with that error: it is no scenario's fault.

Calibration is gradient-free: Ray Tune's default search draws start points in the parameter box
and each trial runs a bounded Nelder-Mead (scipy) from its start on the trial's own cached
instance; the best trial wins.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from raytwin.cpu_priority import batch_worker, yield_to_live
from raytwin.fmu.describe import OPERATOR_FAULTS, FmuError, FmuModel
from raytwin.fmu.instance import INSTANTIATIONS, FmuScenario, cached_instance, discard_instance
from raytwin.provenance import compute_platform
from raytwin.ray_connect import cancel_tasks
from raytwin.tune_output import fit_quietly

log = logging.getLogger("raytwin.fmu")

METRICS = ("final", "min", "max", "mean")
"""Per-output summary of every scenario a sweep returns (NaN for a failed scenario)."""


@dataclass(frozen=True)
class FmuSweepResult:
    """Per scenario, in input order: outputs (when kept), error (None when it ran) and metrics."""

    output_names: tuple[str, ...]
    outputs: list[np.ndarray | None]
    errors: list[str | None]
    metrics: dict[str, np.ndarray]  # "<output>_<metric>" -> one value per scenario
    instantiations: dict[int, int]  # worker pid -> instances it created for this FMU (all time)
    platforms: list[str]  # the binaries' platforms the chunks ran (`raytwin.provenance.compute_platform`)

    @property
    def failed(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is not None]


def run_scenarios(model: FmuModel, scenarios: Sequence[FmuScenario], interface: str = "CoSimulation",
                  outputs: tuple[str, ...] | None = None) -> list[tuple[np.ndarray | None, str | None]]:
    """Run `scenarios` in this process on its cached instance: (outputs, None) or (None, reason)."""
    results: list[tuple[np.ndarray | None, str | None]] = []
    for i, scenario in enumerate(scenarios):
        try:
            results.append((cached_instance(model, interface).run(scenario, outputs), None))
        except OPERATOR_FAULTS:
            raise
        except Exception as e:  # noqa: BLE001 - fmpy raises plain Exceptions for FMI errors
            discard_instance(model, interface)
            log.warning("event=fmu_scenario_failed fmu=%s scenario=%d reason=%s", model.name, i, e)
            results.append((None, f"{type(e).__name__}: {e}"))
    return results


def _chunk(model: FmuModel, scenarios: list[FmuScenario], interface: str, outputs: tuple[str, ...],
           keep_outputs: bool) -> tuple[int, int, list, np.ndarray, str]:
    """One task: a chunk on this worker's instance -> (pid, its instantiations, results, metrics, platform)."""
    yield_to_live()  # a batch worker (`_chunk_remote`): twin shards on its node go first
    results = run_scenarios(model, scenarios, interface, outputs)
    metrics = np.full((len(results), len(outputs) * len(METRICS)), np.nan)
    for i, (y, _) in enumerate(results):
        if y is not None:
            metrics[i] = np.concatenate([y[-1], y.min(axis=0), y.max(axis=0), y.mean(axis=0)])
    kept = results if keep_outputs else [(None, e) for _, e in results]
    return os.getpid(), INSTANTIATIONS[model.fmu_hash], kept, metrics, compute_platform("fmu")


@functools.cache
def _chunk_remote():
    """`_chunk` as a Ray task. The plain function keeps its module-level name so Ray ships it by
    reference: pickled by value, it would carry a copy of the instance cache into every task and
    instantiate the FMU each time. (Ray is imported here: describing an FMU does not need it.)"""
    import ray

    return ray.remote(**batch_worker({"num_cpus": 1}))(_chunk)


def run_fmu_sweep(model: FmuModel, scenarios: Sequence[FmuScenario], *, chunk_size: int = 16,
                  interface: str = "CoSimulation", outputs: tuple[str, ...] | None = None,
                  keep_outputs: bool = True) -> FmuSweepResult:
    """Run `scenarios` on Ray CPU tasks, `chunk_size` scenarios per task."""
    import ray

    if chunk_size < 1:
        raise FmuError(f"chunk_size must be >= 1, got {chunk_size}")
    for scenario in scenarios:
        scenario.check(model)
    names = outputs or model.output_names
    model_ref = ray.put(model)
    chunks = [list(scenarios[i:i + chunk_size]) for i in range(0, len(scenarios), chunk_size)]
    refs = [_chunk_remote().remote(model_ref, c, interface, names, keep_outputs) for c in chunks]
    try:
        done = ray.get(refs)
    except BaseException:  # Ctrl-C, SIGTERM (`sweeps.runner.RunTerminated`) or a failed task: stop the others
        cancel_tasks(refs)
        raise
    per_worker: dict[int, int] = {}
    outs, errors, metrics, platforms = [], [], [], set()
    for pid, count, results, m, platform in done:
        per_worker[pid] = max(per_worker.get(pid, 0), count)
        platforms.add(platform)
        outs += [y for y, _ in results]
        errors += [e for _, e in results]
        metrics.append(m)
    table = np.concatenate(metrics) if metrics else np.empty((0, len(names) * len(METRICS)))
    columns = [f"{n}_{m}" for m in METRICS for n in names]
    log.info("event=fmu_sweep fmu=%s scenarios=%d failed=%d workers=%d", model.name, len(scenarios),
             sum(e is not None for e in errors), len(per_worker))
    return FmuSweepResult(names, outs, errors, {c: table[:, j] for j, c in enumerate(columns)}, per_worker,
                          sorted(platforms))


# ---- calibration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FmuCalibration:
    params: dict[str, float]
    loss: float  # mean squared residual over the observed outputs at the best parameters
    trials: int
    evaluations: int
    platforms: list[str]  # the binaries' platforms its finished trials ran (`raytwin.provenance.compute_platform`)


def _loss(model: FmuModel, scenario: FmuScenario, observed: Mapping[str, np.ndarray], interface: str,
          values: dict[str, float]) -> float:
    run = FmuScenario(scenario.n_steps, scenario.dt, scenario.start, {**scenario.params, **values},
                      scenario.inputs, scenario.start_time)
    names = tuple(observed)
    try:
        y = cached_instance(model, interface).run(run, names)
    except OPERATOR_FAULTS:
        raise
    except Exception:  # noqa: BLE001 - a failing parameter set is a bad fit, not a failed search
        discard_instance(model, interface)
        return float("inf")
    return float(np.mean([(y[:, j] - observed[n]) ** 2 for j, n in enumerate(names)]))


def _trial(config: dict[str, float], model: FmuModel, scenario: FmuScenario, observed: dict[str, np.ndarray],
           bounds: dict[str, tuple[float, float]], interface: str, max_evaluations: int) -> None:
    from ray import tune
    from scipy.optimize import minimize

    yield_to_live(dedicated=True)  # a trial's actor runs trials alone: the twin shards beside it go first
    names = list(bounds)
    fit = minimize(lambda v: _loss(model, scenario, observed, interface, dict(zip(names, map(float, v)))),
                   [config[n] for n in names], method="Nelder-Mead", bounds=[bounds[n] for n in names],
                   options={"maxfev": max_evaluations, "xatol": 1e-6, "fatol": 1e-12})
    tune.report({"loss": float(fit.fun), "evaluations": int(fit.nfev), "platform": compute_platform("fmu"),
                 **{n: float(v) for n, v in zip(names, fit.x)}})


def calibrate_fmu(model: FmuModel, scenario: FmuScenario, observed: Mapping[str, np.ndarray],
                  bounds: Mapping[str, tuple[float, float]], *, num_samples: int = 4, seed: int = 0,
                  interface: str = "CoSimulation", max_evaluations: int = 200) -> FmuCalibration:
    """Fit the parameters named in `bounds` so that `scenario`'s outputs match `observed`
    (output name -> ``n_steps + 1`` values, start included)."""
    import tempfile

    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    unknown = sorted(set(bounds) - set(model.param_names))
    if unknown:
        raise FmuError(f"FMU {model.name} has no parameter(s) {unknown}; known: {sorted(model.param_names)}")
    for name, series in observed.items():
        if name not in model.output_names and name not in model.state_names:
            raise FmuError(f"FMU {model.name} has no output {name}; known: {sorted(model.output_names)}")
        if np.shape(series) != (scenario.n_steps + 1,):
            raise FmuError(f"observed {name} needs {scenario.n_steps + 1} values, got shape {np.shape(series)}")
    scenario.check(model)
    trainable = tune.with_parameters(_trial, model=model, scenario=scenario,
                                     observed={n: np.asarray(v, float) for n, v in observed.items()},
                                     bounds=dict(bounds), interface=interface, max_evaluations=max_evaluations)
    with tempfile.TemporaryDirectory(prefix="raytwin-fmu-tune-") as storage:
        grid = fit_quietly(tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={n: tune.uniform(lo, hi) for n, (lo, hi) in bounds.items()},
            tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=num_samples,
                                        search_alg=BasicVariantGenerator(random_state=seed), reuse_actors=True),
            run_config=tune.RunConfig(storage_path=storage, name="fmu-calibration", verbose=0),
        ), log)
    finished = [r for r in grid if r.error is None and r.metrics and "loss" in r.metrics]
    if not finished:
        raise FmuError(f"no calibration trial finished; errors: {[str(r.error) for r in grid][:3]}")
    best = min(finished, key=lambda r: r.metrics["loss"])
    result = FmuCalibration({n: float(best.metrics[n]) for n in bounds}, float(best.metrics["loss"]), len(grid),
                            sum(int(r.metrics["evaluations"]) for r in finished),
                            sorted({str(r.metrics["platform"]) for r in finished}))
    log.info("event=fmu_calibrated fmu=%s loss=%.3g trials=%d evaluations=%d", model.name, result.loss,
             result.trials, result.evaluations)
    return result
