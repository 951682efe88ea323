"""The benchmark harness: a registry of named benchmarks, robust timing, a table and a JSON record.

Speed claims live here, never in tests. Every benchmark measures RayTwin *and* its baselines in
the same run, so a ratio is never computed against a number from another day or machine.

A benchmark is a function ``(ctx: BenchContext) -> BenchResult`` registered with `@benchmark`.
It times work with `measure` (warm-up runs, then several repetitions: median, min and IQR; the
first run is reported separately because it contains JIT compilation / worker start-up) and
reports `Figure` rows: a value, optionally a baseline value measured in the same run, their ratio
and the target the ratio should reach.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from serve_apps.backend import Backend
    from serve_apps.config import ServeConfig

log = logging.getLogger("raytwin.bench")


@contextmanager
def environment(settings: Mapping[str, str]) -> Iterator[None]:
    """`settings` in this process's environment while the block runs (Ray workers and shards started meanwhile take
    them), each variable restored, or unset, afterwards."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def owned_backend(config: ServeConfig) -> Iterator[Backend]:
    """A `Backend` on `config` that this benchmark owns, twins included: at the
    end its store watch stops (`Backend.close`), then its twins are released (`TwinService.close`). Releasing the
    twins alone left the watch running in the caller's process, fenced, setting the fence gauge every 5 s."""
    from serve_apps.backend import Backend

    backend = Backend(config)
    try:
        yield backend
    finally:
        try:
            backend.close()
        finally:
            backend.twins.close()


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one piece of work."""

    median_s: float
    min_s: float
    iqr_s: float
    repeats: int
    first_s: float | None  # the first (warm-up) run: compile / start-up included; None without warm-up

    @property
    def overhead_s(self) -> float | None:
        """What the first run cost beyond a warm run: JIT compilation, worker start-up, caches."""
        return None if self.first_s is None else max(self.first_s - self.median_s, 0.0)


@dataclass(frozen=True)
class Figure:
    """One row of the results table: `value` [unit], compared with `baseline` when there is one."""

    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    target_ratio: float | None = None  # the ratio to the baseline this figure should reach
    target_min: float | None = None  # or an absolute floor (throughputs) ...
    target_max: float | None = None  # ... or ceiling (latencies) from the project's targets
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value

    @property
    def meets_target(self) -> bool | None:
        """Whether every target given is met (None when there is no target to judge)."""
        verdicts = []
        if self.target_ratio is not None and self.ratio is not None:
            verdicts.append(self.ratio >= self.target_ratio)
        if self.target_min is not None:
            verdicts.append(self.value >= self.target_min)
        if self.target_max is not None:
            verdicts.append(self.value <= self.target_max)
        return all(verdicts) if verdicts else None

    def target_text(self) -> str:
        parts = [f">= {self.target_ratio:g}x" if self.target_ratio is not None else "",
                 f">= {_fmt(self.target_min, self.unit)}" if self.target_min is not None else "",
                 f"<= {_fmt(self.target_max, self.unit)}" if self.target_max is not None else ""]
        return ", ".join(p for p in parts if p)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "meets_target": self.meets_target, "target": self.target_text()}


@dataclass
class BenchResult:
    """What one benchmark reports: table rows, raw timings, correctness checks and notes."""

    figures: list[Figure] = field(default_factory=list)
    timings: dict[str, Timing] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "figures": [f.as_dict() for f in self.figures],
            "timings": {k: {**asdict(t), "overhead_s": t.overhead_s} for k, t in self.timings.items()},
            "checks": self.checks,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class BenchContext:
    """Run-wide settings: `quick` shrinks every benchmark to seconds (used by the smoke test)."""

    quick: bool = False
    repeat: int = 5
    warmup: int = 1

    @classmethod
    def for_run(cls, *, quick: bool, repeat: int) -> BenchContext:
        """What `raytwin bench run` measures with: a quick run has no warm-up run (each path's checks still run on its
        one run), a full one warms up once."""
        return cls(quick=quick, repeat=repeat, warmup=0 if quick else 1)

    def measure(self, label: str, fn: Callable[[], Any], *, warmup: int | None = None,
                repeat: int | None = None) -> tuple[Timing, Any]:
        """Time `fn` (which must block until its work is done); returns the timing and the last result."""
        return measure(label, fn, warmup=self.warmup if warmup is None else warmup,
                       repeat=self.repeat if repeat is None else repeat)


def measure(label: str, fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5) -> tuple[Timing, Any]:
    """Run `fn` `warmup` times, then `repeat` timed times; median/min/IQR of the timed runs."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    first = None
    result = None
    for i in range(warmup):
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
        if i == 0:
            first = elapsed
        log.info("bench=%s phase=warmup run=%d seconds=%.4f", label, i + 1, elapsed)
    samples = []
    for i in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
        log.info("bench=%s phase=timed run=%d/%d seconds=%.4f", label, i + 1, repeat, samples[-1])
    q25, q50, q75 = np.percentile(samples, [25, 50, 75])
    return Timing(float(q50), float(min(samples)), float(q75 - q25), repeat, first), result


