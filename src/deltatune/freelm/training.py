"""FreeLM training: one decoder, the language signal and the teacher signal, in alternation.

Li et al. 2023 (arXiv:2305.01616) train a language model with two signals:
  language signal  L_lm = -(1/T) Σ_t log p(w_t | w_<t)  on raw text (here WikiText-2), which keeps the
                   model a language model;
  teacher signal   L_t = CE(W h_last(u), [u is true])  on propositions u built from labelled tasks in one
                   format (`deltatune.tasks.propositions`): for each training example, the proposition
                   with its gold answer (true) and `negatives_per_example` with wrong answers (false).
The signals take turns step by step (`deltatune.freelm.schedule`); the result answers any task,
seen or not, by scoring one proposition per candidate answer.

What trains: the paper trains the whole 0.3B decoder. Here the decoder is adapted by a registered
method, LoRA by default (r=8 on q_proj/v_proj: 460,800 parameters on SmolLM2-135M, 0.34%), plus the
teacher head (2·576 = 1,152): still one model for all tasks, trained at a fraction of the cost of
full training on a CPU, and saved as an ordinary small delta. Any other method (full, bitfit,
input-dependent-prompt, ...) can be chosen instead.
"""

from __future__ import annotations

import math
import operator
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import reduce

import numpy as np
import torch
from torch import nn

from deltatune.batching import Encoded, collate, length_bucketed_batches, stratified_subset, to_device
from deltatune.devices import model_device
from deltatune.errors import DeltatuneError
from deltatune.freelm.config import FreeLMConfig
from deltatune.freelm.model import PROPOSITION_TASK, TRUE_INDEX, FreeLMModel, fold_head, standardize_head
from deltatune.freelm.schedule import LANGUAGE, TEACHER, signal_schedule
from deltatune.freelm.scoring import (
    encode_propositions,
    field_budget,
    proposition_scores,
    shorten_texts,
    task_metrics,
)
from deltatune.methods.base import Method, OptimizerSettings
from deltatune.padding import padding_id
from deltatune.precision import autocast_for, resolve_precision
from deltatune.tasks.propositions import TaskPropositions, propositions_for
from deltatune.tasks.spec import TaskData
from deltatune.training import BatchStrategy, Evaluation, StepWork, TrainConfig, Trainer


@dataclass
class PropositionSet:
    """Teacher-signal training data: proposition texts, true (1) / false (0), their task, and the
    example each came from (an example's propositions share one template and differ in the answer)."""

    texts: list[str]
    labels: list[int]
    tasks: list[str]
    groups: list[int] = field(default_factory=list)
    """The index of the training example each proposition was built from; consecutive."""

    def __len__(self) -> int:
        return len(self.texts)

    def group_members(self) -> list[list[int]]:
        """Proposition indices of each example, in order."""
        members: list[list[int]] = []
        for index, group in enumerate(self.groups):
            if not members or self.groups[members[-1][0]] != group:
                members.append([])
            members[-1].append(index)
        return members


def build_proposition_set(
    task_data: Sequence[TaskData],
    tokenizer,
    config: FreeLMConfig,
    propositions: dict[str, TaskPropositions] | None = None,
) -> PropositionSet:
    """For every training example: its gold answer's proposition (true) and `negatives_per_example`
    wrong answers' (false), all in one template drawn at random from the task's paraphrases.

    One template per example, not per proposition: the true and false propositions then differ only in
    the answer, so the teacher must judge the answer against the input, not the wording of a template."""
    rng = random.Random(config.seed)
    texts: list[str] = []
    labels: list[int] = []
    tasks: list[str] = []
    groups: list[int] = []
    for data in task_data:
        task_propositions = (propositions or {}).get(data.task.name) or propositions_for(data.task)
        if task_propositions.num_candidates < 2:
            raise DeltatuneError(
                f"Task {data.task.name!r} has fewer than two answers; it cannot make false "
                "propositions for FreeLM's teacher signal."
            )
        train = data.split("train")
        chosen = stratified_subset(train.labels, config.max_examples_per_task, config.seed, data.task.is_regression)
        rows = shorten_texts(
            tokenizer, [train.texts[i] for i in chosen], field_budget(config.max_length, len(data.task.text_fields))
        )
        for row, index in zip(rows, chosen, strict=True):
            gold = task_propositions.candidate_of(train.labels[index])
            wrong = [c for c in range(task_propositions.num_candidates) if c != gold]
            negatives = rng.sample(wrong, min(config.negatives_per_example, len(wrong)))
            template = rng.randrange(len(task_propositions.templates))
            group = groups[-1] + 1 if groups else 0
            for candidate, truth in [(gold, 1)] + [(c, 0) for c in negatives]:
                texts.append(task_propositions.proposition(row, candidate, template))
                labels.append(truth)
                tasks.append(data.task.name)
                groups.append(group)
    return PropositionSet(texts, labels, tasks, groups)


