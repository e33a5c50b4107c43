"""The one training loop.

It reads top to bottom: tokenise once, pick the training subset the data budget allows, build
length-bucketed batches, step AdamW with warm-up and linear decay, evaluate on dev every so often,
keep the best dev state, stop on whichever budget (steps, epochs, seconds) runs out first or when
dev stops improving. It never asks which method it is training: methods change its behaviour
only through the hooks of `deltatune.methods.base.Method`, which it calls directly.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch import nn

from deltatune.batching import (
    autocast_for,
    collate,
    encode,
    length_bucketed_batches,
    outputs_to_predictions,
    predict_encoded,
    regression_scale,
    shuffled_batches,
    stratified_subset,
    to_task_units,
)
from deltatune.errors import DeltatuneError
from deltatune.fast_dropout import fast_dropout
from deltatune.methods.base import Method, OptimizerSettings
from deltatune.metrics import compute_metrics
from deltatune.precision import PRECISIONS, frozen_linear_weights_in_bf16, resolve_precision
from deltatune.tasks.spec import Split, TaskSpec


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float | None = None
    """Peak learning rate. Default: the method's own (`default_learning_rate`)."""
    batch_size: int = 32
    """Examples per optimizer step (divided over gradient_accumulation micro-batches)."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step; the micro-batch is batch_size / gradient_accumulation."""
    epochs: float = 3.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = None
    """Train for exactly this many optimizer steps, ignoring epochs."""
    time_budget_s: float | None = None
    """Wall-clock seconds of training; when spent, training stops cleanly and still evaluates."""
    data_fraction: float = 1.0
    """Train on this fraction of the training split (stratified, fixed by the seed)."""
    num_examples: int | None = None
    """Train on this many training examples (stratified); overrides data_fraction."""
    warmup_ratio: float = 0.06
    """Fraction of the planned steps spent warming the learning rate up from 0."""
    schedule: Literal["linear", "constant", "slanted_triangular"] = "linear"
    """Learning-rate shape: warm-up then linear decay to 0, warm-up then constant, or ULMFiT's slanted
    triangular (a short linear rise over warmup_ratio of the steps to the peak, then a long linear fall to
    peak/32; Howard & Ruder 2018)."""
    layer_lr_decay: float | None = None
    """ULMFiT's discriminative fine-tuning: each transformer layer's learning rate is this factor times
    the one above it (the paper's 1/2.6 is 0.385); the head and top keep the peak rate."""
    gradual_unfreezing: bool = False
    """ULMFiT's gradual unfreezing: start with only the top layer group trainable and unfreeze one more
    layer downward every unfreeze_every steps (only among the parameters the method trains)."""
    unfreeze_every: int | None = None
    """Steps between unfreezing the next layer down with gradual_unfreezing. Default: one epoch."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to weight matrices only (not biases or norms)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; none to disable."""
    eval_every: int | None = None
    """Evaluate on dev every this many steps. Default: once per epoch (and always at the end)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a dev improvement; none to disable."""
    max_length: int = 128
    """Truncate inputs to this many tokens (the number truncated is reported)."""
    eval_batch_size: int = 64
    """Batch size for evaluation and prediction."""
    bucket_by_length: bool = True
    """Group examples of similar length into batches so little compute goes to padding."""
    fast_dropout: bool = True
    """Dropout masks from four 16-bit lanes per random draw (a third of torch's CPU dropout cost)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 runs matmuls under CPU autocast with fp32 master weights (frozen linear weights are cast
    once); fp32 is exact; auto takes bf16 on CPUs with native bf16 (AMX, AVX512-BF16), else fp32."""
    seed: int = 42
    """Seeds the data subset, the batch order, dropout and the head's initialisation."""
    threads: int | None = None
    """torch intra-op threads; default: torch's choice (all cores)."""
    quiet: bool = False
    """No progress bar."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("batch_size", "gradient_accumulation", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.batch_size % self.gradient_accumulation:
            problems.append(f"batch_size={self.batch_size} must be a multiple of "
                            f"gradient_accumulation={self.gradient_accumulation}")
        if not 0 < self.data_fraction <= 1:
            problems.append(f"data_fraction={self.data_fraction} must be in (0, 1]")
        if self.epochs <= 0:
            problems.append(f"epochs={self.epochs} must be positive")
        for name in ("max_steps", "num_examples", "eval_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name}={value} must be at least 1 (or left unset)")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            problems.append(f"time_budget_s={self.time_budget_s} must be positive")
        if self.learning_rate is not None and self.learning_rate <= 0:
            problems.append(f"learning_rate={self.learning_rate} must be positive")
        if self.layer_lr_decay is not None and not 0 < self.layer_lr_decay <= 1:
            problems.append(f"layer_lr_decay={self.layer_lr_decay} must be in (0, 1] (ULMFiT uses 0.385)")
        if self.unfreeze_every is not None and self.unfreeze_every < 1:
            problems.append(f"unfreeze_every={self.unfreeze_every} must be at least 1")
        if self.schedule == "slanted_triangular" and not self.warmup_ratio:
            problems.append("schedule=slanted_triangular needs warmup_ratio > 0 (its rising fraction, ULMFiT: 0.1)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        problems += _range_problems(self)
        if problems:
            raise DeltatuneError("; ".join(problems))


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    logits = logits.float()
    if regression:
        return nn.functional.mse_loss(logits.squeeze(-1), labels)
    return nn.functional.cross_entropy(logits, labels)


def peak_memory_bytes() -> int:
    """The process's peak resident set size (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _range_problems(config: TrainConfig) -> list[str]:
    """Values that would pass the checks above yet fail deep inside training or silently mis-train."""
    problems = [f"{name}={getattr(config, name)} must be a finite number"
                for name in ("learning_rate", "epochs", "time_budget_s", "weight_decay", "max_grad_norm",
                             "warmup_ratio", "data_fraction", "layer_lr_decay")
                if isinstance(getattr(config, name), float) and not math.isfinite(getattr(config, name))]
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        problems.append(f"max_grad_norm={config.max_grad_norm} must be positive (or none to disable clipping); "
                        "a negative one would reverse every gradient")
    if not config.weight_decay >= 0:
        problems.append(f"weight_decay={config.weight_decay} must be zero or positive")
    if config.threads is not None and config.threads < 1:
        problems.append(f"threads={config.threads} must be at least 1 (or left unset for torch's choice)")
    if not 0 <= config.seed < 2**63:
        problems.append(f"seed={config.seed} must be between 0 and 2**63 - 1")
    return problems


