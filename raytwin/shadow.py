"""Shadow evaluation: how well a model version explains live measurements, scored beside production.

Why innovations: a filter's one-step-ahead prediction error (innovation ``e`` with covariance
``S``) is the model's own forecast of each new measurement, so the Gaussian log-likelihood
``-0.5 (e' S^-1 e + log det 2 pi S)`` summed over events is the prediction-error likelihood a
calibration maximises; NIS (``e' S^-1 e`` per measured dimension, ~1 for a consistent filter)
says whether the model's stated uncertainty is honest, and the RMSE of ``e`` how far off it is.
Both versions see the same events from the same starting estimate, so the difference is the
model's alone.

`score_event` computes one event's innovation at the linearised output map (exactly the EKF's
first pass, so its NIS equals the EKF kernel's `nis_last`; a UKF twin is scored at the same
linearisation so both versions are judged alike). `conclude` records the comparison as evidence
on the lifecycle log and, under the tenant's policy, advances a clearly better candidate to staging.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import NamedTuple

import jax
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raytwin.estimation import ExtendedKalmanFilter, FilterState
from raytwin.lifecycle import Actor, Evidence, LifecycleError, ModelLifecycle, TransitionConflict, TransitionRecord
from raytwin.registry import parse_ref
from raytwin.sim.model import Model
from raytwin.sim.precision import in_float64

log = logging.getLogger("raytwin.shadow")

SYSTEM_ACTOR = "system"
"""The principal that records shadow evidence and automatic staging (audited under this id)."""
CONCLUDE_TRIES = 5
"""How many times `conclude` reads the lifecycle log again when another record lands between its read and its write."""
LOG_2PI = math.log(2 * math.pi)


class InnovationStats(NamedTuple):
    """Sums over the scored events of one filter (add twins' stats with `merge`)."""

    events: int = 0
    updates: int = 0  # events with at least one usable measured output
    dims: int = 0  # measured output values over all updates
    nis_sum: float = 0.0
    sq_sum: float = 0.0  # squared innovations (the model's declared output units, squared)
    loglik_sum: float = 0.0

    def add(self, nis: float, sq: float, loglik: float, dims: int) -> InnovationStats:
        if dims == 0:
            return self._replace(events=self.events + 1)
        return InnovationStats(self.events + 1, self.updates + 1, self.dims + dims, self.nis_sum + nis,
                               self.sq_sum + sq, self.loglik_sum + loglik)

    def merge(self, other: InnovationStats) -> InnovationStats:
        return InnovationStats(*(a + b for a, b in zip(self, other)))

    def summary(self) -> InnovationSummary:
        d, u = max(self.dims, 1), max(self.updates, 1)
        return InnovationSummary(events=self.events, updates=self.updates, nis_per_dim=self.nis_sum / d,
                                 rmse=math.sqrt(self.sq_sum / d), loglik_per_update=self.loglik_sum / u,
                                 loglik=self.loglik_sum)


class InnovationSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    events: int
    updates: int = Field(description="events with at least one measured output used by the update")
    nis_per_dim: float = Field(description="mean normalised innovation squared per measured value (1 = consistent)")
    rmse: float = Field(description="root mean square of the innovations (in the model's declared output units)")
    loglik_per_update: float = Field(description="mean Gaussian log-likelihood of the innovations per update")
    loglik: float = Field(description="total log-likelihood of the innovations")


class Comparison(BaseModel):
    """Production against the candidate over the same events."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    production: InnovationSummary
    candidate: InnovationSummary
    loglik_gain: float = Field(description="candidate minus production, mean log-likelihood per update")
    candidate_better: bool = Field(description="higher log-likelihood and NIS at least as near 1 as production's")


def compare(production: InnovationStats, candidate: InnovationStats) -> Comparison:
    p, c = production.summary(), candidate.summary()
    gain = c.loglik_per_update - p.loglik_per_update
    better = gain > 0 and abs(c.nis_per_dim - 1) <= abs(p.nis_per_dim - 1)
    return Comparison(production=p, candidate=c, loglik_gain=gain, candidate_better=better)


@lru_cache(maxsize=64)
def _output_map(model: Model):
    """Jitted (h(x, u, p), dh/dx) of a model, shared by every twin of it."""
    return in_float64(jax.jit(lambda x, u, p: (model.observe_vector(x, u, p),
                                               jax.jacfwd(model.observe_vector)(x, u, p))))


def check_scorable(f: ExtendedKalmanFilter) -> None:
    """Refuse a filter whose model has no JAX output map to linearise (an FMU)."""
    if not isinstance(f.model, Model):
        raise ValueError(f"shadow evaluation needs a JAX model (its output map is linearised); "
                         f"{f.model.name} is not one")


def score_event(f: ExtendedKalmanFilter, fs: FilterState, t: float, values: np.ndarray,
                use_outputs: bool) -> tuple[float, float, float, int]:
    """(NIS, sum of squared innovations, log-likelihood, measured dimensions) of one event
    (`values` in `f.measured_names` columns, in the model's declared units, NaN = not measured) predicted from `fs`."""
    pred = f.predict(fs, t)
    u_cols, y_cols = f._input_cols, f._output_cols
    u_new = np.where(np.isnan(values[u_cols]), pred.u, values[u_cols])
    z = values[y_cols]
    mask = ~np.isnan(z) if use_outputs else np.zeros(len(y_cols), dtype=bool)
    if not mask.any():
        return 0.0, 0.0, 0.0, 0
    y_hat, H = (np.asarray(a, dtype=np.float64) for a in _output_map(f.model)(pred.x, u_new, f.params))
    H, e = H[mask], (z - y_hat)[mask]
    S = H @ pred.P @ H.T + np.diag(f.r_var[mask])
    nis = float(e @ np.linalg.solve(S, e))
    _, logdet = np.linalg.slogdet(S)
    return nis, float(e @ e), -0.5 * (nis + logdet + mask.sum() * LOG_2PI), int(mask.sum())


def shadow_metrics(comparison: Comparison, twins: int) -> dict[str, float]:
    """The comparison as lifecycle evidence (`Evidence.shadow_metrics`)."""
    p, c = comparison.production, comparison.candidate
    return {"twins": float(twins), "events": float(c.events), "loglik_gain": comparison.loglik_gain,
            "production_loglik": p.loglik_per_update, "candidate_loglik": c.loglik_per_update,
            "production_nis": p.nis_per_dim, "candidate_nis": c.nis_per_dim,
            "production_rmse": p.rmse, "candidate_rmse": c.rmse}


def recorded(records: list[TransitionRecord], ref: str, shadow_id: str) -> list[TransitionRecord]:
    """What `conclude` recorded for the evaluation `shadow_id` of `ref` (its evidence, a move to staging), if any,
    among `records` (its model's lifecycle log: `ModelLifecycle.records`)."""
    return [r for r in records
            if f"{r.model}@{r.version}" == ref and r.reason.startswith(f"shadow evaluation {shadow_id}:")]


def conclude(lifecycle: ModelLifecycle, ref: str, tenant: str, shadow_id: str, comparison: Comparison,
             twins: int, records: list[TransitionRecord] | None = None) -> list[TransitionRecord]:
    """Record a finished shadow evaluation of `ref` as evidence (once per `shadow_id`; a second call
    returns []), and, when the tenant's policy sets `shadow_auto_stage_margin` and the candidate is
    better by at least that margin (mean log-likelihood per update) with NIS no further from 1,
    move it from candidate to staging, both as the system principal. `records`: the model's lifecycle log as
    the caller read it for this evaluation (None: read here)."""
    tag = f"shadow evaluation {shadow_id}"
    system = Actor(id=SYSTEM_ACTOR, tenant=tenant)
    evidence = Evidence(shadow_metrics=shadow_metrics(comparison, twins))
    verdict = "better" if comparison.candidate_better else "not better"
    reason = (f"{tag}: candidate {verdict} than production over {comparison.candidate.events} events of {twins} "
              f"twin(s), log-likelihood gain {comparison.loglik_gain:.4g} per update")
    for _ in range(CONCLUDE_TRIES):
        if records is None:
            records = lifecycle.records(parse_ref(ref)[0])
        if any(r.action == "evaluate" for r in recorded(records, ref, shadow_id)):
            return []
        try:  # only on the log as read: the service's round and a DELETE both concluding record it once
            written = [lifecycle.evaluate(ref, system, reason, evidence,
                                          expected_revision=records[-1].seq if records else 0)]
            break
        except TransitionConflict:  # another record came first: read again, it may be this evaluation's
            records = None
    else:
        raise TransitionConflict(f"{ref}: the lifecycle log moved on {CONCLUDE_TRIES} times while shadow evaluation "
                                 f"{shadow_id} was being recorded; it is recorded on the next try")
    margin = lifecycle.policy(tenant).shadow_auto_stage_margin
    if (margin is not None and comparison.candidate_better and comparison.loglik_gain >= margin
            and lifecycle.stage(ref) == "candidate"):
        try:
            written.append(lifecycle.transition(ref, "staging", system, f"{tag}: log-likelihood better by "
                                                f"{comparison.loglik_gain:.4g} >= the policy's margin {margin}",
                                                evidence))
        except LifecycleError as exc:  # e.g. another transition came first: the evidence stands
            log.warning("event=shadow_auto_stage_refused ref=%s shadow=%s reason=%r", ref, shadow_id, str(exc))
    log.info("event=shadow_concluded ref=%s tenant=%s shadow=%s gain=%.6g better=%s staged=%s", ref, tenant,
             shadow_id, comparison.loglik_gain, comparison.candidate_better, len(written) > 1)
    return written
