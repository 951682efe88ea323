"""`raytwin cluster up --local` / `down --local`: a real head node started and stopped through the CLI."""

from __future__ import annotations

from pathlib import Path

import httpx
from typer.testing import CliRunner

from cluster.cli import cluster_app, job_app
from cluster.local import LocalClusterInfo, stop_local_cluster
from tests.fixtures_cluster import cluster_processes


def test_up_records_the_cluster_and_down_stops_it(tmp_path: Path) -> None:
    state = tmp_path / "local-cluster.json"
    runner = CliRunner()
    up = runner.invoke(cluster_app, ["up", "--local", "--workers", "0", "--state-file", str(state)])
    info = LocalClusterInfo.load(state) if state.exists() else None
    try:
        assert up.exit_code == 0, up.output
        assert info is not None and f"Dashboard/API: {info.dashboard_url}" in up.output
        assert httpx.get(f"{info.dashboard_url}/api/version", headers=info.auth_headers, timeout=10).status_code == 200
        assert state.stat().st_mode & 0o077 == 0  # the state holds the cluster's token
        again = runner.invoke(cluster_app, ["up", "--local", "--state-file", str(state)])
        assert again.exit_code == 1 and "already running" in again.output
        # job commands find the local cluster through the state file when no address is given
        listed = runner.invoke(job_app, ["list", "--state-file", str(state)], env={"RAY_ADDRESS": ""})
        assert listed.exit_code == 0, listed.output

        down = runner.invoke(cluster_app, ["down", "--local", "--state-file", str(state)])
        assert down.exit_code == 0, down.output
        assert not state.exists()
        assert cluster_processes(info.temp_dir) == []
        assert not Path(info.temp_dir).exists()
    finally:
        if info is not None:
            stop_local_cluster(info)  # no-op after a successful `down`; cleans up after a failed assertion
    gone = runner.invoke(cluster_app, ["down", "--local", "--state-file", str(state)])
    assert gone.exit_code == 0 and gone.stderr == f"no local cluster recorded in {state}: nothing to stop\n"
