"""A real two-node Ray cluster on this machine, used through the job-submission HTTP API and the CLI only.

The pytest process never calls `ray.init()`: everything runs in the cluster's own processes.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobStatus
from typer.testing import CliRunner

import cluster.jobs
import cluster.local
from cluster.cli import cluster_app, job_app
from cluster.jobs import JobClient, project_runtime_env
from cluster.local import LocalClusterInfo
from raytwin.cli import app
from sweeps.runs import RunStore
from tests.fixtures_cluster import alive_node_ids

PROBE = '''
import json, os
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()
nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])

@ray.remote(num_cpus=1)
def node_id():
    import probekit  # user model code: only in the job's py_modules (a package and a module file)
    import probeflat

    return ray.get_runtime_context().get_node_id(), probekit.NAME + "+" + probeflat.NAME

pinned = [node_id.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
ran = ray.get(pinned)
print("PROBE " + json.dumps({"ran_on": sorted({n for n, _ in ran}), "code": sorted({c for _, c in ran}),
                             "flag": os.environ.get("PROBE_FLAG"),
                             "xla_prealloc": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}))
'''


def test_local_cluster_has_a_head_and_a_worker_node(local_cluster: LocalClusterInfo) -> None:
    assert local_cluster.dashboard_url.startswith("http://127.0.0.1:")
    assert local_cluster.address.startswith("127.0.0.1:")
    assert len(alive_node_ids(local_cluster)) == 2
    assert len(local_cluster.pids) == 2
    # the cluster requires its own token, whatever the caller's Ray auth settings are
    assert httpx.get(f"{local_cluster.dashboard_url}/api/v0/nodes", timeout=10).status_code == 401


def _package(root: Path, name: str) -> Path:
    """A user's code package outside the job's working dir (so only `py_modules` can bring it)."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"NAME = {name!r}\n")
    return root / name


def _module(root: Path, name: str) -> Path:
    """A user's flat module file (`my_models.py`): Ray's job upload takes directories only."""
    root.mkdir(parents=True)
    (root / f"{name}.py").write_text(f"NAME = {name!r}\n")
    return root / f"{name}.py"


def test_submitted_job_runs_tasks_on_both_nodes(local_cluster: LocalClusterInfo, tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "probe.py").write_text(PROBE)
    jobs = JobClient(local_cluster.dashboard_url, local_cluster.auth_headers)
    job_id = jobs.submit([sys.executable, "probe.py"], working_dir=tmp_path / "job", env={"PROBE_FLAG": "on"},
                         py_modules=[_package(tmp_path / "code", "probekit"), _module(tmp_path / "flat", "probeflat")])
    assert jobs.wait(job_id, timeout_s=180) == JobStatus.SUCCEEDED, jobs.logs(job_id)
    logs = jobs.logs(job_id)
    report = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[len("PROBE "):])
    assert report["ran_on"] == alive_node_ids(local_cluster)
    assert report["code"] == ["probekit+probeflat"]  # the user code reached the workers of both nodes
    assert (report["flag"], report["xla_prealloc"]) == ("on", "false")


def test_job_runtime_env_carries_model_code(tmp_path: Path) -> None:
    package = _package(tmp_path, "pumpkit")
    env = project_runtime_env(py_modules=[package, "s3://models/pumpkit-1.0.zip"], pip=["pump-models==1.2.0"])
    assert env["py_modules"] == [str(package.resolve()), "s3://models/pumpkit-1.0.zip"]
    assert env["pip"] == ["pump-models==1.2.0"]
    assert "py_modules" not in project_runtime_env() and "pip" not in project_runtime_env()


