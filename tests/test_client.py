"""The client's retry rules and error mapping at the transport level, where a test can drop a connection
or answer like a load balancer (the client against the real server: tests/test_serve_api.py)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import warnings
from datetime import UTC, date, datetime
from pathlib import Path

import httpx
import pytest

from client import AsyncRayTwinClient, RayTwinClient, RetryPolicy
from client.deprecation import RayTwinDeprecationWarning
from client.errors import (NOT_RAYTWIN, Conflict, Forbidden, Gone, InvalidArgument, InvalidRequest, NotFound,
                           OutcomeUnknown, PayloadTooLarge, PreconditionFailed, RayTwinError, ServerError, Unauthorized,
                           Unavailable, UnexpectedAnswer, Unreachable, from_response)
from client.jobs import JobFailed, JobTimeout, JobWait
from raytwin.migration import MigrationRequest
from raytwin.recalibration import RecalibrationPolicy
from serve_apps.deprecation import Deprecation
from serve_apps.jobs import Job
from serve_apps.query_schemas import BulkRequest
from serve_apps.routes_models import TransitionRequest
from serve_apps.schemas import AssetCreate, AssetUpdate, JobAccepted
from tests.test_schema_evolution import V1, V2, api  # noqa: F401 (api: the in-process app fixture)

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
        with pytest.raises(OutcomeUnknown, match="the try got no answer .ReadTimeout.*and it may have been "
                           "applied; check whether it took effect"):  # no If-Match: a resend could undo someone's write
            api.update_asset("zone-1", update)
    assert len(seen) == 1


def test_a_compare_and_set_refused_after_a_lost_answer_is_an_unknown_outcome_not_a_lost_race():
    """A PUT with If-Match whose answer was lost may have been applied: its resend's 412 must not read as
    "someone else wrote, re-apply" (a read-modify-write then applied twice). A resend after a failed
    connect (nothing left the client) is an ordinary 412, and so is a first try's."""
    refused = httpx.Response(412, json={"error": {"code": "precondition_failed", "message": "at revision 8",
                                                  "details": [{"current_revision": 8}], "request_id": "r2"}})
    update = AssetUpdate(type_name="thermal_rc", type_version="1.0.0")
    for first, error in ((httpx.ReadTimeout("answer lost"), OutcomeUnknown), (httpx.RemoteProtocolError("dropped"),
                         OutcomeUnknown), (httpx.ConnectError("refused"), PreconditionFailed)):
        transport, seen = scripted(first, refused)
        with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            with pytest.raises(RayTwinError) as err:
                api.update_asset("zone-1", update, if_match=7)
        assert type(err.value) is error and len(seen) == 2
        assert seen[1].headers["If-Match"] == seen[0].headers["If-Match"]
    assert not isinstance(err.value, OutcomeUnknown)
    transport, _ = scripted(httpx.ReadTimeout("answer lost"), refused)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(OutcomeUnknown, match="may have been applied; read the resource") as unknown:
            api.update_asset("zone-1", update, if_match=7)
    assert unknown.value.refusal.current_revision == 8 and unknown.value.request_id == "r2"
    conflict = httpx.Response(409, json={"error": {"code": "conflict", "message": "reload and retry"}})
    transport, _ = scripted(httpx.ReadTimeout("answer lost"), conflict)
    request = TransitionRequest(to="production", reason="checked", expected_revision=3)

    async def promote() -> None:
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            await api.transition_model("zone", "1.0.0", request)

    with pytest.raises(OutcomeUnknown, match="409 conflict"):
        asyncio.run(promote())


def test_a_rollback_names_the_version_it_leaves_so_its_resend_goes_back_only_once():
    """A rollback without expected_revision was never resent, and one resent by hand after a lost answer went back
    two versions. The client reads production first and sends it as from_version: the resend is safe (the server
    answers 409 once that version is gone), so it is resent and its 409 is an unknown outcome, not a lost race."""
    from serve_apps.routes_models import RollbackRequest

    status = httpx.Response(200, json={"model": "zone", "revision": 5, "head_hash": "0" * 64, "production": "1.2.0",
                                       "rollback_target": "1.1.0", "versions": []})
    gone = httpx.Response(409, json={"error": {"code": "conflict", "message": "zone@1.2.0 is not the production"}})
    transport, seen = scripted(status, httpx.ReadTimeout("answer lost"), gone)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(OutcomeUnknown, match="409 conflict"):
            api.rollback_model("zone", RollbackRequest(reason="innovations drifted"))
    assert [(r.method, r.url.path) for r in seen] == [("GET", "/v1/models/zone/lifecycle")] + [
        ("POST", "/v1/models/zone/rollback")] * 2
    assert seen[1].content == seen[2].content and b'"from_version":"1.2.0"' in seen[1].content

    transport, seen = scripted(httpx.ReadTimeout("answer lost"))  # a revision given: nothing read, sent as it is

    async def back() -> None:
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=RetryPolicy(attempts=1), transport=transport) as api:
            await api.rollback_model("zone", RollbackRequest(reason="back", expected_revision=5))

    with pytest.raises(OutcomeUnknown):
        asyncio.run(back())
    assert [r.url.path for r in seen] == ["/v1/models/zone/rollback"] and b"from_version" not in seen[0].content



def _lost(code: str = "backend_unavailable") -> httpx.Response:
    return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {
        "code": code, "message": "the backend process handling this request was lost; it may or may not have taken "
                                 "effect"}})


def test_a_503_after_which_the_request_may_have_taken_effect_is_resent_only_where_that_is_safe():
    """Every 503 was resent: a proposal whose backend replica died after recording it was proposed twice."""
    transport, seen = scripted(_lost())
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(Unavailable, match="may or may not have taken effect") as err:
            api.propose_command("rooms", "zone-1", "setpoint", {"T_set": 294.0})
    assert err.value.code == "backend_unavailable" and len(seen) == 1 and api.retries == 0
    overloaded = httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"code": "overloaded",
                                                                                   "message": "at capacity"}})
    transport, seen = scripted(overloaded, _lost("twin_unavailable"))  # refused before any work: resent; then lost
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(Unavailable, match="may or may not"):
            api.clear_drift("zone-1", "checked")
    assert len(seen) == 2
    transport, seen = scripted(*[_lost("backend_unavailable")] + [overloaded] * 3)  # a safe resend that kept failing:
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:  # the first try may have
        with pytest.raises(OutcomeUnknown, match="503 overloaded"):  # sent the command: not a bare "overloaded"
            api.approve_command("c1")
    transport, seen = scripted(_lost(), HEALTH)  # a read: resent
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert api.health().status == "ok" and len(seen) == 2
    refused = httpx.Response(412, json={"error": {"code": "precondition_failed", "message": "at revision 8"}})
    transport, seen = scripted(_lost(), refused)  # a compare-and-set resent: its own write may have moved on
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(OutcomeUnknown):
            api.update_asset("zone-1", AssetUpdate(type_name="thermal_rc", type_version="1.0.0"), if_match=7)
    assert len(seen) == 2


def test_arguments_no_server_accepts_are_refused_before_anything_is_sent():
    transport, seen = scripted()
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(InvalidArgument, match="event 1 of the batch has no 'sequence'"):
            api.send_telemetry("zone-1", [{"sequence": 1, "event_time": "2026-01-05T12:00:00Z", "measurements": {}},
                                          {"event_time": "2026-01-05T12:01:00Z", "measurements": {}}])
        with pytest.raises(InvalidArgument, match=r"at=2026-01-05T12:00:00 has no time zone"):
            api.state("zone-1", at=datetime(2026, 1, 5, 12))
        # these raised pydantic's ValidationError, which is no RayTwinError (an app developer's find)
        with pytest.raises(InvalidArgument, match=r"query \(page_size is the request's limit\): limit: .*1000"):
            next(api.query(page_size=5000))
        with pytest.raises(InvalidArgument, match="clear_drift: reason: .*at least 1 character"):
            api.clear_drift("zone-1", "")
    assert seen == []

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


def test_telemetry_sends_datetimes_and_numpy_numbers_and_refuses_what_json_cannot_carry_before_sending():
    """A dict event with a datetime event time or NumPy numbers (a producer built from arrays) raised the JSON
    encoder's TypeError, which no `RayTwinError` handler catches; they are sent as RFC 3339 text and numbers, and
    a value JSON cannot carry is an `InvalidArgument` naming the event, with nothing sent."""
    import json

    import numpy as np

    transport, seen = scripted(ingested())
    events = [{"sequence": np.int64(1), "event_time": datetime(2026, 1, 5, 12, tzinfo=UTC),
               "measurements": {"T_in": {"value": np.float32(293.5), "unit": "K"}}}]
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert api.send_telemetry("zone-1", events).accepted == 2
        with pytest.raises(InvalidArgument, match="event 1 of the batch holds a value of type object"):
            api.send_telemetry("zone-1", [*events, {**events[0], "quality": object()}])
    (sent,) = json.loads(seen[0].content)["events"]
    assert sent == {"sequence": 1, "event_time": "2026-01-05T12:00:00Z", "idempotency_key": "zone-1:1",
                    "measurements": {"T_in": {"value": 293.5, "unit": "K"}}} and len(seen) == 1


def test_a_bare_string_where_a_sequence_of_names_is_expected_is_refused_before_sending():
    """`changes(asset_ids="zone-1")` followed the one-letter ids z, o, n, e, -, 1: valid ids, so the stream ran and
    silently delivered none of zone-1's changes; a string for `kinds`, `sort` or `fields` was split the same way."""
    transport, seen = scripted()
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(InvalidArgument, match=r"asset_ids='zone-1' is one string.*asset_ids=\('zone-1',\)"):
            next(api.changes(asset_ids="zone-1"))
        with pytest.raises(InvalidArgument, match="kinds='twin.state' is one string"):
            next(api.changes(kinds="twin.state"))
        with pytest.raises(InvalidArgument, match="sort='-state.T_in' is one string"):
            next(api.query(sort="-state.T_in"))
        with pytest.raises(InvalidArgument, match="kinds='contains' is one string"):
            api.asset_graph("site-1", kinds="contains")
    assert seen == []


async def _first_change(api: AsyncRayTwinClient, **filters) -> None:
    async for _ in api.changes(**filters):
        return


def test_the_async_client_refuses_a_bare_string_filter_too():
    transport, seen = scripted()

    async def follow() -> None:
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            with pytest.raises(InvalidArgument, match="asset_ids='zone-1' is one string"):
                await _first_change(api, asset_ids="zone-1")

    asyncio.run(follow())
    assert seen == []


