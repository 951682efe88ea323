"""Live model changes across a service's shards: shadow evaluations and hot swaps.

`LiveModels` talks to the twin shards directly (by their handles), so the driver's `TwinService`
and a Serve ingress (which looks the shards up by name) use the same code.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import GetTimeoutError

from actors.routing import shard_index
from actors.shadow import ShadowTwinReport, refuse_foreign
from actors.state import UnknownTwin
from actors.state import TwinState
from actors.swap import SwapMark, SwapRefused
from raytwin.registry import ModelArtifact
from raytwin.shadow import Comparison, InnovationStats, compare
from raytwin.statestore import to_micros


class UnknownShadow(KeyError):
    """No shadow evaluation of this candidate for this tenant (none started, or it was stopped)."""

    def __str__(self) -> str:
        return str(self.args[0])


class ShadowReport(BaseModel):
    """A shadow evaluation's state: each sampled twin, and the comparison over all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    run_id: str
    candidate_ref: str
    target_events: int = Field(description="events to score per twin")
    done: bool = Field(description="every sampled twin scored its target events")
    comparison: Comparison
    twins: list[ShadowTwinReport]


class SwapOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    states: list[TwinState] = Field(description="each swapped twin's state right after the swap")
    refused: dict[str, str] = Field(description="asset id -> why its twin keeps its model")
    unfinished: str | None = Field(None, description="why twins not named here may keep their model: a shard left "
                                   "the read of its twins (`swap_marks`), or their swap, unanswered; None when every "
                                   "shard answered")


