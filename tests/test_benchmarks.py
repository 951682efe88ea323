"""Smoke test of the benchmark harness at tiny sizes. No timing is asserted: speed claims live in
benchmarks/RESULTS.md; here we check structure, agreement between implementations and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks import fused_tuning, lorenz_ensemble, sweep_gpu
from benchmarks.cli import bench_app
from benchmarks.fmu import AGREEMENT_ATOL
from benchmarks.harness import (CPU_KINDS, BenchContext, Figure, cpu_info, cpu_label, cpu_spent, cpu_split, cpu_times,
                                markdown_table, measure, owned_backend, processes_cpu_s, select)
from benchmarks.load import paced_sync
from benchmarks.roofline import rk4_flops_jaxpr
from benchmarks.thermal_scenarios import (
    CONTINUOUS_TOLERANCE,
    DISCRETE_TOLERANCE,
    METRICS,
    ThermalSweep,
    bench_spec,
    errors_by_metric,
    numpy_rk4,
    product_in_process,
    scipy_loop,
)
from connectors.mosquitto import mosquitto_binary
from raytwin.sim import THERMAL_RC
from raytwin.sim.checks import stability_limit


def test_measure_reports_median_and_first_run():
    calls = []
    timing, result = measure("t", lambda: calls.append(1) or len(calls), warmup=1, repeat=3)
    assert result == 4 and len(calls) == 4
    assert timing.repeats == 3 and timing.first_s is not None
    assert timing.min_s <= timing.median_s and timing.iqr_s >= 0


def test_figure_ratio_and_target():
    f = Figure("x", 30.0, "u", "base", 10.0, target_ratio=3.0)
    assert f.ratio == 3.0 and f.meets_target
    assert Figure("y", 1.0, "u").ratio is None and Figure("y", 1.0, "u").meets_target is None


def test_absolute_targets():
    assert Figure("p95", 8.0, "ms", target_max=10.0).meets_target
    assert not Figure("rate", 5e4, "events/s", target_min=1e5).meets_target
    assert Figure("p95", 8.0, "ms", target_max=10.0).target_text() == "<= 10 ms"


def test_cpu_split_is_the_share_of_each_kind_of_cpu_time_between_two_readings():
    before = (100, 50, 20, 1000, 0, 0, 5, 7)
    after = (130, 60, 30, 1040, 0, 0, 5, 17)  # 100 ticks: 30 user, 10 nice, 10 system, 40 idle, 10 steal
    assert cpu_split(before, after) == {"user": 30.0, "nice": 10.0, "system": 10.0, "idle": 40.0, "iowait": 0.0,
                                        "irq": 0.0, "softirq": 0.0, "steal": 10.0}
    assert cpu_split(None, after) is None and cpu_split(after, after) is None  # no reading, or no time between
    now = cpu_times()
    if now is not None:  # Linux: one count per kind
        assert len(now) == len(CPU_KINDS)


ZEN = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: {model}
model name\t: AMD EPYC
flags\t\t: fpu sse4_2 avx avx2 fma{more}

processor\t: 1
model name\t: another CPU
"""


def test_the_machine_record_tells_cpus_with_one_model_name_apart():
    """Zen 3 and Zen 4 VMs both name themselves "AMD EPYC": family, model and the widest SIMD level differ."""
    zen3, zen4 = cpu_info(ZEN.format(model=1, more="")), cpu_info(ZEN.format(model=17, more=" avx512f avx512bw"))
    assert zen3 == {"vendor": "AuthenticAMD", "family": 25, "model": 1, "model_name": "AMD EPYC", "simd": "avx2"}
    assert zen4["model"] == 17 and zen4["simd"] == "avx512f"
    assert cpu_label({"cpu": zen3}) == "AMD EPYC (AuthenticAMD family 25 model 1, avx2, no AVX-512)"
    assert cpu_label({"cpu": zen4}) == "AMD EPYC (AuthenticAMD family 25 model 17, avx512f)"
    assert cpu_label({"cpu_model": "AMD EPYC"}) == "AMD EPYC"  # a record written before `cpu` was
    unknown = cpu_info("")
    assert unknown["vendor"] is unknown["family"] is unknown["simd"] is None and unknown["model_name"]


