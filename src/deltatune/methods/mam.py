"""The mix-and-match (MAM) adapter (He, Zhou, Ma, Berg-Kirkpatrick & Neubig 2022, "Towards a Unified
View of Parameter-Efficient Transfer Learning", arXiv:2110.04366).

The paper's best combination: prefix tuning on every attention layer and a scaled parallel
adapter beside every feed-forward block,

    head_i = softmax(q_i [P_K; K_i]ᵀ / √d_h) [P_V; V_i]           (prefix tuning, L prefixes per layer)
    ffn'(x) = ffn(x) + s · (W_up · act(W_down · x + b_down) + b_up)  (parallel adapter, s = 4)

with both parts exactly as deltatune's `prefix-tuning` and `parallel-adapter` (see those modules
for where they sit). The defaults are the paper's: 30 prefixes produced during training by an MLP
of width 800 (as AdapterHub's `MAMConfig`; the delta stores only the prefixes), and a parallel
adapter of reduction factor 2 (m = d / 2) with s = 4. The prefixes do not start at the identity
(they are attended to from the first step); the adapter's up-projection starts at zero.

Parameter cost: num_layers · (2 · L · d_kv + 2 · d · m + d + m) stored, plus the head:
6 · (23,040 + 148,032) = 1,026,432 on MiniLM-L6 (4.5%) and 30 · (11,520 + 332,640) on SmolLM2-135M;
while training, the reparameterisation MLP adds L · d_kv + d_kv · 800 + 800 + 800 · (num_layers ·
2 · d_kv + 1) more. AdapterHub's `adapters` 1.3 requires transformers 4.57, so the tests pin
MAM to the formula (the prefix half is prefix tuning, itself pinned against PEFT). No merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.adapters import Activation
from deltatune.methods.parallel_adapter import ParallelAdapterSite, add_parallel_adapters, parallel_adapter_problems
from deltatune.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from deltatune.methods.registry import register
from deltatune.methods.state import (
    DEFAULT_DELTA,
    TensorSpec,
    check_delta_tensors,
    parameter_index,
    read_delta_tensors,
    sites_of,
    write_delta_tensors,
)


@dataclass(frozen=True)
class MAMConfig(PrefixTuningConfig):
    num_virtual_tokens: int = 30
    """Prefix length L per attention layer (the paper's MAM uses 30)."""
    reparameterize: bool = True
    """Produce the prefixes with an MLP during training (the paper's and AdapterHub's MAM); the delta
    stores only the prefixes."""
    mlp_hidden_size: int = 800
    """Hidden width of the reparameterisation MLP (AdapterHub's MAM uses 800)."""
    bottleneck_size: int | None = None
    """Parallel adapter width m. Give this or reduction_factor, not both; with neither, reduction_factor 2."""
    reduction_factor: float | None = None
    """m = hidden size / reduction_factor (rounded, at least 1). Give this or bottleneck_size."""
    activation: Activation = "relu"
    """Non-linearity inside the parallel adapter."""
    scaling: float = 4.0
    """s, the factor on the parallel adapter's output."""
    up_projection_init_std: float = 0.0
    """Std of the parallel adapter's up-projection init. 0: the adapter adds nothing at step 0."""

    def __post_init__(self) -> None:
        problems = []
        try:
            PrefixTuningConfig.__post_init__(self)
        except DeltatuneError as error:
            problems.append(str(error))
        problems += parallel_adapter_problems(self, "mam", default_reduction=2.0)
        if problems:
            raise DeltatuneError("; ".join(problems))


@register("mam", MAMConfig)
class MAM(PrefixTuning):
    """MAM adapter: prefix tuning on attention plus a scaled parallel adapter beside each FFN (He et al. 2022)."""

    batch_mixing = "grouped"  # the parallel half has no per-row gather

    # both halves train under one rate, which the adapter half bounds: on STS-B (MiniLM-L6, bi-encoder) 3e-3
    # and 9e-3 diverged at the first rung of the search while 1e-3 trained (docs/results/methods-stsb.md)
    default_learning_rate = 1e-3
    learning_rate_candidates = (1e-4, 2e-4, 5e-4, 1e-3)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        super().apply(model, name)
        add_parallel_adapters(model, name, self.config, self.name)

    def _adapter_names(self, model: nn.Module) -> set[str]:
        """Names in the model of this delta's parallel-adapter parameters."""
        name = self._applied_name()
        ids = {
            id(parameter)
            for site in sites_of(model, name, ParallelAdapterSite).values()
            for parameter in site.deltas[name].parameters()
        }
        return {parameter_name for parameter_name, parameter in model.named_parameters() if id(parameter) in ids}

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The head and the prefixes (as prefix tuning stores them), and the parallel adapters."""
        return {
            **super().delta_state(model),
            **read_delta_tensors(model, self._applied_name(), self._adapter_names(model)),
        }

    def load_delta_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        index = parameter_index(model)
        parameters = dict(model.named_parameters())
        expected = {index.canonical[name]: TensorSpec.of(parameters[name]) for name in self._adapter_names(model)}
        adapters = {key: tensor for key, tensor in tensors.items() if key in expected}
        check_delta_tensors(self.name, adapters, expected)
        super().load_delta_state(model, {key: tensor for key, tensor in tensors.items() if key not in expected})
        write_delta_tensors(model, self._applied_name(), adapters)
