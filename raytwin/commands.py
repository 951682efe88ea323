"""Commands of the `raytwin` CLI, contributed by the bounded contexts and by other distributions.

A context declares its commands as entry points in the group ``raytwin.commands`` (pyproject.toml,
``[project.entry-points."raytwin.commands"]``): the entry's name is the command, its value
``module:attribute`` a `typer.Typer` (mounted as a command group) or a function (mounted as one
command). The core never imports an upper layer by name; it loads what the entries point at.

Entries come from the installed distributions' metadata, except RayTwin's own when it runs from a
source checkout: those are read from the checkout's pyproject.toml, because an editable install keeps
the metadata of the pyproject it was installed from (reinstall to refresh it).
"""

from __future__ import annotations

import tomllib
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import typer

GROUP = "raytwin.commands"
DISTRIBUTION = "raytwin"
SOURCE_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


class CommandRegistrationError(RuntimeError):
    """Two entry points claim one command, or an entry point names something that is not a command."""


def source_entry_points(pyproject: Path = SOURCE_PYPROJECT) -> list[EntryPoint] | None:
    """RayTwin's own command entries from a source checkout's pyproject.toml; None outside a checkout."""
    if not pyproject.is_file():
        return None
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    if project.get("name") != DISTRIBUTION:
        return None
    declared = project.get("entry-points", {}).get(GROUP, {})
    return [EntryPoint(name, value, GROUP) for name, value in declared.items()]


def command_entry_points(
    installed: list[EntryPoint] | None = None, source: list[EntryPoint] | None = None
) -> list[EntryPoint]:
    """Every command entry, sorted by name: `installed` (default: the metadata's) with RayTwin's own
    replaced by `source` (default: the checkout's, when there is one)."""
    installed = list(entry_points(group=GROUP)) if installed is None else installed
    source = source_entry_points() if source is None else source
    if source is not None:
        installed = [ep for ep in installed if ep.dist is None or ep.dist.name != DISTRIBUTION]
    found: dict[str, EntryPoint] = {}
    for ep in installed + (source or []):
        if ep.name in found and found[ep.name].value != ep.value:
            raise CommandRegistrationError(
                f"command {ep.name!r} is registered twice in {GROUP}: {found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    return [found[name] for name in sorted(found)]


def mount_commands(app: typer.Typer, eps: list[EntryPoint] | None = None) -> None:
    """Mount each command entry (default: `command_entry_points()`) on `app`."""
    for ep in command_entry_points() if eps is None else eps:
        target = ep.load()
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=ep.name)
        elif callable(target):
            app.command(ep.name)(target)
        else:
            raise CommandRegistrationError(
                f"entry point {ep.name} = {ep.value} in {GROUP} is neither a typer.Typer nor a function"
            )
