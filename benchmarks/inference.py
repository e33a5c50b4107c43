"""Inference throughput: deltatune's prediction path against a transformers `pipeline`, same batch size.

    python benchmarks/inference.py --model minilm-l6 --task rotten-tomatoes --examples 2000 --batch-size 64 \\
        --rounds 3 --out docs/results/inference.md

Both score the same dev texts with the same model weights. The pipeline gets the texts in their
natural order (what users hand it); deltatune tokenises once and batches by length, at its default
precision ("auto": bf16 autocast on CPUs with native bf16) and, as a variant, in fp32. Rounds alternate A B A B; examples/s are medians over rounds, and the ratio
is taken within each round. Predictions of the two are compared, so the speed-up cannot hide a
change in outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="rotten-tomatoes")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import pipeline

    from deltatune.batching import encode, predict_encoded
    from deltatune.sources.data import load_task_data
    from deltatune.sources.models import load_model_for_task

    data = load_task_data(args.task)
    task = data.task
    if task.is_regression or len(task.text_fields) != 1:
        raise SystemExit("this benchmark uses a single-text classification task (the pipeline's own case)")
    split = data.split("dev")
    split = split.subset([i % len(split) for i in range(args.examples)])
    texts = [t[0] for t in split.texts]
    torch.manual_seed(0)
    model, tokenizer = load_model_for_task(args.model, task)
    model.eval()
    classifier = pipeline(
        "text-classification",
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        truncation=True,
        max_length=args.max_length,
        top_k=None,
    )

    def run_pipeline():
        outputs = classifier(texts, batch_size=args.batch_size)
        return np.array([task.labels.index(max(o, key=lambda x: x["score"])["label"]) for o in outputs])

    def run_deltatune(precision):
        encoded = encode(tokenizer, task, split, args.max_length)  # tokenising is part of the cost
        return predict_encoded(model, encoded, task, tokenizer.pad_token_id or 0, args.batch_size, precision).argmax(-1)

    sides = {
        "pipeline": run_pipeline,
        "deltatune": lambda: run_deltatune("auto"),
        "deltatune-fp32": lambda: run_deltatune("fp32"),
    }
    run_deltatune("fp32"), run_pipeline()  # warm-up: first-call allocations and lazy imports
    rates: dict[str, list[float]] = {name: [] for name in sides}
    predictions = {}
    for _ in range(args.rounds):
        for name, run in sides.items():
            started = time.perf_counter()
            predictions[name] = run()
            rates[name].append(len(texts) / (time.perf_counter() - started))
    agreement = {name: float((predictions[name] == predictions["pipeline"]).mean()) for name in sides}
    lines = [
        f"Model {args.model}, task {args.task} dev texts ({len(texts)}), batch size {args.batch_size}, max "
        f"length {args.max_length}, {args.rounds} alternating rounds, {torch.get_num_threads()} threads.",
        "",
        "| side | examples/s (median) | ratio vs pipeline (median of per-round ratios) | same predictions as pipeline |",
        "|---|---|---|---|",
    ]
    for name in sides:
        ratios = [a / b for a, b in zip(rates[name], rates["pipeline"], strict=True)]
        lines.append(
            f"| {name} | {statistics.median(rates[name]):.1f} | {statistics.median(ratios):.2f}x | "
            f"{agreement[name]:.1%} |"
        )
    lines += ["", f"Produced by `python benchmarks/inference.py {' '.join(sys.argv[1:])}`."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