def teacher_loss(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, kind: str) -> torch.Tensor:
    """The teacher signal on a batch of whole examples' propositions (see FreeLMConfig.teacher_loss).

    contrastive: for each example e with candidates c and log-odds s_c = logit_true(c) − logit_false(c),
    −log softmax_c(s)[gold]. Its gradient Σ_c (p_c − y_c) ∇s_c sums to zero over an example's candidates,
    so whatever all of them share (the decoder's large common component of the last-token state) cancels
    and every update goes into telling the candidates apart.
    """
    logits = logits.float()
    losses = []
    if kind in ("binary", "both"):
        losses.append(nn.functional.cross_entropy(logits, labels))
    if kind in ("contrastive", "both"):
        log_odds = logits[:, TRUE_INDEX] - logits[:, 1 - TRUE_INDEX]
        _, group_index = torch.unique_consecutive(groups, return_inverse=True)
        count = int(group_index.max()) + 1
        # a log-softmax within each group: subtract each group's log-sum-exp (on the logits' device)
        device = log_odds.device
        maximum = torch.full((count,), -torch.inf, device=device).scatter_reduce(
            0, group_index, log_odds.detach(), "amax"
        )
        shifted = torch.exp(log_odds - maximum[group_index])
        log_normaliser = torch.log(torch.zeros(count, device=device).index_add(0, group_index, shifted)) + maximum
        log_probabilities = log_odds - log_normaliser[group_index]
        losses.append(-(log_probabilities * labels).sum() / labels.sum().clamp(min=1))
    return reduce(operator.add, losses)  # added in order, as `sum` did


def example_batches(
    proposition_set: PropositionSet, lengths: list[int], batch_size: int, generator: random.Random
) -> list[list[int]]:
    """Length-bucketed batches of about `batch_size` propositions made of whole examples."""
    members = proposition_set.group_members()
    per_group = max(1, round(batch_size / max(1, round(len(proposition_set) / max(1, len(members))))))
    group_lengths = [max(lengths[i] for i in group) for group in members]
    return [
        [index for group in batch for index in members[group]]
        for batch in length_bucketed_batches(group_lengths, per_group, generator)
    ]


def language_blocks(tokenizer, texts: Sequence[str], block_length: int, count: int, seed: int) -> list[list[int]]:
    """`count` blocks of `block_length` tokens of running text: lines in a seeded random order,
    joined by the end-of-text token, cut into consecutive blocks (cycling if the text runs out)."""
    if count == 0:
        return []
    if not texts:
        raise DeltatuneError("The language corpus is empty; FreeLM's language signal needs raw text.")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = block_length * count
    stream: list[int] = []
    position = 0
    chunk = 256  # tokenise lines in chunks until there is enough text: no need to tokenise a whole corpus
    while len(stream) < needed:
        lines = [texts[order[(position + i) % len(order)]] for i in range(chunk)]
        position += chunk
        for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
            stream += ids + separator
        if position >= len(order) and not stream:
            raise DeltatuneError("The language corpus has no tokens.")
    return [stream[i * block_length : (i + 1) * block_length] for i in range(count)]