EVENTS = [{"sequence": 1, "event_time": "2026-01-05T12:00:00Z", "measurements": {}},
          {"sequence": 2, "event_time": "2026-01-05T12:01:00Z", "measurements": {}, "idempotency_key": "mine"}]


def ingested() -> httpx.Response:  # a fresh answer per transport: a client that read one binds its stream
    return httpx.Response(200, json={"accepted": 2, "duplicates": 0, "rejected": 0, "reasons": []})


ZONE = AssetCreate(id="zone-1", type_name="thermal_rc", type_version="1.0.0")
CREATED = {"id": "zone-1", "tenant": "acme", "type_name": "thermal_rc", "type_version": "1.0.0"}


def overloaded() -> httpx.Response:
    return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"code": "overloaded",
                                                                             "message": "at capacity"}})


def serve_404(path: str = "/v1/assets/rt-0/telemetry") -> httpx.Response:
    """What Serve's HTTP proxy answers while the app deploys (no route yet): plain text, not RayTwin's body."""
    return httpx.Response(404, text=f"Path '{path}' not found. Ping http://.../-/routes for available routes.")


def send(api: RayTwinClient | AsyncRayTwinClient, asset_id: str = "rt-0"):
    """`send_telemetry(EVENTS)` on either client, run to its end (the async one in a fresh loop), then closed."""
    if isinstance(api, RayTwinClient):
        with api:
            return api.send_telemetry(asset_id, EVENTS)

    async def run():
        async with api:
            return await api.send_telemetry(asset_id, EVENTS)

    return asyncio.run(run())


def both(transport_of):
    """The sync and the async client on a fresh scripted transport each: `transport_of()` -> (transport, seen)."""
    for make in (RayTwinClient, AsyncRayTwinClient):
        transport, seen = transport_of()
        yield make("http://api", "rtk_x_y", retry=FAST, transport=transport), seen


