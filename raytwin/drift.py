"""Sequential drift detection on a filter's innovations, with a false-alarm rate set per unit of time.

Why sequential: a consistent Kalman filter's innovations, each divided by its predicted standard
deviation, are independent N(0, 1). A bound checked at every sample (the previous EWMA-of-NIS test)
has a fixed false-alarm probability *per sample*, so a 1 Hz battery twin raised several false alarms
an hour, while a small persistent bias (a halved R_io) never crossed it. A CUSUM accumulates evidence
of a persistent shift and is the optimal test for one (Lorden); its threshold is chosen from the
average run length to a false alarm (ARL), here from a false-alarm *interval* in event time.

The detector (folded into the filter kernel, `raytwin.estimation.scan_kernels`):
- per output and per allowance k in `ALLOWANCES` (0.5 and 0.25), two one-sided CUSUMs on the
  normalised innovation e = y / sqrt(S_ii): ``g+ = max(0, g+ + e - k)``, ``g- = max(0, g- - e - k)``.
  A CUSUM with allowance k is tuned to a shift of 2k innovation standard deviations: 0.5 finds a
  sensor offset or a battery fault within seconds to minutes, 0.25 a slow building fault that the
  filter partly absorbs into its state (a halved R_io under process noise: innovations shifted by
  0.3-0.6 std, flagged after 7.1 h at worst with 0.5 alone, 4.5 h with both where the evidence
  allows; `benchmarks/drift.py` measures how close that is to a detector that knows the fault);
- the threshold h_k makes each CUSUM's in-control ARL (Siegmund's approximation, `cusum_arl`) equal
  to ``MARGIN * n_cusums * interval / gap`` updates, `gap` the twin's mean time between measurements
  (an EWMA of the event-time gaps, each clipped to `GAP_CLIP` times the mean): together the twin's
  CUSUMs raise at most one false alarm per `interval` (Bonferroni: conservative, as the CUSUMs of
  one sign are strongly correlated), whatever the sample rate; the drift score is the largest g / h_k;
- the alarm latches: `Divergence.drift` stays true until cleared (`clear_drift`), and while it is
  set the process-noise adaptation below is frozen (a fault must not be absorbed as "noise").
  Measured and rejected: freezing it earlier, while the score is above 0.5 or 0.3, so that a
  building fault cannot raise Q: the slowest halved-R_io delay moved by 5 minutes, but Q was then
  biased low on healthy streams (it is frozen exactly when the innovations run large): 2 and 4
  false episodes in 190 twin-days, against 1.

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

ALLOWANCES = (0.5, 0.25)
"""CUSUM allowances (reference values) per update; each output gets a two-sided pair for each. 0.5 is
tuned to a persistent innovation shift of one standard deviation, 0.25 to half of one: a slow fault
the filter partly absorbs into its state (a halved R_io under the declared process noise shifts the
thermal innovations by 0.3-0.6 std) took up to 7.1 h with 0.5 alone, and at most 4.5 h with both
wherever a detector that knows the fault can flag it within 6 h (`benchmarks/drift.py`)."""
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
GAP_CLIP = 10.0
"""A gap enters that mean as at most this many times the mean so far: a device silent for ten years
made the mean gap months, so the threshold fell to its floor (a false alarm "per 30 days" allowed at
every update) and the slow CUSUM's leftover evidence from before the silence latched the alarm. A
real change of sample rate is still followed, by up to 45 % per event."""
ADAPT_RATE = 0.01
"""Step of the process-noise adaptation per update (log scale): ~100 updates to move by e."""
ADAPT_CLIP = 9.0
"""Cap on e^2 in the adaptation's gradient: an outlier or a fault's first large innovations must not
inflate the process noise (uncapped, a failing sensor's 10-sigma innovations doubled Q in a few updates)."""
MIN_Q_SCALE = 1e-3
"""Smallest factor on the declared process-noise variance (a 30x smaller process-noise std)."""
_MIN_THRESHOLD = 0.5


def cusum_arl(h: float, k: float = ALLOWANCES[0], mu: float = 0.0) -> float:
    """Siegmund's approximation of the mean number of updates before a one-sided CUSUM
    ``max(0, g + e - k)`` on e ~ N(mu, 1) exceeds `h` (in control: mu = 0)."""
    delta, b = mu - k, h + SIEGMUND_OVERSHOOT
    if abs(delta) < 1e-12:
        return b * b
    return (math.exp(-2 * delta * b) + 2 * delta * b - 1) / (2 * delta * delta)


def cusum_threshold(arl, k=ALLOWANCES[0], xp=np):
    """The threshold h whose in-control ARL (`cusum_arl`, mu = 0) is `arl` updates, for an allowance
    `k` (or an array of them, broadcast); `xp` is ``numpy`` or ``jax.numpy`` (the filter kernel
    evaluates it per update)."""
    c = 2 * k * k * arl  # solve exp(x) - x - 1 = c for x = 2 k (h + overshoot)
    x = xp.log1p(c)
    for _ in range(6):  # fixed-point iteration, converges in a few steps for c >> 1
        x = xp.log(1 + c + x)
    return xp.maximum(x / (2 * k) - SIEGMUND_OVERSHOOT, _MIN_THRESHOLD)


def required_arl(interval_s, gap_s, n_cusums: int):
    """Updates each of `n_cusums` CUSUMs must run in control, on average, so that together they
    raise one false alarm per `interval_s` seconds of event time at one update per `gap_s`."""
    return MARGIN * n_cusums * interval_s / gap_s
