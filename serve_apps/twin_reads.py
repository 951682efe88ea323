"""Twin state reads straight from the twin shard actors, with a short-lived per-replica cache.

State queries are the hot path of the API. The Backend deployment owns the live-twin service
(it creates the shard actors and writes through them), but a read needs nothing from it: the
shard of (tenant, asset) follows from a stable hash, and a shard answers "unknown" for another
tenant's asset exactly as for a missing one. Reading here saves one deployment-handle hop per
query (measured ~9 ms on the 2-vCPU development VM, see benchmarks/RESULTS.md).

Freshness (``state_cache_s``, default 0.1 s; 0 turns the cache off): a current-state read may be
answered from a shard reply that this replica asked for at most ``state_cache_s`` before the
request arrived, so it reflects every event the twin had applied by then. Events ingested, and
assets changed or deleted, *through this replica* drop its cached entry first, so a client sees
its own writes when its requests reach the same replica; through another replica a read can lag
a write by up to ``state_cache_s``. Concurrent reads of one twin share a single shard call.
Unknown twins, failures and time-travel reads (``at=``) are never cached. Why: a shard call
costs ~1.5 ms CPU per query between the Ingress and the shard (README, "Performance"), more
than the rest of the query on the direct-ingress path; at 500 queries/s of one twin a 0.1 s
window turns 500 shard calls into ~10.

Failover (`live_or_durable`): a shard that has not answered within ``STALE_AFTER_S`` and that Ray
reports as restarting (its process died) is not waited for, and a call that Ray refuses because the
shard is restarting (``ActorUnavailableError``, its retries spent) is not an error: the read is answered
from the twin's last durable state (`actors.recovery.durable_state`, its latest snapshot), with
``stale: true`` and the header ``RayTwin-Stale: true``. Queries over many twins do the same per shard
(`serve_apps.asset_queries.LiveStates`). So does a shard that is alive but has left the call unanswered
past ``ServeConfig.shard_read_timeout_s`` (hung or stalled): until it answers, its twins are read from
the store at once and writes to them are refused (`serve_apps.shard_deadline`).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import ray

from actors.failover import actor_restarting
from actors.recovery import durable_state
from actors.routing import shard_index, shard_name
from raytwin import metrics
from raytwin.statestore import HistoryPruned, StateStore, to_micros
from serve_apps.config import ServeConfig
from serve_apps.errors import BackendUnavailable, Gone, NotFound, Unprocessable, unwrap
from serve_apps.shard_deadline import ShardBreakers, TwinUnavailable
from serve_apps.unawaited import ignore_outcome


T = TypeVar("T")

TELEMETRY_LOST = "resend it (events are idempotent)"
"""`TwinReader.write`'s advice once the process applying a write died: for telemetry and drift clears."""
STALE_AFTER_S = 0.25
"""How long a current-state read waits for its shard before asking whether the shard is restarting."""


async def live_or_durable(shard: Any, call: Awaitable[T], durable: Callable[[], Awaitable[T]], *,
                          deadline_s: float = math.inf,
                          unanswered: Callable[[asyncio.Future], None] | None = None) -> T:
    """The answer of `call` to `shard`, or, once the shard turns out to be restarting or has not answered
    within `deadline_s` (then `unanswered` gets the call), `durable()` (the twins' last durable state,
    marked stale) unless the shard answers first.

    A shard that is slow but alive is waited for up to `deadline_s`; a call that Ray refuses because the
    shard is restarting is answered by `durable()` (the call's retries are spent). Either may be left unread (the
    other answered first, the reader went away): their failures are then nobody's (`ignore_outcome`).
    """
    answer = asyncio.ensure_future(call)
    answer.add_done_callback(ignore_outcome)
    started = time.monotonic()
    while not (await asyncio.wait({answer}, timeout=STALE_AFTER_S))[0]:
        late = time.monotonic() - started >= deadline_s
        if late or actor_restarting(shard):
            if late and unanswered is not None:
                unanswered(answer)
            stored = asyncio.ensure_future(durable())
            stored.add_done_callback(ignore_outcome)
            await asyncio.wait({answer, stored}, return_when=asyncio.FIRST_COMPLETED)
            if answer.done() and answer.exception() is None:  # back before the store answered
                stored.cancel()
                return answer.result()
            return await stored
    if isinstance(answer.exception(), ray.exceptions.ActorUnavailableError):
        return await durable()
    return answer.result()


