"""The results store: one SQLite file in the experiment directory (standard library only).

Tables:
    cells           one row per cell of any spec that ever ran here: its settings, status
                    ('finished' or 'failed'), kind ('train', or 'baseline' for a no-training row), the run
                    record's numbers, the error of a failed cell. `primary_value` is the primary metric on
                    `evaluation_split` (test where the task has one, else dev); `dev_value` is it on dev,
                    where the checkpoint and learning rate were chosen
    learning_curve  one row per dev evaluation of a finished cell: step, examples seen, training
                    seconds so far, the primary metric and all metrics (JSON)
    meta            the current spec and the command that ran it

Each finished cell is written in one transaction (its row and its whole learning curve), and the
cell id is the primary key, so a cell is recorded completely or not at all and never twice.
`in_spec` marks the cells of the most recent spec: after a spec change, old cells stay in the
store (their compute is not thrown away) but the report and `deltatune results` leave them out
unless asked.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

STORE_NAME = "results.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('finished', 'failed')),
    in_spec INTEGER NOT NULL DEFAULT 1,
    grid TEXT, model TEXT, task TEXT, method TEXT, variant TEXT, method_config TEXT,
    data_fraction REAL, time_budget_s REAL, seed INTEGER, settings TEXT,
    primary_metric TEXT, primary_value REAL, dev_metrics TEXT,
    trainable_params INTEGER, total_params INTEGER, trainable_percent REAL,
    delta_bytes INTEGER, full_model_bytes INTEGER, peak_memory_bytes INTEGER,
    train_time_s REAL, eval_time_s REAL, wall_time_s REAL, cell_time_s REAL,
    train_examples_per_s REAL, num_train_examples INTEGER, steps INTEGER, best_step INTEGER,
    stopped_by TEXT, examples_seen INTEGER, run_dir TEXT, error TEXT, record TEXT,
    recorded_at TEXT NOT NULL,
    kind TEXT, evaluation_split TEXT, dev_value REAL, test_metrics TEXT, converged INTEGER, learning_rate REAL
);
CREATE TABLE IF NOT EXISTS learning_curve (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id) ON DELETE CASCADE,
    point INTEGER NOT NULL,
    step INTEGER, examples_seen INTEGER, train_time_s REAL, primary_value REAL, metrics TEXT,
    PRIMARY KEY (cell_id, point)
);
"""

SCALAR_COLUMNS = (
    "cell_id",
    "status",
    "in_spec",
    "kind",
    "grid",
    "model",
    "task",
    "method",
    "variant",
    "data_fraction",
    "time_budget_s",
    "seed",
    "primary_metric",
    "evaluation_split",
    "primary_value",
    "dev_value",
    "learning_rate",
    "converged",
    "trainable_params",
    "total_params",
    "trainable_percent",
    "delta_bytes",
    "full_model_bytes",
    "peak_memory_bytes",
    "train_time_s",
    "eval_time_s",
    "wall_time_s",
    "cell_time_s",
    "train_examples_per_s",
    "num_train_examples",
    "steps",
    "best_step",
    "stopped_by",
    "examples_seen",
    "run_dir",
    "error",
    "recorded_at",
)
"""What `deltatune results` exports per cell, in this order (plus test_* and dev_* metrics and method_config)."""

ADDED_COLUMNS = {
    "kind": "TEXT",
    "evaluation_split": "TEXT",
    "dev_value": "REAL",
    "test_metrics": "TEXT",
    "converged": "INTEGER",
    "learning_rate": "REAL",
}
"""Columns newer than the first stores: added to an older store when it is opened for writing."""

_RECORD_NUMBERS = (
    "trainable_params",
    "total_params",
    "trainable_percent",
    "delta_bytes",
    "full_model_bytes",
    "peak_memory_bytes",
    "train_time_s",
    "eval_time_s",
    "wall_time_s",
    "train_examples_per_s",
    "num_train_examples",
    "steps",
    "best_step",
    "stopped_by",
    "examples_seen",
)


