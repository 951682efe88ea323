"""An FMU as an asset type's simulator: stored content-hashed, pinned by the registry, and tracked by
live twins with the UKF stepping the FMU (the EKF is refused: an FMU has no Jacobians), which refuse
readings that leave a state the FMU cannot step from.

The truth is simulated with the JAX Van der Pol written from the equations (`benchmarks.fmu`), not
with the FMU the twins run, and the twins only ever see noisy x0.
"""

from __future__ import annotations

import logging
import math
import shutil
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from actors import TwinService
from actors.recovery import registration_record
from actors.shard import TwinShard
from actors.telemetry import validated_table
from benchmarks.fmu import VAN_DER_POL
from raytwin import metrics
from raytwin.contracts import Asset, AssetType, TelemetryEvent
from raytwin.estimation import HOST_LOOK_AHEAD, FilterState, refused_names, substeps
from raytwin.fmu import INSTANTIATIONS, FmuModel, FmuScenario, cached_instance, store_fmu
from raytwin.fmu.reference import build_reference_fmus, default_source
from raytwin.fmu.stepper import FmuStepper, fmu_stepper
from raytwin.modelcode import file_code
from raytwin.registry import ModelRegistry, RegistryError
from raytwin.sim import get_model
from raytwin.ukf import UnscentedKalmanFilter, host_dynamics
from tests.ray_metrics import scrape, total, wait_until
from tests.test_filters import assert_nees_consistent, assert_nis_consistent
from tests.test_twins import CountedDeadLetters, assert_same_state

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
                                         r"no model default for \['x0', 'x1'\] \(give them in the asset's metadata, "
                                         r'\{"initial_std.x0": "<std>", "initial_std.x1": "<std>"\} in the variables\' '
                                         r"units, or declare prior_std on the model's variables: an FMU's with "
                                         r"FmuModel.declare\)"):
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
                for j, a in enumerate(ids)], states=True)  # each twin's state after its event, in the same call
            assert report.accepted == RUNS, report.reasons
            after = {s.asset_id: s for s in report.states}
            assert after.keys() == set(ids) and all(s.revision == k + 1 for s in after.values())
            for j, s in enumerate(after[a] for a in ids):
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


# ---- states the FMU cannot step from ------------------------------------------------------------------
def _readings(asset_id: str, x0: list[float], start: int = 0) -> list[TelemetryEvent]:
    return [TelemetryEvent(asset_id=asset_id, event_time=T0 + timedelta(seconds=(start + k) * EVENT_S),
                           sequence=start + k, measurements={"x0": {"value": v, "unit": "-"}})
            for k, v in enumerate(x0)]


SHARD_OPTS = {"allowed_lateness_s": 3 * EVENT_S, "snapshot_every": 4}


def test_a_reading_the_fmu_cannot_step_from_is_refused_and_later_readings_apply(vdp, tmp_path, caplog, monkeypatch):
    """A glitch reading x0 = 1000 on a Van der Pol twin: the update is finite (x0 ~ 370) but the FMU's next
    0.1 s overflows to NaN. Before, it was accepted and every later event was refused (the twin stalled for
    good); now it is refused by the look-ahead (dead letter, report, warning, metric `non_finite`), the twin
    keeps its state and tracks the next readings, a twin's first event shares a dispatch with the others (a
    step of length 0, which the FMU refuses, made that dispatch fail), and a restarted shard (log replay)
    refuses the same event and holds the live state bit for bit."""
    counted = CountedDeadLetters()
    monkeypatch.setattr(metrics, "DEAD_LETTERS", counted)
    artifact = vdp[0].get("vdp@1.0.0")
    truth = cached_instance(vdp[1]).run(FmuScenario(n_steps=200, dt=0.01, params={"mu": MU}))[::10, 0].tolist()
    shard = TwinShard(str(tmp_path), 0, 1, **SHARD_OPTS)
    for asset_id in ("osc", "fresh"):
        shard.register("acme", asset_id, registration_record(_asset(asset_id), artifact, {"x0": 2.0, "x1": 0.0},
                                                             {"x0": PRIOR_STD, "x1": PRIOR_STD}))
    assert shard.ingest("acme", validated_table(_readings("osc", truth[:6]))).accepted == 6
    before = shard.state("acme", "osc")
    with caplog.at_level(logging.WARNING, logger="raytwin.twins"):
        report = shard.ingest("acme", validated_table(_readings("osc", [1000.0], start=6)))
    assert (report.accepted, report.rejected) == (0, 1)
    reason = report.reasons[0].reason
    assert reason.startswith("non-finite update: the model's update of osc at 2026-03-01T00:00:00.600000+00:00 gave "
                             "a state from which the model's next step is not finite or fails (NaN"), reason
    assert "for x0, x1: the model is not defined there" in reason and "keeps its state before this event" in reason
    assert caplog.text.count("event=update_refused") == 1 and counted.counts["shard", "non_finite"] == 1
    kept = shard.state("acme", "osc")
    assert kept.state == before.state and not kept.divergence.diverged

    # the next readings apply, in one dispatch with the first event of twin "fresh" (no gap from its prior)
    report = shard.ingest("acme", validated_table(_readings("osc", truth[7:12], start=7) + _readings("fresh", [2.0])))
    assert (report.accepted, report.rejected) == (6, 0), report.reasons
    now = shard.state("acme", "osc")
    assert all(math.isfinite(v) for v in now.state.values()) and not now.divergence.diverged
    assert abs(now.state["x0"] - truth[11]) < 3 * SENSOR_STD and now.revision == 12
    assert_same_state(TwinShard(str(tmp_path), 0, 1, **SHARD_OPTS).state("acme", "osc"), now)


