"""`raytwin serve ...`: start the HTTP API on Ray, manage API keys, export the OpenAPI document."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from serve_apps.auth import RoleName, create_key

serve_app = typer.Typer(help="The RayTwin HTTP API on Ray Serve.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed in the keys file).", no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")

KEYS_FILE = Annotated[Path, typer.Option(envvar="RAYTWIN_API_KEYS_FILE", help="API keys file (JSON).")]


@serve_app.command("start")
def start(
    store: Annotated[str, typer.Option(envvar="RAYTWIN_SERVE_STORE_URL", help="Store URL (dir or s3://...).")],
    keys_file: KEYS_FILE,
    host: Annotated[str, typer.Option(help="HTTP bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    min_replicas: Annotated[int, typer.Option(help="Ingress autoscaling: fewest replicas.")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Ingress autoscaling: most replicas.")] = 4,
    target_ongoing_requests: Annotated[float, typer.Option(help="Ingress autoscaling target per replica.")] = 8.0,
    config: Annotated[Path | None, typer.Option(help="JSON file with more ServeConfig fields.")] = None,
    block: Annotated[bool, typer.Option(help="Keep running until Ctrl-C.")] = True,
) -> None:
    """Start the API on Ray Serve at http://HOST:PORT (routes under /v1, docs at /docs)."""
    import ray
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.config import ServeConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = json.loads(config.read_text()) if config else {}
    args.update(store_url=store, keys_file=str(keys_file.resolve()), autoscaling={
        **args.get("autoscaling", {}), "min_replicas": min_replicas, "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
    })
    settings = ServeConfig.from_args(args)
    if not ray.is_initialized():
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name="raytwin", route_prefix="/")
    typer.echo(f"RayTwin API at http://{host}:{port}/v1 (OpenAPI: /docs, metrics: /metrics)")
    if not block:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        typer.echo("stopped")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    role: Annotated[RoleName, typer.Option(help="reader | writer | admin.")],
    keys_file: KEYS_FILE = Path("raytwin-keys.json"),
) -> None:
    """Create a key: prints it ONCE (only its SHA-256 is stored in the keys file)."""
    record, key = create_key(keys_file, tenant, role)
    typer.echo(key)
    typer.echo(f"key_id={record.key_id} tenant={record.tenant} role={record.role} file={keys_file}", err=True)


@serve_app.command("openapi")
def openapi(out: Annotated[Path, typer.Option(help="Where to write the document.")] = Path("serve_apps/openapi.json")
            ) -> None:
    """Write the OpenAPI document of the API (committed as serve_apps/openapi.json)."""
    from serve_apps.api import create_api

    out.write_text(json.dumps(create_api().openapi(), indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {out}")
