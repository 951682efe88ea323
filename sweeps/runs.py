"""Run records: every sweep and calibration leaves enough behind to be re-executed and compared.

A run lives under ``<runs root>/<run_id>/``: ``run.json`` (the `RunRecord`) and ``output/``.
The record holds who ran what (user, tenant, asset), the model reference and its content hash, the
identity of the model code that ran (`raytwin.modelcode`: distribution, version, source hash),
the hashes of its input data (telemetry, series files), the full spec (scenario space, seeds), package
and code versions, and the SHA-256 of every output file. `rerun` executes the recorded spec again into a new run and
compares the output hashes file by file. Runs roots are local directories or fsspec URLs.
"""

from __future__ import annotations

import getpass
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any, Literal, TypeVar

from pydantic import Field
from ray.exceptions import TaskCancelledError

from raytwin.contracts import Contract, UtcTime
from raytwin.modelcode import ModelCode, code_identity, describe_change
from raytwin.provenance import code_version, compute_platform, package_versions
from raytwin.ray_connect import cancels_deferred
from raytwin.registry import RegistryError
from raytwin.signals import Series
from raytwin.storage import canonical_json, file_sha256, filesystem, replace_file
from raytwin.store_failures import store_io
from sweeps.aggregate import RUN_OUTPUT, RUN_RECORD
from sweeps.calibration import (RESULT_FILE, CalibrationError, CalibrationResult, CalibrationSpec, calibrate,
                                read_telemetry)
from sweeps.fmu import FmuCalibrationSpec, FmuSweepSpec, calibrate_fmu_spec, check_fmu_sweep_size, run_fmu_spec
from sweeps.limits import MAX_SCENARIOS
from sweeps.runner import (RunTerminated, SweepCancelled, absolute_series, absolute_url, check_sweep_size, prepare,
                           run_sweep)
from sweeps.spec import SweepSpec, resolve_model

log = logging.getLogger("raytwin.runs")
DEFAULT_RUNS_ROOT = "./runs"

Kind = Literal["sweep", "calibration", "recommendation"]
S = TypeVar("S", CalibrationSpec, FmuCalibrationSpec)
CANCELLATIONS = (SweepCancelled, KeyboardInterrupt, TaskCancelledError, RunTerminated)
"""What ends a run as `cancelled` rather than `failed`: Ctrl-C, SIGTERM (`raytwin job stop`), a cancelled task."""


class RunRecord(Contract):
    schema_version: Literal[1] = 1
    run_id: str
    kind: Kind
    status: Literal["succeeded", "failed", "cancelled"]
    user: str
    tenant: str
    asset_id: str | None = None
    model_ref: str
    model_hash: str
    model_code: ModelCode | None = None  # None in records from before code identities were recorded
    input_data_url: str | None = None
    input_data_hash: str | None = None
    input_files: dict[str, str] = Field(default_factory=dict)  # a sweep's series files: path or URL -> sha256
    spec: dict[str, Any]
    seeds: dict[str, int]
    package_versions: dict[str, str]
    code_version: str
    started: UtcTime
    finished: UtcTime
    output_url: str
    outputs: dict[str, str] = Field(default_factory=dict)  # file name -> sha256
    summary: dict[str, Any] = Field(default_factory=dict)
    rerun_of: str | None = None
    error: str | None = None


class RerunReport(Contract):
    original: str
    rerun: str
    identical: bool
    differing: list[str]  # files whose bytes differ (or exist on one side only)
    code_version_then: str
    code_version_now: str
    package_changes: dict[str, list[str]] = Field(default_factory=dict)
    """Key packages whose version differs from the recorded run's: name -> [then, now] (a reason outputs may differ)."""
    caveats: list[str] = Field(default_factory=list)
    """Other reasons the record shows for outputs that may differ: a sweep whose kernels ran on another platform
    (a GPU's fused kernel against a CPU's XLA scan), a calibration whose Tune phase depends on trial order."""


class RunError(ValueError):
    """An unknown run, or a rerun whose inputs are no longer what the record says."""