def _ukf(model: FmuModel) -> tuple[UnscentedKalmanFilter, FilterState]:
    """The filter the twins above run on `model` (their noise), and their prior."""
    ukf = UnscentedKalmanFilter(model, [MU], process_std={"x0": PROCESS_STD, "x1": PROCESS_STD},
                                measurement_std={"x0": SENSOR_STD, "x1": SENSOR_STD})
    return ukf, ukf.initial({"x0": 2.0, "x1": 0.0}, {"x0": PRIOR_STD, "x1": PRIOR_STD})


FAILED_CALLS = metrics.FMU_FAILED_CALLS.exported[0]
DOMAIN = {"Discard": 50.0, "Error": 1e3, "Fatal": 1e5}
"""|x0| beyond which the patched VanDerPol's derivatives return each FMI status (the worst that applies)."""


@pytest.fixture(scope="module")
def bounded_vdp(tmp_path_factory) -> FmuModel:
    """The Reference VanDerPol built with a domain: its derivatives return Discard, Error or Fatal beyond the
    `DOMAIN` bounds of |x0|, so its doStep fails there (fmi2Discard, fmi2Error, fmi2Fatal), as an FMU whose
    model refuses a state does."""
    root = tmp_path_factory.mktemp("bounded-vdp")
    source = root / "src"
    shutil.copytree(default_source(), source, ignore=shutil.ignore_patterns("build"))
    model_c = source / "VanDerPol" / "model.c"
    checks = "".join(f"    if (fabs(M(x0)) > {bound!r}) return {status};\n"
                     for status, bound in sorted(DOMAIN.items(), key=lambda item: -item[1]))
    text = model_c.read_text().replace('#include "config.h"', '#include <math.h>\n#include "config.h"', 1)
    anchor = "    calculateValues(comp);\n\n    dx[0] = M(der_x0);"
    assert anchor in text, "the Reference VanDerPol's getDerivatives changed: update the patch"
    model_c.write_text(text.replace(anchor, anchor.replace("\n\n", "\n" + checks + "\n"), 1))
    path = build_reference_fmus(root / "out", 2, ("VanDerPol",), source=source)["VanDerPol"]
    return FmuModel.load(path).declare(mu={"lower": 0.1, "upper": 5.0})


def test_states_the_fmu_fails_to_step_from_are_refused_whatever_status_it_returns(bounded_vdp, caplog, ray_session,
                                                                                  ray_metrics_port):
    """The FMU's doStep returns fmi2Discard, fmi2Error, then fmi2Fatal for three glitch readings: each failed
    call is NaN to the filter (it used to raise out of the dispatch, failing every twin of it), the look-ahead
    refuses each event, the twin keeps its state and the good readings between and after apply; the instance
    is reset after a discard or an error and replaced after the fatal error, which FMI allows no reset after.
    Operators see the failed calls: Ray's metrics export counts each one (`ray_raytwin_fmu_failed_calls_total`)."""
    exported_before = total(scrape(ray_metrics_port), FAILED_CALLS)
    ukf, fs = _ukf(bounded_vdp)
    stepper = fmu_stepper(bounded_vdp)
    failed_before, t = stepper.failed, T0.timestamp()
    readings = [2.0, 1.98, 1e3, 1.94, 1.9, 1e5, 1.85, 1.8, 1e8, 1.75, 1.7]
    with caplog.at_level(logging.WARNING, logger="raytwin.fmu"):
        for k, reading in enumerate(readings):
            failed, instances = stepper.failed, INSTANTIATIONS[bounded_vdp.fmu_hash]
            after = ukf.assimilate(fs, t + k * EVENT_S, {"x0": reading})
            d = after.divergence
            if reading > 10:
                assert refused_names(d.refused_states, bounded_vdp.state_names) == (["x0", "x1"], True), reading
                np.testing.assert_array_equal(after.x, fs.x)
                assert stepper.failed > failed and d.updates == fs.divergence.updates
                replaced = INSTANTIATIONS[bounded_vdp.fmu_hash] - instances  # one per sigma point that failed fatally
                assert replaced > 0 if reading > DOMAIN["Fatal"] else replaced == 0, reading
            else:
                assert d.refused_states == 0 and d.updates == fs.divergence.updates + 1, (k, reading)
                assert abs(after.x[0] - reading) < 3 * SENSOR_STD
            assert np.isfinite(after.x).all() and np.isfinite(after.P).all() and not d.diverged
            fs = after
    assert fs.divergence.refused == 3
    assert caplog.text.count("event=fmu_call_failed") == 1  # logged once, for the first: the discard
    assert "fmi2DoStep failed with status 2 (discard)" in caplog.text
    assert caplog.text.count("event=fmu_replaced") == caplog.text.count("fmi2Reset failed with status 3 (error)") > 0
    failed = stepper.failed - failed_before
    exported = wait_until(ray_metrics_port, lambda m: total(m, FAILED_CALLS) - exported_before >= failed,
                          f"{failed} failed FMU calls")  # its default bound: a loaded machine's export is slow
    assert total(exported, FAILED_CALLS) - exported_before == failed


