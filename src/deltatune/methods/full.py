"""Full fine-tuning: every parameter trains.

The reference point every other method is compared against. Parameter cost: 100% of the model;
the delta is the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.methods.base import Method
from deltatune.methods.registry import register
from deltatune.methods.state import base_parameters


@dataclass(frozen=True)
class FullConfig:
    pass


@register("full", FullConfig)
class Full(Method):
    """Full fine-tuning: every weight of the model and the task head trains."""

    default_learning_rate = 5e-5
    # what `lr_search: auto` tries: BERT's fine-tuning sweep (1e-5..5e-5) and one step above it; on the whole
    # STS-B set MiniLM-L6's search chose 2e-5, then the lowest candidate, so the range reaches below it
    learning_rate_candidates = (1e-5, 2e-5, 5e-5, 1e-4)

    def trainable_names(self, model: nn.Module) -> set[str]:
        return set(base_parameters(model))
