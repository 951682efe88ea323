"""The shard's side of live model changes: shadow evaluations (`actors.shadow`) and hot swaps
(`actors.swap`), mixed into `actors.shard.TwinShard` so the shard module stays about ingestion."""

from __future__ import annotations

import logging
from typing import Any

from actors.shadow import ShadowBook, ShadowTwinReport
from actors.state import TwinState, UnknownTwin
from actors.swap import SwapMark, SwapRefused, swap_mark
from actors.twin import Twin
from raytwin.registry import ModelArtifact
from raytwin.statestore import StateStore, from_micros

log = logging.getLogger("raytwin.twins")


class LiveModelOps:
    """Needs the shard's `twins`, `store`, `fence`, `shadows` (a `ShadowBook`), `_refresh_stale`, `_settle` and
    `_zero_restarts`."""

    twins: dict[tuple[str, str], Twin]
    store: StateStore
    fence: tuple[str, int] | None
    shadows: ShadowBook

    def twins_of_model(self, tenant: str, model: str, other_than: str | None = None,
                       running: str | None = None) -> list[str]:
        """The tenant's twins whose current model version is a version of `model` (whose version for events
        from now on is not `other_than`, and is `running`, ``name@version``, where given)."""
        return sorted(self.swap_marks(tenant, model, other_than, running))

    def swap_marks(self, tenant: str, model: str, other_than: str | None = None,
                   running: str | None = None) -> dict[str, SwapMark]:
        """`twins_of_model`, each twin with its `SwapMark` as of this read (for a swap planned on it)."""
        self._refresh_stale()
        return {a: mark for (t, a), twin in self.twins.items() if t == tenant and twin.artifact.name == model
                and (mark := swap_mark(twin.segments))[0] != other_than and running in (None, mark[0])}

    def twin_models(self, tenant: str, asset_ids: list[str]) -> dict[str, str]:
        """The model each of these twins held here runs (asset id -> model name); twins not held are left out."""
        self._refresh_stale()
        return {a: twin.segments[-1].artifact.name for a in asset_ids if (twin := self.twins.get((tenant, a)))}

    def start_shadow(self, run_id: str, tenant: str, asset_ids: list[str], artifact: dict[str, Any],
                     events: int) -> int:
        """Shadow `artifact` beside production on these twins (all held here) for `events` events each;
        recorded in the store first, so a restarted shard resumes it (`actors.shadow`)."""
        self.store.check_lease(self.fence)
        self._refresh_stale()
        missing = [a for a in asset_ids if (tenant, a) not in self.twins]
        if missing:
            raise UnknownTwin(f"no twin {', '.join(missing)} for tenant {tenant!r}")
        return self.shadows.start(run_id, tenant, [self.twins[(tenant, a)] for a in asset_ids],
                                  ModelArtifact.model_validate(artifact), events)

    def shadows_running(self) -> list[tuple[str, str]]:
        return self.shadows.running()

    def shadow_report(self, tenant: str, ref: str) -> tuple[str, list[ShadowTwinReport]] | None:
        return self.shadows.report(tenant, ref)

    def stop_shadow(self, tenant: str, ref: str) -> bool:
        """End the evaluation of `ref` on the twins held here and delete its records."""
        self.store.check_lease(self.fence)
        return self.shadows.stop(tenant, ref)

    def swap_model(self, tenant: str, asset_id: str, artifact: dict[str, Any], at_us: int,
                   from_mark: SwapMark | None = None) -> TwinState | None:
        """Switch the twin to `artifact` for events at or after `at_us` (`actors.swap`), durably first;
        the same swap again (a retried call) is a no-op. None: no such twin. `from_mark`: only while the twin is at
        that mark (`swap_marks` as the caller read it; `SwapRefused` otherwise), so that a swap planned before
        another landed does not undo it (the backend's start finishing an interrupted promotion beside a new one)."""
        self._refresh_stale()
        twin = self.twins.get((tenant, asset_id))
        if twin is None:
            return None
        self.store.check_lease(self.fence)
        self._settle((tenant, asset_id))
        entry = {"at_us": at_us, "artifact": artifact}
        swaps = self.store.load_model_swaps(tenant, asset_id)
        if entry in swaps:
            return twin.view()
        if from_mark is not None and (mark := swap_mark(twin.segments)) != tuple(from_mark):
            raise SwapRefused(f"twin {tenant}/{asset_id} was swapped to {mark[0]} after this swap was planned (on "
                              f"{from_mark[0]}): that later swap stands")
        seg = twin.prepare_swap(at_us, ModelArtifact.model_validate(artifact))
        before = twin.segments[-1].artifact.ref
        self.store.save_model_swaps(tenant, asset_id, [*swaps, entry])
        twin.enter_swap(seg)
        self._zero_restarts([twin])  # its new version may run another simulator
        log.info("event=model_swapped tenant=%s asset=%s from=%s to=%s at=%s revision=%d", tenant, asset_id,
                 before, seg.artifact.ref, from_micros(at_us).isoformat(), twin.events_applied)
        return twin.view()
