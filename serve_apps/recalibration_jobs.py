"""Recalibration jobs in the backend: the `Recalibrator` wired to the store, the twins and Ray.

A launch reads the drifting twin's window from the durable event log and its estimated state at the
window's start (time travel), writes the window as Parquet under
``{store}/recalibration/{tenant}/windows/{job_key}.parquet`` and runs `sweeps.recalibration.recalibrate`
as a Ray task (1 CPU: the one its Tune trials, which reserve next to none, compute on). A worker killed
mid-search leaves Tune's placement groups behind (Ray keeps them for the life of the job): they are named after
the job and removed when it failed or was lost, and before it is launched again (a backend restart's
relaunch: the old replica's task died with it). Its outcome comes back
through a single worker thread, which records it and starts what waited for the slot.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import ray

from raytwin.recalibration import PolicyStore, RecalibrationPolicy
from raytwin.registry import ModelRegistry
from raytwin.sim.cpu import cpu_only
from raytwin.statestore import FenceCheck, StateStore
from raytwin.storage import scrub_locations
from serve_apps.audit import AuditLog
from serve_apps.audit_steps import audited, by_system
from serve_apps.changes import Change, ChangeLog
from serve_apps.config import ServeConfig
from serve_apps.recalibration import RecalJob, Recalibrator, TenantState
from sweeps.recalibration import (RecalibrationWork, held_inputs, next_free_version, recalibrate, start_std,
                                  tune_owner, window_table, write_window)
from sweeps.tune_groups import remove_groups

log = logging.getLogger("raytwin.serve.recalibration")
PAGE = 1000
LOST = (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
        ray.exceptions.LocalRayletDiedError, ray.exceptions.OutOfMemoryError)
"""A recalibration task's failures that say nothing of the fit: it is launched again (`Recalibrator.relaunch`)."""


@ray.remote(num_cpus=1, max_retries=0)  # the CPU its Tune trials compute on (`sweeps.recalibration.TRIAL_CPUS`)
def recalibration_task(work: RecalibrationWork) -> dict[str, Any]:
    return recalibrate(work).model_dump(mode="json")