class RunStore:
    """Run records under a runs root (directory or fsspec URL)."""

    def __init__(self, root: str = DEFAULT_RUNS_ROOT, storage_options: dict | None = None):
        self.root = absolute_url(root).rstrip("/")
        self.storage_options = storage_options
        self.fs, self.path = filesystem(self.root, storage_options)

    def output_url(self, run_id: str) -> str:
        """The run's output under this root: read it here, not at the record's `output_url` (where it was written,
        gone once the root is moved or copied elsewhere)."""
        return f"{self.root}/{run_id}/{RUN_OUTPUT}"

    def save(self, record: RunRecord) -> None:
        replace_file(self.fs, f"{self.path}/{record.run_id}/{RUN_RECORD}", canonical_json(record.model_dump(mode="json")))

    @store_io("read")
    def exists(self, run_id: str) -> bool:
        """Whether run `run_id` left its record (a run stopped before it began has none)."""
        return self.fs.exists(f"{self.path}/{run_id}/{RUN_RECORD}")

    @store_io("read")
    def load(self, run_id: str) -> RunRecord:
        path = f"{self.path}/{run_id}/{RUN_RECORD}"
        if not self.fs.exists(path):
            raise RunError(f"no run {run_id!r} under {self.root}")
        return RunRecord.model_validate_json(self.fs.cat_file(path))

    @store_io("read")
    def list(self) -> list[RunRecord]:
        if not self.fs.exists(self.path):
            return []
        records = [RunRecord.model_validate_json(self.fs.cat_file(p))
                   for p in self.fs.glob(f"{self.path}/*/{RUN_RECORD}")]
        return sorted(records, key=lambda r: r.started)


def new_run_id(kind: Kind) -> str:
    """A fresh run id (``sweep-20260105T120000Z-1a2b3c4d``): a caller that must name a run before it ends (a job
    whose run may be cancelled) takes one and passes it as `run_id`."""
    return f"{kind}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _current_user() -> str:
    return os.environ.get("RAYTWIN_USER") or getpass.getuser()


AnySpec = SweepSpec | CalibrationSpec | FmuSweepSpec | FmuCalibrationSpec


def _recorded_spec(spec: AnySpec) -> dict[str, Any]:
    """The spec as its record keeps it: a local `registry_url` made absolute, as `raytwin rerun` may run from any
    working directory (a relative one resolved there: "no model ... in this registry")."""
    fields = spec.model_dump(mode="json")
    if fields.get("registry_url"):
        fields["registry_url"] = absolute_url(fields["registry_url"])
    return fields


def _recorded(
    store: RunStore, kind: Kind, spec: AnySpec, execute: Callable[[str], tuple[dict, dict]],
    *, input_url: str | None, input_hash: str | None, seeds: dict[str, int], user: str | None, rerun_of: str | None,
    run_id: str | None = None, input_files: dict[str, str] | None = None,
) -> RunRecord:
    """Run `execute(output_url) -> (outputs, summary)` and write its record under `run_id` (None: a new one),
    whatever the outcome."""
    _refuse_transient_runs(store)
    _refuse_transient_registry(spec.registry_url)
    artifact = resolve_model(spec.model, spec.registry_url)
    run_id = run_id or new_run_id(kind)
    fields = dict(
        run_id=run_id, kind=kind, user=user or _current_user(), tenant=spec.tenant, asset_id=spec.asset_id,
        model_ref=artifact.ref, model_hash=artifact.content_hash, model_code=code_identity(artifact.model()),
        input_data_url=input_url,
        input_data_hash=input_hash, input_files=input_files or {}, spec=_recorded_spec(spec), seeds=seeds,
        package_versions=package_versions(), code_version=code_version(), started=datetime.now(UTC),
        output_url=store.output_url(run_id), rerun_of=rerun_of,
    )
    log.info("run start run_id=%s kind=%s model=%s", run_id, kind, artifact.ref)
    with cancels_deferred():  # the tasks an interrupted run leaves are cancelled once its record is saved
        try:
            outputs, summary = execute(store.output_url(run_id))
        except BaseException as exc:
            status = "cancelled" if isinstance(exc, CANCELLATIONS) else "failed"
            error = str(exc) or type(exc).__name__
            store.save(RunRecord(**fields, status=status, finished=datetime.now(UTC), error=error))
            log.warning("run %s run_id=%s error=%s", status, run_id, error)
            raise
    record = RunRecord(**fields, status="succeeded", finished=datetime.now(UTC), outputs=outputs, summary=summary)
    store.save(record)
    log.info("run done run_id=%s outputs=%d", run_id, len(outputs))
    return record


