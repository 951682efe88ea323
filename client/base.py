"""What the sync and async clients share besides the operations: their settings and the decision,
after each try of a call, to return, raise or resend (and after how long)."""

from __future__ import annotations

from typing import Any

import httpx

from client.calls import Call, Endpoints
from client.connector_calls import ConnectorCalls
from client.deprecation import DeprecationNotices
from client.errors import NOT_RAYTWIN, OutcomeUnknown, RayTwinError, Unreachable, from_response, retry_after_s
from client.model_calls import ModelCalls
from client.retry import NOT_SENT, RetryPolicy, Verdict, verdict
from client.scenario_calls import ScenarioCalls


class ClientBase(Endpoints, ModelCalls, ConnectorCalls, ScenarioCalls):
    def __init__(self, retry: RetryPolicy):
        self.retry = retry
        self.retries = 0  # requests resent so far (observability)
        self.deprecations = DeprecationNotices()  # routes that already warned

    @staticmethod
    def _http_options(base_url: str, api_key: str, timeout: float, transport: Any) -> dict[str, Any]:
        return {"base_url": base_url, "timeout": timeout, "transport": transport,
                "headers": {"Authorization": f"Bearer {api_key}"}}

    def _resend_after(self, call: Call[Any], attempt: int, answer: httpx.Response | httpx.TransportError,
                      maybe_applied: bool = False) -> float | None:
        """Seconds to wait before resending `call`, or None: `answer` is its result. A try that may succeed when
        sent again (`client.retry.verdict`) is resent, while tries are left, if it was not applied or the call is
        safe to resend. Otherwise raises the API's error, or for a network error `Unreachable` (no connection:
        nothing applied), `OutcomeUnknown` (a write that may have been applied) or `RayTwinError` (a read).
        `maybe_applied`: an earlier try of this write may have taken effect (see `may_have_applied`): then a
        compare-and-set refused, or a write safe to resend whose tries all failed, raises `OutcomeUnknown` (a
        telemetry batch's names its idempotency keys), not an error that reads as "nothing happened"; so does a
        write that is not resent after a proxy's 5xx. RayTwin's own 503 `backend_unavailable` to such a write
        is raised as it is: its message says how to check whether it took effect."""
        found = verdict(answer)
        if found is not None and attempt < self.retry.attempts and (found is Verdict.NOT_APPLIED or call.idempotent):
            return self.retry.delay(attempt, retry_after_s(answer) if isinstance(answer, httpx.Response) else None)
        request = f"{call.method} {call.path}"
        applied = call.method != "GET" and (maybe_applied or found is Verdict.MAYBE_APPLIED)
        if isinstance(answer, httpx.TransportError):
            if applied:
                raise OutcomeUnknown(request, answer, attempt, call.resend_advice, call.idempotency_keys) from answer
            if isinstance(answer, NOT_SENT):
                raise Unreachable(request, answer, attempt) from answer
            raise RayTwinError(f"{request}: {answer!r}") from answer
        if call.warn_deprecated:
            self.deprecations.observe(call.method, call.route, answer)
        if not answer.is_error:
            return None
        error = from_response(answer)
        found_own_change = maybe_applied and call.conditional and error.status in (409, 412)
        gave_up = found is not None and (call.idempotent or error.code == NOT_RAYTWIN)  # resends failed; a proxy's 5xx
        if applied and (found_own_change or gave_up):
            raise OutcomeUnknown(request, error, attempt, call.resend_advice, call.idempotency_keys) from error
        raise error

    @staticmethod
    def may_have_applied(answer: httpx.Response | httpx.TransportError) -> bool:
        """Whether a try that ended with `answer` may have taken effect without answering so (`Verdict`)."""
        return verdict(answer) is Verdict.MAYBE_APPLIED
