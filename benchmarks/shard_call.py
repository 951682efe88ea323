"""`shard-call`: a live shard call's CPU (`TwinShard.ingest`), this tree against a base tree, in one process.

Why in one process: a live call costs a few milliseconds, and the 2-vCPU VMs' speed drifts by more than a change
worth 5 % from minute to minute, so two runs cannot tell such a change apart. Both trees' packages are imported
side by side (`Tree`: each tree's `actors`, `raytwin`, ... under its own module objects), each drives its own shard
over the same batches, the two alternate call by call (the first of each pair swapped every pair), and the figure
is the ratio of the medians of each call's thread CPU (`time.thread_time`). The tree loaded second runs ~2 % faster
(memory layout), so a run measures both load orders, each in a fresh subprocess.

Before timing anything, both trees are fed one messy batch sequence per seed (re-deliveries inside and beyond the
lateness window, conflicts, out-of-order and late rows, unit misfits, unknown twins, a failed log write retried,
flushes) and everything observable must be equal (`observable_digest`): reports and change records, states,
drift flags, the log, dead letters, snapshots, a recovered shard's states and reads back in time.

The base is `RAYTWIN_BENCH_SHARD_BASE` (a git revision of this repository, or a directory holding a tree; default
``HEAD``: the working tree's uncommitted change, or an A/A run measuring the noise when there is none).

    RAYTWIN_BENCH_SHARD_BASE=abc1234 python -m benchmarks run shard-call
    python -m benchmarks.shard_call profile     # cProfile of this tree's live calls
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import importlib
import io
import json
import os
import pstats
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.harness import BenchContext, BenchResult, Figure, benchmark

ROOT = Path(__file__).resolve().parents[1]
BASE_ENV = "RAYTWIN_BENCH_SHARD_BASE"
PACKAGES = ("actors", "raytwin", "sweeps", "serve_apps", "connectors", "client", "cluster")
"""The repository's packages a shard imports, loaded once per tree."""
TENANT = "bench"
T0_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
STEP_US = 60_000_000
LIVE_TWINS = 100  # a live call at 10k events/s: ~100 rows, one event a twin (benchmarks/RESULTS.md)
CALLS, WARMUP = 300, 30
QUICK_CALLS, QUICK_WARMUP = 6, 2
SEEDS = 6
MESSY_TWINS, MESSY_CALLS, QUICK_MESSY_CALLS = 12, 120, 30


class Tree:
    """One source tree's packages, imported apart from every other tree's (`sys.modules` swapped while it loads)."""

    def __init__(self, path: Path):
        self.path = path
        self.modules: dict[str, ModuleType] = {}
        with self.active():
            for name in ("actors.shard", "actors.recovery", "actors.telemetry", "raytwin.contracts",
                         "raytwin.registry", "raytwin.sim", "raytwin.statestore"):
                importlib.import_module(name)

    def __getitem__(self, name: str) -> ModuleType:
        return self.modules[name]

    @contextmanager
    def active(self) -> Iterator[None]:
        """This tree's modules in `sys.modules` (and its root first on the path) while the block runs: what its
        code imports inside a function (a model's module, looked up by name) is this tree's too."""
        ours = lambda name: name.split(".")[0] in PACKAGES  # noqa: E731
        others = {n: m for n, m in sys.modules.items() if ours(n)}
        for n in others:
            del sys.modules[n]
        sys.modules.update(self.modules)
        sys.path.insert(0, str(self.path))
        try:
            yield
        finally:
            sys.path.remove(str(self.path))
            self.modules = {n: m for n, m in sys.modules.items() if ours(n)}
            for n in self.modules:
                del sys.modules[n]
            sys.modules.update(others)


