"""How the cost of an epoch grows with data size and with max length.

    python benchmarks/scaling.py --model minilm-l6 --task snli --sizes 1000,5000,20000 \\
        --lengths 64,128,256 --method bitfit --out docs/results/scaling.md

Time per epoch should grow linearly with the number of examples (seconds per 1k examples flat). With
length-bucketed batches, raising max length should cost little when most inputs are short: padding
follows the real lengths, not the cap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="snli")
    parser.add_argument("--method", default="bitfit")
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--lengths", default="64,128,256")
    parser.add_argument("--size-for-lengths", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from deltatune.methods import build_method, prepare_model
    from deltatune.sources.data import load_task_data
    from deltatune.sources.models import load_model_for_task
    from deltatune.training import TrainConfig, train

    data = load_task_data(args.task)

    def one_epoch(size: int, max_length: int) -> dict:
        torch.manual_seed(0)
        model, tokenizer = load_model_for_task(args.model, data.task)
        method = build_method(args.method)
        prepare_model(model, method, tokenizer)
        config = TrainConfig(
            epochs=1, num_examples=size, max_length=max_length, batch_size=args.batch_size, eval_every=10**9, quiet=True
        )
        result = train(model, tokenizer, data.task, data.split("train"), data.split("dev").subset([0]), method, config)
        return {
            "size": result.num_train_examples,
            "max_length": max_length,
            "seconds": result.train_time_s,
            "per_1k": 1000 * result.train_time_s / result.num_train_examples,
            "tokens_per_s": result.real_tokens_per_s,
            "padding": result.padding_efficiency,
            "truncated": result.num_truncated["train"],
        }

    rows = [one_epoch(int(size), 128) for size in args.sizes.split(",")]
    rows += [one_epoch(args.size_for_lengths, int(length)) for length in args.lengths.split(",")]
    lines = [
        f"One epoch of `{args.method}` on {args.task} ({args.model}), batch {args.batch_size}.",
        "",
        "| examples | max length | epoch s | s per 1k examples | real tokens/s | padding eff. | truncated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']:,} | {r['max_length']} | {r['seconds']:.1f} | {r['per_1k']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['padding']:.2f} | {r['truncated']} |"
        )
    lines += ["", f"Produced by `python benchmarks/scaling.py {' '.join(sys.argv[1:])}`."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
