"""Example RayTwin model package: a DC motor with winding temperature (see README.md)."""

from raytwin_dcmotor.model import DC_MOTOR

__all__ = ["DC_MOTOR"]
