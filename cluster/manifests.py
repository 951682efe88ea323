"""KubeRay manifests (RayCluster, RayService, RayJob) rendered from a `ClusterSpec`.

All three kinds share one Ray cluster description (`ray_cluster_spec`), so a sweep submitted as a RayJob
runs on exactly the pods a long-lived RayCluster would get.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from enum import Enum
from typing import Any

import yaml

from cluster.entrypoints import check_raytwin_entrypoint
from cluster.spec import DNS_LABEL, KEYS_DIR, KEYS_FILE, ClusterSpec, WorkerGroupSpec
from serve_apps.serve_env import environment_for_args, haproxy_environment

API_VERSION = "ray.io/v1"
GPU_RESOURCE = "nvidia.com/gpu"
STORAGE_ENV = "RAYTWIN_STORAGE_URL"
KEYS_VOLUME = "raytwin-api-keys"
TMP_VOLUME = "ray-tmp"
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000))
CLUSTER_LABEL = "raytwin.io/cluster"
"""On every Ray pod of a spec's RayCluster and RayService: what their NetworkPolicy selects."""
JOB_CLUSTER_LABEL = "raytwin.io/job-cluster"
"""On a spec's RayJob clusters' Ray pods instead: their own NetworkPolicy (no API port) selects them, and the
long-running cluster's, which opens the API, does not."""
CLIENT_LABEL = "raytwin.io/client-of"
"""On a RayJob's submitter pod: the NetworkPolicy lets it reach the dashboard's job API."""
WRITABLE_ENV = {"RAYTWIN_JAX_CACHE_DIR": "/tmp/raytwin/jax", "XDG_CACHE_HOME": "/tmp/cache"}
"""Caches moved from the read-only home directory to the /tmp emptyDir (`security.read_only_root_filesystem`)."""
RAY_UPGRADE_NONE = {"type": "None"}
"""A RayService's upgrade strategy: never a second cluster beside the serving one (see `render_rayservice`)."""
SUBMITTER_RESOURCES = {"cpu": "500m", "memory": "512Mi"}
PART_OF = {"app.kubernetes.io/part-of": "raytwin"}
"""The label of everything `cluster apply` creates: what `cluster delete` lists NetworkPolicies by."""


class Kind(str, Enum):
    """The KubeRay resource kinds RayTwin renders, valued by their lower-case CLI name."""

    RAYCLUSTER = "raycluster"
    RAYSERVICE = "rayservice"
    RAYJOB = "rayjob"

    @property
    def kind(self) -> str:
        return {"raycluster": "RayCluster", "rayservice": "RayService", "rayjob": "RayJob"}[self.value]

    @property
    def plural(self) -> str:
        return self.value + "s"


def _cpu(cores: float) -> str:
    return str(int(cores)) if float(cores).is_integer() else f"{round(cores * 1000)}m"


def _env(spec: ClusterSpec) -> dict[str, str]:
    env = dict(spec.env)
    if spec.storage_url:
        env[STORAGE_ENV] = spec.storage_url
    return env


def runtime_env(spec: ClusterSpec) -> dict[str, Any]:
    """The runtime env of the spec's jobs and Serve app: its env vars and its model code (`pip`, `py_modules`)."""
    fields = {"env_vars": _env(spec), "pip": list(spec.pip), "py_modules": list(spec.py_modules)}
    return {key: value for key, value in fields.items() if value}


def container_security(spec: ClusterSpec) -> dict[str, Any]:
    """The securityContext of every container RayTwin renders: the Ray user, no privilege, no capability."""
    return {
        "runAsNonRoot": True,
        "runAsUser": spec.security.run_as_user,
        "runAsGroup": spec.security.run_as_group,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": spec.security.read_only_root_filesystem,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security(spec: ClusterSpec) -> dict[str, Any]:
    """Pod-level: `fsGroup` makes mounted Secrets (the API keys file, mode 0400 otherwise root's) group-readable."""
    return {"runAsNonRoot": True, "runAsUser": spec.security.run_as_user, "runAsGroup": spec.security.run_as_group,
            "fsGroup": spec.security.run_as_group, "seccompProfile": {"type": "RuntimeDefault"}}


_TMP_MOUNT = {"name": TMP_VOLUME, "mountPath": "/tmp"}  # Ray's session dir, logs, runtime envs


def _tmp_volume() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "emptyDir": {}}


