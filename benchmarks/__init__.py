"""Benchmarks of tnlayers: ``python -m benchmarks.calibrate`` (see its docstring)."""
