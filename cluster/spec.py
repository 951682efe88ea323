"""The typed description of a RayTwin cluster on Kubernetes, from which every KubeRay manifest is rendered.

Validation happens here, before any manifest exists, so a bad spec (min > max replicas, a GPU group without
its CUDA image, a negative CPU count) is refused with a message that names the offending field.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(\.[0-9]+)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_MULTIPLIERS = {
    None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def quantity_value(quantity: str) -> float:
    """The numeric value of a Kubernetes resource quantity ("4Gi" -> 4294967296.0)."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity such as '512Mi', '4Gi' or '2'")
    return float(match["number"]) * _MULTIPLIERS[match["suffix"]]


def _positive_quantity(quantity: str) -> str:
    if not quantity_value(quantity) > 0:
        raise ValueError(f"{quantity!r} must be a positive quantity")
    return quantity


Quantity = Annotated[str, AfterValidator(_positive_quantity)]
Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LabelKey = Annotated[str, Field(pattern=rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")]
LabelValue = Annotated[str, Field(pattern=rf"^({_LABEL_NAME})?$")]
"""A Kubernetes label's key (optional DNS prefix, then a name) and value, as the API server checks them."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeadSpec(_Strict):
    """The head pod: GCS, dashboard, job submission and the autoscaler live here."""

    cpu: float = Field(default=2, gt=0, description="CPU cores requested and limited for the head pod.")
    memory: Quantity = Field(default="8Gi", description="Memory of the head pod, as a Kubernetes quantity.")
    schedule_tasks: bool = Field(
        default=False,
        description="Let Ray run tasks on the head; off by default so work goes to the worker groups.",
    )


class WorkerGroupSpec(_Strict):
    """One KubeRay worker group; the Ray autoscaler keeps its size within [min_replicas, max_replicas]."""

    name: Name
    cpu: float = Field(gt=0, description="CPU cores per worker pod.")
    memory: Quantity = Field(description="Memory per worker pod, as a Kubernetes quantity.")
    gpus: int = Field(default=0, ge=0, description="nvidia.com/gpu per worker pod; > 0 makes this a GPU group.")
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(ge=0)
    replicas: int | None = Field(default=None, ge=0, description="Initial size; defaults to min_replicas.")
    image: str | None = Field(default=None, description="Overrides the cluster image; required for GPU groups.")
    node_selector: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_bounds_and_image(self) -> WorkerGroupSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"worker group {self.name!r}: min_replicas ({self.min_replicas}) is greater than "
                f"max_replicas ({self.max_replicas})"
            )
        if self.replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"worker group {self.name!r}: replicas ({self.replicas}) must lie within "
                f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]"
            )
        if self.gpus > 0 and not self.image:
            raise ValueError(
                f"worker group {self.name!r} requests {self.gpus} GPU(s) but sets no image: a GPU group needs "
                "its own CUDA-enabled image (e.g. rayproject/ray:2.x-py311-gpu with RayTwin installed)"
            )
        return self

    @property
    def initial_replicas(self) -> int:
        return self.min_replicas if self.replicas is None else self.replicas


class AutoscalingSpec(_Strict):
    """Ray autoscaler (KubeRay in-tree autoscaling) settings."""

    enabled: bool = True
    idle_timeout_seconds: int = Field(default=60, ge=0, description="Idle time before a worker is removed.")
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = "Default"


class ServeSpec(_Strict):
    """The Serve application a RayService runs (`serveConfigV2`)."""

    app_name: Name = "raytwin"
    import_path: str = Field(
        default="serve_apps.app:build_app",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="module:builder of the Serve application.",
    )
    route_prefix: str = Field(default="/", pattern=r"^/")
    args: dict[str, Any] = Field(default_factory=dict, description="Arguments passed to the application builder.")
    ingress: Literal["proxy", "haproxy"] = Field(
        default="proxy", description="What answers on the Serve port: Serve's Python proxy, or HAProxy forwarding "
        "to the Ingress replicas' own servers (Serve's HAProxy mode, ~10x the requests per core: serve_apps/README.md).")


TOKEN_AUTH_MIN_RAY = (2, 52, 0)
"""The first Ray release with token authentication (`RAY_AUTH_MODE=token`)."""


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR such as '10.0.0.0/8' or '203.0.113.7/32'") from None
    return value


Cidr = Annotated[str, AfterValidator(_cidr)]


class SecuritySpec(_Strict):
    """Who may talk to Ray and what its processes may do: every pod carries the store's credentials, so the
    cluster's control plane (dashboard, job API, Ray client) must not be open to whoever reaches the pods."""

    auth: Literal["token", "disabled"] = Field(
        default="token", description="Ray token authentication (KubeRay `authOptions`); `disabled` only for a "
        "throw-away cluster on a private network.")
    auth_secret: Name | None = Field(
        default=None, description="Secret holding the Ray token under the key `auth_token` (default: "
        "`<name>-ray-token`); create it before applying: `kubectl create secret generic NAME "
        "--from-literal=auth_token=$(openssl rand -base64 32)`.")
    run_as_user: int = Field(default=1000, ge=1, description="UID of every Ray container (the Ray images' `ray` user).")
    run_as_group: int = Field(default=100, ge=0, description="GID and fsGroup (the Ray images' `users` group), so "
                              "mounted Secrets are readable by the Ray user.")
    read_only_root_filesystem: bool = Field(
        default=True, description="Read-only image file system; Ray writes under /tmp, an emptyDir in every pod.")


class Peers(_Strict):
    """Who may open a connection: pods of these namespaces and clients of these CIDRs (NetworkPolicy peers)."""

    namespaces: list[Name] = Field(default_factory=list)
    cidrs: list[Cidr] = Field(default_factory=list)


class NetworkPolicySpec(_Strict):
    """The NetworkPolicy rendered beside the KubeRay resource: only the Serve API port is meant for clients."""

    enabled: bool = True
    api_from: Peers | None = Field(
        default=None, description="Who may reach the Serve API port (8000); unset: anyone who reaches the pods.")
    operator_from: Peers = Field(
        default_factory=Peers, description="Who may reach the dashboard/job API (8265) and the Ray client port "
        "(10001); the KubeRay operator and the cluster's own job submitters reach 8265 without it; empty: nobody "
        "else.")
    kuberay_namespace: Name = Field(
        default="default", description="Namespace of the KubeRay operator (its Helm release's), which calls the "
        "dashboard (8265) and the head's Serve proxy (8000).")
    kuberay_pod_labels: dict[LabelKey, LabelValue] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "kuberay-operator"}, min_length=1,
        description="Labels of the KubeRay operator's pods: the Helm chart's default; with the chart's "
        "`nameOverride` it is `app.kubernetes.io/name: <nameOverride>`.")
    prometheus_namespace: Name | None = Field(
        default="monitoring", description="Namespace whose pods may scrape Ray's metrics port (8080); null: none.")