# ---- registry ---------------------------------------------------------------------------------
BenchFn = Callable[[BenchContext], BenchResult]


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    fn: BenchFn


BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str, description: str) -> Callable[[BenchFn], BenchFn]:
    """Register a benchmark under `name` (the name used on the command line)."""

    def register(fn: BenchFn) -> BenchFn:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} registered twice")
        BENCHMARKS[name] = Benchmark(name, description, fn)
        return fn

    return register


BENCHMARK_MODULES = ("benchmarks.sweep", "benchmarks.sweep_kits", "benchmarks.sweep_gpu",
                     "benchmarks.lorenz_ensemble", "benchmarks.fused_tuning", "benchmarks.roofline",
                     "benchmarks.quantiles",
                     "benchmarks.model_checks", "benchmarks.ingest", "benchmarks.shard_call",
                     "benchmarks.live_beside_batch", "benchmarks.mqtt",
                     "benchmarks.opcua",
                     "benchmarks.serve_api",
                     "benchmarks.overload", "benchmarks.changes", "benchmarks.query", "benchmarks.replay",
                     "benchmarks.reads_bounded",
                     "benchmarks.calibration", "benchmarks.fmu", "benchmarks.drift", "benchmarks.failover",
                     "benchmarks.recommend", "benchmarks.closed_loop")
"""Modules that register benchmarks, in run order: the headline sweep first, the slow product paths last."""


def load_benchmarks(names: list[str] | None = None) -> dict[str, Benchmark]:
    """Import the registering modules in order until every one of `names` is known (all when None).

    Kept lazy because they import JAX, Ray and Serve: `run sweep-gpu` on a GPU machine needs
    neither Serve nor its HTTP stack.
    """
    for module in BENCHMARK_MODULES:
        if names and set(names) <= set(BENCHMARKS):
            break
        importlib.import_module(module)
    return BENCHMARKS


def select(names: list[str] | None) -> list[Benchmark]:
    """The benchmarks called `names` (all when empty), with a clear error for unknown names."""
    registry = load_benchmarks(names)
    if not names:
        return list(registry.values())
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown benchmark(s) {unknown}; known: {sorted(registry)}")
    return [registry[n] for n in names]


# ---- machine and run record -------------------------------------------------------------------
SIMD_LEVELS = ("avx512f", "avx2", "avx", "sse4_2", "asimd")
"""`/proc/cpuinfo` flags, widest first: a CPU's `simd` is the first it has (`asimd`: ARM's NEON)."""


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's vendor, family, model, model name and widest SIMD level (`SIMD_LEVELS`) from `/proc/cpuinfo`
    (`cpuinfo`: its text), first processor; keys it lacks are None.

    Why: a cloud VM's model name can be just "AMD EPYC" on Zen 3 (no AVX-512) and on Zen 4 (AVX-512) alike, and
    the same code's figures differ between them; family, model and the SIMD level tell the VM types apart."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    number = lambda key: int(fields[key]) if fields.get(key, "").isdigit() else None  # noqa: E731
    return {"vendor": fields.get("vendor_id"), "family": number("cpu family"), "model": number("model"),
            "model_name": fields.get("model name") or platform.processor() or platform.machine(),
            "simd": next((level for level in SIMD_LEVELS if level in flags), None)}