def test_job_cli_submit_status_logs_list(local_cluster: LocalClusterInfo, tmp_path: Path) -> None:
    runner = CliRunner()
    state = tmp_path / "state.json"
    local_cluster.save(state)  # the CLI finds the cluster's token (and, without --address, its address) here
    address = ["--address", local_cluster.dashboard_url, "--state-file", str(state)]
    (tmp_path / "job").mkdir()
    code = _package(tmp_path / "code", "greetkit")
    ok = runner.invoke(job_app, ["submit", *address, "--working-dir", str(tmp_path / "job"),
                                 "-e", "GREETING=hello there", "--py-module", str(code), "--", sys.executable, "-c",
                                 "import os, greetkit; print('said:', os.environ['GREETING'], 'with', greetkit.NAME)"])
    failing = runner.invoke(job_app, ["submit", "--state-file", str(state), "--id", "raytwin-failing-job",
                                      "--", sys.executable, "-c", "import sys; print('giving up'); sys.exit(3)"])
    # a cluster whose nodes do not have this venv on PATH still runs `raytwin ...` entrypoints
    cli = runner.invoke(job_app, ["submit", *address, "-e", "PATH=/usr/bin:/bin", "--", "raytwin", "job", "--help"])
    assert (ok.exit_code, failing.exit_code, cli.exit_code) == (0, 0, 0), ok.output + failing.output + cli.output
    ok_id, failing_id = ok.output.strip().splitlines()[-1], failing.output.strip().splitlines()[-1]
    cli_id = cli.output.strip().splitlines()[-1]
    assert failing_id == "raytwin-failing-job"

    jobs = JobClient(local_cluster.dashboard_url, local_cluster.auth_headers)
    assert jobs.wait(ok_id, timeout_s=180) == JobStatus.SUCCEEDED
    assert jobs.wait(failing_id, timeout_s=180) == JobStatus.FAILED
    assert jobs.wait(cli_id, timeout_s=180) == JobStatus.SUCCEEDED, jobs.logs(cli_id)
    assert "Submit and follow Ray jobs" in jobs.logs(cli_id)

    succeeded = runner.invoke(job_app, ["status", ok_id, *address])
    assert succeeded.exit_code == 0 and succeeded.output.startswith("SUCCEEDED")
    failed = runner.invoke(job_app, ["status", failing_id, *address])
    assert failed.exit_code == 3 and failed.output.startswith("FAILED") and "exit code 3" in failed.output
    for command in ("status", "logs", "stop"):  # a mistyped or empty id: one line, exit 2 (1 is for no cluster)
        unknown = runner.invoke(job_app, [command, "raysubmit_nosuchjob", *address])
        assert unknown.exit_code == 2 and unknown.output.strip() == (
            "no job 'raysubmit_nosuchjob' on this cluster (`raytwin job list` shows its jobs)"), unknown.output
        empty = runner.invoke(job_app, [command, "", *address])
        assert empty.exit_code == 2 and "a job id must be a non-empty string" in empty.output, empty.output
    ended = runner.invoke(job_app, ["stop", ok_id, *address])
    assert ended.exit_code == 0 and ended.output.strip() == "SUCCEEDED (it had ended; nothing to stop)", ended.output
    assert "said: hello there with greetkit" in runner.invoke(job_app, ["logs", ok_id, *address]).output
    followed = runner.invoke(job_app, ["logs", failing_id, "--follow", *address])
    assert followed.exit_code == 0 and "giving up" in followed.output
    listed = runner.invoke(job_app, ["list", *address]).output
    assert f"{ok_id}\tSUCCEEDED" in listed and f"{failing_id}\tFAILED" in listed

    bad_env = runner.invoke(job_app, ["submit", *address, "-e", "NOEQUALS", "--", "true"])
    assert bad_env.exit_code == 1 and "KEY=VALUE" in bad_env.output


