"""Full fine-tuning: every parameter trains.

The reference point every other method is compared against. Parameter cost: 100% of the model;
the delta is the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.methods.registry import register


@dataclass(frozen=True)
class FullConfig:
    pass


@register("full", FullConfig)
class Full:
    """Full fine-tuning: every weight of the model and the task head trains."""

    default_learning_rate = 5e-5
    # what `lr_search: auto` tries: BERT's fine-tuning sweep (2e-5..5e-5) and above it, where small encoders
    # often do best
    learning_rate_candidates = (2e-5, 5e-5, 1e-4, 2e-4)

    def __init__(self, config: FullConfig) -> None:
        self.config = config

    def apply(self, model: nn.Module) -> None:
        pass

    def trainable_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters()}