@dataclass
class TrainResult:
    best_metrics: dict[str, float]
    best_step: int
    steps: int
    examples_seen: int
    real_tokens_seen: int
    padded_tokens_seen: int
    train_time_s: float
    eval_time_s: float
    stopped_by: str
    """What ended training: 'epochs', 'max_steps', 'time_budget', 'early_stopping' or 'diverged'."""
    num_train_examples: int
    num_truncated: dict[str, int]
    learning_curve: list[dict] = field(default_factory=list)
    """One entry per evaluation: step, examples seen, training seconds so far, dev metrics."""
    best_dev_outputs: np.ndarray | None = None
    """The model's raw dev outputs (logits or scores) at the best evaluation, in dev order: what paired
    statistics between methods need."""
    dev_labels: list | None = None
    target_scale: tuple[float, float] | None = None
    """Regression only: (mean, std) that map the model's raw output to task units."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall seconds of each optimizer step (benchmarks take medians over these)."""
    step_real_tokens: list[int] = field(default_factory=list)
    precision: str = "fp32"
    """The precision training ran at ("auto" resolved)."""
    diverged: str | None = None
    """Why training stopped on a non-finite loss or gradient (a sentence with the fix); None if it did not."""

    @property
    def examples_per_s(self) -> float:
        return self.examples_seen / self.train_time_s if self.train_time_s else 0.0

    @property
    def real_tokens_per_s(self) -> float:
        return self.real_tokens_seen / self.train_time_s if self.train_time_s else 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens_seen / self.padded_tokens_seen if self.padded_tokens_seen else 0.0


SLANTED_TRIANGULAR_RATIO = 32
"""ULMFiT: how much smaller the lowest learning rate is than the peak."""


def _lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    if schedule == "slanted_triangular":
        cut = max(1, warmup_steps)
        rise = step / cut if step < cut else 1 - (step - cut) / max(1, total_steps - cut)
        return (1 + rise * (SLANTED_TRIANGULAR_RATIO - 1)) / SLANTED_TRIANGULAR_RATIO
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def divergence(step: int, loss: float, gradient_norm: torch.Tensor | None, learning_rate: float) -> str | None:
    """Why optimizer step `step` must not be taken (a non-finite loss or gradient norm), or None.

    One NaN step turns every weight into NaN, and training would go on saving and reporting them.
    """
    if math.isfinite(loss):
        if gradient_norm is None or bool(torch.isfinite(gradient_norm)):
            return None
        what = f"the gradient norm became {float(gradient_norm)}"
    else:
        what = f"the training loss became {loss}"
    return (f"Training diverged at step {step}: {what} (peak learning rate {learning_rate:g}). Lower the "
            f"learning rate, e.g. --learning-rate {learning_rate / 10:g}")


def _optimizer_groups(model: nn.Module, method: Method, learning_rate: float, config: TrainConfig) -> list[dict]:
    """AdamW groups from the method, honouring weight decay and layer-wise learning-rate decay."""
    return method.param_groups(model, learning_rate, OptimizerSettings(config.weight_decay, config.layer_lr_decay))


