"""Help that flows: Typer's rich help prints a docstring's later paragraphs, and each command's summary in a group's
list, with the line breaks of the source (wrapped at 120 columns there), so `--help` broke lines mid-sentence at
every terminal width. `flowing` joins the lines of each paragraph once, where an app is built."""

from __future__ import annotations

import inspect
import re

import typer


def flowing(app: typer.Typer) -> typer.Typer:
    """`app` with the help of it, its commands and its groups (theirs too, all the way down) flowing: each paragraph
    (blank-line separated) of a help given or of a callback's docstring one line, which the terminal wraps. Where
    each help comes from (Typer's order of them) stays as it was."""
    for info in (app.info, app.registered_callback, *app.registered_commands, *app.registered_groups):
        if info is None:
            continue
        if isinstance(info.help, str):  # (else None, or Typer's placeholder for a help not given)
            info.help = flowed(info.help)
        if info.callback is not None and info.callback.__doc__:
            info.callback.__doc__ = flowed(info.callback.__doc__)
    for group in app.registered_groups:
        flowing(group.typer_instance)
    return app


def flowed(text: str) -> str:
    """`text` (a docstring) with the lines of each paragraph joined."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
