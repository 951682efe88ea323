"""What the `raytwin` commands that call the HTTP API share: the `--api-url`/`--api-key` options and a
client whose errors end the command with one clear line on stderr and exit code 1.

Every such command goes through `RayTwinClient`, so it gets the API's authentication, retries on
429/503 and error mapping like any other client, and changes state only with a key (audited).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from pydantic import TypeAdapter

from client.errors import (ApiError, InvalidArgument, OutcomeUnknown, RayTwinError, UnexpectedAnswer,
                           Unreachable)
from client.sync import RayTwinClient

API_URL = Annotated[str, typer.Option("--api-url", "--url", envvar="RAYTWIN_API_URL",
                                      help="The RayTwin API's base URL.")]
API_KEY = Annotated[str, typer.Option("--api-key", "--key", envvar="RAYTWIN_API_KEY",
                                      help="An API key (better: the environment variable, out of shell history).")]
TIMEOUT_S = 120.0  # creating a connector waits for it to start
_JSON = TypeAdapter(Any)


@contextmanager
def remote(url: str, key: str) -> Iterator[RayTwinClient]:
    """A client for one command. An API error prints ``error <status> <code>: <message> (request_id ...)``,
    an answer that does not fit the client's contract says so, no answer at all prints where it tried, a write
    whose answer was lost says how to check whether it took effect; each exits with code 1. An argument the
    client refuses before sending is a usage error (code 2)."""
    try:
        with RayTwinClient(url.rstrip("/"), key, timeout=TIMEOUT_S) as api:
            yield api
    except InvalidArgument as exc:
        raise typer.BadParameter(str(exc)) from None
    except Unreachable as exc:
        typer.echo(f"error: no answer from {url} ({exc}); check --api-url or RAYTWIN_API_URL", err=True)
        raise typer.Exit(1) from None
    except OutcomeUnknown as exc:  # an answer was lost: its message says how to check, not a wrong URL
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (ApiError, UnexpectedAnswer) as exc:
        typer.echo(f"error {exc}", err=True)
        raise typer.Exit(1) from None
    except RayTwinError as exc:
        typer.echo(f"error: no answer from {url} ({exc}); check --api-url or RAYTWIN_API_URL", err=True)
        raise typer.Exit(1) from None


def show(value: Any) -> None:
    """Print an answer (a pydantic model, a list of them, or plain JSON) as indented, sorted JSON."""
    typer.echo(json.dumps(_JSON.dump_python(value, mode="json"), indent=2, sort_keys=True))


def json_object(text: str, what: str) -> dict[str, Any]:
    """A JSON object given on the command line, or a BadParameter that says what was expected."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{what} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{what} must be a JSON object, got {type(value).__name__}")
    return value