class RecalibrationJobs:
    """The backend's trigger: policies from the store, jobs as Ray tasks, outcomes back in order."""

    def __init__(self, config: ServeConfig, twins: Any, changes: ChangeLog, audit: AuditLog,
                 fence: FenceCheck | None = None):
        """`fence`: the backend's `check_writable`, for the trigger (`Recalibrator`, its `fence`)."""
        self.config, self.twins, self.changes, self.audit = config, twins, changes, audit
        self.policies = PolicyStore(config.url("recalibration", "policies"), config.storage_options)
        self.events = StateStore(config.url("twins"), config.storage_options or None)
        self._outcomes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recalibration")
        self.trigger = Recalibrator(config.url("recalibration", "triggers"), config.storage_options,
                                    policies=self.policies.get, launch=self._launch,
                                    choose_version=self._choose_version, read=self._read, fence=fence)

    def _registry(self, tenant: str) -> ModelRegistry:
        return ModelRegistry(self.config.url("registry", tenant), self.config.storage_options or None)

    def _read(self, tenant: str, after: int) -> list[Change]:
        page = self.changes.read(tenant, after, PAGE)
        return self.changes.store.read(tenant, after, PAGE) if page.fell_behind else page.changes

    def _choose_version(self, tenant: str, model_ref: str, reserved: set[str]) -> str:
        name, _, version = model_ref.partition("@")
        return next_free_version(self._registry(tenant), name, version, reserved)

    def _launch(self, job: RecalJob, policy: RecalibrationPolicy) -> None:
        tenant = job.tenant
        remove_groups(tune_owner(tenant, job.job_key))  # an earlier attempt's, killed with a restarted backend
        artifact = self._registry(tenant).get(job.model_ref)
        trigger = next(t for t in job.triggers if t.asset_id == job.asset_id)
        timeout_s = self.config.shard_read_timeout_s  # a hung shard fails the launch, deferred (`Recalibrator._start`)
        until = job.window_end or trigger.event_time or self.twins.state(tenant, job.asset_id, timeout_s).event_time
        names = [*artifact.asset_type.inputs, *artifact.asset_type.outputs]
        table, start = window_table(self.events, tenant, job.asset_id, names, until, policy.window_s,
                                    policy.max_samples, held=held_inputs(artifact))
        estimate = self.twins.state_at(tenant, job.asset_id, start, timeout_s)  # the estimate at the first sample
        url = self.config.url("recalibration", tenant, "windows", f"{job.job_key}.parquet")
        stored = self.policies.get_stored(tenant, artifact.name)  # who set the policy in force: not its approver
        write_window(table, url, self.config.storage_options or None)
        work = RecalibrationWork(
            job_key=job.job_key, tenant=tenant, asset_id=job.asset_id, model_ref=job.model_ref,
            candidate_version=job.candidate_version, telemetry=url, start_state=estimate.state,
            start_std=start_std(artifact, estimate.std), policy=policy,
            policy_set_by=None if stored is None else stored.set_by,
            triggers=job.triggers, registry_url=self.config.url("registry", tenant),
            runs_url=self.config.url("runs", tenant), storage_options=self.config.storage_options)
        self._run(job, work, until)

    def _run(self, job: RecalJob, work: RecalibrationWork, until: datetime) -> None:
        """Start the job's task, audited as the system's `recalibration.start` in two steps: a store that cannot
        take the intent raises `StoreUnavailable`, no task started (the launch fails: `Recalibrator._start`)."""
        with audited(self.audit, by_system(job.tenant, "recalibration.start", job.model_ref, {
                "job_key": job.job_key, "asset_id": job.asset_id, "candidate_version": job.candidate_version,
                "attempt": job.attempts, "triggers": [t.seq for t in job.triggers], "window_end": until.isoformat()})):
            ref = recalibration_task.options(**cpu_only({})).remote(work)
        ref.future().add_done_callback(lambda f: self._outcomes.submit(self._finished, job.tenant, job.job_key, f))

    def _finished(self, tenant: str, job_key: str, future: Future) -> None:
        try:
            out = future.result()
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            lost = isinstance(exc, LOST) or isinstance(cause, LOST)  # the task's worker or node, not the fit, failed
            log.warning("event=recalibration_task_failed tenant=%s job=%s lost=%s error=%r", tenant, job_key, lost,
                        f"{type(cause).__name__}: {cause}")
            # the tenant reads it (audit log, GET /v1/recalibrations): without store locations, as every answer
            error = scrub_locations(f"{type(cause).__name__}: {cause}".splitlines()[0])[:500]
            remove_groups(tune_owner(tenant, job_key))  # what a killed search left reserved
            self._audit(tenant, "recalibration.lost" if lost else "recalibration.fail", job_key, error=error)
            if lost:
                self.trigger.relaunch(tenant, job_key, error)
            else:
                self.trigger.finish(tenant, job_key, error=error)
            return
        # the candidate was registered and submitted by the system principal `recalibration`
        self._audit(tenant, "model.submit", out["candidate"], job_key=job_key, run_id=out["run_id"],
                    by="recalibration", resumed=out["resumed"], seq=out["seq"], hash=out["hash"],
                    **({"warnings": out["warnings"]} if out["warnings"] else {}))
        self.trigger.finish(tenant, job_key, run_id=out["run_id"], candidate=out["candidate"])

    def _audit(self, tenant: str, action: str, target: str, **details: Any) -> None:
        """What the system's task did, in the tenant's audit log (its `recalibration.start` audited before)."""
        self.audit.append(by_system(tenant, action, target, details))

    def state(self, tenant: str) -> TenantState:
        return self.trigger.snapshot(tenant)
