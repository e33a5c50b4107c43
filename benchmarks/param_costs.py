"""Trainable-parameter cost and delta size of every registered method, with its defaults, per model.

    python benchmarks/param_costs.py --models minilm-l6,smollm2-135m --out docs/results/param-costs.md

Counts are taken on the real models (a 1-output regression head, as for STS-B) by applying each method
and saving its delta to a temporary directory; nothing is trained.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def measure(model_name: str, method_name: str) -> dict:
    import torch

    from deltatune.delta import save_delta
    from deltatune.errors import DeltatuneError
    from deltatune.methods import build_method, prepare_model
    from deltatune.sources.models import load_model_for_task
    from deltatune.tasks import get_task

    torch.manual_seed(0)
    model, tokenizer = load_model_for_task(model_name, get_task("stsb"))
    total = sum(p.numel() for p in model.parameters())
    try:
        method = build_method(method_name)
        names = prepare_model(model, method, tokenizer)
    except DeltatuneError as error:
        return {"error": str(error).splitlines()[0]}
    trainable = sum(p.numel() for n, p in model.named_parameters() if n in names)
    with tempfile.TemporaryDirectory() as directory:
        delta_bytes = save_delta(Path(directory), model, method, {})
    return {"trainable": trainable, "total": total, "delta_bytes": delta_bytes}


def main() -> None:
    from deltatune.methods import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm-l6,smollm2-135m")
    parser.add_argument("--methods", default=",".join(REGISTRY))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    models = args.models.split(",")
    header = ["method"] + [f"{m}: trainable (%) / delta" for m in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in args.methods.split(","):
        cells = [f"`{method}`"]
        for model in models:
            r = measure(model, method)
            cells.append(
                f"n/a: {r['error']}"
                if "error" in r
                else f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.3f}%) / {r['delta_bytes'] / 1e6:.2f} MB"
            )
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + f"\n\nProduced by `python {' '.join(sys.argv)}`.\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
