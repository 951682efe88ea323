"""Reading a sweep's results: only the exact part files, and exact quantiles per group in one pass.

No Ray: the datasets are written with the runner's own Parquet writer, as a finished sweep leaves them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from sweeps.aggregate import IncompleteRun, open_dataset, quantiles
from sweeps.cli import sweep_app
from sweeps.runner import part_name, write_parquet
from sweeps.runs import RunRecord, RunStore

Q = (0.0, 0.05, 0.25, 0.5, 0.95, 1.0)


def _write_sweep(root, n: int = 3000, chunk: int = 1000, seed: int = 0) -> pa.Table:
    """A sweep-shaped dataset: a grid dimension, a continuous one, two float32 metrics; the whole table."""
    rng = np.random.default_rng(seed)
    table = pa.table({
        "scenario": np.arange(n, dtype=np.int64),
        "param.C_in": rng.choice([0.7, 1.0, 1.3], n),
        "input.T_out_mean": rng.uniform(263.15, 283.15, n),
        "energy_kwh": rng.normal(100.0, 10.0, n).astype(np.float32),
        "T_in_min": rng.normal(290.0, 1.0, n).astype(np.float32),
    })
    for c in range(-(-n // chunk)):
        write_parquet(table.slice(c * chunk, chunk), f"{root}/{part_name(c)}", None)
    return table


def test_leftover_temp_files_are_never_read_as_results(tmp_path):
    _write_sweep(tmp_path)
    before = quantiles(str(tmp_path), q=Q)
    data = (tmp_path / part_name(1)).read_bytes()
    # what a worker killed between write and rename leaves: complete and truncated, old and new names
    (tmp_path / f"{part_name(1)}.tmp-4242").write_bytes(data)
    (tmp_path / f"{part_name(2)}.tmp-4243").write_bytes(data[: len(data) // 2])
    (tmp_path / f".{part_name(1)}.4244.tmp").write_bytes(data)
    (tmp_path / f".{part_name(2)}.4245.tmp").write_bytes(data[:100])
    assert open_dataset(str(tmp_path)).count_rows() == 3000
    after = quantiles(str(tmp_path), q=Q)
    assert after.equals(before) and after["count"].to_pylist() == [3000, 3000]


def test_a_writer_killed_before_the_rename_leaves_a_hidden_name(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    def killed(*args, **kwargs):
        raise OSError("worker killed")

    monkeypatch.setattr(LocalFileSystem, "mv", killed)
    with pytest.raises(OSError):
        write_parquet(pa.table({"scenario": [0]}), f"{tmp_path}/{part_name(0)}", None)
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".") and not left.name.endswith(".parquet")
    with pytest.raises(FileNotFoundError, match="no sweep results"):
        open_dataset(str(tmp_path))


def test_grouped_quantiles_equal_numpy_per_group(tmp_path):
    table = _write_sweep(tmp_path)
    c_in, t_out = table["param.C_in"].to_numpy(), table["input.T_out_mean"].to_numpy()
    edges = [263.15, 268.15, 273.15, 278.15, 283.15]
    bands = quantiles(str(tmp_path), ["energy_kwh", "T_in_min"], q=Q, by=["param.C_in", "input.T_out_mean"],
                      bins={"input.T_out_mean": edges}).to_pylist()
    assert len(bands) == 2 * 3 * 4
    assert [(b["param.C_in"], b["input.T_out_mean.low"]) for b in bands[:5]] == [
        (0.7, 263.15), (0.7, 268.15), (0.7, 273.15), (0.7, 278.15), (1.0, 263.15)]
    for b in bands:
        high = t_out < b["input.T_out_mean.high"] if b["input.T_out_mean.high"] < 283.15 else t_out <= 283.15
        mask = (c_in == b["param.C_in"]) & (t_out >= b["input.T_out_mean.low"]) & high
        values = table[b["metric"]].to_numpy()[mask].astype(np.float64)
        assert b["count"] == mask.sum() > 0
        assert [b[f"q{p:g}"] for p in Q] == np.quantile(values, Q).tolist()  # exact, bit for bit
        assert b["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert sum(b["count"] for b in bands) == 2 * 3000
    # N equal-width bins over the values seen: every scenario in exactly one bin
    counted = quantiles(str(tmp_path), ["energy_kwh"], by=["input.T_out_mean"], bins={"input.T_out_mean": 7})
    assert counted.num_rows == 7 and sum(counted["count"].to_pylist()) == 3000
    assert counted["input.T_out_mean.low"][0].as_py() == t_out.min()
    assert counted["input.T_out_mean.high"][6].as_py() == t_out.max()


def test_ungrouped_quantiles_equal_numpy_and_nan_propagates(tmp_path):
    table = _write_sweep(tmp_path, n=1001, chunk=400)
    bands = quantiles(str(tmp_path), ["energy_kwh"], q=Q).to_pylist()
    energy = table["energy_kwh"].to_numpy().astype(np.float64)
    assert [bands[0][f"q{p:g}"] for p in Q] == np.quantile(energy, Q).tolist()
    nan_row = pa.table({"scenario": [1001], "param.C_in": [0.7], "input.T_out_mean": [270.0],
                        "energy_kwh": pa.array([np.nan], pa.float32()), "T_in_min": pa.array([290.0], pa.float32())})
    write_parquet(nan_row, f"{tmp_path}/{part_name(9)}", None)
    nan_groups = {b["param.C_in"]: np.isnan(b["q0.5"]) for b in quantiles(str(tmp_path), ["energy_kwh"],
                                                                          by=["param.C_in"]).to_pylist()}
    assert nan_groups == {0.7: True, 1.0: False, 1.3: False}  # as np.quantile: a NaN poisons its own group only


def test_a_continuous_dimension_is_refused_with_what_to_do(tmp_path):
    _write_sweep(tmp_path, n=12_000, chunk=4000)
    with pytest.raises(ValueError, match=r"input.T_out_mean has 12000 distinct values.*--bins input.T_out_mean=20"):
        quantiles(str(tmp_path), ["energy_kwh"], by=["input.T_out_mean"])
    with pytest.raises(ValueError, match="more than max_groups=2"):
        quantiles(str(tmp_path), ["energy_kwh"], by=["param.C_in"], max_groups=2)
    with pytest.raises(ValueError, match="lie outside the bin edges"):
        quantiles(str(tmp_path), by=["input.T_out_mean"], bins={"input.T_out_mean": [270.0, 280.0]})
    with pytest.raises(ValueError, match=r"not among by=\[\]: group on them too.*--by input.T_out_mean"):
        quantiles(str(tmp_path), bins={"input.T_out_mean": 3})


def test_a_sampled_dimension_of_fewer_scenarios_than_max_groups_is_refused_too(tmp_path):
    """A 500-scenario LHS grouped on one of its dimensions answered 500 "bands" of one scenario each (only more than
    max_groups=10,000 groups were refused): the refusal now names the column and a binning sized to the sweep."""
    _write_sweep(tmp_path, n=500, chunk=500)
    with pytest.raises(ValueError, match=r"input.T_out_mean has 500 distinct values in 500 scenarios.*"
                                         r"--bins input.T_out_mean=5: 5 equal-width bins .* ~100 scenarios each"):
        quantiles(str(tmp_path), ["energy_kwh"], by=["input.T_out_mean"])
    grid = tmp_path / "grid"  # a 2 x 2 grid grouped on both dimensions: one scenario a group too
    grid.mkdir()
    write_parquet(pa.table({"scenario": [0, 1, 2, 3], "param.C_in": [0.7, 0.7, 1.3, 1.3],
                            "input.T_out_mean": [263.15, 283.15, 263.15, 283.15], "energy_kwh": [1.0, 2.0, 3.0, 4.0]}),
                  f"{grid}/{part_name(0)}", None)
    with pytest.raises(ValueError, match=r"put each of the 4 scenarios in a group of its own"):
        quantiles(str(grid), by=["param.C_in", "input.T_out_mean"])
    assert quantiles(str(grid), by=["param.C_in"])["count"].to_pylist() == [2, 2]
    binned = quantiles(str(tmp_path), ["energy_kwh"], by=["input.T_out_mean"], bins={"input.T_out_mean": 5})
    assert binned.num_rows == 5 and sum(binned["count"].to_pylist()) == 500
    assert quantiles(str(tmp_path), ["energy_kwh"], by=["param.C_in"]).num_rows == 3  # a grid's levels: groups
    refused = CliRunner().invoke(sweep_app, ["quantiles", str(tmp_path), "--by", "input.T_out_mean"])
    assert refused.exit_code == 2 and "--bins input.T_out_mean=5" in refused.output


def test_cli_quantiles_by_a_binned_dimension(tmp_path):
    _write_sweep(tmp_path, n=12_000, chunk=4000)
    runner = CliRunner()
    args = ["quantiles", str(tmp_path), "--metric", "energy_kwh", "--by", "input.T_out_mean", "--q", "0.5"]
    refused = runner.invoke(sweep_app, args)
    assert refused.exit_code == 2 and "--bins input.T_out_mean=20" in refused.output
    binned = runner.invoke(sweep_app, [*args, "--bins", "input.T_out_mean=4"])
    assert binned.exit_code == 0, binned.output
    header, *rows = binned.output.strip().splitlines()
    assert header.split("\t") == ["input.T_out_mean.low", "input.T_out_mean.high", "metric", "count", "mean", "q0.5"]
    assert len(rows) == 4 and sum(int(r.split("\t")[3]) for r in rows) == 12_000
    edges = runner.invoke(sweep_app, [*args, "--bins", "input.T_out_mean=263.15,273.15,283.15"])
    assert edges.exit_code == 0 and len(edges.output.strip().splitlines()) == 3
    bad = runner.invoke(sweep_app, [*args, "--bins", "input.T_out_mean"])
    assert bad.exit_code == 2 and "COLUMN=N" in bad.output


def test_diverged_scenarios_are_counted_but_never_part_of_a_band(tmp_path):
    """A sweep marks scenarios whose states left the plausible range (NaN metrics, `diverged`):
    quantiles are those of the valid scenarios only, and each group says how many diverged."""
    for name in ("clean", "marked"):
        (tmp_path / name).mkdir()
    table = _write_sweep(tmp_path / "clean")
    diverged = np.arange(table.num_rows) % 7 == 0
    energy = np.where(diverged, np.nan, table["energy_kwh"].to_numpy())
    marked = table.set_column(3, "energy_kwh", pa.array(energy, pa.float32())).append_column(
        "diverged", pa.array(diverged))
    write_parquet(marked, f"{tmp_path / 'marked'}/{part_name(0)}", None)
    rows = quantiles(str(tmp_path / "marked"), q=(0.05, 0.5), by=["param.C_in"]).to_pylist()
    assert {r["metric"] for r in rows} == {"energy_kwh", "T_in_min"}  # `diverged` is no metric
    c_in = table["param.C_in"].to_numpy()
    for r in rows:
        group = c_in == r["param.C_in"]
        valid = marked[r["metric"]].to_numpy().astype(np.float64)[group & ~diverged]
        assert r["count"] == valid.size and r["diverged"] == int(np.sum(group & diverged)) > 0
        assert [r["q0.05"], r["q0.5"]] == pytest.approx(np.quantile(valid, [0.05, 0.5]), rel=1e-12)
        assert np.isfinite(r["mean"])


def _recorded_run(tmp_path, status: str, recorded_parts: int, written_parts: int) -> str:
    """A run's directory as `sweeps.runs` leaves it: its output's parts and its record beside them."""
    output = tmp_path / "runs" / "sweep-1" / "output"
    output.mkdir(parents=True)
    _write_sweep(output, n=written_parts * 1000)
    now = datetime.now(UTC)
    RunStore(str(tmp_path / "runs")).save(RunRecord(
        run_id="sweep-1", kind="sweep", status=status, user="u", tenant="t", model_ref="thermal_rc", model_hash="h",
        spec={}, seeds={}, package_versions={}, code_version="c", started=now, finished=now, output_url=str(output),
        outputs={part_name(c): "0" * 64 for c in range(recorded_parts)},
        error=None if status == "succeeded" else "cancelled by user"))
    return str(output)


def test_a_cancelled_runs_output_is_refused_unless_partial(tmp_path):
    """A grid writes its scenarios in index order: a cancelled run's parts are one corner of its space, and the
    researcher's median read 276.6 K where the whole sweep's is 328.9 K, without a word."""
    output = _recorded_run(tmp_path, "cancelled", recorded_parts=0, written_parts=1)
    with pytest.raises(IncompleteRun, match=r"run sweep-1 cancelled \(cancelled by user\); it holds 1000 scenario"):
        quantiles(output, q=Q)
    assert quantiles(output, q=Q, partial=True)["count"].to_pylist() == [1000, 1000]
    refused = CliRunner().invoke(sweep_app, ["quantiles", "sweep-1", "--runs", str(tmp_path / "runs")])
    assert refused.exit_code == 2 and "--partial" in refused.output
    read = CliRunner().invoke(sweep_app, ["quantiles", "sweep-1", "--runs", str(tmp_path / "runs"), "--partial"])
    assert read.exit_code == 0, read.output


def test_a_succeeded_run_missing_a_recorded_part_is_refused(tmp_path):
    complete = _recorded_run(tmp_path / "a", "succeeded", recorded_parts=3, written_parts=3)
    assert quantiles(complete, q=Q)["count"].to_pylist() == [3000, 3000]
    (tmp_path / "a" / "runs" / "sweep-1" / "output" / part_name(2)).unlink()
    with pytest.raises(IncompleteRun, match=r"recorded 3 part\(s\), 1 of them missing"):
        open_dataset(complete)


def test_a_run_id_is_read_from_the_runs_root_given_even_after_the_root_moved(tmp_path):
    """`sweep quantiles RUN_ID --runs ROOT` read the output where the run wrote it (the record's absolute
    `output_url`): a runs root copied off a cluster's disk or moved aside answered "no sweep results"."""
    _recorded_run(tmp_path / "a", "succeeded", recorded_parts=1, written_parts=1)
    (tmp_path / "a" / "runs").rename(tmp_path / "moved")
    read = CliRunner().invoke(sweep_app, ["quantiles", "sweep-1", "--runs", str(tmp_path / "moved")])
    assert read.exit_code == 0 and "energy_kwh\t1000" in read.output, read.output


