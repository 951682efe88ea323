"""Errors and state changes in the log under RayTwin's request id; denied attempts and key changes in the audit."""

from __future__ import annotations

import json
import logging
import re

from typer.testing import CliRunner

from tests.fixtures_serve import JobFiles, in_process, succeeded_job


def _key_id(headers: dict[str, str]) -> str:
    return headers["Authorization"].split("_")[1]  # rtk_<key_id>_<secret>


class Cancelling(JobFiles):
    """A backend that knows one succeeded job and cancels anything (a state change that succeeds)."""

    def cancel_job(self, tenant: str, job_id: str, key_id: str):
        return self.get_job(tenant, job_id).status().model_copy(update={"state": "cancelled"})


def _lines(caplog, request_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"request_id={request_id} " in r.getMessage()]


def test_every_error_and_state_change_is_logged_once_with_the_request_id_its_answer_carries(tmp_path, caplog):
    """The request id of an error body was in no log line (only 500s and store_fenced logged it): the runbook's
    "find the request id in the logs" found nothing."""
    caplog.set_level(logging.INFO, logger="raytwin.serve")
    with in_process(Cancelling(tmp_path, succeeded_job(tmp_path, {})), tmp_path) as (http, auth, services):
        reader, writer = auth["reader"], auth["writer"]
        cases = [  # (answer, route, status, key headers or None)
            (http.post("/v1/asset-types", json={}, headers=reader), "/v1/asset-types", 403, reader),
            (http.get("/v1/jobs/nope", headers=reader), "/v1/jobs/{job_id}", 404, reader),
            (http.get("/v1/assets"), "/v1/assets", 401, None),
            (http.post("/v1/jobs/j1/cancel", headers=writer), "/v1/jobs/{job_id}/cancel", 200, writer),
            (http.post("/v1/assets/zone-1/telemetry", content=b"x" * (services.config.max_body_bytes + 1),
                       headers={**writer, "Content-Type": "application/json"}), "unmatched", 413, None),
        ]
        for answer, route, status, headers in cases:
            assert answer.status_code == status, answer.text
            request_id = answer.headers["X-RayTwin-Request-ID"]
            if status >= 400:
                assert answer.json()["error"]["request_id"] == request_id
            (line,) = _lines(caplog, request_id)
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            if status == 401:  # the operator's line, no tenant's (`serve_apps.refused_credentials`)
                assert (fields["event"], fields["route"], fields["reason"]) == ("credential_refused", route, "missing")
                continue
            assert fields["event"] == "request" and fields["route"] == route and fields["status"] == str(status)
            assert (fields["tenant"], fields["key_id"]) == (("acme", _key_id(headers)) if headers else ("-", "-"))
            if headers:
                assert headers["Authorization"].removeprefix("Bearer ") not in line  # the key id, never the key
        read = http.get("/v1/jobs/j1", headers=reader)
        assert read.status_code == 200 and not _lines(caplog, read.headers["X-RayTwin-Request-ID"])  # a read: none


