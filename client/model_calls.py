"""The model operations: lifecycle (stages, rollback, the log and its check), run records (the evidence),
drift recalibration policies, and recommended actions. Sync and async clients share them like `client.calls.Endpoints`.

Several answers are models of server modules that import Ray or JAX (`raytwin.lifecycle`,
`sweeps.recommend`): they are loaded on the first such call, not on `import client`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel

from client.calls import Call, Sender, T, _lazy, _model, _nothing, _present
from client.downloads import RUN_FILE, hashed
from connectors.commands import Command
from raytwin.recalibration import RecalibrationPolicy
from serve_apps.recalibration import TenantState

if TYPE_CHECKING:
    from raytwin.lifecycle import LifecyclePolicy, PruneReport, TransitionRecord
    from serve_apps.routes_models import (
        ChainCheck,
        LifecycleStatus,
        RollbackRequest,
        TransitionAnswer,
        TransitionRequest,
    )
    from serve_apps.routes_recommendations import RecommendationRequest
    from serve_apps.routes_runs import RunPublic
    from serve_apps.routes_shadow import ShadowRequest, ShadowStarted, ShadowStatus
    from sweeps.recommend import Recommendation

_RECORD = "raytwin.lifecycle:TransitionRecord"
_ANSWER = "serve_apps.routes_models:TransitionAnswer"


def run_file_call(run_id: str, name: str, parse: Callable[[httpx.Response], T]) -> Call[T]:
    """The request for a run's output file `name` (its record's name: may be nested, ``search/part-000000.parquet``)."""
    return Call("GET", "/v1/runs/{run_id}/files/{name}", parse, idempotent=True,
                path_params={"run_id": run_id, "name": name}, relative_paths=frozenset({"name"}))


_RECOMMENDATION = "sweeps.recommend:Recommendation"
_MODELS = "serve_apps.routes_models"
_SHADOW = "serve_apps.routes_shadow"
_SHADOW_PATH = "/v1/models/{model}/versions/{version}/shadow"


def _body(request: BaseModel) -> Any:
    return request.model_dump(mode="json", exclude_none=True)


def rollback_call(model: str, request: RollbackRequest, production: str | None) -> Call[TransitionAnswer]:
    """The rollback, naming `production` (read just before, for a request that names no condition: see
    `needs_production`) as the version it leaves: a resend after a lost answer cannot go back a second version
    (409), so it is resent."""
    if production is not None:
        request = request.model_copy(update={"from_version": production})
    safe = request.from_version is not None or request.expected_revision is not None
    return Call("POST", "/v1/models/{model}/rollback", _lazy(_ANSWER), json=_body(request), idempotent=safe,
                conditional=safe, path_params={"model": model})


def needs_production(request: RollbackRequest) -> bool:
    """Whether `rollback_call` needs the production version read first (the request names no condition)."""
    return request.from_version is None and request.expected_revision is None


class ModelCalls(Sender):
    # ---- model lifecycle ----------------------------------------------------------------------
    def model_lifecycle(self, model: str) -> LifecycleStatus:
        """Each registered version's stage; production, rollback target, the log's `revision` and head hash."""
        return self._send(Call("GET", "/v1/models/{model}/lifecycle", _lazy(f"{_MODELS}:LifecycleStatus"),
                               idempotent=True, path_params={"model": model}))

    def transition_model(self, model: str, version: str, request: TransitionRequest) -> TransitionAnswer:
        """Submit, stage, promote or archive a version (Forbidden: the four-eyes rule; Conflict: a move the
        stage does not allow, or `expected_revision` is stale). Resent only with `expected_revision` set.
        A promotion's `twins` says which twins swapped to it and why the others keep their version."""
        return self._send(Call("POST", "/v1/models/{model}/versions/{version}/transitions", _lazy(_ANSWER),
                               json=_body(request), idempotent=request.expected_revision is not None,
                               conditional=request.expected_revision is not None,
                               path_params={"model": model, "version": version}))

    def model_lifecycle_log(self, model: str) -> list[TransitionRecord]:
        return self._send(Call("GET", "/v1/models/{model}/lifecycle/log", _lazy(_RECORD, many=True),
                               idempotent=True, path_params={"model": model}))

    def verify_model_lifecycle(self, model: str, expected_head: str | None = None) -> ChainCheck:
        """The log's hash chain checked (`ok`, `first_bad_record`); `expected_head`: also against a head you kept."""
        return self._send(Call("GET", "/v1/models/{model}/lifecycle/verify", _lazy(f"{_MODELS}:ChainCheck"),
                               params=_present(expected_head=expected_head), idempotent=True,
                               path_params={"model": model}))

    def prune_model(self, model: str) -> PruneReport:
        """Apply the tenant's retention to the model's archived versions and sweep run records (admin)."""
        return self._send(Call("POST", "/v1/models/{model}/prune", _lazy("raytwin.lifecycle:PruneReport"),
                               path_params={"model": model}))

    def lifecycle_policy(self) -> LifecyclePolicy:
        return self._send(Call("GET", "/v1/lifecycle-policy", _lazy("raytwin.lifecycle:LifecyclePolicy"),
                               idempotent=True))

    def set_lifecycle_policy(self, policy: LifecyclePolicy) -> LifecyclePolicy:
        return self._send(Call("PUT", "/v1/lifecycle-policy", _lazy("raytwin.lifecycle:LifecyclePolicy"),
                               json=policy.model_dump(mode="json"), idempotent=True))

    # ---- shadow evaluation ------------------------------------------------------------------------
    def start_shadow(self, model: str, version: str, request: ShadowRequest) -> ShadowStarted:
        """Score a candidate or staging version beside production on the next events of some twins, without
        changing their served state (Conflict: another stage, or an evaluation of it runs)."""
        return self._send(Call("POST", _SHADOW_PATH, _lazy(f"{_SHADOW}:ShadowStarted"),
                               json=_body(request), path_params={"model": model, "version": version}))

    def shadow(self, model: str, version: str) -> ShadowStatus:
        """Production against the candidate so far; once done, the evidence this read recorded on the log."""
        return self._send(Call("GET", _SHADOW_PATH, _lazy(f"{_SHADOW}:ShadowStatus"),
                               idempotent=True, path_params={"model": model, "version": version}))

    def stop_shadow(self, model: str, version: str) -> None:
        """End the evaluation of this version (NotFound: none runs); recorded evidence stays on the log."""
        return self._send(Call("DELETE", _SHADOW_PATH, _nothing,
                               path_params={"model": model, "version": version}))

    # ---- drift recalibration ----------------------------------------------------------------------
    def recalibration_policy(self, type_name: str) -> RecalibrationPolicy:
        """The tenant's recalibration policy for an asset type (NotFound: none set)."""
        return self._send(Call("GET", "/v1/recalibration-policies/{type_name}", _model(RecalibrationPolicy),
                               idempotent=True, path_params={"type_name": type_name}))

    def set_recalibration_policy(self, type_name: str, policy: RecalibrationPolicy) -> RecalibrationPolicy:
        """When a latched drift alarm of this type's twins launches a calibration, and its budget (admin)."""
        return self._send(Call("PUT", "/v1/recalibration-policies/{type_name}", _model(RecalibrationPolicy),
                               json=policy.model_dump(mode="json"), idempotent=True,
                               path_params={"type_name": type_name}))

    def recalibrations(self) -> TenantState:
        """Pending triggers, running and recently finished drift recalibrations of the tenant."""
        return self._send(Call("GET", "/v1/recalibrations", _model(TenantState), idempotent=True))

    # ---- run records ------------------------------------------------------------------------------
    def run(self, run_id: str) -> RunPublic:
        """A run record of the tenant's (the evidence a transition names): model, spec, seeds, code, data hash,
        summary and each output file's SHA-256; no store location."""
        return self._send(Call("GET", "/v1/runs/{run_id}", _lazy("serve_apps.routes_runs:RunPublic"),
                               idempotent=True, path_params={"run_id": run_id}))

    def run_file(self, run_id: str, name: str, verify: bool = True) -> bytes:
        """One output file of a run (e.g. a calibration's fit report ``calibration.json``, or a nested name its
        record lists, ``search/part-000000.parquet``), loaded into memory (large files: `download_run_file`),
        checked against the SHA-256 its record holds (`client.errors.CorruptDownload` if the bytes differ;
        `MissingChecksum` if the answer has no SHA-256 header, unless `verify` is False: accepted unchecked)."""
        return self._send(run_file_call(run_id, name, hashed(RUN_FILE, verify)))

    # ---- recommended actions ----------------------------------------------------------------------
    def recommend(self, asset_id: str, request: RecommendationRequest) -> Recommendation:
        """Optimise the asset's control schedule from its twin's state: a recorded run (`run_id`)."""
        return self._send(Call("POST", "/v1/assets/{asset_id}/recommendations", _lazy(_RECOMMENDATION),
                               json=request.model_dump(mode="json"), path_params={"asset_id": asset_id}))

    def recommendation(self, asset_id: str, recommendation_id: str) -> Recommendation:
        return self._send(Call("GET", "/v1/assets/{asset_id}/recommendations/{rid}", _lazy(_RECOMMENDATION),
                               idempotent=True, path_params={"asset_id": asset_id, "rid": recommendation_id}))

    def issue_recommendation(self, asset_id: str, recommendation_id: str, connector: str,
                             name: str = "schedule",
                             part: Literal["schedule", "first_block"] = "schedule") -> Command:
        """Propose the schedule (or its first block's value, for a command that takes one value: an OPC UA
        node) as a command through `connector`; another admin key with the `approver` grant approves it
        before anything is sent."""
        return self._send(Call("POST", "/v1/assets/{asset_id}/recommendations/{rid}/issue", _model(Command),
                               json={"connector": connector, "name": name, "part": part},
                               path_params={"asset_id": asset_id, "rid": recommendation_id}))
