"""`raytwin connectors ...`: check declarations offline; create, inspect, pause and resume connectors and
propose, approve and list commands through the HTTP API.

Everything that changes state goes through the API, with an API key: the same authentication,
tenant, roles and audit log as any other client. A password is read from an environment variable
(`--password-env`), never from the command line, where shell history and process lists keep it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml

connectors_app = typer.Typer(help="Connectors to device protocols (MQTT) and commands back to assets.",
                             no_args_is_help=True)
commands_app = typer.Typer(help="Commands to assets: propose, approve (sends once), list with acknowledgements.",
                           no_args_is_help=True)
connectors_app.add_typer(commands_app, name="commands")

API_URL = Annotated[str, typer.Option("--api-url", envvar="RAYTWIN_API_URL", help="The RayTwin API's base URL.")]
API_KEY = Annotated[str, typer.Option("--api-key", envvar="RAYTWIN_API_KEY", help="An API key (better: the env var).")]


def _declaration(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: expected one connector declaration (a mapping), got {type(data).__name__}")
    return data


def _call(url: str, key: str, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
    with httpx.Client(base_url=url.rstrip("/"), timeout=120.0, headers={"Authorization": f"Bearer {key}"}) as http:
        r = http.request(method, path, json=body, params=params)
    if r.status_code >= 400:
        try:
            error = r.json()["error"]
            typer.echo(f"error {r.status_code} {error['code']}: {error['message']}", err=True)
        except (ValueError, KeyError, TypeError):
            typer.echo(f"error {r.status_code}: {r.text[:500]}", err=True)
        raise typer.Exit(1)
    return r.json() if r.content else None


def _show(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


@connectors_app.command()
def check(path: Annotated[Path, typer.Argument(help="A connector declaration (YAML or JSON).")]) -> None:
    """Validate a declaration offline (its kind's schema; the assets are checked when it is created)."""
    from pydantic import ValidationError

    from connectors.kinds import UnknownKind, parse_spec
    from raytwin.contracts import describe_error

    data = {"tenant": "check", **_declaration(path)}
    try:
        spec = parse_spec(data)
    except ValidationError as exc:
        typer.echo(f"{path}: {describe_error(exc)}", err=True)
        raise typer.Exit(1) from None
    except UnknownKind as exc:
        typer.echo(f"{path}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{path}: ok ({spec.kind} connector {spec.name!r}, {len(getattr(spec, 'routes', []))} route(s))")


@connectors_app.command()
def create(
    path: Annotated[Path, typer.Argument(help="A connector declaration (YAML or JSON); its tenant is the key's.")],
    url: API_URL, key: API_KEY,
    username: Annotated[str | None, typer.Option(help="Username for the source (e.g. the MQTT broker).")] = None,
    password_env: Annotated[str | None, typer.Option(help="Environment variable holding the password.")] = None,
) -> None:
    """Create (or replace) a connector and start it; credentials are sent once and never shown again."""
    credentials: dict[str, str] | None = None
    if username or password_env:
        if password_env and password_env not in os.environ:
            raise typer.BadParameter(f"environment variable {password_env} is not set")
        credentials = {"username": username, "password": os.environ[password_env] if password_env else None}
    spec = {k: v for k, v in _declaration(path).items() if k != "tenant"}
    _show(_call(url, key, "POST", "/v1/connectors", {"spec": spec, "credentials": credentials}))


@connectors_app.command("list")
def list_connectors(url: API_URL, key: API_KEY) -> None:
    """Every connector of the key's tenant with its status."""
    for s in _call(url, key, "GET", "/v1/connectors"):
        lag = "-" if s["lag_s"] is None else f"{s['lag_s']:.1f}s"
        typer.echo(f"{s['name']}\t{s['kind']}\t{s['state']}\tconnected={s['connected']}\tpending={s['pending']}\t"
                   f"lag={lag}\terrors={s['errors']}\tdead_lettered={s['dead_lettered']}")


@connectors_app.command()
def status(name: str, url: API_URL, key: API_KEY) -> None:
    """A connector's declaration (no credentials) and status."""
    _show(_call(url, key, "GET", f"/v1/connectors/{name}"))


@connectors_app.command()
def pause(name: str, url: API_URL, key: API_KEY) -> None:
    """Stop receiving; the source keeps what arrives meanwhile."""
    _show(_call(url, key, "POST", f"/v1/connectors/{name}/pause"))


@connectors_app.command()
def resume(name: str, url: API_URL, key: API_KEY) -> None:
    """Receive again, starting with what the source kept meanwhile."""
    _show(_call(url, key, "POST", f"/v1/connectors/{name}/resume"))


@connectors_app.command()
def delete(name: str, url: API_URL, key: API_KEY) -> None:
    """Stop the connector and remove its declaration and credentials (its commands' records stay)."""
    _call(url, key, "DELETE", f"/v1/connectors/{name}")
    typer.echo(f"deleted {name}")


@commands_app.command()
def propose(
    connector: str, asset_id: str, name: str,
    value: Annotated[str, typer.Argument(help='JSON object of arguments, e.g. \'{"q_in": 0.2}\'.')],
    url: API_URL, key: API_KEY,
) -> None:
    """Propose a command (nothing is sent before another key approves it)."""
    try:
        args = json.loads(value)
    except ValueError as exc:
        raise typer.BadParameter(f"VALUE must be a JSON object: {exc}") from None
    _show(_call(url, key, "POST", "/v1/commands",
                {"connector": connector, "asset_id": asset_id, "name": name, "value": args}))


@commands_app.command()
def approve(command_id: str, url: API_URL, key: API_KEY) -> None:
    """Approve and send once (an admin key other than the proposer's)."""
    _show(_call(url, key, "POST", f"/v1/commands/{command_id}/approve"))


@commands_app.command("list")
def list_commands(url: API_URL, key: API_KEY,
                  asset_id: Annotated[str | None, typer.Option(help="Only this asset's.")] = None) -> None:
    """The tenant's commands with status, correlation id and acknowledgement."""
    for c in _call(url, key, "GET", "/v1/commands", params={"asset_id": asset_id} if asset_id else None):
        shown = ("id", "asset_id", "name", "value", "status", "correlation_id", "ack")
        typer.echo(json.dumps({k: c[k] for k in shown}))
