"""Batch work yields the CPU to the live path (`raytwin.cpu_priority`). Each case runs in a fresh process: a thread
cannot take back a priority it gave up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raytwin.cpu_priority import BATCH_WORKER_ENV, PRIORITY_ENV, batch_worker

PROBE = """
import json, os, threading
from raytwin.cpu_priority import yield_to_live
before = threading.Thread(target=threading.Event().wait, daemon=True)  # a thread running before the call
before.start()
taken = yield_to_live(dedicated=DEDICATED)
after = threading.Thread(target=lambda: None)  # and one started after it: inherits the priority
policies = []
after.run = lambda: policies.append(os.sched_getscheduler(0))
after.start(); after.join()
def policy(tid):
    try:
        return os.sched_getscheduler(tid)
    except ProcessLookupError:  # a thread that exited since the listing (the joined one may still be listed)
        return None
live = {policy(int(t)) for t in os.listdir("/proc/self/task")} - {None}
print(json.dumps({"taken": taken, "policies": sorted(live),
                  "started_after": policies, "nice": os.getpriority(os.PRIO_PROCESS, 0)}))
"""

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux scheduling policies")


def _probe(env: dict[str, str], dedicated: bool = False) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (PRIORITY_ENV, *BATCH_WORKER_ENV)}
    done = subprocess.run([sys.executable, "-c", PROBE.replace("DEDICATED", str(dedicated))], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_batch_worker_runs_every_thread_at_idle_priority_its_later_threads_too():
    got = _probe(BATCH_WORKER_ENV)
    assert got["taken"] == "idle" and got["policies"] == [os.SCHED_IDLE] and got["started_after"] == [os.SCHED_IDLE]


def test_a_process_without_the_mark_keeps_its_priority_unless_its_caller_owns_it():
    """Another task of a shared worker (a twin's ingest task, a scenario) must not inherit a batch task's priority;
    a Tune trial's actor runs trials alone, so it takes the priority unmarked."""
    plain = _probe({})
    assert plain["taken"] is None and plain["policies"] == [os.SCHED_OTHER]
    assert _probe({}, dedicated=True)["policies"] == [os.SCHED_IDLE]


def test_the_priority_is_chosen_by_environment_and_a_wrong_value_is_named_with_the_choices():
    low = _probe({**BATCH_WORKER_ENV, PRIORITY_ENV: "low"})
    assert low["taken"] == "low" and low["policies"] == [os.SCHED_OTHER] and low["nice"] == 19
    normal = _probe({**BATCH_WORKER_ENV, PRIORITY_ENV: "Normal"})
    assert normal["taken"] == "normal" and normal["policies"] == [os.SCHED_OTHER] and normal["nice"] == os.nice(0)
    clean = {k: v for k, v in os.environ.items() if k not in (PRIORITY_ENV, *BATCH_WORKER_ENV)}
    bad = subprocess.run([sys.executable, "-c", "from raytwin.cpu_priority import yield_to_live; yield_to_live()"],
                         env={**clean, **BATCH_WORKER_ENV, PRIORITY_ENV: "lowest"}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "RAYTWIN_BATCH_CPU_PRIORITY='lowest' is not one of idle, low, normal" in bad.stderr


def test_batch_worker_options_keep_their_environment_and_carry_the_chosen_priority(monkeypatch):
    monkeypatch.setenv(PRIORITY_ENV, "low")
    options = batch_worker({"num_cpus": 1, "runtime_env": {"env_vars": {"XLA_FLAGS": "x"}, "pip": ["a"]}})
    assert options["num_cpus"] == 1 and options["runtime_env"]["pip"] == ["a"]
    assert options["runtime_env"]["env_vars"] == {"XLA_FLAGS": "x", **BATCH_WORKER_ENV, PRIORITY_ENV: "low"}
