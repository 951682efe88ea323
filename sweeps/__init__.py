"""What-if scenario sweeps and calibration on Ray, with run records for exact reruns.

The public API is importable from here (``from sweeps import SweepSpec, run_sweep``); submodules
load on first use so that ``raytwin --help`` does not pay for JAX and Ray.
"""

from __future__ import annotations

from raytwin.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "sweeps.space": ("Dimension", "ScenarioSpace"),
    "sweeps.spec": ("SweepSpec", "resolve_model"),
    "sweeps.runner": ("run_sweep", "SweepResult", "SweepCancelled"),
    "sweeps.aggregate": ("IncompleteRun", "open_dataset", "quantiles"),
    "sweeps.calibration": ("CalibrationSpec", "CalibrationResult", "CalibrationError", "calibrate"),
    "sweeps.synthetic": ("synthetic_telemetry",),
    "sweeps.runs": ("RunRecord", "RunStore", "RunError", "recorded_sweep", "recorded_calibration", "recorded_fmu_sweep",
                    "recorded_fmu_calibration", "rerun", "load_calibration"),
    "sweeps.fmu": ("FmuSweepSpec", "FmuCalibrationSpec"),
    "sweeps.twins": ("start_from_twin",),
    "sweeps.recommend": ("RecommendSpec", "Recommendation", "recommend", "recorded_recommendation",
                         "load_recommendation"),
    "sweeps.kits": ("Kit", "KitParameter", "kit_for", "register_kit"),
    "raytwin.scenario_metrics": ("Metric", "CustomMetric"),
})
