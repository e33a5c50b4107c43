"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang, Chen, Bukharin, Karampatziakis,
He, Cheng, Chen & Zhao 2023, arXiv:2303.10512).

Each chosen linear layer gets an update in SVD form, whose rank is pruned during training where it
matters least:

    h = W x + b + s · P Λ Q x,   P ∈ R^{d_out × r}, Λ = diag(λ), λ ∈ R^r, Q ∈ R^{r × d_in},
    s = alpha / (r + 1e-5)  (the paper's code and PEFT divide by the initial rank r)

λ starts at zero (so the model is unchanged before training), P and Q at N(0, 0.02²). Two things
make it more than a LoRA with a diagonal:
- an orthogonality regulariser keeps P and Q near orthonormal, so λ behaves like singular values:
  the loss gains γ · mean over every P and Q of ‖PᵀP − I‖_F (resp. ‖QQᵀ − I‖_F) (`extra_loss`);
- the total rank budget shrinks during training: after every step the importance of each triplet
  (P's column i, λ_i, Q's row i) is S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), with
  s(w) = Ī(w) · Ū(w), Ī an exponential average (β₁) of the sensitivity |w · ∂L/∂w| and Ū an
  exponential average (β₂) of its deviation |I − Ī|; the λ_i of the lowest-scored triplets, over
  all layers together, are set to zero until the number kept meets the budget. The budget goes
  from init_r per layer to target_r per layer on a cubic schedule: kept at init_r for the first
  `initial_fraction` of the steps, then falling, masked every `update_every` steps, and fixed (the
  final pattern kept, no more scoring) for the last `final_fraction` of the steps (`on_step_end`).
These are the paper's algorithm and PEFT's `AdaLoraConfig` (tinit = round(initial_fraction · T),
tfinal = round(final_fraction · T), deltaT = update_every, the step counted from 1), which the
tests pin: equal losses with the regulariser, and the same ranks kept after the same gradients.
The sensitivities need each step's gradients, which the training loop drops right after the
optimizer step; the method keeps a reference to each of its own gradients as it is accumulated.

Parameter cost: init_r · (d_in + d_out + 1) per adapted layer, all stored (pruned triplets are
zeros in λ): with the defaults (init_r=12 on query and value) 2 · 12 · 769 = 18,456 per layer on
MiniLM-L6 and 12 · 1153 + 12 · 769 = 23,064 per layer on SmolLM2-135M, plus the head; the final
ranks are in the run record (`describe`). P Λ Q is a matrix of W's shape, so it folds into W (`merge`).
"""

from __future__ import annotations

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
from deltatune.methods.state import DEFAULT_DELTA, canonical_module_name, merge_sites, own_parameter_names, sites_of


@dataclass(frozen=True)
class AdaLoRAConfig:
    init_r: int = 12
    """Rank of every update at the start (the paper and PEFT start at 1.5 × target_r)."""
    target_r: int = 8
    """Average rank per adapted layer at the end: the budget is target_r × the number of layers."""
    alpha: float = 16.0
    """Scale of the update: P Λ Q is multiplied by alpha / init_r."""
    dropout: float = 0.0
    """Dropout on the input of the update only. 0 skips it."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Linear layers that get an update; same rules as LoRA's targets (query and value by default)."""
    initial_fraction: float = 0.1
    """Fraction of the training steps before any pruning (the paper's t_i)."""
    final_fraction: float = 0.3
    """Fraction of the training steps at the end during which the final ranks are fixed (the paper's t_f)."""
    update_every: int = 1
    """Prune every this many steps while the budget falls (the paper's ΔT)."""
    beta1: float = 0.85
    """Smoothing of the sensitivity's exponential average (β₁)."""
    beta2: float = 0.85
    """Smoothing of the uncertainty's exponential average (β₂)."""
    orth_reg_weight: float = 0.5
    """Weight γ of the orthogonality regulariser added to the loss (PEFT's default; 0 turns it off)."""

    def __post_init__(self) -> None:
        problems = []
        if self.init_r < 1:
            problems.append(f"method.init_r={self.init_r} must be at least 1 (e.g. 12)")
        if not 1 <= self.target_r <= self.init_r:
            problems.append(f"method.target_r={self.target_r} must be between 1 and method.init_r={self.init_r}")
        if not self.alpha > 0:
            problems.append(f"method.alpha={self.alpha} must be positive")
        if not 0 <= self.dropout < 1:
            problems.append(f"method.dropout={self.dropout} must be in [0, 1) (0 disables it)")
        for option in ("initial_fraction", "final_fraction"):
            if not 0 <= getattr(self, option) < 1:
                problems.append(f"method.{option}={getattr(self, option)} must be in [0, 1)")
        if not self.initial_fraction + self.final_fraction < 1:
            problems.append(
                f"method.initial_fraction={self.initial_fraction} and method.final_fraction="
                f"{self.final_fraction} leave no steps to prune in; make their sum less than 1"
            )
        if self.update_every < 1:
            problems.append(f"method.update_every={self.update_every} must be at least 1")
        for option in ("beta1", "beta2"):
            if not 0 <= getattr(self, option) < 1:
                problems.append(f"method.{option}={getattr(self, option)} must be in [0, 1) (0.85 is typical)")
        if not self.orth_reg_weight >= 0:
            problems.append(f"method.orth_reg_weight={self.orth_reg_weight} must be 0 or positive")
        problems += target_problems("method.targets", self.targets)
        if problems:
            raise DeltatuneError("; ".join(problems))


