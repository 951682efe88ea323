"""One log line per answered error and per state change, carrying RayTwin's request id.

The id in an error body and in ``X-RayTwin-Request-ID`` is the server's own (`serve_apps.limits`), not the
``x-request-id`` of Serve's access log, so without this line no log named it. A line says which request it was
(`request_id`, and the client's own id if it sent one), through which route template and method, with which status,
and whose (`tenant`, `key_id`: never the key): every 4xx/5xx answer (tenant and key id ``-`` where the request was
refused before its key was checked), and every request that may change state (any method but GET, HEAD and OPTIONS),
whatever its status. Reads that succeed are left out: they change nothing, and they are most of the traffic. A
401 is left out too: `serve_apps.refused_credentials` logs refused credentials, a flood of them in a few lines.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("raytwin.serve.requests")

READS = frozenset({"GET", "HEAD", "OPTIONS"})
PRINCIPAL = "principal"
"""The request state's key for the authenticated caller (`serve_apps.auth.Principal`), set by `serve_apps.deps`."""


def log_answer(scope: dict[str, Any], status: int, seconds: float, route: str) -> None:
    """Log the answer to the HTTP request `scope` if it is an error or the request may have changed state."""
    method = scope.get("method", "-")
    if (status < 400 and method in READS) or status == 401:  # a 401's line: `serve_apps.refused_credentials`
        return
    state = scope.get("state") or {}
    who = state.get(PRINCIPAL)
    log.log(logging.WARNING if status >= 500 else logging.INFO,
            "event=request request_id=%s route=%s method=%s status=%d tenant=%s key_id=%s client_request_id=%s "
            "ms=%.1f", state.get("request_id", "-"), route, method, status, who.tenant if who else "-",
            who.key_id if who else "-", state.get("client_request_id") or "-", seconds * 1000)
