"""Quantiles of a sweep's metrics (`sweeps.aggregate.quantiles`) on 1e6 scenarios, overall and per group.

The dataset has the shape of the sweeps guide's example: 1e6 rows in part files of 16,384, a grid
dimension of 10 levels, a continuous (Latin-hypercube-like) one and four float32 metrics. Figures
are metric values per second (rows x metrics / wall time). Baseline: what `quantiles` did before
(`np.quantile` of a boolean mask per group, a full rescan per group), measured on the 10-level
grid and, for the continuous dimension (one group per scenario), on its first groups and
extrapolated. Every figure's bands are checked against `np.quantile` per group first.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark
from sweeps.aggregate import DEFAULT_QUANTILES, open_dataset, quantiles
from sweeps.runner import part_name, write_parquet

FULL_ROWS, QUICK_ROWS = 1_000_000, 20_000
CHUNK = 16_384
METRICS = ("T_in_max", "T_in_min", "energy_kwh", "discomfort_s")
GRID, CONTINUOUS, BINS = "param.C_in", "input.T_out_mean", 20
RESCAN_SAMPLE = 200  # continuous-dimension groups the old algorithm is timed on


def write_dataset(root: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    table = pa.table({
        "scenario": np.arange(n, dtype=np.int64),
        GRID: rng.choice(np.linspace(0.7, 1.3, 10), n),
        CONTINUOUS: rng.uniform(263.15, 283.15, n),
        **{m: rng.normal(300.0, 10.0, n).astype(np.float32) for m in METRICS},
    })
    for c in range(-(-n // CHUNK)):
        write_parquet(table.slice(c * CHUNK, CHUNK), f"{root}/{part_name(c)}", None)


def rescan(root: str, column: str, max_groups: int | None = None) -> int:
    """The previous algorithm: per metric, per group, a boolean mask over every row; returns groups done."""
    dataset = open_dataset(root)
    keys = dataset.to_table(columns=[column])[column].to_numpy()
    groups, inverse = np.unique(keys, return_inverse=True)
    groups = groups[:max_groups]
    for metric in METRICS:
        values = dataset.to_table(columns=[metric])[metric].to_numpy().astype(np.float64)
        for g in range(groups.size):
            v = values[inverse == g]
            np.mean(v), np.quantile(v, DEFAULT_QUANTILES)
    return groups.size


def check_against_numpy(root: str, bands: pa.Table, column: str) -> float:
    """Largest |band - np.quantile| over every (group, metric) of `bands` grouped on `column` (exact: 0)."""
    table = open_dataset(root).to_table()
    keys = table[column].to_numpy()
    worst = 0.0
    for row in bands.to_pylist():
        values = table[row["metric"]].to_numpy()[keys == row[column]].astype(np.float64)
        got = [row[f"q{p:g}"] for p in DEFAULT_QUANTILES]
        worst = max(worst, float(np.max(np.abs(np.quantile(values, DEFAULT_QUANTILES) - got))))
    return worst


@benchmark("sweep-quantiles",
           "Quantiles of 1e6 sweep scenarios: overall, per grid level, per binned continuous dimension")
def sweep_quantiles(ctx: BenchContext) -> BenchResult:
    n = QUICK_ROWS if ctx.quick else FULL_ROWS
    result = BenchResult()
    unit, values = "values/s", n * len(METRICS)
    with tempfile.TemporaryDirectory(prefix="rtw-bench-quantiles-") as root:
        write_dataset(root, n)
        t_all, _ = ctx.measure("quantiles-all", lambda: quantiles(root))
        t_grid, by_grid = ctx.measure("quantiles-grid", lambda: quantiles(root, by=[GRID]))
        t_bins, by_bins = ctx.measure("quantiles-binned",
                                      lambda: quantiles(root, by=[CONTINUOUS], bins={CONTINUOUS: BINS}))
        result.checks["grid_max_abs_error_vs_numpy"] = check_against_numpy(root, by_grid, GRID)
        if result.checks["grid_max_abs_error_vs_numpy"] != 0.0:
            raise AssertionError(f"grouped quantiles differ from np.quantile: {result.checks}")
        result.checks["binned_groups"] = by_bins.num_rows // len(METRICS)
        t_old_grid, _ = ctx.measure("rescan-grid", lambda: rescan(root, GRID), warmup=0, repeat=min(ctx.repeat, 3))
        sample = min(RESCAN_SAMPLE, n)
        t_old_cont, _ = ctx.measure("rescan-continuous", lambda: rescan(root, CONTINUOUS, sample), warmup=0,
                                    repeat=1)
        old_cont_s = t_old_cont.median_s * n / sample  # one group per scenario
        result.timings.update({"all": t_all, "grid": t_grid, "binned": t_bins, "rescan_grid": t_old_grid,
                               "rescan_continuous_sample": t_old_cont})
        rows = f"{n:,} rows x {len(METRICS)} metrics"
        result.figures += [
            Figure(f"{rows}, no groups", values / t_all.median_s, unit),
            Figure(f"{rows}, by {GRID} (10 levels)", values / t_grid.median_s, unit,
                   baseline="per-group rescan (previous)", baseline_value=values / t_old_grid.median_s),
            Figure(f"{rows}, by {CONTINUOUS} in {BINS} bins", values / t_bins.median_s, unit,
                   baseline=f"previous, by {CONTINUOUS} unbinned ({n:,} groups), extrapolated from {sample}",
                   baseline_value=values / old_cont_s),
        ]
        result.notes.append(f"previous algorithm by {CONTINUOUS}: ~{old_cont_s:,.0f} s extrapolated "
                            f"(now refused without bins: one group per scenario is no uncertainty band)")
    return result
