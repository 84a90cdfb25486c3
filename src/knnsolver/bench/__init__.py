"""Benchmarks that test every paper's claim side by side on real data.

``knnsolver bench SUITE`` runs one suite (:mod:`knnsolver.bench.suites`) through
the resumable runner (:mod:`knnsolver.bench.runner`); ``knnsolver bench report``
renders ``BENCHMARKS.md`` from the stored results (:mod:`knnsolver.bench.report`).
"""
from knnsolver.bench.suites import PRESETS, SUITES, RunSpec, build_specs, get_preset, get_suite

__all__ = ["PRESETS", "SUITES", "RunSpec", "build_specs", "get_preset", "get_suite"]
