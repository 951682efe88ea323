"""An action audited in two steps, so that none takes place unaudited: its intent before it acts, its outcome after.

For every action, those whose effect lies beyond their own records (a command sent to a device, a connector
started, a twin started or stopped with its asset, a run submitted) and those on the store alone (a type published,
a transition, a policy set): `begin` writes the intent and refuses the action, with a 503 saying that nothing was
done, where the store does not take it; `settle` writes the outcome, which a store failure only logs (the action
took place; its intent, read as `outcome_missing`, says what it was). The API's routes
(`serve_apps.deps.Services.audited`) and the backend (`audited`: its bulk jobs' items and its own acts as the
system) use the same two steps, and so does the offline CLI (`raytwin.lifecycle_cli`): the steps are the core's
(`raytwin.audit.two_steps`); what is the API's here is how a refused intent and a refusal are answered."""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from raytwin.audit import AuditLog, AuditRecord, error_outcome, refused_outcome, settle, two_steps, write_intent
from serve_apps.errors import ApiError
from serve_apps.store_errors import StoreUnavailable, store_failure

__all__ = ["audited", "begin", "by_system", "outcome_of", "settle"]


def begin(audit: AuditLog, record: AuditRecord) -> AuditRecord:
    """Append `record` as the intent of an action about to take place (a new `action_id`); the intent. A store that
    refuses it raises `StoreUnavailable` (503) saying the action was not done; another failure is raised as is."""
    try:
        return write_intent(audit, record)
    except Exception as exc:
        failure = store_failure(exc)
        if failure is None:  # not the store's: a bug's 500, and still nothing done
            raise
        raise StoreUnavailable(f"{record.action} of {record.target} was not done: its audit record could not be "
                               f"written first ({failure.message})", failure.details, failure.headers,
                               error=failure.error) from exc


def audited(audit: AuditLog, record: AuditRecord) -> AbstractContextManager[dict[str, Any]]:
    """`record`'s action in two steps around the body (`raytwin.audit.two_steps`), for code off the event loop
    (the backend): `begin` (its `StoreUnavailable` means the body did not run), then the outcome, ``status`` done,
    or refused/error as the body raised (`outcome_of`)."""
    return two_steps(audit, record, begin, outcome_of)


def by_system(tenant: str, action: str, target: str, details: dict[str, Any], request_id: str | None = None
              ) -> AuditRecord:
    """A record of the backend's own act (key and role ``system``), as a request's names its key."""
    return AuditRecord(time=datetime.now(UTC), request_id=request_id, key_id="system", tenant=tenant, role="system",
                       action=action, target=target, details=details)


def outcome_of(exc: Exception) -> dict[str, Any]:
    """An audited action's outcome when it raised: `refused` (the request's fault: role, grant, four eyes, state,
    another tenant's) with the answer's status, code and reason, or `error`."""
    if isinstance(exc, ApiError) and exc.status < 500:  # (a refusal may quote a path the request named)
        return refused_outcome(exc.message, http_status=exc.status, code=exc.code)
    return error_outcome(exc)
