"""``raytwin registry``: model versions through their lifecycle, the transition log and its check, retention.

The CLI writes the store with the caller's own storage credentials and records the actor it is told
(``--actor``, default ``$RAYTWIN_USER`` or the login name) with the roles it is given (``--role approver``):
whoever may write the store may act here, and nothing checks who they say they are. Identities checked against
API keys are the HTTP API's (`serve_apps/README.md`, "Model lifecycle").

So every change it makes (a transition, a rollback, a prune, a policy set) is audited as the API audits the same act,
in the tenant's audit log (`raytwin.audit`) and in the same two steps: its intent before it acts (a store that does
not take it: nothing is done) and its outcome after. Its records read ``key_id``/``role`` ``offline-cli`` and name,
under ``details.principal``, the declared actor and roles marked ``verified: false`` beside the OS user and host that
ran the command: an auditor tells them from an API key's acts. The log is the one of the `raytwin serve` store the
registry lies in (``{store}/audit/{tenant}`` for ``{store}/registry/{tenant}``), else of ``--audit-store``, else
the registry's own (``{registry}/audit/{tenant}``): ``GET /v1/audit`` answers it once a service runs on the store,
`raytwin.audit.AuditLog` reads it offline.

Its transitions check what the API's check (`raytwin.lifecycle`): the four-eyes rule, evidence the caller gives
(``--run`` ids must be the tenant's runs of the model, looked up under ``--runs`` or the served store's
``{store}/runs/{tenant}``; shadow metrics are the system's, so ``--metric`` is refused) and a promotion of a version
fitted on some twins' telemetry while others run the model (``--fleet`` says they share it, and is audited).

Commands that change a lifecycle refuse a registry whose store a running service holds (`raytwin serve`'s
layout, ``{store}/registry/{tenant}`` beside ``{store}/twins``, whose lease its shards renew): there the
service must be the one writer, since a promotion, rollback or archive swaps its twins, every change goes
to its tenant's audit log under an API key's identity, and retention keeps the versions its twins run.
Each refusal names the HTTP route to use instead; a store no service holds (offline work) is theirs. To
tell, such a command watches the lease heartbeat on its own clock (`StateStore.live_holder`): about 2 s for
a served store, none for a store no lease holds, 6 s after a service that crashed without releasing it.
"""

from __future__ import annotations

import getpass
import os
import unicodedata
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from raytwin.audit import AuditLog, AuditRecord
    from raytwin.lifecycle import Actor, Evidence, ModelLifecycle, PruneReport, TransitionRecord

registry_app = typer.Typer(no_args_is_help=True)
T = TypeVar("T")

Registry = Annotated[str, typer.Option("--registry", envvar="RAYTWIN_REGISTRY_URL",
                                       help="The model registry: a directory or fsspec URL.")]
Tenant = Annotated[str, typer.Option("--tenant", envvar="RAYTWIN_TENANT", help="The actor's tenant.")]
ActorId = Annotated[str | None, typer.Option("--actor", help="Who acts (default: $RAYTWIN_USER, else the login).")]
Roles = Annotated[list[str] | None, typer.Option("--role", help="A role of the actor, e.g. approver (repeatable).")]
Reason = Annotated[str, typer.Option("--reason", help="Why (recorded in the transition log).")]
Runs = Annotated[list[str] | None, typer.Option("--run", help="A run id as evidence (repeatable).")]
FitReport = Annotated[str | None, typer.Option("--fit-report", help="URL of a fit report as evidence.")]
Metrics = Annotated[list[str] | None, typer.Option("--metric", help=(
    "A shadow metric NAME=VALUE: refused, as the API refuses it (a shadow evaluation records them, not a caller)."))]
AuditStore = Annotated[str | None, typer.Option("--audit-store", envvar="RAYTWIN_AUDIT_STORE_URL", help=(
    "The store whose tenant audit log records this command's change (default: the `raytwin serve` store of a "
    "{store}/registry/{tenant} registry, else the registry itself)."))]
RunsRoot = Annotated[str | None, typer.Option("--runs", help=(
    "Run records the --run evidence is looked up in (default: {store}/runs/{tenant} of a `raytwin serve` store)."))]
Fleet = Annotated[bool, typer.Option("--fleet", help=(
    "promote: a version a drift recalibration fitted on some twins' telemetry although other twins run the model "
    "(they share its parameters); audited."))]


