"""Micro-benchmarks (run as modules, e.g. ``python -m hetserve.bench.converters``)."""