def _hardened(name: str, image: str, spec: ClusterSpec, amounts: dict[str, Any]) -> dict[str, Any]:
    """A container with requests = limits = `amounts`, the spec's securityContext and the /tmp emptyDir."""
    return {"name": name, "image": image, "resources": {"requests": dict(amounts), "limits": dict(amounts)},
            "securityContext": container_security(spec), "volumeMounts": [dict(_TMP_MOUNT)]}


def _container(spec: ClusterSpec, name: str, image: str, cpu: float, memory: str, gpus: int = 0, *,
               api_keys: bool = True) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": _cpu(cpu), "memory": memory}
    if gpus:
        amounts[GPU_RESOURCE] = gpus
    container = _hardened(name, image, spec, amounts)
    # Serve reads its switches when its processes start, so they go in every Ray container's environment
    # (a runtime env reaches replicas, never the proxies); the spec's own `env` wins
    writable = WRITABLE_ENV if spec.security.read_only_root_filesystem else {}
    env = writable | environment_for_args(spec.serve.args) | _ingress_env(spec) | _env(spec)
    if spec.keys_secret and api_keys:
        env = {"RAYTWIN_API_KEYS_FILE": KEYS_FILE} | env
        container["volumeMounts"].append({"name": KEYS_VOLUME, "mountPath": KEYS_DIR, "readOnly": True})
    container["env"] = [{"name": key, "value": value} for key, value in sorted(env.items())]
    if spec.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": secret}} for secret in spec.env_from_secrets]
    return container


def _pod(spec: ClusterSpec, container: dict[str, Any], *, api_keys: bool = True) -> dict[str, Any]:
    """A pod template's spec around `container`: the Ray user, a /tmp emptyDir, and the keys Secret's volume
    where the spec names one and the pod serves the API (`api_keys`)."""
    pod: dict[str, Any] = {"securityContext": _pod_security(spec), "containers": [container],
                           "volumes": [_tmp_volume()]}
    if spec.keys_secret and api_keys:
        pod["volumes"].append({"name": KEYS_VOLUME, "secret": {"secretName": spec.keys_secret, "defaultMode": 0o400}})
    return pod


def pod_labels(spec: ClusterSpec, kind: Kind) -> dict[str, str]:
    """The label of `kind`'s Ray pods that its NetworkPolicy selects: a job cluster's differs from the long-running
    cluster's, so neither policy reaches the other's pods (policies add up: the API would be open on a job's)."""
    return {JOB_CLUSTER_LABEL if kind is Kind.RAYJOB else CLUSTER_LABEL: spec.name}


def _template(spec: ClusterSpec, kind: Kind, pod: dict[str, Any]) -> dict[str, Any]:
    """A pod template labelled with the spec's name, which `kind`'s NetworkPolicy selects."""
    return {"metadata": {"labels": pod_labels(spec, kind)}, "spec": pod}


def _ingress_env(spec: ClusterSpec) -> dict[str, str]:
    """Serve's HAProxy mode where the spec asks for it (`ServeSpec.ingress`;
    `serve_apps.serve_env.haproxy_environment`)."""
    return haproxy_environment() if spec.serve.ingress == "haproxy" else {}


def _start_params(spec: ClusterSpec, params: dict[str, str]) -> dict[str, str]:
    if spec.object_store_bytes is not None:
        return {**params, "object-store-memory": str(spec.object_store_bytes)}
    return params


def _worker_group(spec: ClusterSpec, group: WorkerGroupSpec, kind: Kind) -> dict[str, Any]:
    api_keys = kind is not Kind.RAYJOB
    params = {"num-gpus": str(group.gpus)} if group.gpus else {}
    container = _container(spec, "ray-worker", group.image or spec.image, group.cpu, group.memory, group.gpus,
                           api_keys=api_keys)
    pod = _pod(spec, container, api_keys=api_keys)
    if group.node_selector:
        pod["nodeSelector"] = dict(group.node_selector)
    if group.gpus:
        # GPU nodes are usually tainted so that only pods asking for GPUs land there.
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "groupName": group.name,
        "replicas": group.initial_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": _start_params(spec, params),
        "template": _template(spec, kind, pod),
    }


