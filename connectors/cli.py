"""`raytwin connectors ...`: check declarations offline; create, inspect, pause and resume connectors and
propose, approve, refuse and list commands through the HTTP API (`client.RayTwinClient`).

Everything that changes state goes through the API, with an API key: the same authentication,
tenant, roles and audit log as any other client. A password is read from an environment variable
(`--password-env`), never from the command line, where shell history and process lists keep it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from client.cli_support import API_KEY, API_URL, json_object, remote, show
from connectors.spec import Credentials

connectors_app = typer.Typer(help="Connectors to device protocols (MQTT, OPC UA) and commands back to assets.",
                             no_args_is_help=True)
commands_app = typer.Typer(help="Commands to assets: propose, approve (sends once), list with acknowledgements.",
                           no_args_is_help=True)
connectors_app.add_typer(commands_app, name="commands")
_LISTED = {"id", "asset_id", "name", "value", "status", "correlation_id", "ack"}  # a command's line in `list`


def _declaration(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise typer.BadParameter(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:  # one line: where the file stops being YAML
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise typer.BadParameter(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: expected one connector declaration (a mapping), got {type(data).__name__}")
    return data


@connectors_app.command()
def check(path: Annotated[Path, typer.Argument(help="A connector declaration (YAML or JSON).")]) -> None:
    """Validate a declaration offline (its kind's schema; its assets and their measurements are checked when it is
    created). Files named by a path are a warning: `create` (the API) takes names of the tenant's TLS directory."""
    from pydantic import ValidationError

    from connectors.kinds import UnknownKind, parse_spec
    from connectors.tenant_files import FILE_NAME
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
    for field, value in spec.files().items():
        if not FILE_NAME.fullmatch(value):
            typer.echo(f"{path}: warning: {field} {value!r} is a path: a connector created through the API (`raytwin "
                       "connectors create`) names a file of its tenant's TLS directory by its name alone (e.g. "
                       f"{field} {value.rsplit('/', 1)[-1]!r}), which the service's operator places there "
                       "(ServeConfig.connector_tls_dir); paths are for connectors the operator declares in the service "
                       "config", err=True)
    typer.echo(f"{path}: ok ({spec.describe()})")


@connectors_app.command()
def create(
    path: Annotated[Path, typer.Argument(help="A connector declaration (YAML or JSON); its tenant is the key's.")],
    url: API_URL, key: API_KEY,
    username: Annotated[str | None, typer.Option(help="Username for the source (e.g. the MQTT broker).")] = None,
    password_env: Annotated[str | None, typer.Option(help="Environment variable holding the password.")] = None,
) -> None:
    """Create (or replace) a connector and start it; credentials are sent once and never shown again."""
    credentials = None
    if username or password_env:
        if password_env and password_env not in os.environ:
            raise typer.BadParameter(f"environment variable {password_env} is not set")
        credentials = Credentials(username=username, password=os.environ[password_env] if password_env else None)
    with remote(url, key) as api:
        show(api.create_connector(_declaration(path), credentials))


@connectors_app.command("list")
def list_connectors(url: API_URL, key: API_KEY) -> None:
    """Every connector of the key's tenant with its status: `rejected` beside `dead_lettered`, as the readings the
    twins refused are in its dead letters too (`GET /v1/connectors/{name}/dead-letters` lists both)."""
    with remote(url, key) as api:
        for s in api.iter_connectors():
            lag, age = ("-" if v is None else f"{v:.1f}s" for v in (s.lag_s, s.event_age_s))
            typer.echo(f"{s.name}\t{s.kind}\t{s.state}\tconnected={s.connected}\tpending={s.pending}\t"
                       f"lag={lag}\tevent_age={age}\terrors={s.errors}\trejected={s.rejected}\t"
                       f"dead_lettered={s.dead_lettered}")


@connectors_app.command()
def status(name: str, url: API_URL, key: API_KEY) -> None:
    """A connector's declaration (no credentials) and status."""
    with remote(url, key) as api:
        show(api.connector(name))


@connectors_app.command()
def pause(name: str, url: API_URL, key: API_KEY) -> None:
    """Stop receiving; the source keeps what arrives meanwhile (an MQTT broker what is published at QoS 1 or 2, an
    OPC UA server up to queue_size changes per node)."""
    with remote(url, key) as api:
        show(api.pause_connector(name))


@connectors_app.command()
def resume(name: str, url: API_URL, key: API_KEY) -> None:
    """Receive again, starting with what the source kept meanwhile."""
    with remote(url, key) as api:
        show(api.resume_connector(name))


@connectors_app.command()
def delete(name: str, url: API_URL, key: API_KEY) -> None:
    """Stop the connector and remove its declaration and credentials (its commands' records stay)."""
    with remote(url, key) as api:
        api.delete_connector(name)
    typer.echo(f"deleted {name}")


@commands_app.command()
def propose(
    connector: str, asset_id: str, name: str,
    value: Annotated[str, typer.Argument(help='JSON object of arguments, e.g. \'{"q_in": 0.2}\'.')],
    url: API_URL, key: API_KEY,
) -> None:
    """Propose a command (nothing is sent before another key approves it)."""
    args = json_object(value, "VALUE")
    with remote(url, key) as api:
        show(api.propose_command(connector, asset_id, name, args))


@commands_app.command()
def approve(command_id: str, url: API_URL, key: API_KEY) -> None:
    """Approve and send once (an admin key other than the proposer's)."""
    with remote(url, key) as api:
        show(api.approve_command(command_id))


@commands_app.command("list")
def list_commands(url: API_URL, key: API_KEY,
                  asset_id: Annotated[str | None, typer.Option(help="Only this asset's.")] = None) -> None:
    """The tenant's commands with status, correlation id and acknowledgement."""
    with remote(url, key) as api:
        for c in api.iter_commands(asset_id):
            typer.echo(c.model_dump_json(include=_LISTED))


@commands_app.command()
def refuse(command_id: str, url: API_URL, key: API_KEY,
           reason: Annotated[str, typer.Option(help="Why (kept on the command and in the audit log).")]) -> None:
    """Refuse a proposed command: it is never sent (an admin key)."""
    with remote(url, key) as api:
        show(api.refuse_command(command_id, reason))


@commands_app.command("status")
def command_status(command_id: str, url: API_URL, key: API_KEY) -> None:
    """One command with its history and the asset's acknowledgement."""
    with remote(url, key) as api:
        show(api.command(command_id))
