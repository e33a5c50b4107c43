"""PiSSA: principal singular values and singular vectors adaptation (Meng, Wang & Zhang 2024,
arXiv:2404.02948).

LoRA's update B·A, started from the weight's principal components instead of from zero. With the
SVD W = U S Vᵀ and s = alpha / r (alpha / √r with rsLoRA):

    A₀ = √(S_r / s) V_rᵀ,   B₀ = U_r √(S_r / s),   so that s · B₀ A₀ = U_r S_r V_rᵀ (W's best rank-r part)
    h = W_res x + s · B A x,   W_res = W − s · B₀ A₀,   (A, B) trained from (A₀, B₀)

so the output is unchanged before training, and training moves the principal part (which PiSSA
finds converges faster than LoRA's zero-started update) while the residual stays frozen. The
initialisation is PEFT's `init_lora_weights="pissa"` (a full SVD in float32), so outputs equal
PEFT's at equal weights.

The base weight W itself is not rewritten: it stays shared by every other delta on the model and
keeps its fingerprint. Each layer computes the same function as h = W x − s · B₀ A₀ x + s · B A x,
with A₀ and B₀ kept frozen beside A and B. The delta stores all four (the trained pair and the
starting pair), so it reloads to the same function on any machine, whatever its SVD routine
returns: twice LoRA's size, as when PEFT converts a PiSSA adapter to load on the original weights.

Parameter cost: r · (d_in + d_out) trained per adapted layer, as LoRA (74,113 with the head on
MiniLM-L6 with the defaults); the delta holds 2 · r · (d_in + d_out) per layer. `use_rslora` and
`loraplus_lr_ratio` work as for LoRA. Merging folds s · (B A − B₀ A₀) into W (`merge`), which puts
the residual back correctly: the merged weight is W_res + s · B A. Exported to PEFT's format, a
PiSSA delta becomes the plain rank-2r LoRA [B, −B₀][A; A₀] on the original weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods._linear_targets import AddedUpdateLinear, WrappedLinear
from deltatune.methods._lora_variants import LoRAVariant
from deltatune.methods.base import PeftAdapter
from deltatune.methods.common import head_names
from deltatune.methods.lora import LoRAConfig, LoRAUpdate
from deltatune.methods.registry import register
from deltatune.methods.state import TensorSpec, own_parameter_names, parameter_index, read_delta_tensors


@dataclass(frozen=True)
class PiSSAConfig(LoRAConfig):
    """LoRA's options (r, alpha, dropout, targets, use_rslora, loraplus_lr_ratio): PiSSA adds none."""


class PiSSAUpdate(LoRAUpdate):
    """One delta's update s·(B A − B₀ A₀) of one layer: A, B train from W's principal part A₀, B₀."""

    def __init__(self, layer: WrappedLinear[Any], r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__(layer, r, alpha, dropout, rslora)
        weight = layer.weight
        with torch.no_grad():
            left, values, right = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
            root = torch.sqrt(values[:r] / self.scaling)
            start_A = (root[:, None] * right[:r]).to(weight.dtype)
            start_B = (left[:, :r] * root).to(weight.dtype)
            self.lora_A.copy_(start_A)
            self.lora_B.copy_(start_B)
        # frozen: they say where A and B started, which the base weight no longer holds
        self.initial_A = nn.Parameter(start_A.clone(), requires_grad=False)
        self.initial_B = nn.Parameter(start_B.clone(), requires_grad=False)

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """s · (B A − B₀ A₀) in W's shape, in `dtype`."""
        return ((self.lora_B @ self.lora_A - self.initial_B @ self.initial_A) * self.scaling).to(dtype)


class PiSSALinear(AddedUpdateLinear[PiSSAUpdate]):
    """An nn.Linear (kept as `base_layer`, frozen, not copied) plus each delta's principal-part update."""

    def added(self, part: PiSSAUpdate, x: torch.Tensor) -> torch.Tensor:
        branch_input = x if part.dropout is None else part.dropout(x)
        trained = F.linear(F.linear(branch_input, part.lora_A), part.lora_B)
        # the starting pair sees the undropped input: it stands for the frozen residual weight
        initial = F.linear(F.linear(x, part.initial_A), part.initial_B)
        return (trained - initial) * part.scaling


@register("pissa", PiSSAConfig)
class PiSSA(LoRAVariant):
    """PiSSA: LoRA started from each weight's principal singular vectors, the residual frozen."""

    _site_class = PiSSALinear
    _update_class = PiSSAUpdate

    def trainable_names(self, model: nn.Module) -> set[str]:
        return {name for name in self._saved_names(model) if not name.endswith((".initial_A", ".initial_B"))}

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors and each layer's starting pair (A₀, B₀)."""
        return read_delta_tensors(model, self._applied_name(), self._saved_names(model))

    def _saved_names(self, model: nn.Module) -> set[str]:
        return own_parameter_names(model, self._applied_name()) | head_names(model)

    def _expected_tensors(self, model: nn.Module) -> dict[str, TensorSpec]:
        index, names = parameter_index(model), self._saved_names(model)
        return {
            index.canonical[name]: TensorSpec.of(parameter)
            for name, parameter in model.named_parameters()
            if name in names
        }

    def export_peft(self, tensors: dict[str, torch.Tensor]) -> PeftAdapter:
        """PEFT's plain LoRA of rank 2r on the original weights: B' = [B, −B₀], A' = [A; A₀], same scale.

        This is how PEFT itself converts a PiSSA adapter to load without the residual weights.
        """
        widened = {}
        for name, tensor in tensors.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "lora_A":
                widened[name] = torch.cat([tensor, tensors[f"{module}.initial_A"]])
            elif leaf == "lora_B":
                widened[name] = torch.cat([tensor, -tensors[f"{module}.initial_B"]], dim=1)
            elif leaf not in ("initial_A", "initial_B"):
                widened[name] = tensor
        adapter = super().export_peft(widened)
        rank = 2 * self.config.r
        scaling = self.config.alpha / (math.sqrt(self.config.r) if self.config.use_rslora else self.config.r)
        return PeftAdapter(
            {**adapter.config, "r": rank, "lora_alpha": scaling * rank, "use_rslora": False},
            adapter.tensors,
            adapter.rest,
        )