def _print_pruned(report: PruneReport) -> None:
    typer.echo(f"removed versions: {', '.join(report.versions_removed) or 'none'}; "
               f"removed runs: {', '.join(report.runs_removed) or 'none'}")


def _run(call: Callable[[], T]) -> T:
    """`call()`, or exit 1 with the one-line reason of a refused request."""
    from pydantic import ValidationError

    from raytwin.contracts import describe_error
    from raytwin.registry import RegistryError

    try:
        return call()
    except RegistryError as exc:
        typer.echo(f"error: {exc.located()}", err=True)
        raise typer.Exit(1) from None
    except ValidationError as exc:
        typer.echo(f"error: {describe_error(exc)}", err=True)
        raise typer.Exit(2) from None


def _lifecycle(registry: str):
    from raytwin.lifecycle import ModelLifecycle
    from raytwin.registry import ModelRegistry

    return ModelLifecycle(ModelRegistry(registry))


def _known(registry: str, model: str) -> ModelLifecycle:
    """The lifecycle of `model` in `registry`, or exit 1 naming both: a model the registry does not know (a typo
    in either) has an empty log, which `verify` passed as "ok" and `status` showed as a model without production,
    where the API answers 404."""
    from raytwin.store_failures import store_io

    lc = _lifecycle(registry)
    if not store_io("read")(lc.exists)(model):
        typer.echo(f"error: no model {model} in registry {registry}: check the model's name and --registry "
                   f"(RAYTWIN_REGISTRY_URL){_tenant_registries_hint(registry, model)}", err=True)
        raise typer.Exit(1)
    return lc


def _tenant_registries_hint(registry: str, model: str) -> str:
    """Where `registry` is a served store's `registry/` folder, which holds one registry per tenant, the tenants'
    registries that know `model` (the runbook's store path one folder short is the likely slip); else ""."""
    from raytwin.storage import filesystem

    fs, root = filesystem(registry)
    tenants = sorted(path.rstrip("/").split("/")[-3] for path in fs.glob(f"{root.rstrip('/')}/*/models/{model}"))
    if not tenants:
        return ""
    return (f"; a served store keeps one registry per tenant, {registry.rstrip('/')}/TENANT: "
            + ", ".join(f"--registry {registry.rstrip('/')}/{tenant}" for tenant in tenants))


def _served_store(registry: str) -> tuple[str, str] | None:
    """The `raytwin serve` store a registry lies in and its tenant (``{store}/registry/{tenant}``); None for a
    registry laid out otherwise."""
    parent, sep, tenant = registry.rstrip("/").rpartition("/")
    root, sep2, name = parent.rpartition("/")
    return (root, tenant) if sep and sep2 and name == "registry" and tenant else None


def _twins_beside(registry: str) -> str | None:
    """The twin state store of the `raytwin serve` store a registry belongs to (``{store}/twins``)."""
    served = _served_store(registry)
    return None if served is None else f"{served[0]}/twins"


def _audited(registry: str, audit_store: str | None, who: Actor, action: str, target: str,
             **details: Any) -> AbstractContextManager[dict[str, Any]]:
    """`action` on `target` audited in two steps (`raytwin.audit.two_steps`, as the API's) in `who`'s tenant log of
    the store the registry lies in (`--audit-store`, else its `raytwin serve` store, else itself), as the offline
    CLI's act of an unverified, declared identity (`raytwin.audit.by_offline_cli`). A served store's registry of
    another tenant than ``--tenant`` is refused: its changes belong in that tenant's log."""
    from raytwin.audit import AuditLog, by_offline_cli, two_steps

    served = _served_store(registry)
    if served is not None and served[1] != who.tenant:
        typer.echo(f"error: registry {registry} is tenant {served[1]}'s (a `raytwin serve` store's "
                   f"{{store}}/registry/{{tenant}}), not {who.tenant}'s: give --tenant {served[1]}", err=True)
        raise typer.Exit(1)
    store = audit_store or (served[0] if served else registry)
    record = by_offline_cli(who.tenant, action, target, who.id, who.roles, details)
    return two_steps(AuditLog(store), record, _begin, _outcome_of)