@dataclass
class FreeLMResult:
    steps: int
    language_steps: int
    teacher_steps: int
    propositions_seen: int
    language_tokens_seen: int
    train_time_s: float
    language_time_s: float
    teacher_time_s: float
    train_cpu_time_s: float = 0.0
    """CPU seconds of this process over the training steps (all threads): unlike wall time, it barely
    moves when other processes compete for the cores."""
    num_propositions: int = 0
    """Size of the teacher-signal training set (true and false propositions)."""
    history: list[dict] = field(default_factory=list)
    """One entry per step: step, signal, loss, learning rate."""
    dev_curve: list[dict] = field(default_factory=list)
    """With eval_every: one entry per check, {"step": N, TASK: {metric: value, ...}, ...}."""
    precision: str = "fp32"
    """The precision training ran at ("auto" resolved)."""

    @property
    def propositions_per_s(self) -> float:
        """Teacher-signal throughput: propositions per second of teacher-step time."""
        return self.propositions_seen / self.teacher_time_s if self.teacher_time_s else 0.0

    @property
    def language_tokens_per_s(self) -> float:
        return self.language_tokens_seen / self.language_time_s if self.language_time_s else 0.0

    def mean_loss(self, signal: str, first: bool, count: int = 10) -> float:
        losses = [entry["loss"] for entry in self.history if entry["signal"] == signal]
        picked = losses[:count] if first else losses[-count:]
        return float(np.mean(picked)) if picked else float("nan")

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "precision": self.precision,
            "num_propositions": self.num_propositions,
            "language_steps": self.language_steps,
            "teacher_steps": self.teacher_steps,
            "propositions_seen": self.propositions_seen,
            "language_tokens_seen": self.language_tokens_seen,
            "train_time_s": self.train_time_s,
            "language_time_s": self.language_time_s,
            "teacher_time_s": self.teacher_time_s,
            "train_cpu_time_s": self.train_cpu_time_s,
            "propositions_per_s": self.propositions_per_s,
            "language_tokens_per_s": self.language_tokens_per_s,
            "teacher_loss_first_10": self.mean_loss(TEACHER, True),
            "teacher_loss_last_10": self.mean_loss(TEACHER, False),
            "language_loss_first_10": self.mean_loss(LANGUAGE, True),
            "language_loss_last_10": self.mean_loss(LANGUAGE, False),
            "dev_curve": self.dev_curve,
        }


def _optimizer_groups(
    model: FreeLMModel,
    method: Method,
    learning_rate: float,
    weight_decay: float,
    head_learning_rate: float | None = None,
) -> list[dict]:
    """The method's groups on the decoder (it was applied to `model.classifier`), with the teacher head in a
    group of its own when it has its own learning rate."""
    from deltatune.methods.common import head_names

    head = {id(p) for n, p in model.classifier.named_parameters() if n in head_names(model.classifier)}
    groups = method.param_groups(model.classifier, learning_rate, OptimizerSettings(weight_decay=weight_decay))
    if head_learning_rate is not None:
        head_parameters = [p for group in groups for p in group["params"] if id(p) in head]
        groups = [{**group, "params": [p for p in group["params"] if id(p) not in head]} for group in groups]
        groups.append({"params": head_parameters, "weight_decay": 0.0, "lr": head_learning_rate})
    return [group for group in groups if group["params"]]


def loop_config(config: FreeLMConfig) -> TrainConfig:
    """The one loop's settings for a FreeLM run: exactly `steps` optimizer steps, warm-up then linear decay."""
    return TrainConfig(
        learning_rate=config.learning_rate,
        batch_size=config.teacher_batch_size,
        max_steps=config.steps,
        # FreeLM rounds its warm-up to whole steps, none when that rounds to 0 (the loop would take one)
        warmup_ratio=config.warmup_ratio if round(config.warmup_ratio * config.steps) else 0.0,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        # the loop offers a dev check at these steps and at the end; AlternatingSignals.evaluate says which count
        eval_every=config.eval_every or config.steps,
        precision=config.precision,
        device=config.device,
        seed=config.seed,
        threads=config.threads,
        quiet=config.quiet,
        report_to=config.report_to,
        log_dir=config.log_dir,
        # torch's own dropout, as FreeLM always had: the fast kernel swaps SDPA for an attention of its own
        fast_dropout=False,
    )


@dataclass
class SignalData:
    """What the two signals train on: the propositions (encoded) and the language blocks."""

    schedule: list[str]
    propositions: PropositionSet | None
    encoded: Encoded | None
    blocks: list[list[int]]


