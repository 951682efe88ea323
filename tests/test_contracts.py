"""The data contracts accept good data, convert safe units and refuse bad data clearly."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from raytwin.contracts import (
    Asset,
    AssetType,
    ContractError,
    Quantity,
    Scenario,
    TelemetryEvent,
    describe_error,
    normalize_measurements,
)
from raytwin.registry import ModelRegistry, RegistryError
from raytwin.sim import BATTERY_ECM, THERMAL_RC
from raytwin.units import UnitError, canonical, same_unit, to_unit

THERMAL = AssetType.from_model(THERMAL_RC)
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def event(**kw):
    base = dict(
        asset_id="zone-1",
        event_time=NOW.isoformat(),
        ingest_time=NOW.isoformat(),
        sequence=7,
        measurements={"T_in": {"value": 21.5, "unit": "degC"}},
    )
    base.update(kw)
    return TelemetryEvent.model_validate(base)


def rejection(**kw) -> str:
    with pytest.raises(ValidationError) as info:
        event(**kw)
    return describe_error(info.value)


def test_good_event_gets_defaults_and_converts_units():
    e = event(event_time="2026-11-25T13:00:00+01:00")
    assert e.event_time == NOW and e.event_time.tzinfo == UTC
    assert e.idempotency_key == "zone-1:7"
    assert normalize_measurements(e, THERMAL) == {"T_in": pytest.approx(294.65)}


def test_round_trips_through_json():
    e = event(quality="uncertain")
    assert TelemetryEvent.model_validate_json(e.model_dump_json()) == e


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"measurements": {"T_in": {"value": float("nan"), "unit": "K"}}}, "finite number"),
        ({"measurements": {"T_in": {"value": float("inf"), "unit": "K"}}}, "finite number"),
        ({"measurements": {"T_in": {"value": 290.0, "unit": "furlong"}}}, "unknown unit 'furlong'"),
        ({"measurements": {"T_in": {"value": "warm", "unit": "K"}}}, "measurements.T_in.value"),
        ({"measurements": {}}, "at least 1 item"),
        ({"event_time": "2026-11-25T12:00:00"}, "RFC 3339 date-time with an offset"),
        ({"event_time": (NOW + timedelta(hours=1)).isoformat()}, "more than 0:05:00 after ingest time"),
        ({"sequence": -1}, "greater than or equal to 0"),
        ({"sequence": "7"}, "sequence"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"asset_id": "bad id with spaces"}, "asset_id"),
        ({"quality": "great"}, "quality"),
    ],
)
def test_bad_events_are_rejected_with_a_reason(kw, reason):
    assert reason in rejection(**kw)


def test_unit_mismatch_and_unknown_measurement_against_the_asset_type():
    with pytest.raises(ContractError, match="cannot convert 'V' to 'K'"):
        normalize_measurements(event(measurements={"T_in": {"value": 3.0, "unit": "V"}}), THERMAL)
    with pytest.raises(ContractError, match="'humidity' is not part of asset type thermal_rc@1.0.0"):
        normalize_measurements(event(measurements={"humidity": {"value": 3.0, "unit": "%"}}), THERMAL)


def test_inputs_may_be_measured_too():
    e = event(measurements={"T_out": {"value": 5.0, "unit": "degC"}, "Q_h": {"value": 2.0, "unit": "kW"}})
    assert normalize_measurements(e, THERMAL) == {"T_out": pytest.approx(278.15), "Q_h": pytest.approx(2000.0)}


def test_unit_table_is_explicit():
    assert to_unit(0.0, "degC", "K") == pytest.approx(273.15)
    assert to_unit(3700.0, "mV", "V") == pytest.approx(3.7)
    with pytest.raises(UnitError):
        to_unit(1.0, "K", "W")


def test_units_are_compared_by_si_dimension():
    """Motor constants: Kt [N*m/A] is Ke [V*s/rad] (V*A = W = N*m/s, the radian is dimensionless), and a
    datasheet's V per 1000 rpm is V / (1000 * 2 pi / 60 rad/s)."""
    assert to_unit(0.3, "V*s/rad", "N*m/A") == 0.3
    assert to_unit(31.4, "V/krpm", "N*m/A") == pytest.approx(31.4 / (1000 * 2 * math.pi / 60), rel=1e-15)
    assert canonical("N*m/A") == canonical("V*s/rad") == "kg*m^2/(s^2*A)"
    assert canonical("N*m*s/rad") == "kg*m^2/s" and canonical("J") == canonical("N*m")
    assert to_unit(2.0, "Ah", "mAh") == pytest.approx(2000.0) and canonical("Ah") == "s*A"
    with pytest.raises(UnitError, match=r"cannot convert 'N\*m/A' to 'N\*m\*s/rad': kg\*m\^2/\(s\^2\*A\) is not "
                                        r"kg\*m\^2/s"):
        to_unit(1.0, "N*m/A", "N*m*s/rad")


