"""Recalibration after drift: a twin's recent telemetry window, calibrated, registered as a candidate.

`window_table` reads a window of a twin's accepted events from the durable event log
(`raytwin.statestore.StateStore`) as calibration telemetry; `recalibrate` fits the policy's free
parameters with Ray Tune (`sweeps.runs.recorded_calibration`, so the fit has a run record),
registers the fit as a new version of the asset type's model and submits it through the lifecycle
as a *candidate*, with the run id (its record holds the fit report) and the drift triggers as evidence.

Restart-safe by construction: a `RecalibrationWork` names its candidate version and carries a
`job_key`; the registered version records that key in its metadata, so a relaunch after a crash
finishes the submission instead of calibrating a second time.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from raytwin.contracts import Contract, Finite, Identifier, SemVer
from raytwin.lifecycle import REASON_KEPT, Actor, Evidence, ModelLifecycle
from raytwin.recalibration import DriftTrigger, RecalibrationPolicy
from raytwin.estimation import model_defaults
from raytwin.registry import JOB_KEY, POLICY_SET_BY, ModelArtifact, ModelRegistry, RegistryError
from raytwin.statestore import StateStore, from_micros, to_micros
from raytwin.storage import filesystem
from raytwin.store_failures import store_io
from sweeps.calibration import CalibrationSpec
from sweeps.runs import recorded_calibration
from sweeps.tune_groups import owned_by

log = logging.getLogger("raytwin.recalibration")
AUTHOR = "recalibration"
"""The lifecycle author of recalibrated candidates: any approver key may promote them (four eyes)."""
WARNINGS = "calibration_warnings"
"""Candidate metadata: the fit's warnings (`sweeps.calibration.misfit_warning`), one per line, kept so a relaunch
that finds the candidate registered submits it with them too."""


MIN_WINDOW_SAMPLES = 10
"""Usable events a recalibration window needs (`window_table`)."""
MAX_GAP_STEPS = 10
"""A window's gap of more than this many median steps ends the data the fit reads: only the samples after the last
such gap are fitted (`window_table`), not a straight line drawn across hours without telemetry."""


TRIAL_CPUS = 0.01
"""CPUs a recalibration's Tune trial reserves: next to none, as the task running the search holds the CPU
the trials compute on (one at a time). Tune's placement groups outlive a task whose worker was killed
(an OOM kill): a trial's full CPU, left reserved by one, stalled every later attempt for good. They are
named after the job (`tune_owner`), and removed once it failed or before it is launched again."""


def tune_owner(tenant: str, job_key: str) -> str:
    """Whose Tune placement groups a recalibration's are (`sweeps.tune_groups`)."""
    return f"recalibration:{tenant}:{job_key}"


class RecalibrationError(ValueError):
    """A recalibration that cannot run: the message says what is missing and how to get it."""


class RecalibrationWork(Contract):
    """One calibration a drift trigger asked for, ready to run anywhere that reaches the store."""

    job_key: Identifier = Field(description="Unique per trigger group; the candidate's registry metadata keeps it")
    tenant: Identifier
    asset_id: Identifier = Field(description="The twin whose window is fitted (the group's strongest alarm)")
    model_ref: str = Field(description="The twin's model, name@version: the prior and the fixed parameters")
    candidate_version: SemVer
    telemetry: str = Field(description="The window as Parquet (t_s, inputs, outputs; `window_table`)")
    start_state: dict[Identifier, Finite]
    start_std: dict[Identifier, Finite] = Field(default_factory=dict, description="The std of start_state: the "
                                                "twin's, at least the model's declared prior (`start_std`)")
    policy: RecalibrationPolicy
    policy_set_by: str | None = Field(None, description="Who set the policy (an API key id): the candidate's "
                                      "metadata names it, so it may not approve the candidate (four eyes)")
    triggers: list[DriftTrigger] = Field(min_length=1)
    registry_url: str
    runs_url: str
    storage_options: dict[str, Any] = Field(default_factory=dict)


class Recalibrated(Contract):
    candidate: str = Field(description="name@version of the registered candidate")
    run_id: str
    parameters: dict[str, float]
    resumed: bool = Field(description="True when a relaunch found the candidate registered already")
    warnings: list[str] = Field(default_factory=list, description="What makes the fit doubtful (a weighted RMSE "
                                "far above 1): also in the submission's reason, for the approver")
    seq: int = Field(ge=0, description="The sequence number of the candidate's submit record on the lifecycle log")
    hash: str = Field(description="That record's hash (the audit record of the submission carries both)")