def test_every_refused_credential_is_counted_and_logged_without_the_key_and_a_flood_in_a_few_lines(tmp_path, caplog,
                                                                                                   monkeypatch):
    """A 401 (an unknown or revoked key) has no tenant, so no audit log held it, and its log line said neither why
    nor which key: a brute force on one key id read as a monitor's typo. Each is counted by reason and logged with
    a fingerprint of the key id it presents, never the key; a flood of them is a few lines, not one a request."""
    import hashlib

    from raytwin import metrics
    from serve_apps.refused_credentials import MAX_LINES, WINDOW_S, CredentialRefusals

    counted: list[str] = []
    monkeypatch.setattr(metrics, "CREDENTIALS_REFUSED", type("Counter", (), {
        "inc": staticmethod(lambda reason: counted.append(reason))}))
    caplog.set_level(logging.INFO, logger="raytwin.serve")
    with in_process(object(), tmp_path) as (http, auth, services):
        now = [0.0]
        services.refusals = CredentialRefusals(clock=lambda: now[0])
        key_id = _key_id(auth["reader"])
        stolen = f"rtk_{key_id}_guessed-secret"
        unknown = "rtk_0123456789ab_whatever"
        for headers in ({}, {"Authorization": "Basic eDp5"}, {"Authorization": f"Bearer {unknown}"},
                        {"X-API-Key": stolen}, {"X-API-Key": "no-key-format"}):
            assert http.get("/v1/assets", headers=headers).status_code == 401
        assert counted == ["missing", "malformed", "unknown_key", "wrong_secret", "unknown_key"]
        lines = [r.getMessage() for r in caplog.records if "event=credential_refused " in r.getMessage()]
        fields = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in lines]
        assert [(f["reason"], f["key_fp"]) for f in fields] == [
            ("missing", "-"), ("malformed", "-"), ("unknown_key", hashlib.sha256(b"0123456789ab").hexdigest()[:8]),
            ("wrong_secret", hashlib.sha256(key_id.encode()).hexdigest()[:8]), ("unknown_key", "-")]
        assert all(f["route"] == "/v1/assets" and len(f["request_id"]) == 32 for f in fields)
        assert not any(secret in caplog.text for secret in ("guessed-secret", "whatever", "eDp5", key_id))
        assert "status=401" not in caplog.text  # one line a refusal at most: not the request log's too

        caplog.clear()
        for n in range(3 * MAX_LINES):  # a flood: one key again and again, then a new key each time
            http.get("/v1/assets", headers={"X-API-Key": stolen if n < MAX_LINES else f"rtk_{n:012x}_x"})
        assert len(counted) == 5 + 3 * MAX_LINES  # every one counted
        logged = [r for r in caplog.records if "event=credential" in r.getMessage()]
        assert len(logged) == MAX_LINES - 5  # 5 kinds were logged in this minute above
        now[0] += WINDOW_S
        http.get("/v1/assets", headers={"X-API-Key": stolen})
        said = [r.getMessage() for r in caplog.records][-2:]
        assert said[0].startswith(f"event=credentials_refused_unlogged count={2 * MAX_LINES + 5} window_s=60")
        assert "event=credential_refused " in said[1] and "reason=wrong_secret" in said[1]


def test_a_denied_attempt_is_audited_with_its_request_id(tmp_path):
    """The audit log left 403s out: an admin could not see who tried what they may not."""
    with in_process(object(), tmp_path) as (http, auth, services):
        denied = http.post("/v1/asset-types", json={}, headers=auth["reader"])
        assert denied.status_code == 403
        (record,) = [r for r in services.audit.records("acme") if r.action == "access.denied"]
        assert (record.key_id, record.role, record.target) == (_key_id(auth["reader"]), "reader", "/v1/asset-types")
        assert record.request_id == denied.json()["error"]["request_id"]
        assert record.details == {"method": "POST", "route": "/v1/asset-types", "http_status": 403,
                                  "reason": denied.json()["error"]["message"]}
        listed = http.get("/v1/audit", headers=auth["admin"]).json()
        assert [r["action"] for r in listed] == ["access.denied"]  # in the tenant's log, through the API
        assert http.get("/v1/audit", headers=auth["other"]).json() == []  # and in no other tenant's


def test_keys_created_and_revoked_are_audited_in_the_keys_files_trail(tmp_path):
    from raytwin.cli import app
    from serve_apps.audit import AuditRecord
    from serve_apps.auth import key_audit_trail

    keys_file = tmp_path / "keys.json"
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--role", "writer", "--owner", "alice",
                                  "--keys-file", str(keys_file)])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    key_id = key.split("_")[1]
    assert runner.invoke(app, ["keys", "revoke", key_id, "--keys-file", str(keys_file)]).exit_code == 0
    trail = key_audit_trail(keys_file)
    assert trail.name == "keys.json.audit.jsonl" and trail.stat().st_mode & 0o077 == 0  # owner-only, as the keys
    records = [AuditRecord.model_validate_json(line) for line in trail.read_text().splitlines()]
    assert [(r.action, r.key_id, r.tenant, r.role) for r in records] == [
        ("key.create", key_id, "acme", "writer"), ("key.revoke", key_id, "acme", "writer")]
    assert all("@" in r.details["by"] for r in records)
    assert key not in trail.read_text()
    (revoked,) = json.loads(keys_file.read_text())  # kept, its owner with it, without its digest
    assert (revoked["key_id"], revoked["owner"], "sha256" in revoked) == (key_id, "alice", False)