def _begin(audit: AuditLog, record: AuditRecord) -> AuditRecord:
    """The intent of the act, written first; exit 1 without acting where the store does not take it."""
    from raytwin.audit import write_intent
    from raytwin.storage import scrub_locations

    try:
        return write_intent(audit, record)
    except Exception as exc:  # noqa: BLE001 - whatever it was, nothing may be done unaudited
        typer.echo(f"error: {record.action} of {record.target} was not done: its audit record could not be written "
                   f"first to {audit.root}/{record.tenant} ({scrub_locations(repr(exc))}); fix the store (or give "
                   "--audit-store) and run it again", err=True)
        raise typer.Exit(1) from None


def _outcome_of(exc: Exception) -> dict[str, Any]:
    """A refusal (the lifecycle's: four eyes, state, tenant) as refused with its reason; anything else an error."""
    from raytwin.audit import error_outcome, refused_outcome
    from raytwin.registry import RegistryError

    return refused_outcome(str(exc)) if isinstance(exc, RegistryError) else error_outcome(exc)


def _check_evidence(registry: str, runs: str | None, tenant: str, ref: str, evidence: Evidence) -> None:
    """Exit 1 for evidence the API would refuse too (`raytwin.lifecycle.check_given_evidence`): run ids are looked
    up under `runs`, else the served store's ``{store}/runs/{tenant}``; with neither, run ids are refused."""
    from raytwin.lifecycle import check_given_evidence, parse_ref, run_model_ref

    served = _served_store(registry)
    root = runs or (f"{served[0]}/runs/{tenant}" if served else None)
    if evidence.run_ids and root is None:
        typer.echo("error: --run evidence is checked against the tenant's run records: give --runs with the root "
                   "they lie under (a `raytwin serve` store's registry finds {store}/runs/{tenant} itself)", err=True)
        raise typer.Exit(1)

    def ran(run_id: str) -> str | None:
        return run_model_ref(root, None, tenant, run_id)  # type: ignore[arg-type]

    _run(lambda: check_given_evidence(evidence, parse_ref(ref)[0], ran))


def _check_partial_fit(lc: ModelLifecycle, registry: str, tenant: str, ref: str, fleet: bool) -> None:
    """Exit 1 for promoting a version fitted on some twins' telemetry while the store's other twins run the model,
    unless `fleet` (`raytwin.lifecycle.partial_fit_refusal`, as the API)."""
    from raytwin.lifecycle import parse_ref, partial_fit_refusal
    from raytwin.statestore import StateStore

    twins = _twins_beside(registry)
    if fleet or twins is None:
        return
    model = parse_ref(ref)[0]

    def running() -> set[str]:
        return {a for assets in StateStore(twins).model_versions(tenant, model).values() for a in assets}

    refusal = partial_fit_refusal(_run(lambda: lc.records(model)), ref, running, "give --fleet")
    if refusal is not None:
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(1)


def _refuse_if_served(registry: str, route: str, twins: str | None = None) -> None:
    """Exit 1, naming the HTTP `route` to use, if a running service holds the store of `registry` (or the
    twin store `twins`): a change made behind its back would not swap its twins nor reach its audit log."""
    from raytwin.statestore import StateStore

    twins = twins or _twins_beside(registry)
    lease = None if twins is None else StateStore(twins).live_holder()
    if lease is None:
        return
    typer.echo(f"error: registry {registry} belongs to a store that a running service holds (service {lease.owner}, "
               f"started by {lease.acquired_by} at {lease.acquired_at}; its shards renewed the lease while this "
               f"command watched it): change it through that service's HTTP API, {route}, which swaps its twins, "
               "audits the change and checks the caller's API key; this command changes a store no service holds "
               "(stop the service first for offline work)", err=True)
    raise typer.Exit(1)


def _actor(tenant: str, actor: str | None, roles: list[str] | None):
    from raytwin.lifecycle import Actor

    who = actor or os.environ.get("RAYTWIN_USER") or getpass.getuser()
    return _run(lambda: Actor(id=who, tenant=tenant, roles=frozenset(roles or ())))


def _evidence(runs: list[str] | None, fit_report: str | None, metrics: list[str] | None):
    from raytwin.lifecycle import Evidence

    values: dict[str, float] = {}
    for item in metrics or ():
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            values[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"--metric {item!r}: give NAME=NUMBER") from None
    return _run(lambda: Evidence(run_ids=runs or [], fit_report=fit_report, shadow_metrics=values))


