"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort & Asano 2024, arXiv:2310.11454).

One pair of random matrices A ∈ R^{r × d_in}, B ∈ R^{d_out × r} is drawn once and shared, frozen, by
every adapted layer; each layer trains only two scaling vectors:

    h = W x + b + Λ_b B Λ_d A x,    Λ_b = diag(λ_b), λ_b ∈ R^{d_out} (starts at 0),
                                    Λ_d = diag(λ_d), λ_d ∈ R^r (starts at d_initial, 0.1)

so the model is unchanged before training. A and B are drawn Kaiming-uniform from a CPU generator
seeded with `projection_seed` (bound √(6 / fan_in)), at the widest input and output of the adapted layers, and each
layer uses their top-left block (A[:, :d_in], B[:d_out, :]): exactly PEFT's `VeraConfig`
(`projection_prng_key`), so outputs equal PEFT's at equal seed and vectors. The matrices are not
saved: loading a delta draws them again from the seed in its config, which gives the same numbers
bit for bit (the tests pin the first values torch's generator gives, so a change would be seen).

Parameter cost: d_out + r per adapted layer. With the defaults (r=256 on query and value):
2 · (384 + 256) = 1,280 per layer on MiniLM-L6 and (576 + 256) + (192 + 256) = 1,280 per layer on
SmolLM2-135M, plus the head. Λ_b B Λ_d A is a matrix of W's shape, so it folds into W (`merge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods._linear_targets import (
    AddedUpdateLinear,
    WeightUpdate,
    WrappedLinear,
    select_layers,
    target_problems,
    wrap_layers,
)
from deltatune.methods.base import Method
from deltatune.methods.common import head_names
from deltatune.methods.lora import DEFAULT_TARGETS
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, DeltaSite, merge_sites, own_parameter_names


@dataclass(frozen=True)
class VeRAConfig:
    r: int = 256
    """Rank of the shared random matrices. They are frozen, so a large r costs no trainable parameters
    beyond r per layer (the paper and PEFT use 256)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Linear layers that get an update; same rules as LoRA's targets (query and value by default)."""
    projection_seed: int = 0
    """Seed of the generator the shared matrices are drawn from (PEFT's projection_prng_key)."""
    d_initial: float = 0.1
    """Starting value of every entry of λ_d (the paper found small values such as 0.1 train best)."""
    dropout: float = 0.0
    """Dropout on the input of the update only. 0 skips it."""

    def __post_init__(self) -> None:
        problems = []
        if self.r < 1:
            problems.append(f"method.r={self.r} must be at least 1 (256 is typical)")
        if not 0 <= self.dropout < 1:
            problems.append(f"method.dropout={self.dropout} must be in [0, 1) (0 disables it)")
        if not math.isfinite(self.d_initial):
            problems.append(f"method.d_initial={self.d_initial} must be a finite number (e.g. 0.1)")
        problems += target_problems("method.targets", self.targets)
        if problems:
            raise DeltatuneError("; ".join(problems))


def draw_projections(r: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen A (r × in) and B (out × r), drawn from a CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # He's uniform init (gain √2, bound √(6 / fan_in)), as the paper and PEFT draw them
    projection_A = nn.init.kaiming_uniform_(torch.empty(r, in_features), generator=generator)
    projection_B = nn.init.kaiming_uniform_(torch.empty(out_features, r), generator=generator)
    return projection_A, projection_B


class Projections(nn.Module):
    """One delta's shared random matrices, as buffers (frozen, never saved: drawn from the seed)."""

    projection_A: torch.Tensor
    projection_B: torch.Tensor

    def __init__(self, projection_A: torch.Tensor, projection_B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("projection_A", projection_A, persistent=False)
        self.register_buffer("projection_B", projection_B, persistent=False)


class ProjectionSite(DeltaSite[Projections]):
    """Each delta's shared matrices (registered once per model as `<backbone>.vera_projections`)."""


class VeRAScales(WeightUpdate):
    """One delta's trained vectors λ_b and λ_d of one layer, and where its shared matrices are."""

    _projections: Projections

    def __init__(self, layer: WrappedLinear[Any], projections: Projections, d_initial: float, dropout: float) -> None:
        super().__init__()
        weight = layer.weight
        r = projections.projection_A.shape[0]
        self.lambda_b = nn.Parameter(torch.zeros(layer.out_features, dtype=weight.dtype, device=weight.device))
        self.lambda_d = nn.Parameter(torch.full((r,), d_initial, dtype=weight.dtype, device=weight.device))
        # a reference, not a submodule: the matrices are registered once, at the projection site
        object.__setattr__(self, "_projections", projections)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's block of the shared A and B."""
        projections = self._projections
        return (projections.projection_A[:, : self.in_features], projections.projection_B[: self.out_features])

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Λ_b B Λ_d A in W's shape, in `dtype`."""
        projection_A, projection_B = self.matrices()
        return ((self.lambda_b[:, None] * projection_B) @ (self.lambda_d[:, None] * projection_A)).to(dtype)


class VeRALinear(AddedUpdateLinear[VeRAScales]):
    """An nn.Linear (kept as `base_layer`, frozen, not copied) plus each delta's Λ_b B Λ_d A x."""

    def added(self, part: VeRAScales, x: torch.Tensor) -> torch.Tensor:
        projection_A, projection_B = part.matrices()
        branch_input = x if part.dropout is None else part.dropout(x)
        down = part.lambda_d * F.linear(branch_input, projection_A.to(x.dtype))
        return part.lambda_b * F.linear(down, projection_B.to(x.dtype))


@register("vera", VeRAConfig)
class VeRA(Method):
    """VeRA: shared frozen random matrices, and two trained scaling vectors per adapted layer."""

    # only vectors train, few of them, each scaling a whole frozen projection: they need a much larger
    # step than LoRA's matrices (the paper trains them at rates of the order of 1e-2)
    default_learning_rate = 1e-2

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        names = select_layers(model, "method.targets", self.config.targets, DEFAULT_TARGETS)
        super().apply(model, name)
        layers = wrap_layers(model, names, VeRALinear, VeRALinear)
        reference = layers[0].weight
        projection_A, projection_B = draw_projections(
            self.config.r,
            max(layer.in_features for layer in layers),
            max(layer.out_features for layer in layers),
            self.config.projection_seed,
        )
        projections = Projections(
            projection_A.to(device=reference.device, dtype=reference.dtype),
            projection_B.to(device=reference.device, dtype=reference.dtype),
        )
        backbone = getattr(model, "base_model", model)
        site = getattr(backbone, "vera_projections", None)
        if not isinstance(site, ProjectionSite):
            backbone.vera_projections = site = ProjectionSite()
        site.add_part(model, name, projections, "VeRA")
        for layer in layers:
            layer.add_part(
                model, name, VeRAScales(layer, projections, self.config.d_initial, self.config.dropout), "VeRA"
            )

    def trainable_names(self, model: nn.Module) -> set[str]:
        return own_parameter_names(model, self._applied_name()) | head_names(model)

    def merge(self, model: nn.Module) -> None:
        """Fold every Λ_b B Λ_d A into its base weight: outputs stay the same."""
        merge_sites(model, self, VeRALinear, merge=True)

    def unmerge(self, model: nn.Module) -> None:
        """Take every Λ_b B Λ_d A back out of its base weight (undoes `merge` up to float rounding)."""
        merge_sites(model, self, VeRALinear, merge=False)
