"""The client's retry rules and error mapping at the transport level, where a test can drop a connection
or answer like a load balancer (the client against the real server: tests/test_serve_api.py)."""

from __future__ import annotations

import random

import httpx
import pytest

from client import RayTwinClient, RetryPolicy
from client.errors import RayTwinError, ServerError, Unavailable
from serve_apps.schemas import AssetUpdate

FAST = RetryPolicy(attempts=3, backoff_s=0.0, max_backoff_s=0.0)


def scripted(*answers):
    """A transport that plays `answers` in order (an httpx.Response, or an exception to raise) and records requests."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), seen


HEALTH = httpx.Response(200, json={"status": "ok", "live_twins": 0, "jobs": {}})


def test_backoff_honours_retry_after_and_grows_with_a_cap():
    policy = RetryPolicy(attempts=5, backoff_s=0.5, max_backoff_s=2.0)
    rng = random.Random(0)
    assert all(policy.delay(1, None, rng) <= 0.5 for _ in range(100))
    assert max(policy.delay(6, None, rng) for _ in range(200)) <= 2.0
    assert policy.delay(1, 7.0, rng) == 7.0


def test_network_errors_are_retried_only_where_a_resend_is_safe():
    transport, seen = scripted(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), HEALTH)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert api.health().status == "ok" and api.retries == 2
    assert [r.url.path for r in seen] == ["/v1/health"] * 3

    update = AssetUpdate(type_name="thermal_rc", type_version="1.0.0")
    transport, seen = scripted(httpx.ReadTimeout("slow"))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(RayTwinError, match="ReadTimeout"):  # no If-Match: a resend could undo someone's write
            api.update_asset("zone-1", update)
    assert len(seen) == 1


def test_telemetry_resends_the_same_idempotency_keys_after_a_timeout():
    result = httpx.Response(200, json={"accepted": 0, "duplicates": 2, "rejected": 0, "reasons": []})
    transport, seen = scripted(httpx.ReadTimeout("slow"), httpx.Response(503, headers={"Retry-After": "0"}), result)
    events = [{"sequence": 1, "event_time": "2026-01-05T12:00:00Z", "measurements": {}},
              {"sequence": 2, "event_time": "2026-01-05T12:01:00Z", "measurements": {}, "idempotency_key": "mine"}]
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert api.send_telemetry("zone-1", events).duplicates == 2
    bodies = [r.content for r in seen]
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
    assert b'"idempotency_key":"zone-1:1"' in bodies[0] and b'"idempotency_key":"mine"' in bodies[0]


def test_errors_that_are_not_the_apis_shape_map_by_status():
    transport, _ = scripted(httpx.Response(503, text="upstream down"), httpx.Response(503, text="upstream down"),
                            httpx.Response(503, text="upstream down"))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(Unavailable, match="upstream down") as err:
            api.health()
    assert err.value.status == 503 and err.value.request_id is None and api.retries == 2
    transport, _ = scripted(httpx.Response(502, text="bad gateway"))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(ServerError):
            api.health()
