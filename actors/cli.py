"""`raytwin twins ...`: inspect a twin store (time travel, dead letters), compact, prune and reshard it, measure shards."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime

import typer

ISO_FORMATS = ["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%d"]
"""Spelled out: click's default formats accept no UTC offset in older releases (seen with another click)."""

twins_app = typer.Typer(help="Live twins: time travel, dead letters, compaction, retention, resharding, shard measurements.",
                        no_args_is_help=True)


@twins_app.callback()
def _models_importable() -> None:
    """Twins name their models: a model module in the working directory imports, as for `raytwin models`,
    `sweep` and `calibrate` (`state-at` of a twin of such a model dumped a validation error)."""
    from raytwin.models_cli import importable_working_directory

    importable_working_directory()


def _twin_store(store: str):
    """The `StateStore` at `store`, refused (exit 2) where no twin service ever ran: a maintenance command
    on a wrong path (a Serve store's root instead of its ``twins``, a typo) must not report success."""
    from raytwin.statestore import StateStore
    from raytwin.store_failures import store_io

    st = StateStore(store)
    with store_io("read"):
        ran = st.fs.exists(f"{st.root}/lease.json") or st.fs.exists(f"{st.root}/log") \
            or st.fs.glob(f"{st.root}/twins/tenant=*")
        served = not ran and st.fs.exists(f"{st.root}/twins/lease.json")
    if not ran:
        hint = f"; a Serve store's twins are at {store.rstrip('/')}/twins" if served else ""
        typer.echo(f"no twin store at {store} (no lease.json, log/ or registered twins in it){hint}", err=True)
        raise typer.Exit(2)
    return st


@twins_app.command("state-at")
def state_at(
    store: str = typer.Argument(..., help="State store URL (directory or s3://...)."),
    tenant: str = typer.Argument(...),
    asset_id: str = typer.Argument(...),
    at: datetime = typer.Option(None, "--at", formats=ISO_FORMATS, help="ISO time (UTC if no offset); default: latest."),
) -> None:
    """Print a twin's state as of a past event time, rebuilt from the store alone (no Ray needed)."""
    from datetime import UTC

    from actors.recovery import recover
    from raytwin.statestore import StateStore, to_micros

    st = StateStore(store)
    record = st.load_registration(tenant, asset_id)
    if record is None:
        typer.echo(f"no twin {asset_id!r} for tenant {tenant!r} in {store}", err=True)
        raise typer.Exit(2)
    until = None if at is None else to_micros(at if at.tzinfo else at.replace(tzinfo=UTC))
    twin = recover(st, record, allowed_lateness_s=0.0, checkpoint_every=1_000_000, until_us=until)
    typer.echo(twin.view().model_dump_json(indent=2))


@twins_app.command("dead-letters")
def dead_letters(
    store: str = typer.Argument(..., help="State store URL."),
    tenant: str = typer.Option(None, help="Only this tenant."),
    day: datetime = typer.Option(None, "--day", formats=["%Y-%m-%d"], help="Only this UTC day's."),
    limit: int = typer.Option(20, min=1, help="Show the newest this many: only the days that hold them are read "
                              "(a poison device may leave millions)."),
) -> None:
    """List the newest rejected telemetry with the reason (newest last)."""
    of = None if day is None else day.date().isoformat()
    rows = _twin_store(store).newest_dead_letters(tenant, limit, day=of).to_pylist()
    typer.echo(f"the newest {len(rows)} dead letter(s)" + (f" of {of}" if of else ""))
    for r in rows:
        typer.echo(json.dumps({k: str(v) if k == "dead_lettered_at" else v for k, v in r.items()}))


@twins_app.command()
def compact(
    store: str = typer.Argument(..., help="State store URL (directory or s3://...)."),
    tenant: str = typer.Option(None, help="Only this tenant."),
    min_files: int = typer.Option(2, min=1, help="Merge a partition once it has this many part files (closed log "
                                               "segments are merged whatever their number)."),
) -> None:
    """Merge small event-log and dead-letter files (safe while twins run; schedule it, e.g. every 15 min)."""
    done = _twin_store(store).compact(tenant=tenant, min_files=min_files)
    for c in done:
        typer.echo(f"{c.partition}: {c.files_in} files -> {c.files_out}, {c.rows_in} rows -> {c.rows_out}")
    typer.echo(f"compacted {len(done)} partition(s), {sum(c.files_in for c in done)} files")