def auth_options(spec: ClusterSpec) -> dict[str, Any]:
    """KubeRay's `authOptions`: Ray token authentication with the token from the spec's Secret, which KubeRay
    puts in every Ray container as RAY_AUTH_TOKEN (with RAY_AUTH_MODE=token), as `raytwin serve` does locally.

    `secretName` needs KubeRay 1.6.0 (1.5.1 has `mode` only; the CRD validation refuses the field against
    older CRDs). With it KubeRay creates no Secret: the pods wait until one exists. Without it KubeRay would
    generate a token per RayCluster, and a RayService's or RayJob's RayCluster has a generated name, so
    clients could not know the Secret beforehand."""
    if spec.security.auth == "disabled":
        return {"mode": "disabled"}
    return {"mode": "token", "secretName": spec.auth_secret}


def ray_cluster_spec(spec: ClusterSpec, kind: Kind = Kind.RAYCLUSTER) -> dict[str, Any]:
    """The `RayCluster.spec` shared by all three kinds (as `RayService.spec.rayClusterConfig` and
    `RayJob.spec.rayClusterSpec` too); a RayJob's has no API keys Secret (a job's cluster serves no API) and its
    own pod label (`pod_labels`)."""
    api_keys = kind is not Kind.RAYJOB
    head_container = _container(spec, "ray-head", spec.image, spec.head.cpu, spec.head.memory, api_keys=api_keys)
    head_container["ports"] = [{"name": name, "containerPort": port} for name, port in HEAD_PORTS]
    head_params = {} if spec.head.schedule_tasks else {"num-cpus": "0"}
    cluster: dict[str, Any] = {
        "rayVersion": spec.ray_version,
        "authOptions": auth_options(spec),
        "enableInTreeAutoscaling": spec.autoscaling.enabled,
    }
    if spec.autoscaling.enabled:
        cluster["autoscalerOptions"] = {
            "idleTimeoutSeconds": spec.autoscaling.idle_timeout_seconds,
            "upscalingMode": spec.autoscaling.upscaling_mode,
            "securityContext": container_security(spec),  # the autoscaler sidecar KubeRay adds to the head pod
            "volumeMounts": [dict(_TMP_MOUNT)],
        }
    cluster["headGroupSpec"] = {
        "rayStartParams": _start_params(spec, head_params),
        "template": _template(spec, kind, _pod(spec, head_container, api_keys=api_keys)),
    }
    cluster["workerGroupSpecs"] = [_worker_group(spec, group, kind) for group in spec.worker_groups]
    return cluster


def _metadata(spec: ClusterSpec, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.namespace, "labels": dict(PART_OF)}


def render_raycluster(spec: ClusterSpec) -> dict[str, Any]:
    """A long-lived autoscaling RayCluster for interactive work and `raytwin job submit`."""
    return {"apiVersion": API_VERSION, "kind": "RayCluster", "metadata": _metadata(spec, spec.name),
            "spec": ray_cluster_spec(spec)}


def serve_config(spec: ClusterSpec) -> dict[str, Any]:
    """The Ray Serve config (`serveConfigV2`) for the RayTwin Serve application."""
    app: dict[str, Any] = {
        "name": spec.serve.app_name,
        "import_path": spec.serve.import_path,
        "route_prefix": spec.serve.route_prefix,
    }
    # the app's state store defaults to the cluster's storage URL
    args = ({"store_url": spec.storage_url} if spec.storage_url else {}) | spec.serve.args
    if args:
        app["args"] = args
    if env := runtime_env(spec):
        app["runtime_env"] = env
    return {"applications": [app]}


def render_rayservice(spec: ClusterSpec) -> dict[str, Any]:
    """A RayService running the `serve_apps` application on its own cluster; refused when the application would
    have no API keys file (it could not start).

    Its upgrade strategy is `None`: KubeRay's default (`NewCluster`) starts a second cluster on the same store
    and switches traffic once that cluster's application is healthy, but the serving cluster keeps renewing
    the store's single-writer lease (actors/lease.py), so the new Backend is refused (`StoreLeased`) for as
    long as the old one serves and the switch never comes. With `None` a change of the Serve config is applied
    in place (KubeRay's `reconcileServe` re-submits a `serveConfigV2` that differs from the one it cached for the
    cluster; the new replicas attach to the lease of their own cluster), while a change of the cluster (image,
    resources) is not applied at all (`shouldUpdateCluster` is false unless worker groups were only appended)
    and needs a delete-and-apply (cluster/README.md, "Upgrade and rollback")."""
    if not (spec.keys_secret or "keys_file" in spec.serve.args or "RAYTWIN_API_KEYS_FILE" in spec.env):
        raise ValueError("a RayService's API needs its keys file: set keys_secret to a Kubernetes Secret holding "
                         "keys.json (`kubectl create secret generic raytwin-keys --from-file=keys.json`), or "
                         "serve.args.keys_file to a path mounted some other way")
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "upgradeStrategy": dict(RAY_UPGRADE_NONE),
            "serveConfigV2": yaml.safe_dump(serve_config(spec), sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(spec, Kind.RAYSERVICE),
        },
    }


