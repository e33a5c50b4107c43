"""Training throughput, memory and quality: deltatune's loop against Hugging Face Trainer (+ PEFT).

    python benchmarks/train_throughput.py --model minilm-l6 --task rotten-tomatoes \\
        --methods full,bitfit,lora --steps 60 --rounds 2 --out docs/results/train-throughput.md

Both sides get the same model (same head initialisation), the same training examples (a stratified
subset fixed by the seed), batch size, max length, AdamW settings, warm-up + linear schedule,
gradient clipping, dropout and thread count. Each measurement runs in its own process (peak memory is
that process's peak RSS), alternating deltatune and HF (A B A B ...) so that machine drift hits both.
Step times are medians over the steps after `--warmup-steps`; throughput is real (non-pad) tokens and
examples per second of those steps. After training, both models are scored with the same evaluation
code on the same dev examples, so speed can be checked not to cost quality.

HF's side: `Trainer` with `DataCollatorWithPadding` (dynamic padding) and its default fused AdamW;
LoRA, (IA)3 and LayerNorm tuning through PEFT; BitFit by hand (biases + head trainable). Variants of
deltatune's loop (bf16 autocast, no length bucketing) show what each lever is worth.

On a GPU (`--device cuda`) both sides train in mixed precision (deltatune's precision auto: bf16 where
the GPU supports it, else fp16 with loss scaling; HF's `bf16=True` / `fp16=True` likewise), peak memory
is torch.cuda.max_memory_allocated, and MFU is also given against the GPU's dense bf16 peak from its
data sheet (`GPU_BF16_PEAKS`, matched on the name torch reports), beside the peak of a large bf16 matmul
measured in the same process.

Model-FLOPs utilisation: achieved FLOP/s on real tokens over the matmul peak measured in the same
process: 6 x (trainable weights) + 4 x (frozen weights above the lowest trainable layer) FLOPs per
token, counting only matrix-multiply weights (embedding lookups are not matmuls), plus attention.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HF_PEFT = {"lora", "ia3", "layernorm"}
VARIANTS = {
    "deltatune": {},
    "deltatune-fp32": {"precision": "fp32"},
    "deltatune-bf16": {"precision": "bf16"},
    "deltatune-no-bucketing": {"bucket_by_length": False},
    "deltatune-torch-dropout": {"fast_dropout": False},
    "deltatune-fp32-torch-dropout": {"precision": "fp32", "fast_dropout": False},
}


# ----------------------------------------------------------------------------- shared set-up


def load_setup(args):
    """Model (seeded head), tokenizer, task, the training subset and the dev examples both sides use."""
    import torch

    from deltatune.batching import stratified_subset
    from deltatune.sources.data import load_task_data
    from deltatune.sources.models import load_model_for_task

    data = load_task_data(args.task)
    task = data.task
    train = data.split("train")
    subset = stratified_subset(train.labels, args.steps * args.batch_size, args.seed, task.is_regression)
    train = train.subset(subset)
    dev = data.split("dev")
    dev = dev.subset(range(min(len(dev), args.dev_examples)))
    torch.manual_seed(args.seed)
    # transformers' own sequence-classification model, as the HF side trains: the same computation on both
    # sides (deltatune's default for a sentence-pair task on a sentence-embedding model is a bi-encoder)
    model, tokenizer = load_model_for_task(args.model, task, head="cross-encoder", pooling="native")
    return model, tokenizer, task, train, dev


GPU_BF16_PEAKS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 0.0,
    "T4": 0.0,
}
"""Dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's data sheets, by a substring of the name torch
reports (first match wins, so the more specific names come first); 0 where the GPU has no bf16 tensor cores."""


def gpu_bf16_peak(name: str) -> float | None:
    for key, peak in GPU_BF16_PEAKS.items():
        if key in name:
            return peak or None
    return None


def matmul_peak(
    dtype_name: str, rows: int = 1024, inner: int = 384, columns: int = 1536, seconds: float = 1.5, device: str = "cpu"
) -> float:
    """FLOP/s of a matmul at the model's shapes (tokens x hidden @ hidden x intermediate) on `device`."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(rows, inner, dtype=dtype, device=device)
    b = torch.randn(inner, columns, dtype=dtype, device=device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(5):
        a @ b
    synchronize()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    synchronize()
    return 2 * rows * inner * columns * count / (time.perf_counter() - started)


def peak_memory(device: str) -> int:
    """Peak GPU memory allocated by torch on a GPU; the process's peak RSS on the CPU."""
    import torch

    from deltatune.training import peak_memory_bytes

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else peak_memory_bytes()


def flops_per_token(model, mean_length: float) -> float:
    """Training FLOPs per real token: 6 per trainable matmul weight, 4 per frozen one that backward
    passes through (input gradients only), 2 per frozen one below the lowest trainable layer (forward
    only), plus attention scores and mixing (4 x length x hidden per layer forward, x3 with backward)."""
    from torch import nn

    from deltatune.methods.layers import layer_layout

    layout = layer_layout(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    lowest = min((layout.position[n] for n, p in model.named_parameters() if p.requires_grad), default=layout.top)
    total = 0.0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None:
            continue
        position = layout.position.get(name_of.get(id(weight), ""), layout.top)
        if weight.requires_grad:
            total += 6 * weight.numel()
        elif position >= lowest:
            total += 4 * weight.numel()
        else:
            total += 2 * weight.numel()
    hidden = model.config.hidden_size
    total += layout.num_layers * 4 * mean_length * hidden * 3
    return total


def evaluate_model(model, tokenizer, task, dev, max_length: int) -> dict:
    from deltatune.batching import encode, evaluate
    from deltatune.heads import encodes_texts_separately

    encoded = encode(tokenizer, task, dev, max_length, encodes_texts_separately(model))
    return evaluate(model, encoded, task, tokenizer.pad_token_id or 0)


def summarize_steps(step_seconds, step_tokens, step_examples, warmup: int) -> dict:
    seconds, tokens, examples = step_seconds[warmup:], step_tokens[warmup:], step_examples[warmup:]
    median = statistics.median(seconds)
    return {
        "median_step_s": median,
        "steps_timed": len(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "examples_per_s": sum(examples) / sum(seconds),
        "mean_real_tokens_per_step": sum(tokens) / len(tokens),
    }


# ----------------------------------------------------------------------------- workers


def worker_deltatune(args, variant: dict) -> dict:
    from deltatune.methods import build_method, prepare_model
    from deltatune.training import TrainConfig, train

    model, tokenizer, task, train_split, dev = load_setup(args)
    method = build_method(args.method, {})
    prepare_model(model, method, tokenizer)
    config = TrainConfig(
        learning_rate=args.learning_rate or getattr(method, "default_learning_rate", 5e-5),
        batch_size=args.batch_size,
        max_steps=args.steps,
        max_length=args.max_length,
        eval_every=10**9,
        quiet=True,
        seed=args.seed,
        warmup_ratio=0.06,
        device=args.device,
        **variant,
    )
    # a throwaway dev split of one example: the benchmark scores both sides itself, afterwards
    result = train(model, tokenizer, task, train_split, dev.subset([0]), method, config)
    out = summarize_steps(
        result.step_seconds, result.step_real_tokens, [args.batch_size] * len(result.step_seconds), args.warmup_steps
    )
    out["padding_efficiency"] = result.padding_efficiency
    out["flops_per_token"] = flops_per_token(model, out["mean_real_tokens_per_step"] / args.batch_size)
    out["dev"] = evaluate_model(model, tokenizer, task, dev, args.max_length)
    out["peak_memory_bytes"] = peak_memory(args.device)
    out["precision"] = result.precision
    return out


def worker_hf(args, variant: dict) -> dict:
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from deltatune.batching import encode
    from deltatune.methods.common import head_names

    model, tokenizer, task, train_split, dev = load_setup(args)
    if args.method in HF_PEFT:
        import peft

        configs = {
            "lora": lambda: peft.LoraConfig(
                task_type="SEQ_CLS",
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=["query", "value", "q_proj", "v_proj"],
            ),
            "ia3": lambda: peft.IA3Config(
                task_type="SEQ_CLS",
                target_modules=["key", "value", "output.dense"],
                feedforward_modules=["output.dense"],
            ),
            "layernorm": lambda: peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]),
        }
        model = peft.get_peft_model(model, configs[args.method]())
    elif args.method == "bitfit":
        head = head_names(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith(".bias") or name in head)
    elif args.method != "full":
        raise SystemExit(f"HF side has no setup for {args.method}")
    from deltatune.methods import get_method_entry

    learning_rate = args.learning_rate or getattr(
        get_method_entry(args.method).method_class, "default_learning_rate", 5e-5
    )
    encoded = encode(tokenizer, task, train_split, args.max_length)
    rows = []
    for i in range(len(encoded)):
        row = {key: encoded.features[key][i] for key in encoded.features}
        row["labels"] = encoded.labels[i]
        rows.append(row)
    real_tokens: list[int] = []
    padded_tokens: list[int] = []
    padding = DataCollatorWithPadding(tokenizer)

    def collate(features):
        batch = padding(features)
        real_tokens.append(int(batch["attention_mask"].sum()))
        padded_tokens.append(batch["attention_mask"].numel())
        if task.is_regression:
            batch["labels"] = batch["labels"].float()
        return batch

    step_seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_seconds.append(time.perf_counter() - self.started)

    training_args = TrainingArguments(
        output_dir=str(Path(args.scratch) / "hf"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=learning_rate,
        warmup_steps=0.06,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        remove_unused_columns=False,
        **{**gpu_mixed_precision(args.device), **variant},
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=rows, data_collator=collate, callbacks=[StepTimer()]
    )
    trainer.train()
    # the collator ran once per step, just before it (no workers, no prefetch)
    out = summarize_steps(
        step_seconds, real_tokens[: len(step_seconds)], [args.batch_size] * len(step_seconds), args.warmup_steps
    )
    out["padding_efficiency"] = sum(real_tokens) / sum(padded_tokens)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out["flops_per_token"] = flops_per_token(base, out["mean_real_tokens_per_step"] / args.batch_size)
    model.eval()
    with torch.no_grad():
        out["dev"] = evaluate_model(model, tokenizer, task, dev, args.max_length)
    out["peak_memory_bytes"] = peak_memory(args.device)
    out["precision"] = next((name for name in ("bf16", "fp16") if getattr(training_args, name)), "fp32")
    return out


def gpu_mixed_precision(device: str) -> dict:
    """HF's mixed precision matching deltatune's precision auto on a GPU (none on the CPU)."""
    import torch

    if not device.startswith("cuda"):
        return {}
    return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    side, _, variant_name = args.worker.partition(":")
    if side == "hf":
        variant = {"group_by_length": {"train_sampling_strategy": "group_by_length"}, "bf16": {"bf16": True}, "": {}}[
            variant_name
        ]
        result = worker_hf(args, variant)
    else:
        result = worker_deltatune(args, VARIANTS[args.worker])
    on_gpu = args.device.startswith("cuda")
    # a GPU's peak shows only at large shapes: measure it there, beside the data-sheet figure
    shape = {"rows": 8192, "inner": 8192, "columns": 8192} if on_gpu else {}
    result["matmul_peak_fp32"] = matmul_peak("fp32", device=args.device, **shape)
    result["matmul_peak_bf16"] = matmul_peak("bf16", device=args.device, **shape)
    if on_gpu:
        result["device_name"] = torch.cuda.get_device_name()
        result["datasheet_peak_bf16"] = gpu_bf16_peak(result["device_name"])
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- orchestration


def run_worker(args, side: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--method",
        args.method_now,
        "--model",
        args.model,
        "--task",
        args.task,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--warmup-steps",
        str(args.warmup_steps),
        "--seed",
        str(args.seed),
        "--dev-examples",
        str(args.dev_examples),
        "--scratch",
        args.scratch,
        "--device",
        args.device,
    ]
    if args.learning_rate:
        command += ["--learning-rate", str(args.learning_rate)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{side} / {args.method_now} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="rotten-tomatoes")
    parser.add_argument("--methods", default="full,bitfit,lora")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument(
        "--variants",
        default="deltatune,hf,deltatune-fp32,deltatune-torch-dropout",
        help="sides to run each round: hf, hf:group_by_length, hf:bf16, or deltatune with its "
        "defaults (precision auto) or a lever changed: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="A B A B repetitions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--dev-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both sides train")
    parser.add_argument("--scratch", default="/tmp/deltatune-bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="write the Markdown tables here")
    parser.add_argument("--json", type=Path, help="write every raw measurement here")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    sides = args.variants.split(",")
    raw: dict = {}
    for method in args.methods.split(","):
        args.method_now = method
        for round_index in range(args.rounds):
            for side in sides:
                print(f"[{method}] round {round_index + 1}: {side} ...", flush=True, file=sys.stderr)
                raw.setdefault(method, {}).setdefault(side, []).append(run_worker(args, side))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    text = format_tables(raw, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


def format_tables(raw: dict, args) -> str:
    def median_of(runs, key):
        return statistics.median(r[key] for r in runs)

    primary = next(iter(next(iter(next(iter(raw.values())).values()))[0]["dev"]))
    lines = [
        f"MiniLM-style setting: model {args.model}, task {args.task}, batch {args.batch_size}, max length "
        f"{args.max_length}, {args.steps} steps ({args.warmup_steps} untimed), {args.rounds} alternating "
        f"rounds; medians over rounds. Ratios are deltatune / HF from the same rounds.",
        "",
        "| method | side | real tokens/s | examples/s | token ratio | examples ratio | peak memory GiB | "
        f"memory ratio | dev {primary} | padding eff. | MFU fp32 | MFU bf16 peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, sides in raw.items():
        reference = sides.get("hf")
        for side, runs in sides.items():
            tokens = median_of(runs, "tokens_per_s")
            examples = median_of(runs, "examples_per_s")
            memory = median_of(runs, "peak_memory_bytes")
            achieved = tokens * median_of(runs, "flops_per_token")
            ratio = (
                (lambda key, value, reference=reference: f"{value / median_of(reference, key):.2f}x")
                if reference
                else (lambda *_: "")
            )
            dev = statistics.median(r["dev"][primary] for r in runs)
            padding = f"{median_of(runs, 'padding_efficiency'):.2f}"
            lines.append(
                f"| {method} | {side} | {tokens:,.0f} | {examples:.1f} | {ratio('tokens_per_s', tokens)} | "
                f"{ratio('examples_per_s', examples)} | {memory / 2**30:.2f} | {ratio('peak_memory_bytes', memory)} | "
                f"{dev:.4f} | {padding} | {achieved / median_of(runs, 'matmul_peak_fp32'):.0%} | "
                f"{achieved / median_of(runs, 'matmul_peak_bf16'):.0%} |"
            )
    peaks = [r for sides in raw.values() for runs in sides.values() for r in runs]
    lines += gpu_lines(raw, peaks, median_of)
    lines += [
        "",
        f"Matmul peak measured in the same processes: fp32 "
        f"{statistics.median(r['matmul_peak_fp32'] for r in peaks) / 1e9:.0f} GFLOP/s, bf16 "
        f"{statistics.median(r['matmul_peak_bf16'] for r in peaks) / 1e9:.0f} GFLOP/s.",
        "",
        f"Produced by `python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`.",
    ]
    return "\n".join(lines)


def gpu_lines(raw: dict, peaks: list, median_of) -> list[str]:
    """On a GPU: the GPU's name, and each side's MFU against its data-sheet bf16 peak and its precision."""
    if not any("device_name" in r for r in peaks):
        return []
    name, sheet = peaks[0]["device_name"], peaks[0].get("datasheet_peak_bf16")
    lines = [
        "",
        f"GPU: {name}; data-sheet dense bf16 peak "
        + (f"{sheet / 1e12:.0f} TFLOP/s." if sheet else "unknown (not in GPU_BF16_PEAKS)."),
        "",
        "| method | side | precision | MFU vs data-sheet bf16 peak |",
        "|---|---|---|---|",
    ]
    for method, sides in raw.items():
        for side, runs in sides.items():
            achieved = median_of(runs, "tokens_per_s") * median_of(runs, "flops_per_token")
            lines.append(
                f"| {method} | {side} | {runs[0].get('precision', '?')} | "
                + (f"{achieved / sheet:.1%} |" if sheet else "- |")
            )
    return lines


if __name__ == "__main__":
    main()
