"""Whether a request whose backend replica died mid-call may be resent: the advice in its 503 `backend_unavailable`.

The replica may have died before, during or after the request's change: the client cannot know whether it
took effect. Reads and idempotent writes (PUT, DELETE, conditional requests of the routes that honour conditions,
`serve_apps.conditional.precondition`, POSTs a route declares safe to resend, such as telemetry, whose events carry
idempotency keys) are safe to resend; any other POST may take
effect twice, so the client is told to check first, and how.
"""

from __future__ import annotations

from fastapi import Depends, Request

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
IDEMPOTENT_METHODS = frozenset({"PUT", "DELETE"})


def resend_safe(why: str):
    """A route dependency declaring its POST safe to resend, because `why` (e.g. "events are idempotent")."""

    async def declare(request: Request) -> None:
        request.state.resend_advice = f"resending it is safe ({why})"

    return Depends(declare)


def advice(request: Request) -> str:
    """What the client of `request` should do now that its backend replica died: resend, or check first."""
    declared = getattr(request.state, "resend_advice", None)
    if declared is not None:
        return declared
    if request.method in READ_METHODS:
        return "a read changes nothing: resending it is safe"
    if request.method in IDEMPOTENT_METHODS:
        return (f"it may have taken effect; resending it is safe ({request.method} is idempotent; a conditional one "
                "that took effect answers 412, a DELETE 404: then read the resource)")
    return ("it may or may not have taken effect, and resending it may apply it twice: first read what it creates "
            "or changes (the matching GET) and resend it only if the change is not there")
