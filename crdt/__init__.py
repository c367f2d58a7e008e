"""Replicated state: ids, keys, HLC, signed per-origin logs, merge, digests.

Pure: no I/O, no clock, no randomness. Everything external is passed in.
"""