def test_angles_are_in_radians_or_degrees():
    """`rad` itself was unknown (only inside `rad/s`, `V*s/rad`): an angle state or measurement could not be declared."""
    assert to_unit(180.0, "deg", "rad") == pytest.approx(math.pi, rel=1e-15)
    assert to_unit(math.pi / 2, "rad", "deg") == pytest.approx(90.0, rel=1e-15)
    assert to_unit(360.0, "deg/s", "rpm") == pytest.approx(60.0, rel=1e-15)
    assert canonical("rad") == canonical("deg") == "1" and canonical("deg/s") == canonical("rad/s") == "1/s"
    with pytest.raises(UnitError, match=r"cannot convert 'deg' to 'm': dimensionless \(an angle, a ratio\) is not m$"):
        to_unit(1.0, "deg", "m")
    assert Quantity(unit="rad").unit == "rad"


def test_asset_type_must_match_its_simulator():
    data = THERMAL.model_dump()
    data["states"].pop("T_m")
    with pytest.raises(ValidationError, match="do not match simulator thermal_rc"):
        AssetType.model_validate(data)
    data = THERMAL.model_dump()
    data["parameters"]["C_in"]["lower"] = 1e9
    with pytest.raises(ValidationError, match="lower <= default <= upper"):
        AssetType.model_validate(data)
    data = THERMAL.model_dump()
    data["simulator"] = "steam_engine"
    with pytest.raises(ValidationError, match="unknown simulator 'steam_engine'"):
        AssetType.model_validate(data)


def test_asset_relationships():
    a = Asset(id="zone-1", tenant="acme", type_name="thermal_rc", type_version="1.0.0",
              relationships=[{"kind": "part_of", "target": "building-7"}])
    assert a.relationships[0].kind == "part_of"
    with pytest.raises(ValidationError, match="cannot be related to itself"):
        Asset(id="z", tenant="acme", type_name="t", type_version="1.0.0", relationships=[{"kind": "feeds", "target": "z"}])
    with pytest.raises(ValidationError, match="relationships.0.kind"):
        Asset(id="z", tenant="acme", type_name="t", type_version="1.0.0", relationships=[{"kind": "owns", "target": "y"}])


def thermal_scenario(**kw) -> Scenario:
    base = dict(
        asset_id="zone-1",
        horizon_s=86400.0,
        step_s=60.0,
        inputs={
            "T_out": {"kind": "sinusoid", "mean": 5.0, "amplitude": 4.0, "period_s": 86400.0, "unit": "degC"},
            "Q_h": {"kind": "schedule", "period_s": 86400.0, "starts_s": [0, 21600, 79200],
                    "values": [0.0, 3.0, 0.0], "unit": "kW"},
            "Q_sol": {"kind": "constant", "value": 0.0, "unit": "W"},
        },
        parameter_overrides={"C_in": 2.5e6},
    )
    base.update(kw)
    return Scenario.model_validate(base)


def test_scenario_inputs_are_evaluated_in_the_types_units():
    s = thermal_scenario()
    assert s.start_state == "live" and s.n_steps == 1440
    u = s.input_series(THERMAL)
    assert u.shape == (1440, 3)
    assert u[0, 0] == pytest.approx(278.15)
    assert u[359, 1] == 0.0 and u[360, 1] == 3000.0 and u[1320, 1] == 0.0
    assert np.all(u[:, 2] == 0.0)


def test_bad_scenarios_are_refused():
    with pytest.raises(ValidationError, match="not a whole number of steps"):
        thermal_scenario(horizon_s=1000.0, step_s=60.0)
    with pytest.raises(ValidationError, match="starts_s must begin at 0"):
        thermal_scenario(inputs={"Q_h": {"kind": "schedule", "period_s": 10, "starts_s": [1], "values": [1], "unit": "W"}})
    with pytest.raises(ContractError, match="parameter C_in=1.0 outside"):
        thermal_scenario(parameter_overrides={"C_in": 1.0}).check_against(THERMAL)
    bad_unit = thermal_scenario()
    inputs = {**bad_unit.model_dump()["inputs"], "Q_h": {"kind": "constant", "value": 1.0, "unit": "K"}}
    with pytest.raises(ContractError, match="input 'Q_h': unit 'K' is not 'W'"):
        thermal_scenario(inputs=inputs).check_against(THERMAL)
    with pytest.raises(ContractError, match="start_state must give exactly"):
        thermal_scenario(start_state={"T_in": 290.0}).check_against(THERMAL)
    with pytest.raises(ContractError, match="missing inputs"):
        Scenario(asset_id="cell", horizon_s=10, step_s=1).check_against(AssetType.from_model(BATTERY_ECM))


