"""Run a sweep on Ray: chunks of scenarios as retried tasks, each written as one Parquet file.

The driver computes each chunk's scenario rows, keeps a bounded window of chunk tasks in flight
(`ray.wait`), and shows progress. A chunk task writes ``part-<chunk>.parquet`` (via a hidden
temporary name, so a killed attempt leaves no torn file that readers take for a result) and
returns its SHA-256; a retried chunk recomputes the same rows and overwrites the same file with
the same bytes, so a sweep that lost workers ends identical to an uninterrupted one. Memory stays
bounded: only the metrics of the chunks in flight exist at once. Ctrl-C cancels the outstanding
tasks and raises `SweepCancelled`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raytwin.cpu_priority import batch_worker, yield_to_live
from raytwin.metrics import SCENARIO_STEPS, SWEEP_RATE, SWEEP_SCENARIOS
from raytwin.provenance import compute_platform
from raytwin.ray_connect import cancel_tasks
from raytwin.signals import Series
from raytwin.sim.cpu import cpu_only, start_single_core_backend
from raytwin.sim.discovery import simulator_label
from raytwin.sim.integrate import integration_dtype
from raytwin.storage import filesystem
from raytwin.store_failures import store_io
from sweeps import engine
from sweeps.engine import Bases
from sweeps.kits import SweepKit
from sweeps.limits import MAX_SCENARIOS, check_size
from sweeps.spec import SweepSpec, resolve_model

log = logging.getLogger("raytwin.sweeps")

SINGLE_THREADED_XLA = "--xla_cpu_multi_thread_eigen=false"
"""No Eigen thread pool in a CPU task; the rest of XLA's threading is set by
`raytwin.sim.cpu.start_single_core_backend`, so N tasks use N cores instead of N x N threads."""
FAULT_ENV = ("RAYTWIN_SWEEP_CRASH_CHUNK", "RAYTWIN_SWEEP_CRASH_MARKER")
"""Fault injection for tests, read by the driver: the first attempt of that chunk kills its worker
(a marker file in the marker directory records that it happened)."""
TASK_RETRIES = 3


class SweepCancelled(RuntimeError):
    """The sweep was interrupted (Ctrl-C); outstanding tasks were cancelled."""


class RunTerminated(SystemExit):
    """SIGTERM during a run (`raytwin job stop` and `ray job stop` send it, as do schedulers and `timeout`): a
    cancellation, recorded `cancelled` with this text by `sweeps.runs`. A `SystemExit`, so no ``except
    Exception`` on the way swallows it, and the process exits 143 (128 + SIGTERM) as one killed by it would."""

    def __init__(self, reason: str = "cancelled by SIGTERM") -> None:
        super().__init__(128 + signal.SIGTERM)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass
class SweepResult:
    out_url: str
    n_scenarios: int
    n_chunks: int
    chunk_size: int
    outputs: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    elapsed_s: float = 0.0
    n_diverged: int = 0  # scenarios whose states left their plausible range (NaN metrics)
    platforms: list[str] = field(default_factory=list)  # what the chunks' kernels ran on (`compute_platform`)

    @property
    def scenarios_per_s(self) -> float:
        return self.n_scenarios / self.elapsed_s if self.elapsed_s > 0 else float("nan")


def rate_text(per_s: float) -> str:
    """A rate for people: whole numbers from 100 on, else 3 significant digits, so a slow sweep (an FMU's, a
    loaded machine's: 0.389 scenarios/s) does not read as 0."""
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.3g}"


def part_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


TRAJECTORY_FILE = "trajectories.parquet"


PARQUET_OPTIONS = {"compression": "zstd", "compression_level": -1, "use_dictionary": False}
"""No dictionary encoding: sweep columns are mostly distinct floats, for which Parquet's default
tries a dictionary and gives up (13 ms per 12,500-row chunk instead of 3 ms, and 1.45 MB instead of
1.12 MB). zstd's fast level -1 on byte-stream-split floats (`column_encodings`): for 2^20 thermal
scenarios 125 ms and 80.6 MB against 186 ms and 86.9 MB for level 1 on plain floats, and read back
2x faster (2 vCPUs, 2026-12); a grid dimension's repeats still compress to < 0.2 MB per 2^20 rows."""


