"""`raytwin recalibration ...`: the tenant's drift recalibration policies and what they launched,
through the HTTP API (a policy is set with an admin key and audited)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError

from client.cli_support import API_KEY, API_URL, remote, show
from raytwin.contracts import describe_error
from raytwin.recalibration import RecalibrationPolicy

recalibration_app = typer.Typer(help="Drift recalibration through the API: policies per asset type, and the "
                                     "calibrations they launched.", no_args_is_help=True)
policy_app = typer.Typer(help="When a latched drift alarm launches a calibration, and its budget.",
                         no_args_is_help=True)
recalibration_app.add_typer(policy_app, name="policy")


@policy_app.command("get")
def get_policy(type_name: str, url: API_URL, key: API_KEY) -> None:
    """The policy for an asset type (exit 1, `not_found`: none set)."""
    with remote(url, key) as api:
        show(api.recalibration_policy(type_name))


@policy_app.command("set")
def set_policy(
    type_name: str,
    path: Annotated[Path, typer.Argument(help="The policy (YAML or JSON): `free` parameters, budget, cooldown.")],
    url: API_URL, key: API_KEY,
) -> None:
    """Set the policy for an asset type (an admin key); every version of the type must have its parameters."""
    try:
        policy = RecalibrationPolicy.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as exc:
        raise typer.BadParameter(f"{path}: {describe_error(exc)}") from None
    with remote(url, key) as api:
        show(api.set_recalibration_policy(type_name, policy))


@recalibration_app.command("list")
def list_recalibrations(url: API_URL, key: API_KEY) -> None:
    """Pending triggers, running and recently finished recalibrations of the key's tenant."""
    with remote(url, key) as api:
        show(api.recalibrations())
