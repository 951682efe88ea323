"""Finished shadow evaluations recorded on the lifecycle log by the service, not by whoever reads them.

A reader's GET of an evaluation used to write its evidence (and the candidate's automatic move to staging) to
the lifecycle log and the audit log: a read wrote, under the reader's key, and nothing was recorded until someone
read. The backend now records each finished evaluation itself (`conclude_running`, from its store watch every few
seconds), and a writer's DELETE records a finished one before it ends it, so a stop that comes first loses no
evidence; the GET answers what was recorded. Both record as the system principal (`raytwin.shadow.conclude`: once
per run), and audit it as the system's, its intent first."""

from __future__ import annotations

from collections.abc import Callable

from actors.live_models import LiveModels, ShadowReport, UnknownShadow
from raytwin.lifecycle import ModelLifecycle, TransitionRecord
from raytwin.registry import parse_ref
from raytwin.shadow import conclude, recorded
from serve_apps.audit import AuditLog
from serve_apps.audit_steps import audited, by_system


def evaluation_log(lifecycle: ModelLifecycle, ref: str) -> tuple[bool, list[TransitionRecord]]:
    """Whether the version was archived (or pruned) since its evaluation started (no evidence is recorded for it),
    and its model's lifecycle records (what was recorded of the evaluation: `raytwin.shadow.recorded`): one read of
    the log, verified, for all an evaluation asks of it."""
    model, version = parse_ref(ref)
    records = lifecycle.records(model)
    found = lifecycle.verify(model, records=records).versions.get(version)
    return found is not None and found.stage == "archived", records


def record_finished(report: ShadowReport, lifecycle: ModelLifecycle, audit: AuditLog, tenant: str,
                    request_id: str | None = None) -> list[TransitionRecord]:
    """Record `report`'s evaluation if it is done and its candidate not archived, audited as the system's
    `model.evaluate` in two steps (a store that cannot take its intent raises `StoreUnavailable`, nothing recorded:
    the next round, or the DELETE again, records it); the records written ([]: none, or recorded before)."""
    ref = report.candidate_ref
    if not report.done:
        return []
    archived, logged = evaluation_log(lifecycle, ref)
    if archived or recorded(logged, ref, report.run_id):
        return []
    with audited(audit, by_system(tenant, "model.evaluate", ref, {"run_id": report.run_id}, request_id)) as outcome:
        records = conclude(lifecycle, ref, tenant, report.run_id, report.comparison, len(report.twins), logged)
        outcome.update(recorded=[{"action": r.action, "seq": r.seq, "to_stage": r.to_stage, "hash": r.hash}
                                 for r in records])  # its evidence, and the move to staging the policy made
    return records


def conclude_running(models: LiveModels, lifecycle_of: Callable[[str], ModelLifecycle], audit: AuditLog,
                     concluded: set[str], timeout_s: float | None = None) -> None:
    """`record_finished` for every evaluation running, each finished run once per process (`concluded`: their run
    ids, so that one left running is not read from the log again and again). `GetTimeoutError` when a shard leaves a
    read unanswered for `timeout_s` (a hung shard hung the caller's thread for good): the next round tries again."""
    for tenant, ref in models.shadows_running(timeout_s):
        try:
            report = models.shadow(tenant, ref, timeout_s)
        except UnknownShadow:  # stopped meanwhile
            continue
        if report.done and report.run_id not in concluded:
            record_finished(report, lifecycle_of(tenant), audit, tenant)
            concluded.add(report.run_id)
