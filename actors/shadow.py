"""Shadow evaluations held by a shard: a candidate model version scored beside production on live events.

Each sampled twin gets two private filter states, both started from the twin's estimate when the
shadow starts: production's (a copy) and the candidate's (the estimate carried over as in a hot
swap, `actors.swap.map_state`). Every event the twin accepts afterwards is scored by both
(`raytwin.shadow.score_event`) and then applied to both, until `events` were scored. The served
twin is never touched, so its state is bit-identical to a run without the shadow.

Why bounded: a shadow costs ~3 small filter dispatches per event per version, so it runs on a
sample of twins (at most `MAX_TWINS` per evaluation) and for a fixed number of events. Late events
(before one already scored) are skipped by the shadow, which scores events in arrival order.

Why durable: a started evaluation should finish although its shard restarts (a crash, a node
lost). Each sampled twin's part is a record in the state store (`StateStore.save_shadow`): the run,
both versions' artifacts, the target, and a checkpoint of both filter states, their running
`InnovationStats` and the last scored event, written when it starts, every `save_every` scored
events and when it is done. A restarted shard (`ShadowBook.resume`) rebuilds each part from its
checkpoint and scores the twin's events logged after it (the durable event log holds every
acknowledged event) in event-time order before taking new ones: the count continues where it was
and no event is scored twice or left out, so the statistics equal an uninterrupted run's unless a
late event arrived between the checkpoint and the restart (the live shadow skipped it, the resumed
one scores it in order). The report shows `resumed_at`. Where the log after the checkpoint was pruned
(`HistoryPruned`), that twin's part restarts from the recovered twin with empty statistics
(`restarted_at`). The outcome is on the lifecycle log once concluded (`raytwin.shadow.conclude`);
stopping an evaluation deletes its records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from actors.swap import incompatibility, map_state
from actors.twin import Pending, Twin, decode_snapshot, encode_state
from raytwin.estimation import ExtendedKalmanFilter, FilterState
from raytwin.registry import ModelArtifact
from raytwin.shadow import InnovationStats, InnovationSummary, check_scorable, score_event
from raytwin.statestore import EventKey, HistoryPruned, StateStore

log = logging.getLogger("raytwin.twins")
MAX_TWINS = 100
"""Twins one shadow evaluation may sample (each costs two extra filters per event)."""
MAX_EVENTS = 100_000
"""Events per twin one shadow evaluation may score."""


class ShadowRunning(ValueError):
    """A shadow evaluation of this candidate is running already."""


class ShadowRefused(ValueError):
    """These twins cannot shadow this candidate: they run another model, or one it cannot be scored beside."""


def refuse_foreign(models: dict[str, str], candidate: ModelArtifact) -> None:
    """Refuse twins (asset id -> the model they run) that run no version of the candidate's model: their
    production is another model's, so the comparison would be recorded as evidence about the wrong one."""
    if foreign := sorted(a for a, m in models.items() if m != candidate.name):
        raise ShadowRefused(f"twin(s) {', '.join(foreign)} run no version of model {candidate.name}: a shadow "
                            f"evaluation compares {candidate.ref} with its own model's production version on that "
                            f"model's twins; give twins of {candidate.name} in asset_ids, or sample")


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
    resumed_at: datetime | None = Field(None, description="when a restarted shard last resumed this twin's "
                                        "evaluation from its checkpoint and the event log (None: never)")
    restarted_at: datetime | None = Field(None, description="when a restarted shard last restarted this twin's "
                                          "statistics from its recovered state: the log after the checkpoint "
                                          "was pruned (None: never)")


@dataclass
class _Side:
    filter: ExtendedKalmanFilter
    fs: FilterState
    stats: InnovationStats = InnovationStats()

    def step(self, e: Pending) -> None:
        self.stats = self.stats.add(*score_event(self.filter, self.fs, e.key[0] / 1e6, e.values, e.use_outputs))
        self.fs = self.filter.assimilate_many(self.fs, [e.key[0] / 1e6], [e.values], [e.use_outputs]).state(0)

    def dump(self) -> dict[str, Any]:
        return {"stats": list(self.stats), "state": encode_state(self.fs)}

    @classmethod
    def load(cls, f: ExtendedKalmanFilter, data: dict[str, Any]) -> _Side:
        return cls(f, decode_snapshot(data["state"]), InnovationStats(*data["stats"]))