def prepare_signals(
    model: FreeLMModel,
    tokenizer,
    task_data: Sequence[TaskData],
    language_texts: Sequence[str],
    config: FreeLMConfig,
    propositions: dict[str, TaskPropositions] | None = None,
) -> SignalData:
    """The schedule and each signal's data for it; the teacher head standardised on the propositions' states."""
    schedule = signal_schedule(config.steps, config.lm_ratio, config.schedule, config.stage_steps)
    proposition_set = build_proposition_set(task_data, tokenizer, config, propositions) if TEACHER in schedule else None
    if proposition_set is not None and not len(proposition_set):
        raise DeltatuneError("The training tasks gave no propositions: they have no training examples.")
    encoded = (
        encode_propositions(tokenizer, proposition_set.texts, proposition_set.labels, config.max_length)
        if proposition_set is not None
        else None
    )
    blocks = language_blocks(
        tokenizer,
        language_texts,
        config.lm_sequence_length,
        schedule.count(LANGUAGE) * config.lm_batch_size,
        config.seed,
    )
    if config.standardize_head and encoded is not None:
        standardize_head(
            model,
            last_token_states(model, encoded, padding_id(tokenizer), config.seed, resolve_precision(config.precision)),
        )
    return SignalData(schedule, proposition_set, encoded, blocks)


