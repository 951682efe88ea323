"""The filter: tracks nonlinear assets from noisy data, equals a textbook KF on a linear model,
flags drift when the model is wrong, and refuses bad configuration."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raytwin.estimation import LANES, ExtendedKalmanFilter, Run, assimilate_runs, refused_names
from raytwin.shadow import score_event
from raytwin.sim import BATTERY_ECM, THERMAL_RC, TWO_TANK, simulate
from raytwin.ukf import make_filter
from tests.domain_models import BOUNDED_RC


def _run_filter(model, params, truth_x0, filter_x0, inputs, noise_std, seed=0, filter_params=None):
    """Truth via raytwin.sim.simulate, one event per step (inputs held from that step on), all events
    in one `assimilate_many` call: the state after an event does not depend on how events are split
    into calls (`test_state_after_an_event_does_not_depend_on_how_events_were_split_into_calls`), and
    one call per event cost ~10 ms each for the 400-900 events below."""
    rng = np.random.default_rng(seed)
    p = np.asarray(params, dtype=np.float64)
    traj = simulate(model, np.asarray(truth_x0), inputs, p, model.default_dt, dtype=jnp.float64)
    ekf = ExtendedKalmanFilter(model, filter_params if filter_params is not None else p)
    fs = ekf.initial(dict(zip(model.state_names, filter_x0)))
    n = inputs.shape[0]
    y = np.asarray(jax.vmap(model.observe_vector, in_axes=(0, 0, None))(
        jnp.asarray(traj[:-1]), jnp.asarray(inputs), jnp.asarray(p)))
    measured = dict(zip(model.input_names, inputs.T))
    measured |= dict(zip(model.output_names, (y + rng.normal(0.0, noise_std, size=y.shape)).T))
    values = np.column_stack([measured[name] for name in ekf.measured_names])
    trace = ekf.assimilate_many(fs, np.arange(n) * model.default_dt, values, np.ones(n, dtype=bool))
    open_loop = simulate(model, np.asarray(filter_x0), inputs, p, model.default_dt, dtype=jnp.float64)
    return traj[:-1], trace.x, open_loop[:-1], trace.state(n - 1)


def test_ekf_tracks_battery_soc_from_noisy_voltage():
    n = 900
    current = np.where((np.arange(n) // 150) % 2 == 0, 2.5, -1.0)[:, None]  # pulsed discharge / charge
    truth, est, open_loop, fs = _run_filter(
        BATTERY_ECM, BATTERY_ECM.param_vector(), [0.9, 0.0, 0.0], [0.5, 0.0, 0.0], current, [2e-3])
    late = slice(n // 2, None)
    ekf_err = np.abs(est[late, 0] - truth[late, 0]).mean()
    open_err = np.abs(open_loop[late, 0] - truth[late, 0]).mean()
    assert open_err > 0.3  # coulomb counting keeps the wrong start forever
    assert ekf_err < 0.1 * open_err
    assert fs.divergence.drift is False
    assert 0.3 < fs.divergence.nis_mean < 3.0  # consistent filter: NIS/dof ~ 1


def test_ekf_tracks_two_tank_levels():
    n = 400
    q_in = np.where(np.arange(n) < 200, 1.2e-4, 0.4e-4)[:, None]
    truth, est, open_loop, fs = _run_filter(
        TWO_TANK, TWO_TANK.param_vector(), [0.3, 0.2], [0.6, 0.6], q_in, [1e-3, 1e-3])
    window = slice(20, None)
    ekf_rms = np.sqrt(((est[window] - truth[window]) ** 2).mean())
    open_rms = np.sqrt(((open_loop[window] - truth[window]) ** 2).mean())
    assert ekf_rms < 2e-3 < 0.1 * open_rms


def test_linear_model_matches_textbook_kalman_filter():
    """For thermal_rc the EKF must equal the linear KF with F = RK4 polynomial of A dt."""
    m, p = THERMAL_RC, np.asarray(THERMAL_RC.param_vector(), dtype=np.float64)
    C_in, C_m, R_im, R_mo, R_io, f_sol = p
    A = np.array([[-1 / (R_im * C_in) - 1 / (R_io * C_in), 1 / (R_im * C_in)],
                  [1 / (R_im * C_m), -1 / (R_im * C_m) - 1 / (R_mo * C_m)]])
    B = np.array([[1 / (R_io * C_in), 1 / C_in, f_sol / C_in], [1 / (R_mo * C_m), 0.0, 0.0]])
    dt = m.default_dt
    Ad = A * dt
    F = np.eye(2) + Ad + Ad @ Ad / 2 + Ad @ Ad @ Ad / 6 + Ad @ Ad @ Ad @ Ad / 24
    G = (np.eye(2) * dt + Ad * dt / 2 + Ad @ Ad * dt / 6 + Ad @ Ad @ Ad * dt / 24) @ B
    q = np.array([1e-2, 1e-3]) ** 2 * dt
    r = 0.05**2
    H = np.array([[1.0, 0.0]])

    ekf = ExtendedKalmanFilter(m, p, adapt_process_noise=False)  # the textbook filter's fixed Q
    fs = ekf.initial({"T_in": 290.0, "T_m": 291.0}, {"T_in": 1.0, "T_m": 3.0})
    x, P = fs.x.copy(), fs.P.copy()
    rng = np.random.default_rng(1)
    u = np.array(fs.u)
    for k in range(50):
        u_new = np.array([280.0 + rng.normal(), 2000.0 * (k % 7 < 3), 100.0 * rng.random()])
        z = 293.0 + rng.normal()
        fs = ekf.assimilate(fs, 120.0 * k, {"T_in": z, **dict(zip(m.input_names, u_new))})
        if k > 0:  # two sub-steps of default_dt per 120 s gap
            for _ in range(2):
                x = F @ x + G @ u
                P = F @ P @ F.T + np.diag(q)
        u = u_new
        S = H @ P @ H.T + r
        K = P @ H.T / S
        x = x + (K * (z - x[0])).ravel()
        P = (np.eye(2) - K @ H) @ P
        np.testing.assert_allclose(fs.x, x, rtol=0, atol=1e-8)
        np.testing.assert_allclose(fs.P, P, rtol=1e-7, atol=1e-12)


def test_drift_flagged_when_model_is_wrong():
    n = 400
    current = np.where((np.arange(n) // 20) % 2 == 0, 3.0, -2.0)[:, None]
    params = BATTERY_ECM.param_vector()
    wrong = BATTERY_ECM.param_vector({"r0": 0.15})  # the cell's resistance tripled (ageing)
    *_, healthy = _run_filter(BATTERY_ECM, params, [0.8, 0, 0], [0.8, 0, 0], current, [2e-3])
    *_, drifting = _run_filter(BATTERY_ECM, params, [0.8, 0, 0], [0.8, 0, 0], current, [2e-3], filter_params=wrong)
    assert not healthy.divergence.drift
    assert drifting.divergence.drift
    assert drifting.divergence.nis_mean > 10 * healthy.divergence.nis_mean


def test_partial_measurements_and_bad_configuration():
    ekf = ExtendedKalmanFilter(TWO_TANK, TWO_TANK.param_vector())
    fs = ekf.initial()
    fs = ekf.assimilate(fs, 0.0, {"h1": 0.45})  # h2 not measured: only h1's residual statistics move
    assert fs.divergence.residual_ms[1] == 0.0 and fs.divergence.residual_ms[0] > 0.0
    with pytest.raises(ValueError, match="backwards"):
        ekf.predict(fs, -1.0)
    with pytest.raises(KeyError, match="no input/output"):
        ekf.assimilate(fs, 1.0, {"h3": 1.0})
    with pytest.raises(KeyError, match="unknown name"):
        ekf.initial({"soc": 0.5})
    with pytest.raises(ValueError, match="> 0"):
        ekf.initial(std={"h1": 0.0})


def _random_events(model, ekf, n, seed):
    """`n` events for a twin of `model`: jittered times, 30 % of values missing, 10 % bad quality."""
    rng = np.random.default_rng(seed)
    fs0 = ekf.initial()
    t = 1.7e9 + model.default_dt * np.cumsum(rng.integers(1, 4, n))
    y0 = np.asarray(model.observe_vector(jnp.asarray(fs0.x), jnp.asarray(fs0.u), ekf.params))
    typical = np.concatenate([np.where(fs0.u == 0, 1.0, fs0.u), y0])[[
        [*model.input_names, *model.output_names].index(name) for name in ekf.measured_names]]
    values = typical * (1 + 0.01 * rng.normal(size=(n, len(typical))))
    values[rng.random(values.shape) < 0.3] = np.nan
    return t, values, rng.random(n) > 0.1


MODELS = pytest.mark.parametrize("model", [THERMAL_RC, BATTERY_ECM, TWO_TANK], ids=lambda m: m.name)


@MODELS
def test_state_after_an_event_does_not_depend_on_how_events_were_split_into_calls(model):
    """Live twins run each batch through one kernel call, recovery replays the log in one call:
    both must give the same bits (padding steps are exact no-ops; missing inputs are held, bad
    quality skips the update, partially measured outputs are masked)."""
    ekf = ExtendedKalmanFilter(model, model.param_vector())
    fs0 = ekf.initial()
    n = 70
    t, values, use_outputs = _random_events(model, ekf, n, seed=3)
    whole = ekf.assimilate_many(fs0, t, values, use_outputs)
    assert np.all(np.isfinite(whole.x)) and whole.updates[-1] > 0
    for sizes in ([1] * 5 + [65], [3, 9, 1, 40, 17], [35, 35]):
        fs, start, xs, Ps = fs0, 0, [], []
        for size in sizes:
            part = ekf.assimilate_many(fs, t[start:start + size], values[start:start + size],
                                       use_outputs[start:start + size])
            xs.append(part.x)
            Ps.append(part.P)
            fs, start = part.state(len(part) - 1), start + size
        np.testing.assert_array_equal(np.concatenate(xs), whole.x)
        np.testing.assert_array_equal(np.concatenate(Ps), whole.P)
        assert fs.divergence == whole.state(n - 1).divergence
        np.testing.assert_array_equal(fs.u, whole.u[-1])


@MODELS
def test_twin_bits_do_not_depend_on_the_twins_sharing_its_dispatch(model):
    """Twins of a model share kernel dispatches (`LANES` at a time, any mix of run lengths,
    parameters and noise); each twin's result must be the bits it gets alone (as in a replay)."""
    noisy = ExtendedKalmanFilter(model, model.param_vector(),
                                 measurement_std={n: 0.1 for n in model.output_names},
                                 process_std={n: 1e-3 for n in model.state_names})
    plain = ExtendedKalmanFilter(model, model.param_vector())
    lengths = [1, 3, 9, 17, 35, 65]
    runs = []
    for k in range(LANES + 7):  # two dispatches, the second partly empty
        ekf = (plain, noisy)[k % 2]
        runs.append(Run(ekf, ekf.initial(), *_random_events(model, ekf, lengths[k % len(lengths)], seed=100 + k)))
    for run, shared in zip(runs, assimilate_runs(runs)):
        alone = assimilate_runs([run])[0]
        for a, b in zip(alone, shared):
            np.testing.assert_array_equal(a, b)


