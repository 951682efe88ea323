"""`raytwin bench` / `python -m benchmarks`: run benchmarks, print the table, write the JSON record."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from raytwin.cli_help import flowing

bench_app = typer.Typer(help="Measure RayTwin against its baselines in the same run.", no_args_is_help=True)


@bench_app.command("list")
def list_benchmarks() -> None:
    """List the benchmarks by name."""
    from benchmarks.harness import load_benchmarks

    for bench in load_benchmarks().values():
        typer.echo(f"{bench.name}\t{bench.description}")


@bench_app.command("report")
def report(results: Path = typer.Argument(..., exists=True, dir_okay=False, help="A JSON file written by `run`.")) -> None:
    """Print a run's figures as Markdown (the table in benchmarks/RESULTS.md)."""
    import json

    from benchmarks.harness import markdown_table

    try:
        record = json.loads(results.read_text())
        typer.echo(markdown_table(record), nl=False)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise typer.BadParameter(f"{results} is not a benchmark results file ({exc})", param_hint="RESULTS") from None


@bench_app.command("run")
def run(
    names: list[str] = typer.Argument(None, help="Benchmarks to run (default: all); see `list`."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes and no warm-up runs: checks the harness end to end in seconds."),
    repeat: int = typer.Option(5, min=1, help="Timed repetitions per measurement (after warm-up)."),
    out: Path = typer.Option(None, help="JSON results file (default: runs/bench/bench-<UTC time>.json)."),
    log_level: str = typer.Option("INFO", help="Progress log level (key=value lines on stderr)."),
) -> None:
    """Run benchmarks; print a table (figure, value, baseline, ratio, target) and write JSON."""
    from rich.console import Console

    from benchmarks.harness import BenchContext, default_output_path, render_table, run_benchmarks, write_json

    # in-process GPU runs and Ray's GPU tasks share one GPU: no process may preallocate most of it
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        record = run_benchmarks(names, BenchContext.for_run(quick=quick, repeat=repeat))
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0]), param_hint="NAMES") from None
    path = write_json(record, out or default_output_path())
    Console(width=160).print(render_table(record))
    typer.echo(f"results written to {path}")
    failed = [name for name, r in record["benchmarks"].items() if "error" in r]
    if failed:
        typer.echo(f"failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


flowing(bench_app)  # `python -m benchmarks`: every command is registered by now
