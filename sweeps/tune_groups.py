"""Tune's placement groups named after the search's owner, so that a killed search's can be found and removed.

Tune removes a trial's placement group when the trial ends, and all of them when the search ends (on an error
too), but a search whose process is killed (an OOM kill, its owner's death, ``ray.cancel(force=True)``) leaves
them reserved for the life of the Ray job: for a search the `Backend` started, for good, one more with each
killed attempt. A search run under `owned_by(owner)` names each of its placement groups
``raytwin-tune:{owner}:{unique}``; `remove_groups(owner)` removes whatever is left of them once the search is
known to be over (failed, killed, or about to be launched again): exactly that owner's, never those of an owner
whose name merely starts with it (identifiers may hold ":", so tenant ``acme:recal-acme-1``'s groups began with
tenant ``acme``'s job ``recal-acme-1`` prefix, and that job's cleanup removed another tenant's running search's).

The named groups themselves are `sweeps.tune_resources`' (which imports Ray Tune, ~0.5 s: not a cost of the API's
processes, which only remove groups).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

log = logging.getLogger("raytwin.calibration")

PREFIX = "raytwin-tune:"
_OWNER: ContextVar[str | None] = ContextVar("tune_owner", default=None)


@contextmanager
def owned_by(owner: str) -> Iterator[None]:
    """Tune searches started inside name their placement groups after `owner` (unique per search: a job key)."""
    token = _OWNER.set(owner)
    try:
        yield
    finally:
        _OWNER.reset(token)


def current_owner() -> str | None:
    """The owner of the searches started here (`owned_by`), None outside one."""
    return _OWNER.get()


def remove_groups(owner: str) -> int:
    """Remove the placement groups that searches of `owner` left (call it only when none of them runs);
    how many. Without Ray connected there are none."""
    if not ray.is_initialized():
        return 0
    left = [pg_id for pg_id, group in placement_group_table().items()
            if group_owner(group["name"]) == owner and group["state"] != "REMOVED"]
    for pg_id in left:
        remove_placement_group(_group(pg_id))
    if left:
        log.warning("event=tune_groups_removed owner=%s groups=%d: left by a search whose process was killed",
                    owner, len(left))
    return len(left)


def group_owner(name: str) -> str | None:
    """The owner a group's name ``{PREFIX}{owner}:{unique}`` names (`unique` has no ":"), or None (not one of ours)."""
    if not name.startswith(PREFIX) or ":" not in name[len(PREFIX):]:
        return None
    return name[len(PREFIX):].rsplit(":", 1)[0]


def _group(pg_id: str) -> Any:
    from ray._raylet import PlacementGroupID

    return PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
