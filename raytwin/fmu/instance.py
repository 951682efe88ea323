"""Run scenarios on one FMU instance, instantiated once per process and reset between runs.

Instantiating an FMU extracts its archive, loads its shared library and allocates the model:
milliseconds to seconds, against microseconds for a reset. `cached_instance` keeps one instance
per (FMU hash, interface) in each worker process, so a sweep pays for it once per worker.

Co-simulation is driven here step by step (inputs held over each communication step, outputs
read after every step); model exchange runs through `fmpy.simulate_fmu` with CVode on the same
instance, inputs held piecewise constant the same way.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raytwin.fmu.describe import INTERFACES, FmuCacheFull, FmuError, FmuModel

log = logging.getLogger("raytwin.fmu")

ME_RELATIVE_TOLERANCE = 1e-8
"""CVode's relative tolerance for model exchange: well below what a twin or a sweep resolves."""

INSTANTIATIONS: Counter[str] = Counter()
"""How many FMU instances this process created, per FMU hash (the reuse is observable)."""


@dataclass(frozen=True)
class FmuScenario:
    """One run: `n_steps` steps of `dt` (the FMU's default when None) from `start_time`.

    `start` sets start values (states, by name), `params` parameters, and `inputs` one value per
    step per input (held over the step); anything not given keeps the FMU's own start value.
    """

    n_steps: int
    dt: float | None = None
    start: Mapping[str, float] = field(default_factory=dict)
    params: Mapping[str, float] = field(default_factory=dict)
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    start_time: float | None = None

    def check(self, model: FmuModel) -> None:
        """Refuse names the FMU does not declare and input series of the wrong length or not finite."""
        if self.n_steps < 1:
            raise FmuError(f"scenario: n_steps must be >= 1, got {self.n_steps}")
        if self.dt is not None and not self.dt > 0:
            raise FmuError(f"scenario: dt must be > 0, got {self.dt}")
        for kind, given, known in (("state", self.start, model.state_names), ("parameter", self.params,
                                   model.param_names), ("input", self.inputs, model.input_names)):
            if not isinstance(given, Mapping):  # an (n_steps, n_inputs) array, as `simulate` takes, was unhashable
                raise FmuError(f"scenario: give {kind} values by name, {{name: value}} (an input: {{name: one value "
                               f"per step}}), not a {type(given).__name__}; {model.name}'s: {sorted(known)}")
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise FmuError(f"FMU {model.name} has no {kind}(s) {unknown}; known: {sorted(known)}")
        for kind, given in (("start value", self.start), ("parameter", self.params)):
            for name, value in given.items():  # the FMU would run it, and the run be reported as a divergence
                if not np.isfinite(value):
                    raise FmuError(f"scenario: {kind} {name} is {value}; {kind}s must be finite numbers")
        for name, series in self.inputs.items():
            if np.shape(series) != (self.n_steps,):
                raise FmuError(f"scenario: input {name} needs {self.n_steps} values, got shape {np.shape(series)}")
            bad = ~np.isfinite(np.asarray(series, dtype=np.float64))
            if bad.any():  # the FMU would pass it on, and the run would be reported as a divergence
                k = int(np.argmax(bad))
                raise FmuError(f"scenario: input {name} is {series[k]} at step {k}; inputs must be finite numbers")


def _check_platform(model: FmuModel, path: str) -> None:
    """Refuse an FMU without a binary for this machine before extracting it: fmpy's "Cannot find shared library"
    named a temporary folder, not the FMU, nor the platforms it was exported for."""
    from fmpy import platform, supported_platforms

    platforms = supported_platforms(path)
    if platform in platforms:
        return
    built = ", ".join(p for p in platforms if p != "c-code") or "none"
    sources = "; it ships its C sources: compile them for this platform (fmpy.util.compile_platform_binary)" \
        if "c-code" in platforms else ""
    raise FmuError(f"FMU {model.name} has no binary for this machine's platform {platform} (it has: {built}): "
                   f"export it again for {platform}{sources}")


