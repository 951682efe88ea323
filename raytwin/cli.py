"""The `raytwin` command-line tool.

The core owns `version`, `models` and `registry`; every other command belongs to a bounded context (actors, sweeps,
serve_apps, cluster, benchmarks, demo, or another installed distribution) and is mounted from the
entry-point group ``raytwin.commands`` (see `raytwin.commands`), so the core imports no upper layer.
"""

from __future__ import annotations

import sys

import typer

from raytwin.cli_help import flowing
from raytwin.commands import mount_commands
from raytwin.lifecycle_cli import registry_app
from raytwin.models_cli import models_app
from raytwin.store_failures import StoreIOError

EX_TEMPFAIL = 75
"""The exit status of a command the store's outage stopped (sysexits' "try again later"): scripts retry it."""

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


flowing(app)  # every command is registered by now


def main() -> None:
    """The `raytwin` script: `app`, with a store outage (`StoreIOError`, from any command) told in one line and exit
    status `EX_TEMPFAIL` rather than a traceback: the command was right, the store failed it, and a retry once the
    store is back is the fix."""
    try:
        app()
    except StoreIOError as exc:
        typer.echo(f"raytwin: the store failed a {exc.operation} ({exc.error}: {exc}); nothing is wrong with the "
                   "command: run it again once the store is back", err=True)
        sys.exit(EX_TEMPFAIL)


if __name__ == "__main__":
    main()
