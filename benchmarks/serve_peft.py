"""16 LoRAs mixed, deltatune against PEFT's `adapter_names` batches, on length-sorted and on arrival-order batches.

    python benchmarks/serve_peft.py --rounds 5

The fp32 comparison of `benchmarks/serve.py` alone (the same deltas, requests and PEFT model, built by its
functions), in alternating rounds, each round's ratio printed: deltatune kept open (`serving()`, as the
server runs it) against PEFT (a) on the whole request set (deltatune's padding-aware batches, PEFT's
length-sorted ones) and (b) on the same consecutive slices of 64 requests in arrival order on both sides,
what a server sees. A quick repeat of those rows without the memory and live-server parts.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import serve as bench  # noqa: E402  (benchmarks/serve.py, beside this file)


def main() -> None:
    import torch

    import deltatune
    from deltatune.batching import collate, encode, length_bucketed_batches
    from deltatune.tasks.spec import Split

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/serve-bench"), help="where the 16 deltas are kept")
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    args = argparse.Namespace(
        runs=options.runs, model="minilm-l6", train_steps=60, requests=2048, batch_size=64, seed=0, texts_per_task=400
    )
    runs = bench.prepare_runs(args)
    texts, _ = bench.request_pool(args, runs)
    lora_runs = [runs[f"{task}-lora"] for task in bench.TASKS]
    copies = 4
    loras = deltatune.load_many(
        [run for _ in range(copies) for run in lora_runs],
        names=[f"{run.name}-{copy}" for copy in range(copies) for run in lora_runs],
    )
    peft, peft_names = bench.peft_model(args, lora_runs, copies)
    rng = random.Random(args.seed + 1)  # the delta of each request, drawn as benchmarks/serve.py draws them
    lora_names = [rng.choice(peft_names) for _ in texts]
    single = deltatune.load(runs[f"{bench.TASKS[0]}-lora"])
    encoded = encode(single.tokenizer, single.task, Split([(text,) for text in texts], [0] * len(texts)), 128)
    sorted_batches = length_bucketed_batches(encoded.lengths, args.batch_size, None)
    arriving = [
        list(range(start, min(start + args.batch_size, len(texts)))) for start in range(0, len(texts), args.batch_size)
    ]

    def run_peft(batches: list[list[int]]) -> None:
        with torch.no_grad():
            for batch in batches:
                features = collate(encoded, batch, single.tokenizer.pad_token_id or 0, False)
                features.pop("labels")
                peft(**features, adapter_names=[lora_names[i] for i in batch])

    def run_deltatune(batches: list[list[int]] | None) -> None:
        if batches is None:
            loras.predict(texts, task=lora_names, batch_size=args.batch_size, precision="fp32")
            return
        for batch in batches:
            rows = [texts[i] for i in batch]
            loras.predict(rows, task=[lora_names[i] for i in batch], batch_size=args.batch_size, precision="fp32")

    sides = {
        "deltatune, sorted": lambda: run_deltatune(None),
        "PEFT, sorted": lambda: run_peft(sorted_batches),
        "deltatune, arrival order": lambda: run_deltatune(arriving),
        "PEFT, arrival order": lambda: run_peft(arriving),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    with loras.serving():
        for run in sides.values():  # warm-up
            run()
        for _ in range(options.rounds):
            for name, run in sides.items():
                gc.collect()
                started = time.perf_counter()
                run()
                rates[name].append(len(texts) / (time.perf_counter() - started))
    for name, values in rates.items():
        print(f"{name}: {statistics.median(values):.1f} inputs/s (median of {options.rounds} rounds)")
    for ours, theirs in (("deltatune, sorted", "PEFT, sorted"), ("deltatune, arrival order", "PEFT, arrival order")):
        ratios = [a / b for a, b in zip(rates[ours], rates[theirs], strict=True)]
        shown = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"{ours} / {theirs}: {statistics.median(ratios):.2f}x (rounds: {shown})")


if __name__ == "__main__":
    main()
