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
    with in_process(Cancelling(succeeded_job(tmp_path, {})), tmp_path) as (http, auth, services):
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
            assert fields["event"] == "request" and fields["route"] == route and fields["status"] == str(status)
            assert (fields["tenant"], fields["key_id"]) == (("acme", _key_id(headers)) if headers else ("-", "-"))
            if headers:
                assert headers["Authorization"].removeprefix("Bearer ") not in line  # the key id, never the key
        read = http.get("/v1/jobs/j1", headers=reader)
        assert read.status_code == 200 and not _lines(caplog, read.headers["X-RayTwin-Request-ID"])  # a read: none


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
    created = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--role", "writer", "--keys-file",
                                  str(keys_file)])
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
    assert key not in trail.read_text() and json.loads(keys_file.read_text()) == []
