"""DoRA: weight-decomposed low-rank adaptation (Liu, Wang, Yin, Molchanov, Wang, Cheng & Chen 2024,
arXiv:2402.09353).

Each chosen weight is split into a magnitude (one number per output feature) and a direction; the
direction gets a LoRA update and the magnitude trains on its own:

    W' = m ⊙ (W + s · B A) / ‖W + s · B A‖,    h = W' x + b,    s = alpha / r  (alpha / √r with rsLoRA)

where ‖·‖ is the norm of each output feature's row of weights (the paper's column norm, written
for W x). m starts at ‖W‖ and B at zero, so W' = W before training. As the paper suggests (its
section 4.3) and PEFT does, the norm is treated as a constant in the backward pass: it follows the
update in the forward pass but passes no gradient, which saves the memory of its graph. The layer
runs W x once and rescales it, h = (m/‖·‖) ⊙ (W x + s · B A x) + b, which is how PEFT computes it, so
outputs equal PEFT's `LoraConfig(use_dora=True)` at equal weights.

Parameter cost: r · (d_in + d_out) + d_out per adapted layer, LoRA's plus one magnitude per output
feature: with the defaults (r=8 on query and value) 2 · (8 · 768 + 384) = 13,056 per layer on
MiniLM-L6 and 8 · 1152 + 576 + 8 · 768 + 192 = 16,128 per layer on SmolLM2-135M, plus the head.
`use_rslora` and `loraplus_lr_ratio` work as for LoRA (see `deltatune.methods.lora`).

W' is a weight like W, so it folds into the base weight (`merge`); unmerging divides the magnitude
back out with the norm kept at merge time (rows whose magnitude is about zero are kept aside, as
they could not be divided back). A DoRA delta exports to PEFT's format (`deltatune export --format
peft`), where it loads as `LoraConfig(use_dora=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.methods._linear_targets import WrappedLinear
from deltatune.methods._lora_variants import LoRAVariant
from deltatune.methods.base import PeftAdapter
from deltatune.methods.lora import LoRAConfig, LoRAUpdate
from deltatune.methods.registry import register

# Below this magnitude a row could not be divided back out after merging; it is kept aside instead.
_UNDIVIDABLE = 1e-12


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """LoRA's options (r, alpha, dropout, targets, use_rslora, loraplus_lr_ratio): DoRA adds none."""


class DoRAUpdate(LoRAUpdate):
    """One delta's low-rank direction update B·A and magnitude vector m of one layer."""

    def __init__(self, layer: WrappedLinear[Any], r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__(layer, r, alpha, dropout, rslora)
        with torch.no_grad():
            self.magnitude = nn.Parameter(
                row_norms(layer.weight, self.delta_weight(layer.weight.dtype)).to(layer.weight.dtype)
            )

    def factor(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + s·B·A‖ per output feature, the norm detached (DoRA's section 4.3)."""
        return self.magnitude / row_norms(weight, self.delta_weight(weight.dtype).detach()).detach()


def row_norms(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """‖W + update‖ over each output feature's row, summed in float32 even when W is stored in bf16
    (training at --precision auto), so the norm is as exact as the magnitude it divides."""
    return torch.linalg.norm(weight.float() + update.float(), dim=1)


class DoRALinear(WrappedLinear[DoRAUpdate]):
    """An nn.Linear (kept as `base_layer`, frozen) whose weight each delta re-decomposes; the active one runs."""

    def __init__(self, base_layer: nn.Linear | WrappedLinear[Any]) -> None:
        super().__init__(base_layer)
        self._kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        update = self.active_part()
        if update is None or self.merged_delta is not None:
            return result
        bias = self.base_layer.bias
        linear = result - bias if bias is not None else result  # W x (and what an inner site adds)
        factor = update.factor(self.base_layer.weight)
        branch_input = x if update.dropout is None else update.dropout(x)
        low_rank = branch_input @ update.lora_A.t() @ update.lora_B.t()
        return result + (factor - 1) * linear + factor * low_rank * update.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged_delta is not None or self.active_delta is None:
            return
        update = self.part_of(self.active_delta)
        weight = self.base_layer.weight
        delta = update.delta_weight(weight.dtype)
        norms = row_norms(weight, delta)
        small = (update.magnitude.abs() < _UNDIVIDABLE).nonzero().flatten()
        self._kept = (norms, small, weight[small].clone())
        weight.add_(delta).mul_((update.magnitude / norms).to(weight.dtype)[:, None])
        self.merged_delta = self.active_delta

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_delta is None:
            return
        update = self.part_of(self.merged_delta)
        weight = self.base_layer.weight
        assert self._kept is not None  # `merge` kept them when it set merged_delta
        norms, small, kept = self._kept
        magnitude = torch.where(
            update.magnitude.abs() < _UNDIVIDABLE, torch.ones_like(update.magnitude), update.magnitude
        )
        weight.mul_((norms / magnitude).to(weight.dtype)[:, None]).sub_(update.delta_weight(weight.dtype))
        weight[small] = kept
        self._kept = None
        self.merged_delta = None


@register("dora", DoRAConfig)
class DoRA(LoRAVariant):
    """DoRA: LoRA on the direction of each weight plus a trained magnitude per output feature."""

    _site_class = DoRALinear
    _update_class = DoRAUpdate

    def export_peft(self, tensors: dict[str, torch.Tensor]) -> PeftAdapter:
        """PEFT's LoRA with use_dora: LoRA's names, and 'X.magnitude' -> 'X.lora_magnitude_vector'."""
        adapter = super().export_peft(tensors)
        magnitudes = {name: tensor for name, tensor in adapter.rest.items() if name.endswith(".magnitude")}
        renamed = {
            **adapter.tensors,
            **{
                f"{name.removesuffix('.magnitude')}.lora_magnitude_vector": tensor
                for name, tensor in magnitudes.items()
            },
        }
        rest = {name: tensor for name, tensor in adapter.rest.items() if name not in magnitudes}
        return PeftAdapter({**adapter.config, "use_dora": True}, renamed, rest)
