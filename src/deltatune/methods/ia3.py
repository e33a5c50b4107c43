"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations
(Liu, Tam, Muqeeth, Mohta, Huang, Bansal & Raffel 2022, arXiv:2205.05638).

Three learned vectors per layer rescale, element-wise, the attention keys and values and the
feed-forward block's inner activation:

    k = l_k ⊙ (W_k x),   v = l_v ⊙ (W_v x),   ffn(x) = W_down (l_ff ⊙ act(W_up x))

All vectors start at one, so the model is unchanged before training. Scaling a layer's output is
scaling the rows (and bias) of its weight, and scaling the down-projection's input is scaling its
columns, so the vectors fold into the weights exactly (`merge`) and out again (`unmerge`).

Parameter cost: d_k + d_v + d_ff per layer: 384 + 384 + 1536 = 2,304 per layer on MiniLM-L6
(0.06% of the model) and 192 + 192 + 1536 = 1,920 per layer on SmolLM2-135M (0.04%; its keys and
values are narrower than the hidden size because 9 query heads share 3 key/value heads).

Same semantics as PEFT's IA3: `targets` are layers whose *output* is scaled, `feedforward_targets`
layers whose *input* is scaled. Unlike PEFT's BERT default ('output.dense', which also catches the
attention block's output projection), the default here scales only the feed-forward block's
down-projection input, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods._linear_targets import select_layers, target_problems
from deltatune.methods.common import head_names
from deltatune.methods.registry import register

# keys and values as BERT-family and Llama-family models name them
DEFAULT_TARGETS = ("key", "value", "k_proj", "v_proj")
# the FFN down-projection: BERT's `layer.N.output.dense` (a regex, because a plain 'output.dense'
# would also match `layer.N.attention.output.dense`) and Llama's `down_proj`
DEFAULT_FEEDFORWARD_TARGETS = (r"re:.*\.layer\.\d+\.output\.dense", "down_proj")

# Below this magnitude a scale factor could have wiped out the weights it multiplied when merged
# (zero, or underflow), so merging keeps the original slices to restore them exactly on unmerge.
_UNDIVIDABLE = 1e-12