class FmuInstance:
    """One instantiated FMU (co-simulation or model exchange) that runs scenarios one after another."""

    def __init__(self, model: FmuModel, interface: str = "CoSimulation"):
        from fmpy import instantiate_fmu, read_model_description

        if interface not in model.interfaces:
            raise FmuError(f"FMU {model.name} does not provide {interface}; it provides {list(model.interfaces)}")
        path = model.local_path()
        _check_platform(model, path)
        self.model = model
        self.interface = interface
        self.md = read_model_description(path, validate=False)
        self.unzipdir = _extracted(path, model.name)
        weakref.finalize(self, shutil.rmtree, self.unzipdir, True)  # also at exit: cached instances live long
        self.fmu = instantiate_fmu(self.unzipdir, self.md, fmi_type=interface)
        self.fmi3 = self.md.fmiVersion.startswith("3")
        self.vr = {v.name: v.valueReference for v in self.md.modelVariables}
        self.float32 = {v.name for v in self.md.modelVariables if v.type == "Float32"}  # FMI 3.0 only
        self._fresh = True
        INSTANTIATIONS[model.fmu_hash] += 1
        log.info("event=fmu_instantiated fmu=%s hash=%s interface=%s", model.name, model.fmu_hash[:12], interface)

    # ---- low-level access, shared with the stepper ------------------------------------------
    def set(self, values: Mapping[str, float]) -> None:
        """Set real variables, each through its type's call (FMI 3.0 has one per float width)."""
        for names, setter in self._by_width(tuple(values), "set"):
            setter([self.vr[n] for n in names], [float(values[n]) for n in names])

    def get(self, names: tuple[str, ...]) -> np.ndarray:
        """Real variables in the order of `names`, each read through its type's call."""
        out = np.empty(len(names), dtype=np.float64)
        index = {n: i for i, n in enumerate(names)}
        for group, getter in self._by_width(names, "get"):
            out[[index[n] for n in group]] = getter([self.vr[n] for n in group])
        return out

    def _by_width(self, names: tuple[str, ...], verb: str) -> list[tuple[list[str], Any]]:
        """`names` grouped by the FMI call that reads or writes them: getReal/setReal (FMI 2.0), or
        get/setFloat64 and get/setFloat32 (FMI 3.0: calling Float64 on a Float32 variable is an error)."""
        if not self.fmi3:
            return [(list(names), getattr(self.fmu, f"{verb}Real"))] if names else []
        wide = [n for n in names if n not in self.float32]
        narrow = [n for n in names if n in self.float32]
        return [(group, getattr(self.fmu, f"{verb}{width}")) for group, width in ((wide, "Float64"),
                                                                                  (narrow, "Float32")) if group]

    def _reset(self) -> None:
        if not self._fresh:
            self.fmu.reset()
        self._fresh = False

    def initialize(self, values: Mapping[str, float], start_time: float) -> None:
        """Reset, set start values and parameters, and initialise at `start_time` (co-simulation)."""
        self._reset()
        if self.fmi3:
            self.set(values)
            self.fmu.enterInitializationMode(startTime=start_time)
        else:
            self.fmu.setupExperiment(startTime=start_time)
            self.set(values)
            self.fmu.enterInitializationMode()
        self.fmu.exitInitializationMode()

    def do_step(self, t: float, dt: float) -> None:
        self.fmu.doStep(currentCommunicationPoint=t, communicationStepSize=dt)

    def recovered(self) -> FmuInstance:
        """This instance made usable after a failed call: reset (FMI 2.0 and 3.0 allow a reset after a
        discarded step or an error), or, where the reset fails too (fmi2Fatal), a new instance; the old one
        is dropped without freeing it, since FMI allows no call at all after a fatal error."""
        try:
            self.fmu.reset()
        except Exception as e:  # noqa: BLE001 - fmpy raises plain Exceptions for FMI errors
            log.warning("event=fmu_replaced fmu=%s reason=%r: its reset failed after a failed call", self.model.name, e)
            return FmuInstance(self.model, self.interface)
        self._fresh = True
        return self

    # ---- scenarios -----------------------------------------------------------------------------
    def run(self, scenario: FmuScenario, outputs: tuple[str, ...] | None = None) -> np.ndarray:
        """Values of `outputs` (default: the FMU's outputs) at ``t0 + k dt`` for k = 0..n_steps,
        shape ``(n_steps + 1, len(outputs))``: row k sees input k (the last row the last input,
        still held). A non-finite value or one outside a declared range raises `FmuError`."""
        scenario.check(self.model)
        names = outputs or self.model.output_names
        readable = {*self.model.output_names, *self.model.state_names}
        if unknown := sorted(set(names) - readable):
            raise FmuError(f"FMU {self.model.name} has no output or state {unknown}; known: {sorted(readable)}")
        dt = scenario.dt or self.model.default_dt
        t0 = self.model.start_time if scenario.start_time is None else scenario.start_time
        if self.interface == "CoSimulation":
            y = self._run_cs(scenario, names, dt, t0)
        else:
            y = self._run_me(scenario, names, dt, t0)
        self._check_range(y, names)
        return y

    def _check_range(self, y: np.ndarray, names: tuple[str, ...]) -> None:
        """A diverged run is an error, never a result: non-finite values, or values outside the
        plausible range the FMU declares (min/max) for a state or output."""
        declared = (*self.model.outputs, *self.model.states)  # a state can be an output too: both ranges hold
        for j, name in enumerate(names):
            lower = max((v.lower for v in declared if v.name == name), default=-np.inf)
            upper = min((v.upper for v in declared if v.name == name), default=np.inf)
            bad = ~(np.isfinite(y[:, j]) & (y[:, j] >= lower) & (y[:, j] <= upper))
            if bad.any():
                k = int(np.argmax(bad))
                raise FmuError(f"FMU {self.model.name}: {name} = {y[k, j]:g} at step {k} is non-finite or "
                               f"outside its range [{lower:g}, {upper:g}]: the run diverged")

    def _run_cs(self, scenario: FmuScenario, names: tuple[str, ...], dt: float, t0: float) -> np.ndarray:
        self.initialize({**scenario.start, **scenario.params}, t0)
        n = scenario.n_steps
        y = np.empty((n + 1, len(names)))
        series = {name: np.asarray(v, dtype=np.float64) for name, v in scenario.inputs.items()}
        for k in range(n):
            self.set({name: s[k] for name, s in series.items()})
            y[k] = self.get(names)
            self.do_step(t0 + k * dt, dt)
        y[n] = self.get(names)  # the last inputs still held
        return y

    def _run_me(self, scenario: FmuScenario, names: tuple[str, ...], dt: float, t0: float) -> np.ndarray:
        from fmpy import simulate_fmu

        self._reset()
        n = scenario.n_steps
        with contextlib.redirect_stdout(io.StringIO()):  # fmpy prints a line per unmapped input
            result = simulate_fmu(
                self.unzipdir, validate=False, start_time=t0, stop_time=t0 + n * dt, solver="CVode",
                relative_tolerance=ME_RELATIVE_TOLERANCE, output_interval=dt, record_events=False,
                start_values={**scenario.start, **scenario.params}, input=_held_signal(scenario, dt, t0),
                output=list(names), model_description=self.md, fmu_instance=self.fmu,
            )
        grid = t0 + dt * np.arange(n + 1)
        return np.column_stack([np.interp(grid, result["time"], result[name]) for name in names])

    def close(self) -> None:
        self.fmu.freeInstance()


