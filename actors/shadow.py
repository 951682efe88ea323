"""Shadow evaluations held by a shard: a candidate model version scored beside production on live events.

Each sampled twin gets two private filter states, both started from the twin's estimate when the
shadow starts: production's (a copy) and the candidate's (the estimate carried over as in a hot
swap, `actors.swap.map_state`). Every event the twin accepts afterwards is scored by both
(`raytwin.shadow.score_event`) and then applied to both, until `events` were scored. The served
twin is never touched, so its state is bit-identical to a run without the shadow.

Why bounded: a shadow costs ~3 small filter dispatches per event per version, so it runs on a
sample of twins (at most `MAX_TWINS` per evaluation) and for a fixed number of events. Shadows
live in the shard's memory: a shard restart ends them (start again); their outcome is durable
once concluded on the lifecycle log (`raytwin.shadow.conclude`). Late events (before one already
scored) are skipped by the shadow, which scores events in arrival order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from actors.swap import check_compatible, map_state
from actors.twin import Pending, Twin
from raytwin.estimation import ExtendedKalmanFilter, FilterState
from raytwin.registry import ModelArtifact
from raytwin.shadow import InnovationStats, InnovationSummary, check_scorable, score_event
from raytwin.statestore import EventKey

log = logging.getLogger("raytwin.twins")
MAX_TWINS = 100
"""Twins one shadow evaluation may sample (each costs two extra filters per event)."""
MAX_EVENTS = 100_000
"""Events per twin one shadow evaluation may score."""


class ShadowRunning(ValueError):
    """A shadow evaluation of this candidate is running already."""


class ShadowTwinReport(BaseModel):
    """One twin's comparison so far; `stats` are the raw sums (`raytwin.shadow.InnovationStats`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    asset_id: str
    production_ref: str
    candidate_ref: str
    target_events: int
    skipped_late: int = Field(description="events not scored: older than one already scored")
    done: bool
    production_stats: tuple[int, int, int, float, float, float]
    candidate_stats: tuple[int, int, int, float, float, float]
    production: InnovationSummary
    candidate: InnovationSummary


@dataclass
class _Side:
    filter: ExtendedKalmanFilter
    fs: FilterState
    stats: InnovationStats = InnovationStats()

    def step(self, e: Pending) -> None:
        self.stats = self.stats.add(*score_event(self.filter, self.fs, e.key[0] / 1e6, e.values, e.use_outputs))
        self.fs = self.filter.assimilate_many(self.fs, [e.key[0] / 1e6], [e.values], [e.use_outputs]).state(0)


@dataclass
class ShadowTwin:
    asset_id: str
    production_ref: str
    candidate_ref: str
    target: int
    production: _Side
    candidate: _Side
    last_key: EventKey | None
    skipped: int = 0

    @property
    def done(self) -> bool:
        return self.candidate.stats.events >= self.target

    def observe(self, events: list[Pending]) -> None:
        for e in sorted(events, key=lambda e: e.key):
            if self.done:
                return
            if self.last_key is not None and e.key <= self.last_key:
                self.skipped += 1
                continue
            self.production.step(e)
            self.candidate.step(e)
            self.last_key = e.key

    def report(self) -> ShadowTwinReport:
        p, c = self.production.stats, self.candidate.stats
        return ShadowTwinReport(asset_id=self.asset_id, production_ref=self.production_ref,
                                candidate_ref=self.candidate_ref, target_events=self.target, skipped_late=self.skipped,
                                done=self.done, production_stats=tuple(p), candidate_stats=tuple(c),
                                production=p.summary(), candidate=c.summary())


def shadow_twin(twin: Twin, candidate: ModelArtifact, events: int) -> ShadowTwin:
    """A shadow of `twin` running `candidate` from the twin's current estimate (see module docstring)."""
    if not 1 <= events <= MAX_EVENTS:
        raise ValueError(f"events must be in 1..{MAX_EVENTS}, got {events}")
    check_compatible(twin.filter.model, candidate.model())
    seg = twin.segment(0, candidate)
    for f in (twin.filter, seg.filter):
        check_scorable(f)
    return ShadowTwin(twin.asset_id, twin.artifact.ref, candidate.ref, events, _Side(twin.filter, twin.fs),
                      _Side(seg.filter, map_state(twin.fs, twin.filter, seg.filter, seg.prior)), twin.last_key)


@dataclass
class ShadowBook:
    """A shard's shadow evaluations: (tenant, candidate ref) -> (run id, asset -> `ShadowTwin`). One
    evaluation per candidate and tenant at a time (stop it to start another)."""

    shadows: dict[tuple[str, str], tuple[str, dict[str, ShadowTwin]]] = field(default_factory=dict)

    def start(self, run_id: str, tenant: str, twins: list[Twin], candidate: ModelArtifact, events: int) -> int:
        key = (tenant, candidate.ref)
        if key in self.shadows:
            raise ShadowRunning(f"a shadow evaluation of {candidate.ref} is already running (run "
                                f"{self.shadows[key][0]}); stop it first to start another")
        if len(twins) > MAX_TWINS:
            raise ValueError(f"a shadow evaluation samples at most {MAX_TWINS} twins, got {len(twins)}")
        self.shadows[key] = (run_id, {t.asset_id: shadow_twin(t, candidate, events) for t in twins})
        log.info("event=shadow_started run=%s tenant=%s candidate=%s twins=%d events=%d", run_id, tenant,
                 candidate.ref, len(twins), events)
        return len(twins)

    def observe(self, tenant: str, batches: list[tuple[str, list[Pending]]]) -> None:
        """Score the events just applied to twins (asset id, events) in every shadow that samples them."""
        for (t, _), (_, twins) in self.shadows.items():
            if t == tenant:
                for asset_id, events in batches:
                    if (s := twins.get(asset_id)) is not None:
                        s.observe(events)

    def report(self, tenant: str, ref: str) -> tuple[str, list[ShadowTwinReport]] | None:
        """(run id, each sampled twin's report) of the evaluation of `ref`; None: none here."""
        found = self.shadows.get((tenant, ref))
        return None if found is None else (found[0], [s.report() for _, s in sorted(found[1].items())])

    def stop(self, tenant: str, ref: str) -> bool:
        return self.shadows.pop((tenant, ref), None) is not None
