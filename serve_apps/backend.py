"""The stateful side of the API: catalog, model registry, live twins and scenario jobs.

One replica (`num_replicas=1`) owns everything that must be consistent: catalog writes are
serialised under a lock and written through to the store, a twin is registered exactly when its
asset is created, and the job queue has one FIFO. The HTTP ingress replicas stay stateless and
autoscale; they call this deployment through a `DeploymentHandle`. The heavy work is elsewhere:
twins are Ray actors (`actors.service.TwinService` shards), scenario jobs are Ray tasks.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ray import serve

from raytwin.contracts import Asset, AssetType, RelationshipKind, TelemetryEvent
from raytwin.logs import component_logging
from raytwin.registry import ModelArtifact, ModelRegistry
from raytwin.sim.cpu import cpu_only
from raytwin.sim.discovery import restrict_fmu_sources
from serve_apps.catalog import Catalog
from serve_apps.config import ServeConfig
from serve_apps.connector_ops import ConnectorOps
from serve_apps.errors import Unprocessable
from serve_apps.jobs import Job, JobQueue, Work

log = logging.getLogger("raytwin.serve.backend")


class Backend:
    def __init__(self, config: ServeConfig):
        from actors.service import TwinService

        component_logging()
        restrict_fmu_sources([config.url("registry")])  # a request must not make the server fetch any URL
        self.config = config
        self.catalog = Catalog(config.store_url, config.storage_options)
        self.twins = TwinService(config.url("twins"), shards=config.twin_shards,
                                 namespace=config.namespace, storage_options=config.storage_options or None)
        self.jobs = JobQueue(config, config.max_concurrent_jobs)
        self.connector_ops = ConnectorOps(self.twins, config.connectors)
        self._lock = threading.Lock()
        self._registries: dict[str, ModelRegistry] = {}

    def _registry(self, tenant: str) -> ModelRegistry:
        if tenant not in self._registries:
            self._registries[tenant] = ModelRegistry(self.config.url("registry", tenant),
                                                     self.config.storage_options or None)
        return self._registries[tenant]

    def _artifact(self, tenant: str, asset: Asset) -> ModelArtifact:
        return self._registry(tenant).get(f"{asset.type_name}@{asset.type_version}")

    # ---- asset types -------------------------------------------------------------------
    def put_type(self, tenant: str, asset_type: AssetType) -> bool:
        """Store the type and register its model (default parameters) as ``name@version``."""
        with self._lock:
            created = self.catalog.put_type(tenant, asset_type)
            if created:
                self._registry(tenant).register(asset_type.name, asset_type.version, asset_type)
            return created

    def get_type(self, tenant: str, name: str, version: str) -> AssetType:
        with self._lock:
            return self.catalog.get_type(tenant, name, version)

    def list_types(self, tenant: str, name: str | None) -> list[AssetType]:
        with self._lock:
            return self.catalog.list_types(tenant, name)

    def delete_type(self, tenant: str, name: str, version: str) -> None:
        with self._lock:
            self.catalog.delete_type(tenant, name, version)

    # ---- assets ------------------------------------------------------------------------
    def create_asset(self, asset: Asset, initial_state: dict[str, float] | None) -> None:
        with self._lock:
            asset_type = self.catalog.create_asset(asset)
            try:
                if initial_state is not None and set(initial_state) != set(asset_type.states):
                    raise Unprocessable(f"initial_state must give exactly {sorted(asset_type.states)} "
                                        f"(got {sorted(initial_state)})")
                self.twins.register(asset, self._checked_artifact(asset, initial_state), initial_state=initial_state)
            except Exception:  # no asset without its twin
                self.catalog.delete_asset(asset.tenant, asset.id)
                raise

    def update_asset(self, asset: Asset) -> None:
        with self._lock:
            before = self.catalog.get_asset(asset.tenant, asset.id)
            self.catalog.update_asset(asset)
            try:  # metadata the twin would refuse is refused on update too
                artifact = self._checked_artifact(asset, None)
            except Unprocessable:
                self.catalog.update_asset(before)
                raise
            if (before.type_name, before.type_version) != (asset.type_name, asset.type_version):
                self.twins.unregister(asset.tenant, asset.id)
                self.twins.register(asset, artifact)

    def _checked_artifact(self, asset: Asset, initial_state: dict[str, float] | None) -> ModelArtifact:
        """The asset's model, once its twin's registration is known to fit it: a filter name, noise
        metadata or prior the model refuses is the client's to fix (422), found before anything changes."""
        from actors.recovery import RegistrationError, check_registration

        artifact = self._artifact(asset.tenant, asset)
        try:
            check_registration(asset, artifact, initial_state, None)
        except RegistrationError as exc:
            raise Unprocessable(str(exc)) from None
        return artifact

    def get_asset(self, tenant: str, asset_id: str) -> Asset:
        with self._lock:
            return self.catalog.get_asset(tenant, asset_id)

    def list_assets(self, tenant: str, type_name: str | None, type_version: str | None, related_to: str | None,
                    relationship: RelationshipKind | None) -> list[Asset]:
        with self._lock:
            return self.catalog.list_assets(tenant, type_name, type_version, related_to, relationship)

    def delete_asset(self, tenant: str, asset_id: str) -> None:
        with self._lock:
            self.catalog.delete_asset(tenant, asset_id)
            self.twins.unregister(tenant, asset_id)

    def model_of(self, tenant: str, asset_id: str) -> tuple[AssetType, ModelArtifact]:
        """The asset's type and registered model (for validating telemetry and running scenarios)."""
        asset = self.get_asset(tenant, asset_id)
        with self._lock:
            asset_type = self.catalog.get_type(tenant, asset.type_name, asset.type_version)
        return asset_type, self._artifact(tenant, asset)

    # ---- twins ---------------------------------------------------------------------------
    def ingest(self, tenant: str, events: list[TelemetryEvent]) -> dict[str, Any]:
        return self.twins.ingest(tenant, events).model_dump(mode="json")

    def flush(self) -> None:
        self.twins.flush()

    def live_twins(self) -> int:
        with self._lock:
            tenants = list(self.catalog.assets)
        return sum(len(self.twins.assets(t)) for t in tenants)

    # ---- connectors and commands (serve_apps/connector_ops.py) ----------------------------
    def connector(self, op: str, *args: Any) -> Any:
        if op not in ConnectorOps.OPS:
            raise ValueError(f"unknown connector operation {op!r}")
        return getattr(self.connector_ops, op)(*args)

    # ---- jobs (async: they run on the replica's event loop, which owns the queue) ---------
    async def submit_job(self, tenant: str, key_id: str, asset_id: str, model_ref: str, content_hash: str,
                         work: Work) -> Job:
        return self.jobs.submit(tenant, key_id, asset_id, model_ref, content_hash, work)

    async def get_job(self, tenant: str, job_id: str) -> Job:
        return self.jobs.get(tenant, job_id)

    async def job_stats(self) -> dict[str, Any]:
        return self.jobs.stats()


BackendDeployment = serve.deployment(Backend, name="Backend", num_replicas=1, max_ongoing_requests=64,
                                     ray_actor_options=cpu_only({"num_cpus": 0}))

