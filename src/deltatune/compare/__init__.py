"""Compare adaptation methods head to head: grid → runner → store → statistics → report.

    from deltatune.compare import parse_spec, read_spec_file, run_grid, write_report
    spec = parse_spec(read_spec_file("grid.yaml"))
    run_grid(spec, "runs/grid", jobs=1)      # resumable: run it again after any interruption
    write_report("runs/grid")                 # runs/grid/report.html and report.md

The same from the command line: `deltatune compare grid.yaml --out runs/grid`, `deltatune results
runs/grid --format csv`, `deltatune report runs/grid`. Any registered method can be compared;
adding a method needs no change here.

Names are imported on first use, so that `python -m deltatune.compare.cell` (one process per
cell) loads only what a cell needs.
"""

from importlib import import_module

_EXPORTS = {
    "GridSpec": "spec",
    "parse_spec": "spec",
    "read_spec_file": "spec",
    "spec_from_flags": "spec",
    "run_grid": "runner",
    "export_results": "results",
    "write_report": "report",
    "analyze": "summary",
    "claims": "summary",
    "PRESETS": "presets",
    "preset_spec": "presets",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"deltatune.compare.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'deltatune.compare' has no attribute {name!r}")


__all__ = list(_EXPORTS)
