"""Uncertainty bands: quantiles of each metric over a sweep's scenarios, read from its Parquet dataset.

Only the needed columns are read, one metric at a time, so a million-scenario dataset costs a few
megabytes per metric. Quantiles use linear interpolation (NumPy's default), optionally per group
of scenarios that share the values of some dimensions (e.g. per outdoor-temperature level, over
the ensemble of parameter samples).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from raytwin.storage import filesystem

DEFAULT_QUANTILES = (0.05, 0.5, 0.95)


def open_dataset(url: str, storage_options: dict | None = None) -> ds.Dataset:
    """The sweep's metrics dataset (the part files; trajectories are separate)."""
    fs, root = filesystem(url, storage_options)
    parts = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    if not parts:
        raise FileNotFoundError(f"no sweep results (part-*.parquet) under {url}")
    return ds.dataset(parts, format="parquet", filesystem=fs)


def quantiles(
    url: str,
    metrics: Sequence[str] | None = None,
    *,
    q: Sequence[float] = DEFAULT_QUANTILES,
    by: Sequence[str] = (),
    storage_options: dict | None = None,
) -> pa.Table:
    """One row per (group, metric): the group's dimension values, metric, count, mean and ``q<p>`` columns.

    `metrics` defaults to every non-dimension column; `by` names dimension columns to group on.
    """
    dataset = open_dataset(url, storage_options)
    names = dataset.schema.names
    unknown = [c for c in (*by, *(metrics or ())) if c not in names]
    if unknown:
        raise KeyError(f"unknown column(s) {unknown}; available: {names}")
    if not all(0.0 <= p <= 1.0 for p in q):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(q)}")
    if metrics is None:
        metrics = [c for c in names if c != "scenario" and "." not in c]
    keys = dataset.to_table(columns=list(by)) if by else None
    if keys is not None and keys.num_rows:
        groups, inverse = np.unique(np.column_stack([keys[c].to_numpy() for c in by]), axis=0, return_inverse=True)
    else:
        groups, inverse = np.zeros((1, 0)), None
    rows: list[dict] = []
    for metric in metrics:
        values = dataset.to_table(columns=[metric])[metric].to_numpy().astype(np.float64)
        for g, group in enumerate(groups):
            v = values if inverse is None else values[inverse.ravel() == g]
            row = {c: float(x) for c, x in zip(by, group)}
            row.update(metric=metric, count=int(v.size), mean=float(np.mean(v)))
            row.update({f"q{p:g}": float(x) for p, x in zip(q, np.quantile(v, q))})
            rows.append(row)
    return pa.Table.from_pylist(rows)
