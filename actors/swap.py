"""Hot swap: a twin changes model version at an event-time boundary.

Events with event time < the boundary are applied by the old version, those >= it by the new one,
whatever order they arrive in: a twin's state stays a pure function of its sorted events and its
swaps, so a late event before the boundary rewinds, is applied by the old model, and the estimate
is carried over again at the boundary; recovery and time travel rebuild the same states. The
carry-over (`map_state`) keeps the estimate and covariance of the states both versions share (by
name, same unit); a state only the new version has starts from the new version's prior (the filter
re-estimates it from the measurements); a version sharing no state with the old one is refused.
The filter's innovation statistics and drift detector restart with the new version.

Swaps are durable before they take effect (`StateStore.save_model_swaps`), so a restarted shard
rebuilds the twin with them; unlike a registration they outlive `unregister` (they are history).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from raytwin.estimation import Divergence, ExtendedKalmanFilter, FilterState
from raytwin.registry import ModelArtifact
from raytwin.sim.model import Declared


class SwapRefused(ValueError):
    """A model swap that cannot apply to the twin: the message says why and what to do."""


class Segment(NamedTuple):
    """A model version's span of a twin's event time: from `start_us` (None: from the prior) on."""

    start_us: int | None
    artifact: ModelArtifact
    filter: ExtendedKalmanFilter
    prior: FilterState


SwapMark = tuple[str, int | None]
"""Where a twin's model stands: its version for events from now on and the boundary that version starts at
(None: from the prior). Every swap moves the boundary on, so a swap planned on a mark read earlier goes ahead only
while the twin is still there (`actors.shard_models.LiveModelOps.swap_model`'s `from_mark`): a later swap stands."""


def swap_mark(segments: list[Segment]) -> SwapMark:
    """The `SwapMark` of a twin whose model segments are `segments` (`actors.twin.Twin.segments`)."""
    return segments[-1].artifact.ref, segments[-1].start_us


def incompatibility(old: Declared, new: Declared) -> str | None:
    """Why an estimate of `old` cannot be carried over to `new` (None: it can): its telemetry columns differ
    (its events would not be comparable), it shares no state with `old`, or shared states change unit.
    Checked before any filter of `new` is built (that compiles its kernels)."""
    measured = lambda m: tuple(dict.fromkeys((*m.input_names, *m.output_names)))  # noqa: E731 (filter columns)
    if measured(old) != measured(new):
        return (f"model {new.name} measures {list(measured(new))}, the twin's model {old.name} "
                f"{list(measured(old))}: not the same inputs and outputs")
    old_units = {s.name: s.unit for s in old.states}
    shared = [s for s in new.states if s.name in old_units]
    if not shared:
        return (f"model {new.name} shares no state with {old.name} (states {list(new.state_names)} vs "
                f"{list(old.state_names)}): there is no mapping of the estimate")
    if bad := [f"{s.name} ({old_units[s.name]} -> {s.unit})" for s in shared if s.unit != old_units[s.name]]:
        return f"states change unit between the versions: {', '.join(bad)}; no mapping of the estimate"
    return None


def check_compatible(old: Declared, new: Declared) -> None:
    """Refuse swapping a twin of `old` to `new` where the estimate cannot be carried over (`incompatibility`)."""
    if (why := incompatibility(old, new)) is not None:
        raise SwapRefused(f"{why}: a swap needs the same inputs and outputs and a shared state in the same unit; "
                          "register a new twin for the new asset type instead")


def map_state(fs: FilterState, old: ExtendedKalmanFilter, new: ExtendedKalmanFilter, prior: FilterState) -> FilterState:
    """The estimate `fs` of `old` carried over to `new` (see the module docstring)."""
    old_idx = {n: i for i, n in enumerate(old.model.state_names)}
    keep = [(j, old_idx[n]) for j, n in enumerate(new.model.state_names) if n in old_idx]
    J, I = np.array([j for j, _ in keep]), np.array([i for _, i in keep])
    x, P = prior.x.copy(), prior.P.copy()
    x[J] = fs.x[I]
    P[J, :] = 0.0
    P[:, J] = 0.0
    P[np.ix_(J, J)] = fs.P[np.ix_(I, I)]
    old_u = dict(zip(old.model.input_names, fs.u.tolist()))
    u = np.array([old_u.get(n, v) for n, v in zip(new.model.input_names, prior.u.tolist())], dtype=np.float64)
    return FilterState(fs.t, x, P, u, Divergence())


def swap_entries(swaps: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """The stored swaps as (boundary, artifact JSON), boundaries increasing."""
    return sorted((int(s["at_us"]), s["artifact"]) for s in swaps)
