"""Ray Tune's console output, kept off a caller's stdout: a command's stdout is its answer.

Tune prints even at ``verbose=0``: its experiment table, "View detailed results here: <folder>" (a temporary
folder the fit removes once it returns) and a TensorBoard hint for artifacts nobody keeps. `fit_quietly` logs
them at debug level instead, for whoever debugs a search."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any


def fit_quietly(tuner: Any, log: logging.Logger) -> Any:
    """``tuner.fit()`` (a `ray.tune.Tuner`) with what Tune prints on stdout logged to `log` at debug level."""
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        grid = tuner.fit()
    log.debug("tune output:\n%s", chatter.getvalue())
    return grid
