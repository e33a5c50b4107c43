"""BitFit (Ben Zaken, Goldberg & Ravfogel 2021, arXiv:2106.10199): train only the bias terms.

Every weight matrix stays frozen; the additive bias vectors of every layer (and the task head)
train. Parameter cost on BERT-base is about 0.08% of the model; on MiniLM-L6 about 0.2%. Models
without biases (the Llama family has none in its linear layers) have little left to train, so
BitFit on them tunes only the head and any norm biases: the count says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.methods.base import Method
from deltatune.methods.common import head_names, is_bias
from deltatune.methods.registry import register
from deltatune.methods.state import base_parameters


@dataclass(frozen=True)
class BitFitConfig:
    train_head: bool = True
    """Also train the task head (the paper does; without it a fresh head stays random)."""


@register("bitfit", BitFitConfig)
class BitFit(Method):
    """BitFit: only bias terms (and the task head) train."""

    # its tensors are small: a batch mixing deltas applies each row's own (deltatune.methods.state.mixed_rows)
    batch_mixing = "per-row"
    position_wise = True

    # biases move the model little per unit step: the paper tunes 1e-4..1e-3; 1e-3 suits small encoders
    default_learning_rate = 1e-3
    # `lr_search: auto`: the paper's 1e-4..1e-3 and one step above; on the whole STS-B set MiniLM-L6's search
    # chose 5e-4, then the lowest candidate, and 1e-2 never survived a rung
    learning_rate_candidates = (2e-4, 5e-4, 1e-3, 3e-3)

    def trainable_names(self, model: nn.Module) -> set[str]:
        names = {n for n in base_parameters(model) if is_bias(n)}
        return names | head_names(model) if self.config.train_head else names