def test_asset_type_variables_carry_plausible_ranges_from_the_simulator_in_declared_units():
    at = AssetType.from_model(THERMAL_RC)
    assert at.states["T_in"].lower == THERMAL_RC.states[0].lower
    data = at.model_dump(mode="json")
    data["states"]["T_in"] = {"unit": "K"}  # range left out: the simulator's
    data["states"]["T_m"] = {"unit": "K", "lower": 250.0}  # narrowed by the asset type
    typed = AssetType.model_validate(data)
    assert typed.states["T_in"].lower == THERMAL_RC.states[0].lower
    assert (typed.states["T_m"].lower, typed.states["T_m"].upper) == (250.0, THERMAL_RC.states[1].upper)
    assert typed.states["T_m"].outside(249.0) and not typed.states["T_m"].outside(300.0)
    assert typed.states["T_m"].outside(float("nan"))
    with pytest.raises(ValidationError, match="lower < upper"):
        Quantity(unit="K", lower=300.0, upper=300.0)


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"sequence": 2**63}, "sequence: Input should be less than or equal to 9223372036854775807"),
        ({"measurements": {"T_in": {"value": 10**400, "unit": "K"}}}, "number too large for a 64-bit float"),
        ({"measurements": {"T_in": {"value": True, "unit": "K"}}}, "measurements.T_in.value"),
        ({"idempotency_key": "\ud800"}, "idempotency_key: text is not valid Unicode"),
        ({"measurements": {"\ud800": {"value": 1.0, "unit": "K"}}}, "text is not valid Unicode"),
        ({"event_time": "0001-01-01T00:00:00+01:00"}, "event_time: time is outside the range"),
    ],
)
def test_values_beyond_what_the_log_can_hold_are_validation_errors(kw, reason):
    """Poison values (an int64-overflowing sequence, a 400-digit number, a lone surrogate, a time before
    year 1 in UTC) are refused like any bad value: they used to raise OverflowError or
    UnicodeEncodeError past the contract and fail the whole batch they came in."""
    assert reason in rejection(**kw)
    assert event(sequence=2**63 - 1).sequence == 2**63 - 1


def test_rejection_reasons_read_like_spec_errors_one_per_fault_and_the_same_for_the_same_fault():
    """A telemetry rejection's reason (`describe_error`: the API's rejections, the dead letters) was pydantic's:
    ``<root>: Value error, ...`` for a whole-event check and, for a value that is no number, one reason per member of
    the number type (``value.float: ...; value.int: ...``). Now each reason is ``field: message`` as `SpecError`'s are,
    and a fault reads the same whatever the value, so dead letters can be told apart (and counted) by reason."""
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    clock = rejection(event_time=future, ingest_time=None)
    assert clock.startswith("event_time ") and "after the server's clock" in clock
    for value, kind in (("21.5", "a string"), (None, "null"), (True, "a boolean"), ([1.0], "a list")):
        assert rejection(measurements={"T_in": {"value": value, "unit": "K"}}) == \
            f"measurements.T_in.value: expected a number, not {kind}"
    assert rejection(sequence="x", quality="meh") == \
        "sequence: Input should be a valid integer; quality: Input should be 'good', 'uncertain' or 'bad'"
    for reason in (clock, rejection(event_time="yesterday")):
        assert "<root>" not in reason and "Value error" not in reason


def test_a_bare_measurement_value_is_refused_saying_a_measurement_carries_its_unit():
    """``"T_in": 293.4`` was refused with pydantic's "Input should be a valid dictionary or instance of Measurement",
    which said neither that the unit was missing nor how to give it; the reason names the kind, never the value."""
    for value, kind in ((293.4, "a number"), (293, "a number"), ("293.4 K", "a string"), (None, "null")):
        assert rejection(measurements={"T_in": value}) == (
            'measurements.T_in: a measurement is an object with its unit, {"value": <number>, "unit": "<unit>"} '
            f'(e.g. {{"value": 20.3, "unit": "degC"}}), not {kind}')


