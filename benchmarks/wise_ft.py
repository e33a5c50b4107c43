"""WiSE-FT: each run moved part of the way back toward its base model, the point chosen on dev.

    python benchmarks/wise_ft.py runs/wise-ft/s42 runs/wise-ft/s43 runs/wise-ft/s44 --out runs/wise-ft/points \
        --table runs/wise-ft/table.md

For each run and each weight w (default 0.1, 0.2, .., 1.0) the delta base + w·(run − base) is written with
`deltatune merge RUN --how task-arithmetic --weights w` (Wortsman et al. 2022, "Robust fine-tuning of zero-shot
models") and scored on dev and on test. Dev chooses w (a tie goes to the larger w, the run itself at 1.0); the
test score of every point is listed beside it, and nothing is chosen by test. Points already written are
not rebuilt, and their scores (`scores.json` in each) are read back.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import deltatune
from deltatune.merge import MergeConfig, merge_runs


def score(directory: Path, metric: str) -> tuple[float, float]:
    """Dev and test `metric` of a point; kept in `scores.json` beside it, so a second table costs no forward."""
    kept = directory / "scores.json"
    if kept.exists():
        scores = json.loads(kept.read_text())
    else:
        tuned = deltatune.load(directory)
        scores = {"dev": tuned.evaluate("dev"), "test": tuned.evaluate("test")}
        kept.write_text(json.dumps(scores, indent=2))
    return scores["dev"][metric], scores["test"][metric]


def scan(run: Path, weights: list[float], out: Path, metric: str) -> list[dict]:
    rows = []
    for weight in weights:
        point = out / f"{run.name}-w{weight:g}"
        if not point.exists():
            merge_runs([run], point, MergeConfig(how="task-arithmetic", weights=(weight,)))
        dev, test = score(point, metric)
        rows.append({"run": str(run), "weight": weight, "dev": dev, "test": test})
        print(f"{run} w={weight:g}: dev {dev:.4f} test {test:.4f}", flush=True)
    chosen = max(rows, key=lambda row: (row["dev"], row["weight"]))
    for row in rows:
        row["chosen"] = row is chosen
    return rows


def table(rows: list[dict], metric: str) -> str:
    runs = list(dict.fromkeys(row["run"] for row in rows))
    weights = list(dict.fromkeys(row["weight"] for row in rows))
    lines = [
        f"| w | {' | '.join(f'{Path(run).name} dev / test {metric}' for run in runs)} |",
        f"|---|{'---|' * len(runs)}",
    ]
    for weight in weights:
        cells = []
        for run in runs:
            (row,) = [row for row in rows if row["run"] == run and row["weight"] == weight]
            cell = f"{row['dev']:.4f} / {row['test']:.4f}"
            cells.append(f"**{cell}** (chosen)" if row["chosen"] else cell)
        lines.append(f"| {weight:g} | {' | '.join(cells)} |")
    chosen = [row for row in rows if row["chosen"]]
    own = [row for row in rows if row["weight"] == 1.0]
    lines.append("")
    chosen_weights = ", ".join(f"{row['weight']:g}" for row in chosen)
    chosen_tests = ", ".join(f"{row['test']:.4f}" for row in chosen)
    summary = f"Chosen on dev: w = {chosen_weights}; test {metric} {chosen_tests}, mean "
    summary += f"{statistics.mean(row['test'] for row in chosen):.4f}"
    if own:
        summary += f" (the runs themselves: mean {statistics.mean(row['test'] for row in own):.4f})"
    lines.append(summary + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--weights", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--metric", default="pearson", help="the task metric that chooses w on dev")
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged points")
    parser.add_argument("--table", type=Path, help="write the markdown table here too")
    args = parser.parse_args()
    weights = [float(value) for value in args.weights.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for run in args.runs for row in scan(run, weights, args.out, args.metric)]
    text = table(rows, args.metric)
    print(text)
    if args.table:
        args.table.write_text(text)


if __name__ == "__main__":
    main()