def column_encodings(schema: pa.Schema) -> dict[str, str]:
    """Byte-stream-split for float32/64 columns (their exponent bytes then compress, their random
    mantissa bytes are not tried), delta for integers (the scenario index: 6 kB instead of 1 MB)."""
    encodings = {}
    for f in schema:
        if pa.types.is_float32(f.type) or pa.types.is_float64(f.type):
            encodings[f.name] = "BYTE_STREAM_SPLIT"
        elif pa.types.is_integer(f.type):
            encodings[f.name] = "DELTA_BINARY_PACKED"
    return encodings


class _HashingWriter:
    """A binary file that passes writes on to `file` and feeds them to a SHA-256 (for `write_parquet`)."""

    def __init__(self, file: Any):
        self.file, self.sha256, self.closed = file, hashlib.sha256(), False

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.file.write(data)
        return len(data)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.closed = True  # the caller closes `file`


@store_io("write")
def write_parquet(table: pa.Table, url: str, storage_options: dict | None) -> str:
    """Write `table` to `url` atomically (temporary name, then rename); return the bytes' SHA-256.

    The temporary name is hidden (``.<name>.<pid>.tmp``, no ``.parquet`` suffix) so a writer killed
    before the rename leaves a file no reader of results lists (`sweeps.aggregate.PART_FILE`).
    The Parquet bytes stream into that file, hashed as they go: no whole-file buffer, which for a
    ~80 MB part cost ~60 ms of growing and ~40 ms of copying to `bytes` (`PARQUET_OPTIONS`)."""
    fs, path = filesystem(url, storage_options)
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.{os.getpid()}.tmp"
    with fs.open(tmp, "wb") as f:
        sink = _HashingWriter(f)
        pq.write_table(table, sink, column_encoding=column_encodings(table.schema), **PARQUET_OPTIONS)
    fs.mv(tmp, path)
    return sink.sha256.hexdigest()


def _injected_fault() -> tuple[int, str] | None:
    target, marker_dir = (os.environ.get(k) for k in FAULT_ENV)
    return None if target is None or marker_dir is None else (int(target), marker_dir)


def _crash_if_injected(chunk: int, fault: tuple[int, str] | None) -> None:
    if fault is None or fault[0] != chunk:
        return
    marker = os.path.join(fault[1], f"crashed-{chunk}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # a dead worker, as from an OOM kill or a lost node


def _scenario_table(spec: SweepSpec, start: int, rows: np.ndarray, columns: dict[str, np.ndarray]) -> pa.Table:
    data = {"scenario": np.arange(start, start + rows.shape[0], dtype=np.int64)}
    data.update({col: rows[:, j] for j, col in enumerate(spec.space.columns)})
    data.update(columns)
    return pa.table(data)


def _start_backend() -> None:
    """CPU tasks own one core: XLA sized for one thread. GPU tasks keep JAX's defaults. Either yields the CPU to
    twin shards on its node first (`raytwin.cpu_priority`), so that XLA's threads start at that priority too."""
    yield_to_live()
    if not ray.get_gpu_ids():
        start_single_core_backend()


def chunk_rows(spec: SweepSpec, chunk: int) -> np.ndarray:
    """The scenario values of chunk number `chunk` (`ScenarioSpace.rows` of its scenarios)."""
    start = chunk * spec.batch_size
    return spec.space.rows(start, min(start + spec.batch_size, spec.space.size))


def compiled_kit(spec: SweepSpec, simulator: str) -> SweepKit:
    """The kernel functions of the sweep's kit for its horizon and step (cached per process)."""
    return spec.kit(simulator).compile(spec.horizon_s, spec.step_s)


def _chunk_task(spec: SweepSpec, simulator: str, bases: Bases, chunk: int, rows: np.ndarray | None, url: str,
                storage_options: dict | None, fault: tuple[int, str] | None) -> tuple[int, str, int, int, str]:
    _crash_if_injected(chunk, fault)
    _start_backend()
    if rows is None:  # an indexed space: the task draws its own rows, off the driver's critical path
        rows = chunk_rows(spec, chunk)
    kit = compiled_kit(spec, simulator)
    metrics = engine.chunk_metrics(kit, bases, spec.space.dimensions, rows, spec.step_s, spec.n_steps,
                                   spec.batch_size, integration_dtype(kit.model, spec.dtype).name)
    digest = write_parquet(_scenario_table(spec, chunk * spec.batch_size, rows, metrics), url, storage_options)
    return chunk, digest, rows.shape[0], int(np.count_nonzero(metrics[engine.DIVERGED])), compute_platform()


def _trajectory_task(spec: SweepSpec, simulator: str, bases: Bases, rows: np.ndarray, url: str,
                     storage_options: dict | None) -> str:
    _start_backend()
    index = np.asarray(spec.trajectories, dtype=np.int64)
    kit = compiled_kit(spec, simulator)
    states = engine.trajectories(kit, bases, spec.space.dimensions, rows, spec.step_s, spec.n_steps,
                                 integration_dtype(kit.model, spec.dtype).name)
    steps = spec.n_steps + 1
    table = pa.table({
        "scenario": np.repeat(index, steps),
        "step": np.tile(np.arange(steps, dtype=np.int64), len(index)),
        "t_s": np.tile(spec.step_s * np.arange(steps), len(index)),
        **{name: v.reshape(-1) for name, v in states.items()},
    })
    return write_parquet(table, url, storage_options)


_chunk_remote = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=[OSError])(_chunk_task)
_trajectory_remote = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=[OSError])(_trajectory_task)
"""Retried on lost workers and storage errors (OSError); a bad spec fails at once."""


