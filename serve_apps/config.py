"""Service configuration: one pydantic model, filled from Serve config args, then the environment.

`build_app(args)` receives a plain dict (from `serve run`, a Serve config file or a KubeRay
RayService ``serveConfigV2``); unset fields fall back to ``RAYTWIN_SERVE_<FIELD>`` environment
variables and then to the defaults below. Secrets never live here: API keys are read from the
keys file named by ``keys_file`` (or ``RAYTWIN_API_KEYS_FILE``).
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.routing import shard_prefix
from raytwin import metrics
from raytwin.contracts import IDENTIFIER_PATTERN, MAX_RUN_WORK
from serve_apps.admission import Admission
from serve_apps.deprecation import Deprecation

ENV_PREFIX = "RAYTWIN_SERVE_"


class Autoscaling(BaseModel):
    """Serve autoscaling of the HTTP ingress (see README for why these defaults)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Serve's autoscaling target per replica; unset: the Ingress admission's "
        "`max_concurrent`, so a replica is added when requests queue in one (serve_apps/README.md).")
    max_ongoing_requests: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store_url: str = Field(description="Where the catalog, twins, registry, jobs and audit live (dir or fsspec URL).")
    keys_file: str = Field(description="API keys file (JSON list of {key_id, sha256, tenant, role}).")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    rate_per_s: float = Field(50.0, gt=0, description="Sustained requests/s per API key, per ingress replica.")
    rate_burst: int = Field(100, ge=1, description="Token-bucket depth per API key, per ingress replica.")
    max_events_per_batch: int = Field(10_000, ge=1)
    max_command_value_bytes: int = Field(65_536, ge=64, description="A command's value as compact UTF-8 JSON "
                                         "(what is audited, stored and sent to the asset); more is 413, before "
                                         "anything is audited.")
    sync_max_steps: int = Field(50_000, ge=1, description="Scenario work (scenarios x steps) answered inline.")
    max_sweep_scenarios: int = Field(10_000, ge=1)
    max_run_work: int = Field(MAX_RUN_WORK, ge=1, description="Scenario-steps one sweep or scenario may ask for "
                              "(scenarios x steps: ~10 min of a 2-core node's sweep throughput); more is 413.")
    max_concurrent_jobs: int = Field(2, ge=1, description="Jobs (scenario, sweep, bulk) running at once; the rest "
                                     "wait, tenants taking turns (serve_apps/job_scheduling.py).")
    max_running_jobs_per_tenant: int | None = Field(
        None, ge=1, description="Jobs of one tenant running at once, at most `max_concurrent_jobs`; unset: "
        "`max_concurrent_jobs` - 1 (at least 1), so one tenant cannot hold every slot while another's job waits. "
        "A service with one tenant may set it to `max_concurrent_jobs`.")
    twin_shards: int = Field(2, ge=1)
    store_lease_wait_s: float = Field(600.0, ge=0, description="How long the backend, starting, waits for a "
                                      "service of another Ray cluster to stop renewing the store's lease (a "
                                      "replaced RayService whose pods are still terminating), logging "
                                      "`event=store_lease_wait`, before it is refused (StoreLeased).")
    state_cache_s: float = Field(0.1, ge=0, le=10, description="Current-state reads may be this old (seconds, "
                                 "per ingress replica; writes through a replica refresh it there); 0: no cache.")
    state_cache_entries: int = Field(10_000, ge=1, description="Twins whose latest state a replica keeps.")
    shard_read_timeout_s: float = Field(5.0, gt=0, description="A twin read its shard leaves unanswered this long "
                                        "(a hung or stalled process) is answered from the store, marked stale, and "
                                        "the shard's twins are read so and their telemetry refused (503) until it "
                                        "answers (serve_apps/shard_deadline.py).")
    readiness_timeout_s: float = Field(0.5, gt=0, le=5, description="`/v1/health/ready` answers `unavailable` "
                                       "when no twin shard answers within this (seconds): short, so a probe is "
                                       "answered within Kubernetes' default 1 s probe timeout while shards hang. "
                                       "Shards answer the probe beside their calls: a backlog does not delay it.")
    readiness_stuck_s: float = Field(120.0, gt=0, description="A twin shard whose current call has run longer "
                                     "than this (seconds: a store read that never returns, a deadlock) counts as "
                                     "not answering for `/v1/health/ready` (logged `event=shard_stuck`); a shard "
                                     "busy with many short calls still answers. At least `shard_create_timeout_s`, "
                                     "the longest call the API waits for (a model's kernels compiling); unset, "
                                     "twice that where it is over 120 s.")
    shard_write_timeout_s: float = Field(15.0, gt=0, description="Telemetry (or a drift clear, an asset deletion) "
                                         "its twin's shard has not applied this long is answered 503 "
                                         "`twin_unavailable` (resend telemetry: events are idempotent); the shard's "
                                         "breaker opens as for reads.")
    shard_create_timeout_s: float = Field(60.0, gt=0, description="The same for an asset's creation or change, "
                                          "whose twin may compile its model's kernels first (seconds on a busy node).")
    change_memory: int = Field(1000, ge=1, description="Newest changes per tenant the backend keeps in memory "
                               "for live streams; a stream further behind gets `fell_behind` and resumes from the "
                               "store.")
    change_poll_s: float = Field(0.1, gt=0, le=5, description="How often an ingress replica with open change "
                                 "streams asks the backend for new changes (one call per replica, all streams).")
    change_retention_s: float | None = Field(
        30 * 86_400, ge=3600, description="History the change log keeps (at least; deleted in directories of "
        "10,000 changes). A stream cannot resume from before it (410). None: keep everything.")
    job_retention_s: float | None = Field(
        30 * 86_400, ge=3600, description="How long a finished job (succeeded, failed, cancelled) is kept after it "
        "finished: its record, and a scenario or bulk job's result files beside it, are then removed from the "
        "backend's memory and the store (`serve_apps.jobs.JobQueue.expire`, logged `event=job_retention`); "
        "`GET /v1/jobs/{job_id}` answers 404 then. A sweep's outputs are its run record's, kept by the lifecycle "
        "policy's `keep_runs`. The change log's 30 days by default: a job's `job.*` change outlives its record "
        "no longer than that. None: keep every job (the backend's memory and start time grow with them).")
    change_page: int = Field(500, ge=1, le=10_000, description="Changes a stream reads per call (its buffer).")
    namespace: str = "raytwin"
    api_deprecation: Deprecation | None = Field(None, description="Marks this API version (/v1) deprecated: every "
                                                "response carries Deprecation and Sunset headers (serve_apps.deprecation)")
    connectors: list[dict[str, Any]] = Field(
        default_factory=list, description="Connector declarations started with the service (see connectors/README.md); "
        "credentials come from the backend's environment via `credentials_env`, never from here.")
    connector_tls_dir: str | None = Field(
        None, description="Directory of the TLS files of connectors created through the API, on every node that "
        "runs connectors (e.g. a mounted Secret): a tenant names files of `{dir}/{tenant}/`, never another path "
        "(None: such connectors cannot use TLS files). Declared connectors (`connectors`) name any path.")
    connector_hosts: list[str] | None = Field(
        None, description="Hosts that connectors created through the API may connect to: names, addresses or "
        "networks (`broker.plant.example`, `10.20.0.0/16`, `127.0.0.1:1883` for a broker on the node); a listed name "
        "is reachable whatever it resolves to, a listed network admits its addresses. None: any host but the Ray "
        "cluster's own machines and link-local ones: loopback (127.0.0.0/8, ::1, `localhost`), unspecified "
        "(0.0.0.0/8, ::), the Ray nodes' addresses (any address of the machine that checks, the alive nodes' "
        "addresses Ray knows: Ray's GCS, dashboard and metrics ports and other tenants' services listen there), "
        "link-local (169.254.0.0/16, fe80::/10: cloud metadata services) and private networks (10.0.0.0/8, "
        "172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7: the site's own machines), also inside IPv6 "
        "(`::ffff:127.0.0.1`). "
        "A tenant's connector is a TCP client inside your network: list the brokers and servers it may reach. "
        "Names are checked again at every connection, on the address connected to. Declared connectors "
        "(`connectors`) reach any host. An entry may name the one port it opens: `broker.plant.example:8883`, "
        "`127.0.0.1:1883`, `10.20.0.0/16:1883`, `[::1]:1883`; without one it opens every port of the host (for "
        "a broker on a node: Ray's GCS, dashboard and raylet ports too), so give the port.")

    model_packages: dict[str, list[str]] = Field(
        default_factory=dict, description="Top-level Python packages whose modules tenants may name as an asset "
        "type's simulator import path (`package.module:MODEL`), by tenant (`\"*\"`: every tenant), e.g. "
        "`{\"*\": [\"plant_models\"], \"globex\": [\"globex_models\"]}`. The server imports the module where it "
        "validates the request, running its module-level code: a package not listed is refused (422) before "
        "anything is imported. The packages of the declared models (entry-point group `raytwin.models`, RayTwin's "
        "reference models included) are every tenant's without being listed, and declared models are named by name.")

    @field_validator("model_packages")
    @classmethod
    def _package_entries(cls, packages: dict[str, list[str]]) -> dict[str, list[str]]:
        """Names that are no tenant or no top-level package fail when the service starts, not at a request."""
        for tenant, names in packages.items():
            if tenant != "*" and not re.match(IDENTIFIER_PATTERN, tenant):
                raise ValueError(f"model_packages: {tenant!r} is no tenant: use a tenant's name, or \"*\" for all")
            wrong = [name for name in names if not name.isidentifier()]
            if wrong:
                raise ValueError(f"model_packages[{tenant!r}]: {wrong} are no top-level package names: list the "
                                 "package (`plant_models`), not a module or an import path (`plant_models.pump:PUMP`)")
        return packages

    @field_validator("connector_hosts")
    @classmethod
    def _host_entries(cls, hosts: list[str] | None) -> list[str] | None:
        """Entries that are no host, network or port fail when the service starts, not at a tenant's request."""
        from connectors.reach import parse_entry

        for entry in hosts or ():
            parse_entry(entry)
        return hosts
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    admission: Admission = Field(default_factory=Admission)

    @model_validator(mode="after")
    def _tenant_job_limit(self) -> ServeConfig:
        if self.max_running_jobs_per_tenant is None:
            self.max_running_jobs_per_tenant = max(1, self.max_concurrent_jobs - 1)
        elif self.max_running_jobs_per_tenant > self.max_concurrent_jobs:
            raise ValueError(f"max_running_jobs_per_tenant ({self.max_running_jobs_per_tenant}) must be at most "
                             f"max_concurrent_jobs ({self.max_concurrent_jobs}): a tenant cannot run more jobs than "
                             "the service runs; raise max_concurrent_jobs or lower it")
        return self

    @model_validator(mode="after")
    def _stuck_after_the_longest_wait(self) -> ServeConfig:
        if self.readiness_stuck_s < self.shard_create_timeout_s and "readiness_stuck_s" not in self.model_fields_set:
            self.readiness_stuck_s = 2 * self.shard_create_timeout_s  # the default follows a longer creation wait
        if self.readiness_stuck_s < self.shard_create_timeout_s:
            raise ValueError(f"readiness_stuck_s ({self.readiness_stuck_s:g}) must be at least shard_create_timeout_s "
                             f"({self.shard_create_timeout_s:g}): a shard compiling a model's kernels for an asset's "
                             "creation would read as stuck, and readiness fail, while the API still waits for it; "
                             "raise readiness_stuck_s")
        return self

    @model_validator(mode="after")
    def _scale_at_admission(self) -> ServeConfig:
        if self.autoscaling.target_ongoing_requests is None:
            target = float(self.admission.max_concurrent)
            self.autoscaling = self.autoscaling.model_copy(update={"target_ongoing_requests": target})
        if self.admission.max_streams is None:
            streams = max(1, self.autoscaling.max_ongoing_requests // 2)
            self.admission = self.admission.model_copy(update={"max_streams": streams})
        elif self.admission.max_streams >= self.autoscaling.max_ongoing_requests:
            raise ValueError(f"admission.max_streams ({self.admission.max_streams}) must be below "
                             f"autoscaling.max_ongoing_requests ({self.autoscaling.max_ongoing_requests}): open change "
                             "streams would take every request slot of a replica")
        return self

    def url(self, *parts: str) -> str:
        """A location under the store: ``url("registry", tenant)`` -> ``{store_url}/registry/{tenant}``."""
        return "/".join([self.store_url.rstrip("/"), *parts])

    def service_tags(self) -> dict[str, str]:
        """The tags that name this service in its metrics (`raytwin.metrics.SERVICE_TAGS`)."""
        return metrics.service(self.namespace, shard_prefix(self.url("twins")))

    @classmethod
    def from_args(cls, args: dict[str, Any] | None = None) -> ServeConfig:
        """Explicit args win over ``RAYTWIN_SERVE_*`` environment variables, which win over defaults."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = os.environ.get(ENV_PREFIX + name.upper())
            if env is not None and name not in ("autoscaling", "admission", "storage_options", "connectors",
                                                "api_deprecation", "model_packages"):
                values[name] = env
        if "keys_file" not in values and os.environ.get("RAYTWIN_API_KEYS_FILE"):
            values["keys_file"] = os.environ["RAYTWIN_API_KEYS_FILE"]
        values.update(args or {})
        return cls.model_validate(values)
