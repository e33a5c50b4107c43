"""Parallel adapters (He, Zhou, Ma, Berg-Kirkpatrick & Neubig 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning", arXiv:2110.04366).

A bottleneck beside each layer's feed-forward block rather than after it: it reads the FFN's input
and its scaled output is added to the FFN's output,

    ffn'(x) = ffn(x) + s · (W_up · act(W_down · x + b_down) + b_up),     s = `scaling` (4 in the paper)

which the paper found the best placement and form of the adapter (its section 4.2; the FFN site
beats the attention site at equal cost). Where it sits: BERT (post-LN) adds it to the FFN output
before the residual add and LayerNorm of `layer.N.output` (the branch reads `attention_output`,
the FFN's input); Llama (pre-norm) adds it to `mlp`'s output, reading `mlp`'s (normalised) input.
W_up and b_up start at zero, so the model is unchanged before training.

Parameter cost: 2 · d · m + d + m per layer, plus the head. The default width is the paper's and
AdapterHub's `ParBnConfig` (reduction factor 2, m = d / 2): 6 · 148,032 = 888,192 on MiniLM-L6
(3.9%) and 30 · 332,640 on SmolLM2-135M (7.4%); a smaller `reduction_factor` trades quality for size.
AdapterHub's `adapters` 1.3 requires transformers 4.57, so the tests pin this method to the formula.
Non-linear: no merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.adapters import (
    BERT_SITES,
    Activation,
    BottleneckAdapter,
    _Adapters,
    bottleneck_size,
    transformer_layers,
    validate_adapter_config,
)
from deltatune.methods.base import Method
from deltatune.methods.common import text_config
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, DeltaSite, site_at


@dataclass(frozen=True)
class ParallelAdapterConfig:
    bottleneck_size: int | None = None
    """Adapter width m. Give this or reduction_factor, not both; with neither, reduction_factor 2 is used."""
    reduction_factor: float | None = None
    """m = hidden size / reduction_factor (rounded, at least 1); the paper's best used 2. Give this or bottleneck_size."""
    activation: Activation = "relu"
    """Non-linearity inside the bottleneck: relu (the paper's), gelu, tanh or swish."""
    scaling: float = 4.0
    """s, the factor on the adapter's output (the paper found 4 better than 1 for parallel adapters)."""
    train_layernorm: bool = False
    """Also train every LayerNorm/RMSNorm of the backbone."""
    up_projection_init_std: float = 0.0
    """Std of the up-projection's normal init. 0 makes the model exactly unchanged at step 0."""

    def __post_init__(self) -> None:
        parallel_adapter_problems(self, "parallel-adapter", default_reduction=2.0, raise_them=True)


def parallel_adapter_problems(config, name: str, default_reduction: float, raise_them: bool = False) -> list[str]:
    """Problems with a config's parallel-adapter fields (the defaults filled in when there are none)."""
    problems = []
    if not config.scaling > 0:
        problems.append(f"method.scaling={config.scaling} must be positive (4 is the paper's)")
    try:
        validate_adapter_config(config, name, default_reduction=default_reduction)
    except DeltatuneError as error:
        problems.append(str(error))
    if problems and raise_them:
        raise DeltatuneError("; ".join(problems))
    return problems


class ParallelAdapter(BottleneckAdapter):
    """s · up(act(down(x))): the branch alone, added to the FFN's output by the hook."""

    def __init__(
        self, hidden_size: int, bottleneck_size: int, activation: str, up_init_std: float, scaling: float
    ) -> None:
        super().__init__(hidden_size, bottleneck_size, activation, up_init_std)
        self.scaling = scaling

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.up(self.activation(self.down(hidden_states)))

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}"


class ParallelAdapterSite(DeltaSite[ParallelAdapter]):
    """Each delta's parallel adapter at one FFN (registered as `<ffn>.parallel_adapter`); the active one runs."""


def _add_beside_bert_output(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook on BERT's `output` (dense, dropout, LayerNorm(h + input_tensor)): the branch's
    output joins input_tensor, so it is added to the FFN's output before the residual's LayerNorm."""
    adapter = site_at(module, "parallel_adapter", ParallelAdapterSite).active_part()
    if adapter is None:
        return None
    hidden_states, input_tensor = args
    return hidden_states, input_tensor + adapter(input_tensor)


def _add_beside_mlp(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on Llama's `mlp`: add the branch, which reads the MLP's input."""
    adapter = site_at(module, "parallel_adapter", ParallelAdapterSite).active_part()
    return output if adapter is None else output + adapter(args[0])


def add_parallel_adapters(model: nn.Module, name: str, config, method_name: str) -> None:
    """A parallel adapter beside every layer's FFN, as delta `name`'s part of each site."""
    layers, layout = transformer_layers(model)
    hidden_size = text_config(model).hidden_size
    size = bottleneck_size(config, hidden_size)
    reference = next(model.parameters())
    parent_name = layout["ffn"][0]
    for layer in layers:
        parent = layer.get_submodule(parent_name)
        site = getattr(parent, "parallel_adapter", None)
        if not isinstance(site, ParallelAdapterSite):
            parent.parallel_adapter = site = ParallelAdapterSite()
            if layout is BERT_SITES:
                parent.register_forward_pre_hook(_add_beside_bert_output)
            else:
                parent.register_forward_hook(_add_beside_mlp)
        adapter = ParallelAdapter(hidden_size, size, config.activation, config.up_projection_init_std, config.scaling)
        site.add_part(model, name, adapter.to(device=reference.device, dtype=reference.dtype), method_name)


@register("parallel-adapter", ParallelAdapterConfig)
class ParallelAdapterMethod(_Adapters):
    """Parallel adapter: a scaled bottleneck beside each layer's feed-forward block (He et al. 2022)."""

    batch_mixing = "grouped"  # its site has no per-row gather

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        transformer_layers(model)  # fails, naming the model, before anything is registered
        Method.apply(self, model, name)
        add_parallel_adapters(model, name, self.config, self.name)
