"""Job submission for researchers: Ray's `JobSubmissionClient` with RayTwin's runtime environment.

A job is a driver (e.g. `raytwin sweep ...`) started on the cluster's head; shipping the working directory and
the JAX/XLA settings with it makes a run on the cluster behave like the same command run locally. User model
code travels with it too: local package directories as ``py_modules`` (uploaded), installed packages as ``pip``
requirements (installed on the cluster); `raytwin.modelcode.model_runtime_env` says which a model needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from cluster.local import LocalClusterInfo
from cluster.upload import check_uploads

# Forwarded from the submitting shell when set, so the job sees the same JAX/XLA configuration.
FORWARDED_ENV = ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "RAYTWIN_STORAGE_URL")
# Several JAX tasks may share a GPU: stop the first from preallocating most of its memory.
PROJECT_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
WORKING_DIR_EXCLUDES = [".git", ".venv", "**/__pycache__", "runs"]
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


class JobError(RuntimeError):
    """No cluster to talk to, or a job that did not finish in time."""


class UnknownJob(LookupError):
    """No job of that id on the cluster."""

    def __str__(self) -> str:
        return str(self.args[0])


def _valid(job_id: str) -> str:
    """`job_id`, refused when empty: Ray asks for ``/api/jobs/`` then, the list of all jobs, and fails on it
    with a TypeError ("JobDetails() argument after ** must be a mapping, not list")."""
    if not isinstance(job_id, str) or not job_id.strip():
        raise ValueError(f"a job id must be a non-empty string, got {job_id!r}: `raytwin job submit` prints it, "
                         "`raytwin job list` shows the cluster's")
    return job_id


def _known(job_id: str, call: Callable[[], Any]) -> Any:
    """`call`, Ray's 404 for an unknown job id as `UnknownJob` (it raises a bare RuntimeError)."""
    _valid(job_id)
    try:
        return call()
    except RuntimeError as exc:
        if "does not exist" not in str(exc):
            raise
        raise UnknownJob(f"no job {job_id!r} on this cluster (`raytwin job list` shows its jobs)") from None