class GradualUnfreezing:
    """ULMFiT's gradual unfreezing over whatever the method trains: the top group first, then one more
    layer downward every `every` steps. Frozen-for-now parameters keep requires_grad False, so autograd
    does not even compute their gradients (and the backward stops above them)."""

    def __init__(self, model: nn.Module, every: int) -> None:
        from deltatune.methods.layers import layer_layout

        layout = layer_layout(model)
        self.every, self.top = every, layout.top
        self.by_position: dict[int, list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                self.by_position.setdefault(layout.position[name], []).append(parameter)
        self.update(0)

    def update(self, step: int) -> None:
        lowest_unfrozen = self.top - step // self.every
        for position, parameters in self.by_position.items():
            for parameter in parameters:
                parameter.requires_grad_(position >= lowest_unfrozen)

    def finish(self) -> None:
        for parameters in self.by_position.values():
            for parameter in parameters:
                parameter.requires_grad_(True)


def train(model: nn.Module, tokenizer, task: TaskSpec, train_split: Split, dev_split: Split,
          method: Method, config: TrainConfig) -> TrainResult:
    """Train `model` (already prepared by the method) and leave it holding its best dev state."""
    config = replace(config, precision=resolve_precision(config.precision))
    # weights frozen throughout can be held in bf16; gradual unfreezing thaws them, so it keeps fp32
    cast_frozen = config.precision == "bf16" and not config.gradual_unfreezing
    with ExitStack() as stack:
        if config.fast_dropout:
            stack.enter_context(fast_dropout(model))
        if cast_frozen:
            stack.enter_context(frozen_linear_weights_in_bf16(model))
        return _train(model, tokenizer, task, train_split, dev_split, method, config)


def _train(model: nn.Module, tokenizer, task: TaskSpec, train_split: Split, dev_split: Split,
           method: Method, config: TrainConfig) -> TrainResult:
    if config.threads:
        torch.set_num_threads(config.threads)
    if not len(train_split):
        raise DeltatuneError(f"Task {task.name!r} has no training examples.")
    if not len(dev_split):
        raise DeltatuneError(f"Task {task.name!r} has no dev examples to select checkpoints on.")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model_max = getattr(model.config, "max_position_embeddings", None) or config.max_length
    max_length = min(config.max_length, model_max)

    # the data budget: a stratified subset fixed by the seed, so every method sees the same one
    wanted = config.num_examples or max(1, round(config.data_fraction * len(train_split)))
    subset = stratified_subset(train_split.labels, wanted, config.seed, task.is_regression)
    train_data = encode(tokenizer, task, train_split.subset(subset), max_length)
    dev_data = encode(tokenizer, task, dev_split, max_length)
    # Regression heads learn standardised targets: a fresh head outputs about 0, and with a small learning
    # rate (LoRA, adapters) it would spend the whole budget walking its bias to a mean like STS-B's 2.7.
    # The model's raw output is in standard units; `target_scale` maps it back (saved with the delta).
    target_scale = regression_scale(train_data.labels) if task.is_regression else None
    if target_scale is not None:
        mean, std = target_scale
        train_data.labels = [(y - mean) / std for y in train_data.labels]

    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    planned_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    warmup_steps = max(1, round(config.warmup_ratio * planned_steps)) if config.warmup_ratio else 0
    eval_every = config.eval_every or steps_per_epoch

    learning_rate = config.learning_rate or method.default_learning_rate
    groups = _optimizer_groups(model, method, learning_rate, config)
    trainable = [p for group in groups for p in group["params"]]
    if not trainable:
        raise DeltatuneError(f"Method {method.name!r} left nothing to train on this model.")
    for group in groups:
        group.setdefault("lr", learning_rate)
        group["initial_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, foreach=True)
    unfreezing = GradualUnfreezing(model, config.unfreeze_every or steps_per_epoch) \
        if config.gradual_unfreezing else None

    micro_batch = config.batch_size // config.gradient_accumulation
    rng = random.Random(config.seed)
    trainable_ids = {id(p) for p in trainable}
    trainable_named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable_ids]
    best_state: dict[str, torch.Tensor] = {}  # filled at the first evaluation, then overwritten in place
    best_metrics: dict[str, float] = {}
    best_outputs = np.zeros((0, task.num_labels), dtype=np.float32)
    best_value, best_step, evals_since_best = -math.inf, 0, 0
    curve: list[dict] = []
    step = examples_seen = real_tokens = padded_tokens = 0
    step_seconds: list[float] = []
    step_real_tokens: list[int] = []
    train_time = eval_time = 0.0
    stopped_by = "max_steps" if config.max_steps else "epochs"
    diverged = None

    def run_evaluation() -> bool:
        """Evaluate on dev, keep the best state; True when early stopping says stop."""
        nonlocal best_value, best_step, best_metrics, evals_since_best, eval_time, best_outputs
        started = time.perf_counter()
        outputs = to_task_units(predict_encoded(model, dev_data, task, pad_token_id, config.eval_batch_size,
                                                config.precision), target_scale)
        metrics = compute_metrics(task.metrics, outputs_to_predictions(outputs, task), dev_data.labels)
        eval_time += time.perf_counter() - started
        curve.append({"step": step, "examples_seen": examples_seen, "train_time_s": round(train_time, 3),
                      "metrics": metrics})
        value = metrics[task.metric]
        if not math.isnan(value) and value > best_value and np.isfinite(outputs).all():
            best_value, best_step, best_metrics, evals_since_best = value, step, metrics, 0
            best_outputs = outputs
            with torch.no_grad():
                for n, p in trainable_named:
                    if n in best_state:
                        best_state[n].copy_(p)
                    else:
                        best_state[n] = p.detach().clone()
        else:
            evals_since_best += 1
        return config.early_stopping_patience is not None and evals_since_best >= config.early_stopping_patience

    progress = None
    if not config.quiet:
        from tqdm.auto import tqdm

        progress = tqdm(total=planned_steps, desc=f"{method.name} on {task.name}", unit="step",
                        dynamic_ncols=True, file=sys.stderr)
    model.train()
    torch.manual_seed(config.seed)
    stop = False
    while not stop and step < planned_steps:
        if config.bucket_by_length:
            batches = length_bucketed_batches(train_data.lengths, config.batch_size, rng)
        else:
            batches = shuffled_batches(len(train_data), config.batch_size, rng)
        for indices in batches:
            started = time.perf_counter()
            lr_factor = _lr_factor(step, warmup_steps, planned_steps, config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor
            loss_total = 0.0
            tokens_before = real_tokens
            for start in range(0, len(indices), micro_batch):
                part = indices[start:start + micro_batch]
                batch = collate(train_data, part, pad_token_id, task.is_regression)
                labels = batch.pop("labels")
                with autocast_for(config.precision):
                    logits = model(**batch).logits
                loss = (task_loss(logits, labels, task.is_regression) + method.extra_loss(model)) * (len(part) / len(indices))
                loss.backward()
                loss_total += loss.item()
                real_tokens += int(batch["attention_mask"].sum())
                padded_tokens += batch["attention_mask"].numel()
            gradient_norm = None
            if config.max_grad_norm is not None:
                gradient_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm, foreach=True)
            diverged = divergence(step + 1, loss_total, gradient_norm, learning_rate)
            if diverged is not None:  # stop before the step: the best dev state so far stays as it was
                optimizer.zero_grad(set_to_none=True)
                stopped_by, stop = "diverged", True
                break
            optimizer.step()
            # drop the gradients now rather than zeroing them: the memory is not needed until next backward
            optimizer.zero_grad(set_to_none=True)
            step += 1
            examples_seen += len(indices)
            method.on_step_end(model, step, planned_steps)
            if unfreezing is not None:
                unfreezing.update(step)
            step_seconds.append(time.perf_counter() - started)
            step_real_tokens.append(real_tokens - tokens_before)
            train_time += step_seconds[-1]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_total:.4f}", ex_s=f"{examples_seen / train_time:.0f}",
                                     refresh=False)
            if config.time_budget_s is not None and train_time >= config.time_budget_s:
                stopped_by, stop = "time_budget", True
            elif step >= planned_steps:
                stop = True
            if step % eval_every == 0 or stop:
                if run_evaluation():
                    stopped_by, stop = "early_stopping", True
            if stop:
                break
    if progress is not None:
        progress.close()
    if unfreezing is not None:
        unfreezing.finish()
    if diverged is None and (not curve or curve[-1]["step"] != step):
        run_evaluation()

    with torch.no_grad():  # leave the model holding its best dev state
        for name, parameter in trainable_named:
            if name in best_state:  # absent only if every evaluation was NaN: keep the final weights
                parameter.copy_(best_state[name])
    model.eval()
    return TrainResult(
        best_metrics=best_metrics, best_step=best_step, steps=step, examples_seen=examples_seen,
        real_tokens_seen=real_tokens, padded_tokens_seen=padded_tokens, train_time_s=train_time,
        eval_time_s=eval_time, stopped_by=stopped_by, num_train_examples=len(train_data),
        num_truncated={"train": train_data.num_truncated, "dev": dev_data.num_truncated},
        learning_curve=curve, best_dev_outputs=best_outputs, dev_labels=list(dev_data.labels),
        step_seconds=step_seconds, step_real_tokens=step_real_tokens, target_scale=target_scale,
        precision=config.precision, diverged=diverged,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