def _file_hashes(urls: Iterable[str]) -> dict[str, str]:
    """Each file's SHA-256, by its path or URL (read as the series signals read it)."""
    return {url: file_sha256(*filesystem(url, None)) for url in sorted(urls)}


def series_files(spec: SweepSpec) -> dict[str, str]:
    """The Parquet files `spec`'s series signals read, with their SHA-256: the record holds only their paths
    otherwise, and a rerun over a file rewritten since answered "differs" without saying why."""
    return _file_hashes({sig.path for sig in spec.signals.values() if isinstance(sig, Series) and sig.path})


def _check_input_files(original: RunRecord) -> None:
    """Refuse a rerun whose recorded input files changed or are gone, naming the file."""
    for url, recorded in original.input_files.items():
        try:
            now = _file_hashes([url])[url]
        except FileNotFoundError:
            raise RunError(f"input file {url} of run {original.run_id} is gone") from None
        if now != recorded:
            raise RunError(f"input file {url} changed since run {original.run_id} "
                           f"(sha256 {now[:12]}..., recorded {recorded[:12]}...)")


def recorded_sweep(
    spec: SweepSpec, *, runs: str = DEFAULT_RUNS_ROOT, storage_options: dict | None = None,
    user: str | None = None, progress: bool | None = None, rerun_of: str | None = None, run_id: str | None = None,
    max_scenarios: int = MAX_SCENARIOS,
) -> RunRecord:
    """Run a sweep into a new run directory and record it (under `run_id`, default a new id); a sweep of more
    than `max_scenarios` scenarios is refused before it is recorded (`sweeps.limits.SweepTooLarge`)."""
    spec = absolute_series(spec)  # the record names the file a rerun from any working directory reads
    check_sweep_size(spec, prepare(spec)[0], max_scenarios)  # refused, it leaves no failed record behind
    store = RunStore(runs, storage_options)

    def execute(out_url: str) -> tuple[dict, dict]:
        result = run_sweep(spec, out_url, storage_options=storage_options, progress=progress,
                           max_scenarios=max_scenarios)
        summary = {"scenarios": result.n_scenarios, "diverged": result.n_diverged, "chunks": result.n_chunks,
                   "elapsed_s": round(result.elapsed_s, 3),
                   "scenarios_per_s": float(f"{result.scenarios_per_s:.3g}"), "platforms": result.platforms}
        return result.outputs, summary

    return _recorded(store, "sweep", spec, execute, input_url=None, input_hash=None,
                     seeds={"space": spec.space.seed}, user=user, rerun_of=rerun_of, run_id=run_id,
                     input_files=series_files(spec))


def recorded_fmu_sweep(
    spec: FmuSweepSpec, *, runs: str = DEFAULT_RUNS_ROOT, storage_options: dict | None = None,
    user: str | None = None, rerun_of: str | None = None, run_id: str | None = None,
    max_scenarios: int = MAX_SCENARIOS,
) -> RunRecord:
    """Run a sweep of a registered FMU (`sweeps.fmu`) into a new run directory and record it (under `run_id`,
    default a new id): the same record as a JAX sweep, its ``model_code`` the FMU file's SHA-256. A sweep of more
    than `max_scenarios` scenarios is refused before it is recorded (`sweeps.limits.SweepTooLarge`)."""
    check_fmu_sweep_size(spec, max_scenarios)  # refused unrecorded, before the FMU is loaded
    return _recorded(RunStore(runs, storage_options), "sweep", spec,
                     lambda out_url: run_fmu_spec(spec, out_url, storage_options, max_scenarios=max_scenarios),
                     input_url=None, input_hash=None,
                     seeds={"space": spec.space.seed}, user=user, rerun_of=rerun_of, run_id=run_id)


