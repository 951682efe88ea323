"""Checking a job entrypoint that calls `raytwin` against the real command line, without running it.

A RayJob or Ray job whose entrypoint is not a valid command fails only once its cluster is up (minutes and
a whole cluster later). `check_raytwin_entrypoint` parses such an entrypoint with the click commands behind
`raytwin` (`raytwin.cli.app`): an unknown command or option, a missing argument or a value of the wrong
type is refused at once. Files named in the entrypoint are not required to exist here (they live on the
cluster). Entrypoints that do not start with ``raytwin`` or ``python -m raytwin.cli`` are not checked.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shlex
from collections.abc import Sequence
from typing import Any

import typer
import typer.core


def raytwin_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``raytwin`` / ``python -m raytwin.cli`` in `argv`; None when it runs something else."""
    if argv and os.path.basename(argv[0]) == "raytwin":
        return list(argv[1:])
    if len(argv) >= 3 and os.path.basename(argv[0]).startswith("python") and list(argv[1:3]) == ["-m", "raytwin.cli"]:
        return list(argv[3:])
    return None


def check_raytwin_entrypoint(argv: Sequence[str]) -> None:
    """Raise `ValueError` (one line: what is wrong, where to look) if `argv` is an invalid `raytwin` command."""
    args = raytwin_args(argv)
    if args is None or "--help" in args:  # not ours, or help: nothing to check (and parsing would print it)
        return
    from raytwin.cli import app  # here, not at import: raytwin.cli imports the cluster CLI

    command: Any = typer.main.get_command(app)
    name, parent = "raytwin", None
    try:
        while isinstance(command, typer.core.TyperGroup):
            parent = typer.Context(command, info_name=name, parent=parent)
            if not args or args[0].startswith("-"):  # the groups' only options print help or install completion
                parent.fail("Missing command." if not args else f"Expected a command, got {args[0]!r}.")
            resolved, sub, args = command.resolve_command(parent, args)
            if resolved is None or sub is None:
                parent.fail(f"No such command {args[0]!r}.")
            name, command = resolved, sub
        _without_local_file_checks(command).make_context(name, list(args), parent=parent)
    except typer.TyperException as exc:  # typer's usage errors: unknown command/option, missing or bad value
        where = " ".join(c.info_name or "" for c in _lineage(getattr(exc, "ctx", None))) or "raytwin"
        raise ValueError(f"entrypoint `{shlex.join(argv)}` is not a valid raytwin command: "
                         f"{exc.format_message()} (see `{where} --help`)") from None


def _lineage(ctx: Any) -> list[Any]:
    chain = []
    while ctx is not None:
        chain.insert(0, ctx)
        ctx = ctx.parent
    return chain


def _without_local_file_checks(command: Any) -> Any:
    """A copy of `command` whose path parameters do not require the file to exist on this machine.

    (Eager options, which act while parsing, are only ``--help`` here, excluded above.)"""
    lenient = copy.copy(command)
    lenient.params = []
    for param in command.params:
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is not None and getattr(descriptor.parameter_info, "exists", False):
            info = copy.copy(descriptor.parameter_info)
            info.exists = False
            param = copy.copy(param)
            param.type_descriptor = dataclasses.replace(descriptor, parameter_info=info)
        lenient.params.append(param)
    return lenient
