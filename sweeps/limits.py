"""The size limit of a sweep, shared by the library (`sweeps.runner.run_sweep`, `sweeps.runs.recorded_sweep`) and
`raytwin sweep run`: a sweep of more scenarios than `MAX_SCENARIOS` is refused before it starts, saying what it
would write and how to run it anyway. Light (no JAX, no Ray): the CLI reads it for its options' defaults."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sweeps.space import ScenarioSpace

MAX_SCENARIOS = 100_000_000
"""Bigger sweeps are refused unless `max_scenarios` (``--max-scenarios``) allows them: 10^12 scenarios were accepted
and wrote 30 MB/s towards ~100 TB, and a Python run of 10^9 LHS scenarios died in the driver with a MemoryError
drawing its design; 10^8 scenarios of a dozen metrics write ~10 GB."""


class SweepTooLarge(ValueError):
    """A sweep over a size limit; the message says what it would write and how to run it."""


def keyword(name: str, value: str) -> str:
    """How the library names a limit: the keyword argument (``max_scenarios=3``)."""
    return f"{name}={value}"


def check_size(space: ScenarioSpace, n_steps: int, metric_columns: int, *, max_scenarios: int = MAX_SCENARIOS,
               max_work: int | None = None, option: Callable[[str, str], str] = keyword, per_output: int = 0) -> None:
    """Raise `SweepTooLarge` for a sweep of more than `max_scenarios` scenarios or `max_work` scenario-steps (None:
    no such limit), with what it would write (8 bytes a value: sweep metrics are random floats that barely
    compress) and compute: 1,000 scenarios of 1e7 steps ran for minutes with no word of the work they asked for.
    `option(name, value)` names a limit as the caller takes it (a keyword argument, a command-line option).
    `per_output`: metric columns for each output of a model not loaded to size the message (an FMU, which is
    downloaded and read to be loaded), said as so much more for each output."""
    n = space.size
    work = n * n_steps
    over = [("max_scenarios", max_scenarios, n)] if n > max_scenarios else []
    over += [("max_work", max_work, work)] if max_work is not None and work > max_work else []
    if not over:
        return
    values = 1 + len(space.columns) + metric_columns  # the scenario index, its dimension values, its metrics
    each_output = f" plus {_size(8 * per_output * n)} for each of the model's outputs ({per_output} values a " \
        "scenario each)" if per_output else ""
    raise SweepTooLarge(
        f"{n:,} scenarios of {n_steps:,} steps would write about {_size(8 * values * n)} ({values} values a "
        f"scenario){each_output} and compute {work:.3g} scenario-steps: more than "
        f"{' and '.join(option(name, f'{limit:,}') for name, limit, _ in over)}; pass "
        f"{' '.join(option(name, str(asked)) for name, _, asked in over)} to run it, or run it as several smaller "
        "sweeps (a smaller design: fewer levels or a smaller n each), a shorter horizon_s or a longer step_s")


def _size(n_bytes: float) -> str:
    """`n_bytes` in decimal units (``72 TB``)."""
    exponent = min(int(math.log10(max(n_bytes, 1)) // 3), 5)
    return f"{n_bytes / 1000 ** exponent:.3g} {('B', 'kB', 'MB', 'GB', 'TB', 'PB')[exponent]}"
