"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations
(Liu, Tam, Muqeeth, Mohta, Huang, Bansal & Raffel 2022, arXiv:2205.05638).

Three learned vectors per layer rescale, element-wise, the attention keys and values and the
feed-forward block's inner activation:

    k = l_k ⊙ (W_k x),   v = l_v ⊙ (W_v x),   ffn(x) = W_down (l_ff ⊙ act(W_up x))

All vectors start at one, so the model is unchanged before training. Scaling a layer's output is
scaling the rows (and bias) of its weight, and scaling the down-projection's input is scaling its
columns, so the vectors fold into the weights exactly (`merge`) and out again (`unmerge`). Each
layer holds one scale per named delta (`IA3Linear.deltas[name]`); the active delta's applies, or, in a
batch mixing deltas row by row, each row's own (gathered per row).

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
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods._linear_targets import WrappedLinear, select_layers, target_problems, wrap_layers
from deltatune.methods.base import Method, PeftAdapter
from deltatune.methods.common import head_names
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, RowRouting, merge_sites, own_parameter_names

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


class IA3Scale(nn.Module):
    """One delta's learned scale of one layer's output or input, named by the side it scales."""

    def __init__(self, layer: WrappedLinear[Any], scale_input: bool) -> None:
        super().__init__()
        self.scale_input = scale_input
        size = layer.in_features if scale_input else layer.out_features
        weight = layer.weight
        scale = nn.Parameter(torch.ones(size, dtype=weight.dtype, device=weight.device))
        # the name says which side is scaled, so the delta file alone tells how to apply it
        if scale_input:
            self.input_scale = scale
        else:
            self.output_scale = scale

    @property
    def scale(self) -> nn.Parameter:
        return self.input_scale if self.scale_input else self.output_scale

    def extra_repr(self) -> str:
        return f"scales={'input' if self.scale_input else 'output'}"


