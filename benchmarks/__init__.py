"""Reproducible benchmarks with fixed inputs (run the modules as scripts)."""