@dataclass(frozen=True)
class IA3Config:
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Linear layers whose output is rescaled (the paper's keys and values). A plain name matches modules
    whose dotted name ends with it; a target starting with 're:' or containing a regex character
    (* + ? [ ] ( ) { } | ^ $ \\) is a regex that must fully match the dotted name. Each target must match
    some layer, except in the default, which lists BERT's and Llama's names as alternatives."""
    feedforward_targets: tuple[str, ...] = DEFAULT_FEEDFORWARD_TARGETS
    """Linear layers whose input is rescaled (the paper's feed-forward inner activation, i.e. the input of the
    FFN down-projection: BERT's layer.N.output.dense, Llama's down_proj). Same matching rules as targets;
    empty to skip the feed-forward vectors."""

    def __post_init__(self) -> None:
        problems = target_problems("method.targets", self.targets)
        if self.feedforward_targets:
            problems += target_problems("method.feedforward_targets", self.feedforward_targets)
        if problems:
            raise DeltatuneError("; ".join(problems))


class IA3Linear(nn.Module):
    """An nn.Linear (kept as `base_layer`, frozen, not copied) with a learned scale on its output or input."""

    def __init__(self, base_layer: nn.Linear, scale_input: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale_input = scale_input
        size = base_layer.in_features if scale_input else base_layer.out_features
        weight = base_layer.weight
        scale = nn.Parameter(torch.ones(size, dtype=weight.dtype, device=weight.device))
        # the name says which side is scaled, so the delta file alone tells how to apply it
        if scale_input:
            self.input_scale = scale
        else:
            self.output_scale = scale
        self.merged = False
        self._kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def scale(self) -> nn.Parameter:
        return self.input_scale if self.scale_input else self.output_scale

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for code that reads `.weight` of what it takes for a Linear."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.scale_input:
            return self.base_layer(x * self.scale)
        return self.base_layer(x) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        scale = self.scale.to(weight.dtype)
        small = (scale.abs() < _UNDIVIDABLE).nonzero().flatten()
        if self.scale_input:  # W (s ⊙ x) = (W diag(s)) x: scale the columns; the bias is untouched
            self._kept = (small, weight[:, small].clone(), None) if len(small) else None
            weight.mul_(scale)
        else:  # s ⊙ (W x + b) = (diag(s) W) x + s ⊙ b: scale the rows and the bias
            if len(small):
                self._kept = (small, weight[small].clone(), bias[small].clone() if bias is not None else None)
            weight.mul_(scale[:, None])
            if bias is not None:
                bias.mul_(scale)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        # a zero scale leaves nothing to divide: divide by one there and restore the kept originals
        scale = self.scale.to(weight.dtype)
        scale = torch.where(scale.abs() < _UNDIVIDABLE, torch.ones_like(scale), scale)
        if self.scale_input:
            weight.div_(scale)
        else:
            weight.div_(scale[:, None])
            if bias is not None:
                bias.div_(scale)
        if self._kept is not None:
            indices, kept_weight, kept_bias = self._kept
            if self.scale_input:
                weight[:, indices] = kept_weight
            else:
                weight[indices] = kept_weight
                if kept_bias is not None:
                    bias[indices] = kept_bias
            self._kept = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"scales={'input' if self.scale_input else 'output'}, merged={self.merged}"


def ia3_modules(model: nn.Module) -> dict[str, IA3Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, IA3Linear)}


@register("ia3", IA3Config)
class IA3:
    """(IA)³: learned vectors rescale attention keys, values and the feed-forward inner activation."""

    # a multiplicative scale around 1 moves the model slowly per unit step and has few parameters
    # to overfit with: the paper trains it with 3e-3 (T-Few recipe, Adafactor)
    default_learning_rate = 3e-3
    # `lr_search: auto`: around the paper's rate
    learning_rate_candidates = (1e-3, 3e-3, 1e-2, 3e-2)

    def __init__(self, config: IA3Config) -> None:
        self.config = config

    def apply(self, model: nn.Module) -> None:
        if ia3_modules(model):
            raise DeltatuneError("(IA)³ is already applied to this model; apply it once, to a freshly loaded model.")
        scaled_output = select_layers(model, "method.targets", self.config.targets, DEFAULT_TARGETS)
        scaled_input = []
        if self.config.feedforward_targets:
            scaled_input = select_layers(model, "method.feedforward_targets", self.config.feedforward_targets,
                                         DEFAULT_FEEDFORWARD_TARGETS)
        both = sorted(set(scaled_output) & set(scaled_input))
        if both:
            raise DeltatuneError(
                f"method.targets={self.config.targets!r} and method.feedforward_targets="
                f"{self.config.feedforward_targets!r} both match {both[:3]!r}: a layer gets either an output "
                "scale (targets) or an input scale (feedforward_targets), not both. Narrow one of them.")
        for names, scale_input in ((scaled_output, False), (scaled_input, True)):
            for name in names:
                parent_name, _, child_name = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, child_name, IA3Linear(getattr(parent, child_name), scale_input))

    def trainable_names(self, model: nn.Module) -> set[str]:
        names = {f"{name}.{'input_scale' if module.scale_input else 'output_scale'}"
                 for name, module in ia3_modules(model).items()}
        return names | head_names(model)

    def merge(self, model: nn.Module) -> None:
        """Fold every scale into its base weight (rows and bias, or columns): outputs stay the same."""
        for module in self._modules_of(model).values():
            module.merge()

    def unmerge(self, model: nn.Module) -> None:
        """Divide every scale back out of its base weight (undoes `merge` up to float rounding)."""
        for module in self._modules_of(model).values():
            module.unmerge()

    @staticmethod
    def _modules_of(model: nn.Module) -> dict[str, IA3Linear]:
        modules = ia3_modules(model)
        if not modules:
            raise DeltatuneError("This model has no (IA)³ layers: apply the method (or load an (IA)³ delta) first.")
        return modules
