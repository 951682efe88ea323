"""Cluster spec validation, KubeRay manifest rendering and validation against the real CRD schemas."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import cluster_app
from cluster.crd_validation import CrdSchemas, ManifestInvalid, apply_defaults, kubernetes_to_json_schema
from cluster.manifests import Kind, render, render_raycluster, render_rayjob, render_rayservice
from cluster.network_policy import render_network_policy, validate_network_policy
from cluster.spec import SpecError, load_spec, parse_spec
from tests.fixtures_cluster import CRD_DIR, REPO_ROOT, spec_data, worker

EXAMPLES = REPO_ROOT / "cluster" / "examples"
SWEEP_JOB = ["raytwin", "sweep", "run", "/data/spec.json", "--runs", "s3://bucket/runs", "--no-progress"]

VALID_SPECS = {
    "cpu-only": spec_data(),
    "gpu-group": spec_data(
        worker_groups=[worker(), worker(name="gpu", gpus=2, image="ghcr.io/example/raytwin:0.1.0-cuda12")],
        object_store_memory="1Gi",
        storage_url="s3://raytwin-state/dev",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        env_from_secrets=["raytwin-secrets"],
    ),
    "autoscaling-bounds": spec_data(
        worker_groups=[worker(min_replicas=2, max_replicas=8, replicas=3), worker(name="burst", max_replicas=20)],
        autoscaling={"idle_timeout_seconds": 300, "upscaling_mode": "Conservative"},
    ),
    "fixed-size": spec_data(worker_groups=[worker(min_replicas=2, max_replicas=2)], autoscaling={"enabled": False}),
    "model-code": spec_data(pip=["pump-models==1.2.0"], py_modules=["s3://models/pumpkit-1.0.zip"]),
    "haproxy": spec_data(serve={"ingress": "haproxy"}),
}
MODEL_CODE = {"pip": ["pump-models==1.2.0"], "py_modules": ["s3://models/pumpkit-1.0.zip"]}


@pytest.fixture(scope="module")
def crds() -> CrdSchemas:
    return CrdSchemas.from_dir(CRD_DIR)


def _workers(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {group["groupName"]: group for group in manifest["spec"]["workerGroupSpecs"]}


def _container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", VALID_SPECS)
@pytest.mark.parametrize("kind", list(Kind))
def test_rendered_manifests_validate_against_crds(crds: CrdSchemas, name: str, kind: Kind) -> None:
    manifest = render(parse_spec(VALID_SPECS[name]), kind, SWEEP_JOB if kind is Kind.RAYJOB else ())
    crds.validate(manifest)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind.kind)
    assert manifest["metadata"]["namespace"] == "sim"


def test_cpu_only_cluster_requests_no_gpus() -> None:
    manifest = render_raycluster(parse_spec(VALID_SPECS["cpu-only"]))
    assert "nvidia.com/gpu" not in yaml.safe_dump(manifest)
    assert manifest["spec"]["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    cpu = _container(_workers(manifest)["cpu"])
    assert cpu["resources"]["limits"] == cpu["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}


def test_gpu_group_gets_gpu_limits_start_params_image_and_toleration() -> None:
    manifest = render_raycluster(parse_spec(VALID_SPECS["gpu-group"]))
    gpu, cpu = _workers(manifest)["gpu"], _workers(manifest)["cpu"]
    assert _container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert _container(gpu)["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert gpu["rayStartParams"] == {"num-gpus": "2", "object-store-memory": str(2**30)}
    assert _container(gpu)["image"].endswith("-cuda12") and not _container(cpu)["image"].endswith("-cuda12")
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "num-gpus" not in cpu["rayStartParams"] and "tolerations" not in cpu["template"]["spec"]
    env = {item["name"]: item["value"] for item in _container(gpu)["env"]}
    assert env["RAYTWIN_STORAGE_URL"] == "s3://raytwin-state/dev" and env["XLA_FLAGS"].startswith("--xla")
    head = manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, _container(gpu), _container(cpu)):  # secrets by reference, never by value
        assert container["envFrom"] == [{"secretRef": {"name": "raytwin-secrets"}}]
    assert "envFrom" not in _container(_workers(render_raycluster(parse_spec(VALID_SPECS["cpu-only"])))["cpu"])


def test_haproxy_ingress_switches_serve_to_haproxy_in_every_ray_container() -> None:
    manifest = render_raycluster(parse_spec(VALID_SPECS["haproxy"]))
    head = manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, _container(_workers(manifest)["cpu"])):  # Serve reads it where each process starts
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in container["env"]
        # the app on each replica's own loop, where the replicas answer HTTP (serve_env.replica_server_environment)
        assert {"name": "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "value": "0"} in container["env"]
    default = yaml.safe_dump(render_raycluster(parse_spec(VALID_SPECS["cpu-only"])))
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in default  # Serve's Python proxy unless asked
    assert "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in default  # and Serve's threads there
    off = spec_data(serve={"ingress": "haproxy"}, env={"RAY_SERVE_ENABLE_HA_PROXY": "0"})  # the spec's env wins
    assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "0"} in _container(_workers(
        render_raycluster(parse_spec(off)))["cpu"])["env"]


def test_autoscaling_bounds_and_options_reach_the_raycluster() -> None:
    manifest = render_raycluster(parse_spec(VALID_SPECS["autoscaling-bounds"]))
    groups = _workers(manifest)
    assert (groups["cpu"]["minReplicas"], groups["cpu"]["replicas"], groups["cpu"]["maxReplicas"]) == (2, 3, 8)
    assert (groups["burst"]["minReplicas"], groups["burst"]["replicas"], groups["burst"]["maxReplicas"]) == (1, 1, 20)
    assert manifest["spec"]["enableInTreeAutoscaling"] is True
    options = manifest["spec"]["autoscalerOptions"]
    assert (options["idleTimeoutSeconds"], options["upscalingMode"]) == (300, "Conservative")
    fixed = render_raycluster(parse_spec(VALID_SPECS["fixed-size"]))
    assert fixed["spec"]["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in fixed["spec"]


def test_rayservice_embeds_the_serve_app_config() -> None:
    spec = parse_spec(spec_data(storage_url="s3://raytwin-state/prod", serve={"args": {"keys_file": "/etc/keys.json"}}))
    manifest = render_rayservice(spec)
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve == {"applications": [{
        "name": "raytwin", "import_path": "serve_apps.app:build_app", "route_prefix": "/",
        "args": {"store_url": "s3://raytwin-state/prod", "keys_file": "/etc/keys.json"},
        "runtime_env": {"env_vars": {"RAYTWIN_STORAGE_URL": "s3://raytwin-state/prod"}},
    }]}
    assert manifest["spec"]["rayClusterConfig"] == render_raycluster(spec)["spec"]


def test_model_code_of_the_spec_reaches_rayjobs_and_the_rayservice_app() -> None:
    spec = parse_spec(spec_data(env={"JAX_ENABLE_X64": "1"}, image="ghcr.io/example/raytwin-pumps:1.2.0", **MODEL_CODE))
    job = render_rayjob(spec, SWEEP_JOB)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"env_vars": {"JAX_ENABLE_X64": "1"}, **MODEL_CODE}
    app = yaml.safe_load(render_rayservice(spec)["spec"]["serveConfigV2"])["applications"][0]
    assert app["runtime_env"] == {"env_vars": {"JAX_ENABLE_X64": "1"}, **MODEL_CODE}
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "ghcr.io/example/raytwin-pumps:1.2.0"  # or baked into the image
    assert "runtimeEnvYAML" not in render_rayjob(parse_spec(spec_data()), SWEEP_JOB)["spec"]


def test_rayjob_quotes_the_entrypoint_and_carries_the_environment() -> None:
    spec = parse_spec(spec_data(env={"JAX_ENABLE_X64": "1"}))
    manifest = render_rayjob(spec, ["raytwin", "calibrate", "run", "/data/calib 1.yaml", "--runs", "s3://b/runs"],
                             "calib-1")
    assert manifest["metadata"]["name"] == "calib-1"
    assert manifest["spec"]["entrypoint"] == "raytwin calibrate run '/data/calib 1.yaml' --runs s3://b/runs"
    assert yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]) == {"env_vars": {"JAX_ENABLE_X64": "1"}}
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True
    with pytest.raises(ValueError, match="needs an entrypoint"):
        render_rayjob(spec, [])
    with pytest.raises(ValueError, match="must be a DNS label"):
        render_rayjob(spec, SWEEP_JOB, "Sweep_1")


@pytest.mark.parametrize(("entrypoint", "message"), [
    (["raytwin", "sweep", "--scenarios", "100000"], "got '--scenarios'. (see `raytwin sweep --help`)"),
    (["raytwin", "calibrate", "--model", "thermal_rc"], "Expected a command, got '--model'"),
    (["raytwin", "sweep", "run", "spec.json", "--scenarios", "9"], "No such option: --scenarios"),
    (["raytwin", "sweep"], "Missing command."),
    (["raytwin", "swep", "run", "spec.json"], "No such command 'swep'. Did you mean 'sweep'?"),
    (["raytwin", "sweep", "run"], "Missing argument 'spec'. (see `raytwin sweep run --help`)"),
    (["python3", "-m", "raytwin.cli", "sweep", "quantiles", "RUN", "--q", "half"], "Invalid value for '--q'"),
])
def test_rayjob_entrypoints_that_call_raytwin_must_parse(entrypoint: list[str], message: str) -> None:
    spec = parse_spec(spec_data())
    with pytest.raises(ValueError, match="is not a valid raytwin command") as refused:
        render_rayjob(spec, entrypoint)
    assert message in str(refused.value)


def test_rayjob_entrypoint_check_runs_nothing_and_needs_no_local_files() -> None:
    spec = parse_spec(spec_data())
    for entrypoint in (SWEEP_JOB, ["raytwin", "cluster", "render", "/on/the/cluster.yaml", "--crds", "/crds"],
                       ["raytwin", "twins", "compact", "s3://raytwin-state/prod/twins"], ["raytwin", "job", "--help"],
                       ["bash", "-c", "raytwin anything goes"], ["python", "train.py"]):
        render_rayjob(spec, entrypoint)


INVALID_SPECS = {
    "min > max replicas": (
        spec_data(worker_groups=[worker(min_replicas=5, max_replicas=2)]),
        "worker_groups.0: worker group 'cpu': min_replicas (5) is greater than max_replicas (2)",
    ),
    "replicas outside bounds": (
        spec_data(worker_groups=[worker(replicas=9)]), "replicas (9) must lie within [min_replicas, max_replicas]"
    ),
    "GPU group without image": (
        spec_data(worker_groups=[worker(name="gpu", gpus=1)]), "worker group 'gpu' requests 1 GPU(s) but sets no image"
    ),
    "negative worker CPU": (
        spec_data(worker_groups=[worker(cpu=-2)]), "worker_groups.0.cpu: Input should be greater than 0"
    ),
    "negative head memory": (spec_data(head={"memory": "-4Gi"}), "head.memory: '-4Gi' is not a Kubernetes quantity"),
    "negative GPUs": (
        spec_data(worker_groups=[worker(gpus=-1)]), "worker_groups.0.gpus: Input should be greater than or equal to 0"
    ),
    "zero memory": (spec_data(worker_groups=[worker(memory="0Gi")]), "'0Gi' must be a positive quantity"),
    "unknown field": (spec_data(workers=3), "workers: Extra inputs are not permitted"),
    "non-s3 storage": (spec_data(storage_url="gs://bucket"), "storage_url: String should match pattern '^s3://"),
    "object store larger than a pod": (
        spec_data(object_store_memory="16Gi"),
        "object_store_memory (16Gi) must be smaller than the memory of the head (4Gi)",
    ),
    "duplicate group names": (spec_data(worker_groups=[worker(), worker()]), "repeated: cpu"),
    "local py_modules path": (spec_data(py_modules=["./pumpkit"]), "py_modules.0: String should match pattern"),
    "empty pip requirement": (spec_data(pip=[""]), "pip.0: String should have at least 1 character"),
    "unknown ingress": (spec_data(serve={"ingress": "nginx"}), "serve.ingress: Input should be 'proxy' or 'haproxy'"),
}


@pytest.mark.parametrize("case", INVALID_SPECS)
def test_invalid_specs_are_refused_before_any_yaml_is_written(tmp_path: Path, case: str) -> None:
    data, message = INVALID_SPECS[case]
    spec_file, out = tmp_path / "spec.yaml", tmp_path / "out.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as refused:
        load_spec(spec_file)
    assert message in str(refused.value)
    result = CliRunner().invoke(cluster_app, ["render", str(spec_file), "--crds", str(CRD_DIR), "-o", str(out)])
    assert result.exit_code == 1
    assert message in result.output
    assert not out.exists()


def _limits(manifest: dict[str, Any]) -> dict[str, Any]:
    return _container(manifest["spec"]["workerGroupSpecs"][0])["resources"]["limits"]


BROKEN = {
    "integer field as string": (lambda m: m["spec"]["workerGroupSpecs"][0].update(minReplicas="1"),
                                "spec.workerGroupSpecs.0.minReplicas: '1' is not of type 'integer'"),
    "malformed quantity": (lambda m: _limits(m).update(cpu="lots"), "resources.limits.cpu: 'lots' does not match"),
    "float quantity": (lambda m: _limits(m).update(cpu=1.5),
                       "resources.limits.cpu: 1.5 is not valid under any of the given schemas"),
    "misspelt field": (lambda m: m["spec"].update(workerGroupSpec=[]), "'workerGroupSpec' was unexpected"),
    "missing required field": (lambda m: m["spec"]["workerGroupSpecs"][0].pop("groupName"),
                               "'groupName' is a required property"),
    "int32 overflow": (lambda m: m["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**40),
                       "maxReplicas: 1099511627776 is not a 'int32'"),
    "non-string start param": (lambda m: m["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                               "rayStartParams.num-cpus: 0 is not of type 'string'"),
    "unknown apiVersion": (lambda m: m.update(apiVersion="ray.io/v9"), "no CRD for apiVersion='ray.io/v9'"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_deliberately_broken_manifests_fail_validation(crds: CrdSchemas, case: str) -> None:
    break_it, message = BROKEN[case]
    manifest = render_raycluster(parse_spec(VALID_SPECS["cpu-only"]))
    crds.validate(manifest)
    broken = copy.deepcopy(manifest)
    break_it(broken)
    with pytest.raises(ManifestInvalid) as refused:
        crds.validate(broken)
    assert message in str(refused.value)


def test_int_or_string_accepts_integers_and_quantity_strings_only(crds: CrdSchemas) -> None:
    manifest = render_raycluster(parse_spec(VALID_SPECS["cpu-only"]))
    limits = _limits(manifest)
    for accepted in (2, "500m", "1.5", "2Gi"):
        limits["cpu"] = accepted
        crds.validate(manifest)


def test_kubernetes_schema_translation() -> None:
    node = {
        "type": "object",
        "properties": {
            "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "when": {"type": "string", "nullable": True},
            "free": {
                "type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True
            },
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "nullable": {"type": "boolean", "default": {"nullable": True}},  # field names are not keywords
            "items": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        },
    }
    out = kubernetes_to_json_schema(node)
    assert out["additionalProperties"] is False
    assert out["properties"]["port"] == {"oneOf": [{"type": "integer"}, {"type": "string"}]}
    assert out["properties"]["when"] == {"type": ["string", "null"]}
    assert "additionalProperties" not in out["properties"]["free"]
    assert out["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    assert out["properties"]["nullable"] == {"type": "boolean", "default": {"nullable": True}}
    assert out["properties"]["items"]["items"]["additionalProperties"] is False


def test_committed_gpu_example_equals_a_fresh_render(crds: CrdSchemas, tmp_path: Path) -> None:
    out = tmp_path / "gpu-raycluster.yaml"
    result = CliRunner().invoke(
        cluster_app, ["render", str(EXAMPLES / "gpu-cluster.spec.yaml"), "-o", str(out)],
        env={"RAYTWIN_KUBERAY_CRDS": str(CRD_DIR)},
    )
    assert result.exit_code == 0, result.output
    assert out.read_text() == (EXAMPLES / "gpu-raycluster.yaml").read_text()
    manifest, policy = yaml.safe_load_all(out.read_text())
    crds.validate(manifest)
    validate_network_policy(policy)
    assert _workers(manifest)["gpu"]["rayStartParams"]["num-gpus"] == "1"


def test_render_requires_a_crd_directory(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_data()))
    missing = CliRunner().invoke(cluster_app, ["render", str(spec_file)], env={"RAYTWIN_KUBERAY_CRDS": ""})
    assert missing.exit_code != 0 and "--crds" in missing.output
    empty = CliRunner().invoke(cluster_app, ["render", str(spec_file), "--crds", str(tmp_path)])
    assert empty.exit_code == 1 and "no ray.io CustomResourceDefinitions found" in empty.output


def test_render_rayjob_to_stdout_through_the_cli() -> None:
    spec_file = EXAMPLES / "gpu-cluster.spec.yaml"
    result = CliRunner().invoke(
        cluster_app,
        ["render", str(spec_file), "--crds", str(CRD_DIR), "--kind", "rayjob", "--job-name", "sweep-1", "--",
         *SWEEP_JOB],
    )
    assert result.exit_code == 0, result.output
    manifest, policy = yaml.safe_load_all(result.output)
    assert (manifest["kind"], manifest["metadata"]["name"]) == ("RayJob", "sweep-1")
    assert (policy["kind"], policy["metadata"]["name"]) == ("NetworkPolicy", "raytwin-gpu-rayjob-raytwin")
    assert manifest["spec"]["entrypoint"] == "raytwin sweep run /data/spec.json --runs s3://bucket/runs --no-progress"
    invalid = CliRunner().invoke(cluster_app, ["render", str(spec_file), "--crds", str(CRD_DIR), "--kind", "rayjob",
                                               "--", "raytwin", "sweep", "--scenarios", "100000"])
    assert invalid.exit_code == 1 and "is not a valid raytwin command" in invalid.output
    stray = CliRunner().invoke(cluster_app, ["render", str(spec_file), "--crds", str(CRD_DIR), "--", "raytwin"])
    assert stray.exit_code == 1 and "only applies to a rayjob" in stray.output


def test_crd_defaults_are_applied_before_validation_as_the_api_server_does(crds: CrdSchemas) -> None:
    """KubeRay samples leave out `minReplicas`/`maxReplicas`: required, but defaulted by the CRD (0, 2^31-1)."""
    manifest = render_raycluster(parse_spec(VALID_SPECS["cpu-only"]))
    for group in manifest["spec"]["workerGroupSpecs"]:
        del group["minReplicas"], group["maxReplicas"]
    crds.validate(manifest)
    schema = crds.validators[("ray.io/v1", "RayCluster")].schema
    [group] = apply_defaults(schema, manifest)["spec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"], group["numOfHosts"]) == (0, 2**31 - 1, 1)
    assert "minReplicas" not in manifest["spec"]["workerGroupSpecs"][0]  # the caller's manifest is left alone
    # a default never hides a wrong value, and nothing without a default is invented
    manifest["spec"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    with pytest.raises(ManifestInvalid, match="minReplicas: 'one' is not of type 'integer'"):
        crds.validate(manifest)
    del manifest["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(ManifestInvalid, match="'groupName' is a required property"):
        crds.validate(manifest)


def test_apply_defaults_fills_nested_objects_lists_and_non_nullable_nulls() -> None:
    schema = kubernetes_to_json_schema({"type": "object", "properties": {
        "mode": {"type": "string", "default": "DenyAll"},
        "note": {"type": "string", "nullable": True, "default": "x"},
        "ports": {"type": "array", "items": {"type": "object", "properties": {
            "protocol": {"type": "string", "default": "TCP"}}}},
        "opts": {"type": "object", "properties": {"surge": {"type": "integer", "default": 100}}},
    }})
    assert apply_defaults(schema, {"ports": [{}, {"protocol": "UDP"}], "note": None}) == {
        "mode": "DenyAll", "note": None, "ports": [{"protocol": "TCP"}, {"protocol": "UDP"}]}
    assert apply_defaults(schema, {"mode": None, "opts": {}}) == {"mode": "DenyAll", "note": "x",
                                                                   "opts": {"surge": 100}}


def test_generate_name_stands_in_for_name(crds: CrdSchemas) -> None:
    manifest = render_raycluster(parse_spec(VALID_SPECS["cpu-only"]))
    manifest["metadata"] = {"generateName": "raycluster-", "namespace": "sim"}
    crds.validate(manifest)
    del manifest["metadata"]["generateName"]
    with pytest.raises(ManifestInvalid, match=r"metadata.name: required \(or metadata.generateName\)"):
        crds.validate(manifest)


def test_a_rayservice_gets_its_keys_secret_mounted_and_is_refused_without_keys() -> None:
    service = render_rayservice(parse_spec(spec_data()))
    for pod in [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"])]:
        assert {"name": "raytwin-api-keys", "secret": {"secretName": "raytwin-keys", "defaultMode": 0o400}} \
            in pod["volumes"]
        (container,) = pod["containers"]
        assert {"name": "raytwin-api-keys", "mountPath": "/etc/raytwin/keys", "readOnly": True} \
            in container["volumeMounts"]
        assert {"name": "RAYTWIN_API_KEYS_FILE", "value": "/etc/raytwin/keys/keys.json"} in container["env"]
    without = {k: v for k, v in spec_data().items() if k != "keys_secret"}
    with pytest.raises(ValueError, match="a RayService's API needs its keys file: set keys_secret"):
        render_rayservice(parse_spec(without))
    render_raycluster(parse_spec(without))  # a cluster for jobs needs no API keys


def test_serve_args_are_checked_as_the_application_checks_them() -> None:
    bad = spec_data(serve={"args": {"stor_url": "s3://x", "rate_per_s": -5, "keys_file": 42}})
    with pytest.raises(SpecError) as err:
        parse_spec(bad, "cluster spec bad.yaml")
    assert str(err.value).splitlines() == [
        "invalid cluster spec bad.yaml:",
        "  serve.args.keys_file: Input should be a valid string",
        "  serve.args.rate_per_s: Input should be greater than 0",
        "  serve.args.stor_url: Extra inputs are not permitted"]
