"""Experiments over trady: step benchmarks (`bench`), grids of runs (`sweep`) and reports (`report`).

The top tier below the CLI: nothing in the library imports it.
"""