def _print_record(r) -> None:
    moved = f"{r.from_stage or '-'} -> {r.to_stage}" + (f" (archived {r.displaced})" if r.displaced else "")
    typer.echo(f"{r.seq}\t{r.time.isoformat()}\t{r.action}\t{r.model}@{r.version}\t{moved}\t{_one_line(r.actor)}"
               f"{' (automatic)' if r.automatic else ''}\t{_one_line(r.reason)}")


def _one_line(text: str) -> str:
    """`text` as one field of a tab-separated line: control and format characters and line separators escaped
    (``\\n``, ``\\t``, ``\\u202e``). A reason is free text a writer key chooses: one with a newline and tabs
    printed a second line that read as another record (a promotion by an approver that never happened)."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
                   else c for c in text)


def _move(stage: str, doc: str) -> Callable[..., None]:
    def command(ref: Annotated[str, typer.Argument(help="name@version")], reason: Reason, registry: Registry,
                tenant: Tenant, actor: ActorId = None, role: Roles = None, run: Runs = None,
                fit_report: FitReport = None, metric: Metrics = None, runs: RunsRoot = None,
                audit_store: AuditStore = None, fleet: Fleet = False) -> None:
        from raytwin.lifecycle import ACTION_TO, audited_transition

        name, _, version = ref.partition("@")
        route = f'POST /v1/models/{name}/versions/{version}/transitions with {{"to": "{stage}"}}'
        _refuse_if_served(registry, route)
        lc, who, evidence = _lifecycle(registry), _actor(tenant, actor, role), _evidence(run, fit_report, metric)
        _check_evidence(registry, runs, tenant, ref, evidence)
        fleet = fleet and stage == "production"  # (only a promotion swaps the fleet)
        if stage == "production":
            _check_partial_fit(lc, registry, tenant, ref, fleet)

        action = f"model.{ACTION_TO[stage]}"  # type: ignore[index]

        def act() -> TransitionRecord:
            with _audited(registry, audit_store, who, action, ref, to_stage=stage,
                          **({"fleet": True} if fleet else {})) as outcome:
                record = lc.transition(ref, stage, who, reason, evidence)  # type: ignore[arg-type]
                outcome.update(audited_transition(record))
                return record

        _print_record(_run(act))

    command.__doc__ = doc
    return command


for _name, _stage, _doc in (
    ("submit", "candidate", "Enter a registered version as a candidate; the actor is its author."),
    ("stage", "staging", "Move a candidate to staging."),
    ("promote", "production", "Move a staging version to production (an approver who is not the author, or "
                              "the tenant's automatic promotion); the previous production version is archived."),
    ("archive", "archived", "Archive a version (a candidate, staging or production)."),
):
    registry_app.command(_name)(_move(_stage, _doc))


@registry_app.command("rollback")
def rollback(model: str, reason: Reason, registry: Registry, tenant: Tenant, actor: ActorId = None,
             role: Roles = None,
             from_version: Annotated[str | None, typer.Option(
                 "--from-version", help="Only if this version is production now: a rollback run twice (a retry, "
                                        "two operators on one incident) goes back one version, not two.")] = None,
             audit_store: AuditStore = None) -> None:
    """Return to the previous production version in one call (the current one is archived)."""
    from raytwin.lifecycle import audited_transition

    _refuse_if_served(registry, f"POST /v1/models/{model}/rollback")
    lc, who = _lifecycle(registry), _actor(tenant, actor, role)

    def act() -> TransitionRecord:
        with _audited(registry, audit_store, who, "model.rollback", model, from_version=from_version) as outcome:
            record = lc.rollback(model, who, reason, from_version=from_version)
            outcome.update(audited_transition(record))
            return record

    _print_record(_run(act))


@registry_app.command("status")
def status(model: str, registry: Registry) -> None:
    """Each version's stage, author and since when; the production version and the log's head hash."""
    lc = _known(registry, model)
    state = _run(lambda: lc.verify(model))
    for version in lc.registry.versions(model):
        s = state.versions.get(version)
        typer.echo(f"{model}@{version}\t{s.stage if s else 'candidate (not submitted)'}\t"
                   f"{s.author if s else '-'}\t{s.since.isoformat() if s else '-'}")
    typer.echo(f"production: {state.production or 'none'}; revision {state.revision}; head {state.head_hash}")


@registry_app.command("log")
def show_log(model: str, registry: Registry) -> None:
    """The model's transition records, oldest first."""
    lc = _known(registry, model)
    for r in _run(lambda: lc.records(model)):
        _print_record(r)


