"""Sequential drift detection on a filter's innovations, with a false-alarm rate set per unit of time.

Why sequential: a consistent Kalman filter's innovations, each divided by its predicted standard
deviation, are independent N(0, 1). A bound checked at every sample (the previous EWMA-of-NIS test)
has a fixed false-alarm probability *per sample*, so a 1 Hz battery twin raised several false alarms
an hour, while a small persistent bias (a halved R_io) never crossed it. A CUSUM accumulates evidence
of a persistent shift and is the optimal test for one (Lorden); its threshold is chosen from the
average run length to a false alarm (ARL), here from a false-alarm *interval* in event time.

The detector (folded into the filter kernel, `raytwin.estimation.scan_kernels`):
- per output, two one-sided CUSUMs on the normalised innovation e = y / sqrt(S_ii):
  ``g+ = max(0, g+ + e - k)``, ``g- = max(0, g- - e - k)`` with ``k = SHIFT / 2`` (tuned to a shift of
  `SHIFT` innovation standard deviations; larger shifts are found faster, smaller ones later);
- the threshold h makes each CUSUM's in-control ARL (Siegmund's approximation, `cusum_arl`) equal to
  ``n_cusums * interval / gap`` updates, `gap` the twin's mean time between measurements (an EWMA of
  the event-time gaps): together the twin's CUSUMs raise at most one false alarm per `interval`
  (Bonferroni), whatever the sample rate;
- the alarm latches: `Divergence.drift` stays true until cleared (`clear_drift`), and while it is
  set the process-noise adaptation below is frozen (a fault must not be absorbed as "noise").

Process-noise adaptation: a model's declared ``process_std`` is an upper bound. Each update moves
``log q_scale`` (the factor on Q) along the gradient of the innovation log-likelihood,
``0.5 * mean((min(e^2, 9) - 1) * (1 - R_ii / S_ii))``, clipped to [`MIN_Q_SCALE`, 1]. On data with less process
noise than declared (a building's noise-free dynamics), Q shrinks until the innovations are white
and the filter stops absorbing a persistent model error into its state; with the declared noise it
stays at ~1. Without this, a halved R_io on noise-free thermal data was never detected: the default
Q let the filter follow the measurements.
"""

from __future__ import annotations

import math

import numpy as np

SHIFT = 1.0
"""The persistent innovation shift (in innovation standard deviations) the CUSUMs are tuned to."""
K = SHIFT / 2
"""CUSUM reference value (allowance) per update."""
FALSE_ALARM_INTERVAL_S = 30 * 86_400.0
"""Default: at most one false drift episode per twin per 30 days of event time."""
MARGIN = 4.0
"""The in-control ARL is designed this many times longer than the interval asks: the Gaussian, white
innovations the approximation assumes are only approximately what an EKF with adapted process noise
produces (healthy thermal streams with declared process noise raised ~2x the nominal rate without it)."""
SIEGMUND_OVERSHOOT = 1.166
"""Siegmund's correction for the overshoot of a Gaussian CUSUM over its threshold."""
GAP_ALPHA = 0.05
"""Weight of the newest gap in the twin's mean time between measurements."""
ADAPT_RATE = 0.01
"""Step of the process-noise adaptation per update (log scale): ~100 updates to move by e."""
ADAPT_CLIP = 9.0
"""Cap on e^2 in the adaptation's gradient: an outlier or a fault's first large innovations must not
inflate the process noise (uncapped, a failing sensor's 10-sigma innovations doubled Q in a few updates)."""
MIN_Q_SCALE = 1e-3
"""Smallest factor on the declared process-noise variance (a 30x smaller process-noise std)."""
_MIN_THRESHOLD = 0.5


def cusum_arl(h: float, k: float = K, mu: float = 0.0) -> float:
    """Siegmund's approximation of the mean number of updates before a one-sided CUSUM
    ``max(0, g + e - k)`` on e ~ N(mu, 1) exceeds `h` (in control: mu = 0)."""
    delta, b = mu - k, h + SIEGMUND_OVERSHOOT
    if abs(delta) < 1e-12:
        return b * b
    return (math.exp(-2 * delta * b) + 2 * delta * b - 1) / (2 * delta * delta)


def cusum_threshold(arl, k: float = K, xp=np):
    """The threshold h whose in-control ARL (`cusum_arl`, mu = 0) is `arl` updates; `xp` is
    ``numpy`` or ``jax.numpy`` (the filter kernel evaluates it per update)."""
    c = 2 * k * k * arl  # solve exp(x) - x - 1 = c for x = 2 k (h + overshoot)
    x = xp.log1p(c)
    for _ in range(6):  # fixed-point iteration, converges in a few steps for c >> 1
        x = xp.log(1 + c + x)
    return xp.maximum(x / (2 * k) - SIEGMUND_OVERSHOOT, _MIN_THRESHOLD)


def required_arl(interval_s, gap_s, n_cusums: int):
    """Updates each of `n_cusums` CUSUMs must run in control, on average, so that together they
    raise one false alarm per `interval_s` seconds of event time at one update per `gap_s`."""
    return MARGIN * n_cusums * interval_s / gap_s
