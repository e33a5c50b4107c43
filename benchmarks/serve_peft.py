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
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import serve as bench  # noqa: E402  (benchmarks/serve.py, beside this file)


def main() -> None:
    import deltatune
    from deltatune.batching import encode, length_bucketed_batches
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
    loras = bench.mixed_loras(lora_runs, copies)
    peft, peft_names = bench.peft_model(args, lora_runs, copies)
    lora_names = bench.lora_requests(args, texts, peft_names)
    single = deltatune.load(runs[f"{bench.TASKS[0]}-lora"])
    encoded = encode(single.tokenizer, single.task, Split([(text,) for text in texts], [0] * len(texts)), 128)
    sorted_batches = length_bucketed_batches(encoded.lengths, args.batch_size, None)
    arriving = bench.arrival_batches(len(texts), args.batch_size)
    pad_token_id = single.tokenizer.pad_token_id or 0

    def run_deltatune(batches: list[list[int]] | None) -> None:
        if batches is None:
            loras.predict(texts, task=lora_names, batch_size=args.batch_size, precision="fp32")
            return
        for batch in batches:
            rows = [texts[i] for i in batch]
            loras.predict(rows, task=[lora_names[i] for i in batch], batch_size=args.batch_size, precision="fp32")

    sides = {
        "deltatune, sorted": lambda: run_deltatune(None),
        "PEFT, sorted": lambda: bench.run_peft(peft, encoded, pad_token_id, lora_names, sorted_batches),
        "deltatune, arrival order": lambda: run_deltatune(arriving),
        "PEFT, arrival order": lambda: bench.run_peft(peft, encoded, pad_token_id, lora_names, arriving),
    }
    with loras.serving():
        rates = bench.alternate_rounds(sides, options.rounds, len(texts))
    for name, values in rates.items():
        print(f"{name}: {statistics.median(values):.1f} inputs/s (median of {options.rounds} rounds)")
    for ours, theirs in (("deltatune, sorted", "PEFT, sorted"), ("deltatune, arrival order", "PEFT, arrival order")):
        ratios = [a / b for a, b in zip(rates[ours], rates[theirs], strict=True)]
        shown = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"{ours} / {theirs}: {statistics.median(ratios):.2f}x (rounds: {shown})")


if __name__ == "__main__":
    main()
