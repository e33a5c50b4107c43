"""How precisely a test split pins a figure: bootstrap intervals of runs' test scores, alone and paired.

    python benchmarks/intervals.py --group table=runs/ref-s42,runs/ref-s43,runs/ref-s44 \
        --group sbert=runs/sbert/s42,runs/sbert/s43,runs/sbert/s44 --target 0.86

Each group is the runs of one recipe (its seeds). Its interval resamples the test examples (the same draws
for every group), averages the seeds' metric on each resample and reports the 2.5% and 97.5% quantiles,
with the share of resamples at or above `--target` when given. Every later group is also compared with the
first with as many runs, paired on the same examples (`deltatune.compare.stats.paired_bootstrap`, which draws the seeds too),
with `deltatune compare`'s verdict at `--margin` points (e.g. "within 1.5 points": the whole interval inside ±1.5).
The scores come from each run's saved `test_outputs.safetensors`; nothing is trained or run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from deltatune.compare.stats import metric_rows, paired_bootstrap, predictions_from_outputs, verdict


def read_test_predictions(run: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """A run's test predictions and gold labels, from the outputs saved beside its delta."""
    path = Path(run) / "test_outputs.safetensors"
    if not path.is_file():
        raise SystemExit(f"{run}: no {path.name} (a run directory written by deltatune train after scoring test)")
    saved = load_file(path)
    return predictions_from_outputs(saved["outputs"], metric), saved["labels"]


def group_interval(predictions: list[np.ndarray], labels: np.ndarray, metric: str, draws: np.ndarray):
    """Each seed's metric on the whole split, and the seeds' mean on each resample (`draws`: one row of indices
    each)."""
    each = [float(metric_rows(metric, p[None], labels[None])[0]) for p in predictions]
    resampled = np.mean([metric_rows(metric, p[draws], labels[draws]) for p in predictions], axis=0)
    return each, resampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", action="append", required=True, help="NAME=RUN,RUN,... (one recipe's seeds)")
    parser.add_argument("--metric", default=None, help="default: the first run's primary metric")
    parser.add_argument("--target", type=float, default=None, help="report the share of resamples at or above it")
    parser.add_argument(
        "--margin", type=float, default=1.0, help="points: the verdict's margin (as `deltatune compare`'s, default 1)"
    )
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    groups = {}
    for entry in args.group:
        name, _, runs = entry.partition("=")
        if not runs:
            parser.error(f"--group {entry!r}: write it as NAME=RUN,RUN,...")
        groups[name] = runs.split(",")
    for run in (run for runs in groups.values() for run in runs):
        if not (Path(run) / "run.json").is_file():
            raise SystemExit(f"{run}: not a run directory (no run.json); give the directories deltatune train wrote")
    first_run = next(iter(groups.values()))[0]
    metric = args.metric or json.loads((Path(first_run) / "run.json").read_text())["primary_metric"]
    loaded = {name: [read_test_predictions(run, metric) for run in runs] for name, runs in groups.items()}
    labels = next(iter(loaded.values()))[0][1]
    for name, pairs in loaded.items():
        if any(not np.array_equal(gold, labels) for _, gold in pairs):
            raise SystemExit(f"group {name!r}: its runs were scored on other test labels than {first_run}")
    draws = np.random.default_rng(args.seed).integers(0, len(labels), size=(args.samples, len(labels)))
    share_column = "" if args.target is None else f" share of resamples >= {args.target} |"
    print(f"| group | runs | each run | test {metric} | 95% interval |{share_column}")
    print("|---|---|---|---|---|" + ("" if args.target is None else "---|"))
    for name, pairs in loaded.items():
        each, resampled = group_interval([p for p, _ in pairs], labels, metric, draws)
        low, high = np.quantile(resampled, [0.025, 0.975])
        share = "" if args.target is None else f" {float((resampled >= args.target).mean()):.2f} |"
        shown = ", ".join(f"{value:.4f}" for value in each)
        print(f"| {name} | {len(pairs)} | {shown} | {np.mean(each):.4f} | [{low:.4f}, {high:.4f}] |{share}")
    reference, *others = loaded
    for name in others:
        if len(loaded[name]) != len(loaded[reference]):
            print(f"\n{name} minus {reference}: not paired ({len(loaded[name])} runs against {len(loaded[reference])})")
            continue
        result = paired_bootstrap(
            [p for p, _ in loaded[name]], [p for p, _ in loaded[reference]], labels, metric, args.samples
        )
        print(
            f"\n{name} minus {reference}: {100 * result.difference:+.2f} points "
            f"[{100 * result.low:+.2f}, {100 * result.high:+.2f}]: {verdict(result, args.margin)}"
        )


if __name__ == "__main__":
    main()