class RayJobSettings(_Strict):
    """Limits of a RayJob rendered from the spec."""

    active_deadline_seconds: int = Field(
        default=86400, gt=0, le=2**31 - 1, description="KubeRay stops the job and its cluster after this long "
        "(a hung sweep otherwise keeps its pods for ever).")


class ClusterSpec(_Strict):
    """A RayTwin cluster: image, head, worker groups, environment, storage and Serve config."""

    name: Name
    namespace: Name = "default"
    image: str = Field(min_length=1, description="Container image with Ray and RayTwin installed.")
    ray_version: str = Field(pattern=r"^\d+\.\d+\.\d+", description="Ray version inside the image.")
    head: HeadSpec = Field(default_factory=HeadSpec)
    worker_groups: list[WorkerGroupSpec] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="Environment of every Ray container and job.")
    env_from_secrets: list[Name] = Field(
        default_factory=list,
        description="Kubernetes Secrets whose keys become environment variables of every Ray container "
                    "(`envFrom`), e.g. RAYTWIN_SECRETS_KEY or S3 credentials: secrets stay out of the spec.",
    )
    keys_secret: Name | None = Field(
        default=None,
        description="Kubernetes Secret holding the API keys file under the key `keys.json` (`kubectl create secret "
                    "generic raytwin-keys --from-file=keys.json`): mounted read-only in every Ray container, the "
                    "RayService's API reads its keys there (an updated Secret is picked up without a restart).",
    )
    pip: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Extra packages (pip requirements, e.g. user model packages) installed for RayJobs and the "
                    "RayService app through their runtime env; bake them into `image` to skip the install.",
    )
    py_modules: list[Annotated[str, Field(pattern=r"^(s3|gs|https?)://\S+\.(zip|whl)$")]] = Field(
        default_factory=list,
        description="Remote .zip/.whl URIs of model code for RayJobs and the RayService app (runtime env).",
    )
    object_store_memory: Quantity | None = Field(
        default=None, description="Plasma object store size per node; must fit in every pod's memory."
    )
    storage_url: str | None = Field(
        default=None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="s3:// URL of the state store and model registry (exported as RAYTWIN_STORAGE_URL).",
    )
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    job: RayJobSettings = Field(default_factory=RayJobSettings)

    @model_validator(mode="after")
    def _check_groups_and_object_store(self) -> ClusterSpec:
        names = [group.name for group in self.worker_groups]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"worker group names must be unique; repeated: {', '.join(duplicates)}")
        if self.object_store_memory is not None:
            store = quantity_value(self.object_store_memory)
            pods = [("head", self.head.memory)] + [(f"worker group {g.name!r}", g.memory) for g in self.worker_groups]
            for where, memory in pods:
                if store >= quantity_value(memory):
                    raise ValueError(
                        f"object_store_memory ({self.object_store_memory}) must be smaller than the memory "
                        f"of the {where} ({memory})"
                    )
        version = tuple(int(part) for part in re.findall(r"\d+", self.ray_version)[:3])
        if self.security.auth == "token" and version < TOKEN_AUTH_MIN_RAY:
            raise ValueError(f"security.auth: token needs Ray 2.52.0 or newer, the image has {self.ray_version}: "
                             "upgrade the image, or set security.auth: disabled on a private network only")
        return self

    @property
    def auth_secret(self) -> str:
        """The Secret holding the Ray token (`security.auth_secret`, default `<name>-ray-token`)."""
        return self.security.auth_secret or f"{self.name}-ray-token"

    @property
    def object_store_bytes(self) -> int | None:
        return None if self.object_store_memory is None else int(quantity_value(self.object_store_memory))