GPU_TASKS_PER_GPU = (2, 8)
"""Chunk tasks sharing one GPU: one per CPU the node has per GPU, within these bounds. A chunk's
host work (drawing its rows, preparing its arrays, writing its Parquet part) takes ~10x its fused
kernel's GPU time (2^20 thermal scenarios over a week: ~45 ms on an H200), so the tasks' host work
overlaps the others' kernels; each task takes a CPU."""
GPU_TASK_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
"""Tasks sharing a GPU must not each preallocate most of its memory (JAX's default)."""


def task_plan() -> tuple[dict[str, Any], int]:
    """Chunk-task options and how many run at once: GPU tasks when the cluster has GPUs,
    otherwise one single-threaded XLA per CPU."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0:
        low, high = GPU_TASKS_PER_GPU
        per_gpu = max(low, min(high, int(resources.get("CPU", 0) // resources["GPU"])))
        options = {"num_gpus": 1 / per_gpu, "runtime_env": {"env_vars": GPU_TASK_ENV}}
        return batch_worker(options), int(resources["GPU"] * per_gpu)
    options = cpu_only({"num_cpus": 1, "runtime_env": {"env_vars": {"XLA_FLAGS": SINGLE_THREADED_XLA}}})
    return batch_worker(options), int(resources["CPU"])


def absolute_url(url: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory)."""
    return url if "://" in url else os.path.abspath(url)


def absolute_series(spec: SweepSpec) -> SweepSpec:
    """`spec` with its series signals' local Parquet paths made absolute: chunk tasks read them in workers whose
    working directory need not be the driver's (every chunk failed), and a run record names that file."""
    signals = {name: sig.model_copy(update={"path": absolute_url(sig.path)})
               if isinstance(sig, Series) and sig.path is not None and "://" not in sig.path else sig
               for name, sig in spec.signals.items()}
    return spec if signals == spec.signals else spec.model_copy(update={"signals": signals})