def test_a_part_the_run_did_not_record_is_refused(tmp_path):
    """A leftover or copied part file beside a succeeded run's output doubled its count and moved its median."""
    output = _recorded_run(tmp_path, "succeeded", recorded_parts=2, written_parts=3)
    with pytest.raises(IncompleteRun, match=r"part\(s\) \['part-000002.parquet'\] are not among the 2 run sweep-1"):
        quantiles(output, q=Q)
    assert quantiles(output, q=Q, partial=True)["count"].to_pylist() == [3000, 3000]


def test_quantiles_of_a_run_that_is_no_sweep_say_what_it_is(tmp_path):
    """A calibration's run id answered "no sweep results (part-*.parquet) under ...", as if its files were lost."""
    _recorded_run(tmp_path, "succeeded", recorded_parts=1, written_parts=1)
    store = RunStore(str(tmp_path / "runs"))
    store.save(store.load("sweep-1").model_copy(update={
        "run_id": "calibration-1", "kind": "calibration", "outputs": {"calibration.json": "0" * 64, "fit.png": "1" * 64}}))
    refused = CliRunner().invoke(sweep_app, ["quantiles", "calibration-1", "--runs", str(tmp_path / "runs")])
    assert refused.exit_code == 2
    assert "is a calibration, not a sweep: its outputs are calibration.json, fit.png" in " ".join(
        refused.output.replace("│", "").split())
