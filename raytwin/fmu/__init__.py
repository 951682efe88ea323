"""FMUs (FMI 2.0 and 3.0) through fmpy: describe, simulate, sweep, calibrate and step them.

See raytwin/fmu/README.md. fmpy is imported lazily, inside the functions that need it.
"""

from raytwin.fmu.batch import FmuCalibration, FmuSweepResult, calibrate_fmu, run_fmu_sweep, run_scenarios
from raytwin.fmu.describe import FmuError, FmuModel, store_fmu
from raytwin.fmu.instance import INSTANTIATIONS, FmuInstance, FmuScenario, cached_instance
from raytwin.fmu.stepper import FmuStepper

__all__ = [
    "INSTANTIATIONS", "FmuCalibration", "FmuError", "FmuInstance", "FmuModel", "FmuScenario", "FmuStepper",
    "FmuSweepResult", "cached_instance", "calibrate_fmu", "run_fmu_sweep", "run_scenarios", "store_fmu",
]