def ensure_ray() -> None:
    """Connect to the cluster of a Ray job (RAY_ADDRESS) or start a local Ray, once."""
    if not ray.is_initialized():
        with warnings.catch_warnings():
            # JAX's at-fork hook (installed once its backend starts, here by the spec's checks) warns "os.fork() was
            # called ... will likely lead to a deadlock" on every fork that runs Python in the child. A local start
            # forks Ray's gcs_server, raylet and agents with a `preexec_fn` (block SIGINT, die with the parent: a
            # signal mask and a prctl) and execs them at once: the child runs no JAX and takes no lock a parent's
            # thread may hold (glibc's fork keeps malloc usable, CPython resets the GIL and import lock), so no
            # deadlock. Starting Ray before the spec's checks would start a cluster for every refused spec. A Popen
            # without `preexec_fn` (git, ...) forks in C and never warns; `multiprocessing` (the real risk) is unused.
            warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
            ray.init(logging_level="WARNING")


def prepare(spec: SweepSpec) -> tuple[str, Bases]:
    """Resolve the model and the base values of `spec` (simulator name, bases)."""
    artifact = resolve_model(spec.model, spec.registry_url)
    simulator = artifact.asset_type.simulator
    if "@" in spec.model:  # a registry model (the spec checked a bare one): its box is around its parameters
        spec.check_against(simulator, artifact.parameters)
    kit = spec.kit(simulator)
    return simulator, Bases(
        state=dict(spec.start_state or kit.states0),
        params={**artifact.parameters, **spec.parameters},
        inputs=spec.kit_inputs(kit),
    )


def check_sweep_size(spec: SweepSpec, simulator: str, max_scenarios: int = MAX_SCENARIOS) -> None:
    """`sweeps.limits.check_size` of `spec` (its values: its kit's metrics and the `diverged` column): a huge LHS
    design failed in the driver with a MemoryError instead."""
    check_size(spec.space, spec.n_steps, len(spec.kit(simulator).metrics) + 1, max_scenarios=max_scenarios)


