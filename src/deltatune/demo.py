"""`deltatune demo`: train a few methods on one task, print a comparison table and save it.

This is what `make demo` runs: the shortest path from a fresh clone to a real result.
"""

from __future__ import annotations

from pathlib import Path

from deltatune.delta import json_text
from deltatune.records import RunRecord
from deltatune.run import data_record, run_training, summarize
from deltatune.training import TrainConfig


def comparison_table(records: list[RunRecord]) -> str:
    metrics = list(records[0].dev_metrics)
    header = [
        "method",
        "trainable params",
        "%",
        *[f"dev {m}" for m in metrics],
        "train s",
        "examples/s",
        "delta MB",
        "full MB",
        "peak GiB",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r.method,
                f"{r.trainable_params:,}",
                f"{r.trainable_percent:.3f}",
                *[f"{r.dev_metrics[m]:.4f}" for m in metrics],
                f"{r.train_time_s:.0f}",
                f"{r.train_examples_per_s or 0:.1f}",
                f"{(r.delta_bytes or 0) / 1e6:.2f}",
                f"{r.full_model_bytes / 1e6:.1f}",
                f"{(r.peak_memory_bytes or 0) / 2**30:.2f}",
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_demo(
    out: Path,
    model: str = "minilm-l6",
    task: str = "stsb",
    methods=("full", "bitfit"),
    epochs: float = 1.0,
    quiet: bool = False,
) -> list[RunRecord]:
    from deltatune.methods import get_method_entry
    from deltatune.tasks import get_task

    config = TrainConfig(epochs=epochs, quiet=quiet)  # every argument checked before anything is written
    get_task(task)
    for method in methods:
        get_method_entry(method)
    records = []
    for method in methods:
        record = run_training(model, data_record(task), method, {}, config, out=out / method, overwrite=True)
        assert record is not None  # one process: this one writes and returns the record
        print(summarize(record), flush=True)
        records.append(record)
    table = comparison_table(records)
    command = f"deltatune demo --model {model} --task {task} --methods {','.join(methods)} --epochs {epochs:g}"
    report = (
        f"# deltatune demo: {task} on {model}\n\n{epochs:g} epoch(s) each, official dev split, "
        f"seed {TrainConfig.seed}, each method's default learning rate.\n\n{table}\n\nProduced by `{command}`.\n"
    )
    (out / "comparison.md").write_text(report, encoding="utf-8")
    (out / "comparison.json").write_text(json_text([record.to_json() for record in records]), encoding="utf-8")
    print("\n" + table)
    print(f"\nwritten: {out / 'comparison.md'} (and each method's delta and run.json under {out}/)")
    return records