def project_runtime_env(
    working_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    py_modules: Sequence[str | Path] = (),
    pip: Sequence[str] = (),
    excludes: Sequence[str] = (),
) -> dict[str, Any]:
    """The runtime env of a RayTwin job: project env vars, forwarded JAX/XLA settings, `env`, the working dir,
    and model code: `py_modules` (local directories or files, uploaded; or remote .zip/.whl URIs) and `pip`
    (requirements installed for the job, e.g. ``pump-models==1.2.0``). Uploads leave out
    `WORKING_DIR_EXCLUDES` and `excludes` (gitignore-style patterns relative to each uploaded directory).

    The submitting interpreter's scripts directory goes first on the job's PATH (before `env`'s PATH, else
    the cluster's: Ray expands ``${PATH}`` on the node), so an entrypoint ``raytwin ...`` or ``python ...``
    finds this venv on a local cluster whose nodes were started without it on PATH; on a remote cluster
    the directory does not exist and the image's PATH decides."""
    env_vars = {**PROJECT_ENV, **{name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}}
    env_vars.update(env or {})
    env_vars["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env_vars.get('PATH', '${PATH}')}"
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if working_dir is not None:
        runtime_env["working_dir"] = str(Path(working_dir).resolve())
    if working_dir is not None or excludes:
        runtime_env["excludes"] = [*WORKING_DIR_EXCLUDES, *excludes]
    if py_modules:
        runtime_env["py_modules"] = [m if "://" in str(m) else _uploadable(Path(m)) for m in py_modules]
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def _uploadable(path: Path) -> str:
    """A local `py_modules` entry as Ray's job submission uploads it: a directory. A module file
    ``my_models.py`` becomes the package ``my_models`` (its code as ``__init__.py``, imported by the same
    name), in a directory named by the file's hash under the temporary directory."""
    path = path.resolve()
    if path.is_dir() or path.suffix != ".py":
        return str(path)
    code = path.read_bytes()
    package = Path(tempfile.gettempdir()) / "raytwin-py-modules" / hashlib.sha256(code).hexdigest()[:16] / path.stem
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_bytes(code)
    return str(package)


def resolve_cluster(address: str | None, local_state_file: Path | None = None) -> tuple[str | None, dict[str, str]]:
    """Dashboard address and auth headers: `address`, else Ray's env vars (None lets Ray read them, and Ray's
    RAY_AUTH_MODE/RAY_AUTH_TOKEN apply), else the `cluster up --local` cluster; the local cluster's token is
    used whenever the address is that cluster's."""
    local = LocalClusterInfo.load(local_state_file) if local_state_file and local_state_file.exists() else None
    if address:
        return address, local.auth_headers if local and address.rstrip("/") == local.dashboard_url else {}
    if any(os.environ.get(name) for name in ADDRESS_ENV):
        return None, {}
    if local is not None:
        return local.dashboard_url, local.auth_headers
    raise JobError(
        "no Ray cluster address: pass --address http://HOST:8265, set RAY_ADDRESS, "
        "or start a local cluster with `raytwin cluster up --local`"
    )


class JobClient:
    """Submit, inspect and follow jobs on one Ray cluster, addressed by its dashboard URL; `headers` carry
    authentication (e.g. `LocalClusterInfo.auth_headers`)."""

    def __init__(self, address: str | None, headers: Mapping[str, str] | None = None) -> None:
        self.client = JobSubmissionClient(address, headers=dict(headers) if headers else None)

    def submit(
        self,
        entrypoint: str | Sequence[str],
        working_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        submission_id: str | None = None,
        py_modules: Sequence[str | Path] = (),
        pip: Sequence[str] = (),
        excludes: Sequence[str] = (),
    ) -> str:
        """Start `entrypoint` (a shell command string, or an argv list that is quoted for you) with
        `project_runtime_env`; returns the job id. `cluster.upload.UploadTooLarge` before uploading a working
        dir or model code bigger than the job API takes."""
        if submission_id is not None:
            _valid(submission_id)
        command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
        runtime_env = project_runtime_env(working_dir, env, py_modules, pip, excludes)
        check_uploads(runtime_env)
        return self.client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=submission_id)

    def status(self, job_id: str) -> JobStatus:
        return _known(job_id, lambda: self.client.get_job_status(job_id))

    def info(self, job_id: str) -> JobDetails:
        return _known(job_id, lambda: self.client.get_job_info(job_id))

    def logs(self, job_id: str) -> str:
        return _known(job_id, lambda: self.client.get_job_logs(job_id))

    def follow_logs(self, job_id: str) -> Iterator[str]:
        """Log chunks as the job writes them, ending when the job ends (a bad id is refused here, not at the
        first chunk)."""
        return self._follow(_valid(job_id))

    def _follow(self, job_id: str) -> Iterator[str]:
        loop = asyncio.new_event_loop()
        chunks = self.client.tail_job_logs(job_id)
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()

    def list(self) -> list[JobDetails]:
        return self.client.list_jobs()

    def stop(self, job_id: str) -> bool:
        """Ask Ray to stop the job: it sends the entrypoint SIGTERM (a RayTwin sweep or calibration then cancels
        its tasks and records its run `cancelled`), SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s by default),
        and the job ends STOPPED. False when the job had already ended."""
        return _known(job_id, lambda: self.client.stop_job(job_id))

    def wait(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.25) -> JobStatus:
        """Poll until the job is SUCCEEDED, FAILED or STOPPED; `JobError` after `timeout_s`. A status is one
        small dashboard request: polled every 0.25 s, `raytwin job stop` (and a test) does not wait up to a whole
        second more than the job took."""
        _valid(job_id)
        deadline = time.monotonic() + timeout_s
        while (status := self.status(job_id)) not in TERMINAL:
            if time.monotonic() > deadline:
                raise JobError(f"job {job_id} still {status.value} after {timeout_s}s")
            time.sleep(poll_s)
        return status
