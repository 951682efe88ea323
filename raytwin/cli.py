"""The `raytwin` command-line tool.

The core owns `version`, `models` and `registry`; every other command belongs to a bounded context (actors, sweeps,
serve_apps, cluster, benchmarks, demo, or another installed distribution) and is mounted from the
entry-point group ``raytwin.commands`` (see `raytwin.commands`), so the core imports no upper layer.
"""

from __future__ import annotations

import typer

from raytwin.commands import mount_commands
from raytwin.lifecycle_cli import registry_app
from raytwin.models_cli import models_app

app = typer.Typer(help="RayTwin: live digital twins and scenario sweeps on Ray.", no_args_is_help=True)
app.add_typer(models_app, name="models", help="Models: the declared ones, a declaration, the registration checks.")
app.add_typer(registry_app, name="registry",
              help="Model versions through candidate, staging, production, archived; the audited log; retention.")
mount_commands(app)


@app.command()
def version() -> None:
    """Print the RayTwin version and the versions of its main dependencies."""
    from raytwin.provenance import package_versions

    for name, ver in package_versions().items():
        typer.echo(f"{name} {ver}")


if __name__ == "__main__":
    app()