def recorded_fmu_calibration(
    spec: FmuCalibrationSpec, *, runs: str = DEFAULT_RUNS_ROOT, storage_options: dict | None = None,
    user: str | None = None, rerun_of: str | None = None, expected_input_hash: str | None = None,
) -> RunRecord:
    """Calibrate a registered FMU (`sweeps.fmu`) into a new run directory and record it (with the telemetry's hash)."""
    spec = _absolute_telemetry(spec)
    store = RunStore(runs, storage_options)
    input_hash = _input_hash(spec.telemetry, storage_options, expected_input_hash, store)
    return _recorded(store, "calibration", spec,
                     lambda out_url: calibrate_fmu_spec(spec, out_url, storage_options), input_url=spec.telemetry,
                     input_hash=input_hash, seeds={"search": spec.seed}, user=user, rerun_of=rerun_of)


RUNTIME_ENV_DIR = "runtime_resources"
"""The folder under a Ray session's directory that holds runtime envs: a job's uploaded working dir
(``.../runtime_resources/working_dir_files/_ray_pkg_<hash>/``), deleted with the cluster."""


def runtime_env_dir(url: str) -> str | None:
    """The Ray runtime-env package directory that the local path `url` lies in, or None (a URL, elsewhere)."""
    if "://" in url:
        return None
    parts = PurePath(os.path.abspath(url)).parts
    if RUNTIME_ENV_DIR not in parts[:-1]:
        return None
    i = parts.index(RUNTIME_ENV_DIR)
    return str(PurePath(*parts[:min(i + 3, len(parts) - 1)]))  # .../runtime_resources/<kind>_files/<package>


def _refuse_transient_telemetry(telemetry: str, store: RunStore) -> None:
    """Refuse telemetry that lives in a Ray job's runtime-env working dir when the record lives elsewhere: the
    record would name a file that `raytwin cluster down` deletes, and `raytwin rerun` could never read it."""
    transient = runtime_env_dir(telemetry)
    if transient is None or runtime_env_dir(store.root) == transient:
        return
    raise CalibrationError(
        f"telemetry {telemetry} lies in a Ray job's uploaded working directory ({transient}), which is deleted with "
        f"the cluster, while the run record goes to {store.root}: `raytwin rerun` could never read it again; give "
        "the job the telemetry as an absolute path outside the working directory (\"$PWD/telemetry.parquet\" on a "
        "file system the cluster shares) or an s3:// URL")


def _refuse_transient_runs(store: RunStore) -> None:
    """Refuse a runs root in a Ray job's runtime-env working dir (a job's relative ``--runs``, or none: ./runs): the job
    succeeded, and `raytwin cluster down` deleted its record and outputs with that directory."""
    if (transient := runtime_env_dir(store.root)) is not None:
        raise RunError(
            f"runs root {store.root} lies in a Ray job's uploaded working directory ({transient}), which is deleted "
            "with the cluster, and the run's record and outputs with it: give the job an absolute --runs outside the "
            "working directory (--runs \"$PWD/runs\" on a file system the cluster shares) or an s3:// URL")


def _refuse_transient_registry(registry_url: str | None) -> None:
    """Refuse a model registry in a Ray job's runtime-env working dir (a job's relative ``registry_url``): the record
    names a model `raytwin rerun` can never read again once `raytwin cluster down` deleted it, and a version a
    calibration publishes there (``register_as``) is deleted with it."""
    if registry_url and (transient := runtime_env_dir(registry_url)) is not None:
        raise RunError(
            f"registry_url {registry_url} lies in a Ray job's uploaded working directory ({transient}), which is "
            "deleted with the cluster, and the models the run reads or publishes with it: give the job's spec an "
            "absolute registry_url outside the working directory (on a file system the cluster shares) or an s3:// URL")


def _absolute_telemetry(spec: S) -> S:
    """`spec` with a local telemetry path made absolute: a record of a relative path named whichever file of that
    name lay in the working directory of `raytwin rerun`, so the run reran only from where it ran."""
    return spec if "://" in spec.telemetry else spec.model_copy(update={"telemetry": absolute_url(spec.telemetry)})


def _input_hash(telemetry: str, storage_options: dict | None, expected: str | None, store: RunStore) -> str:
    """The telemetry's SHA-256 (telemetry a rerun can read again: `_refuse_transient_telemetry`); a rerun refuses
    telemetry that changed since the recorded run."""
    _refuse_transient_telemetry(telemetry, store)
    _, input_hash = read_telemetry(telemetry, storage_options)
    if expected is not None and input_hash != expected:
        raise RunError(f"telemetry {telemetry} changed since the recorded run "
                       f"(sha256 {input_hash[:12]}..., recorded {expected[:12]}...)")
    return input_hash