KEYS_DIR = "/etc/raytwin/keys"
KEYS_FILE = f"{KEYS_DIR}/keys.json"
"""Where `ClusterSpec.keys_secret` is mounted, and the keys file the RayService's API reads."""


class SpecError(ValueError):
    """A cluster spec that cannot be used, with one readable line per problem."""


def parse_spec(data: Any, source: str = "cluster spec") -> ClusterSpec:
    """Validate already-loaded spec data, turning pydantic's report into a `SpecError`; `serve.args` are
    checked as the Serve application will check them (a mistake there otherwise shows only on the
    cluster, as a deployment Serve retries for ever)."""
    try:
        spec = ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"invalid {source}:\n" + _lines(exc)) from None
    from serve_apps.config import ServeConfig  # the application's own settings class

    placeholders = {"store_url": spec.storage_url or "s3://bucket/store", "keys_file": KEYS_FILE}
    try:
        ServeConfig.model_validate(placeholders | spec.serve.args)
    except ValidationError as exc:
        raise SpecError(f"invalid {source}:\n" + _lines(exc, "serve.args.")) from None
    return spec


def _lines(exc: ValidationError, prefix: str = "") -> str:
    return "\n".join(f"  {prefix}{'.'.join(str(part) for part in error['loc']) or '(top level)'}: "
                     f"{error['msg'].removeprefix('Value error, ')}" for error in exc.errors())


def load_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster spec YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read cluster spec {path}: {exc}") from None
    return parse_spec(data, source=f"cluster spec {path}")
