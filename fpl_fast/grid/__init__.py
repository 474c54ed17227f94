"""``python -m fpl_fast.grid SPEC.json``: a grid of federated runs (the cartesian product of a spec's axes over
its base config) and the paper-shaped table of their results.

The application level, beside and above :mod:`fpl_fast.job` (which runs each cell); nothing in the package
imports it. :mod:`fpl_fast.grid.spec` validates a spec and builds every cell's RunConfig, :mod:`.runner` runs
the cells (skip, resume, worker processes), :mod:`.table` writes table.csv, table.md and accuracy_vs_epsilon.png.
"""

from __future__ import annotations

from fpl_fast.grid.spec import Cell, GridSpec, SpecError, load_spec, parse_spec

__all__ = ["Cell", "GridSpec", "SpecError", "load_spec", "parse_spec"]
