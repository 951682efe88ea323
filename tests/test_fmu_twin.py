"""An FMU as an asset type's simulator: stored content-hashed, pinned by the registry, and tracked by
live twins with the UKF stepping the FMU (the EKF is refused: an FMU has no Jacobians).

The truth is simulated with the JAX Van der Pol written from the equations (`benchmarks.fmu`), not
with the FMU the twins run, and the twins only ever see noisy x0.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from actors import TwinService
from actors.recovery import registration_record
from benchmarks.fmu import VAN_DER_POL
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.estimation import substeps
from raytwin.fmu import FmuModel, store_fmu
from raytwin.modelcode import file_code
from raytwin.registry import ModelRegistry, RegistryError
from raytwin.sim import get_model
from tests.test_filters import assert_nees_consistent, assert_nis_consistent

MU, PRIOR_STD, PROCESS_STD, SENSOR_STD = 1.0, 0.3, 0.02, 0.1
EVENT_S, SUBSTEPS = 0.1, 10  # one measurement of x0 every 0.1 s; the truth takes steps of 0.01 s, as the FMU
RUNS, EVENTS, BURN_IN = 16, 40, 10
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def vdp(reference_fmus, s3_module_url) -> tuple[ModelRegistry, FmuModel]:
    """The VanDerPol FMU stored in an S3 registry (shards fetch it from there) and registered as ``vdp@1.0.0``."""
    registry = ModelRegistry(f"{s3_module_url}/models")
    stored = store_fmu(reference_fmus[(2, "VanDerPol")], registry.url)
    asset_type = AssetType.from_model(stored.declare(mu={"lower": 0.1, "upper": 5.0}), name="vdp", version="1.0.0")
    registry.register("vdp", "1.0.0", asset_type, {"mu": MU})
    return registry, stored


def _asset(asset_id: str, **metadata: str) -> Asset:
    noise = {"process_std.x0": str(PROCESS_STD), "process_std.x1": str(PROCESS_STD),
             "measurement_std.x0": str(SENSOR_STD), "measurement_std.x1": str(SENSOR_STD)}
    return Asset(id=asset_id, tenant="acme", type_name="vdp", type_version="1.0.0", metadata={**noise, **metadata})


def test_the_registry_pins_the_stored_fmu_and_resolves_it_from_its_url(vdp, reference_fmus):
    registry, stored = vdp
    artifact = registry.get("vdp@1.0.0")
    assert artifact.asset_type.simulator == stored.ref == f"{registry.url}/fmus/{stored.fmu_hash}.fmu"
    built = file_code(reference_fmus[(2, "VanDerPol")])  # the SHA-256 of the file that was built
    assert (artifact.code.kind, artifact.code.sha256) == ("file", built.sha256) == ("file", stored.fmu_hash)
    assert artifact.code_change() is None
    model = artifact.model()
    assert isinstance(model, FmuModel) and model is get_model(artifact.asset_type.simulator)
    assert (model.state_names, model.output_names, artifact.param_vector()) == (("x0", "x1"), ("x0", "x1"), [MU])
    with pytest.raises(RegistryError, match="parameter mu=9.0 outside"):
        registry.register("vdp", "1.0.1", artifact.asset_type, {"mu": 9.0})
    elsewhere = ModelRegistry(f"{registry.url}-other")  # an FMU is native code: each registry runs its own
    with pytest.raises(RegistryError, match="is not stored in this registry; store it first"):
        elsewhere.register("vdp", "1.0.0", artifact.asset_type)
    unstored = FmuModel.load(reference_fmus[(2, "VanDerPol")])
    with pytest.raises(ValueError, match="is not in an FMU store; store it first"):
        AssetType.from_model(unstored, name="vdp", version="1.0.0")


def test_an_fmu_twin_refuses_the_ekf_and_runs_the_ukf_by_default(vdp):
    artifact = vdp[0].get("vdp@1.0.0")
    with pytest.raises(ValueError, match=r"filter='ekf': simulator Van der Pol oscillator cannot run it \(the EKF "
                                         r"needs Jacobians.*; use one of \['ukf'\]"):
        registration_record(_asset("a", filter="ekf"), artifact, None, {"x0": PRIOR_STD, "x1": PRIOR_STD})
    with pytest.raises(ValueError, match=r"asset a on model vdp@1.0.0: asset metadata initial_std\.\*: no value and "
                                         r"no model default for \['x0', 'x1'\]"):
        registration_record(_asset("a"), artifact, None, None)  # an FMU declares no filter noise
    record = registration_record(_asset("a"), artifact, None, {"x0": PRIOR_STD, "x1": PRIOR_STD})
    assert "filter" not in record["asset"]["metadata"]  # the UKF, the FMU's default (the test below runs it)


def _truth(rng: np.random.Generator) -> np.ndarray:
    """(RUNS, EVENTS, 2) states: each run starts from a draw of the twins' prior and follows the
    Van der Pol equations (the JAX model's `derivative`) discretised as the Reference FMU is (forward
    Euler, its fixed step of 0.01 s), with the process noise the twins assume added every step."""
    dt = EVENT_S / SUBSTEPS
    x = np.array([2.0, 0.0]) + PRIOR_STD * rng.normal(size=(RUNS, 2))
    out = np.empty((RUNS, EVENTS, 2))
    for k in range(EVENTS):
        if k:
            for _ in range(SUBSTEPS):
                dx = np.stack(VAN_DER_POL.derivative(tuple(x.T), (), (MU,)), axis=1)
                x = x + dt * dx + PROCESS_STD * np.sqrt(dt) * rng.normal(size=x.shape)
        out[:, k] = x
    return out


def test_a_twin_on_the_fmu_tracks_van_der_pol_from_noisy_x0_with_consistent_uncertainty(ray_session, vdp, tmp_path):
    """16 twins through TwinService (the shard fetches the FMU from the S3 store), one event per
    0.1 s: errors well below the sensor noise after burn-in, NEES (2 dof) and NIS (1 dof) inside
    their chi-square bands over the runs (`tests.test_filters`)."""
    artifact = vdp[0].get("vdp@1.0.0")
    rng = np.random.default_rng(12)
    truth = _truth(rng)
    measured = truth[:, :, 0] + SENSOR_STD * rng.normal(size=(RUNS, EVENTS))
    ids = [f"vdp-{j}" for j in range(RUNS)]
    svc = TwinService(str(tmp_path / "store"), shards=1, allowed_lateness_s=60.0)
    estimate, cov, nis = np.empty((RUNS, EVENTS, 2)), np.empty((RUNS, EVENTS, 2, 2)), np.empty((RUNS, EVENTS))
    try:
        for asset_id in ids:
            svc.register(_asset(asset_id), artifact, initial_state={"x0": 2.0, "x1": 0.0},
                         initial_std={"x0": PRIOR_STD, "x1": PRIOR_STD})
        for k in range(EVENTS):
            report = svc.ingest("acme", [
                TelemetryEvent(asset_id=a, event_time=T0 + timedelta(seconds=k * EVENT_S), sequence=k,
                               measurements={"x0": {"value": float(measured[j, k]), "unit": "-"}})
                for j, a in enumerate(ids)])
            assert report.accepted == RUNS, report.reasons
            states = ray_session.get([svc.shard_for("acme", a).state.remote("acme", a) for a in ids])
            for j, s in enumerate(states):
                estimate[j, k] = s.state["x0"], s.state["x1"]
                cov[j, k] = s.covariance
                nis[j, k] = s.divergence.nis_last
        assert s.model_ref == "vdp@1.0.0" and not s.divergence.drift
    finally:
        svc.close()
    err = estimate - truth
    rmse = np.sqrt((err[:, BURN_IN:] ** 2).mean(axis=(0, 1)))
    assert np.all(rmse < 0.5 * SENSOR_STD), f"RMSE {rmse} against a sensor std of {SENSOR_STD}"
    nees = np.einsum("rki,rkij,rkj->rk", err, np.linalg.inv(cov), err)
    assert_nees_consistent(nees, 2, "VanDerPol FMU twins")
    assert_nis_consistent(nis, 1, "VanDerPol FMU twins")


def test_epoch_time_rounding_does_not_add_a_sub_step():
    """A 0.1 s gap between epoch-second timestamps is off by ~2.4e-7 s: 10 sub-steps of the FMU's
    0.01 s (11 shorter ones made the fixed-step Reference FMU take no step at all); a gap shorter
    than the slack still takes one."""
    n_sub, dt, skipped = substeps(np.array([0.1 + 2.4e-7, 0.1 - 2.4e-7, 0.105, 1e-6]), 0.01)
    assert n_sub.tolist() == [10, 10, 11, 1] and skipped.tolist() == [0.0] * 4
    np.testing.assert_allclose(dt, [0.010000024, 0.009999976, 0.105 / 11, 1e-6])