def submitter_pod_template(spec: ClusterSpec) -> dict[str, Any]:
    """The RayJob's submitter pod (`ray job submit` against the head), written out rather than KubeRay's default
    so that it carries none of the cluster's Secrets (store credentials, API keys): only the Ray token it
    submits with.

    Its one container has no `command`/`args` on purpose: KubeRay's RayJob controller (K8sJobMode,
    `getSubmitterTemplate` -> `configureSubmitterContainer`) takes the first container of a user's template,
    whatever its name, and only when its `command` is empty writes the `ray job submit` script
    (`common.BuildJobSubmitCommand`: waits for the dashboard, `--address http://<Status.DashboardURL>`, the
    runtime env, submission id); it always appends RAY_DASHBOARD_ADDRESS and RAY_JOB_SUBMISSION_ID. With token
    auth it adds RAY_AUTH_MODE and RAY_AUTH_TOKEN from `authOptions.secretName` (`SetContainerTokenAuthEnvVars`)
    unless the container already has them: ours are the same, written out so the pod's token does not hang on
    that injection."""
    container = _hardened("ray-job-submitter", spec.image, spec, SUBMITTER_RESOURCES)
    if spec.security.auth == "token":
        container["env"] = [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": spec.auth_secret, "key": "auth_token"}}},
        ]
    pod = {"restartPolicy": "Never", "securityContext": _pod_security(spec), "containers": [container],
           "volumes": [_tmp_volume()]}
    return {"metadata": {"labels": {CLIENT_LABEL: spec.name}}, "spec": pod}


def render_rayjob(
    spec: ClusterSpec, entrypoint: Sequence[str], name: str | None = None, ttl_seconds_after_finished: int = 600
) -> dict[str, Any]:
    """A RayJob that creates a cluster, runs `entrypoint` (e.g. `raytwin sweep run ...`) on it, then tears it down.

    An entrypoint that calls `raytwin` must parse as a `raytwin` command (`check_raytwin_entrypoint`): a typo
    would otherwise surface only after a whole cluster was started for it."""
    if not entrypoint:
        raise ValueError("a RayJob needs an entrypoint, e.g. `raytwin sweep run ...` or `raytwin calibrate run ...`")
    check_raytwin_entrypoint(entrypoint)
    name = name or f"{spec.name}-job"
    if not re.fullmatch(DNS_LABEL, name):
        raise ValueError(f"RayJob name {name!r} must be a DNS label: lower-case letters, digits and '-', at most 63")
    job: dict[str, Any] = {
        "entrypoint": shlex.join(entrypoint),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": ttl_seconds_after_finished,
        "activeDeadlineSeconds": spec.job.active_deadline_seconds,
        "rayClusterSpec": ray_cluster_spec(spec, Kind.RAYJOB),
        "submitterPodTemplate": submitter_pod_template(spec),
    }
    if env := runtime_env(spec):
        job["runtimeEnvYAML"] = yaml.safe_dump(env, sort_keys=False)
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": _metadata(spec, name),
            "spec": job}


def render(
    spec: ClusterSpec, kind: Kind, entrypoint: Sequence[str] = (), job_name: str | None = None
) -> dict[str, Any]:
    """Render one manifest of `kind`; `entrypoint` and `job_name` apply to RayJobs only."""
    if kind is Kind.RAYJOB:
        return render_rayjob(spec, entrypoint, job_name)
    if entrypoint:
        raise ValueError(f"an entrypoint only applies to a rayjob, not a {kind.value}")
    return render_raycluster(spec) if kind is Kind.RAYCLUSTER else render_rayservice(spec)


def to_yaml(manifest: dict[str, Any]) -> str:
    """YAML text of a manifest, keys in rendering order so diffs stay readable."""
    return yaml.safe_dump(manifest, sort_keys=False)
