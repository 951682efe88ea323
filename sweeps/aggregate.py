"""Uncertainty bands: quantiles of each metric over a sweep's scenarios, read from its Parquet dataset.

Only the needed columns are read, one metric at a time, so a million-scenario dataset costs a few
megabytes per metric. Quantiles are exact: `np.quantile` (linear interpolation) of each group's
values, per group of scenarios that share the values of some dimensions (e.g. per
outdoor-temperature level, over the ensemble of parameter samples).

Grouping sorts the rows by group once (O(n log n), shared by every metric); each group is then a
contiguous slice, so a metric costs O(n) whatever the number of groups (the previous per-group
rescan cost O(n x groups): ~1 h for 1e6 scenarios by a continuous dimension). A continuous
dimension (LHS or random sampling: every scenario its own value) has as many groups as scenarios,
which is no uncertainty band at all: a column with a different value in every scenario (whatever the
number of scenarios: a 500-scenario LHS gave 500 one-scenario "bands") is refused, and so is a grouping
that leaves every scenario alone or forms more than `max_groups` groups, with a message that names
the column and a binning; `bins` cuts such a column into intervals instead (equal width over the
values seen, or given edges).

Diverged scenarios (``diverged`` column: their states left the plausible range, metrics NaN) are
never part of a band: each row's `count` is its valid scenarios and `diverged` (in datasets that
have the column) how many of the group's scenarios diverged; a group with none valid has NaN mean and quantiles.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from raytwin.storage import filesystem
from raytwin.store_failures import store_io

DEFAULT_QUANTILES = (0.05, 0.5, 0.95)
MAX_GROUPS = 10_000
"""More groups than this are refused: bin the continuous dimension instead."""
PART_FILE = re.compile(r"part-\d+\.parquet")
"""The exact name of a result part; anything else in the directory (a killed writer's temporary
file, trajectories) is never read as results."""

RUN_RECORD = "run.json"
"""A recorded run's record (`sweeps.runs`), beside its output directory `RUN_OUTPUT`."""
RUN_OUTPUT = "output"

Bins = int | Sequence[float]
DIVERGED = "diverged"
"""The per-scenario divergence column (`sweeps.engine.DIVERGED`)."""


class IncompleteRun(ValueError):
    """The dataset is the output of a recorded run that did not finish: it holds only the scenarios written before
    the run stopped, in index order (a grid's first rows: one corner of its space), so its bands are not the sweep's."""


@store_io("read")
def open_dataset(url: str, storage_options: dict | None = None, *, partial: bool = False) -> ds.Dataset:
    """The sweep's metrics dataset: exactly the ``part-<n>.parquet`` files (trajectories are separate).

    The output of a recorded run (``<runs>/<id>/output``, its record beside it) is refused with `IncompleteRun`
    unless the run succeeded and its parts are exactly those it recorded (the files' hashes are not read here:
    `raytwin rerun` and the downloads check them); `partial` reads what is there anyway.
    """
    fs, root = filesystem(url, storage_options)
    parts = sorted(p for p in fs.ls(root, detail=False) if PART_FILE.fullmatch(p.rsplit("/", 1)[-1]))
    if not parts:
        raise FileNotFoundError(f"no sweep results (part-*.parquet) under {url}")
    dataset = ds.dataset(parts, format="parquet", filesystem=fs)
    if not partial:
        _check_complete(fs, root.rstrip("/"), url, {p.rsplit("/", 1)[-1] for p in parts}, dataset)
    return dataset


