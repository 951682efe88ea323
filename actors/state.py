"""The live-twin API's data types: what a twin's state looks like and what ingestion reports."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class UnknownTwin(KeyError):
    """No twin for this (tenant, asset): raised identically for a missing asset and another tenant's."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_DIVERGED_NULL = "; null when the filter diverged (`diverged: true`) and left it not a finite number"
"""Said of every statistic and estimate a broken filter can leave non-finite: NaN in Python, null in JSON."""


class DivergenceReport(_Frozen):
    """Filter-consistency indicators: NIS/dof is ~1 and residuals are ~zero-mean for a healthy twin. A
    diverged filter's statistics are not numbers: null in an answer (NaN in Python; JSON has no NaN)."""

    nis_mean: float | None = Field(description="EWMA of normalised innovation squared per measured dimension"
                                   + _DIVERGED_NULL)
    nis_last: float | None = Field(description="NIS of the latest update" + _DIVERGED_NULL)
    residual_mean: dict[str, float | None] = Field(description="EWMA of each output's residual" + _DIVERGED_NULL)
    residual_rms: dict[str, float | None] = Field(description="EWMA root mean square of each output's residual"
                                                  + _DIVERGED_NULL)
    drift: bool = Field(description="the sequential drift test (CUSUMs on the normalised innovations, at most one "
                              "false alarm per 30 days of event time by default) fired and was not cleared since, "
                              "or the filter diverged")
    diverged: bool = Field(description="the filter broke down: its state, covariance or NIS is not a finite number")
    drift_score: float | None = Field(0.0, description="largest drift CUSUM over its threshold at the last "
                                                       "update (>= 1 raises drift)" + _DIVERGED_NULL)
    process_noise_scale: float | None = Field(1.0, description="factor on the declared process-noise variance, "
                                                               "adapted from the innovations (<= 1)" + _DIVERGED_NULL)
    restarts: int = Field(0, description="measured events the filter updated from the state before their gap "
                                         "because its prediction over the gap was not finite: the twin re-anchored "
                                         "on them instead of refusing them (the shards count them in "
                                         "ray_raytwin_filter_restarts_total)")
    outside_range: list[str] = Field(default_factory=list, description="states whose estimate lies outside the "
                                     "range its model declares for them (what the quantity can take, estimates near "
                                     "a physical limit included): the model, with the inputs it held and its "
                                     "parameters, no longer describes the asset, e.g. a cell's charge below empty "
                                     "after hours of a current it could not deliver. Flagged, not clamped: a model "
                                     "constrains the states it has hard limits for itself (`project`)")


class TwinState(_Frozen):
    """A twin's estimated state, in its model's declared state units (those of its asset type: telemetry is
    converted to them on ingest), as of its last applied event. Once the filter diverged
    (`divergence.diverged`), its estimates may not be numbers either: null in an answer (NaN in Python)."""

    tenant: str
    asset_id: str
    model_ref: str
    revision: int = Field(description="state version; +1 per accepted event, survives recovery")
    event_time: datetime | None = Field(description="time of the last applied event (None: prior only)")
    state: dict[str, float | None] = Field(description="estimated mean" + _DIVERGED_NULL)
    std: dict[str, float | None] = Field(description="standard deviation of the estimate" + _DIVERGED_NULL)
    covariance: list[list[float | None]] = Field(description="covariance of the estimate (rows and columns in "
                                                 "the order of `state`)" + _DIVERGED_NULL)
    divergence: DivergenceReport
    events_applied: int
    stale: bool = Field(False, description="the twin's shard is restarting: this is the last durable state "
                                           "(its latest snapshot), which may lack recent events")

    def query_view(self) -> dict[str, Any]:
        """What queries read of it (`TwinShard.states`, `serve_apps.asset_queries.LiveStates`): estimate, std
        and revision, and ``"stale": True`` when it is the last durable state."""
        view: dict[str, Any] = {"state": self.state, "std": self.std, "revision": self.revision}
        if self.stale:
            view["stale"] = True
        return view


class Reject(_Frozen):
    idempotency_key: str | None
    reason: str
    index: int | None = Field(None, description="the event's position in the list given to `TwinService.ingest` "
                              "(None for events from a stream, a table or a file)")


class IngestReport(_Frozen):
    """Outcome of one ingest call: accepted events are durable in the log and applied; rejected
    ones are dead-lettered (`reasons`), among them `conflicts`: events whose identity (event time,
    sequence, idempotency key) was applied before with different content."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    conflicts: int = 0
    reasons: list[Reject] = Field(default_factory=list)
    states: list[TwinState] = Field(default_factory=list, description="asked for with `states=True`: the state "
                                    "of each twin a shard call changed, right after it (one call, no second read)")

    def __add__(self, other: IngestReport) -> IngestReport:
        return IngestReport(
            accepted=self.accepted + other.accepted,
            duplicates=self.duplicates + other.duplicates,
            rejected=self.rejected + other.rejected,
            conflicts=self.conflicts + other.conflicts,
            reasons=[*self.reasons, *other.reasons],
            states=[*self.states, *other.states],
        )
