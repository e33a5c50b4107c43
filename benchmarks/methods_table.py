"""Every registered method on one model and task under the same budget: the README's method table.

    python benchmarks/methods_table.py --model minilm-l6 --task stsb --epochs 2 --out runs/methods-stsb \
        --table docs/results/methods-stsb.md

Each method runs in its own process (one at a time, so they do not share the CPU), writes its run
record, and the table is assembled from those records: trainable parameters (count and %), delta
bytes, dev metric, train examples/s, peak memory. A method that fails stays in the table with its
error. Re-running skips methods whose record already exists (delete the directory to start over).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_method(method: str, args: argparse.Namespace, out: Path) -> dict:
    record_path = out / method / "run.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    command = [sys.executable, "-m", "deltatune.cli", "train", "--model", args.model, "--task", args.task,
               "--method", method, "--out", str(out / method), "--quiet", "--overwrite",
               "--seed", str(args.seed), "--batch-size", str(args.batch_size)]
    if args.time_budget_s:
        command += ["--time-budget-s", str(args.time_budget_s), "--epochs", "1000"]
    else:
        command += ["--epochs", str(args.epochs)]
    command += args.extra
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"method": method, "error": error, "wall_time_s": time.time() - started}
    return json.loads(record_path.read_text())


def table(records: list[dict], primary: str) -> str:
    header = ["method", "trainable params", "trainable %", f"dev {primary}", f"dev {primary} at each evaluation",
              "delta bytes", "train examples/s", "train s", "peak memory GiB", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['method']} | | | failed | | | | | | {r['error'][:160]} |")
            continue
        note = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in r.get("method_report", {}).items())
        curve = " → ".join(f"{point['metrics'][primary]:.3f}" for point in r.get("learning_curve", []))
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | "
            f"{r['dev_metrics'][primary]:.4f} | {curve} | {r['delta_bytes']:,} | {r['train_examples_per_s']:.1f} | "
            f"{r['train_time_s']:.0f} | {r['peak_memory_bytes'] / 2**30:.2f} | {note} |")
    return "\n".join(lines)


def main() -> None:
    from deltatune.methods import REGISTRY
    from deltatune.tasks import get_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="stsb")
    parser.add_argument("--methods", default=",".join(REGISTRY), help="comma-separated; default: every registered")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--time-budget-s", type=float, help="instead of epochs: seconds of training per method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, required=True, help="run directories (deltas: keep out of git)")
    parser.add_argument("--table", type=Path, help="also write the Markdown table here")
    parser.add_argument("extra", nargs="*", help="more `deltatune train` options after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    names = args.methods.split(",")
    for method in sorted(names, key=lambda name: name != "full"):  # the baseline first
        record = run_method(method, args, args.out)
        records.append(record)
        status = record.get("error") or f"dev {record['dev_metrics']}"
        print(f"{method}: {status}", flush=True)
    budget = f"{args.time_budget_s:g} s of training each" if args.time_budget_s else f"{args.epochs:g} epochs each"
    command = "python " + " ".join(sys.argv)
    primary = get_task(args.task).metric
    text = (f"# Every method on {args.task} ({args.model}), {budget}\n\n"
            f"Official dev split, seed {args.seed}, batch size {args.batch_size}, precision "
            f"{', '.join(sorted({r.get('precision', 'fp32') for r in records if 'error' not in r}))}, "
            f"each method's default learning rate and options; dev evaluated once per epoch, the best "
            f"evaluation kept.\n\n{table(records, primary)}\n\nProduced by `{command}`.\n")
    (args.out / "table.md").write_text(text, encoding="utf-8")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