def recorded_calibration(
    spec: CalibrationSpec, *, runs: str = DEFAULT_RUNS_ROOT, storage_options: dict | None = None,
    user: str | None = None, rerun_of: str | None = None, expected_input_hash: str | None = None,
) -> RunRecord:
    """Calibrate into a new run directory and record it (with the telemetry's hash)."""
    spec = _absolute_telemetry(spec)
    store = RunStore(runs, storage_options)
    input_hash = _input_hash(spec.telemetry, storage_options, expected_input_hash, store)

    def execute(out_url: str) -> tuple[dict, dict]:
        result, outputs, _ = calibrate(spec, out_url, storage_options=storage_options)
        return outputs, {"weighted_rmse": result.weighted_rmse, "parameters": result.parameters,
                         "rel_std": result.rel_std, "noise_std_assumed": result.noise_std_assumed,
                         "warnings": result.warnings,
                         "platforms": [compute_platform()]}  # its least squares ran here (its Tune trials on CPUs)

    return _recorded(store, "calibration", spec, execute, input_url=spec.telemetry, input_hash=input_hash,
                     seeds={"search": spec.seed}, user=user, rerun_of=rerun_of)


def load_calibration(run_id: str, *, runs: str = DEFAULT_RUNS_ROOT,
                     storage_options: dict | None = None) -> CalibrationResult:
    """The fit of a recorded calibration, typed (parameters, std, correlation, RMSE): `recorded_calibration` returns
    the record, whose summary holds only some of it as plain dicts. `RunError` for a run of another kind."""
    store = RunStore(runs, storage_options)
    record = store.load(run_id)
    if record.kind != "calibration" or record.status != "succeeded":
        raise RunError(f"run {run_id} is a {record.status} {record.kind}, not a succeeded calibration")
    if record.spec.get("engine") == "fmu":
        raise RunError(f"run {run_id} calibrated an FMU: its fit is {store.output_url(run_id)}/{RESULT_FILE} "
                       "(raytwin.fmu's result, not a CalibrationResult)")
    fs, root = filesystem(store.output_url(run_id), storage_options)
    with store_io("read"):
        return CalibrationResult.model_validate_json(fs.cat_file(f"{root}/{RESULT_FILE}"))


COMPARED = ("model_ref", "model_hash", "model_code", "input_data_hash", "input_files", "spec", "seeds",
            "package_versions", "code_version", "outputs")
"""The record fields `diff_runs` compares: what a run's outputs follow from, and the outputs."""


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted paths (``spec.space.dimensions.0.low``) to their leaf values."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return {path: value}
    return {k: v for key, item in items for k, v in _flat(item, f"{path}.{key}" if path else str(key)).items()}


def diff_runs(a: str, b: str, *, runs: str = DEFAULT_RUNS_ROOT,
              storage_options: dict | None = None) -> dict[str, list[Any]]:
    """What differs between two recorded runs: dotted field (``spec.space.n``, ``outputs.part-000000.parquet``, the
    file's SHA-256) -> [a's value, b's value], None where one run lacks it; empty when they match in every field of
    `COMPARED`. Answers "what did I change between these sweeps, and did the numbers change?"."""
    store = RunStore(runs, storage_options)
    first, second = (_flat(store.load(run).model_dump(mode="json", include=set(COMPARED))) for run in (a, b))
    return {key: [first.get(key), second.get(key)] for key in sorted(first.keys() | second.keys())
            if first.get(key) != second.get(key)}


_PUBLISHING = ("register_as", "registered_by")
"""A calibration's fields that publish its fit as a registry version: a rerun reproduces the fit and compares
its outputs (the fitted parameters among them), it publishes nothing. Re-registering also refused every
calibration recorded before `registered_by` existed, which a `register_as` now needs."""


def _unpublished(spec: dict[str, Any]) -> dict[str, Any]:
    """A calibration's recorded spec without the fields that publish its fit (`_PUBLISHING`)."""
    return {k: v for k, v in spec.items() if k not in _PUBLISHING}


