"""Describe an FMU in RayTwin's vocabulary and keep its file content-hashed.

`FmuModel.load` reads ``modelDescription.xml`` (through `fmpy.read_model_description`) and maps
the real-valued variables onto the same declarations as a JAX model (`raytwin.sim.model`):

- continuous states (the variables some ``der(...)`` is the derivative of) -> `State`, start value
  as ``nominal``;
- ``causality="input"`` -> `Input`; ``causality="output"`` -> `Output` (a state can be both);
- ``causality="parameter"`` with a start value -> `Param` (start as default, min/max as bounds).

Units go through `raytwin.units`: an FMU unit RayTwin does not know is refused with the variable's
name, so no value is ever exchanged in a unit nobody checked. Values are exchanged with the FMU in
its declared units. Integer, boolean and string variables are not mapped.

The FMU file is identified by its SHA-256 (`FmuModel.fmu_hash`): `store_fmu` copies it under that
hash, and every process that opens it verifies the hash first, so a run record naming the hash
names exactly the binary that ran.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from raytwin import units
from raytwin.modelcode import ModelCode, file_code
from raytwin.sim.model import Declared, Input, ModelCheckError, Output, Param, State
from raytwin.storage import filesystem, read_chunks
from raytwin.store_failures import StoreIOError, store_io

REAL_TYPES = ("Real", "Float64", "Float32")
"""FMI 2.0 and 3.0 names of the variable types RayTwin maps."""

FMI_VERSIONS = ("2.", "3.")
"""The FMI versions RayTwin runs (`fmiVersion` prefixes): an FMI 1.0 FMU has no ModelStructure to name its states,
and its instances' calls are FMI 1.0's."""

INTERFACES = ("CoSimulation", "ModelExchange")
PROBE_STEPS = 10
"""Steps of the registration probe run (`FmuModel.check_registration`)."""
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")

if TYPE_CHECKING:
    from raytwin.ukf import Dynamics


class FmuError(ValueError):
    """An FMU RayTwin cannot use as asked (unknown unit, wrong hash, unknown variable, failed run)."""


class FmuCacheFull(OSError):
    """The local disk holding the FMU cache or an FMU's extraction (the machine's temporary directory) is full:
    neither the store's outage (it answered) nor a fault of the FMU; its message names the folder and how to make
    room."""


OPERATOR_FAULTS = (FmuCacheFull, StoreIOError)
"""Failures to get an FMU onto this machine (its disk full, the store down): the operator's to fix, raised as they
are where a failed run is recorded as the FMU's or its inputs' (a probe run, a scenario, a calibration's trial)."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fmu_unit(unit: str | None) -> str:
    """RayTwin's spelling of an FMU unit: none or Modelica's ``"1"`` is dimensionless (``-``), and
    Modelica's exponents, signed or not (``m/s2``, ``m.s-2``, ``s-1``), are written with a caret
    (``m/s^2``, ``m.s^-2``, ``s^-1``); nothing else is rewritten."""
    if unit in (None, "", "1"):
        return "-"
    return re.sub(r"(?<=[^\W\d_])([+-]?\d+)", lambda m: "^" + m.group(1).lstrip("+"), unit)


def _float(text: str | None, default: float) -> float:
    return default if text is None else float(text)


@dataclass(frozen=True)
class FmuModel(Declared):
    """An FMU's identity (where it is, its SHA-256) and its variables as RayTwin declarations."""

    url: str
    fmu_hash: str
    name: str
    fmi_version: str
    interfaces: tuple[str, ...]
    states: tuple[State, ...]
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    outputs: tuple[Output, ...]
    default_dt: float
    start_time: float
    can_get_set_state: bool
    description: str = ""
    version: str = "1.0.0"  # the FMU's own model version when it is a semantic version

    filters: ClassVar[tuple[str, ...]] = ("ukf",)
    """Twin filters that can run an FMU: derivative-free only (a black box has no ``jacfwd`` for
    the EKF); the first is the default (`raytwin.sim.model.Model.filters`)."""

    @classmethod
    def load(cls, url: str | os.PathLike, *, expected_hash: str | None = None) -> FmuModel:
        """Read an FMU (a local path or fsspec URL); `expected_hash` refuses any other file."""
        from fmpy import read_model_description

        url = str(url)
        path = _local_copy(url, expected_hash)
        where = f"FMU {Path(url).name}"
        try:
            md = read_model_description(path, validate=False)
        except zipfile.BadZipFile:
            raise FmuError(f"{where}: not an FMU: {url} is not a zip archive (an FMU is a zip of "
                           "modelDescription.xml and binaries)") from None
        except KeyError:  # zipfile's "There is no item named 'modelDescription.xml' in the archive"
            raise FmuError(f"{where}: not an FMU: {url} has no modelDescription.xml at the root of its zip "
                           "archive") from None
        except (ValueError, TypeError, AttributeError, SyntaxError) as exc:  # fmpy on a malformed description
            raise FmuError(f"{where}: its modelDescription.xml cannot be read ({type(exc).__name__}: {exc}); "
                           "export the FMU again") from None
        if not md.fmiVersion.startswith(FMI_VERSIONS):  # FMI 1.0 declares no states; instances call FMI 2/3
            raise FmuError(f"{where}: FMI {md.fmiVersion} is not supported: RayTwin runs FMI 2.0 and 3.0 FMUs; "
                           "export it again as FMI 2.0 or 3.0")
        states, inputs, params, outputs = [], [], [], []
        state_names = {d.variable.derivative.name for d in md.derivatives if d.variable.derivative is not None}
        for v in md.modelVariables:
            if v.type not in REAL_TYPES:
                continue
            mapped = v.name in state_names or v.causality in ("input", "output") or (
                v.causality == "parameter" and v.start is not None)
            if not mapped:
                continue
            if getattr(v, "dimensions", None):
                raise FmuError(f"{where}: variable {v.name} is an array (FMI 3.0 dimensions); RayTwin maps "
                               "scalar variables only")
            unit = fmu_unit(v.unit or (v.declaredType.unit if v.declaredType is not None else None))
            try:
                units.unit_def(unit)
            except units.UnitError as e:
                raise FmuError(f"{where}: variable {v.name}: unit {unit!r} is unknown to RayTwin ({e}); "
                               "define its symbols with raytwin.units.define before loading the FMU") from None
            lower, upper = _float(v.min, -math.inf), _float(v.max, math.inf)
            start = None if v.start is None else float(v.start)
            text = v.description or ""
            try:
                if v.name in state_names:
                    states.append(State(v.name, unit, text, lower, upper, nominal=start))
                if v.causality == "input":
                    inputs.append(Input(v.name, unit, text, lower, upper, nominal=start))
                elif v.causality == "output":
                    outputs.append(Output(v.name, unit, text, lower, upper))
                elif v.causality == "parameter":
                    params.append(Param(v.name, unit, start, lower, upper, text))
            except ValueError as e:
                raise FmuError(f"{where}: {e}") from None
        if not states and not outputs:  # nothing to simulate, track or sweep: every run would fail later
            kinds = sorted({v.type for v in md.modelVariables if v.causality in ("output", "local")} - set(REAL_TYPES))
            raise FmuError(f"{where}: no real-valued state or output RayTwin can use (it maps Real/Float64/Float32 "
                           f"variables only{'; this FMU has ' + ', '.join(kinds) + ' ones' if kinds else ''})")
        interfaces = tuple(i for i, d in zip(INTERFACES, (md.coSimulation, md.modelExchange)) if d is not None)
        if not interfaces:
            raise FmuError(f"{where}: neither co-simulation nor model exchange is provided")
        capable = [d for d in (md.coSimulation, md.modelExchange) if d is not None]
        experiment = md.defaultExperiment
        default_dt = _float(experiment.stepSize if experiment else None, 1.0)
        if not (math.isfinite(default_dt) and default_dt > 0):  # every run would fail in fmi2DoStep
            raise FmuError(f"{where}: DefaultExperiment stepSize {default_dt:g} must be a finite number of seconds "
                           "> 0; fix it in the FMU's modelDescription.xml")
        return cls(
            url=url, fmu_hash=sha256_file(path), name=md.modelName, fmi_version=md.fmiVersion,
            interfaces=interfaces, states=tuple(states), inputs=tuple(inputs), params=tuple(params),
            outputs=tuple(outputs), default_dt=default_dt,
            start_time=_float(experiment.startTime if experiment else None, 0.0),
            can_get_set_state=all(bool(d.canGetAndSetFMUstate) for d in capable),
            description=md.description or "",
            version=md.version if md.version and _SEMVER.match(md.version) else "1.0.0",
        )

    def declare(self, **variables: Mapping[str, float]) -> FmuModel:
        """A copy with declaration fields an FMU does not carry, per variable name: a filter's noise
        (``x0={"prior_std": 0.1, "process_std": 0.01, "measurement_std": 0.02}``), a plausible
        range (``lower``/``upper``) or an input's ``nominal``, a parameter's bounds (``mu={"lower":
        0.1, "upper": 5.0}``: an asset type needs finite ones). A field applies to every declaration
        of that name that has it (a state that is also an output takes both kinds)."""
        groups = {"states": self.states, "inputs": self.inputs, "outputs": self.outputs, "params": self.params}
        for name, fields in variables.items():
            matching = [v for g in groups.values() for v in g if v.name == name]
            if not matching:
                raise FmuError(f"FMU {self.name} has no state, input, output or parameter {name!r}")
            for key in fields:
                if not any(hasattr(v, key) for v in matching):
                    raise FmuError(f"FMU {self.name}: {name} has no field {key!r}")
        try:
            updated = {
                group: tuple(dataclasses.replace(v, **{k: x for k, x in variables.get(v.name, {}).items()
                                                       if hasattr(v, k)}) for v in members)
                for group, members in groups.items()
            }
        except ValueError as e:
            raise FmuError(f"FMU {self.name}: {e}") from None
        return dataclasses.replace(self, **updated)

    def code_identity(self) -> ModelCode:
        """What the registry pins for this model (`raytwin.modelcode`): the FMU file's SHA-256."""
        return file_code(self.local_path())

    @property
    def ref(self) -> str:
        """How an `AssetType` names this FMU as its simulator: the URL of its stored copy,
        ``<store>/fmus/<sha256>.fmu`` (`store_fmu`), which any worker can fetch and verify."""
        if Path(self.url).name != f"{self.fmu_hash}.fmu":
            raise FmuError(f"FMU {self.name} at {self.url} is not in an FMU store; store it first "
                           "(raytwin.fmu.store_fmu(path, registry_url)) and use the model it returns")
        return self.url

    def project(self, x: tuple) -> tuple:
        """States stay as the FMU computed them (a filter's hook for a physical domain)."""
        return x

    def check_registration(self, params: Sequence[float], *, allow_unstable: bool = False) -> None:
        """What the registry runs before storing an artifact of this FMU: a probe run of
        `PROBE_STEPS` default steps at `params` must finish with finite values inside the declared
        ranges (`allow_unstable` has no meaning here: the FMU integrates itself)."""
        from raytwin.fmu.instance import FmuScenario, cached_instance, discard_instance

        scenario = FmuScenario(PROBE_STEPS, params=dict(zip(self.param_names, map(float, params))))
        try:
            cached_instance(self, self.interfaces[0]).run(scenario, (*self.state_names, *self.output_names))
        except OPERATOR_FAULTS:
            raise
        except Exception as e:  # noqa: BLE001 - fmpy raises plain Exceptions for FMI errors
            discard_instance(self, self.interfaces[0])
            raise ModelCheckError(self.name, "probe run", f"{PROBE_STEPS} steps of {self.default_dt:g} s at "
                                  f"{scenario.params} failed: {e}") from None

    def filter_dynamics(self) -> Dynamics:
        """How a derivative-free filter steps this FMU (`raytwin.fmu.stepper.fmu_dynamics`)."""
        from raytwin.fmu.stepper import fmu_dynamics

        return fmu_dynamics(self)

    def local_path(self) -> str:
        """A local file with exactly this FMU (downloaded once per machine for a remote URL)."""
        return _local_copy(self.url, self.fmu_hash)


def _local_copy(url: str, expected_hash: str | None) -> str:
    """`url` as a local file whose SHA-256 is `expected_hash` (when given): fmpy needs a local file.

    A remote FMU is downloaded once per machine into ``<tmp>/raytwin-fmu/<sha256>.fmu`` (renamed
    into place, so workers starting together never read a half-written file)."""
    if "://" in url and not url.startswith("file://"):
        cache = Path(tempfile.gettempdir()) / "raytwin-fmu"
        local = str(cache / f"{expected_hash}.fmu")
        if not (expected_hash and os.path.isfile(local)):
            local = _download(url, cache)
    else:
        local = url.removeprefix("file://")
        if not os.path.isfile(local):
            raise FmuError(f"no FMU file at {url}")
    if expected_hash is not None and (actual := sha256_file(local)) != expected_hash:
        raise FmuError(f"FMU {url} has SHA-256 {actual}, expected {expected_hash}: the file changed")
    return local


def _download(url: str, cache: Path) -> str:
    """`url` downloaded into the folder `cache` as ``<sha256>.fmu``: its path. The store's failures raise as
    `StoreIOError`; the local disk's own filling up is no store outage (`FmuCacheFull`, naming the folder); a
    failed download leaves no partial file behind."""
    fs, path = filesystem(url)
    part = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=cache, suffix=".part")
        with os.fdopen(fd, "wb") as f, closing(read_chunks(fs, path)) as chunks:
            for chunk in chunks:  # read from the store, written to the local disk
                f.write(chunk)
        local = str(cache / f"{sha256_file(part)}.fmu")
        os.replace(part, local)
        return local
    except OSError as exc:
        if part is not None:
            with suppress(FileNotFoundError):
                os.unlink(part)
        if isinstance(exc, StoreIOError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise FmuCacheFull(exc.errno, f"no space left in {cache} to download FMU {url}: free space there, or set "
                                      "TMPDIR to a directory with room (the FMU cache is $TMPDIR/raytwin-fmu)") from exc


def store_fmu(path: str | os.PathLike, url: str) -> FmuModel:
    """Copy an FMU into `url` (a directory or fsspec URL) as ``fmus/<sha256>.fmu`` and describe it.

    Storing the same file twice is a no-op; the returned model points at the stored copy.
    """
    digest = sha256_file(path)
    fs, root = filesystem(url)
    target = f"{root}/fmus/{digest}.fmu"
    with store_io("write"):
        if not fs.exists(target):
            fs.makedirs(f"{root}/fmus", exist_ok=True)
            fs.put_file(str(path), target)
    stored = target if "://" not in url else f"{url.rstrip('/')}/fmus/{digest}.fmu"
    return FmuModel.load(stored, expected_hash=digest)