def test_a_proxys_404_while_the_service_restarts_is_resent_not_a_missing_asset():
    """After `raytwin serve` restarted, Serve's proxy answered ``404 Path ... not found`` (plain text) while the app
    deployed: the client raised NotFound("not_found"), like a missing asset, and did not resend; a producer that drops
    batches of unknown assets lost them. Only RayTwin's own 404 (its error body) means "not found"."""
    for api, seen in both(lambda: scripted(serve_404(), serve_404(), ingested())):
        assert send(api).accepted == 2 and api.retries == 2
        assert len(seen) == 3 and seen[0].content == seen[1].content == seen[2].content  # the same keys each time
    for api, seen in both(lambda: scripted(serve_404(), serve_404(), serve_404())):
        with pytest.raises(Unavailable, match="a proxy answered, not RayTwin") as err:
            send(api)
        assert not isinstance(err.value, NotFound) and len(seen) == 3
        assert (err.value.status, err.value.code) == (404, NOT_RAYTWIN) and "Path '/v1/assets/rt-0/" in str(err.value)
    transport, seen = scripted(serve_404("/v1/assets"), httpx.Response(503, text="no healthy upstream"),
                               httpx.Response(201, json=CREATED, headers={"ETag": '"1"'}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:  # no RayTwin route saw it:
        assert api.create_asset(ZONE).revision == 1  # even a create is resent
    assert len(seen) == 3


def test_raytwins_own_404_is_not_found_at_once():
    missing = {"error": {"code": "not_found", "message": "no asset 'rt-0'", "request_id": "r9"}}
    for api, seen in both(lambda: scripted(httpx.Response(404, json=missing))):
        with pytest.raises(NotFound, match="no asset 'rt-0'") as err:
            send(api)
        assert (err.value.code, err.value.request_id, len(seen), api.retries) == ("not_found", "r9", 1, 0)


def serve_408() -> httpx.Response:
    """What Serve's HTTP proxy answers once its `request_timeout_s` passed before the replica answered: plain text,
    while the replica may still apply the request."""
    return httpx.Response(408, text="Request 3f1c9b timed out after 30.0s.")


def test_a_proxys_408_is_resent_where_that_is_safe_and_a_write_it_may_have_applied_is_an_unknown_outcome():
    """Serve's bare 408 (its request timeout) was raised at once as a plain `ApiError`: a read or a telemetry batch
    (idempotency keys) was not resent, though resending them is safe. Now it is a proxy's maybe-applied answer, as a
    504 is: resent for calls safe to resend (sync, async, the change stream); a write without keys is not resent and
    raises `OutcomeUnknown`; a read whose tries all timed out raises `Unavailable`."""
    for api, seen in both(lambda: scripted(serve_408(), serve_408(), ingested())):
        assert send(api).accepted == 2 and api.retries == 2
        assert len(seen) == 3 and seen[0].content == seen[2].content  # the same keys each time
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    for api, seen in both(lambda: scripted(serve_408(), refused, refused)):  # it may have applied the first try
        with pytest.raises(OutcomeUnknown, match=r"same idempotency keys \(rt-0:1, mine\)") as err:
            send(api)
        assert len(seen) == 3 and err.value.idempotency_keys == ("rt-0:1", "mine")

    async def create(api: AsyncRayTwinClient) -> None:
        async with api:
            await api.create_asset(ZONE)

    for api, seen in both(lambda: scripted(serve_408())):
        with pytest.raises(OutcomeUnknown, match="check whether it took effect before you send it again") as err:
            api.create_asset(ZONE) if isinstance(api, RayTwinClient) else asyncio.run(create(api))
        assert len(seen) == 1 and (err.value.refusal.status, err.value.refusal.code) == (408, NOT_RAYTWIN)
        assert isinstance(err.value.refusal, Unavailable) and "timed out after 30.0s" in str(err.value)
    transport, seen = scripted(serve_408(), HEALTH)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert api.health().status == "ok" and len(seen) == 2
    transport, seen = scripted(*[serve_408()] * 3)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(Unavailable, match="a proxy answered, not RayTwin") as unavailable:
            api.health()
    assert unavailable.value.status == 408 and not isinstance(unavailable.value, OutcomeUnknown) and len(seen) == 3
    frame = 'id: 9\nevent: asset.updated\ndata: {"seq": 9, "kind": "asset.updated", "time": "2026-01-05T12:00:00Z", ' \
        '"asset_id": "zone-1", "revision": 2}\n\n'
    answered = httpx.Response(200, text=frame, headers={"Content-Type": "text/event-stream",
                                                        "X-RayTwin-Request-ID": "r1"})
    transport, seen = scripted(serve_408(), answered)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert next(api.changes(after=5)).seq == 9  # reconnected, not raised
    assert [r.headers.get("last-event-id") for r in seen] == ["5", "5"]


def test_connection_errors_after_a_try_that_may_have_been_applied_are_an_unknown_outcome():
    """The same restart's other lost batches: the service applied one whose answer was lost, the resends found it
    down (connection refused) and the client raised a bare RayTwinError, read as "not sent": 1480 events applied,
    1475 acknowledged. A try that may have been applied (written before the connection broke, a 503/504 after
    which it may have taken effect) makes the failure an OutcomeUnknown that names the keys to resend with."""
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    lost_answers = (lambda: httpx.RemoteProtocolError("Server disconnected without sending a response."),
                    lambda: httpx.ReadTimeout("timed out"), _lost, lambda: httpx.Response(504, text="timeout"))
    for first in lost_answers:
        for api, seen in both(lambda: scripted(first(), refused, refused)):
            with pytest.raises(OutcomeUnknown, match=r"resend the batch as it was, with the same idempotency keys "
                                                     r"\(rt-0:1, mine\)") as err:
                send(api)
            assert len(seen) == 3 and err.value.idempotency_keys == ("rt-0:1", "mine")
            assert err.value.cause is refused and err.value.refusal is None and "3 tries" in str(err.value)
    for api, _ in both(lambda: scripted(overloaded(), refused, httpx.ReadTimeout("timed out"))):  # the last try's
        with pytest.raises(OutcomeUnknown, match="ReadTimeout"):  # own lost answer is enough
            send(api)
    transport, seen = scripted(httpx.Response(502, text="bad gateway"))  # a create is not resent after a proxy's
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:  # 5xx: it may have been
        with pytest.raises(OutcomeUnknown, match="check whether it took effect before you send it again") as err:
            api.create_asset(ZONE)  # applied
    assert len(seen) == 1 and err.value.refusal.status == 502 and err.value.refusal.code == NOT_RAYTWIN


def test_a_connection_refused_before_anything_was_sent_is_retryable_unavailability():
    """Nothing left the client on any try: not an unknown outcome, but `Unreachable` (an `Unavailable`), so
    one ``except Unavailable`` keeps a batch for later whatever phase of a restart the client met."""
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    for answers in (lambda: (refused, refused, refused),
                    lambda: (serve_404(), overloaded(), httpx.ConnectTimeout("timed out connecting"))):
        for api, seen in both(lambda: scripted(*answers())):
            with pytest.raises(Unreachable, match="could not connect .*3 tries, none took effect: send it again later"
                               ) as err:
                send(api)
            assert isinstance(err.value, Unavailable) and not isinstance(err.value, OutcomeUnknown)
            assert len(seen) == 3 and err.value.code == "unreachable" and not str(err.value).startswith("0 ")
    transport, seen = scripted(refused, httpx.Response(201, json=CREATED, headers={"ETag": '"1"'}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:  # nothing was sent: a
        assert api.create_asset(ZONE).revision == 1  # create is resent
    assert len(seen) == 2


def test_errors_that_are_not_the_apis_shape_are_not_raytwins_codes():
    """A proxy's answer maps by status where its status means the same from a proxy (an auth proxy's 401, a body
    limit's 413) but never carries one of RayTwin's codes; its 404 and 5xx are `Unavailable`."""
    for status, cls in ((401, Unauthorized), (413, PayloadTooLarge), (404, Unavailable), (500, Unavailable),
                        (502, Unavailable), (503, Unavailable), (504, Unavailable)):
        error = from_response(httpx.Response(status, text="<html>nginx</html>\n"))
        assert type(error) is cls and error.code == NOT_RAYTWIN and error.message.startswith("<html>nginx</html> (")
    transport, _ = scripted(*[httpx.Response(503, text="upstream down")] * 3)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(Unavailable, match="upstream down") as err:
            api.health()
    assert err.value.status == 503 and err.value.request_id is None and api.retries == 2
    transport, _ = scripted(httpx.Response(502, text="bad gateway"), HEALTH)  # a read: resent
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert api.health().status == "ok"
    transport, _ = scripted(httpx.Response(500, json={"error": {"code": "internal", "message": "boom"}}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:  # RayTwin's own fault:
        with pytest.raises(ServerError, match="boom"):  # final, not resent
            api.health()


def test_the_change_stream_reconnects_from_the_last_id_and_stops_on_a_refusal():
    frames = "id: 7-3fa9c2d1\n\nid: 9-3fa9c2d1\nevent: asset.updated\ndata: " + \
        '{"seq": 9, "kind": "asset.updated", "time": "2026-01-05T12:00:00Z", "asset_id": "zone-1", "revision": 2, ' \
        '"generation": "3fa9c2d1"}\n\n'
    transport, seen = scripted(httpx.Response(503, headers={"Retry-After": "0"}),
                               httpx.Response(200, text=frames, headers={"Content-Type": "text/event-stream"}),
                               httpx.ConnectError("refused"),
                               httpx.Response(401, json={"error": {"code": "unauthorized", "message": "bad key"}}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        stream = api.changes(after=5)
        change = next(stream)
        assert (change.seq, change.kind, change.asset_id, change.event_id) == (9, "asset.updated", "zone-1",
                                                                               "9-3fa9c2d1")
        with pytest.raises(Unauthorized, match="bad key"):
            next(stream)
    assert [r.headers.get("last-event-id") for r in seen] == ["5", "5", "9-3fa9c2d1", "9-3fa9c2d1"]




def test_the_change_stream_outlasts_a_server_restart_but_not_a_server_that_never_answered():
    """Documented to run forever: once the server answered, any number of failed reconnects (a restart takes
    ~40 s, during which Serve's proxy answers a bare 404 while the app deploys; a full replica or the tenant's
    stream limit answers 503/429) is waited out; a stream whose server never answered (a wrong URL) gives up
    after the policy's attempts."""
    frame = 'id: {0}\nevent: asset.updated\ndata: {{"seq": {0}, "kind": "asset.updated", "time": ' \
        '"2026-01-05T12:00:00Z", "asset_id": "zone-1", "revision": 2}}\n\n'
    sse = {"Content-Type": "text/event-stream"}
    down = [httpx.ConnectError("refused")] * 7 + [httpx.Response(503, headers={"Retry-After": "0"}),
                                                  serve_404("/v1/changes"), httpx.Response(502, text="bad gateway")]
    transport, seen = scripted(httpx.Response(200, text=frame.format(9), headers=sse), *down,  # Serve's proxy
                               httpx.Response(200, text=frame.format(10), headers=sse))  # while the app deploys
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        stream = api.changes(after=5)
        assert [next(stream).seq, next(stream).seq] == [9, 10]
    assert len(seen) == 12 and seen[-1].headers["last-event-id"] == "9"
    transport, seen = scripted(*[httpx.ConnectError("refused")] * 3)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(RayTwinError, match="3 connections failed in a row, none answered"):
            next(api.changes())
    limited = httpx.Response(429, headers={"Retry-After": "0", "X-RayTwin-Request-ID": "r1"},
                             json={"error": {"code": "rate_limited", "message": "8 streams open"}})
    transport, seen = scripted(*[limited] * 4, httpx.Response(200, text=frame.format(9), headers=sse))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:  # the stream limit
        assert next(api.changes(after=5)).seq == 9  # waited out: the server answered, it will make room
    transport, _ = scripted(*[httpx.Response(503, headers={"Retry-After": "0"}, text="no backend")] * 3)
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:  # a bare proxy, no RayTwin
        with pytest.raises(RayTwinError, match="3 connections failed in a row, none answered"):
            next(api.changes())

def test_a_gone_event_in_the_change_stream_raises_gone_with_the_servers_message():
    """The server ends a replay whose next changes the retention deleted with a `gone` event (no id):
    the documented `Gone`, never `UnexpectedAnswer` ("use the client of the server's version")."""
    frames = 'id: 10000\n\nevent: gone\ndata: {"last_event_id": "10000", "oldest": 10004, "message": ' \
        '"the changes after event id 10000 up to 10003 were deleted"}\n\n'
    transport, _ = scripted(httpx.Response(200, text=frames, headers={"Content-Type": "text/event-stream"}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(Gone, match="up to 10003 were deleted") as err:
            next(api.changes(after=10000))
    assert err.value.status == 410 and err.value.details == [{"last_event_id": "10000", "oldest": 10004,
                                                              "message": err.value.message}]


def test_an_error_event_ends_the_change_stream_with_its_error_and_no_reconnect_unless_one_may_succeed():
    """The server ends the stream of a key revoked while it was open with an `error` event (the 401 a new request
    gets): raised at once with the server's message and request id, not parsed as a change ("use the client of the
    server's version") nor reconnected. A 503 there (the keys file unreadable) is waited out like one at connect."""
    sse = {"Content-Type": "text/event-stream"}
    change = 'id: 9\nevent: asset.updated\ndata: {"seq": 9, "kind": "asset.updated", "time": ' \
        '"2026-01-05T12:00:00Z", "asset_id": "zone-1", "revision": 2}\n\n'

    def ended(status: int, code: str) -> str:
        return f'event: error\ndata: {{"status": {status}, "error": {{"code": "{code}", "message": "ended ' \
            f'({code})", "details": [], "request_id": "req-7"}}}}\n\n'

    transport, seen = scripted(httpx.Response(200, text=change + ended(401, "unauthorized"), headers=sse))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        stream = api.changes(after=5)
        assert next(stream).seq == 9
        with pytest.raises(Unauthorized, match=r"ended \(unauthorized\)") as err:
            next(stream)
    assert (err.value.status, err.value.request_id) == (401, "req-7") and len(seen) == 1
    transport, seen = scripted(httpx.Response(200, text=ended(503, "unavailable"), headers=sse),
                               httpx.Response(200, text=change, headers=sse))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert next(api.changes(after=5)).seq == 9
    assert [r.headers.get("last-event-id") for r in seen] == ["5", "5"]


def job_json(state: str, done: int) -> dict:
    return {"job_id": "j1", "kind": "bulk", "tenant": "acme", "key_id": "k", "asset_id": "", "model_ref": "",
            "content_hash": "", "scenarios": 0, "n_steps": 0, "state": state, "submitted": "2026-01-05T12:00:00Z",
            "error": "boom" if state == "failed" else None, "bulk": {"total": 3, "done": done}}


def test_iter_jobs_follows_the_cursor_to_the_last_page_sync_and_async():
    """`GET /v1/jobs` is paged (`next_cursor`), but the SDK had only the page call (`jobs`): every application wrote
    the cursor loop itself. `iter_jobs` follows it, newest first, as `query` and `audit_records` do theirs."""
    def page(ids: list[str], cursor: str | None) -> httpx.Response:
        return httpx.Response(200, json={"jobs": [{**job_json("succeeded", 3), "job_id": i} for i in ids],
                                         "next_cursor": cursor})

    async def collect(api) -> list[str]:
        async with api:
            return [job.job_id async for job in api.iter_jobs(state="succeeded", page_size=2)]

    for api, seen in both(lambda: scripted(page(["j3", "j2"], "c2"), page(["j1"], None))):
        got = collect(api) if isinstance(api, AsyncRayTwinClient) else [
            job.job_id for job in api.iter_jobs(state="succeeded", page_size=2)]
        assert (asyncio.run(got) if isinstance(api, AsyncRayTwinClient) else got) == ["j3", "j2", "j1"]
        assert [dict(r.url.params) for r in seen] == [{"state": "succeeded", "limit": "2"},
                                                      {"state": "succeeded", "limit": "2", "cursor": "c2"}]


def test_iter_assets_and_asset_types_follow_the_cursor_sync_and_async():
    """`GET /v1/assets` and `/v1/asset-types` answered whole lists; paged now, each has an `iter_*` that follows
    `next_cursor` to the last page as `iter_jobs` does, sending its filters and page size with every page."""
    from raytwin.contracts import Asset

    asset = Asset(id="a", tenant="acme", type_name="room", type_version="1.0.0").model_dump(mode="json")
    cases = [("iter_assets", {"type_name": "room"}, "assets", [asset], [{**asset, "id": "b"}], ["a", "b"]),
             ("iter_asset_types", {"name": "room"}, "asset_types", [V1.model_dump(mode="json")],
              [V2.model_dump(mode="json")], [V1.key, V2.key])]
    for method, filters, field, first, second, keys in cases:
        def pages():
            return scripted(httpx.Response(200, json={field: first, "next_cursor": "c2"}),
                            httpx.Response(200, json={field: second, "next_cursor": None}))

        async def collect(api) -> list:
            async with api:
                return [item async for item in getattr(api, method)(**filters, page_size=1)]

        for api, seen in both(pages):
            got = collect(api) if isinstance(api, AsyncRayTwinClient) else list(getattr(api, method)(**filters,
                                                                                                    page_size=1))
            items = asyncio.run(got) if isinstance(api, AsyncRayTwinClient) else got
            assert [getattr(item, "key", None) or item.id for item in items] == keys
            assert [dict(r.url.params) for r in seen] == [{**filters, "limit": "1"},
                                                          {**filters, "limit": "1", "cursor": "c2"}]


def test_iter_connector_dead_letters_follows_the_cursor_sync_and_async():
    """A connector's dead letters answered the newest `limit` (at most 1000) and no cursor: a tenant with more never
    read the rest. Paged now, `iter_connector_dead_letters` follows `next_cursor`, newest first, with its `day`."""
    def letter(key: str) -> dict:
        return {"asset_id": "pump-1", "idempotency_key": key, "reason": "mqtt://web/t: not JSON", "raw": "{",
                "dead_lettered_at": "2026-12-05T09:00:00Z"}

    def page(keys: list[str], cursor: str | None) -> httpx.Response:
        return httpx.Response(200, json={"dead_letters": [letter(k) for k in keys], "next_cursor": cursor})

    async def collect(api) -> list[str | None]:
        async with api:
            return [d.idempotency_key async for d in api.iter_connector_dead_letters("web", date(2026, 12, 5), 2)]

    for api, seen in both(lambda: scripted(page(["k3", "k2"], "c2"), page(["k1"], None))):
        got = collect(api) if isinstance(api, AsyncRayTwinClient) else [
            d.idempotency_key for d in api.iter_connector_dead_letters("web", date(2026, 12, 5), 2)]
        assert (asyncio.run(got) if isinstance(api, AsyncRayTwinClient) else got) == ["k3", "k2", "k1"]
        assert {r.url.path for r in seen} == {"/v1/connectors/web/dead-letters"}
        assert [dict(r.url.params) for r in seen] == [{"day": "2026-12-05", "limit": "2"},
                                                      {"day": "2026-12-05", "limit": "2", "cursor": "c2"}]


def test_wait_job_reports_each_change_backs_off_and_raises_on_failure_or_timeout():
    answers = [job_json("queued", 0), job_json("running", 1), job_json("running", 1), job_json("succeeded", 3)]
    transport, seen = scripted(*[httpx.Response(200, json=a) for a in answers])
    progress = []
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        job = api.wait_job("j1", timeout_s=60, max_poll_s=0.1,
                           on_progress=lambda j: progress.append((j.state, j.bulk.done)))
    assert job.state == "succeeded" and [r.url.path for r in seen] == ["/v1/jobs/j1"] * 4
    assert progress == [("queued", 0), ("running", 1), ("succeeded", 3)]  # the repeated status is not reported

    wait = JobWait("j1", timeout_s=10, first_poll_s=0.5, max_poll_s=2.0, clock=lambda: 0.0)
    delays = []
    for _ in range(4):
        assert not wait.finished(Job.model_validate(job_json("running", 1)))
        delays.append(wait.delay())
    assert delays == [0.5, 1.0, 2.0, 2.0]
    now = [0.0]
    wait = JobWait("j1", timeout_s=3, first_poll_s=2.0, max_poll_s=2.0, clock=lambda: now[0])
    assert not wait.finished(Job.model_validate(job_json("running", 1))) and wait.delay() == 2.0
    now[0] = 2.5
    assert wait.delay() == 0.5  # the last poll is at the deadline
    now[0] = 3.0
    with pytest.raises(JobTimeout, match="still running after 3 s"):
        wait.finished(Job.model_validate(job_json("running", 1)))
    with pytest.raises(JobFailed, match="boom") as failed:
        JobWait("j1", timeout_s=1).finished(Job.model_validate(job_json("failed", 1)))
    assert failed.value.job.bulk.done == 1


def test_the_async_client_waits_for_a_job_through_the_same_calls():
    answers = iter([job_json("running", 1), job_json("succeeded", 3)])
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=next(answers)))

    async def wait():
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            return await api.wait_job("j1", timeout_s=60, max_poll_s=0.1)

    assert asyncio.run(wait()).bulk.done == 3


def test_path_ids_that_are_not_identifiers_are_refused_before_any_request():
    """The server decodes %2F before routing (`GET /v1/assets/zone-1%2Fstate` is the state route), so only an
    identifier is sent: anything else raises InvalidArgument, a ValueError, naming the parameter and the rule."""
    transport, seen = scripted(httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        for bad in ("zone-1/state", "../asset-types/x", "", "-zone", "zone 1", "zone-1\n", "z" * 129):
            with pytest.raises(InvalidArgument, match=r"asset_id=.* is not an identifier") as refused:
                api.get_asset(bad)
            assert isinstance(refused.value, ValueError) and "nothing was sent" in str(refused.value)
        with pytest.raises(InvalidArgument, match=r"GET /v1/asset-types/\{name\}/\{version\}: version='1.0.0/x'"):
            api.get_asset_type("room", "1.0.0/x")
        assert seen == []
        with pytest.raises(NotFound):  # the longest identifier, with every character it may hold, is sent
            api.get_asset("a" * 121 + "_.:-Z09")
    assert seen[0].url.path == "/v1/assets/" + "a" * 121 + "_.:-Z09"

    async def refused_by_the_async_client() -> list[httpx.Request]:
        transport, sent = scripted()
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            with pytest.raises(InvalidArgument, match="asset_id='zone-2/relationships'"):
                await api.get_asset("zone-2/relationships")
        return sent

    assert asyncio.run(refused_by_the_async_client()) == []


RUN_ID = "calibration-20261205T150000Z-1a2b3c4d"


def test_a_run_files_nested_name_is_sent_as_a_path_and_nothing_else_is():
    """A run record lists nested output names (``search/part-000000.parquet``) and the server serves them, but
    `run_file` refused every name with a "/" before sending; a part that is not an identifier stays refused."""
    import hashlib

    data = b"PAR1"
    transport, seen = scripted(httpx.Response(200, content=data,
                                              headers={"X-RayTwin-SHA256": hashlib.sha256(data).hexdigest()}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        for bad in ("../run.json", "search/../../keys.json", "search//part.parquet", "/etc/passwd", "search/", ""):
            with pytest.raises(InvalidArgument, match=r"name=.* is not a path of identifiers joined by '/'"):
                api.run_file(RUN_ID, bad)
        with pytest.raises(InvalidArgument, match=r"run_id='sweep/x' is not an identifier"):
            api.run_file("sweep/x", "calibration.json")
        assert seen == []
        assert api.run_file(RUN_ID, "search/part-000000.parquet") == data
    assert seen[0].url.raw_path == f"/v1/runs/{RUN_ID}/files/search/part-000000.parquet".encode()


def _file_answer(body, recorded: bytes) -> httpx.Response:
    import hashlib

    return httpx.Response(200, content=body, headers={"X-RayTwin-SHA256": hashlib.sha256(recorded).hexdigest()})


def test_a_run_file_downloads_to_a_path_streamed_checked_and_renamed_into_place(tmp_path):
    """`run_file` held the whole file in memory: `download_run_file` streams it to a file beside the target,
    hashing as it comes, and renames it into place only with the recorded SHA-256 (resent like a read)."""
    from client.downloads import CHUNK_BYTES
    from client.errors import CorruptDownload

    data = random.Random(7).randbytes(3 * CHUNK_BYTES + 5)
    on_disk: list[int] = []

    def body(fail: bool):
        for start in range(0, len(data), CHUNK_BYTES):
            if start == 2 * CHUNK_BYTES:  # the first chunks are on disk, not held back in memory
                on_disk.append(sum(p.stat().st_size for p in tmp_path.glob(".fit.parquet.*.part")))
                if fail:
                    raise httpx.ReadError("connection reset mid-file")
            yield data[start:start + CHUNK_BYTES]

    target = tmp_path / "fit.parquet"
    target.write_bytes(b"the previous fit")
    busy = httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"code": "overloaded", "message": "busy"}})
    transport, seen = scripted(busy, _file_answer(body(fail=True), data), _file_answer(body(fail=False), data))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        assert api.download_run_file(RUN_ID, "search/part-000000.parquet", target) == target
        assert target.read_bytes() == data and len(seen) == 3 and api.retries == 2  # a 503, a cut: resent
        assert on_disk == [2 * CHUNK_BYTES] * 2 and sorted(p.name for p in tmp_path.iterdir()) == ["fit.parquet"]
        assert seen[-1].url.path == f"/v1/runs/{RUN_ID}/files/search/part-000000.parquet"


    transport, seen = scripted(_file_answer(data[:-1] + b"x", data), _file_answer(data[:10], data),  # not the
                               httpx.Response(404, json={"error": {"code": "not_found", "message": "no output file"}}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:  # record's bytes, cut short
        with pytest.raises(CorruptDownload, match=r"SHA-256 .*, but the run recorded .*: download it again"):
            api.download_run_file(RUN_ID, "fit.parquet", tmp_path / "new.parquet")
        with pytest.raises(CorruptDownload):
            api.download_run_file(RUN_ID, "fit.parquet", target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.parquet"] and target.read_bytes() == data
        with pytest.raises(NotFound, match="no output file"):
            api.download_run_file(RUN_ID, "nope.json", tmp_path / "nope.json")
        for bad, why in ((tmp_path, "is a directory"), (tmp_path / "no" / "x.json", "is not a directory")):
            with pytest.raises(InvalidArgument, match=why):
                api.download_run_file(RUN_ID, "fit.parquet", bad)
    assert len(seen) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["fit.parquet"]


def test_the_async_client_downloads_a_run_file_the_same_way(tmp_path):
    from client.errors import CorruptDownload

    data = b"PAR1" * 1000
    transport, _ = scripted(_file_answer(data, data), _file_answer(data[1:], data))

    async def download() -> bytes:
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            written = (await api.download_run_file(RUN_ID, "calibration.json", tmp_path / "fit.json")).read_bytes()
            with pytest.raises(CorruptDownload):  # a stream cut short
                await api.download_run_file(RUN_ID, "calibration.json", tmp_path / "fit.json")
            return written

    assert asyncio.run(download()) == data and (tmp_path / "fit.json").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["fit.json"]  # nothing partial left beside it


def test_a_run_file_without_its_sha256_header_is_refused_unless_the_caller_opts_out(tmp_path):
    """An answer without ``X-RayTwin-SHA256`` was accepted unchecked, though the server sends it with every run file:
    a proxy that stripped it, or a wrong server, went unnoticed. Now `MissingChecksum` (in memory, streamed sync and
    async; nothing written, not resent) names the header and what to check; ``verify=False`` accepts the file."""
    from client.errors import CorruptDownload, MissingChecksum

    data = b"PAR1" * 1000
    target = tmp_path / "fit.parquet"
    target.write_bytes(b"the previous fit")

    def bare() -> httpx.Response:
        return httpx.Response(200, content=data)

    transport, seen = scripted(bare(), bare(), bare(), bare(), _file_answer(data[1:], data))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(MissingChecksum, match=r"no \(or an empty\) X-RayTwin-SHA256 header, which RayTwin sends with every run "
                                                  r"file.*a proxy in front of RayTwin stripped it.*verify=False"):
            api.run_file(RUN_ID, "calibration.json")
        with pytest.raises(MissingChecksum, match="cannot be checked"):
            api.download_run_file(RUN_ID, "calibration.json", target)
        assert len(seen) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["fit.parquet"]  # none resent
        assert target.read_bytes() == b"the previous fit"
        assert api.run_file(RUN_ID, "calibration.json", verify=False) == data
        assert api.download_run_file(RUN_ID, "calibration.json", target, verify=False).read_bytes() == data
        with pytest.raises(CorruptDownload):  # a header that is there is still checked
            api.download_run_file(RUN_ID, "calibration.json", target, verify=False)

    async def download() -> bytes:
        transport, _ = scripted(bare(), bare())
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            with pytest.raises(MissingChecksum):
                await api.download_run_file(RUN_ID, "calibration.json", tmp_path / "new.json")
            return (await api.download_run_file(RUN_ID, "calibration.json", tmp_path / "new.json",
                                                verify=False)).read_bytes()

    assert asyncio.run(download()) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.parquet", "new.json"]


def test_an_empty_sha256_header_is_missing_and_upper_case_hex_is_the_same_hash():
    """An empty header read as a recorded hash of "" (CorruptDownload, "recorded :"), and the right hash in upper
    case as corrupt."""
    import hashlib

    from client.errors import MissingChecksum

    data = b"PAR1" * 10
    upper = hashlib.sha256(data).hexdigest().upper()
    transport, _ = scripted(httpx.Response(200, content=data, headers={"X-RayTwin-SHA256": ""}),
                            httpx.Response(200, content=data, headers={"X-RayTwin-SHA256": upper}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(MissingChecksum, match="no \\(or an empty\\)"):
            api.run_file(RUN_ID, "calibration.json")
        assert api.run_file(RUN_ID, "calibration.json") == data


def test_a_job_file_is_checked_in_memory_and_streamed_to_a_path_by_both_clients(tmp_path):
    """Job files share the run files' download: the job's recorded SHA-256 checked, `MissingChecksum` without it."""
    from client.errors import CorruptDownload, MissingChecksum

    data = b"PAR1" * 1000
    transport, seen = scripted(httpx.Response(200, content=data), _file_answer(data, data),
                               _file_answer(data, data), _file_answer(data[:-1], data))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(MissingChecksum, match="which RayTwin sends with every job file"):
            api.job_file("j1", "part-000000.parquet")
        assert api.job_file("j1", "part-000000.parquet") == data
        assert api.download_job_file("j1", "part-000000.parquet", tmp_path / "part.parquet").read_bytes() == data
        with pytest.raises(CorruptDownload, match="but the job recorded"):
            api.download_job_file("j1", "part-000000.parquet", tmp_path / "part.parquet")
    assert {r.url.path for r in seen} == {"/v1/jobs/j1/files/part-000000.parquet"}

    async def download() -> bytes:
        transport, _ = scripted(_file_answer(data, data))
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            return (await api.download_job_file("j1", "part-000000.parquet", tmp_path / "a.parquet")).read_bytes()

    assert asyncio.run(download()) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "part.parquet"]


def test_an_answer_that_does_not_fit_the_clients_models_is_an_unexpected_answer():
    """A wrong-shaped answer (here a state where an asset was expected) is a client.errors exception naming
    the fields, whichever client and whichever parser (a model, a list, a lazily imported one, the stream)."""
    state = {"tenant": "acme", "asset_id": "zone-1", "model_ref": "thermal_rc@1.0.0", "revision": 1,
             "metadata": {"site": 3}, "relationships": {}, "schema_version": 2}
    transport, _ = scripted(httpx.Response(200, json=state, headers={  # Serve's proxy id, then the server's
        "ETag": '"1"', "X-Request-ID": "serve-proxy-id", "X-RayTwin-Request-ID": "r-42"}),
                            httpx.Response(200, json={"asset_types": [{"name": 3}], "next_cursor": None}),
                            httpx.Response(200, json={"job_id": "j1"}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(UnexpectedAnswer) as wrong:
            api.get_asset("zone-1")
        message = str(wrong.value)
        assert message.startswith("GET /v1/assets/zone-1: the server's answer did not match the client's contract: ")
        assert "request_id r-42" in message and "the server's version" in message and wrong.value.request_id == "r-42"
        assert "id: Field required" in message and "type_name: Field required" in message
        assert len(wrong.value.errors) > UnexpectedAnswer.SHOWN and f"and {len(wrong.value.errors) - 5} more" in message
        with pytest.raises(UnexpectedAnswer, match=r"GET /v1/asset-types: .*: asset_types\[0\]\.name: Input should be a valid str"):
            api.list_asset_types()
        with pytest.raises(UnexpectedAnswer, match="GET /v1/jobs/j1: .*kind: Field required"):
            api.job("j1")

    async def read_async() -> None:
        transport, _ = scripted(httpx.Response(200, json={"live_twins": "many", "jobs": []}))
        async with AsyncRayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
            await api.health()

    with pytest.raises(UnexpectedAnswer, match=r"GET /v1/health: .*: status: Field required; live_twins: Input should be a valid integer"):
        asyncio.run(read_async())
    frames = 'id: 3\nevent: asset.updated\ndata: {"seq": 3, "kind": "asset.updated"}\n\n'
    transport, _ = scripted(httpx.Response(200, text=frames, headers={"Content-Type": "text/event-stream"}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        with pytest.raises(UnexpectedAnswer, match=r"GET /v1/changes \(event id 3\): .*time: Field required"):
            next(api.changes(after=0))


def test_fields_a_newer_server_added_are_ignored_by_every_parser():
    """The contracts forbid unknown fields, and the client parsed answers with them: a server that added a field
    (recommendations gained `warnings`, promotions `twins`) broke every client released before it. Answers are
    parsed ignoring fields the client does not know, at every depth; a missing or mistyped field still raises."""
    from raytwin.contracts import Asset

    asset = {**Asset(id="zone-1", tenant="acme", type_name="thermal_rc", type_version="1.0.0").model_dump(mode="json"),
             "added_later": {"x": 1}}
    job = {**Job(job_id="j1", kind="sweep", tenant="acme", key_id="k1", asset_id="zone-1", model_ref="m@1.0.0",
                 content_hash="h", scenarios=4, n_steps=10, submitted=datetime(2026, 1, 1, tzinfo=UTC)
                 ).model_dump(mode="json"), "priority": 3}
    change = '{"seq": 3, "kind": "asset.updated", "time": "2026-01-01T00:00:00Z", "origin": "replica-2"}'
    transport, _ = scripted(
        httpx.Response(200, json=asset, headers={"ETag": '"4"'}),
        httpx.Response(200, json={"assets": [asset], "next_cursor": None, "total": 1}),
        httpx.Response(200, json=job),
        httpx.Response(200, json={"status": "ok", "live_twins": 0, "jobs": {}, "region": "eu"}),
        httpx.Response(200, text=f"id: 3\nevent: asset.updated\ndata: {change}\n\n",
                       headers={"Content-Type": "text/event-stream"}))
    with RayTwinClient("http://api", "rtk_x_y", retry=FAST, transport=transport) as api:
        got = api.get_asset("zone-1")
        assert (got.value.id, got.revision) == ("zone-1", 4) and not hasattr(got.value, "added_later")
        assert [a.id for a in api.list_assets().assets] == ["zone-1"]
        assert api.job("j1").job_id == "j1"
        assert api.health().status == "ok"
        assert next(api.changes(after=0)).seq == 3
    import re

    parsers = [(path.name, line) for path in (Path(__file__).parents[1] / "client").glob("*.py")
               for line in path.read_text().splitlines() if re.search(r"validate_json\(", line)]
    assert parsers and [p for p in parsers if "extra=ANSWER_EXTRA" not in p[1]] == []  # a new parser too


# ---- against the real API: the FastAPI app and `Backend` in this process (tests/test_schema_evolution.py) ----

@pytest.fixture(scope="module")
def sdk(api):
    """A client per role of tenant acme over the in-process app (its TestClient's transport)."""
    client, auth, _ = api
    clients = {role: RayTwinClient("http://testserver", header["Authorization"].removeprefix("Bearer "),
                                   retry=FAST, transport=client._transport) for role, header in auth.items()}
    admin = clients["admin"]
    for asset_type in (V1, V2):
        admin.create_asset_type(asset_type)
    admin.create_asset(AssetCreate(id="sdk-room", type_name="room", type_version="1.0.0",
                                   initial_state={"T": 293.15}))
    yield clients
    for c in clients.values():
        c.close()
    backend = api[2]
    for asset_id in backend.twins.assets("globex"):  # the README example's twins (acme's: the api fixture)
        backend.twins.unregister("globex", asset_id)


def test_schema_evolution_calls_check_migrate_and_reverse(sdk):
    admin = sdk["admin"]
    report = admin.check_compatibility(V2.model_copy(update={"version": "1.1.0"}))
    assert (report.previous_version, report.required_bump) == ("1.0.0", "major")
    assert ("states.T", "removed", True) in {(c.where, c.change, c.breaking) for c in report.changes}
    before = admin.state("sdk-room").value
    with pytest.raises(InvalidRequest, match="target state 'T_air' has no source"):
        admin.migrate_asset("sdk-room", MigrationRequest(type_version="2.0.0"))
    with pytest.raises(Forbidden):
        sdk["reader"].migrate_asset("sdk-room", MigrationRequest(type_version="2.0.0", states={"T_air": {"from": "T"}}))
    asset = admin.get_asset("sdk-room")
    moved = admin.migrate_asset("sdk-room", MigrationRequest(type_version="2.0.0", states={"T_air": {"from": "T"}}),
                                if_match=asset.revision)
    assert moved.asset.type_version == "2.0.0" and moved.revision == admin.get_asset("sdk-room").revision
    assert moved.state_after["T_air"] == pytest.approx(before.state["T"] - 273.15, abs=1e-9)
    with pytest.raises(PreconditionFailed):  # the migration changed the asset's revision
        admin.migrate_asset("sdk-room", moved.inverse, if_match=asset.revision)
    admin.migrate_asset("sdk-room", moved.inverse)
    assert admin.state("sdk-room").value.state == before.state  # exactly back


def test_deprecation_headers_warn_once_per_route_with_the_sunset(sdk):
    admin, reader = sdk["admin"], sdk["reader"]
    sunset = datetime(2027, 3, 31, 23, 59, 59, tzinfo=UTC)
    mark = Deprecation(deprecated_at=datetime(2026, 12, 1, tzinfo=UTC), sunset=sunset,
                       link="https://docs.example.com/room-v2")
    assert admin.deprecate_asset_type("room", "1.0.0", mark) == mark
    with pytest.warns(RayTwinDeprecationWarning) as caught:
        for _ in range(3):
            reader.get_asset_type("room", "1.0.0")
        reader.get_asset_type("room", "2.0.0")  # not deprecated: no header, no warning
    (warning,) = [w.message for w in caught if isinstance(w.message, RayTwinDeprecationWarning)]
    assert warning.route == "GET /v1/asset-types/{name}/{version}" and warning.sunset == sunset
    assert warning.deprecated_at == mark.deprecated_at and warning.link == "https://docs.example.com/room-v2"
    assert "sunset 2027-03-31T23:59:59+00:00" in str(warning)
    admin.undeprecate_asset_type("room", "1.0.0")
    with pytest.raises(NotFound):
        admin.undeprecate_asset_type("room", "1.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayTwinDeprecationWarning)
        sdk["writer"].get_asset_type("room", "1.0.0")  # a client that never saw the mark: no header now


def test_a_bulk_job_is_waited_for_with_progress_and_its_report_read(sdk):
    writer = sdk["writer"]
    accepted = writer.bulk(BulkRequest(q='id == "sdk-room"', action="tag", set={"site": "north"}))
    seen = []
    job = writer.wait_job(accepted.job_id, timeout_s=60, on_progress=seen.append)
    assert job.state == "succeeded" and job.bulk.done == accepted.total == 1 and seen[-1].state == "succeeded"
    (item,) = writer.job_report(accepted.job_id).items
    assert item.asset_id == "sdk-room" and writer.get_asset("sdk-room").value.metadata["site"] == "north"
    with pytest.raises(NotFound):
        sdk["other"].job(accepted.job_id)  # another tenant's job


def test_recalibration_policies_and_the_model_lifecycle(sdk):
    admin, writer = sdk["admin"], sdk["writer"]
    policy = RecalibrationPolicy(free=["R"], max_trials=4)
    assert admin.set_recalibration_policy("room", policy) == policy == writer.recalibration_policy("room")
    with pytest.raises(InvalidRequest, match="R_io"):
        admin.set_recalibration_policy("room", RecalibrationPolicy(free=["R_io"]))
    with pytest.raises(NotFound):
        sdk["other"].recalibration_policy("room")
    assert writer.recalibrations().running == {}

    status = writer.model_lifecycle("room")
    assert [v.version for v in status.versions] == ["1.0.0", "2.0.0"] and status.revision == -1
    record = writer.transition_model("room", "2.0.0", TransitionRequest(to="candidate", reason="sdk test",
                                                                        expected_revision=-1))
    with pytest.raises(Conflict):  # stale compare-and-set
        writer.transition_model("room", "2.0.0", TransitionRequest(to="staging", reason="x", expected_revision=-1))
    assert [r.to_stage for r in writer.model_lifecycle_log("room")] == [record.to_stage] == ["candidate"]
    check = writer.verify_model_lifecycle("room")
    assert check.ok and check.records == 1 and check.head_hash == writer.model_lifecycle("room").head_hash


def test_the_readme_example_of_the_new_calls_runs_as_printed(api, sdk, capsys):
    """client/README.md's second example, against the in-process app, in a tenant of its own (globex)."""
    from tests.guides import extract

    client, auth, _ = api
    (block,) = [b for b in extract("client/README.md") if b.first_line == "from datetime import UTC, datetime"]
    code = block.text.replace('RayTwinClient("http://localhost:8000", "rtk_...")',
                              'RayTwinClient("http://testserver", KEY, transport=TRANSPORT)')
    with pytest.warns(RayTwinDeprecationWarning) as caught:
        exec(compile(code, block.id, "exec"), {"KEY": auth["other"]["Authorization"].removeprefix("Bearer "),
                                                "TRANSPORT": client._transport})
    assert [str(w.message) for w in caught if w.category is RayTwinDeprecationWarning] == [
        "GET /v1/asset-types/{name}/{version} is deprecated (sunset 2027-06-30T00:00:00+00:00)"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "against 1.0.0 the changes need a patch bump"
    assert printed[-3:] == ["job succeeded 2 of 2", "[('zone-a', 'changed'), ('zone-b', 'changed')]", "candidate"]


def test_recommendation_calls_reach_their_routes_with_valid_bodies(sdk):
    from serve_apps.routes_recommendations import RecommendationRequest

    request = RecommendationRequest.model_validate({
        "horizon_s": 1800.0, "step_s": 60.0, "objective": "mean_T", "control": {
            "input": "Q", "block_s": 300.0, "lower": 0.0, "upper": 1000.0}, "ensemble": {"rel_std": {"R": 0.05}}})
    writer = sdk["writer"]
    with pytest.raises(NotFound, match="no-such-room"):  # the body passed the server's validation (else 422)
        writer.recommend("no-such-room", request)
    with pytest.raises(NotFound, match="no recommendation nope for asset sdk-room"):
        writer.recommendation("sdk-room", "nope")
    with pytest.raises(NotFound, match="no recommendation nope"):
        writer.issue_recommendation("sdk-room", "nope", connector="site")


def test_importing_the_client_loads_neither_ray_nor_jax():
    """Answers whose server modules import Ray or JAX are loaded on first use (`client.calls._lazy`)."""
    code = "import sys, client, client.model_calls; print(sorted({'ray', 'jax', 'fastapi'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


# ---- the remaining resources: connectors and commands, what-if runs, shadow evaluation, audit ----

def _connector_spec(name: str) -> dict:
    """An MQTT connector for the rooms; its broker port is closed, so it runs without ever connecting."""
    from raytwin.ports import free_port

    return {"name": name, "kind": "mqtt", "broker": {"host": "127.0.0.1", "port": free_port(), "reconnect_max_s": 2},
            "routes": [{"topic": "rooms/+/telemetry", "asset_level": 1, "command_topic": "rooms/{asset_id}/cmd",
                        "payload": {"measurements": {"T": {"field": "t", "unit": "K"}}, "event_time": "ts",
                                    "time_format": "epoch_ms", "sequence": "seq"}}]}


def test_connector_and_command_calls_keep_secrets_tenants_and_four_eyes(sdk):
    from connectors.spec import Credentials

    admin, writer, reader, other = sdk["admin"], sdk["writer"], sdk["reader"], sdk["other"]
    view = admin.create_connector(_connector_spec("rooms"), Credentials(username="gw", password="hunter2-secret"))
    assert (view.spec["tenant"], view.spec["name"], view.status.state) == ("acme", "rooms", "running")
    assert "hunter2-secret" not in admin.connector("rooms").model_dump_json()
    assert [c.name for c in reader.connectors().connectors] == ["rooms"] and list(other.iter_connectors()) == []
    assert [c.name for c in reader.iter_connectors(page_size=1)] == ["rooms"]
    with pytest.raises(NotFound):
        other.connector("rooms")
    with pytest.raises(Forbidden):
        reader.pause_connector("rooms")
    assert admin.pause_connector("rooms").state == "paused" and admin.resume_connector("rooms").state == "running"
    with pytest.raises(InvalidRequest, match="topic"):
        admin.create_connector({**_connector_spec("bad"), "routes": [{**_connector_spec("bad")["routes"][0],
                                                                      "topic": "a/#/b"}]})

    proposed = writer.propose_command("rooms", "sdk-room", "setpoint", {"T_set": 294.0})
    assert proposed.status == "proposed" and proposed.value == {"T_set": 294.0}
    with pytest.raises(NotFound):
        writer.propose_command("rooms", "zone-a", "setpoint", {"T_set": 294.0})  # globex's asset
    decided = admin.approve_command(proposed.id)  # sent, or failed: the broker is down; either way decided once
    assert decided.status in ("sent", "failed") and decided.approved_by is not None
    assert admin.approve_command(proposed.id) == decided  # its resend (after a lost answer): as decided, not resent
    with pytest.raises(Forbidden):
        writer.approve_command(proposed.id)
    second = writer.propose_command("rooms", "sdk-room", "setpoint", {"T_set": 295.0})
    refused = admin.refuse_command(second.id, "not in office hours")
    assert refused.status == "refused" and reader.command(second.id).status == "refused"
    assert [c.id for c in reader.iter_commands("sdk-room", page_size=1)] == sorted([proposed.id, second.id])
    one = reader.commands(limit=1)  # the tenant's, in id order, a page at a time
    assert [c.id for c in one.commands] == [min(proposed.id, second.id)] and one.next_cursor is not None
    assert [c.id for c in reader.commands(limit=1, cursor=one.next_cursor).commands] == [max(proposed.id, second.id)]
    with pytest.raises(NotFound):
        other.command(proposed.id)
    left = writer.propose_command("rooms", "sdk-room", "setpoint", {"T_set": 296.0})
    admin.delete_connector("rooms")
    with pytest.raises(NotFound):
        admin.connector("rooms")
    settled = reader.command(left.id)  # the delete settles its open commands, by the system
    assert (settled.status, settled.history[-1].by) == ("refused", "system")
    assert reader.command(proposed.id).status == {"sent": "expired", "failed": "failed"}[decided.status]


def test_scenario_runs_match_the_closed_form_inline_and_as_a_job_with_its_files(sdk, tmp_path):
    import hashlib
    import io

    import numpy as np
    import pyarrow.parquet as pq

    from raytwin.contracts import Scenario
    from serve_apps.scenarios import AssetSweep

    writer = sdk["writer"]
    scenario = Scenario(asset_id="sdk-room", start_state={"T": 300.0}, horizon_s=3600.0, step_s=60.0,
                        inputs={"T_out": {"kind": "constant", "value": 280.0}, "Q": {"kind": "constant", "value": 0.0}})
    def closed_form(t):  # T relaxes to T_out with tau = R C (room@1.0.0's defaults)
        return 280.0 + 20.0 * np.exp(-np.asarray(t) / (0.01 * 1e6))

    run = writer.run_scenario(scenario, mode="sync")
    assert run.n_steps == 60 and np.allclose(run.states["T"], closed_form(run.times_s), rtol=0, atol=1e-6)
    with pytest.raises(InvalidRequest, match="inline limit"):
        writer.run_scenario(scenario.model_copy(update={"horizon_s": 1e9, "step_s": 1e3}), mode="sync")
    with pytest.raises(NotFound):
        sdk["other"].run_scenario(scenario)

    accepted = writer.run_scenario(scenario, mode="async")
    assert isinstance(accepted, JobAccepted)
    assert writer.wait_job(accepted.job_id, timeout_s=300).kind == "scenario"
    (row,) = writer.job_results(accepted.job_id).rows
    assert row["T_final"] == pytest.approx(float(closed_form(3600.0)), abs=1e-6)
    (part,) = writer.job_files(accepted.job_id)
    data = writer.job_file(accepted.job_id, part.name)  # checked against the SHA-256 the job recorded
    assert len(data) == part.size and pq.read_table(io.BytesIO(data)).column("T_final").to_pylist() == [row["T_final"]]
    assert part.sha256 == hashlib.sha256(data).hexdigest()  # listed as the job recorded it
    assert writer.download_job_file(accepted.job_id, part.name, tmp_path / part.name).read_bytes() == data
    with pytest.raises(NotFound, match="no file"):
        writer.job_file(accepted.job_id, "nope.parquet")

    space = {"method": "random", "n": 10_001, "dimensions": [{"name": "R", "target": "param", "low": 0.005,
                                                               "high": 0.02}]}
    sweep = AssetSweep.model_validate({"asset_id": "sdk-room", "horizon_s": 3600.0, "step_s": 60.0, "space": space})
    with pytest.raises(PayloadTooLarge, match="10001 scenarios exceed the limit of 10000"):  # the body passed
        writer.run_sweep(sweep)


def test_shadow_evaluation_calls_start_report_and_stop(sdk):
    from serve_apps.routes_shadow import ShadowRequest
    from tests.test_schema_evolution import room_events

    admin, writer = sdk["admin"], sdk["writer"]
    admin.create_asset_type(V1.model_copy(update={"version": "1.0.1"}))
    with pytest.raises(NotFound):
        writer.shadow("room", "1.0.1")
    writer.transition_model("room", "1.0.1", TransitionRequest(to="candidate", reason="shadow it"))  # submitted
    started = writer.start_shadow("room", "1.0.1", ShadowRequest(asset_ids=["sdk-room"], events=2))
    assert started.asset_ids == ["sdk-room"] and started.candidate_ref == "room@1.0.1"
    with pytest.raises(Conflict, match="already running"):
        writer.start_shadow("room", "1.0.1", ShadowRequest(asset_ids=["sdk-room"], events=2))
    assert not writer.shadow("room", "1.0.1").report.done
    writer.send_telemetry("sdk-room", room_events(100, 2, 294.0))
    status = writer.shadow("room", "1.0.1")
    assert status.report.done and status.report.run_id == started.run_id
    writer.stop_shadow("room", "1.0.1")  # records the finished evaluation if the service had not yet
    (evaluated,) = [r for r in writer.model_lifecycle_log("room") if r.action == "evaluate"]
    assert f"shadow evaluation {started.run_id}:" in evaluated.reason
    with pytest.raises(NotFound):
        writer.stop_shadow("room", "1.0.1")


def test_a_diverged_twins_state_and_divergence_parse_with_none_for_what_is_not_a_number(api, sdk, monkeypatch):
    """Through the real routes: NaN and infinity of a diverged filter are null in the answer, which the schema
    allows, so the client reads None where the server has no number (it used to raise pydantic's error)."""
    from actors.state import DivergenceReport, TwinState

    nan, inf = float("nan"), float("inf")
    report = DivergenceReport(nis_mean=nan, nis_last=inf, residual_mean={"T": -1e308}, residual_rms={"T": inf},
                              drift=True, diverged=True, drift_score=nan, process_noise_scale=nan)
    diverged = TwinState(tenant="acme", asset_id="sdk-room", model_ref="room@1.0.0", revision=7, event_time=None,
                         state={"T": nan}, std={"T": inf}, covariance=[[nan]], divergence=report, events_applied=7)

    async def read(tenant: str, asset_id: str, at: datetime | None = None) -> dict:
        return diverged.model_dump(mode="json")  # what `TwinReader.state` hands the routes

    monkeypatch.setattr(api[0].app.state.services.twins, "state", read)
    got = sdk["reader"].state("sdk-room")
    assert got.revision == 7 and got.value.divergence.diverged and got.value.divergence.drift
    assert got.value.state == {"T": None} and got.value.std == {"T": None} and got.value.covariance == [[None]]
    parsed = got.value.divergence
    assert (parsed.nis_mean, parsed.nis_last, parsed.drift_score, parsed.process_noise_scale) == (None,) * 4
    assert parsed.residual_mean == {"T": -1e308} and parsed.residual_rms == {"T": None}
    assert sdk["reader"].divergence("sdk-room").model_dump(exclude={"asset_id", "revision", "event_time"}) == \
        parsed.model_dump()


def test_the_listings_answer_pages_of_a_bounded_size_and_refuse_a_cursor_they_did_not_give(api, sdk):
    """`GET /v1/assets`, `/v1/asset-types`, `/v1/commands` and `/v1/connectors` answered every item at once; each
    answers a page now, `{<items>, next_cursor}` as `GET /v1/jobs` does, `limit` 1-1000 (default 100). A cursor that
    none of their pages gave, another listing's included, is a 422 saying what a cursor is and where to get one."""
    client, auth, _ = api
    reader = auth["reader"]
    for path, field in (("/v1/assets", "assets"), ("/v1/asset-types", "asset_types"), ("/v1/commands", "commands"),
                        ("/v1/connectors", "connectors")):
        page = client.get(path, params={"limit": 1}, headers=reader)
        assert page.status_code == 200 and set(page.json()) == {field, "next_cursor"} and len(page.json()[field]) <= 1
        for limit in (0, 1001):
            assert client.get(path, params={"limit": limit}, headers=reader).status_code == 422, (path, limit)
        refused = client.get(path, params={"cursor": "zone-1"}, headers=reader)
        assert refused.status_code == 422 and refused.json()["error"]["message"].startswith(
            f"query.cursor: not a cursor of GET {path}; a cursor is the `next_cursor` of a page of GET {path}")
    of_types = client.get("/v1/asset-types", params={"limit": 1}, headers=reader).json()["next_cursor"]
    assert client.get("/v1/assets", params={"cursor": of_types}, headers=reader).status_code == 422
    walked, cursor = [], None
    while True:  # the fixture's versions (and any an earlier test published), one a page
        page = client.get("/v1/asset-types", params={"limit": 1, **({"cursor": cursor} if cursor else {})},
                          headers=reader).json()
        walked += [f"{t['name']}@{t['version']}" for t in page["asset_types"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert walked == [t.key for t in sdk["reader"].iter_asset_types()] == sorted(walked)
    assert {V1.key, V2.key} <= set(walked) and len(set(walked)) == len(walked)
    assert [a.id for a in sdk["reader"].list_assets(type_name="room").assets] == ["sdk-room"]


def test_the_async_client_has_the_same_resource_calls(api, sdk):
    """The calls are shared `Call`s: the asyncio client over the same app (ASGI, in this event loop)."""
    client, auth, _ = api

    async def read():
        async with AsyncRayTwinClient("http://testserver", auth["admin"]["Authorization"].removeprefix("Bearer "),
                                      retry=FAST, transport=httpx.ASGITransport(app=client.app)) as api_:
            with pytest.raises(NotFound):
                await api_.connector("nope")
            return ([c async for c in api_.iter_commands("sdk-room", page_size=1)], await api_.audit(limit=1),
                    await api_.relationships("sdk-room"))

    commands, (record,), related = asyncio.run(read())
    assert commands == list(sdk["reader"].iter_commands("sdk-room")) and record.tenant == "acme"
    assert related == sdk["reader"].relationships("sdk-room")


def test_relationships_drift_clear_type_deletion_and_the_audit_log(sdk):
    from raytwin.contracts import Relationship

    admin, reader = sdk["admin"], sdk["reader"]
    admin.create_asset(AssetCreate(id="sdk-child", type_name="room", type_version="1.0.0",
                                   initial_state={"T": 293.15},
                                   relationships=[Relationship(kind="feeds", target="sdk-room")]))
    related = reader.relationships("sdk-room")
    assert related.outgoing == [] and [(r.kind, r.source) for r in related.incoming] == [("feeds", "sdk-child")]
    cleared = sdk["writer"].clear_drift("sdk-room", "sensor recalibrated")
    assert cleared.asset_id == "sdk-room" and not cleared.drift
    with pytest.raises(Conflict):  # sdk-room and sdk-child use it
        admin.delete_asset_type("room", "1.0.0")
    admin.create_asset_type(V1.model_copy(update={"version": "1.0.2"}))
    admin.delete_asset_type("room", "1.0.2")
    with pytest.raises(NotFound):
        reader.get_asset_type("room", "1.0.2")
    admin.delete_asset("sdk-child")

    records = admin.audit(day=datetime.now(UTC).date(), limit=10_000)
    actions = {(r.action, r.target) for r in records}
    assert {("twin.drift_clear", "sdk-room"), ("asset_type.delete", "room@1.0.2"), ("asset.delete", "sdk-child")} <= actions
    assert all(r.tenant == "acme" for r in records) and [r.time for r in records] == sorted(r.time for r in records)
    assert [r.action for r in admin.audit(limit=1)] == ["asset.delete"]
    with pytest.raises(Forbidden):
        reader.audit()


def test_the_readme_example_of_the_resource_calls_runs_as_printed(api, sdk, capsys, monkeypatch):
    """client/README.md's third example, in tenant globex, its connector's broker a closed local port."""
    from raytwin.ports import free_port
    from tests.guides import extract

    client, auth, _ = api
    (block,) = [b for b in extract("client/README.md") if b.first_line == "import os"]
    code = block.text.replace('RayTwinClient("http://localhost:8000", "rtk_...")',
                              'RayTwinClient("http://testserver", KEY, transport=TRANSPORT)')
    code = code.replace('"host": "mqtt.example.com", "port": 1883', f'"host": "127.0.0.1", "port": {free_port()}')
    monkeypatch.setenv("MQTT_PASSWORD", "never-printed")
    exec(compile(code, block.id, "exec"), {"KEY": auth["other"]["Authorization"].removeprefix("Bearer "),
                                            "TRANSPORT": client._transport})
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:] == ["connector site running", "a command needs another key's approval",
                           "[('setpoint', 'refused')]",
                           "['connector.create', 'command.propose', 'command.approve', 'command.refuse', "
                           "'connector.delete']"]
    cooled = float(printed[0].removeprefix("an hour unheated at -10 degC: ").removesuffix(" K colder"))
    assert 0.0 < cooled < 31.0  # colder, never below the outdoor temperature
    assert "never-printed" not in "".join(printed)


# ---- the `raytwin` commands that call the API, over HTTP to the same in-process app ----

@pytest.fixture(scope="module")
def cli(api, sdk):
    """`raytwin ...` as a function of its arguments and a role, against the app served by uvicorn on a free port."""
    from typer.testing import CliRunner

    from raytwin.cli import app
    from tests.fixtures_http import served

    client, auth, _ = api
    with served(client.app) as url:
        def run(role: str, *args: str):
            env = {"RAYTWIN_API_URL": url, "RAYTWIN_API_KEY": auth[role]["Authorization"].removeprefix("Bearer ")}
            return CliRunner().invoke(app, list(args), env=env)

        yield run


def test_cli_recalibration_policies_and_errors_as_one_line(cli, tmp_path):
    import json

    policy = tmp_path / "policy.yaml"
    policy.write_text("free: [R]\nmax_trials: 3\ncooldown_s: 60\n")
    done = cli("admin", "recalibration", "policy", "set", "room", str(policy))
    assert done.exit_code == 0, done.output
    got = json.loads(cli("reader", "recalibration", "policy", "get", "room").stdout)
    assert (got["free"], got["max_trials"], got["cooldown_s"]) == (["R"], 3, 60.0)
    refused = cli("writer", "recalibration", "policy", "set", "room", str(policy))
    assert refused.exit_code == 1 and refused.stdout == ""
    assert refused.stderr.startswith("error 403 forbidden: ") and len(refused.stderr.splitlines()) == 1
    missing = cli("other", "recalibration", "policy", "get", "room")  # another tenant: no such policy
    assert missing.exit_code == 1 and missing.stderr.startswith("error 404 not_found: ")
    policy.write_text("free: []\n")
    bad = cli("admin", "recalibration", "policy", "set", "room", str(policy))
    assert bad.exit_code == 2 and "free" in bad.output  # checked before anything is sent
    assert "running" in json.loads(cli("reader", "recalibration", "list").stdout)


def test_cli_shadow_commands_audit_and_an_unreachable_api(cli, sdk):
    import json

    from raytwin.ports import free_port
    from serve_apps.audit import AuditRecord

    sdk["admin"].create_asset_type(V1.model_copy(update={"version": "1.0.3"}))
    sdk["writer"].transition_model("room", "1.0.3", TransitionRequest(to="candidate", reason="cli"))
    both = cli("writer", "shadow", "start", "room", "1.0.3", "--events", "1", "--asset-id", "sdk-room", "--sample", "1")
    assert both.exit_code == 2 and "either --asset-id" in both.output
    beyond = cli("writer", "shadow", "start", "room", "1.0.3", "--events", "10000000", "--asset-id", "sdk-room")
    assert beyond.exit_code == 2 and "events" in beyond.output and "Traceback" not in beyond.output
    started = cli("writer", "shadow", "start", "room", "1.0.3", "--events", "1", "--asset-id", "sdk-room")
    assert started.exit_code == 0, started.output
    run_id = json.loads(started.stdout)["run_id"]
    assert json.loads(cli("reader", "shadow", "status", "room", "1.0.3").stdout)["report"]["run_id"] == run_id
    assert cli("writer", "shadow", "stop", "room", "1.0.3").stdout.strip() == \
        "stopped the shadow evaluation of room@1.0.3"
    again = cli("writer", "shadow", "stop", "room", "1.0.3")
    assert again.exit_code == 1 and again.stderr.startswith("error 404 not_found: no shadow evaluation of room@1.0.3")

    lines = cli("admin", "audit", "--limit", "6").stdout.splitlines()
    records = [AuditRecord.model_validate_json(line) for line in lines]
    assert [(r.action, r.phase) for r in records] == [  # each attempt before it acts, the refused stop too
        (f"model.shadow_{step}", phase) for step in ("start", "stop", "stop") for phase in ("intent", "outcome")]
    assert records[-1].details["status"] == "refused" and records[-1].details["http_status"] == 404
    every = [AuditRecord.model_validate_json(line) for line in cli("admin", "audit", "--all").stdout.splitlines()]
    assert every[:6] == records[::-1] and len(every) > 6  # newest first, past the page of 6 above
    both = cli("admin", "audit", "--all", "--limit", "2")
    assert both.exit_code == 2 and "either --all or --limit" in both.output
    assert cli("reader", "audit").stderr.startswith("error 403 forbidden")

    down = cli("writer", "shadow", "stop", "room", "1.0.3", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.exit_code == 1 and down.stderr.startswith("error: no answer from http://127.0.0.1:")
    assert "check --api-url or RAYTWIN_API_URL" in down.stderr


def test_cli_commands_refuse_and_status_through_the_client(cli, sdk):
    import json

    sdk["admin"].create_connector(_connector_spec("cli-rooms"))
    proposed = json.loads(cli("writer", "connectors", "commands", "propose", "cli-rooms", "sdk-room", "setpoint",
                              '{"T_set": 293.0}').stdout)
    not_json = cli("writer", "connectors", "commands", "propose", "cli-rooms", "sdk-room", "setpoint", "[1]")
    assert not_json.exit_code == 2 and "VALUE must be a JSON object, got list" in not_json.output
    refused = cli("admin", "connectors", "commands", "refuse", proposed["id"], "--reason", "maintenance")
    assert refused.exit_code == 0 and json.loads(refused.stdout)["status"] == "refused"
    assert json.loads(cli("reader", "connectors", "commands", "status", proposed["id"]).stdout)["status"] == "refused"
    listed = [json.loads(line) for line in cli("reader", "connectors", "commands", "list", "--asset-id",
                                               "sdk-room").stdout.splitlines()]
    assert proposed["id"] in {c["id"] for c in listed} and set(listed[0]) == {
        "id", "asset_id", "name", "value", "status", "correlation_id", "ack"}
    assert cli("admin", "connectors", "delete", "cli-rooms").stdout.strip() == "deleted cli-rooms"
    gone = cli("reader", "connectors", "status", "cli-rooms")
    assert gone.exit_code == 1 and gone.stderr.startswith("error 404 not_found: no connector 'cli-rooms'")


def test_cli_refuses_an_id_that_is_not_an_identifier_as_a_usage_error(cli):
    """Refused by the client before anything is sent: exit code 2 like the other argument checks, not 'no answer'."""
    refused = cli("reader", "recalibration", "policy", "get", "room/x")
    assert refused.exit_code == 2 and "no answer" not in refused.output
    assert "type_name='room/x' is not an identifier" in " ".join(refused.output.replace("│", " ").split())


def test_client_errors_cross_processes_as_themselves():
    """A client error raised in a Ray task or a worker pool that calls the API could not be unpickled (the default
    pickle called `NotFound(message)`): the caller got a TypeError instead of the error and its fields."""
    import pickle

    from client.errors import NotFound, OutcomeUnknown, Unavailable, Unreachable

    down = Unavailable(503, "backend_unavailable", "the backend restarted", [], "req-1", 1.0)
    for error in (NotFound(404, "not_found", "no asset 'zone-9'", [{"asset_id": "zone-9"}], "req-2"),
                  OutcomeUnknown("POST /v1/assets/zone-1/telemetry", down, 3, "resend the batch", ("k1", "k2")),
                  Unreachable("GET /v1/health", httpx.ConnectError("connection refused"), 4)):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert {k: v for k, v in vars(back).items() if k not in ("refusal", "cause")} == \
            {k: v for k, v in vars(error).items() if k not in ("refusal", "cause")}
    back = pickle.loads(pickle.dumps(OutcomeUnknown("POST /x", down, 3, "resend", ("k1",))))
    assert back.refusal.code == "backend_unavailable" and back.idempotency_keys == ("k1",)


def test_the_whole_audit_log_is_read_a_page_at_a_time(api, sdk):
    """GET /v1/audit answered only the newest `limit` (at most 10,000) records, so on a busy day the older ones could
    not be read through the API: each page's X-Next-Cursor names the page before it, and the SDK follows it. A cursor
    it never gave is refused saying what a cursor is and where it comes from (it was pydantic's "String should match
    pattern '^\\d{4}-...'")."""
    from datetime import date

    client, auth, _ = api
    admin = sdk["admin"]
    newest_first = [r.as_json() for r in admin.audit(limit=10_000)][::-1]  # as answered
    assert len(newest_first) >= 3  # the fixture's types and asset
    assert [r.as_json() for r in admin.audit_records(page_size=2)] == newest_first
    first = client.get("/v1/audit", params={"limit": 2}, headers=auth["admin"])
    second = client.get("/v1/audit", params={"limit": 2, "cursor": first.headers["X-Next-Cursor"]},
                        headers=auth["admin"])
    assert first.json()[::-1] == newest_first[:2] and second.json()[::-1] == newest_first[2:4]
    today = date.today().isoformat()
    assert client.get("/v1/audit", params={"day": today, "limit": 10_000}, headers=auth["admin"]).headers.get(
        "X-Next-Cursor") is None  # the oldest page says so
    other_day = client.get("/v1/audit", params={"day": "2020-01-01", "cursor": first.headers["X-Next-Cursor"]},
                           headers=auth["admin"])
    assert other_day.status_code == 422 and "is a cursor of another day than 2020-01-01" in other_day.text
    for bad in ("../../keys", "2026-12-07", first.headers["X-Next-Cursor"] + "x"):
        refused = client.get("/v1/audit", params={"cursor": bad}, headers=auth["admin"])
        message = refused.json()["error"]["message"]
        assert refused.status_code == 422 and message.startswith("query.cursor: not a cursor of the audit log; a "
                                                                 "cursor is the X-Next-Cursor header of a GET /v1/audit")
        assert "\\d" not in message and refused.json()["error"]["details"] == [{"loc": ["query", "cursor"]}]


def test_a_prune_that_fails_partway_audits_what_it_did(api, sdk, monkeypatch):
    """A prune logs each version's removal, then removes the artifacts: one that failed there (a store error) had
    logged removals the audit log never had. Now the prune's outcome record names each logged removal, with the
    failure, and the next prune removes the leftover artifact."""
    import errno
    import os

    from fastapi.testclient import TestClient

    from raytwin.registry import ModelRegistry

    client, auth, _ = api
    admin = sdk["admin"]
    for version in ("1.0.0", "1.0.1"):
        admin.create_asset_type(V1.model_copy(update={"name": "room_pruned", "version": version}))
    sdk["writer"].transition_model("room_pruned", "1.0.0", TransitionRequest(to="candidate", reason="fit"))
    admin.transition_model("room_pruned", "1.0.0", TransitionRequest(to="archived", reason="superseded"))
    policy = client.get("/v1/lifecycle-policy", headers=auth["admin"]).json()
    assert client.put("/v1/lifecycle-policy", json={**policy, "keep_archived": 0},
                      headers=auth["admin"]).status_code == 200
    try:
        def disk_fails(path: str) -> None:  # under the storage layer (fsspec's rm), as a failing disk's error is
            raise OSError(errno.EIO, "Input/output error", path)

        with monkeypatch.context() as m:
            m.setattr(os, "remove", disk_fails)
            answering = TestClient(client.app, raise_server_exceptions=False)  # as served: the 503, not the raise
            failed = answering.post("/v1/models/room_pruned/prune", headers=auth["admin"])
        assert failed.status_code == 503, failed.text
        (logged,) = [r for r in admin.model_lifecycle_log("room_pruned") if r.action == "prune"]
        audited = [a for a in admin.audit(limit=50) if a.action == "model.prune" and a.target == "room_pruned"]
        assert [(a.phase, a.details.get("removed"), a.details.get("status")) for a in audited] == [
            ("intent", None, None),
            ("outcome", [{"version": "1.0.0", "seq": logged.seq, "hash": logged.hash}], "error")]
        again = client.post("/v1/models/room_pruned/prune", headers=auth["admin"])
        assert again.status_code == 200 and again.json()["versions_removed"] == []  # logged once, by the first
        assert ModelRegistry(api[2].config.url("registry", "acme")).versions("room_pruned") == ["1.0.1"]
    finally:
        client.put("/v1/lifecycle-policy", json=policy, headers=auth["admin"])