@dataclass
class ShadowTwin:
    asset_id: str
    production_artifact: ModelArtifact
    candidate_artifact: ModelArtifact
    target: int
    production: _Side
    candidate: _Side
    last_key: EventKey | None
    skipped: int = 0
    saved: int = -1  # candidate events scored at the last durable record (-1: none yet)
    resumed_at: datetime | None = None
    restarted_at: datetime | None = None

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

    def due(self, every: int) -> bool:
        """Whether its checkpoint is `every` scored events old, or it finished since the last one."""
        scored = self.candidate.stats.events
        return scored > self.saved and (self.done or scored - self.saved >= every)

    def record(self, run_id: str) -> dict[str, Any]:
        """What `StateStore.save_shadow` keeps of it (see the module docstring)."""
        stamp = lambda t: None if t is None else t.isoformat()  # noqa: E731
        return {"run_id": run_id, "target": self.target, "resumed_at": stamp(self.resumed_at),
                "restarted_at": stamp(self.restarted_at),
                "production": self.production_artifact.model_dump(mode="json"),
                "candidate": self.candidate_artifact.model_dump(mode="json"),
                "checkpoint": {"last_key": None if self.last_key is None else list(self.last_key),
                               "skipped": self.skipped, "production": self.production.dump(),
                               "candidate": self.candidate.dump()}}

    def report(self) -> ShadowTwinReport:
        p, c = self.production.stats, self.candidate.stats
        return ShadowTwinReport(asset_id=self.asset_id, production_ref=self.production_artifact.ref,
                                candidate_ref=self.candidate_artifact.ref, target_events=self.target,
                                skipped_late=self.skipped, done=self.done, production_stats=tuple(p),
                                candidate_stats=tuple(c), production=p.summary(), candidate=c.summary(),
                                resumed_at=self.resumed_at, restarted_at=self.restarted_at)


def shadow_twin(twin: Twin, candidate: ModelArtifact, events: int) -> ShadowTwin:
    """A shadow of `twin` running `candidate` from the twin's current estimate (see module docstring)."""
    if not 1 <= events <= MAX_EVENTS:
        raise ValueError(f"events must be in 1..{MAX_EVENTS}, got {events}")
    production = twin.segments[-1]  # the version that applies the next events (a swap may not have applied any)
    if production.artifact.ref == candidate.ref:
        raise ValueError(f"twin {twin.asset_id} runs {candidate.ref} from its next event on: shadow a version it "
                         "does not run")
    refuse_foreign({twin.asset_id: production.artifact.name}, candidate)
    if (why := incompatibility(production.filter.model, candidate.model())) is not None:
        raise ShadowRefused(f"twin {twin.asset_id} cannot shadow {candidate.ref}: {why}; the candidate is scored on "
                            "the twin's own events, so shadow it on twins whose model measures what it does")
    seg = twin.segment(0, candidate)
    for f in (production.filter, seg.filter):
        check_scorable(f)
    served = twin.fs if production.filter is twin.filter else map_state(twin.fs, twin.filter, production.filter,
                                                                        production.prior)
    return ShadowTwin(twin.asset_id, production.artifact, candidate, events, _Side(production.filter, served),
                      _Side(seg.filter, map_state(twin.fs, twin.filter, seg.filter, seg.prior)), twin.last_key)


def resumed_twin(twin: Twin, record: dict[str, Any]) -> ShadowTwin:
    """The shadow of `twin` from its durable record (`ShadowTwin.record`), not yet caught up with the log."""
    production, candidate = (ModelArtifact.model_validate(record[k]) for k in ("production", "candidate"))
    cp = record["checkpoint"]
    stamp = lambda v: None if v is None else datetime.fromisoformat(v)  # noqa: E731
    return ShadowTwin(twin.asset_id, production, candidate, record["target"],
                      _Side.load(twin.segment(0, production).filter, cp["production"]),
                      _Side.load(twin.segment(0, candidate).filter, cp["candidate"]),
                      None if cp["last_key"] is None else tuple(cp["last_key"]), cp["skipped"],
                      saved=cp["candidate"]["stats"][0], resumed_at=stamp(record["resumed_at"]),
                      restarted_at=stamp(record["restarted_at"]))