def test_times_are_bounded_by_the_servers_clock():
    """A client-chosen ingest time cannot let a far-future event in (it would make every real event
    after it too late); the ingest time defaults to the server's clock."""
    now = datetime.now(UTC)
    future = (now + timedelta(days=365 * 70)).isoformat()
    assert "ingest_time" in rejection(event_time=future, ingest_time=future)
    assert "after the server's clock" in rejection(event_time=future, ingest_time=future)
    assert "after the server's clock" in rejection(event_time=future, ingest_time=None)
    assert rejection(event_time=future, ingest_time=None).endswith(  # (an outside tester: no word of the fix)
        "(clock skew or a bad timestamp): correct the sender's clock (NTP) or the timestamps it sends")
    assert "ingest_time" in rejection(event_time=now.isoformat(), ingest_time=future)
    soon = (now + timedelta(minutes=4)).isoformat()
    assert event(event_time=soon, ingest_time=soon).ingest_time == datetime.fromisoformat(soon)  # within the skew
    e = event(event_time=now.isoformat(), ingest_time=None)
    assert now <= e.ingest_time <= datetime.now(UTC)
    assert "after ingest time" in rejection(event_time=now.isoformat(), ingest_time=(now - timedelta(hours=1)).isoformat())
    # an already validated row is judged by the clock it was validated at, not the reader's
    late = TelemetryEvent.model_validate({**e.model_dump(), "ingest_time": NOW, "event_time": NOW}, context={"now": NOW})
    assert late.ingest_time == NOW


def test_measurements_outside_the_plausible_range_are_refused():
    """T_in = 1e300 degC used to be accepted and destroy the twin; bounds are inclusive and checked
    after unit conversion (so a finite value that overflows in conversion is refused too)."""
    with pytest.raises(ContractError, match=r"'T_in': 1e\+300 degC is outside the plausible range \[173.15, 473.15\] K"):
        normalize_measurements(event(measurements={"T_in": {"value": 1e300, "unit": "degC"}}), THERMAL)
    with pytest.raises(ContractError, match="'Q_h': 1e\\+308 kW is outside the plausible range"):
        normalize_measurements(event(measurements={"Q_h": {"value": 1e308, "unit": "kW"}}), THERMAL)
    assert normalize_measurements(event(measurements={"T_in": {"value": 473.15, "unit": "K"}}), THERMAL) == {
        "T_in": 473.15}
    with pytest.raises(ContractError, match="outside the plausible range"):
        normalize_measurements(event(measurements={"T_in": {"value": -100.01, "unit": "degC"}}), THERMAL)


@pytest.mark.parametrize("when", ["0.5", 1_700_000_000, 1.7e9, "1700000000", "2026-12-01 10:00:00Z", "2026-12-01"])
def test_telemetry_times_are_rfc3339_date_times_not_unix_seconds(when):
    """The spec says date-time: a number or numeric text would otherwise land in 1970 or wherever."""
    row = {"asset_id": "a", "event_time": when, "sequence": 1, "measurements": {"T_in": {"value": 1.0, "unit": "K"}}}
    with pytest.raises(ValidationError, match="RFC 3339"):
        TelemetryEvent.model_validate(row)


def test_an_asset_type_declares_its_simulators_units_not_others_of_their_dimension(tmp_path):
    """A type declaring degC for a model computing in K (deg for rad, kW for W) was accepted: telemetry was
    converted to degC and fed to the model as kelvins, and states, scenarios and initial states were read in
    the model's unit under the declared one's name (a pendulum's NIS 399,606 instead of 0.69)."""
    data = AssetType.from_model(THERMAL_RC).model_dump(mode="json")
    for kind, name, unit, simulators in (("states", "T_in", "degC", "K"), ("inputs", "Q_h", "kW", "W")):
        stored = AssetType.model_validate({**data, kind: {**data[kind], name: {"unit": unit}}})  # one written before
        with pytest.raises(ValueError, match=f"{kind}.{name}: unit '{unit}' is not the simulator's "  # still loads:
                                             f"'{simulators}'.*converted on ingest"):  # a store must not brick the
            stored.check_units()  # service; it is refused where it is published or registered
        with pytest.raises(RegistryError, match=f"unit '{unit}' is not the simulator's"):
            ModelRegistry(str(tmp_path / kind)).register("zone", "1.0.0", stored)
    with pytest.raises(ValidationError, match=r"inputs.Q_h: unit 'm' is not 'W', the simulator thermal_rc's: "
                                              r"declare 'W'"):  # another dimension: refused on load, with the fix
        AssetType.model_validate({**data, "inputs": {**data["inputs"], "Q_h": {"unit": "m"}}})
    cold = AssetType.model_validate({**data, "states": {**data["states"], "T_in": {"unit": "K", "lower": -1000.0}}})
    with pytest.raises(ValueError, match=r"states.T_in: lower -1000 K is below absolute zero \(0 K\).*raise the "
                                         r"lower bound"):  # a tester's type took it
        cold.check_units()
    AssetType.from_model(THERMAL_RC).check_units()
    assert same_unit("J", "J") and not same_unit("degC", "K") and not same_unit("deg", "rad")