def _check_complete(fs, root: str, url: str, present: set[str], dataset: ds.Dataset) -> None:
    """Raise `IncompleteRun` where `root` is a recorded run's output and that run did not write all of it."""
    run_dir, name = root.rsplit("/", 1) if "/" in root else ("", root)
    record_path = f"{run_dir}/{RUN_RECORD}"
    if name != RUN_OUTPUT or not fs.exists(record_path):
        return  # not a recorded run's output (run_sweep's own directory): nothing says what complete is
    record = json.loads(fs.cat_file(record_path))
    recorded = {n for n in record.get("outputs", {}) if PART_FILE.fullmatch(n)}
    if record.get("status") == "succeeded" and recorded == present:
        return
    if record.get("status") != "succeeded":
        why = f"run {record.get('run_id')} {record.get('status')}" + (f" ({record['error']})" if record.get("error")
                                                                      else "")
    elif recorded - present:
        why = f"run {record.get('run_id')} recorded {len(recorded)} part(s), {len(recorded - present)} of them missing"
    else:  # a part the run never wrote (a leftover, a copy): its rows would be counted as the sweep's
        raise IncompleteRun(f"{url}: part(s) {sorted(present - recorded)} are not among the {len(recorded)} run "
                            f"{record.get('run_id')} recorded: remove them, or read the files as they are with "
                            "partial=True (CLI: --partial)")
    raise IncompleteRun(f"{url}: {why}; it holds {dataset.count_rows()} scenario(s), those written before it "
                        "stopped, in index order (a grid's first rows), so bands over them are not the sweep's: "
                        "rerun the sweep, or read what is there with partial=True (CLI: --partial)")


@store_io("read")  # (the dataset reads its rows lazily)
def quantiles(
    url: str,
    metrics: Sequence[str] | None = None,
    *,
    q: Sequence[float] = DEFAULT_QUANTILES,
    by: Sequence[str] = (),
    bins: Mapping[str, Bins] | None = None,
    max_groups: int = MAX_GROUPS,
    storage_options: dict | None = None,
    partial: bool = False,
) -> pa.Table:
    """One row per (group, metric): the group's dimension values, metric, count, mean and ``q<p>`` columns.

    `metrics` defaults to every metric column; `by` names dimension columns to group on.
    Diverged scenarios are left out of `count`, `mean` and the quantiles and counted in `diverged`.
    `bins` maps a `by` column to a number of equal-width bins over its range, or to bin edges
    (increasing; every value must lie within them); a binned column appears as ``<col>.low`` and
    ``<col>.high`` (each bin half-open, the last one closed). Groups without scenarios are left out.
    `partial`: see `open_dataset` (a recorded run that did not finish is refused without it).
    """
    dataset = open_dataset(url, storage_options, partial=partial)
    names = dataset.schema.names
    bins = dict(bins or {})
    unknown = [c for c in (*by, *(metrics or ())) if c not in names]
    if unknown:
        raise KeyError(f"unknown column(s) {unknown}; available: {names}")
    if not set(bins) <= set(by):
        unbinned = sorted(set(bins) - set(by))
        raise ValueError(f"bins given for {unbinned}, which are not among by={list(by)}: group on them too, "
                         f"by=[..., {unbinned[0]!r}] (CLI: --by {unbinned[0]})")
    if not all(0.0 <= p <= 1.0 for p in q):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(q)}")
    if metrics is None:
        metrics = [c for c in names if c not in ("scenario", DIVERGED) and "." not in c]
    keys = dataset.to_table(columns=list(by))
    if keys.num_rows == 0:
        raise ValueError(f"no scenarios in {url}")
    group_columns, codes = _group_keys(keys, by, bins, max_groups)
    valid = (~dataset.to_table(columns=[DIVERGED])[DIVERGED].to_numpy(zero_copy_only=False)
             if DIVERGED in names else np.ones(codes.size, dtype=bool))
    groups = int(codes.max()) + 1
    count = np.bincount(codes[valid], minlength=groups)
    diverged = np.bincount(codes[~valid], minlength=groups)
    order = np.argsort(codes[valid], kind="stable")  # one sort by group, shared by every metric
    rows: list[dict] = []
    for metric in metrics:
        values = dataset.to_table(columns=[metric])[metric].to_numpy().astype(np.float64)[valid]
        mean, bands = _grouped_quantiles(values, order, count, q)
        for g in range(count.size):
            row = {c: float(v[g]) for c, v in group_columns.items()}
            row.update(metric=metric, count=int(count[g]))
            if DIVERGED in names:
                row[DIVERGED] = int(diverged[g])
            row["mean"] = float(mean[g])
            row.update({f"q{p:g}": float(x) for p, x in zip(q, bands[g], strict=True)})
            rows.append(row)
    return pa.Table.from_pylist(rows)


