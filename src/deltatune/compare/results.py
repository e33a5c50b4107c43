"""`deltatune results EXP_DIR --format csv|parquet|markdown`: the store as a flat table, one row per cell.

The columns are the run record's numbers (params, sizes, memory, times, throughput), the cell's
settings, the primary metric on the evaluation split (`primary_value`, test where the task has one) and on
dev (`dev_value`), one `test_<metric>` and one `dev_<metric>` column per metric, the chosen learning rate,
whether the run converged, and the method config as JSON text. `--table
curves` exports the learning curves instead (one row per dev evaluation).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from deltatune.compare import store
from deltatune.errors import DeltatuneError

FORMATS = ("csv", "parquet", "markdown")
TABLES = ("cells", "curves")


def cell_rows(exp_dir: str | Path, include_stale: bool = False) -> tuple[list[str], list[dict]]:
    from deltatune.compare.summary import judged_convergence

    cells = store.load_cells(exp_dir, include_stale=include_stale)
    curves = store.load_curves(exp_dir, [c["cell_id"] for c in cells if c["status"] == "finished"])
    metric_names = sorted({name for cell in cells for name in (cell["dev_metrics"] or {})})
    columns = [
        *store.SCALAR_COLUMNS,
        *(f"test_{name}" for name in metric_names),
        *(f"dev_{name}" for name in metric_names),
        "method_config",
    ]
    rows = []
    for cell in cells:
        row = {column: cell.get(column) for column in store.SCALAR_COLUMNS}
        judged = judged_convergence(cell, curves.get(cell["cell_id"])) if cell["status"] == "finished" else None
        if judged is not None:  # the report's rule, also for cells stored under an earlier one
            row["converged"] = int(judged)
        for name in metric_names:
            row[f"test_{name}"] = (cell["test_metrics"] or {}).get(name)
            row[f"dev_{name}"] = (cell["dev_metrics"] or {}).get(name)
        row["method_config"] = json.dumps(cell["method_config"], sort_keys=True)
        rows.append(row)
    return columns, rows


def curve_rows(exp_dir: str | Path, include_stale: bool = False) -> tuple[list[str], list[dict]]:
    cells = {c["cell_id"]: c for c in store.load_cells(exp_dir, include_stale=include_stale, status="finished")}
    curves = store.load_curves(exp_dir, list(cells))
    metric_names = sorted({name for points in curves.values() for p in points for name in p["metrics"]})
    columns = [
        "cell_id",
        "task",
        "variant",
        "method",
        "data_fraction",
        "time_budget_s",
        "seed",
        "point",
        "step",
        "examples_seen",
        "train_time_s",
        "primary_metric",
        "primary_value",
        *(f"dev_{n}" for n in metric_names),
    ]
    rows = []
    for cell_id, points in curves.items():
        cell = cells[cell_id]
        for point in points:
            row = {
                key: cell.get(key)
                for key in (
                    "cell_id",
                    "task",
                    "variant",
                    "method",
                    "data_fraction",
                    "time_budget_s",
                    "seed",
                    "primary_metric",
                )
            }
            row.update({key: point[key] for key in ("point", "step", "examples_seen", "train_time_s", "primary_value")})
            row.update({f"dev_{name}": point["metrics"].get(name) for name in metric_names})
            rows.append(row)
    return columns, rows


def _markdown_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value and abs(value) < 0.01:  # learning rates: four decimals would print 5e-05 as 0.0001
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


BRIEF_COLUMNS = (
    "task",
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
    "steps",
    "train_time_s",
    "status",
)


def export_results(
    exp_dir: str | Path,
    format: str = "csv",
    out: str | Path | None = None,
    include_stale: bool = False,
    table: str = "cells",
    columns: str | list[str] | None = None,
) -> str | None:
    """The table in `format`; written to `out` when given (needed for parquet), else returned as text.

    `columns` keeps only those columns, in that order: a list, a comma-separated string, or "brief"
    (the settings, the primary metric, cost and speed: a table that fits a terminal).
    """
    problems = []
    if format not in FORMATS:
        problems.append(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if table not in TABLES:
        problems.append(f"--table {table!r} is not one of {', '.join(TABLES)}")
    if format == "parquet" and out is None:
        problems.append("--format parquet is binary: give --out FILE.parquet")
    if problems:
        raise DeltatuneError("; ".join(problems) + ".")
    all_columns, rows = (cell_rows if table == "cells" else curve_rows)(exp_dir, include_stale)
    columns = _select_columns(all_columns, columns)
    if format == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DeltatuneError("--format parquet needs pyarrow: pip install pyarrow (or use --format csv).") from None
        arrays = {column: [row.get(column) for row in rows] for column in columns}
        pq.write_table(pa.table(arrays), str(out))
        return None
    if format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_markdown_value(row.get(c)) for c in columns) + " |" for row in rows]
        text = "\n".join(lines) + "\n"
    if out is not None:
        Path(out).write_text(text, encoding="utf-8")
        return None
    return text


def _select_columns(available: list[str], wanted: str | list[str] | None) -> list[str]:
    if wanted is None:
        return available
    if wanted == "brief":
        return [c for c in BRIEF_COLUMNS if c in available]
    names = [n.strip() for n in wanted.split(",")] if isinstance(wanted, str) else list(wanted)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DeltatuneError(
            f"--columns: no column {', '.join(map(repr, unknown))} in this table. "
            f"Choose from: {', '.join(available)} (or 'brief')."
        )
    return names


__all__ = ["export_results", "BRIEF_COLUMNS", "cell_rows", "curve_rows", "FORMATS", "TABLES"]