@contextmanager
def base_tree(spec: str) -> Iterator[Path]:
    """The base tree: a directory as given, or a git revision of this repository extracted to a temporary one."""
    if Path(spec).is_dir():
        yield Path(spec)
        return
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-base-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", spec], capture_output=True)
        if archive.returncode:
            raise ValueError(f"{BASE_ENV}={spec!r} is neither a directory nor a git revision of {ROOT.name}: "
                             f"{archive.stderr.decode().strip()}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)


# ---- batches ---------------------------------------------------------------------------------------
def raw_table(rows: list[tuple[str, int, int, str, str, float, str]]) -> pa.Table:
    """Telemetry rows (asset, event time us, sequence, key, quality, T_in value, T_in unit) as the API's table."""
    maps = [[("T_in", {"value": v, "unit": unit}), ("T_out", {"value": 5.0, "unit": "degC"}),
             ("Q_h", {"value": 1.5, "unit": "kW"})] for *_, v, unit in rows]
    item = pa.struct([("value", pa.float64()), ("unit", pa.string())])
    return pa.table({
        "asset_id": pa.array([r[0] for r in rows], pa.string()),
        "event_time": pa.array([r[1] for r in rows], pa.timestamp("us", tz="UTC")),
        "sequence": pa.array([r[2] for r in rows], pa.int64()),
        "idempotency_key": pa.array([r[3] for r in rows], pa.string()),
        "quality": pa.array([r[4] for r in rows], pa.string()),
        "measurements": pa.array(maps, pa.map_(pa.string(), item)),
    })


def live_rows(n_twins: int, step: int, doubles: int = 0) -> list[tuple]:
    """One event a twin, in order: a live call's usual shape; `doubles`: so many twins with a second event after
    it (the `ingest` benchmark's stream, whose twins report about once a linger, has a few in most calls)."""
    us = T0_US + STEP_US * step
    value = 20.0 + 0.01 * (step % 100)
    return [(f"zone-{i:05d}", us, step, f"zone-{i:05d}:{step}", "good", value, "degC") for i in range(n_twins)] + [
        (f"zone-{i:05d}", us + STEP_US // 2, step, f"zone-{i:05d}:{step}b", "good", value, "degC")
        for i in range(doubles)]


def messy_rows(rng: random.Random, n_twins: int, step: int, sent: list[tuple]) -> list[tuple]:
    """Rows mostly in order, with re-deliveries, conflicts, late and very late rows, misfits, unknown twins,
    bad-quality rows and readings far off the model (twin 0 drifts), shuffled: every third call one row for each
    of some twins (a live call's shape, which a shard may take another way), else 1-45 rows of any twins."""
    if step % 3 == 0:
        twins = rng.sample(range(n_twins), rng.randint(1, n_twins))
    else:
        twins = [rng.randrange(n_twins) for _ in range(rng.randint(1, 45))]
    rows = [_messy_row(rng, i, step, [r for r in sent if r[0] == f"zone-{i:05d}"] if step % 3 == 0 else sent)
            for i in twins]
    sent += rows
    rng.shuffle(rows)
    return rows


def _messy_row(rng: random.Random, i: int, step: int, sent: list[tuple]) -> tuple:
    """A row for twin `i` at about `step`, or (re-delivery, conflict) one of `sent` again."""
    asset, kind = f"zone-{i:05d}", rng.random()
    if kind < 0.08 and sent:
        return rng.choice(sent)  # a re-delivery, maybe beyond the window
    if kind < 0.12 and sent:
        r = rng.choice(sent)
        return (*r[:5], r[5] + 1.0, r[6])  # a conflict
    us = T0_US + STEP_US * step + rng.randrange(STEP_US)
    if kind < 0.20:
        us -= rng.choice([5, 30, 200]) * STEP_US  # late: inside or beyond the window
    value = 20.0 + rng.gauss(0, 0.3) + (15.0 if i == 0 and step > 40 else 0.0)
    unit, quality = "degC", "good"
    if kind > 0.97:
        unit = "kg"  # a misfit
    elif kind > 0.95:
        asset = f"ghost-{i}"
    elif kind > 0.92:
        quality = "bad"
    seq = rng.randrange(3)
    return asset, us, seq, f"{asset}:{us}:{seq}", quality, value, unit


# ---- shards ------------------------------------------------------------------------------------------
def new_shard(tree: Tree, store: str, n_twins: int, *, lateness_s: float, snapshot_every: int,
              checkpoint_every: int) -> Any:
    """A shard of `tree` on `store` with `n_twins` thermal zones registered."""
    with tree.active():
        return _registered(tree, store, n_twins, lateness_s, snapshot_every, checkpoint_every)


def _registered(tree: Tree, store: str, n_twins: int, lateness_s: float, snapshot_every: int,
                checkpoint_every: int) -> Any:
    contracts, recovery = tree["raytwin.contracts"], tree["actors.recovery"]
    artifact = tree["raytwin.registry"].ModelRegistry(f"{store}/registry").register(
        "zone", "1.0.0", contracts.AssetType.from_model(tree["raytwin.sim"].THERMAL_RC))
    shard = tree["actors.shard"].TwinShard(store, 0, 1, allowed_lateness_s=lateness_s, snapshot_every=snapshot_every,
                                           checkpoint_every=checkpoint_every)
    shard.register_many([(TENANT, a, recovery.registration_record(
        contracts.Asset(id=a, tenant=TENANT, type_name="thermal_rc", type_version="1.0.0"), artifact, None, None))
        for a in (f"zone-{i:05d}" for i in range(n_twins))])
    return shard


def validated(tree: Tree, rows: list[tuple]) -> pa.Table:
    """The rows as the dispatcher hands them to a shard (one validation: both shards get the same ingest times)."""
    with tree.active():
        return tree["actors.telemetry"].validate_table(raw_table(rows))[0]


def _json(value: Any) -> Any:
    """Pydantic models and store records as plain JSON-able values (NaN as a string: equal to itself)."""
    if hasattr(value, "model_dump"):
        return _json(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, np.ndarray):
        return _json(value.tolist())
    return value


def messy_batches(tree: Tree, seed: int, calls: int) -> list[pa.Table]:
    """`calls` validated batches of `messy_rows` (validated once: every shard fed them sees the same ingest
    times, which dead letters and the log keep)."""
    rng, sent = random.Random(seed), []
    return [validated(tree, messy_rows(rng, MESSY_TWINS, step, sent)) for step in range(calls)]


def observable_digest(tree: Tree, batches: list[pa.Table], store: str) -> dict[str, str]:
    """Digests of everything `batches` make observable on `tree`'s shard (see the module docstring)."""
    with tree.active():
        return _digest(tree, batches, store)


def _digest(tree: Tree, batches: list[pa.Table], store: str) -> dict[str, str]:
    n_twins = MESSY_TWINS
    shard = new_shard(tree, store, n_twins, lateness_s=600.0, snapshot_every=7, checkpoint_every=4)
    reports, drifting = [], []
    for step, batch in enumerate(batches):
        if step % 37 == 16:  # the log write fails once: memory is ahead of the store; the retry must not double
            real = shard.store.append_log
            shard.store.append_log = lambda *a: (_ for _ in ()).throw(OSError("injected log write failure"))
            try:
                shard.ingest(TENANT, batch)
            except OSError:
                pass
            shard.store.append_log = real
        reports.append(shard.ingest(TENANT, batch, states=step % 3 == 0))
        drifting.append(sorted(shard.drifting))
        if step % 30 == 29:
            reports.append(shard.flush())
    assets = [f"zone-{i:05d}" for i in range(n_twins)]
    ends = [T0_US + STEP_US * s for s in (len(batches) // 10, len(batches) // 2, len(batches) - 1)]
    recovered = new_shard(tree, store, 0, lateness_s=600.0, snapshot_every=7, checkpoint_every=4)
    parts = {
        "reports": reports,
        "drifting": drifting,
        "states": [shard.state(TENANT, a) for a in assets],
        "log": [[(e.key, e.quality, e.values) for e in shard.store.read_events(TENANT, a)] for a in assets],
        "dead_letters": sorted(map(repr, shard.store.read_dead_letters(TENANT).drop_columns("dead_lettered_at")
                                   .to_pylist())),
        "dead_letter_files": sorted(p.name for p in Path(store, "dead_letters").rglob("*.parquet")),
        "snapshots": [shard.store.latest_snapshot(TENANT, a) for a in assets],
        "recovered": [recovered.state(TENANT, a) for a in assets],
        "back_in_time": [shard.state_at(TENANT, a, us) for a in assets[:4] for us in ends],
    }
    return {k: hashlib.sha256(json.dumps(_json(v), sort_keys=True, default=repr).encode()).hexdigest()[:16]
            for k, v in parts.items()}


def interleaved(trees: dict[str, Tree], calls: int, warmup: int, doubles: int = 0) -> dict[str, list[float]]:
    """Seconds of thread CPU of each tree's live calls (`LIVE_TWINS` rows, one a twin, and `doubles` twins' second
    events: `live_rows`), alternating call by call and swapping which goes first every pair; the heap frozen, as in
    a shard process."""
    labels = list(trees)
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-shard-") as tmp:
        shards = {k: new_shard(t, f"{tmp}/{k}", LIVE_TWINS, lateness_s=3600.0, snapshot_every=500,
                               checkpoint_every=64) for k, t in trees.items()}
        first = trees[labels[0]]
        cpu: dict[str, list[float]] = {k: [] for k in labels}
        gc.collect()
        gc.freeze()
        try:
            for step in range(warmup + calls):
                batch = validated(first, live_rows(LIVE_TWINS, step, doubles))
                for k in (labels if step % 2 == 0 else labels[::-1]):
                    with trees[k].active():
                        t0 = time.thread_time()
                        report = shards[k].ingest(TENANT, batch)
                        spent = time.thread_time() - t0
                    if report.accepted != LIVE_TWINS + doubles:
                        raise AssertionError(f"{k}'s shard accepted {report.accepted} of {LIVE_TWINS + doubles} live "
                                             "events")
                    if step >= warmup:
                        cpu[k].append(spent)
        finally:
            gc.unfreeze()
    return cpu


def compare(base: Path, first: str, calls: int, warmup: int, seeds: int, messy_calls: int = MESSY_CALLS,
            doubles: int = 0) -> dict[str, Any]:
    """One load order (`first`: "base" or "this" imported first): digests per seed of `messy_calls` batches,
    then the interleaved calls (`doubles`: so many twins with two events in each)."""
    load_at_start = os.getloadavg()[0]
    paths = {"base": base, "this": ROOT}
    order = [first, "this" if first == "base" else "base"]
    trees = {k: Tree(paths[k]) for k in order}
    digests: dict[str, list[dict[str, str]]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-digest-") as tmp:
        for seed in range(seeds):
            batches = messy_batches(trees[order[0]], seed, messy_calls)
            for k, t in trees.items():
                digests[k].append(observable_digest(t, batches, f"{tmp}/{k}-{seed}"))
    if digests["this"] != digests["base"]:
        differ = sorted({part for a, b in zip(digests["this"], digests["base"]) for part in a if a[part] != b[part]})
        raise AssertionError(f"this tree's shard differs from the base's in {differ}: a performance change must "
                             "keep everything observable the same")
    cpu = interleaved({k: trees[k] for k in ("base", "this")}, calls, warmup, doubles)
    pairs = [t / b for t, b in zip(cpu["this"], cpu["base"])]
    return {"first": first, "median_s": {k: float(np.median(v)) for k, v in cpu.items()},
            "ratio_of_medians": float(np.median(cpu["this"]) / np.median(cpu["base"])),
            "median_pair_ratio": float(np.median(pairs)), "digests": digests["this"][0], "seeds": seeds,
            "load": [load_at_start, os.getloadavg()[0]]}


def _in_subprocess(base: Path, first: str, calls: int, warmup: int, seeds: int, messy_calls: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.shard_call", "compare", "--base", str(base),
                          "--first", first, "--calls", str(calls), "--warmup", str(warmup), "--seeds", str(seeds),
                          "--messy-calls", str(messy_calls)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(f"shard-call ({first} loaded first) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@benchmark("shard-call", "A live shard call's thread CPU (100 rows, one a twin): this tree against a base tree "
           f"({BASE_ENV}, default HEAD) in one process, both load orders; observable results checked equal first")
def shard_call(ctx: BenchContext) -> BenchResult:
    calls, warmup, seeds, messy = ((QUICK_CALLS, QUICK_WARMUP, 1, QUICK_MESSY_CALLS) if ctx.quick
                                   else (CALLS, WARMUP, SEEDS, MESSY_CALLS))
    spec = os.environ.get(BASE_ENV, "HEAD")
    res = BenchResult()
    with base_tree(spec) as base:  # quick: one load order
        runs = [_in_subprocess(base, first, calls, warmup, seeds, messy)
                for first in ("base", "this")[:2 - ctx.quick]]
    for run in runs:
        res.figures.append(Figure(
            f"live shard call CPU, {run['first']} loaded first (this / {spec})", run["median_s"]["this"] * 1e3, "ms",
            baseline=spec, baseline_value=run["median_s"]["base"] * 1e3,
            note=f"median pair ratio {run['median_pair_ratio']:.3f}; {calls} calls each after {warmup}, alternating; "
                 f"load average (1 min) {run['load'][0]:.1f} at the start, {run['load'][1]:.1f} at the end"))
    res.checks = {"base": spec, "runs": runs, "observables_equal_seeds": seeds}
    res.notes.append("ratio < 1: this tree's call takes less CPU; the two load orders bracket the layout effect")
    return res


def profile(calls: int, top: int) -> None:
    """cProfile of this tree's live calls, printed by cumulative and by own time."""
    tree = Tree(ROOT)
    with tempfile.TemporaryDirectory(prefix="raytwin-bench-profile-") as tmp:
        shard = new_shard(tree, tmp, LIVE_TWINS, lateness_s=3600.0, snapshot_every=500, checkpoint_every=64)
        batches = [validated(tree, live_rows(LIVE_TWINS, step)) for step in range(calls + 30)]
        with tree.active():
            for b in batches[:30]:
                shard.ingest(TENANT, b)
            gc.collect()
            gc.freeze()  # as in a shard process (`actors.heap.freeze_heap`)
            prof = cProfile.Profile()
            prof.enable()
            for b in batches[30:]:
                shard.ingest(TENANT, b)
            prof.disable()
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof).sort_stats(key).print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["compare", "profile"])
    parser.add_argument("--base", type=Path, help="compare: the base tree's directory")
    parser.add_argument("--first", choices=["base", "this"], default="base")
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--messy-calls", type=int, default=MESSY_CALLS)
    parser.add_argument("--doubles", type=int, default=0, help="compare: twins with two events in each timed call")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    if args.command == "profile":
        profile(args.calls, args.top)
    else:
        print(json.dumps(compare(args.base, args.first, args.calls, args.warmup, args.seeds, args.messy_calls,
                                 args.doubles)))


if __name__ == "__main__":
    main()
