"""Reading Ray's metrics export in tests: samples summed over processes, and waiting for them."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the export on `port`: name -> [(labels, value)]."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """The cluster-wide value: `name`'s samples with `labels`, summed over processes."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def wait_until(port: int, check: Callable[[dict], bool], what: str, timeout_s: float = 60.0) -> dict:
    """Scrape until `check(samples)` holds (Ray exports every `metrics_report_interval_ms`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(port)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"Ray's metrics export never showed {what} within {timeout_s:.0f} s")
        time.sleep(0.5)