def test_the_cpu_of_named_processes_is_read_together_and_a_missing_reading_is_no_figure():
    """The one reading of processes' CPU (the ingest, OPC UA, overload and serve benchmarks): seconds spent between
    two readings, by name; a process that cannot be read (gone, or no /proc) leaves no figure, never a failed run."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    this = {"this process": os.getpid()}
    before = processes_cpu_s(this)
    if before is not None:  # Linux
        busy_until = time.process_time() + 0.1
        while time.process_time() < busy_until:
            pass
        spent = cpu_spent(before, processes_cpu_s(this))
        assert list(spent) == ["this process"] and spent["this process"] > 0
    assert processes_cpu_s({**this, "gone": gone.pid}) is None
    assert cpu_spent(None, before) == cpu_spent(before, None) == {}


def test_paced_load_counts_failures_and_measures_from_due_time():
    result = paced_sync(400.0, 0.05, lambda i: i % 5 != 0)
    assert result.sent == 20 and result.unsent == 0 and result.failed == 4 and result.ok == 16
    assert result.latencies_s.min() >= 0 and result.elapsed_s >= 19 / 400.0
    assert set(result.summary()) >= {"p50_ms", "p95_ms", "p99_ms", "achieved_per_s"}


def test_unknown_benchmark_is_refused():
    with pytest.raises(KeyError, match="known"):
        select(["no-such-bench"])


def test_bench_spec_chunks_small_sweeps_for_every_worker():
    assert bench_spec(1000, workers=2).chunk_size == 500
    assert bench_spec(100_000, workers=2).chunk_size == 16_384
    assert bench_spec(3, workers=8).chunk_size == 1


def test_implementations_simulate_the_same_scenarios():
    """The product's kit and the independent NumPy / solve_ivp re-implementations agree."""
    spec = bench_spec(6, n_steps=720, workers=2)
    sweep = ThermalSweep.from_spec(spec)
    ref64 = numpy_rk4(sweep, np.float64)
    assert ref64.shape == (6, len(METRICS)) and np.all(np.isfinite(ref64))
    # the product in float64 computes the same sampled-data system: agreement to rounding
    product64 = product_in_process(ThermalSweep.from_spec(spec.model_copy(update={"dtype": "float64"})))
    np.testing.assert_allclose(product64, ref64, rtol=1e-10, atol=1e-8)
    assert not DISCRETE_TOLERANCE.violations(product_in_process(sweep), ref64)
    assert not DISCRETE_TOLERANCE.violations(numpy_rk4(sweep, np.float32), ref64)
    assert not CONTINUOUS_TOLERANCE.violations(scipy_loop(sweep), ref64)


def test_a_wrong_result_is_caught():
    sweep = ThermalSweep.from_spec(bench_spec(3, n_steps=60))
    ref = numpy_rk4(sweep)
    wrong = ref.copy()
    wrong[1, METRICS.index("T_in_min")] += 0.1  # 0.1 K off on one scenario
    assert set(DISCRETE_TOLERANCE.violations(wrong, ref)) == {"T_in_min"}
    assert errors_by_metric(ref, ref) == dict.fromkeys([*METRICS, "discomfort_s_mean"], 0.0)


def test_rk4_flop_count_matches_hand_count():
    # derivative: T_in 9 ops, T_m 5 ops -> 14, x4 stages = 56; three stage states x + h*k: 3 x 2 x 2 = 12;
    # combination per state: 2 doubling muls, 3 adds, 1 scale, 1 add = 7, x2 = 14. Total 82.
    assert rk4_flops_jaxpr(THERMAL_RC, 60.0) == 82


