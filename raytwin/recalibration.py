"""Recalibration policies: when a twin's drift alarm may launch a calibration, and how much it may cost.

Why a policy per tenant and asset type: a latched drift alarm is a request for a better model of
that type, and a fleet can latch all at once (a firmware change, a heat wave). The policy bounds
what a storm costs (`max_concurrent_jobs`, coalescing in the trigger), how often one twin may ask
again (`cooldown_s`), which telemetry a calibration reads (`window_s` ending `settle_s` after the
latch, `max_samples`) and how hard it searches (`max_trials`). Policies are JSON documents on the store
(``{root}/{tenant}/{type_name}.json``), so every API replica and a restarted backend read the same.

`DriftTrigger` is the evidence a candidate version carries back to its cause: the twin, the event
time of its latch, the detector's statistics and the change-log sequence number that recorded it.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, NamedTuple

from pydantic import Field, ValidationError, model_validator

from raytwin.contracts import Contract, Finite, Identifier, SemVer, UtcTime, describe_error
from raytwin.storage import canonical_json, filesystem, replace_file
from raytwin.store_failures import store_io

log = logging.getLogger("raytwin.recalibration")

DAY_S = 86_400.0


class PolicyError(ValueError):
    """A policy that cannot be stored or used: the message names the field and the allowed range."""


class RecalibrationPolicy(Contract):
    """When and how a latched drift alarm of an asset type's twin launches a calibration."""

    enabled: bool = True
    min_drift_score: Annotated[float, Field(ge=1.0, le=1e6)] | None = Field(
        None, description="Launch only when the detector's score at the latch is at least this (1 is the latch "
                          "itself); null: on every latch")
    cooldown_s: Annotated[float, Field(ge=0, le=90 * DAY_S)] = Field(
        6 * 3600.0, description="A twin's latches within this many seconds after a calibration covering it "
                                "started are not acted on")
    window_s: Annotated[float, Field(ge=60, le=90 * DAY_S)] = Field(
        DAY_S, description="Telemetry read from the durable event log, ending `settle_s` after the latch's event time")
    settle_s: Annotated[float, Field(ge=0, le=90 * DAY_S)] | None = Field(
        None, description="Event time the twin must run past the latch before its calibration starts; the window "
                          "ends there. null: window_s, so the window is the telemetry after the latch (a fault "
                          "precedes its latch by hours: a window ending at the latch is mostly the model's old, "
                          "right data, and the fit a blend). 0: start at once, fit the window before the latch")
    max_samples: Annotated[int, Field(ge=10, le=1_000_000)] = Field(
        5_000, description="Compute budget: at most this many samples of the window (the newest)")
    max_trials: Annotated[int, Field(ge=1, le=1_000)] = Field(
        8, description="Compute budget: Ray Tune trials per calibration")
    max_concurrent_jobs: Annotated[int, Field(ge=1, le=64)] = Field(
        2, description="Calibrations of this asset type running at once; further latches coalesce into one "
                       "pending calibration")
    free: Annotated[list[Identifier], Field(min_length=1, max_length=32)] = Field(
        description="The model parameters to fit (checked against the asset type's model)")
    noise_std: dict[Identifier, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict, description="Measurement noise per output, weights of the fit (default: the "
                                          "output's declared measurement_std, else 1)")

    @property
    def settle(self) -> float:
        """Seconds of event time after the latch before a calibration starts (`settle_s`, default `window_s`)."""
        return self.window_s if self.settle_s is None else self.settle_s

    @model_validator(mode="after")
    def _coherent(self) -> RecalibrationPolicy:
        if len(set(self.free)) != len(self.free):
            raise ValueError(f"free parameters repeat: {self.free}")
        return self

    def check_model(self, param_names: tuple[str, ...] | list[str], output_names: tuple[str, ...] | list[str],
                    type_key: str) -> None:
        """Refuse parameters and outputs the asset type's model does not have (names the ones it has)."""
        unknown = sorted(set(self.free) - set(param_names))
        if unknown:
            raise PolicyError(f"free parameters {unknown} are not parameters of {type_key}; it has "
                              f"{list(param_names)}")
        unknown = sorted(set(self.noise_std) - set(output_names))
        if unknown:
            raise PolicyError(f"noise_std names {unknown}, not outputs of {type_key}; it has {list(output_names)}")


class DriftTrigger(Contract):
    """A latched drift alarm that asked for a recalibration (evidence of the candidate it produced)."""

    seq: int = Field(ge=1, description="The change-log sequence number of the twin.drift change")
    asset_id: Identifier
    type_name: Identifier
    type_version: SemVer
    event_time: UtcTime | None = Field(description="Event time of the twin's last applied event at the latch")
    revision: int | None = Field(None, ge=0, description="The twin's state revision at the latch")
    drift_score: Finite = Field(description="Largest CUSUM over its threshold at the latch (>= 1 latched)")
    nis_mean: Finite | None = Field(description="None when not a finite number (a diverged filter)")
    nis_last: Finite | None


class StoredPolicy(NamedTuple):
    policy: RecalibrationPolicy
    set_by: str | None
    """The principal (API key id) that set it; None for a policy stored without one (set before it was kept, or
    written by hand): its candidates name no setter, so no approver may promote them (`raytwin.lifecycle`)."""


class PolicyStore:
    """The tenants' policies as JSON documents on the store (any replica reads and writes them), each with the
    principal that set it (``set_by``): a recalibration's candidate records them, so they may not approve it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = filesystem(url, storage_options)

    def _path(self, tenant: str, type_name: str) -> str:
        return f"{self.root}/{tenant}/{type_name}.json"

    def get(self, tenant: str, type_name: str) -> RecalibrationPolicy | None:
        stored = self.get_stored(tenant, type_name)
        return None if stored is None else stored.policy

    def get_stored(self, tenant: str, type_name: str) -> StoredPolicy | None:
        """The policy in force and who set it, read together (None: no policy)."""
        path = self._path(tenant, type_name)
        with store_io("read"):
            if not self.fs.exists(path):
                return None
            body = self.fs.cat_file(path)
        try:
            doc = json.loads(body)
            set_by = doc.pop("set_by", None) if isinstance(doc, dict) else None
            return StoredPolicy(RecalibrationPolicy.model_validate(doc), set_by)
        except (ValueError, ValidationError) as exc:  # written by hand on the store: say which file to fix
            why = describe_error(exc) if isinstance(exc, ValidationError) else f"not JSON ({exc})"
            raise PolicyError(f"the stored policy {path} is invalid: {why}") from None

    def put(self, tenant: str, type_name: str, policy: RecalibrationPolicy, set_by: str | None = None) -> None:
        doc = policy.model_dump(mode="json") | ({} if set_by is None else {"set_by": set_by})
        replace_file(self.fs, self._path(tenant, type_name), canonical_json(doc))
        log.info("event=recalibration_policy_set tenant=%s type=%s set_by=%s policy=%s", tenant, type_name, set_by,
                 policy.model_dump_json())
