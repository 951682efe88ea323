"""`raytwin serve`: start the HTTP API on Ray; `raytwin keys create/revoke/set-owner/list`; `raytwin serve openapi`;
`raytwin jobs list`.

The integrator mounts `serve_app` as ``serve``, `keys_app` as ``keys`` and `jobs_app` as ``jobs`` on the `raytwin`
app.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from pydantic import ValidationError

from raytwin.contracts import describe_error
from raytwin.ray_connect import first_line, local_start_failure, unreachable
from serve_apps.auth import (GrantName, KeyChangeRefused, RevokedKey, RoleName, create_key, load_keys, revoke_key,
                              set_key_owner)
from serve_apps.config import Autoscaling

serve_app = typer.Typer(help="Start the RayTwin HTTP API on Ray Serve (routes under /v1, docs at /docs).",
                        invoke_without_command=True)
keys_app = typer.Typer(help="API keys (only their SHA-256 is stored, in the keys file).", no_args_is_help=True)
jobs_app = typer.Typer(help="The service's jobs (scenario, sweep, bulk) of every tenant, read from the store.",
                       no_args_is_help=True)

SCALING = Autoscaling()
"""`ServeConfig`'s defaults, named in the options' help."""
KEYS_FILE = Annotated[Path, typer.Option(envvar="RAYTWIN_API_KEYS_FILE", help="API keys file (JSON).")]


def existing_keys_file(path: Path) -> Path:
    """`path` if it exists: listing or revoking in a file that is not there (the wrong directory, the default name
    where the server reads another) said nothing, or "no key", as if the server had no such key."""
    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist: give the keys file the server reads (`raytwin serve "
                                 "--keys-file`, RAYTWIN_API_KEYS_FILE)", param_hint="--keys-file")
    return path


def autoscaling_args(from_file: dict, **options: float | None) -> dict:
    """The config file's ``autoscaling`` with the options given on the command line (not None) over it."""
    return {**from_file, **{name: value for name, value in options.items() if value is not None}}


