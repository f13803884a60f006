"""Benchmarks of tnlayers: ``python -m benchmarks.orderings`` and its siblings (see docs/benchmarks.md)."""
