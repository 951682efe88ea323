"""`raytwin shadow ...`: shadow evaluation of a candidate model version beside production on live twins,
through the HTTP API."""

from __future__ import annotations

from typing import Annotated

import typer

from client.cli_support import API_KEY, API_URL, remote, show

shadow_app = typer.Typer(help="Shadow evaluation: score a candidate or staging model version beside production "
                              "on live events, without changing what the twins serve.", no_args_is_help=True)


@shadow_app.command()
def start(
    model: str, version: str, url: API_URL, key: API_KEY,
    events: Annotated[int, typer.Option(min=1, help="Events to score per twin before concluding.")],
    asset_id: Annotated[list[str] | None, typer.Option(help="A twin to shadow (repeat for more).")] = None,
    sample: Annotated[int | None, typer.Option(min=1, help="Or: this many of the model's twins (a stable pick).")
                      ] = None,
) -> None:
    """Start an evaluation of MODEL@VERSION on the named twins or a sample of them."""
    from serve_apps.routes_shadow import ShadowRequest  # a route module (FastAPI, Ray): loaded only here

    from pydantic import ValidationError

    from raytwin.contracts import describe_error

    if bool(asset_id) == (sample is not None):
        raise typer.BadParameter("give either --asset-id (one or more) or --sample")
    try:
        request = ShadowRequest(asset_ids=asset_id or None, sample=sample, events=events)
    except ValidationError as exc:  # beyond the API's bounds: one line, as the API would answer
        raise typer.BadParameter(describe_error(exc)) from None
    with remote(url, key) as api:
        show(api.start_shadow(model, version, request))


@shadow_app.command()
def status(model: str, version: str, url: API_URL, key: API_KEY) -> None:
    """Production against the candidate so far; once done, the evidence recorded on the lifecycle log."""
    with remote(url, key) as api:
        show(api.shadow(model, version))


@shadow_app.command()
def stop(model: str, version: str, url: API_URL, key: API_KEY) -> None:
    """End the evaluation of MODEL@VERSION."""
    with remote(url, key) as api:
        api.stop_shadow(model, version)
    typer.echo(f"stopped the shadow evaluation of {model}@{version}")
