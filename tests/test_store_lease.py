"""One service writes a store: a second one (another shard count) is refused, a stale shard is
fenced, and a change of shard count is an explicit takeover that recovers every twin."""

from __future__ import annotations

import pytest
import ray

from actors import StoreLeased, TwinService
from actors.service import acquire_lease
from actors.recovery import registration_record
from actors.shard import TwinShard
from actors.telemetry import validated_table
from raytwin.statestore import StoreFenced
from tests.test_twins import (  # noqa: F401 (a fixture)
    TWIN_OPTS,
    artifact,
    assert_same_state,
    asset,
    events,
    jax_on_cpu_like_the_shards,
    reference,
)

TWINS = [f"m{i}" for i in range(6)]


def test_second_service_is_refused_stale_writers_are_fenced_and_reshard_keeps_every_event(ray_session, tmp_path,
                                                                                            artifact):
    url = str(tmp_path / "store")
    first = TwinService(url, shards=1, **TWIN_OPTS)
    evs = {a: events(a, 20, seed=i) for i, a in enumerate(TWINS)}
    try:
        first.register_many([(asset(a), artifact) for a in TWINS])
        first.ingest("acme", [e for a in TWINS for e in evs[a][:10]])
        attached = TwinService(url, shards=1, **TWIN_OPTS)  # the same service (Serve backend, CLI): attaches
        assert attached.lease == first.lease and attached.state("acme", "m0").revision == 10

        with pytest.raises(StoreLeased, match=f"leased to service {first.lease.owner} .*1 shards.*takeover=True"):
            TwinService(url, shards=2, **TWIN_OPTS)
        stray = TwinShard(url, 0, 1, allowed_lateness_s=600.0, snapshot_every=16)  # a writer without the lease
        with pytest.raises(StoreFenced, match="leased to service"):
            stray.ingest("acme", validated_table(evs["m0"][10:]))

        # the migration: take the store over with 2 shards; the old shard is stopped
        resharded = TwinService(url, shards=2, takeover=True, **TWIN_OPTS)
        assert resharded.lease.epoch == first.lease.epoch + 1
        with pytest.raises(ray.exceptions.RayActorError):
            first.state("acme", "m0")
        stale = TwinShard(url, 0, 1, allowed_lateness_s=600.0, snapshot_every=16, fence=first.lease.fence)
        log_files = resharded.store.fs.glob(f"{resharded.store.root}/log/**/seg-*")
        for write in (lambda: stale.ingest("acme", validated_table(evs["m0"][10:])), stale.flush,
                      lambda: stale.register("acme", "new", registration_record(asset("new"), artifact, None, None))):
            with pytest.raises(StoreFenced, match=f"epoch {first.lease.epoch}\\)"):
                write()
        assert log_files and resharded.store.fs.glob(f"{resharded.store.root}/log/**/seg-*") == log_files  # nothing written

        report = resharded.ingest("acme", [e for a in TWINS for e in evs[a][5:]])  # 5 re-deliveries each
        assert (report.accepted, report.duplicates) == (60, 30)
        for a in TWINS:
            assert_same_state(resharded.state("acme", a), reference(artifact, a, evs[a], **TWIN_OPTS).view())
        resharded.close()
        assert resharded.store.read_lease().released  # a closed service's store is free for any service
        assert acquire_lease(resharded.store, 5, "raytwin", takeover=False).epoch == resharded.lease.epoch + 1
    finally:
        first.close()


def test_reshard_command_moves_a_live_store_to_a_new_shard_count(ray_session, tmp_path, artifact):
    from typer.testing import CliRunner

    from raytwin.cli import app

    url = str(tmp_path / "store")
    evs = {a: events(a, 12, seed=i) for i, a in enumerate(TWINS[:3])}
    old = TwinService(url, shards=1, **TWIN_OPTS)
    try:
        old.register_many([(asset(a), artifact) for a in evs])
        old.ingest("acme", [e for a in evs for e in evs[a]])
        result = CliRunner().invoke(app, ["twins", "reshard", url, "--shards", "2"])
        assert result.exit_code == 0, result.output
        assert "3 twin(s) recovered on 2 shard(s)" in result.output and "free for a service with 2" in result.output
        new = TwinService(url, shards=2, **TWIN_OPTS)  # no takeover needed: the command released the store
        try:
            for a in evs:
                assert_same_state(new.state("acme", a), reference(artifact, a, evs[a], **TWIN_OPTS).view())
        finally:
            new.close()
    finally:
        old.close()