def quick(tmp_path, *names: str) -> dict:
    """`raytwin bench run NAMES --quick --repeat 1`: the JSON record (the run must succeed)."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_app, ["run", *names, "--quick", "--repeat", "1", "--out", str(out),
                                            "--log-level", "WARNING"])
    assert result.exit_code == 0, result.output
    assert "results written to" in result.output
    return json.loads(out.read_text())


def test_bench_cli_quick_end_to_end(ray_session, tmp_path):
    record = quick(tmp_path, "sweep", "roofline", "sweep-kits", "model-checks")
    assert {"cpu_model", "cpu", "cpu_count", "jax_devices", "packages", "commit", "date_utc"} <= set(record["machine"])
    assert cpu_label(record["machine"]) in markdown_table(record)
    if cpu_times() is not None:  # each benchmark says how busy the machine's CPUs were while it ran
        for result in record["benchmarks"].values():
            assert set(result["machine_cpu_pct"]) == set(CPU_KINDS)
            assert sum(result["machine_cpu_pct"].values()) == pytest.approx(100, abs=0.5)
        assert "The machine's CPUs while each ran" in markdown_table(record)
    sweep = record["benchmarks"]["sweep"]
    assert "error" not in sweep
    # every implementation agreed with float64 NumPy before anything was timed
    assert {"scipy_loop", "numpy_f32@64", "in_process@64", "ray_all@64", "ray_1@64"} <= set(sweep["checks"])
    for check in sweep["checks"].values():
        assert check["max_error"]["T_in_max"] <= check["tolerance"]["kelvin"]
    for fig in sweep["figures"]:
        assert math.isfinite(fig["value"]) and fig["value"] >= 0
        if fig["baseline_value"] is not None:
            assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline_value"])
    assert {t["repeats"] for t in sweep["timings"].values()} == {1}
    roof = record["benchmarks"]["roofline"]
    assert roof["checks"]["flops_per_step"]["jaxpr"] == 82
    assert any(f["target_ratio"] == 0.5 for f in roof["figures"])
    kits = record["benchmarks"]["sweep-kits"]  # the data kit computed the hand-written kit's metrics, then was timed
    assert set(kits["checks"]["max_abs_difference"]) == set(METRICS)
    (fig,) = kits["figures"]
    assert fig["target_ratio"] == 0.9 and fig["ratio"] == pytest.approx(fig["value"] / fig["baseline_value"])
    checked = record["benchmarks"]["model-checks"]  # the limits it timed are the model's
    assert checked["checks"]["thermal_rc/limits"]["default_s"] == pytest.approx(stability_limit(THERMAL_RC), rel=1e-12)
    assert [f["unit"] for f in checked["figures"]] == ["ms"] * 3
    assert checked["figures"][2]["baseline"] == "the whole ModelRegistry.register call"


QUICK_RUN = BenchContext.for_run(quick=True, repeat=1)
"""What `raytwin bench run --quick` runs with: tiny sizes, one timed run, no warm-up run."""


def test_gpu_sweep_path_checks_and_reports_on_any_device(ray_session):
    """`sweep-gpu`'s code (the path the H100 figures came from) on the CPU device at tiny sizes, the
    fused kernel as on a GPU (interpret mode) and checked against the XLA path."""
    res = sweep_gpu.accelerator_sweep(QUICK_RUN, jax.devices("cpu")[0], "pallas").as_dict()
    # all agreed with float64 NumPy, and the fused kernel with the XLA path
    assert set(res["checks"]) == {"in_process@512", "ray@512", "ray@512 (2 tasks in flight)", "in_process@512 vs xla"}
    names = [f["name"] for f in res["figures"]]
    assert "N=512 RayTwin engine in-process (pallas), CPU cpu" in names
    assert "N=512 RayTwin run_sweep, Ray CPU tasks" in names and "N=512 fused kernel vs XLA path, in-process, CPU cpu" in names
    assert "N=512 RayTwin run_sweep, the runner's tasks vs 2 in flight" in names
    assert all(f["target_min"] == sweep_gpu.H100_TARGET for f in res["figures"]
               if "RayTwin" in f["name"] and "vs 2 in flight" not in f["name"])


def test_lorenz_ensemble_gpu_path_checks_and_reports_on_any_device():
    """`lorenz-ensemble` as a GPU runs it (fused kernel included, interpret mode here) at N=8: every
    path checked before timing, the published figures reported as quoted baselines."""
    res = lorenz_ensemble.on_device(QUICK_RUN, jax.devices("cpu")[0],
                                    with_fused=True).as_dict()
    assert set(res["checks"]) == {"xla@8 vs float64 DOP853", "fused@8 vs xla", "diffrax@8 vs xla", "diffrax@8 steps"}
    assert res["checks"]["diffrax@8 steps"] == [lorenz_ensemble.STEPS]  # the same 1,000 steps as ours
    published = {f["baseline"]: f for f in res["figures"] if f["note"] == "published, not measured here"}
    assert published["DiffEqGPU GPUTsit5 (published, V100)"]["baseline_value"] == pytest.approx(8 * 1000 / 0.231724e-3)
    names = [f["name"] for f in res["figures"]]
    assert "N=8 RayTwin fused kernel (Pallas), CPU cpu" in names and "N=8 JAX/diffrax vmap (measured), CPU cpu" in names


def test_fused_tuning_checks_every_shape_against_the_xla_path():
    """`fused-tuning` as a GPU runs it, on the CPU device (interpret mode) at tiny sizes: each shape's
    results are checked before it is timed, and each shape is reported for both problems."""
    res = fused_tuning.shapes_on(QUICK_RUN, jax.devices("cpu")[0]).as_dict()
    shapes = fused_tuning.QUICK.shapes
    assert set(res["checks"]) == {f"{p} N=64 ({b}, {w}) vs xla" for p in ("Lorenz/Tsit5", "thermal RK4")
                                  for b, w in shapes}
    assert res["checks"]["Lorenz/Tsit5 N=64 (16, 1) vs xla"]["max_scaled_error"] <= 1e-6
    assert len(res["figures"]) == 2 * len(shapes) and all(f["value"] > 0 for f in res["figures"])


def test_gpu_sweep_without_a_gpu_measures_nothing_and_says_why(monkeypatch):
    monkeypatch.setattr(sweep_gpu, "gpu_devices", lambda: [])
    res = sweep_gpu.sweep_gpu(QUICK_RUN)
    assert not res.figures and res.notes[0].startswith("not run: JAX sees no GPU")


# the product paths end to end at tiny sizes (their checks must pass), one test each: each has the whole timeout


def test_bench_quick_ingest(ray_session, tmp_path):
    ingest = quick(tmp_path, "ingest")["benchmarks"]["ingest"]
    assert ingest["checks"]["events_applied_total"] == ingest["checks"]["events_sent"] > 0
    if cpu_times() is not None:
        assert ingest["checks"]["machine_cpu_pct_during_stream"]["idle"] < 100  # the stream's own window
        own = ingest["checks"]["process_cpu_pct_during_stream"]  # the driver's and each shard's share of a core
        assert own["driver"] > 0 and sum(v for name, v in own.items() if name.startswith("shard ")) > 0
        assert ingest["checks"]["machine_cpu_pct_during_batches"]["idle"] < 100  # the timed batched calls' window
    assert ingest["checks"]["stream_accepted"] > 0 and ingest["checks"]["latency_events"] > 0
    figures = {f["name"]: f["value"] for f in ingest["figures"]}
    gap = figures["probe: time between answers p50 (the resolution of ingest->queryable)"]
    round_trip = figures["probe: state query round trip p50 (waits for the shard's ingest call in progress)"]
    assert 0 < round_trip < gap  # an answer's gap is its round trip plus the poll interval


def test_bench_quick_shard_call(tmp_path, monkeypatch):
    """The shard-call A/B end to end on this tree against itself (a directory as the base: no git needed): the
    messy sequence's observables are compared (the benchmark raises if they differ) and both calls timed. The
    second tree loads the kernels the first compiled (`raytwin.executables`): the test's cost is one compile."""
    monkeypatch.setenv("RAYTWIN_BENCH_SHARD_BASE", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("RAYTWIN_EXECUTABLES_DIR", str(tmp_path / "kernels"))
    bench = quick(tmp_path, "shard-call")["benchmarks"]["shard-call"]
    (run,) = bench["checks"]["runs"]
    assert run["first"] == "base" and run["seeds"] == 1 and set(run["digests"]) >= {"reports", "log", "recovered"}
    assert all(f["value"] > 0 and f["baseline_value"] > 0 for f in bench["figures"])


def test_bench_quick_live_beside_batch(ray_session, tmp_path):
    """The stream alone and beside sweeps at each priority: every stream's events applied (the benchmark raises
    otherwise), a p95 of each, and the sweeps ran during the streams."""
    bench = quick(tmp_path, "live-beside-batch")["benchmarks"]["live-beside-batch"]
    p95 = bench["checks"]["p95_ms_each_round"]
    assert set(p95) == {"no sweep", "normal", "idle"} and all(len(v) == 1 and v[0] > 0 for v in p95.values())
    assert all(v[0] > 0 for v in bench["checks"]["sweep_steps_per_s_each_round"].values())


def test_bench_quick_calibration(ray_session, tmp_path):
    calibration = quick(tmp_path, "calibration")["benchmarks"]["calibration"]
    assert max(calibration["checks"]["two_tank"]["relative_error"].values()) < 0.02


def test_bench_quick_serve(ray_session, tmp_path):
    serve = quick(tmp_path, "serve")["benchmarks"]["serve"]
    for path in ("load", "haproxy load", "direct ingress load"):  # Serve's proxy, HAProxy, the replica's server
        load = serve["checks"][f"{path}@20"]
        assert load["ok"] == load["sent"] > 0 and load["failed"] == 0, path
    assert {f["unit"] for f in serve["figures"]} >= {"ms", "req/s"}


def test_bench_quick_changes(ray_session, tmp_path):
    changes = quick(tmp_path, "changes")["benchmarks"]["changes"]
    log = changes["checks"]["log"]
    assert log["twin_states"] > 0  # + drift flips, the type and the assets:
    assert log["changes"] == log["twin_states"] + log["drift_flips"] + 1 + log["twins"]
    assert {f["unit"] for f in changes["figures"]} == {"requests/s", "appends/s"}


def test_bench_quick_replay(ray_session, tmp_path):
    replayed = quick(tmp_path, "replay")["benchmarks"]["replay"]["checks"]
    assert set(replayed) == {"local disk", "S3 (moto, loopback)"} and all(r["events"] == 1_000 for r in replayed.values())


def test_bench_quick_query(ray_session, tmp_path):
    """The service's query pages equal the same queries over in-memory records (the benchmark raises otherwise)
    before each is timed; its setup builds twins straight in the shards, so it breaks when their API changes."""
    query = quick(tmp_path, "query")["benchmarks"]["query"]
    assert query["checks"]["every asset: matched"] == 400 and query["checks"]["catalog only: matched"] > 0
    assert len(query["figures"]) == 4 and all(f["value"] > 0 for f in query["figures"])


def test_a_benchmarks_backend_stops_its_store_watch_then_releases_its_twins(monkeypatch):
    """The query and changes benchmarks released their backend's twins alone: its store watch ran on in the caller's
    process, fenced, and set another test's fence gauge (CI's one failure). Both end, in that order, on a failure
    too."""
    from serve_apps import backend as backend_module

    ended: list[str] = []

    class Started:
        def __init__(self, config: object):
            self.twins = SimpleNamespace(close=lambda: ended.append("twins"))

        def close(self) -> None:
            ended.append("store watch")

    monkeypatch.setattr(backend_module, "Backend", Started)
    with pytest.raises(RuntimeError, match="the benchmark failed"), owned_backend(SimpleNamespace()):
        raise RuntimeError("the benchmark failed")
    assert ended == ["store watch", "twins"]


def test_bench_quick_reads_bounded(tmp_path):
    """Each read of a long history is timed with what it listed and read; the indexed command reads answer what a
    read of every command answered, reading the commands they answer with alone."""
    checks = quick(tmp_path, "reads-bounded")["benchmarks"]["reads-bounded"]["checks"]
    for read in ("one asset's commands", "a restarted connector's commands"):
        assert checks[f"{read} equal"] is True and checks[f"{read} found"] > 0
        assert checks[read] == {"listed": 1, "read": checks[f"{read} found"]}
        assert checks[f"{read}, not indexed (before)"]["read"] == checks["commands"]
    assert checks["a twin's deletion record"]["read"] == 1 and checks["a new twin's events"] == 0
    assert checks["jobs pages equal"] is True and checks["dead letters found"] > 0
    assert checks["a connector's dead letters, fewer than a page equal"] is True


def test_bench_quick_mqtt_kills(ray_session, tmp_path):
    """The MQTT connector SIGKILLed at random moments of a stream (the seed is in the checks): every event once."""
    mosquitto_binary(install=True)  # CI: a fresh machine
    kills = quick(tmp_path, "mqtt-kills")["benchmarks"]["mqtt-kills"]["checks"]
    assert kills["kills"] == len(kills["recovery_s"]) == 4
    assert kills["events_applied"] == kills["events_sent"] == {"mqtt 5": 400, "mqtt 3.1.1": 400}


def test_bench_cli_quick_fmu_sweep(ray_session, tmp_path):
    """The FMU benchmark builds its FMU, checks it against the reference output and JAX, then times."""
    bench = quick(tmp_path, "fmu-sweep")["benchmarks"]["fmu-sweep"]
    assert bench["checks"]["model_exchange_vs_jax"]["max_abs_error"] <= AGREEMENT_ATOL
    assert bench["checks"]["co_simulation_vs_reference_csv"]["max_abs_error"] == 0.0
    assert set(bench["checks"]["ray_instances_per_worker"].values()) == {1}
    assert [f["unit"] for f in bench["figures"]] == ["scenario-steps/s/core"] * 4
    assert all(math.isfinite(f["value"]) and f["value"] > 0 for f in bench["figures"])


def test_sweep_quantiles_benchmark_checks_against_numpy_and_reports_the_previous_algorithm(tmp_path):
    bench = quick(tmp_path, "sweep-quantiles")["benchmarks"]["sweep-quantiles"]
    assert bench["checks"]["grid_max_abs_error_vs_numpy"] == 0.0 and bench["checks"]["binned_groups"] == 20
    assert [f["baseline"] is not None for f in bench["figures"]] == [False, True, True]
    assert all(math.isfinite(f["value"]) and f["value"] > 0 for f in bench["figures"])


def test_bench_cli_list_and_bad_name():
    runner = CliRunner()
    listed = runner.invoke(bench_app, ["list"])
    assert listed.exit_code == 0 and "sweep" in listed.output and "roofline" in listed.output
    bad = runner.invoke(bench_app, ["run", "nope", "--quick"])
    assert bad.exit_code != 0 and "unknown benchmark" in bad.output