class _Progress:
    """A rich progress bar on a terminal, a structured log line every `every_s` seconds, Ray metrics
    (`raytwin.metrics`: scenarios, scenario-steps, throughput)."""

    def __init__(self, simulator: str, total: int, n_steps: int, every_s: float, show_bar: bool):
        self.simulator, self.n_steps = simulator, n_steps  # the metrics' tag (`simulator_label`)
        # exported at 0 before the first count (`Metric.zero`): a sweep whose process (a CLI driver, a job's
        # task) counts it first would otherwise never show in `rate()`, and so on the dashboard
        SWEEP_SCENARIOS.zero({"simulator": simulator})
        SCENARIO_STEPS.zero({"kind": "sweep"})
        self.total, self.every_s, self.done = total, every_s, 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if show_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress("sweep", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("scenarios", total=total)
            self.bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        SWEEP_SCENARIOS.inc(n, simulator=self.simulator)
        SCENARIO_STEPS.inc(n * self.n_steps, kind="sweep")
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            SWEEP_RATE.set(rate, simulator=self.simulator)
            log.info("sweep progress done=%d total=%d scenarios_per_s=%s", self.done, self.total, rate_text(rate))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


DIVERGED_ADVICE = ("a smaller step_s or other parameters help where a run was unstable; where states beyond a declared "
                   "range are plausible (a tank heated past its range's top), widen that range (State lower/upper)")
"""What to do about diverged scenarios: a stable model whose states leave their declared ranges is flagged too."""


def run_sweep(
    spec: SweepSpec,
    out_url: str,
    *,
    storage_options: dict | None = None,
    max_in_flight: int | None = None,
    progress: bool | None = None,
    log_every_s: float = 10.0,
    max_scenarios: int = MAX_SCENARIOS,
) -> SweepResult:
    """Run every scenario of `spec` on Ray and write the metrics dataset under `out_url` (must be empty).

    `progress`: show a progress bar (default: when stderr is a terminal); progress is logged
    every `log_every_s` seconds regardless. A sweep of more than `max_scenarios` scenarios is refused
    (`sweeps.limits.SweepTooLarge`) before anything is drawn or written: raise it to run a bigger one.
    """
    spec = absolute_series(spec)
    simulator, bases = prepare(spec)
    check_sweep_size(spec, simulator, max_scenarios)
    out_url = absolute_url(out_url).rstrip("/")
    fs, root = filesystem(out_url, storage_options)
    with store_io("write"):
        if fs.exists(root) and fs.ls(root, detail=False):
            raise FileExistsError(f"sweep output {out_url} is not empty; give a fresh location")
        fs.makedirs(root, exist_ok=True)
    ensure_ray()
    n, size = spec.space.size, spec.batch_size
    n_chunks = -(-n // size)
    options, slots = task_plan()
    if "num_gpus" in options and "chunk_size" not in spec.model_fields_set and spec.batch_size < n:
        log.warning("sweep chunk_size=%d (the CPU default) underfills a GPU: set chunk_size to 262144-1048576 "
                    "(on an H100, chunks of 2^20 ran 2.2x faster than 2^16; benchmarks/RESULTS.md)", size)
    chunk_task = _chunk_remote.options(**options)
    window = max_in_flight or max(2, 2 * slots)
    spec_ref, bases_ref, fault = ray.put(spec), ray.put(bases), _injected_fault()
    log.info("sweep start model=%s scenarios=%d chunks=%d chunk_size=%d steps=%d out=%s",
             spec.model, n, n_chunks, size, spec.n_steps, out_url)

    t0 = time.monotonic()
    outputs: dict[str, str] = {}
    pending: dict[ray.ObjectRef, int] = {}
    if spec.trajectories:
        traj_url = f"{out_url}/{TRAJECTORY_FILE}"
        rows = np.concatenate([spec.space.rows(i, i + 1) for i in spec.trajectories])
        traj = _trajectory_remote.options(**options).remote(spec_ref, simulator, bases_ref, rows, traj_url,
                                                            storage_options)
        pending[traj] = -1
    show = sys.stderr.isatty() if progress is None else progress
    bar = _Progress(simulator_label(simulator), n, spec.n_steps, log_every_s, show)
    next_chunk = diverged = 0
    platforms: set[str] = set()
    try:
        while next_chunk < n_chunks or pending:
            while next_chunk < n_chunks and len(pending) < window:
                rows = None if spec.space.indexed else chunk_rows(spec, next_chunk)
                ref = chunk_task.remote(spec_ref, simulator, bases_ref, next_chunk, rows,
                                        f"{out_url}/{part_name(next_chunk)}", storage_options, fault)
                pending[ref] = next_chunk
                next_chunk += 1
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if not done:
                bar.advance(0)  # keeps the periodic progress line going during long chunks
            for ref in done:
                kind = pending.pop(ref)
                if kind < 0:
                    outputs[TRAJECTORY_FILE] = ray.get(ref)
                    continue
                chunk, digest, count, n_bad, platform = ray.get(ref)
                outputs[part_name(chunk)] = digest
                platforms.add(platform)
                diverged += n_bad
                bar.advance(count)
    except (KeyboardInterrupt, ray.exceptions.TaskCancelledError, RunTerminated) as exc:  # Ctrl-C, SIGTERM, or a
        cancel_tasks(pending)  # cancelled task interrupted in a wait: the chunks in flight are cancelled alike
        how = "sweep cancelled by SIGTERM" if isinstance(exc, RunTerminated) else "sweep cancelled"
        reason = f"{how} after {bar.done}/{n} scenarios; partial output in {out_url}"
        raise (RunTerminated(reason) if isinstance(exc, RunTerminated) else SweepCancelled(reason)) from None
    except BaseException:
        cancel_tasks(pending)
        raise
    finally:
        bar.close()
    elapsed = time.monotonic() - t0
    log.info("sweep done scenarios=%d diverged=%d elapsed_s=%.2f scenarios_per_s=%s", n, diverged, elapsed,
             rate_text(n / max(elapsed, 1e-9)))
    if diverged:
        log.warning("sweep diverged=%d of scenarios=%d: their states left the plausible range or were not finite "
                    "(metrics NaN, column diverged); %s; a state that turns NaN inside its range is the model's own "
                    "(e.g. a square root of a negative number)", diverged, n, DIVERGED_ADVICE)
    return SweepResult(out_url, n, n_chunks, size, dict(sorted(outputs.items())), elapsed, diverged, sorted(platforms))
