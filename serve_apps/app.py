"""The Serve application: `build_app(args)` -> HTTP ingress (autoscaled) + one stateful backend.

Used by ``raytwin serve``, by ``serve run serve_apps.app:build_app store_url=... keys_file=...``
and by the KubeRay RayService manifest (``import_path: serve_apps.app:build_app`` with ``args``).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from raytwin import metrics
from raytwin.logs import component_logging
from raytwin.sim.cpu import cpu_only
from raytwin.sim.discovery import restrict_fmu_sources
from raytwin.storage import filesystem
from raytwin.store_failures import OPERATIONS, zero_counts
from serve_apps.api import create_api
from serve_apps.audit import AuditLog
from serve_apps.auth import KeyStore
from serve_apps.backend import BackendDeployment
from serve_apps.change_stream import HeadWatcher
from serve_apps.changes import ChangeStore
from serve_apps.config import ServeConfig
from serve_apps.deps import BackendClient, Services
from serve_apps.limits import TokenBuckets
from serve_apps.twin_reads import TwinReader


@serve.ingress()
class Ingress:
    """Stateless HTTP front: auth, validation, limits, metrics; state lives in the backend."""

    def __init__(self, config: ServeConfig, backend: DeploymentHandle):
        component_logging()
        # requests are parsed here (the Backend gets parsed objects): a request must not make the server
        # fetch any URL. Process-wide, so only in this replica's own process, never in-process users.
        restrict_fmu_sources([config.url("registry")])
        metrics.zero_dead_letters("api")  # a burst of refusals shows in the dead-letter ratio from its first count
        for operation in OPERATIONS:  # and a store outage's first failed requests in the store alert's rate
            zero_counts(operation)
        # and the first inline scenario and stale reads (a shard restart) on their panels (`Metric.zero`)
        metrics.SCENARIO_STEPS.zero({"kind": "scenario"})
        metrics.STALE_READS.zero({"read": "state"}, {"read": "query"})
        metrics.CREDENTIALS_REFUSED.zero(*({"reason": r} for r in metrics.CREDENTIAL_REFUSAL_REASONS))
        client = BackendClient(backend)
        self.services = Services(
            config=config, keys=KeyStore(config.keys_file), backend=client,
            audit=AuditLog(config.store_url, config.storage_options),
            buckets=TokenBuckets(config.rate_per_s, config.rate_burst),
            fs=filesystem(config.store_url, config.storage_options)[0], twins=TwinReader(config),
            changes=HeadWatcher(client, config.change_poll_s),
            change_store=ChangeStore(config.url("changes"), config.storage_options),
        )

    def __serve_build_asgi_app__(self):
        config = self.services.config
        app = create_api(config.max_body_bytes, config.admission, behind_serve=True)
        app.state.services = self.services
        return app


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application for `args` (see `ServeConfig`; env ``RAYTWIN_SERVE_*`` fills the gaps)."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.from_args(args)
    scaling = config.autoscaling
    ingress = serve.deployment(
        Ingress, name="Ingress",
        max_ongoing_requests=scaling.max_ongoing_requests,
        max_queued_requests=config.admission.proxy_max_queued,  # beyond: the proxy answers 503 + Retry-After
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.admission.retry_after_s),
        autoscaling_config={
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": 10.0, "downscale_delay_s": 120.0,
        },
        ray_actor_options=cpu_only({"num_cpus": 0.5}),
    )
    return ingress.bind(config, BackendDeployment.bind(config))
