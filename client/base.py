"""What the sync and async clients share besides the operations: their settings and the decision,
after each try of a call, to return, raise or resend (and after how long)."""

from __future__ import annotations

from typing import Any

import httpx

from client.calls import Call, Endpoints
from client.connector_calls import ConnectorCalls
from client.deprecation import DeprecationNotices
from client.errors import ApiError, OutcomeUnknown, RayTwinError, error_code, from_response, retry_after_s
from client.model_calls import ModelCalls
from client.retry import MAYBE_APPLIED_CODES, RETRY_STATUSES, RetryPolicy
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
        """Seconds to wait before resending `call`, or None: `answer` is its result. Raises the API's
        error, or `RayTwinError` for a network error on a call that is not safe to resend (or the last try).
        `maybe_applied`: an earlier try may have reached the server (see `may_have_applied`); a compare-and-set
        refused then raises `OutcomeUnknown`, not the refusal that invites applying it again, and so does a write
        whose resends all failed (a 503 `overloaded` read as "nothing happened" after an approval was sent)."""
        last = attempt == self.retry.attempts
        if isinstance(answer, httpx.TransportError):
            if last or not call.idempotent:
                raise RayTwinError(f"{call.method} {call.path}: {answer!r}") from answer
            return self.retry.delay(attempt, None)
        safe = call.idempotent or not self.may_have_applied(answer)  # a 503 after which it may have taken effect
        if answer.status_code in RETRY_STATUSES and not last and safe:
            return self.retry.delay(attempt, retry_after_s(answer))
        if call.warn_deprecated:
            self.deprecations.observe(call.method, call.route, answer)
        if answer.is_error:
            error = from_response(answer)
            if maybe_applied and isinstance(error, ApiError) and (
                    call.conditional and error.status in (409, 412)  # the resend found the change made
                    or call.method != "GET" and error.status in RETRY_STATUSES):  # it kept failing after a try
                raise OutcomeUnknown(f"{call.method} {call.path}", error) from error  # that may have been applied
            raise error
        return None

    @staticmethod
    def may_have_applied(answer: httpx.Response | httpx.TransportError) -> bool:
        """Whether a try that ended with `answer` may have taken effect without answering so: every network error
        but a failed connect (the request never left), and a 503 saying the process applying it was lost."""
        if isinstance(answer, httpx.Response):
            return answer.status_code == 503 and error_code(answer) in MAYBE_APPLIED_CODES
        return not isinstance(answer, (httpx.ConnectError, httpx.ConnectTimeout))