@twins_app.command()
def prune(
    store: str = typer.Argument(..., help="State store URL (directory or s3://...)."),
    tenant: str = typer.Argument(...),
    before: datetime = typer.Option(None, "--before", formats=["%Y-%m-%d"], help="Delete history before this UTC date."),
    keep_days: int = typer.Option(None, "--keep-days", min=1, help="Or: keep this many days of history."),
) -> None:
    """Delete a tenant's history before a date, keeping what recovery needs (time travel before it: HTTP 410)."""
    from datetime import UTC, timedelta

    if (before is None) == (keep_days is None):
        raise typer.BadParameter("give exactly one of --before and --keep-days")
    day = before.date() if before is not None else datetime.now(UTC).date() - timedelta(days=keep_days)
    done = _twin_store(store).prune(tenant, day)
    if done.held_back_by:
        typer.echo(f"held back by {len(done.held_back_by)} twin(s) whose newest snapshot is older or missing: "
                   f"{', '.join(done.held_back_by[:10])}{' ...' if len(done.held_back_by) > 10 else ''}")
    if done.history_from is None:
        typer.echo(f"nothing pruned: a twin of {tenant!r} has no snapshot yet")
        return
    typer.echo(f"history before {done.history_from.isoformat()} pruned: {done.partitions_deleted} partition(s), "
               f"{done.snapshots_deleted} snapshot(s) deleted")


@twins_app.command()
def reshard(
    store: str = typer.Argument(..., help="State store URL (directory or s3://...)."),
    shards: int = typer.Option(..., "--shards", min=1, help="The new shard count."),
    address: str = typer.Option(None, "--address", help="Ray cluster to run on (default: a new local Ray)."),
    namespace: str = typer.Option("raytwin", "--namespace", help="Ray namespace of the twin service."),
    force: bool = typer.Option(False, "--force", help="Take the store even from a service whose shards still "
                               "renew its lease (a hung one): they are fenced, and every write it takes fails."),
) -> None:
    """Take the store over with a new shard count, recover and persist every twin, then release it.

    Stop the service (e.g. the Serve app) first; then start it with the new count. A service still serving
    the store is refused (its writes would all fail once fenced), unless `--force`."""
    import ray

    from actors.lease import StoreLeased, check_not_served
    from actors.service import TwinService
    from raytwin.ray_connect import unreachable
    from raytwin.statestore import StateStore

    twins = StateStore(store.rstrip("/"))
    if twins.read_lease() is None and StateStore(f"{store.rstrip('/')}/twins").read_lease() is not None:
        raise typer.BadParameter(f"{store} is a `raytwin serve` store: its twins are at {store.rstrip('/')}/twins; "
                                 "reshard that (this would lease the wrong directory and fence nothing)",
                                 param_hint="STORE")
    if not force:
        try:
            check_not_served(twins, f"stop it first (e.g. Ctrl-C `raytwin serve`), reshard, "
                             f"then start it with {shards} shard(s); `--force` takes the store from it anyway, and "
                             "every write it takes then fails")
        except StoreLeased as e:
            raise typer.BadParameter(str(e), param_hint="STORE") from None

    if reason := unreachable(address):  # at once, not after ray.init's minutes of retries
        raise typer.BadParameter(f"cannot connect to the Ray cluster at {address}: {reason}", param_hint="--address")
    ray.init(address=address, namespace=namespace, include_dashboard=False, logging_level="WARNING",
             ignore_reinit_error=True)
    service = TwinService(store, shards=shards, namespace=namespace, takeover=True)
    try:
        service.flush()
        per_shard = ray.get([s.twin_count.remote() for s in service.shard_handles])
    finally:
        service.close()
    typer.echo(f"store {store}: {sum(per_shard)} twin(s) recovered on {shards} shard(s) {per_shard} at epoch "
               f"{service.lease.epoch}; the store is free for a service with {shards} shard(s)")


@twins_app.command()
def bench(
    twins: int = typer.Option(10_000, min=1, help="Twins to create."),
    shards: int = typer.Option(1, min=1, help="Shard actors holding them."),
    events_per_twin: int = typer.Option(1, min=1, help="Events per twin, sent in one ingest call."),
) -> None:
    """Measure memory and time of N twins in shard actors on a local Ray (Linux)."""
    import ray

    from actors.bench import measure

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", ignore_reinit_error=True)
    with tempfile.TemporaryDirectory() as workdir:
        result = measure(twins, workdir, shards=shards, events_per_twin=events_per_twin)
    for k, v in result.items():
        typer.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