def _auth_hint() -> str:
    """What a Ray client outside this process needs besides the address, when the cluster requires a token."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled  # no public call yet
    except ImportError:
        return ""
    return " RAY_AUTH_MODE=token" if is_token_auth_enabled() else ""


@serve_app.callback()
def start(
    ctx: typer.Context,
    store: Annotated[str | None, typer.Option(envvar="RAYTWIN_SERVE_STORE_URL", help="Store URL (dir or s3://...).")
                     ] = None,
    keys_file: Annotated[Path | None, typer.Option(envvar="RAYTWIN_API_KEYS_FILE", help="API keys file (JSON).")
                         ] = None,
    host: Annotated[str, typer.Option(help="HTTP bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    min_replicas: Annotated[int | None, typer.Option(
        help=f"Ingress autoscaling: fewest replicas (default: the config file's, else {SCALING.min_replicas}).",
        show_default=False)] = None,
    max_replicas: Annotated[int | None, typer.Option(
        help=f"Ingress autoscaling: most replicas (default: the config file's, else {SCALING.max_replicas}).",
        show_default=False)] = None,
    target_ongoing_requests: Annotated[float | None, typer.Option(
        help="Ingress autoscaling target per replica (default: the config file's, else admission.max_concurrent).",
        show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file with more ServeConfig fields.", exists=True,
                                                dir_okay=False, readable=True)] = None,
    direct_ingress: Annotated[bool, typer.Option(
        "--direct-ingress/--no-direct-ingress", envvar="RAY_SERVE_ENABLE_DIRECT_INGRESS",
        help="Ingress replicas also answer HTTP on their own ports, skipping the proxy hop (~5x less CPU per "
             "request; the app runs on each replica's own event loop). Applies to the local Ray this command starts; a "
             "cluster needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in "
             "every node's environment.")] = False,
    haproxy: Annotated[bool, typer.Option(
        "--haproxy/--no-haproxy", envvar="RAY_SERVE_ENABLE_HA_PROXY",
        help="Serve's HAProxy mode: HAProxy on HOST:PORT forwards to the Ingress replicas' own HTTP servers "
             "instead of Serve's Python proxy (~10x the state queries per core; implies direct ingress; the app "
             "runs on each replica's own event loop). Applies to the local Ray this command starts; a cluster "
             "needs RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in every node's "
             "environment (the cluster spec's serve.ingress: haproxy sets both).")] = False,
    metrics_export_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Port of Ray's Prometheus export on the local Ray this command starts (default: a "
        "free one, different on every start: give it for a static scrape config).", show_default=False)] = None,
    dashboard_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Port of the Ray dashboard on the local Ray this command starts (default: 8265, "
        "or the next free one).", show_default=False)] = None,
    temp_dir: Annotated[Path | None, typer.Option(
        help="Directory of the session files and logs of the local Ray this command starts (default: RAY_TMPDIR, "
        "else TMPDIR, else the system's temporary directory, then ray/; keep it short: Ray's socket paths are "
        "under it).", show_default=False)] = None,
    block: Annotated[bool, typer.Option(help="Keep running until Ctrl-C.")] = True,
) -> None:
    """Start the API on Ray Serve at http://HOST:PORT (routes under /v1, docs at /docs)."""
    if ctx.invoked_subcommand is not None:
        return
    if store is None or keys_file is None:
        raise typer.BadParameter("give --store and --keys-file (or RAYTWIN_SERVE_STORE_URL, RAYTWIN_API_KEYS_FILE)")
    if not keys_file.exists():
        raise typer.BadParameter(f"{keys_file} does not exist; create a key with `raytwin keys create`")
    import ray
    from ray import serve

    from actors.lease import StoreLeased, check_not_served_elsewhere, release_lease
    from connectors.manager import stop_connector_actors
    from raytwin.statestore import StateStore
    from serve_apps.app import build_app
    from serve_apps.config import ServeConfig
    from serve_apps import serve_env
    from serve_apps.endpoints import (
        DIRECT_INGRESS_ENV,
        HAPROXY_ENV,
        api_address,
        haproxy_binary,
        http_targets,
        serving_at,
    )
    from pydantic import ValidationError

    from raytwin.contracts import describe_error
    from serve_apps.connector_ops import missing_credentials

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _config_args(config) if config else {}
    # a local store path is made absolute: Serve replicas do not run in this shell's directory
    store = store if "://" in store else str(Path(store).resolve())
    args.update(store_url=store, keys_file=str(keys_file.resolve()), autoscaling=autoscaling_args(
        args.get("autoscaling", {}), min_replicas=min_replicas, max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests))
    try:
        settings = ServeConfig.from_args(args)
    except ValidationError as exc:
        raise typer.BadParameter(f"the service's settings (--config {config}, RAYTWIN_SERVE_* variables, options): "
                                 f"{describe_error(exc)}") from None
    if direct_ingress:
        os.environ[DIRECT_INGRESS_ENV] = "1"  # read by Serve's processes when they start
    if haproxy:
        try:
            haproxy_binary()
        except RuntimeError as e:
            raise typer.BadParameter(f"--haproxy: {e}") from e
        os.environ[HAPROXY_ENV] = "1"
    if address is None:  # the local Ray started here inherits this environment: check what its backend will read
        for declaration in settings.connectors:
            if missing := missing_credentials(declaration):
                raise typer.BadParameter(f"connector {declaration.get('name')!r} in --config: set the environment "
                                         f"variable(s) {missing} (its credentials) before starting")
    twins = StateStore(settings.url("twins"), settings.storage_options or None)
    local = {"_metrics_export_port": metrics_export_port, "dashboard_port": dashboard_port,
             "_temp_dir": str(temp_dir.resolve()) if temp_dir is not None else None}
    if address is not None and any(v is not None for v in local.values()):
        raise typer.BadParameter("--metrics-export-port, --dashboard-port and --temp-dir apply to a Ray this command "
                                 "starts; a running cluster's are set where it starts (`ray start`, KubeRay)")
    starts_ray = address is None and not ray.is_initialized()
    context = None  # the Ray this command starts or joins (its dashboard's URL)
    if address is not None and not ray.is_initialized():  # first: the lease names the cluster that serves it
        try:
            if reason := unreachable(address):  # at once, not after ray.init's minutes of retries
                raise ConnectionError(reason)
            context = ray.init(address=address)
        except Exception as e:  # noqa: BLE001 - Ray raises several kinds; each is one line for the operator
            typer.echo(f"error: cannot connect to the Ray cluster at {address}: {first_line(e)} (is it running? a "
                       "cluster that requires a token needs RAY_AUTH_MODE=token and its token in this environment)",
                       err=True)
            raise typer.Exit(1) from None
    try:  # before the app starts (its backend would be refused, Serve retrying it for ever), and before a Ray of
        # its own starts (tens of seconds) when it starts one: that cluster is not the one serving the store
        check_not_served_elsewhere(twins, cluster="" if starts_ray else None)
    except StoreLeased as e:
        raise typer.BadParameter(f"--store: {e}") from e
    if not ray.is_initialized():  # the proxy gate, sized to this app, for the local Ray started here (serve_env.py)
        serve_env.apply(serve_env.environment(settings.autoscaling, settings.admission))
        if direct_ingress or haproxy:
            serve_env.apply(serve_env.replica_server_environment())
        try:
            context = ray.init(**{k: v for k, v in local.items() if v is not None})
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its node is slow to start
            typer.echo(local_start_failure(e, "pass --address", "--temp-dir; default RAY_TMPDIR/ray"), err=True)
            raise typer.Exit(1) from None
    if address is not None and (bare := serve_env.nodes_without_proxy_callback()):
        typer.echo(f"warning: Ray node(s) {', '.join(bare)} started without RayTwin's proxy environment: their Serve "
                   "proxies have no overload gate (the excess queues instead of a fast 503) and keep no client "
                   "X-Request-ID; start their `ray start` with the variables `raytwin serve env` prints "
                   "(serve_apps/README.md, \"The proxy gate\")", err=True)
    serve.start(http_options={"host": host, "port": port})  # a Serve already running keeps its own
    serve.run(build_app(settings), name="raytwin", route_prefix="/")
    asked, (host, port) = (host, port), serving_at()
    typer.echo(api_address((host, port), asked, haproxy))
    auth = _auth_hint()
    typer.echo(f"Ray cluster at {ray.get_runtime_context().gcs_address} (`{auth.strip() + ' ' if auth else ''}raytwin "
               f"status --address` it; `ray` commands: export RAY_ADDRESS=it{auth})")
    if context is not None and context.dashboard_url:
        typer.echo(f"Ray dashboard at http://{context.dashboard_url} (`{auth.strip() + ' ' if auth else ''}serve "
                   f"status -a http://{context.dashboard_url}`)")
    exports = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]
    typer.echo("metrics (Prometheus, every Ray node; ops/README.md): " + ", ".join(exports))
    replicas = [p for _, p in http_targets("raytwin") if p != port]
    if replicas:
        typer.echo("direct ingress (no proxy hop; base URLs, routes under /v1): "  # as api_address: no /v1 to copy
                   + ", ".join(f"http://{host}:{p}" for p in replicas))
    if not block:
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the same way on SIGTERM (Kubernetes, systemd)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        # the twins' shards went with the app: free the store now, not when their heartbeat expires; its connectors
        # are detached (they outlive backend restarts): stop them, or they would run beside the next service
        release_lease(twins)
        stop_connector_actors(settings.namespace)
        typer.echo("stopped")


