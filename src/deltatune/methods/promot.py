"""ProMoT (Wang et al. 2023, "Two-stage LLM Fine-tuning with Less Specialization and More Generalization",
arXiv:2211.00635): prompt tuning first, then model tuning with the trained prompt attached and frozen.

Fine-tuning a model on one task specialises it to that task's format and costs it in-context ability on
others. ProMoT lets a soft prompt absorb the format first, so the later model update has less of it to learn:

    stage 1   P* = argmin_P L(f_θ([P; x]))                  θ frozen, P (and the task head) train
    stage 2   Δθ* = argmin_Δθ L(f_{θ+Δθ}([P*; x]))          P* frozen, Δθ (and the head) train

The delta holds both P* and Δθ; at inference the prompt may be dropped (`prompt_dropped`), which is the
paper's point: the tuned model without its prompt keeps more of the base model's general ability.

What this builds: one method whose delta has two parts, a soft prompt exactly as `prompt-tuning` (whose
options it takes) and a model update by `model_method`, one of the methods that add no modules (full, bitfit,
layernorm): their update is the base tensors themselves, so both parts live in one delta under one name.
The two stages are run by the `promot` regime (`--regime promot`, see `deltatune.regimes`), each with its
own optimizer, schedule and best-dev selection: stage 1 for `prompt_steps` at `prompt_learning_rate`, stage 2
for the run's own budget at its learning rate (default 5e-5, full fine-tuning's). Methods that add their own
modules (LoRA, adapters) are not offered as stage 2 here.

Parameter cost: the soft prompt's L·d, plus what `model_method` stores (full: the whole model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.common import head_names
from deltatune.methods.prompt_tuning import PromptSite, PromptTuning, PromptTuningConfig
from deltatune.methods.prompts import backbone_of
from deltatune.methods.registry import build_method, register
from deltatune.methods.state import own_parameter_names, site_at

MODEL_METHODS = ("full", "bitfit", "layernorm")
"""Stage-2 methods ProMoT can hold in its delta: those that add no modules of their own."""


@dataclass(frozen=True)
class ProMoTConfig(PromptTuningConfig):
    model_method: Literal["full", "bitfit", "layernorm"] = "full"
    """Stage 2: how the model is tuned with the prompt attached and frozen (full is the paper's)."""
    prompt_steps: int = 100
    """Stage 1: optimizer steps of prompt tuning (the model frozen) before stage 2."""
    prompt_learning_rate: float = 3e-2
    """Stage 1's peak learning rate (prompt tuning's default; stage 2 uses the run's --learning-rate)."""

    def __post_init__(self) -> None:
        problems = []
        try:
            PromptTuningConfig.__post_init__(self)
        except DeltatuneError as error:
            problems.append(str(error))
        if self.model_method not in MODEL_METHODS:
            problems.append(f"method.model_method={self.model_method!r} must be one of {', '.join(MODEL_METHODS)}")
        if self.prompt_steps < 1:
            problems.append(f"method.prompt_steps={self.prompt_steps} must be at least 1")
        if not self.prompt_learning_rate > 0:
            problems.append(f"method.prompt_learning_rate={self.prompt_learning_rate} must be positive")
        if problems:
            raise DeltatuneError("; ".join(problems))


@register("promot", ProMoTConfig)
class ProMoT(PromptTuning):
    """ProMoT: a soft prompt trained first, then a model update with it frozen; the delta holds both."""

    batch_mixing = "grouped"  # the model update rewrites dense weights
    default_learning_rate = 5e-5
    learning_rate_candidates = (1e-5, 2e-5, 5e-5, 1e-4)

    def trainable_names(self, model: nn.Module) -> set[str]:
        prompt, update = promot_parts(self, model)
        return prompt | update | head_names(model)


def promot_parts(method: ProMoT, model: nn.Module) -> tuple[set[str], set[str]]:
    """(the soft prompt's parameter names, the stage-2 update's), the task head in neither."""
    head = head_names(model)
    prompt = own_parameter_names(model, method._applied_name())
    update = build_method(method.config.model_method).trainable_names(model) - head
    if not update:
        raise DeltatuneError(
            f"method.model_method={method.config.model_method!r} finds nothing to tune in "
            f"{type(model).__name__}; use method.model_method=full"
        )
    return prompt, update


@contextmanager
def prompt_dropped(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model runs without its soft prompt (the tuned weights alone), as ProMoT evaluates."""
    site = site_at(backbone_of(model), "soft_prompt", PromptSite)
    active = site.active_delta
    site.active_delta = None
    try:
        yield model
    finally:
        site.active_delta = active


__all__ = ["MODEL_METHODS", "ProMoT", "ProMoTConfig", "promot_parts", "prompt_dropped"]
