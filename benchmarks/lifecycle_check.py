"""What a request's lifecycle check costs on a long log: `python -m benchmarks.lifecycle_check [--records N]`.

A model's lifecycle log of N records (a submit, then shadow `evaluate` records) on local disk, and on S3 (moto's
server on loopback) when moto is installed. Timed, with the files each reads (a listing counts as one): the full
`ModelLifecycle.verify` (what every asset create or update, type delete and transition ran before), and
`ModelLifecycle.current` after another writer appended one record (what they run now: the verified prefix's last
record, the new record, and the probe for the one after).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from benchmarks.local_s3 import local_s3, new_bucket
from raytwin.contracts import AssetType
from raytwin.lifecycle import GENESIS, Evidence, ModelLifecycle, TransitionRecord
from raytwin.registry import ModelRegistry
from raytwin.sim import THERMAL_RC
from raytwin.storage import canonical_json

MODEL, ROUNDS = "zone", 5


def _record(seq: int, prev: str, action: str) -> TransitionRecord:
    body = dict(seq=seq, prev_hash=prev, model=MODEL, tenant="acme", version="1.0.0", action=action,
                from_stage=None if action == "submit" else "candidate", to_stage="candidate", actor="alice",
                actor_roles=[], time=datetime.now(UTC), reason="bench", evidence=Evidence(), hash=GENESIS)
    unsigned = TransitionRecord.model_validate(body)
    return unsigned.model_copy(update={"hash": unsigned.computed_hash()})


def build_log(url: str, options: dict[str, Any] | None, records: int) -> ModelLifecycle:
    registry = ModelRegistry(url, options)
    registry.register(MODEL, "1.0.0", AssetType.from_model(THERMAL_RC), {})
    lc = ModelLifecycle(registry)
    base, prev = f"{lc.root}/lifecycle/{MODEL}/log", GENESIS
    lc.fs.makedirs(base, exist_ok=True)
    for seq in range(records):
        r = _record(seq, prev, "submit" if seq == 0 else "evaluate")
        lc.fs.pipe_file(f"{base}/{seq:08d}.json", canonical_json(r.stored()))
        prev = r.hash
    return lc


def _counted(lc: ModelLifecycle, call: Callable[[], object]) -> tuple[float, int]:
    """Seconds `call` took and the files it read (`cat_file` calls and listings)."""
    reads = [0]
    cat_file, ls = lc.fs.cat_file, lc.fs.ls
    lc.fs.cat_file = lambda *a, **k: reads.__setitem__(0, reads[0] + 1) or cat_file(*a, **k)
    lc.fs.ls = lambda *a, **k: reads.__setitem__(0, reads[0] + 1) or ls(*a, **k)
    try:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start, reads[0]
    finally:
        lc.fs.cat_file, lc.fs.ls = cat_file, ls  # (s3fs's are the instance's own: put back, not deleted)


def measure(where: str, lc: ModelLifecycle) -> None:
    full = [_counted(lc, lambda: lc.verify(MODEL)) for _ in range(ROUNDS)]
    appended = []
    for _ in range(ROUNDS):
        state = lc.current(MODEL)
        head = _record(state.revision + 1, state.head_hash, "evaluate")  # another writer's record
        lc.fs.pipe_file(f"{lc.root}/lifecycle/{MODEL}/log/{head.seq:08d}.json", canonical_json(head.stored()))
        appended.append(_counted(lc, lambda: lc.current(MODEL)))
    for label, runs in (("full verify (before: every request)", full),
                        ("current, one record appended (after: a request)", appended)):
        print(f"{where:5} {label:50} median {1e3 * statistics.median(t for t, _ in runs):9.1f} ms, "
              f"{runs[0][1]} reads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    n = parser.parse_args().records
    with tempfile.TemporaryDirectory() as tmp:
        measure("local", build_log(f"{tmp}/registry", None, n))
    try:
        import moto.server  # noqa: F401
    except ImportError:
        print("s3: skipped (moto not installed: pip install 'moto[server]')")
        return
    with local_s3() as endpoint:
        measure("s3", build_log(f"{new_bucket(endpoint)}/registry", {"client_kwargs": {"endpoint_url": endpoint}}, n))


if __name__ == "__main__":
    main()
