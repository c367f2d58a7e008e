"""Deterministic matching over the merged state: book, fills, checkpoints.

Pure: no I/O, no clock, no randomness.
"""
