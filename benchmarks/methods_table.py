"""Every registered method on one model and task, each at its own best learning rate: the README's method table.

    python benchmarks/methods_table.py --model minilm-l6 --task stsb --epochs 4 --eval-every 60 --patience 4 \
        --lr-search auto --out runs/methods-stsb --table docs/results/methods-stsb.md

Each method runs in its own process (one at a time, so they do not share the CPU) through `deltatune train`:
the learning rate is chosen on dev by successive halving over the method's own candidates (`--lr-search
auto`), training stops early when dev stops improving, and the kept state is scored once on the test split.
The table reports test with dev beside it, the chosen rate with every candidate's best dev score, and
whether the dev curve had levelled off (a run still rising at its end is marked "not converged").
`--heads` runs every method with several heads (e.g. `cross-encoder:cls,cross-encoder:mean,bi-encoder:mean`).
A method that fails stays in the table with its error. Re-running skips runs whose record already exists.
Options after `--` go to every `deltatune train`, e.g. `-- --regime mezo --max-steps 4000` for a regime's
rows (give them their own `--out`); a row trained under a regime other than standard names it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_directory(out: Path, method: str, head: str) -> Path:
    return out / (method if head == "auto:auto" else f"{method}@{head.replace(':', '-')}")


def run_method(method: str, head: str, args: argparse.Namespace) -> dict:
    directory = run_directory(args.out, method, head)
    record_path = directory / "run.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    kind, pooling = head.split(":")
    command = [
        sys.executable,
        "-m",
        "deltatune.cli",
        "train",
        "--model",
        args.model,
        "--task",
        args.task,
        "--method",
        method,
        "--out",
        str(directory),
        "--quiet",
        "--overwrite",
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--head",
        kind,
        "--pooling",
        pooling,
    ]
    for flag, value in (
        ("--eval-every", args.eval_every),
        ("--early-stopping-patience", args.patience),
        ("--min-steps", args.min_steps),
    ):
        if value:
            command += [flag, str(value)]
    if args.lr_search != "none":
        command += ["--lr-search", args.lr_search]
    command += args.extra
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"method": method, "head": head, "error": error, "wall_time_s": time.time() - started}
    return json.loads(record_path.read_text())


def _candidates(record: dict) -> str:
    from deltatune.run import describe_search
    from deltatune.search import rate_at_edge

    search = record.get("lr_search")
    if not search:
        return f"{record['learning_rate']:g}"
    edge = rate_at_edge(search)
    marked = f"; the {edge} candidate: the best may lie outside the range" if edge else ""
    return f"**{search['chosen']:g}** ({describe_search(search)}{marked})"


def table(records: list[dict], primary: str, show_head: bool) -> str:
    header = [
        "method",
        *(["head"] if show_head else []),
        "trainable params (%)",
        f"test {primary}",
        f"dev {primary}",
        "learning rate (candidates: dev at the rungs)",
        "steps (best at)",
        "converged",
        "delta bytes",
        "train s (whole search)",
        "examples/s",
        "peak memory GiB",
        "note",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        head = [r.get("head", "")] if show_head else []
        if "error" in r:
            lines.append("| " + " | ".join([r["method"], *head, "", "failed", *[""] * 8, r["error"][:160]]) + " |")
            continue
        shown_head = [f"{r['head']['kind']}, {r['head']['pooling']}"] if show_head else []
        note = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.get("method_report", {}).items()
        )
        test = r.get("test_metrics") or {}
        search = r.get("lr_search") or {}
        converged = (
            "yes"
            if r.get("converged")
            else (f"no (+{100 * r['last_gain']:.1f} at the end)" if r.get("last_gain") is not None else "no")
        )
        regime = r["train_config"].get("regime", "standard")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"] if regime == "standard" else f"{r['method']} ({regime})",
                    *shown_head,
                    f"{r['trainable_params']:,} ({r['trainable_percent']:.3g}%)",
                    f"{test[primary]:.4f}" if primary in test else "–",
                    f"{r['dev_metrics'][primary]:.4f}",
                    _candidates(r),
                    f"{r['steps']} ({r['best_step']}, {r['stopped_by']})",
                    converged,
                    f"{r['delta_bytes']:,}",
                    f"{r['train_time_s']:.0f} ({search.get('train_time_s', r['train_time_s']):.0f})",
                    f"{r['train_examples_per_s']:.1f}",
                    f"{r['peak_memory_bytes'] / 2**30:.2f}",
                    note,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    from deltatune.methods import REGISTRY
    from deltatune.tasks import get_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="stsb")
    parser.add_argument("--methods", default=",".join(REGISTRY), help="comma-separated; default: every registered")
    parser.add_argument(
        "--heads",
        default="auto:auto",
        help="comma-separated KIND:POOLING, e.g. cross-encoder:cls,bi-encoder:mean (default auto:auto)",
    )
    parser.add_argument("--epochs", type=float, default=4.0, help="at most this many epochs")
    parser.add_argument("--min-steps", type=int)
    parser.add_argument("--eval-every", type=int, default=60)
    parser.add_argument("--patience", type=int, default=4, help="early stopping: evaluations without improvement")
    parser.add_argument("--lr-search", default="auto", help="auto (each method's candidates), a list, or none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, required=True, help="run directories (deltas: keep out of git)")
    parser.add_argument("--table", type=Path, help="also write the Markdown table here")
    parser.add_argument("extra", nargs="*", help="more `deltatune train` options after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    heads = args.heads.split(",")
    for method in sorted(args.methods.split(","), key=lambda name: name != "full"):  # the baseline first
        for head in heads:
            record = run_method(method, head, args)
            record.setdefault("head", head)
            records.append(record)
            status = record.get("error") or f"test {record.get('test_metrics')}, dev {record['dev_metrics']}"
            print(f"{method} ({head}): {status}", flush=True)
    command = "python " + " ".join(sys.argv)
    primary = get_task(args.task).metric
    done = [r for r in records if "error" not in r]
    precision = ", ".join(sorted({r.get("precision", "fp32") for r in done}))
    search = (
        "each method's learning rate chosen on dev by successive halving over its own candidates "
        "(4 candidates to 1/8 of the planned steps, the best 2 to 1/4, the best to the end)"
        if args.lr_search == "auto"
        else f"learning rates {args.lr_search}"
    )
    text = (
        f"# Every method on {args.task} ({args.model}), each at its best learning rate\n\n"
        f"Batch size {args.batch_size}, at most {args.epochs:g} epochs, dev evaluated every {args.eval_every} steps, "
        f"early stopping after {args.patience} evaluations without improvement, the best dev state kept; "
        f"{search}; seed {args.seed}, precision {precision}. The kept state is scored once on the test split "
        f"(the official STS-B test for stsb), which chose nothing. 'converged' says whether the dev curve had "
        f"levelled off (not: the best of its last two evaluations beat every earlier one by more than 0.5 "
        f"points, the training loop's `still_improving`).\n\n"
        f"{table(records, primary, len(heads) > 1)}\n\nProduced by `{command}`.\n"
    )
    (args.out / "table.md").write_text(text, encoding="utf-8")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