def _held_signal(scenario: FmuScenario, dt: float, t0: float) -> np.ndarray | None:
    """fmpy's input table for inputs held over each step: every value at both ends of its step
    (a repeated time is a discontinuity for fmpy, so the solver never sees a ramp)."""
    if not scenario.inputs:
        return None
    n = scenario.n_steps
    times = t0 + dt * np.repeat(np.arange(n + 1), 2)[1:-1]
    table = np.zeros(2 * n, dtype=[("time", np.float64)] + [(k, np.float64) for k in scenario.inputs])
    table["time"] = times
    for name, series in scenario.inputs.items():
        table[name] = np.repeat(np.asarray(series, dtype=np.float64), 2)
    return table


def _extracted(path: str, name: str) -> str:
    """The FMU at `path` extracted into a new folder of the machine's temporary directory. A full disk there is
    `FmuCacheFull` naming the folder and how to make room (the operator's to fix, not the FMU's fault); a failed
    extraction leaves no half-extracted folder behind, which would fill that disk further."""
    from fmpy import extract

    unzipdir = None
    try:
        unzipdir = tempfile.mkdtemp(prefix="raytwin-fmu-")
        return str(extract(path, unzipdir=unzipdir))
    except BaseException as exc:
        if unzipdir is not None:
            shutil.rmtree(unzipdir, ignore_errors=True)
        if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise FmuCacheFull(exc.errno, f"no space left in {tempfile.gettempdir()} to extract FMU {name} ({path}): "
                                      "free space there, or set TMPDIR to a directory with room (FMUs are extracted "
                                      "into $TMPDIR)") from exc


_CACHE: dict[tuple[str, str], FmuInstance] = {}


def cached_instance(model: FmuModel, interface: str = "CoSimulation") -> FmuInstance:
    """This process's instance of `model` (created on first use, reused afterwards)."""
    if interface not in INTERFACES:
        raise FmuError(f"unknown FMU interface {interface!r}; known: {list(INTERFACES)}")
    key = (model.fmu_hash, interface)
    if key not in _CACHE:
        _CACHE[key] = FmuInstance(model, interface)
    return _CACHE[key]


def discard_instance(model: FmuModel, interface: str) -> None:
    """Drop this process's instance after a failed run: its internal state is not to be trusted."""
    instance = _CACHE.pop((model.fmu_hash, interface), None)
    if instance is not None:
        try:
            instance.close()
        except Exception:  # noqa: BLE001 - an FMU that failed may also fail to free; drop it anyway
            log.warning("event=fmu_free_failed fmu=%s", model.name)
