"""`raytwin cluster ...` (KubeRay manifests, local multi-node Ray) and `raytwin job ...` (Ray job submission)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from ray.job_submission import JobStatus

from cluster.crd_validation import CRDS_ENV, CrdError, CrdSchemas
from cluster.entrypoints import check_raytwin_entrypoint
from cluster.jobs import JobClient, JobError, UnknownJob, project_runtime_env, resolve_cluster
from cluster.kube import KubeConfigError, KubeForbidden, KubeRayClient, KubeRayNotFound, api_client_from_kubeconfig
from cluster.local import (
    DEFAULT_STATE_FILE,
    STATE_FILE_ENV,
    LocalCluster,
    LocalClusterError,
    LocalClusterInfo,
    stop_local_cluster,
)
from cluster.manifests import Kind, render, to_yaml
from cluster.network_policy import render_network_policy, validate_network_policy
from cluster.spec import load_spec
from cluster.upload import check_uploads

cluster_app = typer.Typer(
    help="Ray on Kubernetes through KubeRay, and local multi-node Ray clusters.", no_args_is_help=True
)
job_app = typer.Typer(help="Submit and follow Ray jobs with RayTwin's runtime environment.", no_args_is_help=True)

SpecFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Cluster spec YAML.")]
KindOpt = Annotated[Kind, typer.Option("--kind", "-k", help="Which KubeRay resource.")]
CrdsOpt = Annotated[
    Path,
    typer.Option("--crds", envvar=CRDS_ENV, file_okay=False, help="Directory of the KubeRay CRD YAML files."),
]
EntrypointArg = Annotated[
    list[str] | None, typer.Argument(help="RayJob entrypoint after `--`, e.g. -- raytwin sweep run spec.json")
]
JobNameOpt = Annotated[str | None, typer.Option("--job-name", help="RayJob name (default: <cluster>-job).")]
NamespaceOpt = Annotated[str, typer.Option("--namespace", "-n")]
KubeconfigOpt = Annotated[
    Path | None, typer.Option("--kubeconfig", dir_okay=False, help="Default: $KUBECONFIG, ~/.kube/config, in-cluster.")
]
ContextOpt = Annotated[str | None, typer.Option("--context", help="kubeconfig context.")]
LocalOpt = Annotated[bool, typer.Option("--local", help="A multi-node Ray cluster on this machine.")]
StateFileOpt = Annotated[
    Path, typer.Option("--state-file", envvar=STATE_FILE_ENV, help="Where the local cluster's address is kept.")
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Dashboard URL (default: RAY_ADDRESS, else the `cluster up --local` cluster)."),
]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _validated_manifests(
    spec_file: Path, kind: Kind, crds: Path, entrypoint: list[str] | None, job_name: str | None
) -> list[dict[str, Any]]:
    """Spec -> the KubeRay manifest (validated against the CRDs), then its NetworkPolicy where the spec has one
    (checked against the networking.k8s.io/v1 shape); any failure ends the command before anything is written
    or sent."""
    try:
        spec = load_spec(spec_file)
        manifest = render(spec, kind, entrypoint or (), job_name)
        CrdSchemas.from_dir(crds).validate(manifest)
        manifests = [manifest]
        if spec.network_policy.enabled:
            manifests.append(render_network_policy(spec, kind))
            validate_network_policy(manifests[-1])
    except (ValueError, CrdError) as exc:
        _fail(str(exc))
    return manifests


def _kube(namespace: str, kubeconfig: Path | None, context: str | None) -> KubeRayClient:
    """A client for the namespace; no usable kubeconfig ends the command with one line and exit code 2."""
    try:
        return KubeRayClient(api_client_from_kubeconfig(str(kubeconfig) if kubeconfig else None, context), namespace)
    except KubeConfigError as exc:
        _fail(str(exc), code=2)


@cluster_app.command("render")
def render_command(
    spec_file: SpecFile,
    crds: CrdsOpt,
    kind: KindOpt = Kind.RAYCLUSTER,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
    job_name: JobNameOpt = None,
    entrypoint: EntrypointArg = None,
) -> None:
    """Render a RayCluster, RayService or RayJob manifest from a spec, validated against the KubeRay CRDs, followed
    by the spec's NetworkPolicy (a second YAML document) unless `network_policy.enabled` is false."""
    manifests = _validated_manifests(spec_file, kind, crds, entrypoint, job_name)
    text = "---\n".join(to_yaml(manifest) for manifest in manifests)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(f"wrote {' and '.join(m['kind'] for m in manifests)} to {output}", err=True)