def _group_keys(keys: pa.Table, by: Sequence[str], bins: dict[str, Bins], max_groups: int
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The output columns of each non-empty group (in sorted key order) and each row's group number."""
    if not by:
        return {}, np.zeros(keys.num_rows, dtype=np.intp)
    codes = np.zeros(keys.num_rows, dtype=np.int64)  # each row's group so far
    members = np.zeros((1, 0), dtype=np.int64)  # per group so far: its code in each by-column
    labels: list[dict[str, np.ndarray]] = []  # per by-column: the output columns of each code
    for col in by:
        values = keys[col].to_numpy().astype(np.float64)
        if col in bins:
            edges = _edges(col, values, bins[col])
            code = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, edges.size - 2)
            labels.append({f"{col}.low": edges[:-1], f"{col}.high": edges[1:]})
            size = edges.size - 1
        else:
            uniques, code = np.unique(values, return_inverse=True)
            if uniques.size == values.size > 1:
                raise ValueError(_one_per_scenario(col, values.size))
            if uniques.size > max_groups:
                raise ValueError(
                    f"{col} has {uniques.size} distinct values, more than max_groups={max_groups}: it is "
                    f"continuous; bin it, e.g. bins={{{col!r}: 20}} (CLI: --bins {col}=20), or raise max_groups")
            labels.append({col: uniques})
            size = uniques.size
        combined, codes = np.unique(codes * size + code.ravel(), return_inverse=True)  # stays < groups x size
        members = np.column_stack([members[combined // size], combined % size])
        if combined.size > max_groups:
            raise ValueError(f"{list(by)} form more than max_groups={max_groups} groups; "
                             "bin the continuous ones (bins=...) or group on fewer columns")
    if codes.size == combined.size > 1:
        raise ValueError(f"{list(by)} put each of the {codes.size} scenarios in a group of its own, so every 'band' "
                         "would be one scenario's value: group on fewer columns, or bin them (bins=..., CLI: --bins)")
    columns = {name: column[members[:, j]] for j, label in enumerate(labels) for name, column in label.items()}
    return columns, codes.ravel()


def _one_per_scenario(col: str, n: int) -> str:
    """Why grouping on `col`, a different value in each of the `n` scenarios, is refused, and the binning to use:
    about 100 scenarios a bin (so a 5 %/95 % band rests on some 5 of them), 2 to 20 bins."""
    k = min(max(n // 100, 2), 20)
    return (f"{col} has {n} distinct values in {n} scenarios: a sampled (lhs/random) dimension, every scenario its "
            f"own value, so each group would be one scenario and its 'band' that scenario's value; bin it, e.g. "
            f"bins={{{col!r}: {k}}} (CLI: --bins {col}={k}: {k} equal-width bins over the values seen, ~{n // k} "
            f"scenarios each), or give edges (--bins {col}=E0,E1,...)")


def _edges(col: str, values: np.ndarray, spec: Bins) -> np.ndarray:
    """Bin edges for `values`: `spec` equal-width bins over their range, or `spec` as the edges."""
    if isinstance(spec, int | np.integer):
        if spec < 1:
            raise ValueError(f"bins for {col} must be >= 1, got {spec}")
        return np.linspace(np.min(values), np.max(values), int(spec) + 1)
    edges = np.asarray(spec, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bin edges for {col} must be at least two increasing numbers, got {list(spec)}")
    outside = int(np.count_nonzero((values < edges[0]) | (values > edges[-1]) | np.isnan(values)))
    if outside:
        raise ValueError(f"{outside} values of {col} lie outside the bin edges [{edges[0]:g}, {edges[-1]:g}]")
    return edges


def _grouped_quantiles(values: np.ndarray, order: np.ndarray, count: np.ndarray, q: Sequence[float]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per group: mean and the quantiles `q` (shape groups x len(q)) of `values`.

    `order` sorts the rows by group (computed once for every metric) and `count` holds each group's
    size, so each group is one contiguous slice: `np.mean` / `np.quantile` of it are NumPy's own
    results, at O(slice) each (quantiles partition, they do not sort)."""
    ordered = values[order]
    bounds = np.concatenate(([0], np.cumsum(count)))
    slices = [ordered[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    empty = np.full(len(q), np.nan)
    return (np.array([np.mean(v) if v.size else np.nan for v in slices]),
            np.array([np.quantile(v, q) if v.size else empty for v in slices]))
