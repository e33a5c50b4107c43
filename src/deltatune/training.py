"""The one training loop.

It reads top to bottom: tokenise once (`prepare_data`), pick the training subset the data budget allows,
plan the steps (epochs, at least `min_steps`), build length-bucketed batches, step AdamW with warm-up and
linear decay, evaluate on dev every so often, keep the best dev state (`BestState`), stop on whichever
budget (steps, epochs, seconds) runs out first or when dev stops improving, then evaluate the kept state
on the test split, which chose nothing. A run whose dev curve was still rising at its end is flagged
not converged (`still_improving`).

`Trainer` is that loop as an object that can pause at a fraction of its plan and resume exactly where it
stopped (same batches, same dropout masks, same learning-rate schedule), which is what a learning-rate
search by successive halving needs (`deltatune.search`); `train` runs one `Trainer` to the end. The loop
never asks which method it is training: methods change its behaviour only through the hooks of
`deltatune.methods.base.Method`, which it calls directly. A non-finite loss or gradient stops training
before the step is taken (`divergence`): the best dev state so far is kept and nothing non-finite is saved.

What a step trains on is a `BatchStrategy`: it gives each step's batch and accumulates its gradients, and
scores dev. The task's own (`TaskBatches`: a labelled split, the task loss, the task's metrics) is the
default; FreeLM's alternation of language and teacher signals (`deltatune.freelm.training`) is another, and
gets the same schedule, divergence check, best-state keeping, meters, loggers and device from this loop.
"""

from __future__ import annotations

import functools
import math
import random
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch import nn