def window_table(store: StateStore, tenant: str, asset_id: str, names: list[str], until: datetime,
                 window_s: float, max_samples: int, *, held: Mapping[str, float] | None = None
                 ) -> tuple[pa.Table, datetime]:
    """The twin's events in (`until` - `window_s`, `until`] as calibration telemetry: ``t_s`` from the
    window's first sample, one column per name (the model's inputs and outputs, SI). The names in `held`
    (the inputs, with the value each holds until first measured) are zero-order held as the filter holds
    them: the last value measured, before the first one the first one, never measured the `held` value; an
    event without every other name, or flagged bad, is skipped. Only the samples after the last gap of more than
    `MAX_GAP_STEPS` median steps are kept; within them an irregular series is interpolated onto its median step
    (calibration needs uniform samples); at most the newest `max_samples` samples are kept.
    Returns the table and the event time of its first sample (where the fit's start state belongs)."""
    held = held or {}
    until_us = to_micros(until)
    since_us = until_us - round(window_s * 1e6)
    events = [e for e in store.read_events(tenant, asset_id, after=(since_us, 2**62, ""), until_us=until_us)
              if e.quality != "bad"]
    raw = np.array([[e.values.get(n, np.nan) for n in names] for e in events], dtype=np.float64).reshape(-1, len(names))
    for j, name in enumerate(names):
        if name in held:
            raw[:, j] = _zero_order_hold(raw[:, j], held[name])
    usable = np.isfinite(raw).all(axis=1)
    rows = [(e.time_s, list(v)) for e, v, ok in zip(events, raw, usable) if ok]
    if len(rows) < MIN_WINDOW_SAMPLES:
        needed = [n for n in names if n not in held]
        unmeasured = [n for j, n in enumerate(names) if n not in held and not np.isfinite(raw[:, j]).any()]
        raise RecalibrationError(
            f"twin {asset_id!r}: the {window_s:g} s window before {until.isoformat()} holds {len(rows)} usable "
            f"events of {len(events)} (each needs {needed} measured"
            + (f"; never measured in it: {unmeasured}" if unmeasured else "")
            + f"); at least {MIN_WINDOW_SAMPLES} are needed: send those measurements with the telemetry"
            + ("" if unmeasured else ", or widen the policy's window_s"))
    t = np.array([r[0] for r in rows])
    values = np.array([r[1] for r in rows])
    step = float(np.median(np.diff(t)))
    t, values = _after_last_gap(asset_id, t, values, step)
    steps = np.diff(t)
    if not np.allclose(steps, step, rtol=1e-9, atol=0):
        grid = np.arange(t[0], t[-1] + step / 2, step)
        values = np.column_stack([np.interp(grid, t, values[:, j]) for j in range(len(names))])
        t = grid
    t, values = t[-max_samples:], values[-max_samples:]
    table = pa.table({"t_s": t - t[0], **{n: values[:, j] for j, n in enumerate(names)}})
    return table, from_micros(round(t[0] * 1e6))


def _after_last_gap(asset_id: str, t: np.ndarray, values: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """The samples after the window's last gap of more than `MAX_GAP_STEPS` median steps (a connector down for
    hours): interpolated over, its hours of straight lines were fitted as measurements. A few missing or bad
    events stay interpolated."""
    gaps = np.flatnonzero(np.diff(t) > MAX_GAP_STEPS * step)
    if not gaps.size:
        return t, values
    first = int(gaps[-1]) + 1
    if t.size - first < MIN_WINDOW_SAMPLES:
        raise RecalibrationError(
            f"twin {asset_id!r}: the window's newest {t.size - first} events follow a gap of "
            f"{t[first] - t[first - 1]:g} s without telemetry (over {MAX_GAP_STEPS} steps of {step:g} s); at least "
            f"{MIN_WINDOW_SAMPLES} are needed after it: recalibrate once more telemetry has arrived (a longer "
            "settle_s in the policy ends the window later)")
    log.info("event=recalibration_window_gap asset=%s gap_s=%g dropped=%d", asset_id, t[first] - t[first - 1], first)
    return t[first:], values[first:]


def held_inputs(artifact: ModelArtifact) -> dict[str, float]:
    """Each input of the artifact's model with the value the twin's filter holds it at until first
    measured (`Input.nominal`, else 0): `window_table`'s `held`."""
    model = artifact.model()
    declared = model_defaults(model)["inputs"]
    return {name: float(declared.get(name, 0.0)) for name in model.input_names}


def start_std(artifact: ModelArtifact, estimated: Mapping[str, float]) -> dict[str, float]:
    """The std a recalibration's filter starts from: the twin's own, at least the model's declared prior. A
    drifted twin's estimate is overconfident (its model was wrong: that is what the latch says), and an
    unmeasured state such as a building's mass temperature carries the old model's error into the window."""
    prior = model_defaults(artifact.model())["initial_std"]
    widened = {n: max(float(v), float(prior.get(n, 0.0))) for n, v in estimated.items()}
    return {n: v for n, v in widened.items() if v > 0}


def _zero_order_hold(column: np.ndarray, default: float) -> np.ndarray:
    """NaNs replaced by the last finite value before them (leading ones by the first finite value,
    an all-NaN column by `default`)."""
    finite = np.isfinite(column)
    if not finite.any():
        return np.full_like(column, default)
    last = np.maximum.accumulate(np.where(finite, np.arange(column.size), -1))
    return np.where(last >= 0, column[np.maximum(last, 0)], column[finite][0])


def write_window(table: pa.Table, url: str, storage_options: dict[str, Any] | None = None) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs, path = filesystem(url, storage_options)
    with store_io("write"):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, sink.getvalue())


