"""An action audited in two steps, so that none takes place unaudited: its intent before it acts, its outcome after.

For every action, those whose effect lies beyond their own records (a command sent to a device, a connector
started, a twin started or stopped with its asset, a run submitted) and those on the store alone (a type published,
a transition, a policy set): `begin` writes the intent and refuses the action, with a 503 saying that nothing was
done, where the store does not take it; `settle` writes the outcome, which a store failure only logs (the action
took place; its intent, read as `outcome_missing`, says what it was). The API's routes
(`serve_apps.deps.Services.audited`) and the backend (`audited`: its bulk jobs' items and its own acts as the
system) use the same two steps."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from raytwin.storage import scrub_locations
from serve_apps.audit import AuditLog, AuditRecord
from serve_apps.errors import ApiError
from serve_apps.store_errors import StoreUnavailable, store_failure

log = logging.getLogger("raytwin.serve.audit")


def begin(audit: AuditLog, record: AuditRecord) -> AuditRecord:
    """Append `record` as the intent of an action about to take place (a new `action_id`); the intent. A store that
    refuses it raises `StoreUnavailable` (503) saying the action was not done; another failure is raised as is."""
    intent = record.model_copy(update={"phase": "intent", "action_id": uuid.uuid4().hex})
    try:
        audit.append(intent)
    except Exception as exc:
        failure = store_failure(exc)
        if failure is None:  # not the store's: a bug's 500, and still nothing done
            raise
        raise StoreUnavailable(f"{record.action} of {record.target} was not done: its audit record could not be "
                               f"written first ({failure.message})", failure.details, failure.headers,
                               error=failure.error) from exc
    return intent


def settle(audit: AuditLog, intent: AuditRecord, details: dict[str, Any]) -> None:
    """Append `intent`'s outcome record, later than it (their objects share the action id: their times may not);
    a failure is logged, and the intent stays."""
    at = max(datetime.now(UTC), intent.time + timedelta(microseconds=1))
    try:
        audit.append(intent.model_copy(update={"time": at, "phase": "outcome", "details": details}))
    except Exception:  # noqa: BLE001 - the action took place: its answer stands, its intent says what it was
        log.exception("event=audit_failed phase=outcome action=%s target=%s action_id=%s request_id=%s "
                      "tenant=%s key_id=%s", intent.action, intent.target, intent.action_id, intent.request_id,
                      intent.tenant, intent.key_id)


@contextmanager
def audited(audit: AuditLog, record: AuditRecord) -> Iterator[dict[str, Any]]:
    """`record`'s action in two steps around the body, for code off the event loop (the backend): `begin` (its
    `StoreUnavailable` means the body did not run), then `settle` with `record.details`, what the body put in the
    yielded dict (what it did before it raised, too) and ``status`` done, or refused/error as the body raised."""
    intent = begin(audit, record)
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except Exception as exc:
        settle(audit, intent, {**record.details, **outcome, **outcome_of(exc)})
        raise
    settle(audit, intent, {**record.details, "status": "done", **outcome})


def by_system(tenant: str, action: str, target: str, details: dict[str, Any], request_id: str | None = None
              ) -> AuditRecord:
    """A record of the backend's own act (key and role ``system``), as a request's names its key."""
    return AuditRecord(time=datetime.now(UTC), request_id=request_id, key_id="system", tenant=tenant, role="system",
                       action=action, target=target, details=details)


def outcome_of(exc: Exception) -> dict[str, Any]:
    """An audited action's outcome when it raised: `refused` (the request's fault: role, grant, four eyes, state,
    another tenant's) with the answer's status, code and reason, or `error`."""
    if isinstance(exc, ApiError) and exc.status < 500:  # (a refusal may quote a path the request named)
        return {"status": "refused", "http_status": exc.status, "code": exc.code,
                "reason": scrub_locations(exc.message)[:300]}
    return {"status": "error", "error": scrub_locations(f"{type(exc).__name__}: {exc}")[:300]}  # tenants read it