def cpu_label(machine: Mapping[str, Any]) -> str:
    """A run record's CPU in one phrase for table headers, e.g. "AMD EPYC (AuthenticAMD family 25 model 1,
    avx2, no AVX-512)"; only the model name for records written before `cpu` was recorded."""
    cpu = machine.get("cpu")
    if not cpu:
        return machine["cpu_model"]
    ids = " ".join(filter(None, [cpu["vendor"], *(f"{k} {cpu[k]}" for k in ("family", "model") if cpu[k] is not None)]))
    simd = cpu["simd"] or "SIMD unknown"
    if simd in ("avx2", "avx", "sse4_2"):
        simd += ", no AVX-512"
    return f"{cpu['model_name']} ({ids + ', ' if ids else ''}{simd})"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def numpy_blas() -> dict[str, Any]:
    """Which BLAS NumPy was built against (threadpoolctl's runtime view when it is installed)."""
    try:
        from threadpoolctl import threadpool_info

        return {"threadpoolctl": threadpool_info()}
    except ImportError:
        config = np.show_config(mode="dicts")
        deps = config.get("Build Dependencies", {})
        return {"build": {k: deps.get(k, {}) for k in ("blas", "lapack")}, "simd": config.get("SIMD Extensions", {})}


def machine_info() -> dict[str, Any]:
    """Where and on what code the figures were measured (stored with every result file)."""
    import jax

    from raytwin.provenance import code_version, package_versions

    cpu = cpu_info()
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": cpu["model_name"],
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "load_average_1_5_15": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "packages": package_versions(),
        "commit": code_version(),
        "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "XLA_FLAGS",
                                           "OMP_NUM_THREADS") if k in os.environ},
        "numpy_blas": numpy_blas(),
    }


CPU_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
"""The kinds of CPU time `/proc/stat` counts, in its order."""


def cpu_times() -> tuple[int, ...] | None:
    """The machine's CPU time so far by kind (`CPU_KINDS`, in `/proc/stat` ticks); None where there is none."""
    try:
        with open("/proc/stat") as f:
            return tuple(int(x) for x in f.readline().split()[1:1 + len(CPU_KINDS)])
    except (OSError, ValueError):
        return None


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux `/proc`; OSError elsewhere)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes_cpu_s(pids: Mapping[str, int]) -> dict[str, float] | None:
    """`process_cpu_s` of each named process, read together; None where there is no `/proc` (or a process is
    gone): the caller reports no CPU figure instead of failing its run."""
    try:
        return {name: process_cpu_s(pid) for name, pid in pids.items()}
    except OSError:
        return None


