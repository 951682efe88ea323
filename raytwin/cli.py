"""The `raytwin` command-line tool.

The core owns `version` and `models`; every other command belongs to a bounded context (actors, sweeps,
serve_apps, cluster, benchmarks, demo, or another installed distribution) and is mounted from the
entry-point group ``raytwin.commands`` (see `raytwin.commands`), so the core imports no upper layer.
"""

from __future__ import annotations

import typer

from raytwin.commands import mount_commands
from raytwin.models_cli import models_app

app = typer.Typer(help="RayTwin: live digital twins and scenario sweeps on Ray.", no_args_is_help=True)
app.add_typer(models_app, name="models", help="Models: the declared ones, a declaration, the registration checks.")
mount_commands(app)


@app.command()
def version() -> None:
    """Print the RayTwin version and the versions of its main dependencies."""
    from raytwin.provenance import package_versions

    for name, ver in package_versions().items():
        typer.echo(f"{name} {ver}")


if __name__ == "__main__":
    app()