def test_a_step_after_which_the_fmu_s_time_stays_is_a_failed_call_not_a_failed_dispatch(reference_fmus, caplog):
    """A fixed-step FMU whose time stops advancing (after every probe `FmuStepper` grows up to 2**20 of its step)
    raised out of the step, failing every twin of the dispatch; it is a failed call now, NaN to the filter, which
    refuses the event, as for an FMI error status."""
    model = FmuModel.load(reference_fmus[(2, "VanDerPol")]).declare(mu={"lower": 0.1, "upper": 5.0})
    stepper = FmuStepper(model)
    stepper._reached = lambda: 0.0  # noqa: SLF001 - an FMU whose time stays at 0 whatever step it takes
    x, u, p = np.array([[2.0, 0.0], [1.0, 0.5]]), np.zeros(0), np.array([1.0])
    with caplog.at_level(logging.WARNING, logger="raytwin.fmu"):
        stepped = stepper.step(x, u, p, 0.01)
    assert np.isnan(stepped).all() and stepper.failed == 2
    assert "its time stays at 0 s after steps up to" in caplog.text and "does not advance" in caplog.text
    np.testing.assert_array_equal(stepper.step(x[0], u, p, 0.0), x[0])  # an empty step is still the state

    ukf = UnscentedKalmanFilter(model, [MU], process_std={"x0": PROCESS_STD, "x1": PROCESS_STD},
                                measurement_std={"x0": SENSOR_STD, "x1": SENSOR_STD},
                                dynamics=host_dynamics(model, stepper.step, stepper.observe))
    fs = ukf.initial({"x0": 2.0, "x1": 0.0}, {"x0": PRIOR_STD, "x1": PRIOR_STD})
    for k, reading in enumerate((2.0, 1.98)):  # each event's look-ahead steps the FMU: each is refused
        after = ukf.assimilate(fs, T0.timestamp() + k * EVENT_S, {"x0": reading})
        assert after.divergence.refused == fs.divergence.refused + 1 and after.divergence.updates == 0
        np.testing.assert_array_equal(after.x, fs.x)
        fs = after


def test_the_look_ahead_s_fmu_steps_are_the_next_prediction_s_when_gaps_are_split_alike(reference_fmus):
    """The look-ahead predicts the event's gap again (up to `HOST_LOOK_AHEAD` sub-steps); with events 0.25 s
    apart (25 sub-steps of exactly 0.01 s) the next prediction reads those FMU steps from the stepper's memory:
    the FMU runs the prediction's steps alone, one per sub-step and sigma point."""
    model = FmuModel.load(reference_fmus[(2, "VanDerPol")]).declare(mu={"lower": 0.1, "upper": 5.0})
    ukf, fs = _ukf(model)
    stepper, sigma_points = fmu_stepper(model), 2 * len(model.states) + 1
    t, gap = T0.timestamp(), 0.25
    fs = ukf.assimilate(ukf.assimilate(fs, t, {"x0": 2.0}), t + gap, {"x0": 1.95})
    for k in range(2, 6):
        steps, reused = stepper.steps, stepper.reused
        fs = ukf.assimilate(fs, t + k * gap, {"x0": 2.0 - 0.05 * k})
        assert stepper.steps - steps == 25 * sigma_points, k  # the prediction's; the look-ahead's were reused
        assert stepper.reused - reused >= HOST_LOOK_AHEAD * sigma_points, k
    assert fs.divergence.refused == 0 and fs.divergence.updates == 6
