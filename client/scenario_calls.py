"""The what-if operations: one scenario, a sweep, and the results and files of the jobs that run the
large ones. Sync and async clients share them like `client.calls.Endpoints`.

A run answers inline (200) when it is small, or as a queued job (202, `JobAccepted`: wait for it
with `wait_job`, then read `job_results` / `job_files`), as `mode` and the server's limits decide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar

import httpx
from pydantic import BaseModel

from client.calls import ANSWER_EXTRA, Call, Sender, T, _model, _models
from client.downloads import JOB_FILE, hashed
from raytwin.contracts import Scenario
from serve_apps.schemas import JobAccepted, ResultFile, ScenarioRun, SweepResult

if TYPE_CHECKING:
    from serve_apps.scenarios import AssetSweep

Mode = Literal["auto", "sync", "async"]
R = TypeVar("R", bound=BaseModel)


def job_file_call(job_id: str, name: str, parse: Callable[[httpx.Response], T]) -> Call[T]:
    """The request for a succeeded job's result file `name` (as `job_files` lists it)."""
    return Call("GET", "/v1/jobs/{job_id}/files/{name}", parse, idempotent=True,
                path_params={"job_id": job_id, "name": name})


def _inline_or_job(inline: type[R]) -> Callable[[httpx.Response], R | JobAccepted]:
    """The inline answer (200), or the queued job (202)."""
    return lambda r: (JobAccepted if r.status_code == 202 else inline).model_validate_json(r.content, extra=ANSWER_EXTRA)


class ScenarioCalls(Sender):
    def run_scenario(self, scenario: Scenario, mode: Mode = "auto") -> ScenarioRun | JobAccepted:
        """Run one what-if scenario from the twin's live (or past, or an explicit) state: the
        trajectories inline, or a job (`mode`: sync insists on inline, async always queues)."""
        return self._send(Call("POST", "/v1/scenarios", _inline_or_job(ScenarioRun),
                               json=scenario.model_dump(mode="json"), params={"mode": mode}))

    def run_sweep(self, sweep: AssetSweep, mode: Mode = "auto", limit: int = 1000) -> SweepResult | JobAccepted:
        """Sweep an asset's model over a scenario space, as a recorded run (`run_id`): quantiles and the
        first `limit` per-scenario rows inline, or a job. An FMU's sweep is always a job."""
        return self._send(Call("POST", "/v1/sweeps", _inline_or_job(SweepResult),
                               json=sweep.model_dump(mode="json"), params={"mode": mode, "limit": limit}))

    def job_results(self, job_id: str, limit: int = 1000) -> SweepResult:
        """A succeeded job's quantiles and first `limit` per-scenario rows (Conflict before it succeeded; `Gone` once
        its result files are no longer in the store: retention removed its run, `Job.results_removed`)."""
        return self._send(Call("GET", "/v1/jobs/{job_id}/results", _model(SweepResult), params={"limit": limit},
                               idempotent=True, path_params={"job_id": job_id}))

    def job_files(self, job_id: str) -> list[ResultFile]:
        """A succeeded job's Parquet files (per-scenario metrics ``part-*``, ``trajectories``) and sizes (`Gone` once
        they are no longer in the store)."""
        return self._send(Call("GET", "/v1/jobs/{job_id}/files", _models(ResultFile), idempotent=True,
                               path_params={"job_id": job_id}))

    def job_file(self, job_id: str, name: str, verify: bool = True) -> bytes:
        """One result file's bytes, loaded whole into memory: for small files (Parquet:
        ``pyarrow.parquet.read_table(io.BytesIO(data))``); a large one goes to disk with `download_job_file`.
        Checked against the SHA-256 the job recorded (`CorruptDownload`; `MissingChecksum` for an answer without
        it, unless `verify` is False); `Gone` once the job's files are no longer in the store."""
        return self._send(job_file_call(job_id, name, hashed(JOB_FILE, verify)))