def test_a_job_sweeps_the_installed_example_model(local_cluster: LocalClusterInfo, tmp_path: Path) -> None:
    """The example package (examples/dcmotor) travels with the job (``--py-module``); the job is the CLI's
    `raytwin sweep run` of the model's example sweep, its chunks Ray tasks on the cluster."""
    import raytwin_dcmotor as dcmotor  # installed with pip (./dev installs examples/dcmotor)
    runner = CliRunner()
    example = runner.invoke(app, ["sweep", "example", "dc_motor", "--n", "4"])
    assert example.exit_code == 0, example.output
    spec = {**json.loads(example.stdout), "horizon_s": 10.0}  # the kit's 5 minutes, shortened for the test
    assert [d["name"] for d in spec["space"]["dimensions"]] == ["R_th", "load", "T_amb"]  # the package's kit
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "spec.json").write_text(json.dumps(spec))
    state = tmp_path / "state.json"
    local_cluster.save(state)
    runs = tmp_path / "runs"
    submitted = runner.invoke(job_app, [
        "submit", "--address", local_cluster.dashboard_url, "--state-file", str(state),
        "--working-dir", str(tmp_path / "job"), "--py-module", str(Path(dcmotor.__file__).parent),
        "--", "raytwin", "sweep", "run", "spec.json", "--runs", str(runs), "--no-progress"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip().splitlines()[-1]
    jobs = JobClient(local_cluster.dashboard_url, local_cluster.auth_headers)
    assert jobs.wait(job_id, timeout_s=180) == JobStatus.SUCCEEDED, jobs.logs(job_id)
    logs = jobs.logs(job_id)
    assert ": 4 scenarios in " in logs and "diverged:" not in logs, logs  # none left its plausible range
    (part,) = runs.glob("*/output/part-*.parquet")
    metrics = pq.read_table(part, columns=["T_w_max", "omega_min", "i_max", "overtemp_s", "diverged"])
    assert metrics.num_rows == 4 and not any(metrics["diverged"].to_pylist())
    assert all(np.isfinite(metrics[name].to_numpy()).all() for name in ("T_w_max", "omega_min", "i_max", "overtemp_s"))
    assert (metrics["T_w_max"].to_numpy() >= 298.15 - 1e-3).all()  # the hottest point includes the start


def test_an_empty_job_id_is_refused_by_every_call(local_cluster: LocalClusterInfo) -> None:
    """`wait("")` raised "JobDetails() argument after ** must be a mapping, not list" (Ray fetched all jobs)."""
    jobs = JobClient(local_cluster.dashboard_url, local_cluster.auth_headers)
    for call in (jobs.status, jobs.info, jobs.logs, jobs.follow_logs, jobs.wait, jobs.stop):
        with pytest.raises(ValueError, match="a job id must be a non-empty string, got ''"):
            call("")
    with pytest.raises(ValueError, match="non-empty"):
        jobs.submit(["true"], submission_id=" ")


def test_job_stop_cancels_a_running_sweep_and_records_it_cancelled(
    local_cluster: LocalClusterInfo, tmp_path: Path
) -> None:
    """A job stopped with `ray job stop` was recorded `failed` "terminated by SIGTERM", like a crash; `raytwin job
    stop` sends the same SIGTERM, and the sweep cancels its chunks and records the run `cancelled`."""
    runner = CliRunner()
    example = runner.invoke(app, ["sweep", "example", "thermal_rc", "--n", "400000"])
    assert example.exit_code == 0, example.output
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "spec.json").write_text(json.dumps({**json.loads(example.stdout), "chunk_size": 2000}))
    state, runs = tmp_path / "state.json", tmp_path / "runs"
    local_cluster.save(state)
    address = ["--address", local_cluster.dashboard_url, "--state-file", str(state)]
    submitted = runner.invoke(job_app, ["submit", *address, "--working-dir", str(tmp_path / "job"), "--",
                                        "raytwin", "sweep", "run", "spec.json", "--runs", str(runs), "--no-progress"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip().splitlines()[-1]
    jobs = JobClient(local_cluster.dashboard_url, local_cluster.auth_headers)
    deadline = time.monotonic() + 180
    while not list(runs.glob("*/output/part-*.parquet")):  # chunks are being written: the sweep is under way
        status = jobs.status(job_id)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING) and time.monotonic() < deadline, jobs.logs(job_id)
        time.sleep(0.5)
    stopped = runner.invoke(job_app, ["stop", job_id, *address])
    assert stopped.exit_code == 0 and stopped.output.strip() == "STOPPED", stopped.output
    assert runner.invoke(job_app, ["status", job_id, *address]).exit_code == 4
    (record,) = RunStore(str(runs)).list()
    assert record.status == "cancelled" and record.outputs == {}, record
    # the runner's own words: it caught the signal in its loop and cancelled the chunks in flight
    assert re.fullmatch(r"sweep cancelled by SIGTERM after \d+/400000 scenarios; partial output in .+", record.error)


def test_job_submit_refuses_an_upload_over_rays_limit_naming_what_to_exclude(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 114 MB `jobruns/` in the working dir: the dashboard answered a bare 413 "Maximum request body size
    exceeded". The size is Ray's zip of the directory (its excludes, .gitignore and .rayignore applied)."""
    from ray._private.runtime_env.packaging import create_package

    import cluster.upload

    assert cluster.upload.UPLOAD_LIMIT_BYTES == 100 * 2**20  # the dashboard's client_max_size (Ray 2.60)
    job = tmp_path / "job"
    for name, mib in (("jobruns/a/part-0.bin", 2), ("runs/r.bin", 3), ("scratch/s.bin", 3), ("spec.json", 0)):
        (job / name).parent.mkdir(parents=True, exist_ok=True)
        (job / name).write_bytes(np.random.default_rng(0).bytes(mib * 2**20))
    (job / ".gitignore").write_text("scratch/\n")  # Ray honours it (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)
    excludes = project_runtime_env(job)["excludes"]
    sizes = cluster.upload.package_sizes(job, excludes)
    assert sorted(sizes) == [".gitignore", "jobruns/", "spec.json"]
    create_package(str(job), tmp_path / "pkg.zip", include_gitignore=True, excludes=excludes)
    assert 0 <= (tmp_path / "pkg.zip").stat().st_size - sum(sizes.values()) < 100  # + the zip's 22-byte end record

    monkeypatch.setattr(cluster.upload, "UPLOAD_LIMIT_BYTES", 2**20)
    submit = ["submit", "--address", "http://127.0.0.1:9", "--state-file", str(tmp_path / "none.json"),
              "--working-dir", str(job)]
    refused = CliRunner().invoke(job_app, [*submit, "--", "true"])
    assert refused.exit_code == 1 and "over the job API's 1.0 MiB limit" in refused.output, refused.output
    assert "Largest: jobruns/ 2.0 MiB, .gitignore" in refused.output and "--exclude PATTERN" in refused.output
    excluded = CliRunner().invoke(job_app, [*submit, "--exclude", "jobruns", "--", "true"])
    assert excluded.exit_code == 1 and "packs to" not in excluded.output  # on to the (absent) cluster
    assert project_runtime_env(job, excludes=["jobruns"])["excludes"][-1] == "jobruns"


def test_job_wait_polls_every_quarter_second_until_the_job_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """`raytwin job stop` and the tests here wait on a job by polling its status: every second, a wait lasted up to
    a second more than the job."""
    statuses = iter([JobStatus.PENDING, JobStatus.RUNNING, JobStatus.SUCCEEDED])
    jobs = JobClient.__new__(JobClient)
    jobs.client = type("Client", (), {"get_job_status": staticmethod(lambda job_id: next(statuses))})()
    slept: list[float] = []
    monkeypatch.setattr(cluster.jobs, "time", SimpleNamespace(monotonic=time.monotonic, sleep=slept.append))
    assert jobs.wait("raysubmit_1") == JobStatus.SUCCEEDED and slept == [0.25, 0.25]


def test_job_commands_need_an_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(job_app, ["list", "--state-file", str(tmp_path / "none.json")])
    assert result.exit_code == 1 and "raytwin cluster up --local" in result.output


def test_up_and_down_need_local() -> None:
    for command in ("up", "down"):
        result = CliRunner().invoke(cluster_app, [command])
        assert result.exit_code == 1 and "--local" in result.output


def test_down_with_nothing_recorded_says_so_and_succeeds_and_an_unreadable_state_fails(tmp_path: Path) -> None:
    """Scripts stop whatever is up: nothing to stop is no failure (it exited 1), a state it cannot read is."""
    state = tmp_path / "local-cluster.json"
    nothing = CliRunner().invoke(cluster_app, ["down", "--local", "--state-file", str(state)])
    assert (nothing.exit_code, nothing.stdout) == (0, "")
    assert nothing.stderr == f"no local cluster recorded in {state}: nothing to stop\n"
    state.write_text("{")
    unreadable = CliRunner().invoke(cluster_app, ["down", "--local", "--state-file", str(state)])
    assert unreadable.exit_code == 1 and f"no usable local-cluster state in {state}" in unreadable.stderr
    assert state.exists()


def test_down_fails_and_keeps_the_state_while_a_process_outlives_sigkill(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster process stuck in uninterruptible I/O outlives SIGKILL: `down` said the cluster stopped and dropped
    its state, leaving nothing to stop it with. Now it names the process, exits 1, and keeps the state and dir."""
    state, temp_dir, pid = tmp_path / "local-cluster.json", tmp_path / "rtw", 2**22 + 1  # above any pid_max
    temp_dir.mkdir()
    LocalClusterInfo("127.0.0.1:1", "http://127.0.0.1:1", str(temp_dir), "token", (pid,)).save(state)
    monkeypatch.setattr(cluster.local, "_process_table", lambda: [(pid, pid, f"raylet --temp-dir={temp_dir}/node-0")])
    clock = itertools.count()  # (each look at the clock a second on: the grace periods pass at once)
    monkeypatch.setattr(cluster.local, "time", SimpleNamespace(monotonic=lambda: next(clock), sleep=lambda s: None))
    down = CliRunner().invoke(cluster_app, ["down", "--local", "--state-file", str(state)])
    assert down.exit_code == 1 and f"processes {pid} of the local cluster outlived SIGKILL" in down.stderr
    assert "stopped" not in down.stdout and state.exists() and temp_dir.exists()


def test_job_submit_refuses_an_invalid_raytwin_entrypoint_before_contacting_a_cluster(tmp_path: Path) -> None:
    result = CliRunner().invoke(job_app, ["submit", "--address", "http://127.0.0.1:9", "--state-file",
                                          str(tmp_path / "none.json"), "--", "raytwin", "sweep", "--scenarios", "10"])
    assert result.exit_code == 1 and "is not a valid raytwin command" in result.output
    assert "see `raytwin sweep --help`" in result.output


def test_no_two_node_ports_of_the_local_cluster_are_the_same(local_cluster: LocalClusterInfo) -> None:
    """Ray refuses to start a node whose components share a port; across nodes they would clash on bind."""
    given = [int(arg.split("=")[1]) for pid in local_cluster.pids
             for arg in subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True,
                                       check=True).stdout.split()
             if arg.startswith("--") and arg.split("=")[0].endswith("port")]
    assert len(given) == 4 + 4 + 3  # four per node, and the head's GCS, dashboard and client ports
    assert len(set(given)) == len(given)
