"""`raytwin demo`, mounted through the ``raytwin.commands`` entry points."""

from __future__ import annotations

import typer


def demo(
    scenarios: int = typer.Option(2000, help="Scenarios in the demo sweep."),
    twins: int = typer.Option(20, help="Live twins fed by the replayed telemetry stream."),
    workdir: str = typer.Option(None, help="Keep the demo's data here (default: a temporary directory)."),
) -> None:
    """Run the whole loop on an embedded local Ray: simulate, track, calibrate, sweep, rerun."""
    from demo.loop import run_demo

    run_demo(scenarios=scenarios, twins=twins, workdir=workdir)
