"""Regimes that run something before the real run: surgical fine-tuning's probe and ProMoT's first stage.

The regimes themselves (what they compute, their cost, their settings) are described in `deltatune.regimes`;
this module runs the ones that need more than one `Trainer`, and is what `deltatune.run.run_training` calls.
`regime_trainer` returns the trainer of the real run with its probe or first stage already done.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.common import head_names
from deltatune.methods.promot import ProMoT, promot_parts
from deltatune.regimes import check_regime_method, surgical_blocks
from deltatune.tasks.spec import TaskSpec
from deltatune.training import TrainConfig, Trainer, TrainingData


def _train_only(model: nn.Module, names: set[str]) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)


def surgical_trainer(
    model: nn.Module,
    method: Method,
    task: TaskSpec,
    data: TrainingData,
    config: TrainConfig,
    learning_rate: float | None = None,
) -> Trainer:
    """Probe every block for `config.surgical_probe_steps` steps from the same start, then return the trainer
    of the real run, which trains only the best block on dev (its `regime_report` holds the probe's scores)."""

    blocks = surgical_blocks(model)
    head = head_names(model) & {n for n, p in model.named_parameters() if p.requires_grad}
    if not blocks:
        raise DeltatuneError(
            f"regime=surgical: method {method.name!r} trains nothing outside the task head, so "
            "there is no block to choose; use --regime standard"
        )
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    probe_config = dataclasses.replace(
        config,
        regime="standard",
        max_steps=config.surgical_probe_steps,
        eval_every=config.surgical_probe_steps,
        early_stopping_patience=None,
        time_budget_s=None,
        report_to=(),
        quiet=True,
    )
    scores: dict[str, float] = {}
    for label, names in blocks.items():
        _train_only(model, names | head)
        probe = Trainer(model, method, task, data, probe_config, learning_rate=learning_rate)
        with probe.closed_on_error():
            probe.advance()
        probe.close()
        scores[label] = probe.curve[-1]["metrics"][task.metric]
        _restore(model, start)
    finite = {label: score for label, score in scores.items() if score == score}
    if not finite:
        raise DeltatuneError(
            f"regime=surgical: every block's probe scored NaN on dev ({task.metric}); raise "
            "--surgical-probe-steps or lower the learning rate"
        )
    chosen = max(finite, key=lambda label: finite[label])
    _train_only(model, blocks[chosen] | head)
    trainer = Trainer(model, method, task, data, config, learning_rate=learning_rate)
    trainer.regime_report = {
        "regime": "surgical",
        "probe_steps": config.surgical_probe_steps,
        "metric": task.metric,
        "probe_dev_scores": scores,
        "chosen_block": chosen,
        "trained_names": sorted(blocks[chosen] | head),
    }
    return trainer


def promot_trainer(
    model: nn.Module,
    method: Method,
    task: TaskSpec,
    data: TrainingData,
    config: TrainConfig,
    learning_rate: float | None = None,
) -> Trainer:
    """Run ProMoT's stage 1 (the prompt alone, best dev state kept) and return the trainer of stage 2 (the model
    update with the prompt frozen); its `regime_report` says how stage 1 went."""

    assert isinstance(method, ProMoT)  # checked by `check_regime_method`
    prompt, update = promot_parts(method, model)
    head = head_names(model) & {n for n, p in model.named_parameters() if p.requires_grad}
    steps = method.config.prompt_steps
    _train_only(model, prompt | head)
    stage_config = dataclasses.replace(
        config, max_steps=steps, eval_every=min(config.eval_every or steps, steps), time_budget_s=None, report_to=()
    )
    first = Trainer(
        model,
        method,
        task,
        dataclasses.replace(data, test=None),
        stage_config,
        learning_rate=method.config.prompt_learning_rate,
    )
    with first.closed_on_error():
        first.advance()
    stage1 = first.finish()  # the prompt at its best dev state
    _train_only(model, update | head)
    trainer = Trainer(model, method, task, data, config, learning_rate=learning_rate)
    trainer.regime_report = {
        "regime": "promot",
        "model_method": method.config.model_method,
        "stage1": {
            "steps": stage1.steps,
            "learning_rate": stage1.learning_rate,
            "best_step": stage1.best_step,
            "dev_metrics": stage1.best_metrics,
            "stopped_by": stage1.stopped_by,
        },
    }
    return trainer


def regime_trainer(
    model: nn.Module,
    method: Method,
    task: TaskSpec,
    data: TrainingData,
    config: TrainConfig,
    learning_rate: float | None = None,
) -> Trainer:
    """The trainer of the run `config.regime` asks for, its probe or first stage already run."""

    check_regime_method(method, config)
    if config.regime == "surgical":
        return surgical_trainer(model, method, task, data, config, learning_rate)
    if config.regime == "promot":
        return promot_trainer(model, method, task, data, config, learning_rate)
    return Trainer(model, method, task, data, config, learning_rate=learning_rate)


def _restore(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in tensors:
                parameter.copy_(tensors[name])


__all__ = ["promot_trainer", "regime_trainer", "surgical_trainer"]