class LiveModels:
    """Shadow evaluations and hot swaps of the twins held by `handles` (the shard actors, in index order)."""

    def __init__(self, handles: Sequence[Any]):
        self.handles = list(handles)

    def _shard(self, tenant: str, asset_id: str) -> Any:
        return self.handles[shard_index(tenant, asset_id, len(self.handles))]

    def twins_of_model(self, tenant: str, model: str, other_than: str | None = None,
                       running: str | None = None, timeout_s: float | None = None) -> list[str]:
        """The tenant's twins now running a version of `model` (other than `other_than`, and `running`, each a
        ``name@version``, where given); `GetTimeoutError` when a shard leaves it unanswered for `timeout_s`."""
        return sorted(a for part in ray.get([h.twins_of_model.remote(tenant, model, other_than, running)
                                             for h in self.handles], timeout=timeout_s) for a in part)

    def swap_marks(self, tenant: str, model: str, other_than: str | None = None,
                   timeout_s: float | None = None) -> dict[str, SwapMark]:
        """`twins_of_model`, each twin with its `SwapMark` as read (to plan a swap on: `swap`'s `marks`);
        `GetTimeoutError` when a shard leaves it unanswered for `timeout_s` (a hung shard hung the swap's caller)."""
        return {a: mark for part in ray.get([h.swap_marks.remote(tenant, model, other_than) for h in self.handles],
                                            timeout=timeout_s) for a, mark in part.items()}

    def twins_running(self, tenant: str, ref: str, timeout_s: float | None = None) -> list[str]:
        """The tenant's twins whose version for events from now on is `ref` (``name@version``): after a hot swap
        a twin runs a version its catalog entry does not name. One question to each shard (two, a set apart,
        could miss a swap landing between them)."""
        return self.twins_of_model(tenant, ref.partition("@")[0], running=ref, timeout_s=timeout_s)

    def start_shadow(self, tenant: str, candidate: ModelArtifact, *, events: int, asset_ids: list[str] | None = None,
                     sample: int | None = None, timeout_s: float | None = None) -> tuple[str, list[str]]:
        """Score `candidate` beside production on the next `events` events of each twin in `asset_ids`,
        or of a sample of `sample` twins running a version of its model (a stable pseudo-random pick);
        returns (run id, the twins sampled). Refused while an evaluation of `candidate` runs, and for twins
        that do not exist (`UnknownTwin`) or run another model (`actors.shadow.ShadowRefused`): checked on
        every shard before any starts. `GetTimeoutError` when a shard leaves a call unanswered for `timeout_s` (each
        step's; a hung shard hung the caller): in the start itself, the shards that answered run the evaluation."""
        if (asset_ids is None) == (sample is None):
            raise ValueError("give either asset_ids or sample (how many of the model's twins to shadow)")
        run_id = uuid.uuid4().hex[:16]
        if asset_ids is None:
            pool = self.twins_of_model(tenant, candidate.name, timeout_s=timeout_s)
            pool.sort(key=lambda a: zlib.crc32(f"{run_id}/{a}".encode()))
            asset_ids = sorted(pool[:sample])
        if not asset_ids:
            raise ValueError(f"tenant {tenant!r} has no twin of model {candidate.name} to shadow")
        by_shard: dict[int, list[str]] = {}
        for a in asset_ids:
            by_shard.setdefault(shard_index(tenant, a, len(self.handles)), []).append(a)
        models = {a: m for part in ray.get([self.handles[i].twin_models.remote(tenant, ids)
                                            for i, ids in by_shard.items()], timeout=timeout_s)
                  for a, m in part.items()}
        if missing := sorted(set(asset_ids) - set(models)):
            raise UnknownTwin(f"no twin {', '.join(missing)} for tenant {tenant!r}")
        refuse_foreign(models, candidate)
        body = candidate.model_dump(mode="json")
        ray.get([self.handles[i].start_shadow.remote(run_id, tenant, ids, body, events) for i, ids in by_shard.items()],
                timeout=timeout_s)
        return run_id, sorted(asset_ids)

    def shadow(self, tenant: str, ref: str, timeout_s: float | None = None) -> ShadowReport:
        """The evaluation of candidate `ref` so far (`UnknownShadow` if none runs); `GetTimeoutError` when a shard
        leaves it unanswered for `timeout_s`."""
        found = [r for r in ray.get([h.shadow_report.remote(tenant, ref) for h in self.handles], timeout=timeout_s)
                 if r is not None]
        if not found:
            raise UnknownShadow(f"no shadow evaluation of {ref} for tenant {tenant!r}: start one first")
        twins = sorted((t for _, part in found for t in part), key=lambda t: t.asset_id)
        production, candidate = InnovationStats(), InnovationStats()
        for t in twins:
            production = production.merge(InnovationStats(*t.production_stats))
            candidate = candidate.merge(InnovationStats(*t.candidate_stats))
        return ShadowReport(run_id=found[0][0], candidate_ref=ref, target_events=twins[0].target_events,
                            done=all(t.done for t in twins), comparison=compare(production, candidate), twins=twins)

    def shadows_running(self, timeout_s: float | None = None) -> list[tuple[str, str]]:
        """The (tenant, candidate ref) of every evaluation running, of every tenant; `GetTimeoutError` when a shard
        leaves it unanswered for `timeout_s`."""
        return sorted({key for part in ray.get([h.shadows_running.remote() for h in self.handles], timeout=timeout_s)
                       for key in part})

    def stop_shadow(self, tenant: str, ref: str, timeout_s: float | None = None) -> bool:
        """End the evaluation of `ref` (False: none ran); `GetTimeoutError` when a shard leaves it unanswered for
        `timeout_s` (the shards that answered ended theirs)."""
        return any(ray.get([h.stop_shadow.remote(tenant, ref) for h in self.handles], timeout=timeout_s))

    def swap(self, tenant: str, artifact: ModelArtifact, at: datetime, asset_ids: list[str] | None = None, *,
             marks: dict[str, SwapMark] | None = None, timeout_s: float | None = None) -> SwapOutcome:
        """Hot-swap twins to `artifact` for events at or after `at` (timezone-aware): `asset_ids`, or those of
        `marks`, or every twin of the tenant running a version of its model. Each twin's swap is durable before it
        applies; a twin that cannot take it (`actors.swap.SwapRefused`) keeps its model and is named
        in `refused` with the reason. `marks` (`swap_marks` as read): each twin only while still at its mark, so that
        a swap planned on a read does not undo one that landed since (refused). Answers wait `timeout_s` in all (a
        hung shard hung the swap's caller): twins whose shard left theirs unanswered are named in `unfinished` (the
        read of the twins, without `asset_ids` or `marks`, raises `GetTimeoutError` instead: none was asked)."""
        if at.tzinfo is None:
            raise ValueError("the swap boundary needs a timezone-aware datetime")
        if asset_ids is None:
            asset_ids = list(marks) if marks is not None else self.twins_of_model(tenant, artifact.name,
                                                                                  timeout_s=timeout_s)
        body, at_us = artifact.model_dump(mode="json"), to_micros(at)
        refs = {a: self._shard(tenant, a).swap_model.remote(tenant, a, body, at_us, (marks or {}).get(a))
                for a in asset_ids}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        states, refused, unanswered = [], {}, []
        for a, ref in refs.items():
            try:
                state = ray.get(ref, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except SwapRefused as exc:  # Ray's error for it is also a SwapRefused
                refused[a] = str(exc).strip().splitlines()[-1].removeprefix("actors.swap.SwapRefused: ")
                continue
            except GetTimeoutError:
                unanswered.append(a)
                continue
            if state is None:
                raise KeyError(f"no twin {a!r} for tenant {tenant!r}")
            states.append(state)
        return SwapOutcome(states=states, refused=refused, unfinished=None if not unanswered else (
            f"the shards of twins {', '.join(unanswered)} left their swap to {artifact.ref} unanswered for "
            f"{timeout_s:g} s (hung or stalled): each takes it when its shard gets to it, unless another swap moved "
            "the twin meanwhile, and runs the version it ran until then"))