def _config_args(path: Path) -> dict[str, Any]:
    """The `--config` file's fields: a JSON object, else a one-line error naming the file."""
    try:
        args = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"{path}: not a JSON file ({exc})", param_hint="--config") from None
    if not isinstance(args, dict):
        raise typer.BadParameter(f"{path}: a JSON object of ServeConfig fields is expected, not a "
                                 f"{type(args).__name__}", param_hint="--config")
    return args


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    role: Annotated[RoleName, typer.Option(help="reader | writer | admin.")],
    keys_file: KEYS_FILE = Path("raytwin-keys.json"),
    grant: Annotated[list[str] | None, typer.Option(
        help="A role outside the reader/writer/admin order: approver (may approve model versions into "
             "production). Repeatable.")] = None,
    owner: Annotated[str | None, typer.Option(
        help="The person who holds the key (e.g. alice): the four-eyes rules compare owners, so give every key of "
             "one person (a rotated key and its successor too) the same owner. Needed for a writer or admin key "
             "and for any grant; a reader key may go without.")] = None,
) -> None:
    """Create a key: prints it ONCE (only its SHA-256 is stored in the keys file)."""
    unknown = set(grant or ()) - set(get_args(GrantName))
    if unknown:
        raise typer.BadParameter(f"unknown grant(s) {sorted(unknown)}; known: {', '.join(get_args(GrantName))}")
    try:
        record, key = create_key(keys_file, tenant, role, tuple(grant or ()), owner=owner)  # type: ignore[arg-type]
    except KeyChangeRefused as exc:
        raise typer.BadParameter(str(exc), param_hint="--owner") from None
    except ValidationError as exc:
        raise typer.BadParameter(describe_error(exc)) from None
    typer.echo(key)
    typer.echo(f"key_id={record.key_id} tenant={record.tenant} role={record.role} "
               f"grants={','.join(record.grants) or '-'} owner={record.owner or '-'} file={keys_file}", err=True)


@serve_app.command("env")
def env(config: Annotated[Path | None, typer.Option(help="JSON file with ServeConfig fields (its `autoscaling` and "
                                                     "`admission` size the gate).")] = None,
        replica_servers: Annotated[bool, typer.Option(
            "--replica-servers/--no-replica-servers", help="Also the switch for direct ingress and HAProxy mode "
            "(the app on each replica's own event loop).")] = False) -> None:
    """Print the environment every Ray node must start with for RayTwin's proxy gate (`export` lines for
    `ray start` on a cluster RayTwin did not start: the overload gate and client request ids live in Serve's
    proxies, which read it when they start)."""
    from serve_apps import serve_env

    variables = serve_env.environment_for_args(_config_args(config) if config else {})
    if replica_servers:
        variables |= serve_env.replica_server_environment()
    for name, value in variables.items():
        typer.echo(f"export {name}={shlex.quote(value)}")