@dataclass
class ShadowBook:
    """A shard's shadow evaluations: (tenant, candidate ref) -> (run id, asset -> `ShadowTwin`), each
    twin's part recorded in `store` (checkpoint every `save_every` scored events). One evaluation per
    candidate and tenant at a time (stop it to start another)."""

    store: StateStore
    save_every: int
    shadows: dict[tuple[str, str], tuple[str, dict[str, ShadowTwin]]] = field(default_factory=dict)

    def start(self, run_id: str, tenant: str, twins: list[Twin], candidate: ModelArtifact, events: int) -> int:
        key = (tenant, candidate.ref)
        if key in self.shadows:
            raise ShadowRunning(f"a shadow evaluation of {candidate.ref} is already running (run "
                                f"{self.shadows[key][0]}); stop it first to start another")
        if len(twins) > MAX_TWINS:
            raise ValueError(f"a shadow evaluation samples at most {MAX_TWINS} twins, got {len(twins)}")
        refuse_foreign({t.asset_id: t.segments[-1].artifact.name for t in twins}, candidate)
        shadows = {t.asset_id: shadow_twin(t, candidate, events) for t in twins}
        for s in shadows.values():  # durable before it counts: a restart from here on resumes it
            self._save(tenant, run_id, s)
        self.shadows[key] = (run_id, shadows)
        log.info("event=shadow_started run=%s tenant=%s candidate=%s twins=%d events=%d", run_id, tenant,
                 candidate.ref, len(twins), events)
        return len(twins)

    def running(self) -> list[tuple[str, str]]:
        """The (tenant, candidate ref) of each evaluation held here."""
        return list(self.shadows)

    def _save(self, tenant: str, run_id: str, s: ShadowTwin) -> None:
        self.store.save_shadow(tenant, s.candidate_artifact.ref, s.asset_id, s.record(run_id))
        s.saved = s.candidate.stats.events

    def observe(self, tenant: str, batches: list[tuple[str, list[Pending]]]) -> None:
        """Score the events just applied to twins (asset id, events) in every shadow that samples them;
        checkpoint those due."""
        for (t, _), (run_id, twins) in self.shadows.items():
            if t == tenant:
                for asset_id, events in batches:
                    if (s := twins.get(asset_id)) is not None:
                        s.observe(events)
                        if s.due(self.save_every):
                            self._save(tenant, run_id, s)

    def resume(self, twins: dict[tuple[str, str], Twin]) -> int:
        """Take up the recorded evaluations of the twins held here (a shard's start): each from its
        checkpoint, then the twin's events logged after it (see the module docstring). Returns how many
        twins' parts were resumed."""
        resumed = 0
        for tenant, ref, asset_id, record in self.store.load_shadows():
            twin = twins.get((tenant, asset_id))
            if twin is None:
                continue  # another shard's twin
            run_id, now = record["run_id"], datetime.now(UTC)
            s = resumed_twin(twin, record)
            try:
                logged = self.store.read_events(tenant, asset_id, after=s.last_key)
            except HistoryPruned as exc:
                s = shadow_twin(twin, s.candidate_artifact, s.target)
                s.restarted_at = now
                log.warning("event=shadow_restarted run=%s tenant=%s candidate=%s asset=%s reason=%r", run_id,
                            tenant, ref, asset_id, str(exc))
            else:
                s.observe([twin.pending(e) for e in logged])
                s.resumed_at = now
            self._save(tenant, run_id, s)
            self.shadows.setdefault((tenant, ref), (run_id, {}))[1][asset_id] = s
            resumed += 1
            log.info("event=shadow_resumed run=%s tenant=%s candidate=%s asset=%s scored=%d target=%d", run_id,
                     tenant, ref, asset_id, s.candidate.stats.events, s.target)
        return resumed

    def report(self, tenant: str, ref: str) -> tuple[str, list[ShadowTwinReport]] | None:
        """(run id, each sampled twin's report) of the evaluation of `ref`; None: none here."""
        found = self.shadows.get((tenant, ref))
        return None if found is None else (found[0], [s.report() for _, s in sorted(found[1].items())])

    def forget(self, tenant: str, asset_id: str) -> None:
        """A twin goes away (unregistered): drop its part of every evaluation and its records, so no
        evaluation waits for events that cannot come and no record outlives the twin; an evaluation
        left without twins ends."""
        for key, (_, twins) in list(self.shadows.items()):
            if key[0] == tenant and twins.pop(asset_id, None) is not None:
                self.store.delete_shadow(tenant, key[1], asset_id)
                if not twins:
                    del self.shadows[key]

    def stop(self, tenant: str, ref: str) -> bool:
        """End the evaluation of `ref` here and delete its records (False: none ran here)."""
        found = self.shadows.pop((tenant, ref), None)
        for asset_id in found[1] if found else ():
            self.store.delete_shadow(tenant, ref, asset_id)
        return found is not None
