"""The Lorenz system written on RayTwin's public model API, as a user's package would write it.

It is the ensemble problem of the DiffEqGPU paper's GPU benchmark (`benchmarks.lorenz_ensemble`):
see `benchmarks.lorenz.model`.
"""

from benchmarks.lorenz.model import LORENZ, LORENZ_KIT, PAPER_BETA, lorenz_kit

__all__ = ["LORENZ", "LORENZ_KIT", "PAPER_BETA", "lorenz_kit"]
