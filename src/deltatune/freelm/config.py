"""FreeLM's training configuration (its fields are the flags of `deltatune freelm train`).

Kept apart from the training code so that building the command line imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltatune.config import choice_problems
from deltatune.devices import check_device_name
from deltatune.errors import DeltatuneError
from deltatune.freelm.schedule import Schedule
from deltatune.loggers import missing_logger_packages


@dataclass(frozen=True)
class FreeLMConfig:
    train_tasks: tuple[str, ...] = ("snli", "rotten-tomatoes", "trec")
    """Tasks whose propositions make the teacher signal (catalog names)."""
    steps: int = 200
    """Optimizer steps in all, language and teacher steps together."""
    lm_ratio: float = 1.0
    """Language steps per teacher step (0 = teacher signal only; 0.5 = one language step per two teacher steps)."""
    schedule: Schedule = "ratio"
    """'ratio': every step picks the signal that keeps the counts closest to lm_ratio (evenly interleaved);
    'interactive': the paper's stage-wise alternation, round(lm_ratio·stage_steps) language steps then
    stage_steps teacher steps, repeated."""
    stage_steps: int = 1
    """Teacher steps per stage with schedule=interactive."""
    teacher_batch_size: int = 16
    """Propositions per teacher step (half true, half false with one negative per example)."""
    lm_batch_size: int = 4
    """Text blocks per language step."""
    lm_sequence_length: int = 128
    """Tokens per language block."""
    max_length: int = 128
    """Tokens per proposition; input texts are shortened first so the answer is never cut off."""
    max_examples_per_task: int = 2000
    """Training examples drawn from each task (stratified, fixed by the seed)."""
    negatives_per_example: int = 1
    """False propositions (wrong answers) per training example, next to its one true proposition (all in
    the example's one template, so they differ only in the answer)."""
    teacher_loss: Literal["binary", "contrastive", "both"] = "both"
    """'binary': cross-entropy of each proposition's true/false label (the paper's teacher signal);
    'contrastive': cross-entropy of the true proposition among its example's candidates, over their
    true-vs-false log-odds (what zero-shot answering picks by); 'both': their sum."""
    learning_rate: float | None = None
    """Peak learning rate. Default: the method's own (LoRA: 5e-4)."""
    head_learning_rate: float | None = None
    """Peak learning rate of the teacher head; none: the same as the decoder's."""
    standardize_head: bool = True
    """Train the teacher head on centred, standardised last-token states (the decoder's states share one
    large common direction); it is folded back into one plain linear head after training."""
    weight_decay: float = 0.01
    """AdamW weight decay on weight matrices."""
    warmup_ratio: float = 0.06
    """Fraction of the steps spent warming the learning rate up; then it decays linearly to 0."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm of each step to this; none to disable."""
    lm_corpus: str = "wikitext-2"
    """Raw text for the language signal."""
    dev_examples_per_task: int = 100
    """After training, zero-shot metrics (first template) on this many dev examples of each training task
    (0 to skip)."""
    eval_every: int = 0
    """Every this many steps, the same zero-shot dev check on the training tasks, recorded as the run's
    dev curve next to the loss history (0: only after training)."""
    keep_best_dev: bool = False
    """With eval_every: keep the state of the best dev check (the mean of the training tasks' primary
    metrics; the final state is checked too) instead of the last state."""
    perplexity_blocks: int = 16
    """Language-modelling perplexity on this many validation blocks before and after training (0 to skip)."""
    seed: int = 42
    """Seeds the example subsets, templates, negatives, batch order and the teacher head's initialisation."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision: bf16 autocast with fp32 master weights, fp32, or auto (bf16 on CPUs with
    native bf16). Evaluation always runs in fp32."""
    device: str = "auto"
    """Where training computes: auto (a CUDA GPU when present, else Apple MPS, else the CPU), cpu, cuda,
    cuda:N or mps (the saved delta, and `freelm eval`, are on the CPU)."""
    threads: int | None = None
    """torch intra-op threads; default: torch's choice (all cores)."""
    quiet: bool = False
    """No progress bar."""
    report_to: tuple[Literal["tensorboard", "mlflow"], ...] = ()
    """Also write the training scalars (loss, learning rate, examples/s per step; the dev checks) to these
    loggers: tensorboard, mlflow (the `logging` extra). They never change what is trained."""
    log_dir: str | None = None
    """Where the loggers write (TensorBoard event files under tensorboard/, an MLflow file store under
    mlruns/). Default: runs/logs."""

    def __post_init__(self) -> None:
        problems = []
        if not self.train_tasks:
            problems.append("train_tasks must name at least one task")
        for name in (
            "steps",
            "stage_steps",
            "teacher_batch_size",
            "lm_batch_size",
            "max_examples_per_task",
            "negatives_per_example",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.lm_ratio < 0:
            problems.append(f"lm_ratio={self.lm_ratio} must be 0 or more (language steps per teacher step)")
        if self.lm_sequence_length < 2:
            problems.append(f"lm_sequence_length={self.lm_sequence_length} must be at least 2")
        if self.max_length < 16:
            problems.append(f"max_length={self.max_length} must be at least 16 (a proposition needs room)")
        for name in ("learning_rate", "head_learning_rate"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        for name in ("dev_examples_per_task", "perplexity_blocks", "eval_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be 0 or more")
        problems += choice_problems(self)  # precision, teacher_loss, schedule: their Literal's choices
        device_problem = check_device_name(self.device)
        if device_problem:
            problems.append(device_problem)
        if self.keep_best_dev and not self.eval_every:
            problems.append("keep_best_dev needs eval_every > 0 (the dev checks it chooses among)")
        problems += missing_logger_packages(self.report_to)
        if problems:
            raise DeltatuneError("; ".join(problems))


__all__ = ["FreeLMConfig"]