class SVDUpdate(WeightUpdate):
    """One delta's update s · P Λ Q of one layer (lora_B = P, lora_E = λ, lora_A = Q, as PEFT names them)."""

    def __init__(self, layer: WrappedLinear[Any], r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        dtype, device = layer.weight.dtype, layer.weight.device
        self.lora_A = nn.Parameter(torch.randn(r, layer.in_features, dtype=dtype, device=device) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.randn(layer.out_features, r, dtype=dtype, device=device) * 0.02)
        self.scaling = alpha / (r + 1e-5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """s · P Λ Q in W's shape, in `dtype`."""
        return (self.lora_B @ (self.lora_A * self.lora_E[:, None]) * self.scaling).to(dtype)

    def orthogonality(self) -> torch.Tensor:
        """‖QQᵀ − I‖_F + ‖PᵀP − I‖_F."""
        identity = torch.eye(self.lora_E.shape[0], dtype=self.lora_A.dtype, device=self.lora_A.device)
        return torch.linalg.matrix_norm(self.lora_A @ self.lora_A.t() - identity) + torch.linalg.matrix_norm(
            self.lora_B.t() @ self.lora_B - identity
        )


class SVDLinear(AddedUpdateLinear[SVDUpdate]):
    """An nn.Linear (kept as `base_layer`, frozen, not copied) plus each delta's SVD-form update."""

    def added(self, part: SVDUpdate, x: torch.Tensor) -> torch.Tensor:
        branch_input = x if part.dropout is None else part.dropout(x)
        down = F.linear(branch_input, part.lora_A * part.lora_E[:, None])
        return F.linear(down, part.lora_B) * part.scaling


class _GradientTap:
    """Keeps a reference to the last gradient accumulated into each watched parameter."""

    def __init__(self) -> None:
        self.kept: dict[str, torch.Tensor] = {}

    def watch(self, key: str, parameter: nn.Parameter) -> None:
        parameter.register_post_accumulate_grad_hook(lambda tensor: self.kept.__setitem__(key, tensor.grad))


@dataclass
class _Importance:
    """The exponential averages of one parameter's sensitivity (Ī) and uncertainty (Ū)."""

    sensitivity: torch.Tensor
    uncertainty: torch.Tensor

    def update(self, parameter: torch.Tensor, gradient: torch.Tensor, beta1: float, beta2: float) -> None:
        current = (parameter * gradient).abs()
        self.sensitivity.mul_(beta1).add_((1 - beta1) * current)
        self.uncertainty.mul_(beta2).add_((1 - beta2) * (current - self.sensitivity).abs())

    def score(self) -> torch.Tensor:
        return self.sensitivity * self.uncertainty


@register("adalora", AdaLoRAConfig)
class AdaLoRA(Method):
    """AdaLoRA: SVD-form low-rank updates whose total rank is pruned by importance during training."""

    # LoRA's 5e-4 doubled: λ starts at zero and is pruned while it grows, so it has less time to move
    default_learning_rate = 1e-3
    # `lr_search: auto` reaches well above the default: on STS-B (MiniLM-L6, bi-encoder, seed 42) the range
    # 3.3e-4..3e-3 chose its highest (3e-3, dev 0.889), 1e-3..9e-3 its highest again (9e-3, 0.894), and 2.7e-2,
    # one step past, scored dev 0.896 and test 0.858 against 0.849 at 3e-3 (docs/results/methods-stsb.md)
    learning_rate_candidates = (1e-3, 3e-3, 9e-3, 2.7e-2)

    def __init__(self, config: AdaLoRAConfig) -> None:
        super().__init__(config)
        self._tap = _GradientTap()
        self._importance: dict[str, _Importance] = {}
        self._kept_ranks: dict[str, torch.Tensor] | None = None

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        names = select_layers(model, "method.targets", self.config.targets, DEFAULT_TARGETS)
        super().apply(model, name)
        config = self.config
        for layer in wrap_layers(model, names, SVDLinear, SVDLinear):
            update = SVDUpdate(layer, config.init_r, config.alpha, config.dropout)
            layer.add_part(model, name, update, "AdaLoRA")
            site = canonical_module_name(model, layer)
            for leaf, parameter in update.named_parameters():
                self._tap.watch(f"{site}.{leaf}", parameter)

    def trainable_names(self, model: nn.Module) -> set[str]:
        return own_parameter_names(model, self._applied_name()) | head_names(model)

    def _updates(self, model: nn.Module) -> dict[str, SVDUpdate]:
        return {
            site: layer.part_of(self._applied_name())
            for site, layer in sites_of(model, self._applied_name(), SVDLinear).items()
        }

    def extra_loss(self, model: nn.Module) -> torch.Tensor | float:
        """γ · the mean of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F over every P and Q of this delta."""
        if self.config.orth_reg_weight == 0:
            return 0.0
        updates = list(self._updates(model).values())
        total = sum(update.orthogonality() for update in updates)
        return self.config.orth_reg_weight * total / (2 * len(updates))

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Score the triplets with this step's gradients, then prune to the budget (or keep the final pattern)."""
        updates = self._updates(model)
        initial = round(self.config.initial_fraction * total_steps)
        final_start = total_steps - round(self.config.final_fraction * total_steps)
        gradients, self._tap.kept = self._tap.kept, {}
        if step > final_start:
            self._mask(updates, self._kept_ranks)
            return
        if step < final_start:
            self._score(updates, gradients)
        if step <= initial or not self._importance:
            return  # the full budget, or nothing known yet to prune by
        if step == final_start or step % self.config.update_every == 0:
            progress = 1 - (step - initial) / (final_start - initial)
            layers = len(updates)
            budget = int(
                (self.config.init_r - self.config.target_r) * layers * progress**3 + self.config.target_r * layers
            )
            self._kept_ranks = self._prune(updates, budget)
        if step == final_start:
            self._importance.clear()  # the ranks are fixed from here on

    def _score(self, updates: dict[str, SVDUpdate], gradients: dict[str, torch.Tensor]) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for site, update in updates.items():
                for leaf, parameter in update.named_parameters():
                    key = f"{site}.{leaf}"
                    if key not in gradients or gradients[key] is None:
                        continue
                    if key not in self._importance:
                        self._importance[key] = _Importance(torch.zeros_like(parameter), torch.zeros_like(parameter))
                    self._importance[key].update(parameter, gradients[key], beta1, beta2)

    def _triplet_scores(self, updates: dict[str, SVDUpdate]) -> dict[str, torch.Tensor]:
        """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) per layer, for layers with every score known."""
        scores = {}
        for site in updates:
            keys = [f"{site}.{leaf}" for leaf in ("lora_E", "lora_A", "lora_B")]
            if all(key in self._importance for key in keys):
                values, rows, columns = (self._importance[key].score() for key in keys)
                scores[site] = values + rows.mean(dim=1) + columns.mean(dim=0)
        return scores

    def _prune(self, updates: dict[str, SVDUpdate], budget: int) -> dict[str, torch.Tensor] | None:
        """Zero the λ of the lowest-scored triplets over all layers; the kept pattern per layer."""
        scores = self._triplet_scores(updates)
        pruned = sum(len(values) for values in scores.values()) - budget
        if len(scores) < len(updates) or pruned < 1:
            return self._kept_ranks
        threshold = torch.kthvalue(torch.cat(list(scores.values())).float(), pruned).values
        kept = {site: values > threshold for site, values in scores.items()}
        self._mask(updates, kept)
        return kept

    @staticmethod
    def _mask(updates: dict[str, SVDUpdate], kept: dict[str, torch.Tensor] | None) -> None:
        if kept is None:
            return
        with torch.no_grad():
            for site, update in updates.items():
                update.lora_E.masked_fill_(~kept[site], 0.0)

    def describe(self, model: nn.Module) -> dict:
        """The rank each adapted layer kept (non-zero entries of λ) and their total."""
        ranks = {site: int((update.lora_E != 0).sum()) for site, update in self._updates(model).items()}
        return {"ranks": ranks, "total_rank": sum(ranks.values())}

    def merge(self, model: nn.Module) -> None:
        """Fold every s · P Λ Q into its base weight: outputs stay the same."""
        merge_sites(model, self, SVDLinear, merge=True)

    def unmerge(self, model: nn.Module) -> None:
        """Take every s · P Λ Q back out of its base weight (undoes `merge` up to float rounding)."""
        merge_sites(model, self, SVDLinear, merge=False)
