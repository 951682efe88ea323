"""A what-if sweep submitted with `raytwin job submit` to a real two-node cluster equals the same sweep run on
the single-node Ray of the test session, Parquet part for Parquet part.

The pytest process reaches the cluster only over HTTP (job API, state API); its own Ray is `ray_session`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobStatus
from typer.testing import CliRunner

from cluster.cli import job_app
from cluster.jobs import JobClient
from cluster.local import LocalClusterInfo
from sweeps.runner import run_sweep
from sweeps.runs import RunRecord, RunStore
from sweeps.space import Dimension, ScenarioSpace
from sweeps.spec import SweepSpec
from tests.fixtures_cluster import REPO_ROOT, alive_node_ids

# 4 chunks of 64 scenarios, one day at 60 s: small enough for a shared 2-core machine, enough chunks for both nodes.
SPEC = SweepSpec(
    model="thermal_rc", horizon_s=86400, step_s=60, chunk_size=64,
    space=ScenarioSpace(method="lhs", n=256, seed=11, dimensions=[
        Dimension(name="C_in", target="param", mode="scale", low=0.7, high=1.3),
        Dimension(name="T_out_mean", target="input", low=263.15, high=283.15),
    ]),
)
PARTS = [f"part-{chunk:06d}.parquet" for chunk in range(4)]
# The project's console script, next to the interpreter: the job's PATH need not contain the venv.
RAYTWIN = Path(sys.executable).with_name("raytwin")


@dataclass(frozen=True)
class SweepJob:
    logs: str  # as `raytwin job logs` prints them
    record: RunRecord
    chunk_nodes: list[str]  # node id of every finished chunk task


def _chunk_task_nodes(info: LocalClusterInfo, ray_job_id: str, expected: int) -> list[str]:
    """Nodes that ran the job's finished chunk tasks, from the state API (task events arrive asynchronously)."""
    filters = {"job_id": ray_job_id, "name": "_chunk_task", "state": "FINISHED"}
    params = [pair for key, value in filters.items()
              for pair in (("filter_keys", key), ("filter_predicates", "="), ("filter_values", value))]
    deadline = time.monotonic() + 60
    while True:
        reply = httpx.get(f"{info.dashboard_url}/api/v0/tasks", params=params, headers=info.auth_headers, timeout=10)
        tasks = reply.json()["data"]["result"]["result"]
        if len(tasks) >= expected or time.monotonic() > deadline:
            return sorted(task["node_id"] for task in tasks)
        time.sleep(0.25)  # as `JobClient.wait` polls: a second each cost the fixture up to a second more


@pytest.fixture(scope="module")
def sweep_job(local_cluster: LocalClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> SweepJob:
    """`raytwin job submit -- raytwin sweep run spec.json --runs DIR` on the two-node cluster, run to its end."""
    tmp = tmp_path_factory.mktemp("cluster-sweep")
    spec_file, runs, state = tmp / "spec.json", tmp / "runs", tmp / "state.json"
    spec_file.write_text(SPEC.model_dump_json())
    local_cluster.save(state)  # the CLI finds the cluster's token here
    address = ["--address", local_cluster.dashboard_url, "--state-file", str(state)]
    runner = CliRunner()
    # The uploaded working dir (the checkout under test) is the job's cwd and on its tasks' PYTHONPATH.
    submitted = runner.invoke(job_app, ["submit", *address, "--working-dir", str(REPO_ROOT), "--",
                                        str(RAYTWIN), "sweep", "run", str(spec_file), "--runs", str(runs),
                                        "--no-progress"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip().splitlines()[-1]
    jobs = JobClient(local_cluster.dashboard_url, local_cluster.auth_headers)
    jobs.wait(job_id, timeout_s=300)
    status = runner.invoke(job_app, ["status", job_id, *address]).output
    logs = runner.invoke(job_app, ["logs", job_id, *address]).output
    assert status.startswith(JobStatus.SUCCEEDED.value), status + logs
    [record] = RunStore(str(runs)).list()
    nodes = _chunk_task_nodes(local_cluster, jobs.info(job_id).job_id, len(PARTS))
    return SweepJob(logs, record, nodes)


def test_sweep_job_succeeds_and_its_chunks_ran_on_both_nodes(
    local_cluster: LocalClusterInfo, sweep_job: SweepJob
) -> None:
    assert f"run {sweep_job.record.run_id}: {SPEC.space.size} scenarios" in sweep_job.logs
    assert f"sweep done scenarios={SPEC.space.size}" in sweep_job.logs
    assert sweep_job.record.status == "succeeded" and sweep_job.record.summary["chunks"] == len(PARTS)
    assert len(sweep_job.chunk_nodes) == len(PARTS)
    assert sorted(set(sweep_job.chunk_nodes)) == alive_node_ids(local_cluster)


def test_multi_node_output_equals_single_node_run(ray_session, sweep_job: SweepJob, tmp_path: Path) -> None:
    single = run_sweep(SPEC, str(tmp_path / "single"), progress=False)
    multi_dir = Path(sweep_job.record.output_url)
    assert sorted(path.name for path in multi_dir.iterdir()) == PARTS
    assert single.outputs == sweep_job.record.outputs  # file -> sha256 of its bytes
    for part in PARTS:
        assert (multi_dir / part).read_bytes() == (tmp_path / "single" / part).read_bytes()
        assert pq.read_table(multi_dir / part).equals(pq.read_table(tmp_path / "single" / part))
