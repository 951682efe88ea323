"""What-if scenario sweeps and calibration on Ray, with run records for exact reruns.

The public API is importable from here (``from sweeps import SweepSpec, run_sweep``); submodules
load on first use so that ``raytwin --help`` does not pay for JAX and Ray.
"""

from __future__ import annotations

from raytwin.lazy import lazy_exports

_EXPORTS = {
    "Dimension": "sweeps.space",
    "ScenarioSpace": "sweeps.space",
    "SweepSpec": "sweeps.spec",
    "resolve_model": "sweeps.spec",
    "run_sweep": "sweeps.runner",
    "SweepResult": "sweeps.runner",
    "SweepCancelled": "sweeps.runner",
    "open_dataset": "sweeps.aggregate",
    "quantiles": "sweeps.aggregate",
    "CalibrationSpec": "sweeps.calibration",
    "CalibrationResult": "sweeps.calibration",
    "CalibrationError": "sweeps.calibration",
    "calibrate": "sweeps.calibration",
    "synthetic_telemetry": "sweeps.synthetic",
    "RunRecord": "sweeps.runs",
    "RunStore": "sweeps.runs",
    "RunError": "sweeps.runs",
    "recorded_sweep": "sweeps.runs",
    "recorded_calibration": "sweeps.runs",
    "recorded_fmu_sweep": "sweeps.runs",
    "recorded_fmu_calibration": "sweeps.runs",
    "FmuSweepSpec": "sweeps.fmu",
    "FmuCalibrationSpec": "sweeps.fmu",
    "rerun": "sweeps.runs",
    "start_from_twin": "sweeps.twins",
    "Kit": "sweeps.kits",
    "KitParameter": "sweeps.kits",
    "Metric": "sweeps.kits",
    "CustomMetric": "sweeps.kits",
    "kit_for": "sweeps.kits",
    "register_kit": "sweeps.kits",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
