"""Data-parallel training on the CPU: N processes under torchrun against one, same global batch and seed.

    python benchmarks/ddp_cpu.py --model runs/minilm-l6-no-dropout --data runs/sentiment-800.csv \\
        --steps 20 --batch-size 16 --rounds 2 --out docs/results/ddp-cpu.md

Each round trains once in one process (with `--threads` x N intra-op threads) and once as N processes
(`torchrun --nproc_per_node N`, `--threads` threads each, gloo over 127.0.0.1), alternating so machine
drift hits both. Both train in fp32 from the same start; a model without dropout makes the two runs the
same computation (with dropout, each rank draws its own masks, so deltas differ by more than rounding).
Reported: the largest absolute difference between the two deltas' tensors, dev and test metrics of both,
and training throughput (the run records' examples/s over training time only, evaluation excluded),
with the machine's `uptime` before and after: on a shared machine the ratio says little.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def train(args, out: Path, processes: int) -> dict:
    threads = args.threads * (args.processes if processes == 1 else 1)
    data = ["--data", args.data, "--text-fields", args.text_fields] if args.data else ["--task", args.task]
    command = [
        "-m",
        "deltatune.cli",
        "train",
        "--model",
        args.model,
        *data,
        "--method",
        args.method,
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--eval-every",
        str(args.steps),
        "--learning-rate",
        str(args.learning_rate),
        "--num-examples",
        str(args.steps * args.batch_size),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--threads",
        str(threads),
        "--seed",
        str(args.seed),
        "--quiet",
        "--overwrite",
        "--out",
        str(out),
    ]
    if processes > 1:
        command = [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--nnodes",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            *command,
        ]
    result = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"},
    )
    if result.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "run.json").read_text())


def max_abs_difference(first: Path, second: Path) -> float:
    from safetensors.torch import load_file

    one, two = load_file(first / "delta.safetensors"), load_file(second / "delta.safetensors")
    return max(float((one[name] - two[name]).abs().max()) for name in one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/minilm-l6-no-dropout")
    parser.add_argument("--task", default="rotten-tomatoes")
    parser.add_argument(
        "--data",
        help="a CSV/JSONL file of your own instead of --task (small dev and test "
        "splits keep evaluation, which is not timed, from dominating the run)",
    )
    parser.add_argument("--text-fields", default="text", help="with --data: the input column(s)")
    parser.add_argument("--method", default="full")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process under torchrun")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=Path("runs/ddp-cpu"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    load_before = uptime()
    rows = []
    for round_index in range(args.rounds):
        one = train(args, args.scratch / f"one-{round_index}", 1)
        many = train(args, args.scratch / f"many-{round_index}", args.processes)
        rows.append(
            (one, many, max_abs_difference(args.scratch / f"one-{round_index}", args.scratch / f"many-{round_index}"))
        )
        print(
            f"round {round_index + 1}: {one['train_examples_per_s']:.1f} vs {many['train_examples_per_s']:.1f} "
            f"examples/s, max |delta difference| {rows[-1][2]:.2e}",
            file=sys.stderr,
            flush=True,
        )
    text = report(args, rows, load_before, uptime())
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


def report(args, rows: list, load_before: str, load_after: str) -> str:
    from deltatune.devices import cpu_model_name

    one_speed = statistics.median(one["train_examples_per_s"] for one, _, _ in rows)
    many_speed = statistics.median(many["train_examples_per_s"] for _, many, _ in rows)
    metric = rows[0][0]["primary_metric"]
    split = rows[0][0]["evaluation_split"]
    lines = [
        f"| round | processes | threads each | examples/s (training) | dev {metric} | {split} {metric} | "
        "max abs delta difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, (one, many, difference) in enumerate(rows, 1):
        for record, processes in ((one, 1), (many, args.processes)):
            threads = record["train_config"]["threads"]
            scored = (record["test_metrics"] or record["dev_metrics"])[metric]
            lines.append(
                f"| {index} | {processes} ({record['distributed']['backend']}) | {threads} | "
                f"{record['train_examples_per_s']:.1f} | {record['dev_metrics'][metric]:.4f} | "
                f"{scored:.4f} | {difference:.2e} |"
            )
    lines += [
        "",
        f"Throughput ratio ({args.processes} processes / 1), medians over {len(rows)} rounds: "
        f"{many_speed / one_speed:.2f}x.",
        "",
        f"CPU: {cpu_model_name()}, {os.cpu_count()} cores. Load: before `{load_before}`; after `{load_after}`.",
        "",
        f"Produced by `python benchmarks/ddp_cpu.py {' '.join(sys.argv[1:])}`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
