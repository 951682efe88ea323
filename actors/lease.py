"""Which service writes a state store: acquiring, attaching to and taking over its lease.

One service writes a store (`raytwin.statestore.Lease`; why: `actors.service`). Service objects in
one Ray cluster with the same shard count and namespace are one service (the Serve backend, the
CLI, a driver restarted after a crash): they attach to the lease and share its named shard actors.
A service in *another* Ray cluster is not: its shards would be other actors writing with the same
epoch, two writers the fence cannot tell apart (two `raytwin serve` on one store both answered on
one port and would both have logged events). So the lease records its Ray session, the holder's
shards renew a heartbeat every `HEARTBEAT_S`, and another cluster watches it for `EXPIRY_S` (on its
own clock: the hosts' clocks may differ) for a holder that just crashed to go quiet, then takes the
store with a new epoch (fencing any of the holder's shards that still run), and is refused while the
holder keeps renewing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import ray

from actors.failover import actor_worker, worker_alive
from actors.routing import shard_name
from raytwin.statestore import LEASE_EXPIRY_S, LEASE_HEARTBEAT_S, Heartbeat, Lease, StateStore, StoreFenced
from raytwin.store_failures import count, failure_class

log = logging.getLogger("raytwin.twins")

STOP_WAIT_S = 30.0
"""How long a takeover (or a shard started in place of another process's) waits for the killed shard actors'
processes to exit."""
HEARTBEAT_S = LEASE_HEARTBEAT_S
"""How often a holder's shards renew the store's heartbeat (a small file write each)."""
EXPIRY_S = LEASE_EXPIRY_S
"""A holder whose heartbeat is older than this is gone (crashed, or its cluster stopped): three
missed renewals, more than a busy shard's thread is held up, and at most the wait of a service
started again right after a crash (less the seconds its Ray takes to start). Taking the store from
a holder that was only slow is safe: its shards' next writes are fenced."""


class StoreLeased(RuntimeError):
    """The store is leased to another live service (another shard count, namespace or Ray cluster)."""


class ActorsNotStopped(RuntimeError):
    """Killed actors whose processes still ran when `stop_actors` gave up waiting."""


def ray_cluster() -> str:
    """This process's Ray cluster: its session name, new at every start of the cluster."""
    return ray.get_runtime_context().get_session_name()


def _stop_shards(store_url: str, lease: Lease) -> None:
    """Kill the lease holder's shard actors found in this Ray cluster and wait until they are gone."""
    stop_actors([shard_name(store_url, i, lease.shards) for i in range(lease.shards)], lease.namespace)


def stop_actors(names: list[str], namespace: str, wait_s: float = STOP_WAIT_S) -> None:
    """Kill the actors of `names` found in this Ray cluster and wait until their processes have exited, at most
    `wait_s`: `ActorsNotStopped` past it, and nothing starts in their place. Why the process, not the name: `ray.kill`
    frees the name as GCS marks the actor dead, before its process exits (a chaos trial: still running in 7 of 8
    tries, writing for 4-10 ms more), and a successor shard shares the lease's epoch, so a write of the old one in
    flight (an S3 PUT) could land after the successor recovered. The processes waited for are the one read before the
    kill and the one GCS names once the actor is dead (`_still_running`): an actor that restarted between that read
    and the kill runs in another."""
    killed: dict[str, tuple[Any, set[tuple[bytes, int]]]] = {}
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:  # not running here
            continue
        worker = actor_worker(handle)
        killed[name] = handle, set() if worker is None else {worker}
        ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + wait_s
    while killed := {name: stop for name, stop in killed.items() if _still_running(name, namespace, *stop)}:
        if time.monotonic() >= deadline:
            running = ", ".join(f"{name} (pid {', '.join(str(w[1]) for w in sorted(workers)) or '?'})"
                                for name, (_, workers) in killed.items())
            log.error("event=actor_stop_timeout namespace=%s actors=%s wait_s=%g", namespace, running, wait_s)
            raise ActorsNotStopped(
                f"actors {running} of namespace {namespace} still run {wait_s:g} s after being killed: their writes "
                f"could land after their successors' recovery, so none was started; end those processes (`ray list "
                f"workers`, then kill the pid on its node) and try again")
        time.sleep(0.01)


def _still_running(name: str, namespace: str, handle: Any, workers: set[tuple[bytes, int]]) -> bool:
    """Whether a killed actor's name is still taken or a process of it still runs: of `workers` (ID and PID), which
    this adds the worker GCS names once the name is free (a dead actor keeps its last worker's address there), and
    drops those that exited."""
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        pass
    if (last := actor_worker(handle)) is not None:
        workers.add(last)
    workers -= {w for w in workers if not worker_alive(w[0])}
    return bool(workers)


SERVED_ELSEWHERE = ("that is another Ray cluster than this one: stop that service first, or serve from its cluster "
                    "(`raytwin serve --address`); to take the store from it anyway, fencing its shards: "
                    "`TwinService(..., takeover=True)` from Python")
"""What to do about a store another Ray cluster's service serves, for a command that would serve it."""


def _refuse_if_renewed(store: StateStore, held: Lease, advice: str = SERVED_ELSEWHERE,
                       wait_s: float | None = None) -> None:
    """`StoreLeased` if the shards of `held` (a live lease of another cluster) still renew its heartbeat:
    returns once this process has watched the heartbeat for `EXPIRY_S` of its own monotonic clock without
    seeing a renewal of `held`, giving up after `wait_s` (None: `EXPIRY_S`, and never less: a holder that
    crashed a moment ago goes quiet meanwhile; longer for a holder that is being stopped, such as a cluster
    whose pods are terminating). Why watch, not compare the renewal's time with this host's clock: the
    heartbeat's time is the holder's clock, and a host whose clock ran 6 s ahead took a live store at once
    while one behind refused to take a crashed holder's. A renewal is a heartbeat of `held` other than the
    one read before (its time is only a token); one that is not `held`'s is no renewal (a previous holder's
    dying shard may have overwritten it a moment ago) nor a sign of a crash (`RenewalWatch`)."""
    deadline = time.monotonic() + (EXPIRY_S if wait_s is None else max(EXPIRY_S, wait_s))
    for renewed_at in store.renewals(held, EXPIRY_S, HEARTBEAT_S):  # ends once quiet for `EXPIRY_S`: gone
        now = time.monotonic()
        if now >= deadline and renewed_at is not None:  # (none yet: quiet since the start, it ends at once)
            raise StoreLeased(
                f"store {store.url} is served by service {held.owner} of Ray cluster session {held.cluster} "
                f"(started by {held.acquired_by}; its shards renewed the lease {now - renewed_at:.1f} s ago, as "
                f"seen from this host): {advice}")
        log.info("event=store_lease_wait store=%s holder=%s cluster=%s renewed_s_ago=%s wait_left_s=%.0f", store.url,
                 held.owner, held.cluster, "none" if renewed_at is None else f"{now - renewed_at:.1f}",
                 max(deadline - now, 0.0))


def check_not_served(store: StateStore, advice: str) -> None:
    """`StoreLeased` (with `advice`) if any service, of any Ray cluster, serves the store: for a command that
    takes it over (a reshard), which would fence a live service's shards and fail every write it takes."""
    held = store.read_lease()
    if held is not None and not held.released:
        _refuse_if_renewed(store, held, advice)


def check_not_served_elsewhere(store: StateStore, cluster: str | None = None) -> None:
    """`StoreLeased` if a service of another Ray cluster than `cluster` (default: this process's; "" for a
    cluster not started yet) serves the store (see `acquire_lease`): for a command to refuse before it
    starts an app whose service would only be refused later."""
    held = store.read_lease()
    if held is not None and not held.released and held.cluster != (ray_cluster() if cluster is None else cluster):
        _refuse_if_renewed(store, held)


def acquire_lease(store: StateStore, shards: int, namespace: str, takeover: bool, *,
                  cluster: str | None = None, wait_s: float | None = None) -> Lease:
    """The lease this service writes with: the live one if it is the same service (this Ray
    `cluster`, same shard count and namespace), else a new epoch if the store is free, its holder in
    another cluster stopped renewing its heartbeat (within `wait_s`), or `takeover`; else `StoreLeased`."""
    cluster = ray_cluster() if cluster is None else cluster
    held = store.read_lease()
    live = held is not None and not held.released
    if live and held.cluster != cluster and not takeover:
        _refuse_if_renewed(store, held, wait_s=wait_s)
        log.warning("event=store_lease_expired store=%s owner=%s epoch=%d cluster=%s: its holder stopped renewing "
                    "its heartbeat, the store is taken with a new epoch", store.url, held.owner, held.epoch,
                    held.cluster)
        live = False
    if live and (held.shards, held.namespace) == (shards, namespace) and not takeover:
        return held
    if live and not takeover:
        raise StoreLeased(
            f"store {store.url} is leased to service {held.owner} (epoch {held.epoch}, {held.shards} shards in "
            f"namespace {held.namespace!r}, since {held.acquired_at}, by {held.acquired_by}): attach with "
            f"shards={held.shards}, namespace={held.namespace!r}, or take it over (after a crash, or to change the "
            "shard count) with takeover=True, which stops its shards")
    if live:
        _stop_shards(store.url, held)
    lease = Lease(owner=uuid.uuid4().hex, epoch=(held.epoch if held else 0) + 1, shards=shards, namespace=namespace,
                  acquired_at=datetime.now(UTC).isoformat(timespec="seconds"),
                  acquired_by=f"{socket.gethostname()}:{os.getpid()}", cluster=cluster)
    store.write_lease(lease)
    won = store.read_lease()
    if won != lease:  # another service wrote at the same moment: its lease stands
        if (won.shards, won.namespace, won.cluster) == (shards, namespace, cluster):
            return won
        raise StoreLeased(f"store {store.url} was leased to service {won.owner} meanwhile ({won.shards} shards); retry")
    store.write_heartbeat(Heartbeat(lease.owner, lease.epoch, cluster, time.time()))  # live before its shards start
    log.info("event=store_leased store=%s owner=%s epoch=%d shards=%d cluster=%s takeover=%s", store.url, lease.owner,
             lease.epoch, shards, cluster, bool(live))
    return lease


def release_lease(store: StateStore, fence: tuple[str, int] | None = None) -> bool:
    """Mark the store's lease released, so that any service takes it at once (no takeover, no wait
    for its heartbeat): if it is `fence`'s (a service closing), or, without `fence`, if it belongs to
    this process's Ray cluster (`raytwin serve` stopping its app, whose shards go with it). A shard
    still running then has its writes refused (`StoreFenced`). True if it released one."""
    held = store.read_lease()
    if held is None or held.released or (held.fence != fence if fence else held.cluster != ray_cluster()):
        return False
    store.write_lease(replace(held, released=True))
    log.info("event=store_released store=%s owner=%s epoch=%d", store.url, held.owner, held.epoch)
    return True


def renew_heartbeat(store: StateStore, fence: tuple[str, int]) -> threading.Thread:
    """Renew the store's heartbeat for `fence` every `HEARTBEAT_S` on a daemon thread of this shard
    process (returned), until the lease is no longer `fence`'s (a takeover): the holder is alive while any of
    its shards is. Each failed renewal is one line naming its error; the traceback comes with the first of a run
    of the same failure only (every 2 s a shard's log took 40 lines under a read-only store)."""
    cluster = ray_cluster()

    def beat() -> None:
        failing: tuple[str, str | None] | None = None  # the failure of the run logged with its traceback
        failures = 0
        while True:
            try:
                store.check_lease(fence)
                store.write_heartbeat(Heartbeat(fence[0], fence[1], cluster, time.time()))
            except StoreFenced:
                return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; an expired one lets another in
                error = failure_class(exc)
                log.warning("event=lease_heartbeat_failed store=%s error=%s failure=%s: %s", store.url,
                            error or "-", type(exc).__name__, exc, exc_info=failing != (type(exc).__name__, error))
                failing, failures = (type(exc).__name__, error), failures + 1
                if error is not None:  # the store's: counted for the alert (a full disk)
                    count("write", error)
            else:
                if failures:
                    log.info("event=lease_heartbeat_renewed store=%s failures=%d", store.url, failures)
                failing, failures = None, 0
            time.sleep(HEARTBEAT_S)

    thread = threading.Thread(target=beat, name="raytwin-lease-heartbeat", daemon=True)
    thread.start()
    return thread