class IA3Linear(WrappedLinear[IA3Scale]):
    """An nn.Linear (kept as `base_layer`, frozen, not copied) with each delta's learned scale on its output
    or input; the active delta's scale applies."""

    def __init__(self, base_layer: nn.Linear | WrappedLinear[Any]) -> None:
        super().__init__(base_layer)
        self._kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def scale_input(self) -> bool:
        return self._active_scale().scale_input

    @property
    def scale(self) -> nn.Parameter:
        return self._active_scale().scale

    def _active_scale(self) -> IA3Scale:
        return self.required_part("(IA)³")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_routing is not None:
            return self._forward_rows(x, self.row_routing)
        part = self.active_part()
        if part is None or self.merged_delta is not None:
            return self.base_layer(x)
        if part.scale_input:
            return self.base_layer(x * part.scale)
        return self.base_layer(x) * part.scale

    def _forward_rows(self, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """A mixed batch: each row scaled by its own delta's vector (ones for rows without a scale here)."""
        segments = routing.contiguous()
        if segments is not None:  # a batch sorted by delta: each delta's scale on its own slice
            # (scales the input?, the scale in the activations' dtype) per routed delta, cast once
            parts = routing.per_delta(
                self,
                f"parts {x.dtype}",
                lambda name: None if (part := self.part(name)) is None else (part.scale_input, part.scale.to(x.dtype)),
            )
            scaled = [(*parts[group], start, end) for group, start, end in segments if parts[group] is not None]
            if any(scale_input for scale_input, *_ in scaled):
                x = x.clone()
                for scale_input, scale, start, end in scaled:
                    if scale_input:
                        x[start:end] *= scale
            result = self.base_layer(x)
            for scale_input, scale, start, end in scaled:
                if not scale_input:
                    result[start:end] *= scale.to(result.dtype)
            return result
        input_scales, output_scales = routing.stacked(self, lambda: self._stack_rows(routing))
        if input_scales is not None:
            x = x * _per_row(input_scales[routing.index], x.ndim)
        result = self.base_layer(x)
        if output_scales is not None:
            result = result * _per_row(output_scales[routing.index], result.ndim)
        return result

    @torch.no_grad()
    def _stack_rows(self, routing: RowRouting) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every routed delta's input and output scales as (groups, width) stacks, or None for a side none scales."""
        parts = self.row_parts(routing)
        stacks: list[torch.Tensor | None] = []
        for scale_input, width in ((True, self.in_features), (False, self.out_features)):
            chosen = [
                (group, part)
                for group, part in enumerate(parts)
                if part is not None and part.scale_input == scale_input
            ]
            if not chosen:
                stacks.append(None)
                continue
            stack = chosen[0][1].scale.new_ones(len(parts), width)
            for group, part in chosen:
                stack[group] = part.scale
            stacks.append(stack)
        return stacks[0], stacks[1]

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged_delta is not None or self.active_delta is None:
            return
        part = self._active_scale()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        scale = part.scale.to(weight.dtype)
        small = (scale.abs() < _UNDIVIDABLE).nonzero().flatten()
        if part.scale_input:  # W (s ⊙ x) = (W diag(s)) x: scale the columns; the bias is untouched
            self._kept = (small, weight[:, small].clone(), None) if len(small) else None
            weight.mul_(scale)
        else:  # s ⊙ (W x + b) = (diag(s) W) x + s ⊙ b: scale the rows and the bias
            if len(small):
                self._kept = (small, weight[small].clone(), bias[small].clone() if bias is not None else None)
            weight.mul_(scale[:, None])
            if bias is not None:
                bias.mul_(scale)
        self.merged_delta = self.active_delta

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_delta is None:
            return
        part = self.part_of(self.merged_delta)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        # a zero scale leaves nothing to divide: divide by one there and restore the kept originals
        scale = part.scale.to(weight.dtype)
        scale = torch.where(scale.abs() < _UNDIVIDABLE, torch.ones_like(scale), scale)
        if part.scale_input:
            weight.div_(scale)
        else:
            weight.div_(scale[:, None])
            if bias is not None:
                bias.div_(scale)
        if self._kept is not None:
            indices, kept_weight, kept_bias = self._kept
            if part.scale_input:
                weight[:, indices] = kept_weight
            else:
                weight[indices] = kept_weight
                if kept_bias is not None and bias is not None:
                    bias[indices] = kept_bias
            self._kept = None
        self.merged_delta = None


def _per_row(scales: torch.Tensor, ndim: int) -> torch.Tensor:
    """(rows, width) scales shaped to broadcast over a (rows, ..., width) activation."""
    return scales.view(scales.shape[0], *([1] * (ndim - 2)), scales.shape[-1])


@register("ia3", IA3Config)
class IA3(Method):
    """(IA)³: learned vectors rescale attention keys, values and the feed-forward inner activation."""

    batch_mixing = "per-row"
    position_wise = True

    # a multiplicative scale around 1 moves the model slowly per unit step and has few parameters
    # to overfit with: the paper trains it with 3e-3 (T-Few recipe, Adafactor)
    default_learning_rate = 3e-3
    # `lr_search: auto`: around the paper's rate
    learning_rate_candidates = (1e-3, 3e-3, 1e-2, 3e-2)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        scaled_output = select_layers(model, "method.targets", self.config.targets, DEFAULT_TARGETS)
        scaled_input = []
        if self.config.feedforward_targets:
            scaled_input = select_layers(
                model, "method.feedforward_targets", self.config.feedforward_targets, DEFAULT_FEEDFORWARD_TARGETS
            )
        both = sorted(set(scaled_output) & set(scaled_input))
        if both:
            raise DeltatuneError(
                f"method.targets={self.config.targets!r} and method.feedforward_targets="
                f"{self.config.feedforward_targets!r} both match {both[:3]!r}: a layer gets either an output "
                "scale (targets) or an input scale (feedforward_targets), not both. Narrow one of them."
            )
        super().apply(model, name)
        for names, scale_input in ((scaled_output, False), (scaled_input, True)):
            for layer in wrap_layers(model, names, IA3Linear, IA3Linear):
                layer.add_part(model, name, IA3Scale(layer, scale_input), "(IA)³")

    def trainable_names(self, model: nn.Module) -> set[str]:
        return own_parameter_names(model, self._applied_name()) | head_names(model)

    def merge(self, model: nn.Module) -> None:
        """Fold every scale into its base weight (rows and bias, or columns): outputs stay the same."""
        merge_sites(model, self, IA3Linear, merge=True)

    def unmerge(self, model: nn.Module) -> None:
        """Divide every scale back out of its base weight (undoes `merge` up to float rounding)."""
        merge_sites(model, self, IA3Linear, merge=False)

    def export_peft(self, tensors: dict[str, torch.Tensor]) -> PeftAdapter:
        """PEFT's IA3: one 'ia3_l' per layer, (out, 1) for an output scale and (1, in) for an input scale."""
        renamed, rest, targets, feedforward = {}, {}, set(), set()
        for name, tensor in tensors.items():
            module, _, leaf = name.rpartition(".")
            if leaf in ("output_scale", "input_scale"):
                scale_input = leaf == "input_scale"
                renamed[f"{module}.ia3_l"] = tensor.reshape(1, -1) if scale_input else tensor.reshape(-1, 1)
                targets.add(module)
                if scale_input:
                    feedforward.add(module)
            else:
                rest[name] = tensor
        config = {
            "peft_type": "IA3",
            "target_modules": sorted(targets),
            "feedforward_modules": sorted(feedforward),
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }
        return PeftAdapter(config, renamed, rest)