@registry_app.command("verify")
def verify(model: str, registry: Registry, expect_head: Annotated[str | None, typer.Option(
        help="The head hash noted earlier (e.g. by `status`): also catches records removed from the end.")] = None,
           ) -> None:
    """Check the hash chain of the model's transition log; exit 1 naming the first bad record."""
    lc = _known(registry, model)
    state = _run(lambda: lc.verify(model, expect_head))
    typer.echo(f"ok: {state.revision + 1} records, head {state.head_hash}")


@registry_app.command("prune")
def prune(model: str, registry: Registry, tenant: Tenant, runs: Annotated[str | None, typer.Option(
        "--runs", help="Runs root whose run records retention also applies to.")] = None,
          twins: Annotated[str | None, typer.Option(
              "--twins", help="State store of the twins that run this registry's models (default: {store}/twins "
                              "beside a `raytwin serve` store's {store}/registry/{tenant}).")] = None,
          actor: ActorId = None, role: Roles = None, audit_store: AuditStore = None) -> None:
    """Apply the tenant's retention: the last K archived versions and run records are kept, and
    whatever production, staging, candidates, kept run records or the twins (the versions they run and
    those their retained history was applied by) reference."""
    from raytwin.lifecycle import PruneIncomplete
    from raytwin.statestore import StateStore

    _refuse_if_served(registry, f"POST /v1/models/{model}/prune", twins)
    twins = twins or _twins_beside(registry)
    lc = _known(registry, model)
    in_use = StateStore(twins).model_versions(tenant, model) if twins else {}
    who = _actor(tenant, actor, role)

    def act() -> PruneReport:
        with _audited(registry, audit_store, who, "model.prune", model) as outcome:
            try:
                done = lc.prune(model, who, runs, in_use=set(in_use))
            except PruneIncomplete as exc:  # what it did stays done: in the outcome, with the failure
                outcome.update(exc.done.audited())
                raise
            outcome.update(done.audited())
            return done

    try:
        report = _run(act)
    except PruneIncomplete as exc:  # what it did stays done: say so, then why it stopped
        _print_pruned(exc.done)
        typer.echo(f"error: the prune stopped: {exc.__cause__!r}; run it again to finish", err=True)
        raise typer.Exit(1) from None
    _print_pruned(report)
    for version, assets in in_use.items():
        typer.echo(f"kept {model}@{version}: twin(s) {', '.join(assets[:5])}{' ...' if len(assets) > 5 else ''} "
                   "run it or their history was applied by it")


@registry_app.command("policy")
def policy(registry: Registry, tenant: Tenant,
           auto_promote: Annotated[bool | None, typer.Option(
               "--auto-promote/--no-auto-promote", help="Allow production without an approver (needs --role "
                                                        "approver to change, as the API's approver grant).")] = None,
           keep_archived: Annotated[int | None, typer.Option(help="Archived versions kept per model.")] = None,
           keep_runs: Annotated[int | None, typer.Option(help="Run records kept per model.")] = None,
           actor: ActorId = None, role: Roles = None, audit_store: AuditStore = None) -> None:
    """Show the tenant's lifecycle policy, or change the fields given (audited; the actor is kept as its setter,
    whom its automatic promotion never promotes a version of, as the API's)."""
    lc = _lifecycle(registry)
    current = lc.policy(tenant)
    changes = {k: v for k, v in (("auto_promote", auto_promote), ("keep_archived", keep_archived),
                                 ("keep_runs", keep_runs)) if v is not None}
    if changes:
        _refuse_if_served(registry, "PUT /v1/lifecycle-policy")
        from raytwin.lifecycle import LifecyclePolicy, check_policy_change

        new = _run(lambda: LifecyclePolicy.model_validate({**current.model_dump(), **changes}))
        who = _actor(tenant, actor, role)
        _run(lambda: check_policy_change(current, new, who))

        def act() -> None:
            with _audited(registry, audit_store, who, "lifecycle_policy.update", tenant,
                          policy=new.model_dump(mode="json")):
                lc.set_policy(tenant, new, frozenset({who.id}))

        _run(act)
        current = new
    typer.echo(current.model_dump_json())
