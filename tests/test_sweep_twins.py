"""A sweep started from a live twin's state (needs the live-twin service, `actors.service`)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from raytwin.contracts import Asset, AssetType
from raytwin.registry import ModelRegistry
from raytwin.sim import TWO_TANK
from sweeps.aggregate import open_dataset
from sweeps.runner import run_sweep
from sweeps.space import Dimension, ScenarioSpace
from sweeps.spec import SweepSpec
from sweeps.twins import NoLiveState, start_from_twin
from tests.test_connectors_mqtt import T0, as_event

service_module = pytest.importorskip("actors.service")


def test_sweep_from_a_twins_live_state(ray_session, tmp_path):
    registry_url = str(tmp_path / "registry")
    artifact = ModelRegistry(registry_url).register("tank", "1.0.0", AssetType.from_model(TWO_TANK, name="tank"))
    svc = service_module.TwinService(str(tmp_path / "store"), shards=1)
    try:
        svc.register(Asset(id="t1", tenant="acme", type_name="tank", type_version="1.0.0"), artifact,
                     initial_state={"h1": 0.42, "h2": 0.17})
        with pytest.raises(NoLiveState, match=r"twin acme/t1 has applied no telemetry event yet: its state is only "
                                              r"its prior .* or pass allow_prior=True"):
            start_from_twin(svc, "acme", "t1")  # the prior would pass for the twin's estimate
        fields = start_from_twin(svc, "acme", "t1", allow_prior=True)
        assert fields == {"model": "tank@1.0.0", "tenant": "acme", "asset_id": "t1",
                          "start_state": svc.state("acme", "t1").state, "start_time": None}  # no event yet
        assert fields["start_state"]["h1"] == pytest.approx(0.42)
        with pytest.raises(KeyError):
            start_from_twin(svc, "other-tenant", "t1")
        assert svc.ingest("acme", [as_event("t1", 0)]).accepted == 1
        estimated = start_from_twin(svc, "acme", "t1")
        assert estimated["start_time"] == T0 and estimated["start_state"] == svc.state("acme", "t1").state
        before = T0 - timedelta(hours=1)
        with pytest.raises(NoLiveState, match=re.escape(f"no telemetry event by {before.isoformat()}")):
            start_from_twin(svc, "acme", "t1", at=before)
    finally:
        svc.close()
    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="q_in_mean", target="input", values=[0.0])])
    spec = SweepSpec(**fields, registry_url=registry_url, space=space, horizon_s=10.0, step_s=1.0, chunk_size=4)
    run_sweep(spec, str(tmp_path / "out"), progress=False)
    row = open_dataset(str(tmp_path / "out")).to_table().to_pylist()[0]
    assert row["h1_max"] == pytest.approx(0.42, rel=1e-6)  # no inflow: the start level is the peak


def test_a_twins_start_carries_its_states_time_for_the_clock_signals():
    """`start_from_twin` left out the state's time: a live sweep or recommendation ran a twin at noon from the
    Monday midnight's outdoor temperature and no sun (twice the heating energy in 6 h)."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    noon = datetime(2026, 3, 4, 12, 7, tzinfo=UTC)
    twin = SimpleNamespace(model_ref="thermal_rc", tenant="acme", asset_id="z1", state={"T_in": 294.15, "T_m": 293.15},
                           event_time=noon)
    fields = start_from_twin(SimpleNamespace(state=lambda tenant, asset_id: twin), "acme", "z1")
    assert fields["start_time"] == noon
    space = ScenarioSpace(method="grid", dimensions=[Dimension(name="T_out_mean", target="input", values=[278.15])])
    assert SweepSpec(**fields, space=space, horizon_s=3600.0, step_s=60.0).start_time == noon
