"""A killed recalibration's Tune placement groups (local Ray): named after the job, and removed once it failed or
before it runs again; Ray keeps a killed search's groups for the life of the job (`sweeps.tune_groups`)."""

from __future__ import annotations

import os
from concurrent.futures import Future

import pytest

from sweeps.recalibration import tune_owner
from sweeps.tune_groups import PREFIX, owned_by, remove_groups
from sweeps.tune_resources import NamedGroups, trial_resources
from tests.test_recalibration import World


def _left(owner: str) -> list[str]:
    from ray.util.placement_group import placement_group_table

    return [g["name"] for g in placement_group_table().values()
            if g["name"].startswith(f"{PREFIX}{owner}:") and g["state"] != "REMOVED"]


def test_tune_names_a_searchs_placement_groups_after_its_owner(ray_session, tmp_path):
    from ray import tune

    def trial(config: dict) -> None:
        tune.report({"loss": 1.0})

    with owned_by("job-t"):
        resources = trial_resources(0.01)
    tune.Tuner(tune.with_resources(trial, resources), tune_config=tune.TuneConfig(num_samples=1),
               run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    from ray.util.placement_group import placement_group_table

    named = [g for g in placement_group_table().values() if g["name"].startswith(f"{PREFIX}job-t:")]
    assert named and all(g["state"] == "REMOVED" for g in named)  # a search that ended removed its own
    assert trial_resources(0.01).owner.startswith("search-")  # outside `owned_by`: its own, never another's


def test_a_killed_searchs_placement_groups_are_removed_when_its_job_is_lost(ray_session, tmp_path):
    """Each attempt killed mid-search (an OOM kill) left its trial's placement group reserved for good."""
    import ray

    from serve_apps.audit import AuditLog
    from serve_apps.recalibration_jobs import RecalibrationJobs

    @ray.remote(num_cpus=0, max_retries=0)
    def killed_mid_search(owner: str) -> None:
        with owned_by(owner):
            ray.get(trial_resources(0.01).to_placement_group().ready())
        os._exit(1)  # killed: none of Tune's cleanup runs

    w = World(tmp_path)
    w.drift(["a"])
    (job,) = w.launched
    mine, running = tune_owner("acme", job.job_key), tune_owner("acme", "another-job")
    other = NamedGroups({"CPU": 0.01}, running).to_placement_group()  # another job's search, running
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(killed_mid_search.remote(mine))
    assert len(_left(mine)) == 1  # Ray keeps it: the job (here the driver) lives on

    jobs = RecalibrationJobs.__new__(RecalibrationJobs)  # only its outcome handling, over this trigger
    jobs.trigger, jobs.audit = w.trigger, AuditLog(str(tmp_path / "store"))
    lost = Future()
    lost.set_exception(ray.exceptions.WorkerCrashedError())
    jobs._finished("acme", job.job_key, lost)
    assert _left(mine) == [] and len(_left(running)) == 1  # the running search's group is not touched
    assert [j.job_key for j in w.launched] == [job.job_key] * 2  # launched again, with nothing left reserved
    ray.util.remove_placement_group(other)
    assert remove_groups(running) == 0


def test_a_jobs_cleanup_removes_exactly_its_owners_groups_not_an_owner_its_name_prefixes(monkeypatch):
    """Identifiers may hold ":": tenant ``acme:recal-acme-1``'s groups began with the name prefix of tenant ``acme``'s
    job ``recal-acme-1``, and that job's cleanup (by prefix) removed the other tenant's running search's groups."""
    import sweeps.tune_groups as groups

    mine, theirs = tune_owner("acme", "recal-acme-1"), tune_owner("acme:recal-acme-1", "recal-acme:recal-acme-1-7")
    names = {"a": f"{PREFIX}{mine}:{'1' * 32}", "b": f"{PREFIX}{theirs}:{'2' * 32}", "c": "someone-else"}
    removed: list[str] = []
    monkeypatch.setattr(groups.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(groups, "placement_group_table",
                        lambda: {pg: {"name": name, "state": "CREATED"} for pg, name in names.items()})
    monkeypatch.setattr(groups, "_group", lambda pg_id: pg_id)
    monkeypatch.setattr(groups, "remove_placement_group", removed.append)
    assert names["b"].startswith(f"{PREFIX}{mine}:")  # the prefix that matched both
    assert remove_groups(mine) == 1 and removed == ["a"]
    assert [groups.group_owner(n) for n in names.values()] == [mine, theirs, None]
