"""The `raytwin` command-line tool."""

from __future__ import annotations

import typer

from actors.cli import twins_app
from benchmarks.cli import bench_app
from cluster.cli import cluster_app, job_app
from raytwin.models_cli import models_app
from serve_apps.cli import keys_app, serve_app
from sweeps.cli import calibrate_app, rerun, runs_app, sweep_app

app = typer.Typer(help="RayTwin: live digital twins and scenario sweeps on Ray.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster", help="KubeRay manifests and a local multi-node Ray cluster.")
app.add_typer(job_app, name="job", help="Submit and follow Ray jobs with RayTwin's runtime environment.")
app.add_typer(twins_app, name="twins",
              help="Live twins: state from the store, dead letters, compaction, retention, shard measurement.")
app.add_typer(sweep_app, name="sweep", help="What-if scenario sweeps.")
app.add_typer(calibrate_app, name="calibrate", help="Fit model parameters to telemetry with Ray Tune.")
app.add_typer(runs_app, name="runs", help="Recorded sweep and calibration runs.")
app.command("rerun")(rerun)
app.add_typer(serve_app, name="serve", help="Serve the HTTP API on Ray Serve.")
app.add_typer(keys_app, name="keys", help="Create and list API keys (stored hashed).")
app.add_typer(bench_app, name="bench", help="Benchmarks against baselines measured in the same run.")
app.add_typer(models_app, name="models", help="Models: the declared ones, a declaration, the registration checks.")


@app.command()
def version() -> None:
    """Print the RayTwin version and the versions of its main dependencies."""
    from raytwin.provenance import package_versions

    for name, ver in package_versions().items():
        typer.echo(f"{name} {ver}")


@app.command()
def demo(
    scenarios: int = typer.Option(2000, help="Scenarios in the demo sweep."),
    twins: int = typer.Option(20, help="Live twins fed by the replayed telemetry stream."),
    workdir: str = typer.Option(None, help="Keep the demo's data here (default: a temporary directory)."),
) -> None:
    """Run the whole loop on an embedded local Ray: simulate, track, calibrate, sweep, rerun."""
    from raytwin.demo import run_demo

    run_demo(scenarios=scenarios, twins=twins, workdir=workdir)


if __name__ == "__main__":
    app()
