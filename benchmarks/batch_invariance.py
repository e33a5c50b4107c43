"""Batch invariance of the served deltas: do answers depend on their batch mates, and what does the guarantee cost?

    python benchmarks/batch_invariance.py --rounds 4

The 16 deltas and 2,048 requests of `benchmarks/serve.py` (built by its functions), loaded twice in one process:
with `batch_invariant` (the default) and without. For each, the answers to the requests in one call (sorted by
length across all of them) are compared with the answers to the same requests sent as a server meets them:
one call per 64 in arrival order, one call per 2, one call per request alone, and all of them shuffled in
batches of 32. Counted: answers whose probabilities equal the one-call answers to the last bit, labels equal,
the largest probability difference. Then the cost: both models in alternating rounds on the sorted call and
on the arrival-order calls (the mixed-batch state kept open, as the server runs), each round's ratio printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import serve as bench  # noqa: E402  (benchmarks/serve.py, beside this file)

MODES = {True: "batch-invariant (default)", False: "not batch-invariant"}


def regroupings(count: int, seed: int) -> dict[str, tuple[list[list[int]], int]]:
    """The ways the requests are cut into calls: name -> (the calls' request indices, the batch size they run at)."""
    shuffled = list(range(count))
    random.Random(seed).shuffle(shuffled)
    return {
        "calls of 64 in arrival order": (bench.arrival_batches(count, 64), 64),
        "calls of 2": (bench.arrival_batches(count, 2), 64),
        "each request alone": (bench.arrival_batches(count, 1), 64),
        "shuffled, one call in batches of 32": ([shuffled], 32),
    }


def agreement(model, texts: list[str], names: list[str], seed: int) -> list[dict]:
    """Each regrouping's answers against the one-call answers."""
    reference = model.predict(texts, task=names, batch_size=64)
    rows = []
    for label, (calls, batch_size) in regroupings(len(texts), seed).items():
        answers: list = [None] * len(texts)
        for call in calls:
            got = model.predict([texts[i] for i in call], task=[names[i] for i in call], batch_size=batch_size)
            for row, answer in zip(call, got, strict=True):
                answers[row] = answer
        rows.append(
            {
                "regrouping": label,
                "bits": sum(a["probabilities"] == b["probabilities"] for a, b in zip(answers, reference, strict=True)),
                "labels": sum(a["label"] == b["label"] for a, b in zip(answers, reference, strict=True)),
                "max_difference": max(
                    abs(a["probabilities"][key] - b["probabilities"][key])
                    for a, b in zip(answers, reference, strict=True)
                    for key in b["probabilities"]
                ),
            }
        )
    return rows


def cost(models: dict, texts: list[str], names: list[str], rounds: int) -> dict[str, list[float]]:
    """Inputs/s of each model on the sorted call and on arrival-order calls of 64, alternating which goes first."""
    calls = bench.arrival_batches(len(texts), 64)
    workloads = {
        "one call, sorted by length": lambda model: model.predict(texts, task=names, batch_size=64),
        "calls of 64 in arrival order": lambda model: [
            model.predict([texts[i] for i in call], task=[names[i] for i in call], batch_size=64) for call in calls
        ],
    }
    rates: dict[str, list[float]] = {}
    for number in range(rounds):
        for workload, run in workloads.items():
            for invariant in (True, False) if number % 2 == 0 else (False, True):
                started = time.perf_counter()
                run(models[invariant])
                rate = len(texts) / (time.perf_counter() - started)
                rates.setdefault(f"{workload}|{invariant}", []).append(rate)
            ratio = rates[f"{workload}|True"][-1] / rates[f"{workload}|False"][-1]
            print(f"round {number + 1}, {workload}: invariant / not {ratio:.3f}", flush=True)
    return rates


def main() -> None:
    import os

    import deltatune

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/serve-bench"), help="where the 16 deltas are kept")
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    args = argparse.Namespace(
        runs=options.runs, model="minilm-l6", train_steps=60, requests=options.requests, seed=0, texts_per_task=400
    )
    runs = bench.prepare_runs(args)
    texts, names = bench.request_pool(args, runs)
    models = {
        invariant: deltatune.load_many(list(runs.values()), names=list(runs), batch_invariant=invariant)
        for invariant in (True, False)
    }
    lines = [
        f"Model minilm-l6; the 16 deltas of `benchmarks/serve.py`; {len(texts)} requests; precision auto (bf16 on "
        f"CPUs with native bf16); {os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}.",
        "",
        "| model | calls | same probabilities to the last bit | same label | max probability difference |",
        "|---|---|---|---|---|",
    ]
    for invariant, model in models.items():
        for row in agreement(model, texts, names, options.rounds):
            lines.append(
                f"| {MODES[invariant]} | {row['regrouping']} | {row['bits']}/{len(texts)} | "
                f"{row['labels']}/{len(texts)} | {row['max_difference']:.2g} |"
            )
    with models[True].serving(), models[False].serving():
        rates = cost(models, texts, names, options.rounds)
    lines += [
        "",
        f"Cost, {options.rounds} alternating rounds, the mixed-batch state kept open:",
        "",
        "| workload | inputs/s, invariant (median) | not invariant (median) | ratio (median of rounds; lowest, highest) |",
        "|---|---|---|---|",
    ]
    for workload in ("one call, sorted by length", "calls of 64 in arrival order"):
        with_it, without = rates[f"{workload}|True"], rates[f"{workload}|False"]
        ratios = [a / b for a, b in zip(with_it, without, strict=True)]
        lines.append(
            f"| {workload} | {statistics.median(with_it):.1f} | {statistics.median(without):.1f} | "
            f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}, {max(ratios):.3f}) |"
        )
    lines += ["", f"Produced by `python benchmarks/batch_invariance.py {' '.join(sys.argv[1:])}`."]
    text = "\n".join(lines)
    print(text)
    if options.out:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