def test_runs_longer_than_one_dispatch_continue_exactly(monkeypatch):
    """A run longer than `MAX_RUN` is cut into consecutive dispatches: same bits as uncut."""
    import raytwin.estimation as estimation

    ekf = ExtendedKalmanFilter(THERMAL_RC, THERMAL_RC.param_vector())
    t, values, use_outputs = _random_events(THERMAL_RC, ekf, 35, seed=5)
    whole = ekf.assimilate_many(ekf.initial(), t, values, use_outputs)
    monkeypatch.setattr(estimation, "MAX_RUN", 16)
    cut = ekf.assimilate_many(ekf.initial(), t, values, use_outputs)
    for a, b in zip(whole, cut):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="at least one event"):
        assimilate_runs([Run(ekf, ekf.initial(), t[:0], values[:0], use_outputs[:0])])


def test_runs_of_several_models_in_one_call_keep_their_own_bits():
    """`assimilate_runs` packs the runs of each model together (events given as arrays or, as
    twins give them, as lists of rows), one-event runs next to runs longer than one dispatch;
    each run's trace and final state (also as packed for its next dispatch) are the bits it gets alone."""
    runs = []
    for k, model in enumerate([THERMAL_RC, BATTERY_ECM, TWO_TANK] * 3):
        ekf = ExtendedKalmanFilter(model, model.param_vector())
        t, values, use_outputs = _random_events(model, ekf, (1, 9, 70)[k // 3], seed=300 + k)
        runs.append(Run(ekf, ekf.initial(), *((t, values, use_outputs) if k % 2 else
                                              (t.tolist(), list(values), use_outputs.tolist()))))
    traces = assimilate_runs(runs)
    assert len(traces) == len(runs)
    for run, trace, final, packed in zip(runs, traces, traces.final_states(), traces.final_packed(), strict=True):
        alone = assimilate_runs([run])[0]
        assert len(trace) == len(run.t) and np.all(np.isfinite(trace.x))
        for a, b in zip(alone, trace):
            np.testing.assert_array_equal(a, b)
        last = alone.state(len(alone) - 1)
        assert final.t == last.t and final.divergence == last.divergence == packed.state().divergence
        for a, b, c in ((final.x, last.x, packed.state().x), (final.P, last.P, packed.state().P),
                        (final.u, last.u, packed.state().u)):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


def test_a_traces_rows_and_fields_read_alone_are_those_of_its_unpacked_trace():
    """`Traces` keeps each model's dispatches packed (`ModelTrace`) and unpacks a `FilterTrace` only when
    asked: the states it reads from single rows (`Traces.state`, a twin's checkpoints) and the fields it
    reads alone (`refused`, `final_packed`) are, in values and types, those of the unpacked trace; and a
    filter's constants row (`ExtendedKalmanFilter.consts`, made once) is its fields packed."""
    import raytwin.estimation as estimation

    runs = []
    for k, model in enumerate([THERMAL_RC, BATTERY_ECM, THERMAL_RC, TWO_TANK]):
        ekf = ExtendedKalmanFilter(model, model.param_vector())
        runs.append(Run(ekf, ekf.initial(), *_random_events(model, ekf, (1, 9, 70, 3)[k], seed=700 + k)))
    traces = assimilate_runs(runs)
    for k, run in enumerate(runs):
        unpacked = traces.packed[run.filter._kernels]
        for i in range(len(run.t)):
            alone, full = traces.state(k, i), unpacked.state(int(traces.starts[k]) + i)
            assert alone.t == full.t and type(alone.t) is type(full.t) and alone.divergence == full.divergence
            for a, b in zip((alone.x, alone.P, alone.u, *alone.divergence), (full.x, full.P, full.u, *full.divergence)):
                np.testing.assert_array_equal(a, b)
                assert type(a) is type(b)
    for kernels, model_trace in traces.models.items():
        unpacked = traces.packed[kernels]
        for name in estimation.Divergence._fields:
            a, b = model_trace.field(name), getattr(unpacked, name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    for run in runs:
        fields = [np.asarray(getattr(run.filter, n)) for n in ("params", "q_var_rate", "r_var", "det")]
        row, shapes = run.filter.consts
        assert row.tobytes() == estimation._pack(np, [f[None] for f in fields], (1,))[0].tobytes()
        assert shapes == tuple(f.shape for f in fields)


@MODELS
def test_packed_states_continue_with_the_bits_of_unpacked_ones(model):
    """A live twin's state goes from one dispatch into the next packed (`Traces.final_packed`: rows of one
    `FinalRows`): it unpacks to exactly `final_states`, flags drift as its `Divergence` does, and the next
    runs give the same bits from it as from its `FilterState`, alone (its rows gathered in any order) or
    with unpacked starts in one dispatch."""
    ekf = ExtendedKalmanFilter(model, model.param_vector())
    events = [_random_events(model, ekf, n, seed=400 + n) for n in (1, 3, 9, 70)]
    t, v, u = _random_events(model, ekf, 4, seed=404)
    events.append((t, np.full_like(v, np.nan), u))  # nothing measured: no update, empty per-output fields
    first = assimilate_runs([Run(ekf, ekf.initial(), t[:-1], v[:-1], u[:-1]) if len(t) > 1 else
                             Run(ekf, ekf.initial(), t, v, u) for t, v, u in events])
    packed, unpacked = first.final_packed(), first.final_states()
    assert [p.row for p in packed] == list(range(len(events))) and all(p.rows is packed[0].rows for p in packed)
    for p, fs in zip(packed, unpacked):
        state = p.state()
        assert state.t == fs.t and p.drift == fs.divergence.drift
        for a, b in zip((state.x, state.P, state.u, *state.divergence), (fs.x, fs.P, fs.u, *fs.divergence)):
            np.testing.assert_array_equal(a, b)  # NaN equals NaN: a diverged twin is among them
            assert type(a) is type(b)
    later = [(t[-1:] + model.default_dt * (len(t) == 1), v[-1:], u[-1:]) for t, v, u in events]
    reference = assimilate_runs([Run(ekf, fs, *e) for fs, e in zip(unpacked, later)])
    mixed = [p if k % 2 else fs for k, (p, fs) in enumerate(zip(packed, unpacked))]
    order = list(range(len(later)))
    for starts, runs in ((packed, order), (mixed, order), (packed[::-1], order[::-1])):
        traces = assimilate_runs([Run(ekf, starts[i], *later[k]) for i, k in enumerate(runs)])
        for i, k in enumerate(runs):
            for a, b in zip(reference[k], traces[i]):
                np.testing.assert_array_equal(a, b)


@MODELS
def test_one_event_runs_take_the_bits_of_the_general_packing(model):
    """A batch whose runs are one event each (a live batch's usual shape) is packed by its own path
    (`_single_events`): the same kernel inputs and traces as the general packing (`_run_events`) gives
    them, for priors and packed starts, events without inputs or outputs, bad quality and an infinite
    reading, with two filters of the model in one dispatch."""
    import raytwin.estimation as estimation

    filters = [ExtendedKalmanFilter(model, model.param_vector()),
               ExtendedKalmanFilter(model, model.param_vector(), process_std={n: 1e-3 for n in model.state_names})]
    warm = assimilate_runs([Run(f, f.initial(), *_random_events(model, f, 3, seed=500 + k))
                            for k, f in enumerate(filters)]).final_packed()
    runs = []
    for k in range(LANES + 9):  # two dispatches
        f = filters[k % 2]
        t, v, u = _random_events(model, f, 1, seed=600 + k)
        v[0, -1] = np.inf if k == 5 else v[0, -1]
        start = warm[k % 2] if k % 3 == 0 else f.initial()
        runs.append(Run(f, start, t + 1e4 if k % 4 else [t[0] + 1e4], list(v), [bool(u[0]) and k % 7 > 0]))
    n = np.ones(len(runs), dtype=np.int64)
    t0 = np.array([np.nan if r.start.t is None else r.start.t for r in runs])
    u0 = np.array([r.start.u for r in runs])
    columns = (np.array([r.t[0] for r in runs]), np.array([r.values[0] for r in runs]),
               np.array([r.use_outputs[0] for r in runs]))
    single = estimation._single_events(filters[0], *columns, 2, t0, u0)
    general = estimation._run_events(runs, n, 2, t0, u0)
    for a, b in zip(single, general):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    fast = assimilate_runs(runs)
    slow = estimation._traces([r.filter for r in runs], [r.start for r in runs], n,
                              lambda ks, *shape: estimation._run_events([runs[k] for k in ks], *shape))
    for k in range(len(runs)):
        for a, b in zip(fast[k], slow[k]):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(fast.final_packed(), slow.final_packed()):
        assert a.carry.tobytes() == b.carry.tobytes() and a.u.tobytes() == b.u.tobytes() and a.t == b.t


def test_a_ten_year_gap_is_integrated_with_bounded_work_and_the_twin_keeps_tracking(monkeypatch):
    """A device whose clock jumped 10 years used to cost 5.3M RK4 sub-steps (its shard served nobody
    meanwhile): the gap is integrated for at most `MAX_SUBSTEPS` sub-steps, the covariance grows by the
    process noise of the rest, and measurements after it are tracked again, with the same bits
    whether the gap event comes in the same call as its neighbours or not (live vs recovery)."""
    import raytwin.estimation as estimation

    substeps_per_dispatch: list[int] = []
    kernels = estimation._kernels

    def counting(model):  # spy on the sub-step counts the kernel runs (its `n_sub` argument)
        k = kernels(model)

        def assimilate(carry, consts, n_sub, events, **kw):
            substeps_per_dispatch.append(int(np.asarray(n_sub).sum()))
            return k.assimilate(carry, consts, n_sub, events, **kw)

        return k._replace(assimilate=assimilate)

    monkeypatch.setattr(estimation, "_kernels", counting)
    m = THERMAL_RC
    ekf = ExtendedKalmanFilter(m, m.param_vector())
    decade = 10 * 365 * 86400.0
    t = np.concatenate([1.7e9 + 60.0 * np.arange(20), 1.7e9 + decade + 60.0 * np.arange(60)])
    truth = np.where(t < 1.7e9 + decade, 294.0, 291.0)  # the room is 3 K colder after the jump
    values = np.full((len(t), len(ekf.measured_names)), np.nan)
    values[:, ekf.measured_names.index("T_in")] = truth
    use = np.ones(len(t), dtype=bool)
    whole = ekf.assimilate_many(ekf.initial(), t, values, use)
    assert max(substeps_per_dispatch) <= estimation.MAX_SUBSTEPS + 64  # the gap, and at most 1 per other event
    assert sum(substeps_per_dispatch) < 2 * estimation.MAX_SUBSTEPS
    after_gap = whole.state(20)
    assert np.all(np.isfinite(after_gap.P)) and np.sqrt(after_gap.P[1, 1]) > 10.0  # T_m: little known after 10 years
    last = whole.state(len(t) - 1)
    assert abs(last.x[0] - 291.0) < 0.1 and not last.divergence.drift and not last.divergence.diverged
    before = ekf.assimilate_many(ekf.initial(), t[:20], values[:20], use[:20])
    split = ekf.assimilate_many(before.state(19), t[20:], values[20:], use[20:])
    np.testing.assert_array_equal(split.x, whole.x[20:])
    np.testing.assert_array_equal(split.P, whole.P[20:])
    look_ahead = ekf.predict(before.state(19), t[20])  # explicit look-ahead takes the same path
    np.testing.assert_array_equal(look_ahead.P, ekf.assimilate_many(before.state(19), t[20:21], values[20:21] * np.nan,
                                                                    use[20:21]).P[0])


def test_a_filter_that_stops_being_finite_is_flagged():
    """T_in = 1e300 K made NIS inf and then NaN, and because NaN > bound is false `drift` stayed False:
    a non-finite state or NIS now marks the twin as diverged (and drifting) from the first such event."""
    ekf = ExtendedKalmanFilter(THERMAL_RC, THERMAL_RC.param_vector())
    fs = ekf.assimilate(ekf.initial(), 0.0, {"T_in": 293.0})
    assert not fs.divergence.diverged and not fs.divergence.drift
    fs = ekf.assimilate(fs, 60.0, {"T_in": 1e300})
    assert fs.divergence.diverged and fs.divergence.drift and fs.divergence.updates == 2
    fs = ekf.assimilate(fs, 120.0, {"T_in": 293.0})
    assert fs.divergence.diverged and fs.divergence.drift
    healthy = ekf.assimilate(ekf.initial(), 0.0, {"T_in": 293.0})
    broken = ekf.assimilate(healthy._replace(x=np.array([np.nan, 293.0])), 60.0, {"T_out": 280.0})  # no update
    assert broken.divergence.updates == 1 and broken.divergence.diverged and broken.divergence.drift


@pytest.mark.parametrize("gap_s", [3 * 3600.0, 86400.0])
def test_a_reading_after_a_silence_the_prediction_cannot_cross_updates_the_state_before_it(gap_s):
    """The tester's case: a two_tank twin's first reading, then fresh ones hours later. Its pump held off, the
    prediction drains both tanks to 0 within minutes, where the EKF's Jacobian of sqrt(h) is infinite: the
    predicted covariance is NaN. The fresh reading was refused (dead-lettered) and the twin kept the hours-old
    level; now it updates the state before the gap, its covariance grown by the gap's process noise, is
    counted as a restart and the twin tracks the fresh readings. Events after it are ordinary ones."""
    f = ExtendedKalmanFilter(TWO_TANK, TWO_TANK.param_vector())
    t = np.array([0.0, gap_s, gap_s + 1, gap_s + 2])
    cols = f.measured_names
    values = np.full((len(t), len(cols)), np.nan)
    values[:, cols.index("h1")] = [0.5, 0.45, 0.45, 0.45]
    values[:, cols.index("h2")] = [0.4, 0.35, 0.35, 0.35]
    values[1:, cols.index("q_in")] = 1.2e-4
    trace = f.assimilate_many(f.initial(), t, values, np.ones(len(t), dtype=bool))
    assert trace.refused.tolist() == [0, 0, 0, 0] and trace.restarted.tolist() == [False, True, False, False]
    assert trace.restarts.tolist() == [0, 1, 1, 1]
    assert np.isfinite(trace.x).all() and np.isfinite(trace.P).all() and not trace.state(3).divergence.diverged
    np.testing.assert_allclose(trace.x[1:], [[0.45, 0.35]] * 3, atol=5e-3)  # the fresh level, not 0.5, 0.4
    # the explicit look-ahead over the gap (a NaN covariance before) is the prior the kernel restarted from: the
    # state before the gap, its covariance grown by the gap's process noise; a reading at its time updates it to
    # the restarted state, and a shadow evaluation's score of that reading is finite
    before = trace.state(0)
    ahead = f.predict(before, t[1])
    np.testing.assert_array_equal(ahead.x, before.x)
    np.testing.assert_allclose(ahead.P, before.P + np.diag(f.q_var_rate * before.divergence.q_scale * gap_s),
                               rtol=1e-12)
    updated = f.assimilate_many(ahead, t[1:2], values[1:2], np.ones(1, dtype=bool))
    np.testing.assert_array_equal(updated.x[0], trace.x[1])
    np.testing.assert_array_equal(updated.P[0], trace.P[1])
    assert all(math.isfinite(v) for v in score_event(f, before, t[1], values[1], True))


@pytest.mark.parametrize("kind", ["ekf", "ukf"])
def test_an_update_the_model_is_not_defined_for_is_refused_and_the_twin_keeps_its_state(kind):
    """`BOUNDED_RC` is NaN above 300 K. A measurement of 313 K would put the estimate where the model cannot
    step (refused by the look-ahead step); an hour's heating crosses the bound within the prediction (the
    update itself is NaN, refused). Each refused event keeps the state before it, its covariance grown by
    the process noise of its gap, and later events apply: before, the twin stayed NaN for good. The same
    events split into calls refuse the same events with the same bits (what a log replay relies on)."""
    f = make_filter(kind, BOUNDED_RC, BOUNDED_RC.param_vector())
    cols = f.measured_names
    t = np.array([0.0, 60, 120, 180, 240, 300, 3900, 3960])
    values = np.full((len(t), len(cols)), np.nan)
    values[:, cols.index("T_in")] = [293.0, 293.1, 313.0, 293.2, 293.3, 293.3, np.nan, 293.3]
    values[5, cols.index("Q_h")], values[7, cols.index("Q_h")] = 2e4, 0.0  # 0.01 K/s: 300 K within the hour
    whole = f.assimilate_many(f.initial({"T_in": 293.0, "T_m": 293.0}), t, values, np.ones(len(t), dtype=bool))
    np.testing.assert_array_equal(np.flatnonzero(whole.refused_states), [2, 6])
    assert whole.refused.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert refused_names(int(whole.refused_states[2]), BOUNDED_RC.state_names) == (["T_in", "T_m"], True)
    assert refused_names(int(whole.refused_states[6]), BOUNDED_RC.state_names)[1] is False
    for i in (2, 6):
        np.testing.assert_array_equal(whole.x[i], whole.x[i - 1])
        grown = whole.P[i - 1] + np.diag(f.q_var_rate * whole.q_scale[i - 1] * (t[i] - t[i - 1]))
        np.testing.assert_allclose(whole.P[i], grown, rtol=1e-12)
    final = whole.state(len(t) - 1)
    assert np.isfinite(final.x).all() and not final.divergence.diverged and final.divergence.refused == 2
    assert abs(final.x[0] - 293.3) < 0.1  # tracking again
    fs, xs = f.initial({"T_in": 293.0, "T_m": 293.0}), []
    for i in range(len(t)):
        fs = f.assimilate_many(fs, t[i:i + 1], values[i:i + 1], np.ones(1, dtype=bool)).state(0)
        xs.append(fs.x)
    np.testing.assert_array_equal(np.array(xs), whole.x)
    assert fs.divergence == final.divergence