def cpu_spent(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """CPU seconds each process spent between two `processes_cpu_s` readings; empty where either is None."""
    if before is None or after is None:
        return {}
    return {name: after[name] - before[name] for name in before}


def cpu_split(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> dict[str, float] | None:
    """How the machine's CPUs spent the time between two `cpu_times` readings, in percent by kind.

    Why: these machines are shared, and one figure differs by half between a quiet and a busy hour; the
    idle share says whether cores were left, steal whether the hypervisor took them, with every figure."""
    if before is None or after is None:
        return None
    spent = [b - a for a, b in zip(before, after)]
    total = sum(spent)
    return {kind: round(100 * t / total, 1) for kind, t in zip(CPU_KINDS, spent)} if total > 0 else None


def git_short(commit: str) -> str:
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def run_benchmarks(names: list[str] | None, ctx: BenchContext) -> dict[str, Any]:
    """Run the selected benchmarks in order; one failing benchmark is recorded, not fatal."""
    selected = select(names)
    record: dict[str, Any] = {"machine": machine_info(), "quick": ctx.quick, "benchmarks": {}}
    for bench in selected:
        log.info("bench=%s status=start", bench.name)
        t0, cpu0 = time.perf_counter(), cpu_times()
        try:
            result = bench.fn(ctx).as_dict()
        except Exception as exc:  # a broken benchmark must not hide the others' figures
            log.exception("bench=%s status=failed", bench.name)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        result["machine_cpu_pct"] = cpu_split(cpu0, cpu_times())
        record["benchmarks"][bench.name] = result
        log.info("bench=%s status=done wall_s=%.1f", bench.name, result["wall_s"])
    return record


def write_json(record: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


# ---- presentation -----------------------------------------------------------------------------
def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
        text = f"{value:.3g}"
    else:
        text = f"{value:,.4g}"
    return f"{text} {unit}".strip()


def render_table(record: dict[str, Any]) -> Any:
    """A rich table of every figure: value, baseline, ratio and whether the target is met."""
    from rich.table import Table

    m = record["machine"]
    table = Table(title=f"RayTwin benchmarks - {cpu_label(m)} x{m['cpu_count']}, "
                        f"commit {git_short(m['commit'])}, {m['date_utc']}")
    for col in ("benchmark", "figure", "value", "baseline", "ratio", "target"):
        table.add_column(col, justify="right" if col in ("value", "ratio") else "left")
    for bench_name, result in record["benchmarks"].items():
        if "error" in result:
            table.add_row(bench_name, "[red]FAILED[/red]", result["error"], "", "", "")
            continue
        if not result["figures"]:
            table.add_row(bench_name, "[yellow]no figures[/yellow]", " ".join(result["notes"]), "", "", "")
        for f in result["figures"]:
            baseline = "" if f["baseline"] is None else f"{f['baseline']} ({_fmt(f['baseline_value'], f['unit'])})"
            target = ""
            if f["meets_target"] is not None:
                mark = "[green]met[/green]" if f["meets_target"] else "[red]missed[/red]"
                target = f"{f['target']} {mark}"
            ratio = "" if f["ratio"] is None else f"{f['ratio']:.3g}x"
            table.add_row(bench_name, f["name"], _fmt(f["value"], f["unit"]), baseline, ratio, target)
    return table


def markdown_table(record: dict[str, Any]) -> str:
    """The figures of a run record as a Markdown table (for RESULTS.md), with its provenance line."""
    m = record["machine"]
    lines = [
        f"Measured {m['date_utc']} on {cpu_label(m)}, {m['cpu_count']} cores, {m['memory_gib']} GiB, "
        f"JAX devices {', '.join(m['jax_devices'])}, commit `{git_short(m['commit'])}`, "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average_1_5_15'])}"
        + (" (--quick)" if record.get("quick") else "") + ".",
        "",
        "| benchmark | figure | value | baseline | ratio | target |",
        "| --- | --- | ---: | --- | ---: | --- |",
    ]
    for bench_name, result in record["benchmarks"].items():
        if "error" in result:
            lines.append(f"| {bench_name} | FAILED | {result['error']} | | | |")
            continue
        if not result["figures"]:
            lines.append(f"| {bench_name} | no figures | {' '.join(result['notes'])} | | | |")
        for f in result["figures"]:
            baseline = "" if f["baseline"] is None else f"{f['baseline']} ({_fmt(f['baseline_value'], f['unit'])})"
            ratio = "" if f["ratio"] is None else f"{f['ratio']:.3g}x"
            target = "" if f["meets_target"] is None else f"{f['target']}: {'met' if f['meets_target'] else 'MISSED'}"
            lines.append(f"| {bench_name} | {f['name']} | {_fmt(f['value'], f['unit'])} | {baseline} | {ratio} "
                         f"| {target} |")
    split = [f"{name} " + "/".join(f"{cpu[k]:g}" for k in ("user", "nice", "system", "idle", "steal"))
             for name, result in record["benchmarks"].items() if (cpu := result.get("machine_cpu_pct"))]
    if split:
        lines += ["", "The machine's CPUs while each ran, user/nice/system/idle/steal %: " + "; ".join(split) + "."]
    return "\n".join(lines) + "\n"


def default_output_path() -> Path:
    return Path("runs") / "bench" / f"bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"


def subprocess_env_without(*names: str) -> dict[str, str]:
    """This process's environment less `names`, for a child that must not inherit them."""
    return {k: v for k, v in os.environ.items() if k not in names}


def run_python(code: str, env: dict[str, str], timeout_s: float = 300) -> str:
    """Run `code` in a fresh interpreter (same venv) and return its stdout."""
    import sys

    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"subprocess failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout
