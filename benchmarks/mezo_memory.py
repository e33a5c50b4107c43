"""Peak memory of MeZO against AdamW full fine-tuning (and against inference alone), each in its own process.

    python benchmarks/mezo_memory.py --model smollm2-135m --task rotten-tomatoes --batch-size 16 \\
        --max-length 128 --steps 5 --out docs/results/mezo-memory.md

Every setup gets the same model, the same training examples, batch size, max length and precision (fp32 by
default, so that no setup holds bf16 copies of frozen weights), and trains every parameter of the model:
    adamw      `--regime standard`: backward and AdamW (weights, gradients, two moments)
    mezo       `--regime mezo`: two forward passes per step, no backward, no optimizer state
    inference  forward passes alone on the same batches under no_grad: the floor MeZO aims at
Each runs in a fresh process. The peak is the process's resident-set high-water mark; it is reset after the
model is loaded (`/proc/self/clear_refs`, Linux) so that loading (which briefly holds a second copy of the
weights) does not hide the training peak; the peak over the whole process is reported too. On a GPU
(`--device cuda`) the figure is torch.cuda.max_memory_allocated after loading, reset the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SETUPS = ("adamw", "mezo", "inference")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak(device: str) -> bool:
    """Start the high-water mark again from now; False where it cannot be reset (then it includes loading)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_since_reset(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return _status_kib("VmHWM") * 1024


def _current(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated())
    return _status_kib("VmRSS") * 1024


def worker(args) -> dict:
    import torch

    from deltatune.batching import stratified_subset
    from deltatune.methods import build_method, prepare_model
    from deltatune.sources.data import load_task_data
    from deltatune.sources.models import load_model_for_task
    from deltatune.training import TrainConfig, Trainer, peak_memory_bytes, prepare_data

    torch.set_num_threads(args.threads)
    data = load_task_data(args.task)
    task = data.task
    train = data.split("train")
    train = train.subset(stratified_subset(train.labels, args.steps * args.batch_size, args.seed, task.is_regression))
    dev = data.split("dev").subset([0])  # training alone is measured: one dev example
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_for_task(args.model, task)
    method = build_method("full")
    prepare_model(model, method, tokenizer)
    regime = "mezo" if args.worker == "mezo" else "standard"
    config = TrainConfig(
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_steps=args.steps,
        max_length=args.max_length,
        eval_every=10**9,
        quiet=True,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        regime=regime,
    )
    prepared = prepare_data(model, tokenizer, task, train, dev, None, config)
    trainer = Trainer(model, method, task, prepared, config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    after_load = _current(args.device)
    reset = _reset_peak(args.device)
    if args.worker == "inference":
        model.eval()
        with torch.no_grad():
            for _ in range(args.steps):
                trainer._forward_backward(trainer._next_batch(), backward=False)
    else:
        for _ in range(args.steps):
            trainer._step()
    peak = _peak_since_reset(args.device)
    trainer.close()
    return {
        "setup": args.worker,
        "weights_bytes": weights,
        "after_load_bytes": after_load,
        "peak_bytes": peak,
        "peak_reset_after_load": reset,
        "process_peak_bytes": peak_memory_bytes(),
        "optimizer_state_tensors": sum(len(state) for state in trainer.optimizer.state.values()),
        "steps": args.steps,
        "padded_tokens": trainer.meters.padded_tokens or None,
        "precision": trainer.config.precision,
    }


def run_worker(args, setup: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        setup,
        "--model",
        args.model,
        "--task",
        args.task,
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--precision",
        args.precision,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--learning-rate",
        str(args.learning_rate),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{setup} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def format_table(results: list[dict], args, load: str) -> str:
    by_setup = {r["setup"]: r for r in results}
    gib = 2**30
    lines = [
        f"# MeZO's peak memory against AdamW full fine-tuning ({args.model}, {args.task})",
        "",
        f"`python benchmarks/mezo_memory.py --model {args.model} --task {args.task} --batch-size "
        f"{args.batch_size} --max-length {args.max_length} --steps {args.steps} --precision {args.precision} "
        f"--device {args.device} --threads {args.threads}`; each setup in its own process, every parameter "
        f"trained; machine load while it ran: `{load}` (memory figures are valid under load).",
        "",
        "| setup | peak after loading (GiB) | x AdamW | whole-process peak (GiB) | optimizer state tensors |",
        "|---|---|---|---|---|",
    ]
    adamw = by_setup["adamw"]["peak_bytes"]
    for setup in SETUPS:
        r = by_setup[setup]
        lines.append(
            f"| {setup} | {r['peak_bytes'] / gib:.2f} | {r['peak_bytes'] / adamw:.2f} | "
            f"{r['process_peak_bytes'] / gib:.2f} | {r['optimizer_state_tensors']} |"
        )
    mezo = by_setup["mezo"]["peak_bytes"]
    lines += [
        "",
        f"Weights alone: {by_setup['adamw']['weights_bytes'] / gib:.2f} GiB. AdamW / MeZO: "
        f"{adamw / mezo:.2f}x less memory for MeZO; MeZO / inference: "
        f"{mezo / by_setup['inference']['peak_bytes']:.2f}x.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="rotten-tomatoes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--worker", choices=SETUPS)
    parser.add_argument("--out", help="write the Markdown table here (and the raw figures beside it as .json)")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = []
    for setup in SETUPS:  # each result is printed as it comes, so a long run that is cut short keeps the rest
        results.append(run_worker(args, setup))
        print("RESULT " + json.dumps(results[-1]), flush=True)
    table = format_table(results, args, load)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"uptime": load, "results": results}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
