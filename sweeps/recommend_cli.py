"""Command line: ``raytwin recommend run SPEC`` and ``raytwin recommend show RUN_ID`` on this machine
(`sweeps.recommend`); ``ask``, ``get`` and ``issue`` through the HTTP API, where keys, tenants, the
twins' live state, approval and the audit log live (issuing proposes a command; another key approves it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from client.cli_support import API_KEY, API_URL, remote, show
from sweeps.cli import RunsOption, _load, _setup_logging, _sigterm_recorded

if TYPE_CHECKING:
    from sweeps.recommend import Recommendation

AsJson = Annotated[bool, typer.Option("--json", help="The whole recommendation as JSON.")]

recommend_app = typer.Typer(help="Recommended actions: optimise a control schedule under bounds.",
                            no_args_is_help=True)


def _describe(answer: Recommendation) -> str:
    """The answer in a few lines; a best effort's warning first (its plan leaves a band), and how old its state is."""
    band = answer.change_pct_band
    values = ", ".join(f"{v:.4g}" for v in answer.action.values[:24])
    more = " ..." if len(answer.action.values) > 24 else ""
    bounds = ", ".join(f"{b.metric} {answer.baseline[b.metric]:g} -> {answer.recommended[b.metric]:g} s"
                       for b in answer.constraints)
    objective = answer.objective
    lines = [f"{objective}: {answer.baseline[objective]:.6g} -> {answer.recommended[objective]:.6g} "
             f"({answer.change_pct:+.1f} %; 90 % band {band.q05:+.1f} .. {band.q95:+.1f} %, {answer.uncertainty})",
             f"bounds: {bounds or 'none'}; ensemble members keeping every band: {answer.feasible_fraction:.0%}",
             f"{answer.action.input} [{answer.action.unit}] every {answer.action.block_s:g} s: {values}{more}"]
    if answer.status == "best_effort":
        lines.insert(0, "BEST EFFORT, the bands are not met (the plan only gets closer to them than the baseline): "
                     + "; ".join(v.describe(answer.horizon_s) for v in answer.violations))
    if answer.start_time is not None:
        lines.append(f"from the state at {answer.start_time.isoformat()}")
    return "\n".join(lines)


@recommend_app.command("run")
def recommend_run(
    spec: Annotated[Path, typer.Argument(help="RecommendSpec as JSON or YAML.")],
    runs: RunsOption = "./runs",
) -> None:
    """Optimise, record the run and print the recommendation with its run id."""
    from sweeps.recommend import RecommendError, RecommendSpec, recorded_recommendation
    from sweeps.runs import RunError

    _setup_logging()
    parsed = _load(spec, RecommendSpec)
    try:
        with _sigterm_recorded():
            record, answer = recorded_recommendation(parsed, runs=runs)
    except (RecommendError, RunError) as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"run {record.run_id}: {parsed.method} search in {record.summary['optimiser_s']} s")
    typer.echo(_describe(answer))


@recommend_app.command("show")
def recommend_show(
    run_id: Annotated[str, typer.Argument(help="A recommendation run id.")],
    runs: RunsOption = "./runs",
    as_json: AsJson = False,
) -> None:
    """Print a recorded recommendation."""
    from sweeps.recommend import load_recommendation
    from sweeps.runs import RunError

    try:
        answer = load_recommendation(run_id, runs=runs)
    except RunError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(answer.model_dump_json(indent=2) if as_json else _describe(answer))


def _print(answer: Recommendation, as_json: bool) -> None:
    typer.echo(answer.model_dump_json(indent=2) if as_json else f"recommendation {answer.run_id}\n{_describe(answer)}")


@recommend_app.command("ask")
def recommend_ask(
    asset_id: Annotated[str, typer.Argument(help="The asset whose twin's state the search starts from.")],
    request: Annotated[Path, typer.Argument(help="A RecommendationRequest as JSON or YAML (serve_apps/README.md, "
                                                 "\"Recommended actions\").")],
    url: API_URL, key: API_KEY, as_json: AsJson = False,
) -> None:
    """Through the API (a writer key): optimise the asset's control schedule from its twin's live state;
    the answer is a recorded run, audited."""
    from serve_apps.routes_recommendations import RecommendationRequest

    body = _load(request, RecommendationRequest)
    with remote(url, key) as api:
        _print(api.recommend(asset_id, body), as_json)


@recommend_app.command("get")
def recommend_get(asset_id: str, recommendation_id: str, url: API_URL, key: API_KEY, as_json: AsJson = False) -> None:
    """Through the API: a recommendation of the key's tenant for this asset."""
    with remote(url, key) as api:
        _print(api.recommendation(asset_id, recommendation_id), as_json)


@recommend_app.command("issue")
def recommend_issue(
    asset_id: str, recommendation_id: str,
    connector: Annotated[str, typer.Option(help="The connector that reaches the asset.")],
    url: API_URL, key: API_KEY,
    name: Annotated[str, typer.Option(help="The command's name at the asset.")] = "schedule",
    first_block: Annotated[bool, typer.Option(
        "--first-block", help="Send the first block's value alone (a command that takes one value: an OPC UA "
        "node), not the whole schedule.")] = False,
) -> None:
    """Through the API: propose the recommended schedule as a command to the asset. Nothing is sent until
    another key with the approver grant approves it (`raytwin connectors commands approve ID`)."""
    with remote(url, key) as api:
        show(api.issue_recommendation(asset_id, recommendation_id, connector=connector, name=name,
                                      part="first_block" if first_block else "schedule"))