@cluster_app.command("apply")
def apply_command(
    spec_file: SpecFile,
    crds: CrdsOpt,
    kind: KindOpt = Kind.RAYCLUSTER,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    job_name: JobNameOpt = None,
    entrypoint: EntrypointArg = None,
) -> None:
    """Create the rendered resources in the spec's namespace, or replace those that already exist: the KubeRay one
    first, then its NetworkPolicy, owned by it (its `uid`), so that deleting it deletes the policy too."""
    kuberay, *beside = _validated_manifests(spec_file, kind, crds, entrypoint, job_name)
    namespace = kuberay["metadata"]["namespace"]
    kube = _kube(namespace, kubeconfig, context)
    action, owner = kube.apply(kuberay)
    owner_name = f"{kuberay['kind']} {namespace}/{kuberay['metadata']['name']}"
    typer.echo(f"{owner_name} {action}")
    for manifest in beside:
        action, _ = kube.apply(manifest, owner)
        typer.echo(f"{manifest['kind']} {namespace}/{manifest['metadata']['name']} {action} (owned by {owner_name})")


@cluster_app.command("status")
def status_command(
    name: str,
    kind: KindOpt = Kind.RAYCLUSTER,
    namespace: NamespaceOpt = "default",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Print the KubeRay operator's status of a resource."""
    try:
        status = _kube(namespace, kubeconfig, context).status(kind, name)
    except KubeRayNotFound as exc:
        _fail(str(exc))
    typer.echo(yaml.safe_dump(status, sort_keys=False) if status else "no status yet (not reconciled by KubeRay)")


@cluster_app.command("delete")
def delete_command(
    name: str,
    kind: KindOpt = Kind.RAYCLUSTER,
    namespace: NamespaceOpt = "default",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Delete a resource, and say what becomes of its NetworkPolicies: Kubernetes deletes those it owns with it;
    those applied by an older raytwin (no owner) are deleted here unless another resource's pods use them.
    Deleting one that is already gone is not an error."""
    try:
        lines = _kube(namespace, kubeconfig, context).delete(kind, name)
    except KubeForbidden as exc:
        _fail(str(exc))
    for line in lines:
        typer.echo(line)


def _running(info: LocalClusterInfo) -> bool:
    try:
        os.kill(info.pids[0], 0)
    except (ProcessLookupError, IndexError):
        return False
    return True


@cluster_app.command("up")
def up_command(
    local: LocalOpt = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Worker nodes besides the head.")] = 1,
    cpus_per_node: Annotated[int, typer.Option("--cpus-per-node", min=1)] = 1,
    object_store_mb: Annotated[int, typer.Option("--object-store-mb", min=75)] = 100,
    state_file: StateFileOpt = DEFAULT_STATE_FILE,
) -> None:
    """Start a local multi-node Ray cluster (head + worker raylets) and print its addresses."""
    if not local:
        _fail("`up` starts local clusters only (pass --local); on Kubernetes use `raytwin cluster apply`")
    if state_file.exists() and _running(LocalClusterInfo.load(state_file)):
        _fail(f"a local cluster is already running (state in {state_file}); "
              "stop it with `raytwin cluster down --local`")
    try:
        info = LocalCluster(workers, cpus_per_node, object_store_mb).start()
    except LocalClusterError as exc:
        _fail(str(exc))
    info.save(state_file)
    typer.echo(
        f"Ray address:   {info.address}\nDashboard/API: {info.dashboard_url}\nNodes:         {workers + 1}\n"
        f"Ray clients outside `raytwin job` need the cluster's token:\n"
        f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={info.temp_dir}/auth_token"
    )


@cluster_app.command("down")
def down_command(local: LocalOpt = False, state_file: StateFileOpt = DEFAULT_STATE_FILE) -> None:
    """Stop the local cluster started by `up --local`. None recorded is said and exits 0: a script stopping whatever
    is up must not fail on nothing to stop (a state it cannot read, or a process outliving the stop, still does)."""
    if not local:
        _fail("`down` stops local clusters only (pass --local); on Kubernetes use `raytwin cluster delete`")
    if not state_file.exists():
        typer.echo(f"no local cluster recorded in {state_file}: nothing to stop", err=True)
        return
    try:
        info = LocalClusterInfo.load(state_file)
    except LocalClusterError as exc:
        _fail(str(exc))
    # Ctrl-C while stopping would leave half a cluster behind; finish first.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop_local_cluster(info)
        state_file.unlink()
    except LocalClusterError as exc:  # processes left: the state stays, to stop them again
        _fail(str(exc))
    finally:
        signal.signal(signal.SIGINT, previous)
    typer.echo(f"stopped local cluster {info.dashboard_url}")


def _jobs(address: str | None, state_file: Path) -> JobClient:
    try:
        return JobClient(*resolve_cluster(address, state_file))
    except (JobError, LocalClusterError, ConnectionError) as exc:
        _fail(str(exc))


@job_app.command("submit")
def submit_command(
    entrypoint: Annotated[list[str], typer.Argument(help="Command after `--`, e.g. -- raytwin sweep run spec.json")],
    address: AddressOpt = None,
    working_dir: Annotated[
        Path | None, typer.Option("--working-dir", exists=True, file_okay=False, help="Uploaded as the job's cwd.")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the job (repeatable).")] = None,
    submission_id: Annotated[str | None, typer.Option("--id", help="Job id to use.")] = None,
    py_module: Annotated[list[Path] | None, typer.Option(
        "--py-module", exists=True, help="Model code to upload: a package directory or module file (repeatable)."
    )] = None,
    pip: Annotated[list[str] | None, typer.Option(
        "--pip", help="Requirement installed for the job, e.g. pump-models==1.2.0 (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="Leave paths out of the upload: a gitignore-style pattern, e.g. jobruns (repeatable).")
    ] = None,
    state_file: StateFileOpt = DEFAULT_STATE_FILE,
) -> None:
    """Submit a job to a Ray cluster's job API; prints the job id."""
    pairs = [item.partition("=") for item in env or []]
    if bad := [key for key, sep, _ in pairs if not sep or not key]:
        _fail(f"--env expects KEY=VALUE, got: {', '.join(bad) or '(empty)'}")
    try:
        check_raytwin_entrypoint(entrypoint)
        check_uploads(project_runtime_env(working_dir, py_modules=py_module or (), excludes=exclude or ()))
    except ValueError as exc:  # an unknown command, or an upload the job API would refuse (UploadTooLarge)
        _fail(str(exc))
    jobs = _jobs(address, state_file)
    try:
        job_id = jobs.submit(entrypoint, working_dir, {k: v for k, _, v in pairs}, submission_id,
                             py_modules=py_module or (), pip=pip or (), excludes=exclude or ())
    except (ValueError, RuntimeError) as exc:  # Ray refused the runtime env or the submission: its own words
        _fail(f"the cluster refused the job: {str(exc).strip().splitlines()[-1]}")
    typer.echo(job_id)


JOB_STATUS_EXIT = {JobStatus.FAILED: 3, JobStatus.STOPPED: 4}
"""`job status` exit codes: 0 SUCCEEDED, PENDING or RUNNING; 3 FAILED; 4 STOPPED (1: no cluster, 2: usage)."""


@contextlib.contextmanager
def _job_id_usage() -> Iterator[None]:
    """An empty or unknown job id is a usage error (exit 2) in one line."""
    try:
        yield
    except (UnknownJob, ValueError) as exc:
        _fail(str(exc), code=2)


@job_app.command("status")
def job_status_command(job_id: str, address: AddressOpt = None, state_file: StateFileOpt = DEFAULT_STATE_FILE) -> None:
    """Print a job's status (and Ray's message about it); exit 3 if it FAILED, 4 if it was STOPPED."""
    with _job_id_usage():
        info = _jobs(address, state_file).info(job_id)
    typer.echo(info.status.value + (f": {info.message}" if info.message else ""))
    if info.status in JOB_STATUS_EXIT:
        raise typer.Exit(JOB_STATUS_EXIT[info.status])


@job_app.command("logs")
def logs_command(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
    address: AddressOpt = None,
    state_file: StateFileOpt = DEFAULT_STATE_FILE,
) -> None:
    """Print a job's driver logs."""
    jobs = _jobs(address, state_file)
    with _job_id_usage():
        if follow:
            for chunk in jobs.follow_logs(job_id):
                typer.echo(chunk, nl=False)
        else:
            typer.echo(jobs.logs(job_id), nl=False)


@job_app.command("stop")
def stop_command(
    job_id: str,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the job has ended.")] = True,
    timeout_s: Annotated[float, typer.Option("--timeout", min=0, help="Seconds to wait.")] = 60.0,
    address: AddressOpt = None,
    state_file: StateFileOpt = DEFAULT_STATE_FILE,
) -> None:
    """Stop a job: Ray sends its entrypoint SIGTERM (a sweep or calibration cancels its tasks and records its
    run `cancelled`), SIGKILL 3 s later. Prints the job's status: STOPPED, or how it had already ended."""
    jobs = _jobs(address, state_file)
    with _job_id_usage():
        stopping = jobs.stop(job_id)
    try:
        status = jobs.wait(job_id, timeout_s) if stopping and wait else jobs.status(job_id)
    except JobError as exc:
        _fail(str(exc))
    typer.echo(status.value if stopping else f"{status.value} (it had ended; nothing to stop)")


@job_app.command("list")
def list_command(address: AddressOpt = None, state_file: StateFileOpt = DEFAULT_STATE_FILE) -> None:
    """List the cluster's jobs: id, status, entrypoint."""
    for job in _jobs(address, state_file).list():
        typer.echo(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")