from deltatune.batching import (
    Encoded,
    collate,
    encode,
    length_bucketed_batches,
    outputs_to_predictions,
    predict_encoded,
    shuffled_batches,
    stratified_subset,
    to_device,
    to_task_units,
)
from deltatune.config import choice_problems
from deltatune.devices import check_device_name, resolve_device
from deltatune.distributed import check_fsdp, process_group, shard_model, share_of
from deltatune.errors import DeltatuneError
from deltatune.fast_dropout import dropout_set_to, fast_dropout
from deltatune.heads import encodes_texts_separately, target_scale
from deltatune.interrupts import raise_if_requested
from deltatune.loggers import Logger, ScalarLoggers, missing_logger_packages, open_loggers
from deltatune.methods.base import Method, OptimizerSettings
from deltatune.metrics import compute_metrics
from deltatune.padding import padding_id
from deltatune.precision import Precision, autocast_for, frozen_linear_weights_in_bf16, resolve_precision
from deltatune.regimes import (
    check_regime_method,
    regime_default_learning_rate,
    regime_problems,
    regime_report,
    stage_hook,
    zeroth_order_for,
)
from deltatune.tasks.spec import Split, TaskSpec


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float | None = None
    """Peak learning rate. Default: the method's own (`default_learning_rate`); under regime=mezo the middle of
    the method's MeZO grid (`deltatune.regimes.MEZO_LEARNING_RATES`)."""
    batch_size: int = 32
    """Examples per optimizer step (divided over gradient_accumulation micro-batches): the global batch, which
    several processes (torchrun, accelerate launch) share, each taking batch_size / processes."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step; the micro-batch is batch_size / gradient_accumulation."""
    epochs: float = 3.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = None
    """Train for exactly this many optimizer steps, ignoring epochs and min_steps."""
    min_steps: int | None = None
    """Train for at least this many optimizer steps, taking more epochs when the data are few, so small data
    fractions are not starved of updates."""
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
    dropout: float | None = None
    """Every dropout probability of the model set to this while training (the backbone's nn.Dropout modules,
    its attention dropout, and the method's own dropout modules, such as LoRA's when its method.dropout is above
    0); none keeps the checkpoint's own (BERT's 0.1). Evaluation and the saved delta never drop out."""
    eval_every: int | None = None
    """Evaluate on dev every this many steps. Default: once per epoch (and always at the end)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a dev improvement; none to disable."""
    eval_examples: int | None = None
    """Dev examples the evaluations during training read (the curve, early stopping, the kept state, the
    learning-rate search): a stratified subset of this many, fixed by the seed, so each costs less; the kept
    state is then scored once on the whole of dev for the record. Default: all of dev every time."""
    convergence_tolerance: float = 0.005
    """A run is flagged not converged when the best of its last two dev evaluations beat every earlier one
    by more than this (in metric units: 0.005 is half a point of accuracy or Pearson); a curve with a
    single evaluation cannot show convergence and is flagged too."""
    lr_search: tuple[float, ...] | Literal["auto"] | None = None
    """Learning rates to try, each from the same start, choosing on dev by successive halving (see
    lr_search_rungs); 'auto' takes the method's own candidates (`learning_rate_candidates`). Overrides
    learning_rate. Run by `deltatune train` / `deltatune.train` and every grid cell."""
    lr_search_rungs: tuple[float, ...] = (0.125, 0.25)
    """Successive halving: at each of these fractions of the planned steps (or of the time budget) every
    remaining learning rate is scored on a fixed part of dev (see `RUNG_DEV_EXAMPLES`) and the better half
    (rounded up) goes on. With 4 candidates and (0.125, 0.25) the search trains 4/8 + 2/8 + 3/4 = 1.5 runs."""
    lr_search_extend: int = 0
    """When the search chooses the lowest or highest of its candidates, train up to this many more rates past
    that end, one at a time (each one step further, the step between the two candidates nearest that end),
    each a whole run from the same start; dev keeps the better, and the search stops once it chooses a rate
    inside the range. Each costs one run. 0: never (the run's summary then suggests a wider range)."""
    regression_loss: Literal["mse", "cosent"] = "mse"
    """A score task's loss: mse on the scaled target, or cosent (Su 2022; bi-encoder head only): for every two
    examples of a batch whose gold scores differ, log(1 + sum exp(20 (cos_lower - cos_higher))), which trains
    the order of the cosines and not their values; the kept state's outputs are then mapped onto the score
    range by a least-squares line fitted on the training examples."""
    head: Literal["auto", "cross-encoder", "bi-encoder"] = "auto"
    """The task head: the text (or pair) as one sequence, or each text of a pair encoded alone and compared
    (see `deltatune.heads`); auto picks per model family and task."""
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    """What the head reads: the first token, the mean over real tokens, or the last real token; auto takes
    the checkpoint's own sentence-embedding pooling, else cls for encoders and last for decoders."""
    max_length: int = 128
    """Truncate inputs to this many tokens (the number truncated is reported)."""
    eval_batch_size: int = 64
    """Batch size for evaluation and prediction."""
    bucket_by_length: bool = True
    """Group examples of similar length into batches so little compute goes to padding."""
    fast_dropout: bool = True
    """Dropout masks from four 16-bit lanes per random draw (a third of torch's CPU dropout cost)."""
    precision: Precision = "auto"
    """bf16 runs matmuls under autocast with fp32 master weights (on the CPU frozen linear weights are cast
    once); fp32 is exact; fp16 (CUDA only) adds loss scaling; auto takes bf16 on CPUs with native bf16 (AMX,
    AVX512-BF16), else fp32, and on CUDA GPUs bf16 where supported, else fp16."""
    device: str = "auto"
    """Where to compute: auto (a CUDA GPU when present, else Apple MPS, else the CPU), cpu, cuda, cuda:N or
    mps. Under several processes cuda means each process's own GPU (cuda:LOCAL_RANK)."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass instead of keeping them (transformers'
    gradient_checkpointing_enable): less memory, about a third more compute."""
    fsdp: bool = False
    """Several processes, full fine-tuning: shard the weights, gradients and optimizer state over the ranks
    (torch FSDP2) instead of keeping a whole copy on each; the whole model is gathered on rank 0 to be saved."""
    seed: int = 42
    """Seeds the data subset, the batch order, dropout and the head's initialisation."""
    threads: int | None = None
    """torch intra-op threads; default: torch's choice (all cores)."""
    quiet: bool = False
    """No progress bar."""
    report_to: tuple[Logger, ...] = ()
    """Also write the training scalars (loss, learning rate, examples/s per step; dev metrics per evaluation;
    test metrics at the end) to these loggers: tensorboard, mlflow (the `logging` extra). They never change
    what is trained."""
    log_dir: str | None = None
    """Where the loggers write (TensorBoard event files under tensorboard/, an MLflow file store under
    mlruns/). Default: runs/logs."""
    regime: Literal["standard", "mezo", "hft", "surgical", "promot"] = "standard"
    """How the method's trainable parameters are trained (see `deltatune.regimes`): standard (backpropagation
    and AdamW), mezo (zeroth-order SGD from two forward passes: the memory of inference; Malladi et al. 2023),
    hft (a random half of the trainable tensors frozen each stage; Hui et al. 2024), surgical (a short probe
    picks the one block that trains; Lee et al. 2023), promot (prompt tuning, then model tuning with the prompt
    frozen, with --method promot; Wang et al. 2023)."""
    mezo_epsilon: float = 1e-3
    """regime=mezo: the perturbation scale epsilon of the two forward passes (the paper's 1e-3)."""
    hft_stage_steps: int | None = None
    """regime=hft: optimizer steps per stage, each with a fresh random half frozen. Default: one epoch."""
    surgical_probe_steps: int = 20
    """regime=surgical: steps each block trains alone in the probe before the real run trains the best one."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("batch_size", "gradient_accumulation", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.batch_size % self.gradient_accumulation:
            problems.append(
                f"batch_size={self.batch_size} must be a multiple of gradient_accumulation={self.gradient_accumulation}"
            )
        if not 0 < self.data_fraction <= 1:
            problems.append(f"data_fraction={self.data_fraction} must be in (0, 1]")
        if self.epochs <= 0:
            problems.append(f"epochs={self.epochs} must be positive")
        for name in (
            "max_steps",
            "min_steps",
            "num_examples",
            "eval_every",
            "early_stopping_patience",
            "eval_examples",
        ):
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
        problems += choice_problems(self)  # schedule, head, pooling, precision, regime: their Literal's choices
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        problems += _range_problems(self)
        if self.convergence_tolerance < 0:
            problems.append(f"convergence_tolerance={self.convergence_tolerance} must not be negative")
        if isinstance(self.lr_search, tuple) and (not self.lr_search or min(self.lr_search) <= 0):
            problems.append(f"lr_search={self.lr_search} must be positive learning rates, or auto")
        if self.lr_search_extend < 0:
            problems.append(f"lr_search_extend={self.lr_search_extend} must be 0 (never) or more extra rates")
        elif self.lr_search_extend and self.lr_search is None:
            problems.append(
                f"lr_search_extend={self.lr_search_extend} extends a learning-rate search, and none is set: "
                "add lr_search (--lr-search auto, or a list of rates)"
            )
        rungs = self.lr_search_rungs
        if any(not 0 < r < 1 for r in rungs) or list(rungs) != sorted(set(rungs)):
            problems.append(f"lr_search_rungs={rungs} must be increasing fractions in (0, 1), e.g. 0.125,0.25")
        problems += missing_logger_packages(self.report_to)
        problems += regime_problems(self)
        device_problem = check_device_name(self.device)
        if device_problem:
            problems.append(device_problem)
        if problems:
            raise DeltatuneError("; ".join(problems))


COSENT_SCALE = 20.0
"""CoSENT's temperature over cosine differences (Su 2022's value)."""


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool, loss: str = "mse") -> torch.Tensor:
    logits = logits.float()
    if regression:
        if loss == "cosent":
            return cosent_loss(logits.squeeze(-1), labels)
        return nn.functional.mse_loss(logits.squeeze(-1), labels)
    return nn.functional.cross_entropy(logits, labels)


def cosent_loss(scores: torch.Tensor, labels: torch.Tensor, scale: float = COSENT_SCALE) -> torch.Tensor:
    """CoSENT: log(1 + sum over pairs (i, j) with labels[i] > labels[j] of exp(scale * (scores[j] - scores[i])))."""
    wrong_way = scale * (scores[None, :] - scores[:, None])  # [i, j]: how far j's score is above i's
    ordered = labels[:, None] > labels[None, :]
    terms = torch.cat([wrong_way.new_zeros(1), wrong_way[ordered]])
    return torch.logsumexp(terms, dim=0)


def fit_line(raw: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising sum (a + b raw - target)^2; a flat `raw` gives b = 0 and a the targets' mean."""
    raw, targets = np.asarray(raw, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    spread = float(((raw - raw.mean()) ** 2).sum())
    slope = float(((raw - raw.mean()) * (targets - targets.mean())).sum() / spread) if spread > 0 else 0.0
    return float(targets.mean() - slope * raw.mean()), slope


def peak_memory_bytes() -> int:
    """The process's peak resident set size (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _range_problems(config: TrainConfig) -> list[str]:
    """Values that would pass the checks above yet fail deep inside training or silently mis-train."""
    problems = [
        f"{name}={getattr(config, name)} must be a finite number"
        for name in (
            "learning_rate",
            "epochs",
            "time_budget_s",
            "weight_decay",
            "max_grad_norm",
            "warmup_ratio",
            "data_fraction",
            "layer_lr_decay",
        )
        if isinstance(getattr(config, name), float) and not math.isfinite(getattr(config, name))
    ]
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        problems.append(
            f"max_grad_norm={config.max_grad_norm} must be positive (or none to disable clipping); "
            "a negative one would reverse every gradient"
        )
    if not config.weight_decay >= 0:
        problems.append(f"weight_decay={config.weight_decay} must be zero or positive")
    if config.dropout is not None and not 0 <= config.dropout < 1:
        problems.append(
            f"dropout={config.dropout} must be in [0, 1) (0 turns dropout off; or leave it unset for the model's own)"
        )
    if config.threads is not None and config.threads < 1:
        problems.append(f"threads={config.threads} must be at least 1 (or left unset for torch's choice)")
    if not 0 <= config.seed < 2**63:
        problems.append(f"seed={config.seed} must be between 0 and 2**63 - 1")
    return problems


@dataclass
class TrainResult:
    best_metrics: dict[str, float]
    """Dev metrics of the kept (best dev) state, over the whole of dev (see `TrainConfig.eval_examples`)."""
    best_step: int
    steps: int
    examples_seen: int
    real_tokens_seen: int
    padded_tokens_seen: int
    train_time_s: float
    eval_time_s: float
    stopped_by: str
    """What ended training: 'epochs', 'min_steps', 'max_steps', 'time_budget', 'early_stopping' or 'diverged'."""
    num_train_examples: int
    num_truncated: dict[str, int]
    learning_rate: float
    planned_steps: int
    converged: bool
    """False when the dev curve was still rising at the end (see `still_improving`)."""
    last_gain: float | None
    """How much the best of the last two evaluations beat every earlier one (metric units; None with fewer than
    two evaluations; see `still_improving`)."""
    learning_curve: list[dict] = field(default_factory=list)
    """One entry per evaluation: step, examples seen, training seconds so far, dev metrics."""
    best_dev_outputs: np.ndarray | None = None
    """The kept state's raw outputs (logits or scores, in task units) on the whole of dev, in dev order."""
    dev_labels: list | None = None
    test_metrics: dict[str, float] | None = None
    """Metrics of the kept state on the test split; None when the task has none."""
    test_outputs: np.ndarray | None = None
    """Per-example test outputs of the kept state, in test order: what paired statistics between methods use."""
    test_labels: list | None = None
    target_scale: tuple[float, float] | None = None
    """Regression only: (offset, scale) that map the model's raw output to task units."""
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
    """The learning rate of optimizer step `step` (counted from 0) as a fraction of the peak."""
    if schedule == "slanted_triangular":
        cut = max(1, warmup_steps)
        rise = step / cut if step < cut else 1 - (step - cut) / max(1, total_steps - cut)
        return (1 + rise * (SLANTED_TRIANGULAR_RATIO - 1)) / SLANTED_TRIANGULAR_RATIO
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def lr_schedule(optimizer: torch.optim.Optimizer, plan: StepPlan, schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule over the whole plan as a torch scheduler: it sets each group's rate for step
    0 now and for the next step at each `step()`, so a paused trainer that holds it resumes on schedule."""
    factor = functools.partial(
        _lr_factor, warmup_steps=plan.warmup_steps, total_steps=plan.planned_steps, schedule=schedule
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    return (
        f"Training diverged at step {step}: {what} (peak learning rate {learning_rate:g}). Lower the "
        f"learning rate, e.g. --learning-rate {learning_rate / 10:g}"
    )


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


RUNG_DEV_EXAMPLES = 500
"""A learning-rate search ranks its candidates at each rung on this many dev examples (stratified, fixed by the
seed), or a quarter of dev if that is more: a quarter of the cost of scoring all of dev, several times at once."""


@dataclass
class TrainingData:
    """A task's splits tokenised once, shared by every run that trains on them (e.g. learning-rate candidates)."""

    train: Encoded
    """The training subset the data budget allows, its regression targets already in the head's raw units."""
    dev: Encoded
    test: Encoded | None
    target_scale: tuple[float, float] | None
    pad_token_id: int
    rung_dev: Encoded
    """The part of dev a learning-rate search ranks its candidates on (`RUNG_DEV_EXAMPLES`)."""
    selection_dev: Encoded | None = None
    """The part of dev the evaluations during training read (`TrainConfig.eval_examples`); None: all of it."""
    rung_positions: list[int] | None = None
    """Where each rung_dev example sits in what the evaluations read (selection_dev, else dev): a rung that
    falls on an evaluation's step takes its score from that evaluation's outputs instead of a second forward."""

    @property
    def evaluated_dev(self) -> Encoded:
        """What each evaluation during training scores: selection_dev if set, else the whole of dev."""
        return self.selection_dev if self.selection_dev is not None else self.dev


def prepare_data(
    model: nn.Module,
    tokenizer,
    task: TaskSpec,
    train_split: Split,
    dev_split: Split,
    test_split: Split | None,
    config: TrainConfig,
) -> TrainingData:
    """Tokenise the training subset, dev and test once, the way `model`'s head reads them."""
    if not len(train_split):
        raise DeltatuneError(f"Task {task.name!r} has no training examples.")
    if not len(dev_split):
        raise DeltatuneError(f"Task {task.name!r} has no dev examples to select checkpoints on.")
    pad_token_id = padding_id(tokenizer)
    model_max = getattr(model.config, "max_position_embeddings", None) or config.max_length
    max_length = min(config.max_length, model_max)
    separately = encodes_texts_separately(model)

    # the data budget: a stratified subset fixed by the seed, so every method sees the same one
    wanted = config.num_examples or max(1, round(config.data_fraction * len(train_split)))
    subset = stratified_subset(train_split.labels, wanted, config.seed, task.is_regression)
    train_data = encode(tokenizer, task, train_split.subset(subset), max_length, separately)
    dev_data = encode(tokenizer, task, dev_split, max_length, separately)
    test_data = (
        encode(tokenizer, task, test_split, max_length, separately)
        if test_split is not None and len(test_split)
        else None
    )
    # the model learns targets in its head's raw units; `scale` maps them back (and is saved with the delta)
    scale = target_scale(model, task, train_data.labels)
    if scale is not None:
        offset, factor = scale
        train_data.labels = [(y - offset) / factor for y in train_data.labels]
    selection_dev = None
    if config.eval_examples is not None and config.eval_examples < len(dev_data):
        chosen = stratified_subset(dev_data.labels, config.eval_examples, config.seed, task.is_regression)
        selection_dev = dev_data.subset(chosen)
    evaluated = selection_dev if selection_dev is not None else dev_data
    rung_size = max(RUNG_DEV_EXAMPLES, len(evaluated) // 4)
    rung_positions = stratified_subset(evaluated.labels, rung_size, config.seed, task.is_regression)
    rung_dev = evaluated.subset(rung_positions)
    return TrainingData(
        train_data, dev_data, test_data, scale, pad_token_id, rung_dev, selection_dev, list(rung_positions)
    )


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    planned_steps: int
    warmup_steps: int
    eval_every: int
    ends_by: str
    """What the plan's length comes from: 'max_steps', 'min_steps' or 'epochs'."""


def plan_steps(num_examples: int, config: TrainConfig) -> StepPlan:
    """max_steps if given; else the epochs, raised to min_steps when the data are few."""
    steps_per_epoch = math.ceil(num_examples / config.batch_size)
    from_epochs = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps:
        planned, ends_by = config.max_steps, "max_steps"
    elif config.min_steps and config.min_steps > from_epochs:
        planned, ends_by = config.min_steps, "min_steps"
    else:
        planned, ends_by = from_epochs, "epochs"
    warmup = max(1, round(config.warmup_ratio * planned)) if config.warmup_ratio else 0
    return StepPlan(steps_per_epoch, planned, warmup, config.eval_every or steps_per_epoch, ends_by)


class BestState:
    """The best dev evaluation so far, and a copy of the trainable tensors as they were at it."""

    def __init__(self, named_parameters: list[tuple[str, nn.Parameter]]) -> None:
        self.named_parameters = named_parameters
        self.tensors: dict[str, torch.Tensor] = {}  # filled at the first improvement, then overwritten in place
        self.value, self.step = -math.inf, 0
        self.metrics: dict[str, float] = {}
        self.outputs: np.ndarray | None = None
        self.evaluations_since = 0
        self.settled = False
        """Whether the kept state is one the method called settled."""

    def offer(
        self, value: float, step: int, metrics: dict[str, float], outputs: np.ndarray, settled: bool = True
    ) -> None:
        """Keep this state if it beats the best so far (NaN never does). A state the method calls unsettled
        (`Method.settled`) is kept only while no settled one is, and counts nothing toward early stopping; the
        first settled state replaces it whatever the scores."""
        usable = not math.isnan(value) and np.isfinite(outputs).all()
        if not settled:
            if usable and not self.settled and value > self.value:
                self.value, self.step, self.metrics, self.outputs = value, step, metrics, outputs
                self._copy()
            return
        if not usable or (self.settled and value <= self.value):
            self.evaluations_since += 1
            return
        self.value, self.step, self.metrics, self.outputs, self.evaluations_since = value, step, metrics, outputs, 0
        self.settled = True
        self._copy()

    def _copy(self) -> None:
        with torch.no_grad():
            for name, parameter in self.named_parameters:
                if name in self.tensors:
                    self.tensors[name].copy_(parameter)
                else:
                    self.tensors[name] = parameter.detach().clone()

    def restore(self) -> None:
        """Put the kept tensors back into the model (absent only if every evaluation was NaN: keep the last)."""
        with torch.no_grad():
            for name, parameter in self.named_parameters:
                if name in self.tensors:
                    parameter.copy_(self.tensors[name])


CONVERGENCE_WINDOW = 2
"""A run has converged when its last this-many evaluations did not beat its earlier best by more than the
tolerance: early stopping's own test at a patience of two, so one dip after a climb does not count as a plateau."""


def still_improving(values: list[float], tolerance: float) -> tuple[bool, float | None]:
    """(True when the best of the last `CONVERGENCE_WINDOW` evaluations beat every earlier one by more than
    `tolerance`, that gain). A two-point curve is judged on its last point; one point cannot show
    convergence: (True, None)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) < 2:
        return True, None
    window = min(CONVERGENCE_WINDOW, len(values) - 1)
    gain = max(values[-window:]) - max(values[:-window])
    return gain > tolerance, gain


@dataclass
class Meters:
    """What training has cost so far: optimizer steps' wall seconds and tokens, examples seen, and the seconds
    spent training and evaluating (evaluation is not training time, so examples/s measures training alone)."""

    examples_seen: int = 0
    real_tokens: int = 0
    """Tokens that were text (attention mask 1)."""
    padded_tokens: int = 0
    """Tokens computed on, padding included."""
    train_time: float = 0.0
    eval_time: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    """Wall seconds of each optimizer step (benchmarks take medians over these)."""
    step_real_tokens: list[int] = field(default_factory=list)

    def add_tokens(self, real: int, padded: int) -> None:
        self.real_tokens += real
        self.padded_tokens += padded

    def add_step(self, seconds: float, examples: int, real_tokens: int) -> None:
        self.step_seconds.append(seconds)
        self.step_real_tokens.append(real_tokens)
        self.examples_seen += examples
        self.train_time += seconds

    def add_evaluation(self, started: float) -> None:
        """Count the seconds since `started` (a `time.perf_counter()` reading) as evaluation."""
        self.eval_time += time.perf_counter() - started


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step's batch was (summed over the processes): what the meters and loggers count."""

    loss: float
    """The batch's mean loss (as the divergence check and the loggers read it)."""
    examples: int
    real_tokens: int
    padded_tokens: int


@dataclass(frozen=True)
class Evaluation:
    """One dev evaluation of the current state."""

    metrics: dict[str, float]
    """What the curve records and the loggers write (as dev/NAME)."""
    value: float | None
    """The number the best state is chosen by (higher is better); None: record the metrics, choose nothing."""
    outputs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """The raw outputs the result keeps for the best state (the task's dev outputs; empty when none)."""


class BatchStrategy:
    """What the one loop trains on: the hook a way of training implements, everything else being the loop's.

    `forward_backward` accumulates the gradients of the next step's batch (the loop then clips, checks for
    divergence, steps the optimizer and the schedule); `evaluate` scores dev; `after_step` hears every step
    taken. A strategy with its own data (not a task's `TrainingData`) says how many examples make an epoch.
    """

    examples_per_epoch: int | None = None
    """Examples in one pass over the strategy's own data (plans epochs); None: the task's training split."""

    def optimizer_groups(
        self, model: nn.Module, method: Method, learning_rate: float, config: TrainConfig
    ) -> list[dict]:
        """AdamW groups: the method's, honouring weight decay and layer-wise learning-rate decay."""
        return _optimizer_groups(model, method, learning_rate, config)

    def method_module(self, model: nn.Module) -> nn.Module:
        """The part of the trained model the method was applied to: what its hooks (on_step_end) are given."""
        return model

    def forward_backward(self, trainer: Trainer) -> StepWork:
        """Accumulate the gradients of the next batch (this process's share) and say what it was."""
        raise TypeError(f"{type(self).__name__} must define forward_backward(trainer): it is the one required hook.")

    def evaluate(self, trainer: Trainer) -> Evaluation | None:
        """Score the current state on dev (None: nothing to record). Called on the main process only."""
        return None

    def after_step(self, trainer: Trainer) -> None:
        """Runs after every optimizer step taken (`trainer.step` already counts it)."""


class TaskBatches(BatchStrategy):
    """The default: batches of the task's training split under the task loss (plus the method's own term),
    scored on dev by the task's metrics and chosen by its primary one."""

    def forward_backward(self, trainer: Trainer) -> StepWork:
        indices = trainer._next_batch()
        loss, real_tokens, padded_tokens = (
            trainer._forward_backward(indices)
            if trainer.zeroth_order is None
            else trainer.zeroth_order.step(trainer, indices)
        )
        return StepWork(loss, len(indices), real_tokens, padded_tokens)

    def evaluate(self, trainer: Trainer) -> Evaluation | None:
        task, dev = trainer.task, trainer.data.evaluated_dev
        outputs = trainer._outputs(dev)
        metrics = compute_metrics(task.metrics, outputs_to_predictions(outputs, task), dev.labels)
        return Evaluation(metrics, metrics[task.metric], outputs)


class Trainer:
    """The training loop for one model at one learning rate, resumable: `advance(0.25)` trains until a
    quarter of the plan (steps, or the time budget) is done, `advance()` to the end, `finish()` restores the
    best dev state, evaluates it on test and returns the result.

    A paused trainer keeps its batch order, its place in the epoch, its learning-rate scheduler and its own
    torch random state, and a pause adds no evaluation to its curve, so several trainers can take turns in
    one process and each trains and evaluates exactly as it would alone. The loggers of `config.report_to`
    hear every step and evaluation; they only read. `strategy` says what a step trains on (default: the
    task's batches, `TaskBatches`); a strategy with data of its own passes `data=None`.
    """

    def __init__(
        self,
        model: nn.Module,
        method,
        task: TaskSpec,
        data: TrainingData | None,
        config: TrainConfig,
        learning_rate: float | None = None,
        strategy: BatchStrategy | None = None,
    ) -> None:
        self.device = resolve_device(config.device)
        self.config = config = replace(config, precision=resolve_precision(config.precision, self.device.type))
        self.group = process_group(self.device)
        _check_batch_divides(config, self.group.world_size)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model, self.method, self.task, self._data = model.to(self.device), method, task, data
        self.target_scale = data.target_scale if data is not None else None
        """Regression: (offset, factor) from the model's raw outputs to task units (a CoSENT run refits it at the end)."""
        _check_regression_loss(config, task, model)
        self.strategy = strategy or TaskBatches()
        self.sharded = config.fsdp
        if config.fsdp:
            check_fsdp(method.name, self.group, config.regime)
            shard_model(model)  # before the optimizer, which must hold the sharded parameters
        self.plan = plan_steps(len(data.train) if data is not None else self.strategy.examples_per_epoch or 1, config)
        self.learning_rate = learning_rate or config.learning_rate or regime_default_learning_rate(config, method)
        self.contexts = ExitStack()
        if config.dropout is not None:  # before the speed levers: fast_dropout swaps only the dropouts that drop
            self.contexts.enter_context(dropout_set_to(model, config.dropout))
        self._enter_speed_levers(model, config)
        # fp16's narrow range needs the loss scaled up before backward and the gradients unscaled after
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.regime_report = regime_report(config)
        """What the regime did, for the run record (a surgical probe's scores); None for standard."""

        groups = self.strategy.optimizer_groups(model, method, self.learning_rate, config)
        self.trainable = [p for group in groups for p in group["params"]]
        if not self.trainable:
            self.contexts.close()
            raise DeltatuneError(f"Method {method.name!r} left nothing to train on this model.")
        for group in groups:
            group.setdefault("lr", self.learning_rate)
        # MeZO updates the weights itself; plain SGD (no momentum: no state) only carries its groups' rates
        self.zeroth_order = zeroth_order_for(config, self.trainable)
        self.optimizer = (
            torch.optim.AdamW(groups, lr=self.learning_rate, foreach=True)
            if self.zeroth_order is None
            else torch.optim.SGD(groups, lr=self.learning_rate)
        )
        self.scheduler = lr_schedule(self.optimizer, self.plan, config.schedule)
        self.unfreezing = (
            GradualUnfreezing(model, config.unfreeze_every or self.plan.steps_per_epoch)
            if config.gradual_unfreezing
            else stage_hook(model, config, self.plan.steps_per_epoch)
        )
        trainable_ids = {id(p) for p in self.trainable}
        self.best = BestState([(n, p) for n, p in model.named_parameters() if id(p) in trainable_ids])

        self.batch_order = random.Random(config.seed)
        self.batches: list[list[int]] = []
        self.next_batch = 0
        # each rank its own dropout stream (rank 0 the one a single process has), the same batches on all
        self.rng_state = _seeded_rng_state((config.seed + self.group.rank) % 2**63)
        # a GPU draws its dropout masks from its own generator: kept per trainer the same way
        self.device_rng_state = _seeded_cuda_rng_state((config.seed + self.group.rank) % 2**63, self.device)
        self.curve: list[dict] = []
        self.last_outputs: tuple[int, np.ndarray] | None = None
        """The step of the latest dev evaluation and its outputs (what a rung at that step scores)."""
        self.step = 0
        self.meters = Meters()
        self.stopped_by: str | None = None
        self.diverged: str | None = None
        self.loggers: ScalarLoggers = open_loggers(
            config.report_to if self.group.is_main else (),
            config.log_dir,
            f"{task.name}-{method.name}-lr{self.learning_rate:g}-seed{config.seed}",
        )

    def _enter_speed_levers(self, model: nn.Module, config: TrainConfig) -> None:
        """The CPU's speed levers (measured there only, so a GPU does without them) and gradient checkpointing."""
        on_cpu = self.device.type == "cpu"
        if config.fast_dropout and on_cpu:
            self.contexts.enter_context(fast_dropout(model))
        # weights frozen throughout can be held in bf16; gradual unfreezing and HFT thaw them, so they keep fp32
        if config.precision == "bf16" and not config.gradual_unfreezing and config.regime != "hft" and on_cpu:
            self.contexts.enter_context(frozen_linear_weights_in_bf16(model))
        if config.gradient_checkpointing:
            self.contexts.enter_context(gradient_checkpointing(model))

    @property
    def data(self) -> TrainingData:
        """The task's tokenised splits (a strategy with data of its own has none)."""
        if self._data is None:
            raise DeltatuneError(
                f"{type(self.strategy).__name__} trains on data of its own: this trainer holds "
                "no task splits to score or test."
            )
        return self._data

    @property
    def train_time(self) -> float:
        return self.meters.train_time

    @property
    def done(self) -> bool:
        return self.stopped_by is not None

    @property
    def progress(self) -> float:
        """The share of the plan done: steps, or seconds of the time budget, whichever is further along."""
        share = self.step / self.plan.planned_steps
        # several processes: rank 0's clock alone decides a time budget (its decision is broadcast each step)
        if self.config.time_budget_s is not None and not self.group.distributed:
            share = max(share, self.meters.train_time / self.config.time_budget_s)
        return share

    def advance(self, until: float = 1.0) -> None:
        """Train until `until` of the plan is done or a budget or early stopping ends the run (then the final
        state is evaluated on dev)."""
        torch.set_rng_state(self.rng_state)
        if self.device_rng_state is not None:
            torch.cuda.set_rng_state(self.device_rng_state, self.device)
        self.model.train()
        progress = self._progress_bar()
        while not self.done and self.progress < until:
            raise_if_requested()  # a Ctrl-C the garbage collector swallowed (see deltatune.interrupts)
            self._step()
            if self.diverged is not None:
                break
            if progress is not None:
                progress.update(1)
            self._check_budgets()
            if self.step % self.plan.eval_every == 0 or self.done:
                self.evaluate()
            self._agree_on_stop()
        if progress is not None:
            progress.close()
        if self.done and self.diverged is None and (not self.curve or self.curve[-1]["step"] != self.step):
            self.evaluate()
        self.rng_state = torch.get_rng_state()
        if self.device_rng_state is not None:
            self.device_rng_state = torch.cuda.get_rng_state(self.device)

    def score(self, encoded: Encoded) -> float:
        """The primary metric of the current state on `encoded` (a rung of a learning-rate search): not part
        of the curve, and no state is kept."""
        started = time.perf_counter()
        outputs = self._outputs(encoded)
        value = compute_metrics((self.task.metric,), outputs_to_predictions(outputs, self.task), encoded.labels)
        self.meters.add_evaluation(started)
        return value[self.task.metric]

    def rung_score(self) -> float:
        """The primary metric of the current state on the search's part of dev (`TrainingData.rung_dev`): read
        from the dev evaluation of this very step when there was one (its outputs hold the rung's examples),
        else scored afresh (`score`)."""
        data = self.data
        if self.last_outputs is not None and self.last_outputs[0] == self.step and data.rung_positions is not None:
            outputs = self.last_outputs[1][data.rung_positions]
            predictions = outputs_to_predictions(outputs, self.task)
            return compute_metrics((self.task.metric,), predictions, data.rung_dev.labels)[self.task.metric]
        return self.score(data.rung_dev)

    def _next_batch(self) -> list[int]:
        """The indices of the next batch; a new epoch gets a new batch order."""
        if self.next_batch == len(self.batches):
            config = self.config
            self.batches = (
                length_bucketed_batches(self.data.train.lengths, config.batch_size, self.batch_order)
                if config.bucket_by_length
                else shuffled_batches(len(self.data.train), config.batch_size, self.batch_order)
            )
            self.next_batch = 0
        self.next_batch += 1
        return self.batches[self.next_batch - 1]

    def _forward_backward(self, indices: list[int], backward: bool = True) -> tuple[float, int, int]:
        """Accumulate the gradients of one global batch (this rank's share, in micro-batches); returns the
        batch's mean loss and its real and padded tokens, summed over the ranks. `backward` False: the loss
        alone (MeZO's forward passes)."""
        group, config = self.group, self.config
        share = share_of(indices, group.rank, group.world_size)
        micro_batch = config.batch_size // (config.gradient_accumulation * group.world_size)
        loss_total, real_tokens, padded_tokens = 0.0, 0, 0
        for start in range(0, len(share), micro_batch):
            part = share[start : start + micro_batch]
            batch = to_device(
                collate(self.data.train, part, self.data.pad_token_id, self.task.is_regression), self.device
            )
            labels = batch.pop("labels")
            with autocast_for(config.precision, self.device.type):
                logits = self.model(**batch).logits
            task_part = task_loss(logits, labels, self.task.is_regression, config.regression_loss)
            loss = (task_part + self.method.extra_loss(self.model)) * (len(part) / len(indices))
            if backward:
                # FSDP averages the ranks' gradients, where these losses are weighted to be summed
                reduced = loss * group.world_size if self.sharded else loss
                (self.scaler.scale(reduced) if self.scaler is not None else reduced).backward()
            loss_total += loss.item()
            real_tokens += int(batch["attention_mask"].sum())
            padded_tokens += batch["attention_mask"].numel()
        if group.distributed:
            totals = torch.tensor([loss_total, real_tokens, padded_tokens], dtype=torch.float64, device=self.device)
            # a sharded model's gradients were reduce-scattered by its backward pass already
            gradients = [] if self.sharded or not backward else [p.grad for p in self.trainable if p.grad is not None]
            group.sum_([*gradients, totals])
            loss_total, real_tokens, padded_tokens = totals[0].item(), int(totals[1].item()), int(totals[2].item())
        return loss_total, real_tokens, padded_tokens

    def _step(self) -> None:
        """One optimizer step over one batch (in micro-batches when accumulating gradients)."""
        started = time.perf_counter()
        learning_rate = self.optimizer.param_groups[0]["lr"]  # this step's, before the scheduler moves on
        work = self.strategy.forward_backward(self)
        loss, real_tokens, padded_tokens = work.loss, work.real_tokens, work.padded_tokens
        self.meters.add_tokens(real_tokens, padded_tokens)
        gradient_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            gradient_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm, foreach=True)
        # under fp16 an overflowing gradient is the loss scaler's to handle (it skips the step and scales down)
        self.diverged = divergence(
            self.step + 1, loss, gradient_norm if self.scaler is None else None, self.learning_rate
        )
        if self.diverged is not None:  # stop before the step: the best dev state so far stays as it was
            self.optimizer.zero_grad(set_to_none=True)
            self.stopped_by = "diverged"
            return
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # drop the gradients now rather than zeroing them: the memory is not needed until next backward
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.method.on_step_end(self.strategy.method_module(self.model), self.step, self.plan.planned_steps)
        if self.unfreezing is not None:
            self.unfreezing.update(self.step)
        seconds = time.perf_counter() - started
        self.meters.add_step(seconds, work.examples, real_tokens)
        self.loggers.log(
            {
                "train/loss": loss,
                "train/learning_rate": learning_rate,
                "train/examples_per_s": work.examples / seconds if seconds else 0.0,
            },
            self.step,
        )
        self.strategy.after_step(self)

    def _agree_on_stop(self) -> None:
        """Several processes: every rank takes rank 0's stop decision (it alone evaluates and keeps the clock)."""
        if self.group.distributed:
            code = self.group.broadcast_code(STOP_REASONS.index(self.stopped_by), self.device)
            self.stopped_by = STOP_REASONS[code]

    def _check_budgets(self) -> None:
        if self.config.time_budget_s is not None and self.meters.train_time >= self.config.time_budget_s:
            self.stopped_by = "time_budget"
        elif self.step >= self.plan.planned_steps:
            self.stopped_by = self.plan.ends_by

    def evaluate(self) -> None:
        """Score the current state on dev, add it to the curve, keep it if it is the best; early stopping.
        Several processes: rank 0 alone evaluates (the others hold the same weights), unless the model is
        sharded: then every rank runs the same forward passes and keeps the same best state of its shards."""
        if not self.group.is_main and not self.sharded:
            return
        started = time.perf_counter()
        evaluation = self.strategy.evaluate(self)
        self.meters.add_evaluation(started)
        if evaluation is None:
            return
        metrics = evaluation.metrics
        self.curve.append(
            {
                "step": self.step,
                "examples_seen": self.meters.examples_seen,
                "train_time_s": round(self.meters.train_time, 3),
                "metrics": metrics,
            }
        )
        self.loggers.log({f"dev/{name}": value for name, value in metrics.items()}, self.step)
        if evaluation.outputs is not None:
            self.last_outputs = (self.step, evaluation.outputs)
        if evaluation.value is not None:
            settled = self.method.settled(self.step, self.plan.planned_steps)
            self.best.offer(evaluation.value, self.step, metrics, evaluation.outputs, settled)
        patience = self.config.early_stopping_patience
        if not self.done and patience is not None and self.best.evaluations_since >= patience:
            self.stopped_by = "early_stopping"

    def _outputs(self, encoded: Encoded) -> np.ndarray:
        raw = predict_encoded(
            self.model, encoded, self.task, self.data.pad_token_id, self.config.eval_batch_size, self.config.precision
        )
        return to_task_units(raw, self.target_scale)

    def _calibrate(self) -> None:
        """A run trained with CoSENT learned the order of its outputs, not their values: fit raw -> target on
        the training examples (raw units) and fold the line into `target_scale`, re-expressing the kept dev
        outputs and metrics in the new units. Every rank computes it (the same weights give the same line)."""
        if self.config.regression_loss != "cosent" or self._data is None or self.target_scale is None:
            return
        offset, factor = self.target_scale
        raw = predict_encoded(
            self.model,
            self.data.train,
            self.task,
            self.data.pad_token_id,
            self.config.eval_batch_size,
            self.config.precision,
        )[:, 0]
        intercept, slope = fit_line(raw, np.asarray(self.data.train.labels))
        self.target_scale = (offset + factor * intercept, factor * slope)
        if self.best.outputs is not None:
            raw_dev = (self.best.outputs - offset) / factor
            self.best.outputs = to_task_units(raw_dev, self.target_scale)
            evaluated = self.data.evaluated_dev
            predictions = outputs_to_predictions(self.best.outputs, self.task)
            self.best.metrics = compute_metrics(self.task.metrics, predictions, evaluated.labels)

    def _progress_bar(self):
        if self.config.quiet or not self.group.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.plan.planned_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            desc=f"{self.method.name} on {self.task.name} at lr {self.learning_rate:g}",
            file=sys.stderr,
        )

    def close(self, failed: bool = False) -> None:
        """Undo the training-time changes to the model (fast dropout, bf16 frozen weights); close the loggers
        (`failed`: training ended by an error, which they record)."""
        self._undo_training_changes()
        self.loggers.close(failed)

    @contextmanager
    def closed_on_error(self) -> Iterator[Trainer]:
        """Within the block, an error (Ctrl-C, divergence, a full disk) closes the trainer before it propagates:
        the model is left as it was trained and no logger is left open."""
        try:
            yield self
        except BaseException:
            self.close(failed=True)
            raise

    def _undo_training_changes(self) -> None:
        if self.unfreezing is not None:
            self.unfreezing.finish()
            self.unfreezing = None  # undone once, whichever of close and finish comes first
        self.contexts.close()

    def _test(self) -> tuple[dict[str, float] | None, np.ndarray | None]:
        """The kept state's metrics and outputs on test (None, None when the task has no test split, and on
        every rank but 0; a sharded model's ranks all run the forward passes)."""
        if self.data.test is None or not (self.group.is_main or self.sharded):
            return None, None
        metrics, outputs = self._scored(self.data.test)
        self.loggers.log({f"test/{name}": value for name, value in metrics.items()}, self.step)
        return metrics, outputs

    def _whole_dev(self) -> tuple[dict[str, float], np.ndarray | None]:
        """The kept state's dev metrics and outputs over the whole of dev: the kept evaluation's own when the
        evaluations read all of dev, else one more pass (on the main process; others return the kept ones)."""
        data = self._data
        if data is None or data.selection_dev is None or self.best.outputs is None:
            return self.best.metrics, self.best.outputs
        if not (self.group.is_main or self.sharded):
            return self.best.metrics, self.best.outputs
        return self._scored(self.data.dev)

    def _scored(self, encoded: Encoded) -> tuple[dict[str, float], np.ndarray]:
        """Every metric of the current state on `encoded` and its outputs, timed as evaluation."""
        started = time.perf_counter()
        outputs = self._outputs(encoded)
        metrics = compute_metrics(self.task.metrics, outputs_to_predictions(outputs, self.task), encoded.labels)
        self.meters.add_evaluation(started)
        return metrics, outputs

    def restore_best(self) -> None:
        """Undo the training-time changes to the model and leave it holding its best dev state (the last state
        when nothing was chosen), in evaluation mode."""
        self._undo_training_changes()
        self.best.restore()
        if self.sharded:  # the whole model is gathered onto rank 0 next: the optimizer state and copies go first
            self.optimizer.state.clear()
            self.best.tensors.clear()
        self.model.eval()

    def finish(self) -> TrainResult:
        """Leave the model holding its best dev state, evaluate that state on test (and on the whole of dev when
        the evaluations read part of it), and say how it went."""
        self.restore_best()
        try:
            self._calibrate()
            dev_metrics, dev_outputs = self._whole_dev()
            test_metrics, test_outputs = self._test()
        finally:
            self.loggers.close()
        rising, gain = still_improving(
            [point["metrics"][self.task.metric] for point in self.curve], self.config.convergence_tolerance
        )
        width, meters = self.task.num_labels, self.meters
        return TrainResult(
            best_metrics=dev_metrics,
            best_step=self.best.step,
            steps=self.step,
            examples_seen=meters.examples_seen,
            real_tokens_seen=meters.real_tokens,
            padded_tokens_seen=meters.padded_tokens,
            train_time_s=meters.train_time,
            eval_time_s=meters.eval_time,
            stopped_by=self.stopped_by or "paused",
            num_train_examples=len(self.data.train),
            num_truncated={
                "train": self.data.train.num_truncated,
                "dev": self.data.dev.num_truncated,
                **({"test": self.data.test.num_truncated} if self.data.test is not None else {}),
            },
            learning_rate=self.learning_rate,
            planned_steps=self.plan.planned_steps,
            converged=not rising,
            last_gain=gain,
            learning_curve=self.curve,
            best_dev_outputs=dev_outputs if dev_outputs is not None else np.zeros((0, width), np.float32),
            dev_labels=list(self.data.dev.labels),
            test_metrics=test_metrics,
            test_outputs=test_outputs,
            test_labels=list(self.data.test.labels) if self.data.test is not None else None,
            target_scale=self.target_scale,
            step_seconds=meters.step_seconds,
            step_real_tokens=meters.step_real_tokens,
            precision=self.config.precision,
            diverged=self.diverged,
        )


STOP_REASONS = (None, "epochs", "min_steps", "max_steps", "time_budget", "early_stopping", "diverged")
"""What can end training (None: nothing yet), in the order several processes broadcast them."""


def _check_regression_loss(config: TrainConfig, task: TaskSpec, model: nn.Module) -> None:
    """CoSENT ranks a bi-encoder's cosines: refuse it for a classification task or a cross-encoder head."""
    if config.regression_loss == "cosent" and not (task.is_regression and encodes_texts_separately(model)):
        raise DeltatuneError(
            f"regression_loss=cosent ranks the cosine similarities of a bi-encoder, but {task.name!r} "
            + ("is a classification task" if not task.is_regression else "is read by a cross-encoder head")
            + ": use it with a sentence-pair score task and --head bi-encoder, or leave --regression-loss mse."
        )


def _check_batch_divides(config: TrainConfig, world_size: int) -> None:
    """Several processes split each global batch evenly: batch_size must divide into them and their micro-batches."""
    if world_size > 1 and config.batch_size % (world_size * config.gradient_accumulation):
        raise DeltatuneError(
            f"batch_size={config.batch_size} (the global batch) must be a multiple of processes x "
            f"gradient_accumulation = {world_size} x {config.gradient_accumulation}: pick e.g. --batch-size "
            f"{world_size * config.gradient_accumulation * max(1, config.batch_size // (world_size * config.gradient_accumulation))}."
        )


@contextmanager
def gradient_checkpointing(model: nn.Module):
    """Within the block, the transformers backbone recomputes activations in backward; afterwards it keeps them."""
    from transformers import PreTrainedModel

    backbones = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]
    if not backbones:
        raise DeltatuneError(
            f"gradient_checkpointing: {type(model).__name__} holds no transformers model that "
            "supports it; train without --gradient-checkpointing."
        )
    backbone = backbones[0]
    # non-reentrant checkpointing gives gradients to weights inside a block even when its inputs need none
    # (a frozen embedding under LoRA or BitFit), which the reentrant form would silently drop.
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable({"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield model
    finally:
        if hasattr(backbone, "activation_checkpointing_disable"):
            backbone.activation_checkpointing_disable()
        else:
            backbone.gradient_checkpointing_disable()
        # enabling made the embeddings' output require grad (a forward hook); training is over, so drop it
        if getattr(backbone, "_require_grads_hook", None) is not None:
            backbone.disable_input_require_grads()


def _seeded_rng_state(seed: int) -> torch.Tensor:
    """torch's default-generator state after seeding with `seed`, without leaving the generator changed."""
    saved = torch.get_rng_state()
    torch.manual_seed(seed)
    state = torch.get_rng_state()
    torch.set_rng_state(saved)
    return state


def _seeded_cuda_rng_state(seed: int, device: torch.device) -> torch.Tensor | None:
    """The CUDA generator's state of `device` after seeding with `seed` (None off CUDA), leaving it unchanged."""
    if device.type != "cuda":
        return None
    saved = torch.cuda.get_rng_state(device)
    with torch.cuda.device(device):
        torch.cuda.manual_seed(seed)
    state = torch.cuda.get_rng_state(device)
    torch.cuda.set_rng_state(saved, device)
    return state


def train(
    model: nn.Module,
    tokenizer,
    task: TaskSpec,
    train_split: Split,
    dev_split: Split,
    method: Method,
    config: TrainConfig,
    test_split: Split | None = None,
) -> TrainResult:
    """Train `model` (already prepared by the method) at one learning rate and leave it holding its best dev
    state; with `test_split`, that state is also evaluated on test. (`config.lr_search` is run by
    `deltatune.run.run_training`, which builds a fresh model per learning rate.)"""
    check_regime_method(method, config)
    if config.regime in ("surgical", "promot"):
        raise DeltatuneError(
            f"regime={config.regime} runs a probe or first stage before the real run, which "
            "train() does not: use deltatune.run.run_training (deltatune train), or "
            "deltatune.regime_runs.regime_trainer on prepared data."
        )
    data = prepare_data(model, tokenizer, task, train_split, dev_split, test_split, config)
    trainer = Trainer(model, method, task, data, config)
    with trainer.closed_on_error():
        trainer.advance()
        return trainer.finish()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