def rerun(run_id: str, *, runs: str = DEFAULT_RUNS_ROOT, storage_options: dict | None = None,
          progress: bool | None = False) -> RerunReport:
    """Re-execute a recorded run from its record and compare every output file's hash."""
    store = RunStore(runs, storage_options)
    original = store.load(run_id)
    if original.status != "succeeded":
        raise RunError(f"run {run_id} {original.status}; only succeeded runs can be reproduced")
    try:
        artifact = resolve_model(original.spec["model"], original.spec.get("registry_url"))
    except RegistryError as exc:  # its message leaves the registry out (the HTTP API's); the researcher needs it
        raise RunError(f"run {run_id}: {exc.located()}") from exc
    if artifact.content_hash != original.model_hash:
        raise RunError(f"model {original.model_ref} changed since run {run_id} "
                       f"(sha256 {artifact.content_hash[:12]}..., recorded {original.model_hash[:12]}...)")
    code = code_identity(artifact.model())
    if original.model_code is not None and code.sha256 != original.model_code.sha256:
        raise RunError(f"the code of model {original.model_ref} changed since run {run_id}: "
                       f"{describe_change(original.model_code, code)}")
    _check_input_files(original)
    common = dict(runs=runs, storage_options=storage_options, user=original.user, rerun_of=run_id)
    fmu = original.spec.get("engine") == "fmu"  # recorded by sweeps.fmu (JAX specs have no engine field)
    if original.kind == "sweep" and fmu:
        fmu_spec = FmuSweepSpec.model_validate(original.spec)  # as a JAX sweep's rerun: its own size is allowed
        new = recorded_fmu_sweep(fmu_spec, max_scenarios=max(MAX_SCENARIOS, fmu_spec.space.size), **common)
    elif original.kind == "sweep":
        spec = SweepSpec.model_validate(original.spec)  # it ran once: a limit raised for it holds for its rerun
        new = recorded_sweep(spec, progress=progress, max_scenarios=max(MAX_SCENARIOS, spec.space.size), **common)
    elif original.kind == "recommendation":
        from sweeps.recommend import RecommendSpec, recorded_recommendation  # it builds on this module

        new, _ = recorded_recommendation(RecommendSpec.model_validate(original.spec), **common)
    else:
        spec_type, record = (FmuCalibrationSpec, recorded_fmu_calibration) if fmu else (CalibrationSpec,
                                                                                         recorded_calibration)
        new = record(spec_type.model_validate(_unpublished(original.spec)), expected_input_hash=original.input_data_hash,
                     **common)
    differing = sorted(name for name in set(original.outputs) | set(new.outputs)
                       if original.outputs.get(name) != new.outputs.get(name))
    changed = {name: [then, new.package_versions.get(name, "not recorded")]
               for name, then in original.package_versions.items() if new.package_versions.get(name) != then}
    return RerunReport(original=run_id, rerun=new.run_id, identical=not differing, differing=differing,
                       code_version_then=original.code_version, code_version_now=new.code_version,
                       package_changes=changed, caveats=_caveats(original, new))


_PLATFORMS_OF = {("sweep", False): "the sweep's kernels", ("sweep", True): "the FMU sweep's binaries",
                 ("calibration", False): "the calibration's least-squares stage",
                 ("calibration", True): "the FMU calibration's binaries",
                 ("recommendation", False): "the recommendation's search"}
"""(kind, FMU engine) -> what of such a run its record's ``summary.platforms`` names (`compute_platform`)."""


def _caveats(original: RunRecord, new: RunRecord) -> list[str]:
    """What in the records besides code and packages may make `new`'s outputs differ from `original`'s."""
    caveats = []
    then, now = original.summary.get("platforms"), new.summary.get("platforms")
    if then is not None and then != now:  # (records from before platforms were kept have none)
        what = _PLATFORMS_OF[original.kind, original.spec.get("engine") == "fmu"]
        caveats.append(f"{what} ran on {', '.join(then)} then, on "
                       f"{', '.join(now or ['?'])} now: results computed on other hardware (a GPU runs the fused "
                       "kernel, a CPU the XLA scan; an FMU has a binary per platform) agree within rounding, not bit "
                       "for bit; rerun on the recorded platform to compare bits")
    if original.kind == "calibration" and original.spec.get("engine") != "fmu":
        dependence = CalibrationSpec.model_validate(_unpublished(original.spec)).order_dependence()
        caveats += [dependence] if dependence else []
    return caveats
