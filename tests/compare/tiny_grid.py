"""A tiny real grid for the runner tests: a random BERT, a learnable toy CSV task and a spec, and ways to watch
a grid run from outside (each cell trains for real, in seconds)."""

from __future__ import annotations

import csv
import sqlite3
import textwrap
import time
from pathlib import Path

from conftest import make_sentiment_rows, save_tiny_model_dir
from deltatune.compare import store


def write_grid_workspace(directory: Path, grid: str) -> Path:
    """tiny-bert/, toy.csv (160 rows) and grid.yaml (`grid`, dedented) in `directory`."""
    save_tiny_model_dir(directory / "tiny-bert", "bert")
    with open(directory / "toy.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_sentiment_rows(160))
    (directory / "grid.yaml").write_text(textwrap.dedent(grid), encoding="utf-8")
    return directory


def wait_until(condition, timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def finished_count(exp_dir: Path) -> int:
    if not store.store_path(exp_dir).is_file():
        return 0
    try:
        return len(store.load_cells(exp_dir, status="finished"))
    except sqlite3.OperationalError:  # the schema is being created right now
        return 0