@serve_app.command("openapi")
def openapi(out: Annotated[Path | None, typer.Option(
        help="Write the document to this file instead of standard output (the repository's copy: "
             "--out serve_apps/openapi.json).", show_default=False)] = None) -> None:
    """Print the OpenAPI document of the API, or write it to --out; standard output by default, so the
    command works in any directory (the committed copy is regenerated with --out serve_apps/openapi.json)."""
    from serve_apps.api import create_api

    document = json.dumps(create_api().openapi(), indent=2, sort_keys=True) + "\n"
    if out is None:
        typer.echo(document, nl=False)
        return
    try:
        out.write_text(document)
    except OSError as exc:  # one line, no traceback: the path is the user's to fix
        typer.echo(f"error: --out {out}: {exc.strerror}; give a file in an existing, writable directory", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (`raytwin keys list`; the part after rtk_ of the key).")],
    keys_file: KEYS_FILE = Path("raytwin-keys.json"),
) -> None:
    """Remove a key: a running server refuses it from its next request (the file is rewritten atomically)."""
    try:
        record = revoke_key(existing_keys_file(keys_file), key_id)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None
    typer.echo(f"revoked {record.key_id} ({record.tenant} {record.role})")


@keys_app.command("set-owner")
def keys_set_owner(
    key_id: Annotated[str, typer.Argument(help="The key's id (`raytwin keys list`; the part after rtk_ of the key).")],
    owner: Annotated[str, typer.Option(help="The person who holds the key (e.g. alice): the owner their other keys "
                                            "have.")],
    keys_file: KEYS_FILE = Path("raytwin-keys.json"),
) -> None:
    """Name the holder of a key stored without an owner (audited): it may approve from then on, and what it did so
    far is its owner's for four eyes. A key that has an owner keeps it (another person gets a key of their own)."""
    try:
        record = set_key_owner(existing_keys_file(keys_file), key_id, owner)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None
    except KeyChangeRefused as exc:
        raise typer.BadParameter(str(exc)) from None
    except ValidationError as exc:
        raise typer.BadParameter(describe_error(exc), param_hint="--owner") from None
    typer.echo(f"key {record.key_id} ({record.tenant} {record.role}) is held by {record.owner}")


@keys_app.command("list")
def keys_list(keys_file: KEYS_FILE = Path("raytwin-keys.json")) -> None:
    """Show key ids, tenants, roles, grants, owners and revocations (never hashes): a revoked key is kept, without
    its hash, so that who held it can still be told."""
    for record in load_keys(existing_keys_file(keys_file)):
        revoked = f"\trevoked {record.revoked.isoformat()}" if isinstance(record, RevokedKey) else ""
        typer.echo(f"{record.key_id}\t{record.tenant}\t{record.role}\t{','.join(record.grants) or '-'}\t"
                   f"{record.owner or '-'}{revoked}")


@jobs_app.command("list")
def jobs_list(
    store: Annotated[str, typer.Option(envvar="RAYTWIN_SERVE_STORE_URL", help="Store URL (dir or s3://...).")],
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's jobs.")] = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state: queued, running, succeeded, failed, "
                                              "cancelled.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest this many.")] = 100,
) -> None:
    """Every tenant's jobs as their records on the store say (a running service writes each change there), newest
    first, one JSON record a line: who submitted it (tenant, key_id), its state and times, its error. For an
    operator (it reads the store, no API key); a tenant lists its own with `GET /v1/jobs`."""
    from raytwin.storage import filesystem
    from raytwin.store_failures import store_io
    from serve_apps.job_listing import select
    from serve_apps.jobs import JOB_STATES, read_records

    if state is not None and state not in JOB_STATES:
        raise typer.BadParameter(f"unknown state {state!r}; one of {', '.join(JOB_STATES)}", param_hint="--state")
    fs, root = filesystem(store.rstrip("/") + "/jobs")
    with store_io("read"):  # a mistyped --store listed no jobs, as if the service had none
        served = fs.exists(root) or fs.exists(f"{store.rstrip('/')}/twins/lease.json")
    if not served:
        raise typer.BadParameter(f"no service store at {store} (neither jobs/ nor twins/lease.json in it): give the "
                                 "store `raytwin serve --store` runs on", param_hint="--store")
    records = (r for r in read_records(fs, root) if tenant is None or r.tenant == tenant)
    shown, more = select(records, state, limit)
    for record in shown:
        typer.echo(record.model_dump_json(exclude={"quantiles"}))
    if more is not None:
        typer.echo(f"(the newest {limit} shown; more with --limit)", err=True)