def store_path(exp_dir: str | Path) -> Path:
    return Path(exp_dir) / STORE_NAME


def connect(exp_dir: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) the store; a busy timeout lets a reader wait out a writer's commit."""
    path = store_path(exp_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA foreign_keys = ON")
    # rollback journal + synchronous FULL: a commit that returned survives kill -9 and power loss
    connection.execute("PRAGMA synchronous = FULL")
    connection.executescript(SCHEMA)
    present = {row["name"] for row in connection.execute("PRAGMA table_info(cells)")}
    with connection:
        for name, kind in ADDED_COLUMNS.items():
            if name not in present:
                connection.execute(f"ALTER TABLE cells ADD COLUMN {name} {kind}")
    return connection


def connect_read_only(exp_dir: str | Path) -> sqlite3.Connection:
    """A reader's connection: never takes a write lock, so reading never slows a running grid."""
    _require_store(exp_dir)
    connection = sqlite3.connect(f"{store_path(exp_dir).resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    connection.row_factory = sqlite3.Row
    return connection


def _cell_columns(payload: dict) -> dict[str, Any]:
    return {
        "cell_id": payload["cell_id"],
        "grid": payload["grid"],
        "model": payload["model"],
        "task": payload["task"],
        "method": payload["method"],
        "variant": payload["variant"],
        "method_config": json.dumps(payload["method_config"], sort_keys=True),
        "data_fraction": payload["data_fraction"],
        "time_budget_s": payload["time_budget_s"],
        "seed": payload["seed"],
        "settings": json.dumps(payload, sort_keys=True),
    }


def record_finished(
    connection: sqlite3.Connection, payload: dict, record: dict, run_dir: str, cell_time_s: float | None
) -> None:
    """Write a finished cell and its learning curve in one transaction (replacing a failed attempt)."""
    columns = _cell_columns(payload)
    columns.update({key: record.get(key) for key in _RECORD_NUMBERS})
    primary = record["primary_metric"]
    split = record.get("evaluation_split") or "dev"
    reported = record["test_metrics"] if split == "test" else record["dev_metrics"]  # what the split's run wrote
    converged = record.get("converged")
    columns.update(
        status="finished",
        primary_metric=primary,
        primary_value=reported.get(primary),
        evaluation_split=split,
        dev_value=record["dev_metrics"].get(primary),
        test_metrics=json.dumps(record.get("test_metrics"), sort_keys=True),
        converged=None if converged is None else int(converged),
        learning_rate=record.get("learning_rate"),
        kind=record.get("kind", "train"),
        dev_metrics=json.dumps(record["dev_metrics"], sort_keys=True),
        run_dir=run_dir,
        cell_time_s=cell_time_s,
        error=None,
        in_spec=1,
        record=json.dumps({k: v for k, v in record.items() if k != "learning_curve"}, sort_keys=True),
        recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    curve = [
        (
            payload["cell_id"],
            index,
            point["step"],
            point["examples_seen"],
            point["train_time_s"],
            point["metrics"].get(primary),
            json.dumps(point["metrics"], sort_keys=True),
        )
        for index, point in enumerate(record.get("learning_curve") or [])
    ]
    with connection:  # one transaction: the row and its curve, or nothing
        connection.execute("DELETE FROM cells WHERE cell_id = ?", (payload["cell_id"],))
        names = ", ".join(columns)
        connection.execute(
            f"INSERT INTO cells ({names}) VALUES ({', '.join('?' for _ in columns)})", tuple(columns.values())
        )
        connection.executemany("INSERT INTO learning_curve VALUES (?, ?, ?, ?, ?, ?, ?)", curve)


def record_failed(connection: sqlite3.Connection, payload: dict, error: str, cell_time_s: float | None) -> None:
    columns = _cell_columns(payload)
    columns.update(
        status="failed",
        error=error,
        cell_time_s=cell_time_s,
        in_spec=1,
        kind=payload.get("kind", "train"),
        recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    with connection:
        connection.execute("DELETE FROM cells WHERE cell_id = ?", (payload["cell_id"],))
        names = ", ".join(columns)
        connection.execute(
            f"INSERT INTO cells ({names}) VALUES ({', '.join('?' for _ in columns)})", tuple(columns.values())
        )


def statuses(connection: sqlite3.Connection) -> dict[str, str]:
    return {row["cell_id"]: row["status"] for row in connection.execute("SELECT cell_id, status FROM cells")}


def mark_current(connection: sqlite3.Connection, current: dict[str, dict]) -> None:
    """Flag the cells of the current spec, and refresh their display names (a renamed variant)."""
    with connection:
        connection.execute("UPDATE cells SET in_spec = 0")
        connection.executemany(
            "UPDATE cells SET in_spec = 1, variant = ?, grid = ? WHERE cell_id = ?",
            [(p["variant"], p["grid"], cell_id) for cell_id, p in current.items()],
        )


def set_meta(connection: sqlite3.Connection, **values: Any) -> None:
    with connection:
        connection.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(key, json.dumps(value)) for key, value in values.items()]
        )


def get_meta(connection: sqlite3.Connection) -> dict[str, Any]:
    return {row["key"]: json.loads(row["value"]) for row in connection.execute("SELECT key, value FROM meta")}


def load_cells(exp_dir: str | Path, include_stale: bool = False, status: str | None = None) -> list[dict]:
    """Every recorded cell as a dict (JSON columns decoded), in the order they were recorded."""
    with closing(connect_read_only(exp_dir)) as connection:
        query = "SELECT * FROM cells"
        clauses, arguments = [], []
        if not include_stale:
            clauses.append("in_spec = 1")
        if status is not None:
            clauses.append("status = ?")
            arguments.append(status)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        rows = connection.execute(query + " ORDER BY rowid", arguments).fetchall()
    cells = []
    for row in rows:
        cell = dict(row)
        for key in ("method_config", "dev_metrics", "test_metrics", "settings", "record"):
            cell[key] = json.loads(cell[key]) if cell.get(key) else None
        cell["kind"] = cell.get("kind") or "train"
        cell["evaluation_split"] = cell.get("evaluation_split") or "dev"  # stores from before test evaluation
        cells.append(cell)
    return cells


def load_curves(exp_dir: str | Path, cell_ids: list[str] | None = None) -> dict[str, list[dict]]:
    """cell id -> its learning curve, in evaluation order."""
    with closing(connect_read_only(exp_dir)) as connection:
        rows = connection.execute("SELECT * FROM learning_curve ORDER BY cell_id, point").fetchall()
    curves: dict[str, list[dict]] = {}
    wanted = set(cell_ids) if cell_ids is not None else None
    for row in rows:
        if wanted is None or row["cell_id"] in wanted:
            point = dict(row)
            point["metrics"] = json.loads(point["metrics"]) if point["metrics"] else {}
            curves.setdefault(row["cell_id"], []).append(point)
    return curves


def load_meta(exp_dir: str | Path) -> dict[str, Any]:
    with closing(connect_read_only(exp_dir)) as connection:
        return get_meta(connection)


def _require_store(exp_dir: str | Path) -> None:
    from deltatune.errors import DeltatuneError

    if not store_path(exp_dir).is_file():
        raise DeltatuneError(
            f"{str(exp_dir)!r} holds no results ({STORE_NAME} is missing). Run "
            f"`deltatune compare SPEC --out {exp_dir}` first."
        )


__all__ = [
    "connect",
    "load_cells",
    "load_curves",
    "load_meta",
    "record_finished",
    "record_failed",
    "store_path",
    "STORE_NAME",
    "SCALAR_COLUMNS",
]