def recalibrate(work: RecalibrationWork) -> Recalibrated:
    """Fit, register and submit the candidate (or finish what a crashed attempt started)."""
    options = work.storage_options or None
    registry = ModelRegistry(work.registry_url, options)
    lifecycle = ModelLifecycle(registry)
    name = work.model_ref.partition("@")[0]
    candidate = f"{name}@{work.candidate_version}"
    resumed = work.candidate_version in registry.versions(name)
    if resumed:
        artifact = registry.get(candidate, allow_code_change=True)
        if artifact.metadata.get(JOB_KEY) != work.job_key:
            raise RecalibrationError(f"{candidate} is registered already, not by recalibration {work.job_key}: "
                                     f"publish asset type versions outside the recalibration's range or retry")
        run_id, parameters = artifact.metadata["run_id"], artifact.parameters
        warnings = [w for w in artifact.metadata.get(WARNINGS, "").splitlines() if w]
    else:
        base = registry.get(work.model_ref)
        spec = CalibrationSpec(
            model=work.model_ref, registry_url=work.registry_url, tenant=work.tenant, asset_id=work.asset_id,
            telemetry=work.telemetry, start_state=work.start_state, start_std=work.start_std, free=work.policy.free,
            noise_std=work.policy.noise_std, num_samples=work.policy.max_trials, seed=0, trial_cpus=TRIAL_CPUS)
        with owned_by(tune_owner(work.tenant, work.job_key)):
            record = recorded_calibration(spec, runs=work.runs_url, storage_options=options, user=AUTHOR)
        run_id, parameters = record.run_id, record.summary["parameters"]
        warnings = list(record.summary.get("warnings", []))
        registry.register(name, work.candidate_version, base.asset_type, parameters, metadata={
            JOB_KEY: work.job_key, "run_id": run_id, "calibrated_from": work.model_ref,
            "asset_id": work.asset_id, "weighted_rmse": repr(record.summary["weighted_rmse"]),
            **({WARNINGS: "\n".join(warnings)} if warnings else {}),
            **({POLICY_SET_BY: work.policy_set_by} if work.policy_set_by else {})})
    lifecycle.verify(name)  # the chain first: a submit record found in it is the log's
    submitted = next((r for r in lifecycle.records(name) if r.version == work.candidate_version
                      and r.action == "submit"), None)  # by a crashed attempt
    if submitted is None:
        twins = sorted({t.asset_id for t in work.triggers})
        reason = (f"recalibrated {','.join(work.policy.free)} on twin {work.asset_id} after drift of "
                  f"{len(twins)} twin(s) of {work.model_ref}" + "".join(f"; WARNING: {w}" for w in warnings))
        submitted = lifecycle.submit(candidate, Actor(id=AUTHOR, tenant=work.tenant), reason[:REASON_KEPT],
                                     Evidence(run_ids=[run_id], triggers=work.triggers))  # its fit: GET /v1/runs/{id}
    (log.warning if warnings else log.info)(
        "event=recalibrated job=%s tenant=%s candidate=%s run_id=%s resumed=%s triggers=%d warnings=%d",
        work.job_key, work.tenant, candidate, run_id, resumed, len(work.triggers), len(warnings))
    return Recalibrated(candidate=candidate, run_id=run_id, parameters=parameters, resumed=resumed,
                        warnings=warnings, seq=submitted.seq, hash=submitted.hash)


def next_free_version(registry: ModelRegistry, name: str, base_version: str, reserved: set[str]) -> str:
    """The base version's next patch number that is neither registered nor reserved by a running job."""
    major, minor, patch = (int(x) for x in base_version.split("."))
    taken = set(registry.versions(name)) | reserved
    for bump in range(1, 100_000):
        version = f"{major}.{minor}.{patch + bump}"
        if version not in taken:
            return version
    raise RegistryError(f"{name}: no free patch version after {base_version}")
