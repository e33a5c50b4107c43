"""What running a grid's cells as Ray tasks costs against the local backend, on the same tiny grid.

    python benchmarks/ray_grid.py --out runs/ray-grid --seeds 2 --repeats 2

Builds the test suite's tiny random BERT and toy task (tests/compare/tiny_grid.py) under --out, then runs the
same grid (full, bitfit and lora-r4 × --seeds seeds, one thread per cell, one cell at a time) with the local
backend and with Ray on a local one-CPU instance, alternating local, ray, local, ray, ... (--repeats rounds), each
into a fresh experiment directory, so that a change in the machine's load falls on both. Ray's start-up is timed
apart (a cluster pays it once, not per grid). Per run: wall seconds per cell, and the runner's overhead per cell,
the wall time less the cells' own training and evaluation time (`cell_time_s`, measured inside each cell's
process, the same work on both backends): process start-up and imports, scheduling, moving the result, recording.
Prints one JSON object, with `uptime` before and after, since the machine's load moves every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "compare")]
from tiny_grid import write_grid_workspace  # noqa: E402

from deltatune.compare import store  # noqa: E402
from deltatune.compare.ray_backend import run_grid_on_ray, start_local_ray  # noqa: E402
from deltatune.compare.runner import run_grid  # noqa: E402
from deltatune.compare.spec import parse_spec, read_spec_file  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def timed_grid(spec_path: Path, exp_dir: Path, backend: str) -> dict:
    started = time.perf_counter()
    run = run_grid_on_ray if backend == "ray" else run_grid
    summary = run(
        parse_spec(read_spec_file(spec_path)),
        exp_dir,
        jobs=1,
        say=lambda text: print(text, file=sys.stderr, flush=True),
    )
    wall = time.perf_counter() - started
    if summary.finished_now != summary.total:
        raise SystemExit(f"{backend}: only {summary.finished_now} of {summary.total} cells finished")
    inside = sum(cell["cell_time_s"] for cell in store.load_cells(exp_dir))
    return {
        "backend": backend,
        "cells": summary.total,
        "wall_s": round(wall, 2),
        "wall_s_per_cell": round(wall / summary.total, 2),
        "overhead_s_per_cell": round((wall - inside) / summary.total, 2),
    }


def mean(runs: list[dict], backend: str, key: str) -> float:
    values = [run[key] for run in runs if run["backend"] == backend]
    return round(sum(values) / len(values), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new directory for the workspace and the grids")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (local, ray)")
    args = parser.parse_args()
    args.out.mkdir(parents=True)
    workspace = write_grid_workspace(
        args.out.resolve(),
        f"""
        title: tiny grid
        models: [tiny-bert]
        tasks: [{{name: toy, path: toy.csv, text_fields: [text]}}]
        methods: [full, bitfit, {{name: lora-r4, method: lora, config: {{r: 4}}}}]
        fractions: [1.0]
        seeds: {list(range(args.seeds))}
        train: {{epochs: 2, batch_size: 16, learning_rate: 0.003, threads: 1, eval_every: 4}}
    """,
    )
    import ray

    result = {"uptime_before": uptime()}
    started = time.perf_counter()
    start_local_ray(num_cpus=1)
    result["ray_start_s"] = round(time.perf_counter() - started, 2)
    runs = []
    try:
        for round_number in range(args.repeats):
            for backend in ("local", "ray"):
                runs.append(timed_grid(workspace / "grid.yaml", workspace / f"{backend}-{round_number}", backend))
    finally:
        ray.shutdown()
    result["runs"] = runs
    for key in ("wall_s_per_cell", "overhead_s_per_cell"):
        result[key] = {backend: mean(runs, backend, key) for backend in ("local", "ray")}
    result["ray_extra_s_per_cell"] = round(
        result["overhead_s_per_cell"]["ray"] - result["overhead_s_per_cell"]["local"], 2
    )
    result["uptime_after"] = uptime()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
