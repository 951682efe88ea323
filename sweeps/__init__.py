"""What-if scenario sweeps and calibration on Ray, with run records for exact reruns."""
