"""A Tune trial's resources whose placement groups are named after the search's owner (`sweeps.tune_groups`)."""

from __future__ import annotations

import uuid

from ray.tune import PlacementGroupFactory
from ray.util.placement_group import PlacementGroup, placement_group

from sweeps.tune_groups import PREFIX, current_owner


class NamedGroups(PlacementGroupFactory):
    """A trial's resources (one bundle) whose placement groups are named ``{PREFIX}{owner}:{unique}``
    (names are unique in a namespace, and Tune may hold several groups of one request at once)."""

    def __init__(self, bundle: dict[str, float], owner: str):
        super().__init__([bundle])
        self.owner = owner

    def to_placement_group(self) -> PlacementGroup:
        return placement_group(*self._bound.args, **{**self._bound.kwargs,
                                                     "name": f"{PREFIX}{self.owner}:{uuid.uuid4().hex}"})


def trial_resources(cpus: float) -> NamedGroups:
    """A trial's resources, its groups named after the current owner (`owned_by`), else after this search alone."""
    return NamedGroups({"CPU": cpus}, current_owner() or f"search-{uuid.uuid4().hex}")