class TwinReader:
    """Looks shard actors up by name once per replica and awaits their state calls (cached briefly)."""

    def __init__(self, config: ServeConfig, clock=time.monotonic):
        self.store_url = config.url("twins")
        self.shards = config.twin_shards
        self.namespace = config.namespace
        self.max_age_s = config.state_cache_s
        self.max_entries = config.state_cache_entries
        self.read_timeout_s, self.write_timeout_s = config.shard_read_timeout_s, config.shard_write_timeout_s
        self.create_timeout_s = config.shard_create_timeout_s
        self.breakers = ShardBreakers(self.shards)
        self._clock = clock
        self._handles: dict[int, Any] = {}
        self._store = StateStore(self.store_url, config.storage_options or None)
        self._recent: OrderedDict[tuple[str, str], tuple[float, asyncio.Future]] = OrderedDict()
        self.on_forget: list[Callable[[str, str], None]] = []  # other caches of twin state (query reads)

    def shard_index(self, tenant: str, asset_id: str) -> int:
        return shard_index(tenant, asset_id, self.shards)

    def _shard(self, tenant: str, asset_id: str) -> Any:
        index = self.shard_index(tenant, asset_id)
        if index not in self._handles:
            self._handles[index] = ray.get_actor(shard_name(self.store_url, index, self.shards),
                                                 namespace=self.namespace)
        return self._handles[index]

    def shard(self, tenant: str, asset_id: str) -> Any:
        """The handle of the shard actor holding (tenant, asset), for readers of many twins at once."""
        return self._shard(tenant, asset_id)

    async def write(self, tenant: str, asset_id: str, call: Callable[[], Awaitable[T]],
                    timeout_s: float | None = None, lost: str = TELEMETRY_LOST) -> T:
        """`call()`, a write to the twin's shard (through the backend: telemetry, a drift clear, an asset's
        creation, change or deletion): refused with 503 while the shard leaves calls unanswered, and after
        `timeout_s` (default `shard_write_timeout_s`) without an answer (`serve_apps.shard_deadline`);
        503 too when the process handling it died meanwhile (a backend replica, a shard), whose events may or
        may not have been applied: a 500 there made clients drop batches that were never applied. `lost`: what
        the client should do then (resend telemetry; read an asset before creating it again)."""
        try:
            return await self.breakers.within(self.shard_index(tenant, asset_id), asset_id, call,
                                              timeout_s or self.write_timeout_s)
        except (ray.exceptions.RayActorError, BackendUnavailable) as exc:  # a shard's death, or the backend's
            raise TwinUnavailable(f"the process applying this write to twin {asset_id} was lost "
                                  f"({type(exc).__name__}); it may have been applied: {lost}",
                                  headers={"Retry-After": "1"}) from None

    async def _live(self, index: int, shard: Any, call: Callable[[], Awaitable[T]],
                    durable: Callable[[], Awaitable[T]]) -> T:
        """`live_or_durable` (straight `durable()` while the shard leaves a call unanswered), and for a shard
        actor dead for good (its owner, a backend replica, died: the restarted replica made new shards under the
        same names) the durable answer, the handle forgotten so that the next read looks the new shard up."""
        if self.breakers.is_open(index):
            return await durable()
        try:
            return await live_or_durable(shard, call(), durable, deadline_s=self.read_timeout_s,
                                         unanswered=lambda f: self.breakers.trip(index, f, self.read_timeout_s))
        except ray.exceptions.ActorDiedError:
            self._handles = {i: h for i, h in self._handles.items() if h is not shard}
            return await durable()

    async def state(self, tenant: str, asset_id: str, at: datetime | None = None) -> dict[str, Any]:
        """The twin's state now (see the module's freshness rule) or as of `at`; `NotFound` for
        unknown twins and other tenants' twins."""
        if at is not None:
            if at > (now := datetime.now(UTC)):  # the state then is not known: today's would pass for it
                raise Unprocessable(f"at {at.isoformat()} is after the server's time "
                                    f"{now.isoformat(timespec='seconds')}: a twin's state is known up to now (leave "
                                    "`at` out for the current state)")
            index, micros = self.shard_index(tenant, asset_id), to_micros(at)

            def past() -> Awaitable[Any]:
                return self._shard(tenant, asset_id).state_at.remote(tenant, asset_id, micros)

            try:
                try:
                    state = await self.breakers.within(index, asset_id, past, self.read_timeout_s)
                except ray.exceptions.ActorDiedError:  # a restarted backend's new shard (see `_live`): once more
                    self._handles.pop(index, None)
                    state = await self.breakers.within(index, asset_id, past, self.read_timeout_s)
            except HistoryPruned as exc:  # Ray's error for it is also a HistoryPruned
                raise Gone(str(unwrap(exc))) from None
            return self._found(state, asset_id, at)
        if self.max_age_s == 0:
            return await self._fetch(tenant, asset_id)
        key = (tenant, asset_id)
        now = self._clock()
        entry = self._recent.get(key)
        if entry is None or now - entry[0] > self.max_age_s:
            entry = (now, asyncio.ensure_future(self._fetch(tenant, asset_id)))
            entry[1].add_done_callback(ignore_outcome)  # its requests may all be gone (clients that gave up)
            self._remember(key, entry)
        try:
            return await asyncio.shield(entry[1])  # a cancelled request does not cancel the shared call
        except Exception:
            if self._recent.get(key) is entry:
                del self._recent[key]
            raise

    def forget(self, tenant: str, asset_id: str) -> None:
        """Drop the cached state of a twin this replica has just written to (read-your-writes)."""
        self._recent.pop((tenant, asset_id), None)
        for forget in self.on_forget:
            forget(tenant, asset_id)

    async def _fetch(self, tenant: str, asset_id: str) -> dict[str, Any]:
        durable = lambda: asyncio.to_thread(durable_state, self._store, tenant, asset_id)  # noqa: E731
        try:
            shard = self._shard(tenant, asset_id)
        except ValueError:  # no shard of that name yet: a restarted backend replica is creating them
            state = await durable()
        else:
            state = await self._live(self.shard_index(tenant, asset_id), shard,
                                     lambda: shard.state.remote(tenant, asset_id), durable)
        if state is not None and state.stale:
            metrics.STALE_READS.inc(read="state")
        return self._found(state, asset_id)

    async def states(self, shard: Any, tenant: str, asset_ids: list[str]) -> dict[str, dict[str, Any]]:
        """`TwinShard.states` of the tenant's twins among `asset_ids`, all held by `shard`; while it
        restarts, their last durable state, each marked ``"stale": True``."""
        stop = threading.Event()

        async def durable() -> dict[str, dict[str, Any]]:
            try:
                return await asyncio.to_thread(self._durable_states, tenant, asset_ids, stop)
            finally:  # the restarted shard answered first: the thread stops at its next twin
                stop.set()

        found = await self._live(self.shard_index(tenant, asset_ids[0]), shard,
                                 lambda: shard.states.remote(tenant, asset_ids), durable)
        metrics.STALE_READS.inc(sum(1 for state in found.values() if state.get("stale")), read="query")
        return found

    def _durable_states(self, tenant: str, asset_ids: list[str], stop: threading.Event) -> dict[str, dict[str, Any]]:
        """One store read per twin (`durable_state`), until `stop` is set."""
        out = {}
        for asset_id in asset_ids:
            if stop.is_set():
                break
            if (state := durable_state(self._store, tenant, asset_id)) is not None:
                out[asset_id] = state.query_view()  # marked stale
        return out

    def _remember(self, key: tuple[str, str], entry: tuple[float, asyncio.Future]) -> None:
        self._recent[key] = entry
        self._recent.move_to_end(key)
        while len(self._recent) > self.max_entries:
            self._recent.popitem(last=False)

    @staticmethod
    def _found(state: Any, asset_id: str, at: datetime | None = None) -> dict[str, Any]:
        if state is None:
            raise NotFound(f"no twin state for asset {asset_id}" + (f" at {at.isoformat()}" if at else ""))
        return state.model_dump(mode="json")
