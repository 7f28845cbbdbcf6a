"""``statelab bench``: suites of (spec, task, grid point, seed) cells, trained, scored and reported.

* :mod:`statelab.bench.suite`: the suite file and its expansion into cells;
* :mod:`statelab.bench.runner`: training and scoring, resumable, in parallel processes, with
  mlflow child runs under one suite run;
* :mod:`statelab.bench.report`: tables with intervals and paired baseline differences, plots.

See docs/benchmarking.md for a worked suite.
"""

from statelab.bench.report import summarize, write_report
from statelab.bench.runner import load_results, run_cell, run_suite
from statelab.bench.suite import Cell, Suite, SuiteError, expand, load_suite

__all__ = ["Cell", "Suite", "SuiteError", "expand", "load_results", "load_suite", "run_cell", "run_suite",
           "summarize", "write_report"]