class AlternatingSignals(BatchStrategy):
    """FreeLM's batches and losses on the one training loop: each step trains the signal its schedule names,
    a batch of whole examples' propositions under the teacher loss or a batch of text blocks under the
    next-token loss; dev is the zero-shot check on the training tasks every `eval_every` steps."""

    def __init__(
        self,
        model: FreeLMModel,
        tokenizer,
        task_data: Sequence[TaskData],
        config: FreeLMConfig,
        data: SignalData,
        propositions: dict[str, TaskPropositions] | None = None,
        callback: Callable[[int, str, float], None] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.task_data, self.config, self.data = model, tokenizer, task_data, config, data
        self.propositions, self.callback = propositions, callback
        self.pad_token_id = padding_id(tokenizer)
        self.examples_per_epoch = len(data.propositions) if data.propositions is not None else len(data.blocks)
        self.batch_order = random.Random(config.seed)
        self.teacher_batches: list[list[int]] = []
        self.block_position = self.propositions_seen = self.language_tokens = 0
        self.history: list[dict] = []
        self.dev_curve: list[dict] = []
        self.last: tuple[str, float, float] = (LANGUAGE, math.nan, math.nan)

    def optimizer_groups(
        self, model: nn.Module, method: Method, learning_rate: float, config: TrainConfig
    ) -> list[dict]:
        return _optimizer_groups(self.model, method, learning_rate, config.weight_decay, self.config.head_learning_rate)

    def method_module(self, model: nn.Module) -> nn.Module:
        return self.model.classifier

    def forward_backward(self, trainer: Trainer) -> StepWork:
        signal = self.data.schedule[trainer.step]
        if signal == TEACHER:
            loss, work = self._teacher_loss(trainer)
        else:
            loss, work = self._language_loss(trainer)
        loss = loss + trainer.method.extra_loss(self.model.classifier)
        loss.backward()
        # this step's rate, before the scheduler moves on
        learning_rate = trainer.learning_rate * trainer.scheduler.lr_lambdas[0](trainer.step)
        self.last = (signal, float(loss.item()), learning_rate)
        return replace(work, loss=self.last[1])

    def _teacher_loss(self, trainer: Trainer) -> tuple[torch.Tensor, StepWork]:
        # the schedule has teacher steps only when there are propositions to teach with
        assert self.data.propositions is not None and self.data.encoded is not None
        if not self.teacher_batches:  # a new pass over the propositions, in a new order
            self.teacher_batches = example_batches(
                self.data.propositions, self.data.encoded.lengths, self.config.teacher_batch_size, self.batch_order
            )[::-1]
        indices = self.teacher_batches.pop()
        batch = to_device(collate(self.data.encoded, indices, self.pad_token_id, regression=False), trainer.device)
        labels = batch.pop("labels")
        with autocast_for(trainer.config.precision, trainer.device.type):
            logits = self.model.teacher_logits(batch["input_ids"], batch["attention_mask"])
        example_groups = torch.tensor([self.data.propositions.groups[i] for i in indices]).to(trainer.device)
        self.propositions_seen += len(indices)
        mask = batch["attention_mask"]
        return (
            teacher_loss(logits, labels, example_groups, self.config.teacher_loss),
            StepWork(0.0, len(indices), int(mask.sum()), mask.numel()),
        )

    def _language_loss(self, trainer: Trainer) -> tuple[torch.Tensor, StepWork]:
        size = self.config.lm_batch_size
        input_ids = torch.tensor(self.data.blocks[self.block_position : self.block_position + size]).to(trainer.device)
        self.block_position += size
        with autocast_for(trainer.config.precision, trainer.device.type):
            loss = self.model.language_loss(input_ids)
        self.language_tokens += input_ids.numel()
        return loss, StepWork(0.0, len(input_ids), input_ids.numel(), input_ids.numel())

    def after_step(self, trainer: Trainer) -> None:
        signal, loss, learning_rate = self.last
        self.history.append({"step": trainer.step, "signal": signal, "loss": loss, "learning_rate": learning_rate})
        if self.callback is not None:
            self.callback(trainer.step, signal, loss)

    def evaluate(self, trainer: Trainer) -> Evaluation | None:
        """The zero-shot check every `eval_every` steps (and, when it chooses the kept state, at the end)."""
        every = self.config.eval_every
        if not every or (trainer.step % every and not self.config.keep_best_dev):
            return None
        seen = seen_task_metrics(
            self.model, self.tokenizer, self.task_data, self.config, self.propositions, trainer.config.precision
        )
        self.model.train()
        self.dev_curve.append({"step": trainer.step, **seen})
        metrics = {
            f"{task}/{name}": value
            for task, values in seen.items()
            for name, value in values.items()
            if name != "num_examples"
        }
        primary = [
            values[data.task.metric]
            for data in self.task_data
            for task, values in seen.items()
            if task == data.task.name
        ]
        value = float(np.mean(primary)) if self.config.keep_best_dev and primary else None
        return Evaluation(metrics, value)

    def result(self, trainer: Trainer, cpu_time: float) -> FreeLMResult:
        taken = self.data.schedule[: trainer.step]
        time_by_signal = {LANGUAGE: 0.0, TEACHER: 0.0}
        for signal, seconds in zip(taken, trainer.meters.step_seconds, strict=True):
            time_by_signal[signal] += seconds
        return FreeLMResult(
            steps=trainer.step,
            language_steps=taken.count(LANGUAGE),
            teacher_steps=taken.count(TEACHER),
            propositions_seen=self.propositions_seen,
            language_tokens_seen=self.language_tokens,
            train_time_s=sum(time_by_signal.values()),
            language_time_s=time_by_signal[LANGUAGE],
            teacher_time_s=time_by_signal[TEACHER],
            train_cpu_time_s=cpu_time,
            precision=trainer.config.precision,
            num_propositions=len(self.data.propositions) if self.data.propositions is not None else 0,
            history=self.history,
            dev_curve=self.dev_curve,
        )


def train_freelm(
    model: FreeLMModel,
    tokenizer,
    task_data: Sequence[TaskData],
    language_texts: Sequence[str],
    config: FreeLMConfig,
    method: Method,
    propositions: dict[str, TaskPropositions] | None = None,
    callback: Callable[[int, str, float], None] | None = None,
) -> FreeLMResult:
    """Train `model` (already adapted by `method`) with the two signals on the one training loop
    (`deltatune.training.Trainer`, with `AlternatingSignals` as its batch strategy).

    `callback(step, signal, loss)` runs after every optimizer step. `propositions` overrides the
    templates of tasks by name (default: `deltatune.tasks.propositions`). A non-finite loss or gradient
    stops training before its step and is a DeltatuneError naming the step and a lower learning rate.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    data = prepare_signals(model, tokenizer, task_data, language_texts, config, propositions)
    signals = AlternatingSignals(model, tokenizer, task_data, config, data, propositions, callback)
    with _folding_head(model):
        trainer = Trainer(model, method, PROPOSITION_TASK, None, loop_config(config), strategy=signals)
        with trainer.closed_on_error():
            if trainer.group.distributed:
                raise DeltatuneError(
                    "FreeLM trains in one process: run `deltatune freelm train` without torchrun or accelerate launch."
                )
            cpu_started = time.process_time()
            trainer.advance()
            cpu_time = time.process_time() - cpu_started
            trainer.restore_best()
            trainer.loggers.close()
    if trainer.diverged is not None:
        raise DeltatuneError(f"{trainer.diverged}. FreeLM stopped before that step; nothing was saved.")
    return signals.result(trainer, cpu_time)


@contextmanager
def _folding_head(model: FreeLMModel):
    """Whatever happens in training, the model leaves it with a plain linear teacher head."""
    try:
        yield
    finally:
        fold_head(model)


@torch.no_grad()
def last_token_states(
    model: FreeLMModel, encoded, pad_token_id: int, seed: int, precision: str, count: int = 256, batch_size: int = 32
) -> torch.Tensor:
    """The decoder's final states at the last token of `count` propositions drawn with `seed`."""
    chosen = random.Random(seed).sample(range(len(encoded)), min(count, len(encoded)))
    was_training = model.training
    model.eval()
    states = []
    for start in range(0, len(chosen), batch_size):
        batch = collate(encoded, chosen[start : start + batch_size], pad_token_id, regression=False)
        with autocast_for(precision):
            hidden = model.backbone(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state
        last = batch["attention_mask"].sum(dim=1) - 1
        states.append(hidden[torch.arange(len(last)), last].float())
    model.train(was_training)
    return torch.cat(states)


@torch.no_grad()
def perplexity(model: FreeLMModel, blocks: Sequence[list[int]], batch_size: int = 4) -> float:
    """exp of the mean next-token loss over `blocks` (equal-length token blocks)."""
    if not blocks:
        return float("nan")
    was_training = model.training
    model.eval()
    device = model_device(model)
    losses = [
        float(model.language_loss(torch.tensor(blocks[i : i + batch_size]).to(device)))
        for i in range(0, len(blocks), batch_size)
    ]
    model.train(was_training)
    return float(math.exp(np.mean(losses)))


def dev_check_examples(data: TaskData, count: int, seed: int) -> list[int]:
    """The dev examples a run's dev checks score (`seen_task_metrics`): a stratified draw of `count`, by `seed`.
    `deltatune freelm eval` leaves them out of a dev evaluation of a run that kept its best check."""
    return stratified_subset(data.split("dev").labels, count, seed, data.task.is_regression)


def seen_task_metrics(
    model: FreeLMModel,
    tokenizer,
    task_data: Sequence[TaskData],
    config: FreeLMConfig,
    propositions: dict[str, TaskPropositions] | None = None,
    precision: str = "fp32",
) -> dict[str, dict]:
    """Zero-shot (proposition-scoring) metrics on a stratified subset of each training task's dev split.

    `precision` must be the training precision when called between training steps (the frozen weights
    are held in bf16 then)."""
    results = {}
    for data in task_data:
        if not config.dev_examples_per_task or "dev" not in data.splits:
            continue
        task_propositions = (propositions or {}).get(data.task.name) or propositions_for(data.task)
        subset = data.split("dev").subset(dev_check_examples(data, config.dev_examples_per_task, config.seed))
        # the first template only: a cheap check that training took; `deltatune freelm eval` averages them all
        scores = proposition_scores(
            model, tokenizer, task_propositions, subset.texts, [0], max_length=config.max_length, precision=precision
        )
        results[data.task.name] = {
            **task_metrics(data.task, task_propositions, scores, subset.labels),
            "num_examples": len(subset),
        }
    return results


def teacher_accuracy(model: FreeLMModel, tokenizer, proposition_set: PropositionSet, max_length: int) -> float:
    """Share of propositions the teacher head judges correctly (true vs false)."""
    from deltatune.batching import predict_encoded

    encoded = encode_propositions(tokenizer, proposition_set.texts, proposition_set.labels, max_length)
    logits = predict_encoded(model.classifier, encoded, PROPOSITION_TASK, padding_id(tokenizer))
    return float((logits.argmax(axis=-1) == np.asarray(proposition_set.labels)).mean())


__all__ = [
    "AlternatingSignals",
    "FreeLMConfig",
    "FreeLMResult",
    "PropositionSet",
    "SignalData",
    "build_proposition_set",
    "example_batches",
    "language_blocks",
    "loop_config",
    "prepare_signals",
    "teacher_loss",
    "perplexity",
    "seen_task_metrics",
    "teacher_accuracy",
    "train_freelm",
]
