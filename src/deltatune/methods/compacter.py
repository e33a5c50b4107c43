"""Compacter and Compacter++ (Mahabadi, Henderson & Ruder 2021, arXiv:2106.04647): adapters whose
projections are low-rank parameterised hypercomplex multiplication (PHM) layers.

A bottleneck adapter, adapter(x) = x + W_up · act(W_down · x + b_down) + b_up (see
`deltatune.methods.adapters`), with each projection weight built as a sum of Kronecker products:

    W = Σ_{i=1..n} A_i ⊗ B_i,   A_i ∈ R^{n × n},   B_i = s_i t_iᵀ ∈ R^{(k/n) × (d/n)},  s_i, t_i of rank `phm_rank`

for a k × d weight. The "slow" rule matrices A_i are shared by every projection of every adapter
of the delta; the "fast" factors s_i, t_i and the biases belong to each projection. The up-
projection's s_i start at zero (or a tiny normal, `up_projection_init_std`), so each adapter
starts as the identity; the rule starts N(0, 0.01²) and the other factors Glorot-uniform.

    compacter      two adapters per layer, where Houlsby adapters go (after attention, after the FFN)
    compacter-pp   one adapter per layer after the FFN, where Pfeiffer adapters go (the paper's Compacter++)

Parameter cost: per adapter 2 · phm_rank · (d + m) + d + m (for the two projections of a d → m → d
adapter) plus n³ once for the shared rule, plus the head (and the norms with `train_layernorm`).
With the defaults (reduction factor 32, n = 4, rank 1): MiniLM-L6 (d=384, m=12) 1,188 per adapter,
SmolLM2-135M (d=576, m=20: the width is rounded up to a multiple of n) 1,788 per adapter.

AdapterHub's `adapters` 1.3 has these methods (`CompacterConfig`, `CompacterPlusPlusConfig`), but it
requires transformers 4.57 and cannot be installed beside transformers 5, so the tests pin them to
the formula above rather than to its outputs. Like all adapters they are non-linear: no merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.adapters import ACTIVATIONS, Activation, _Adapters, validate_adapter_config
from deltatune.methods.common import text_config
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, DeltaSite

# the rule matrices' starting spread: small, so the first steps do not swing the frozen model's features
_RULE_INIT_STD = 0.01


@dataclass(frozen=True)
class CompacterConfig:
    bottleneck_size: int | None = None
    """Adapter width m (rounded up to a multiple of phm_dim). Give this or reduction_factor, not both;
    with neither, reduction_factor 32 is used (the paper's and AdapterHub's Compacter)."""
    reduction_factor: float | None = None
    """m = hidden size / reduction_factor, rounded up to a multiple of phm_dim. Give this or bottleneck_size."""
    activation: Activation = "gelu"
    """Non-linearity inside the bottleneck: relu, gelu (the paper's), tanh or swish."""
    train_layernorm: bool = False
    """Also train every LayerNorm/RMSNorm of the backbone."""
    phm_dim: int = 4
    """n: the number of Kronecker products summed per weight; the hidden size must be a multiple of it."""
    phm_rank: int = 1
    """Rank of each factor B_i = s_i t_iᵀ (the paper's Compacter uses 1)."""
    up_projection_init_std: float = 0.0
    """Std of the up-projection's s_i normal init. 0 makes each adapter exactly the identity at step 0."""

    def __post_init__(self) -> None:
        problems = []
        if self.phm_dim < 1:
            problems.append(f"method.phm_dim={self.phm_dim} must be at least 1 (4 is typical)")
        if self.phm_rank < 1:
            problems.append(f"method.phm_rank={self.phm_rank} must be at least 1")
        try:
            validate_adapter_config(self, "compacter", default_reduction=32.0)
        except DeltatuneError as error:
            problems.append(str(error))
        if problems:
            raise DeltatuneError("; ".join(problems))


class PHMRule(nn.Module):
    """The n rule matrices A_i (n × n × n) a delta's projections share."""

    def __init__(self, phm_dim: int) -> None:
        super().__init__()
        self.rule = nn.Parameter(torch.randn(phm_dim, phm_dim, phm_dim) * _RULE_INIT_STD)


class PHMLinear(nn.Module):
    """y = (Σ_i A_i ⊗ s_i t_iᵀ) x + b, the A_i shared (held by reference, registered at the rule site)."""

    _rule: PHMRule

    def __init__(
        self, in_features: int, out_features: int, rule: PHMRule, rank: int, left_init_std: float | None = None
    ) -> None:
        super().__init__()
        phm_dim = rule.rule.shape[0]
        self.left = nn.Parameter(torch.empty(phm_dim, out_features // phm_dim, rank))
        self.right = nn.Parameter(torch.empty(phm_dim, rank, in_features // phm_dim))
        self.bias = nn.Parameter(torch.zeros(out_features))
        object.__setattr__(self, "_rule", rule)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.right)
            if left_init_std is None:
                nn.init.xavier_uniform_(self.left)
            elif left_init_std > 0:
                nn.init.trunc_normal_(self.left, std=left_init_std, a=-2 * left_init_std, b=2 * left_init_std)
            else:
                nn.init.zeros_(self.left)

    def weight(self) -> torch.Tensor:
        """Σ_i A_i ⊗ (s_i t_iᵀ), an (out × in) matrix."""
        rule = self._rule.rule
        factors = self.left @ self.right  # (n, out/n, in/n)
        phm_dim, rows, columns = factors.shape
        # kron(A_i, B_i)[a·rows + c, b·columns + d] = A_i[a, b] · B_i[c, d], summed over i
        return torch.einsum("iab,icd->acbd", rule, factors).reshape(phm_dim * rows, phm_dim * columns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class CompacterAdapter(nn.Module):
    """x + up(act(down(x))) with PHM projections."""

    def __init__(
        self, hidden_size: int, bottleneck_size: int, activation: str, rule: PHMRule, rank: int, up_init_std: float
    ) -> None:
        super().__init__()
        self.down = PHMLinear(hidden_size, bottleneck_size, rule, rank)
        self.activation = ACTIVATIONS[activation]()
        self.up = PHMLinear(bottleneck_size, hidden_size, rule, rank, left_init_std=up_init_std)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.up(self.activation(self.down(hidden_states)))


class RuleSite(DeltaSite[PHMRule]):
    """Each delta's shared rule matrices (registered once per model as `<backbone>.phm_rule`)."""


class _Compacter(_Adapters):
    """Bottleneck adapters at the Houlsby or Pfeiffer sites, with PHM projections sharing one rule."""

    batch_mixing = "grouped"  # PHM projections have no per-row gather (plain adapters' does not fit them)

    # above plain adapters' 1e-3: every projection is a product of a small shared rule and factors,
    # so a step moves the adapter's weights less than the same step on a plain matrix
    default_learning_rate = 3e-3

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        hidden_size = text_config(model).hidden_size
        if hidden_size % self.config.phm_dim:
            raise DeltatuneError(
                f"method.phm_dim={self.config.phm_dim} must divide the hidden size {hidden_size} "
                f"of {type(model).__name__}; pick a divisor such as 2 or 4."
            )
        reference = next(model.parameters())
        self._rule = PHMRule(self.config.phm_dim).to(device=reference.device, dtype=reference.dtype)
        super().apply(model, name)
        backbone = getattr(model, "base_model", model)
        site = getattr(backbone, "phm_rule", None)
        if not isinstance(site, RuleSite):
            backbone.phm_rule = site = RuleSite()
        site.add_part(model, name, self._rule, self.name)

    def _new_adapter(self, hidden_size: int, size: int) -> nn.Module:
        phm_dim = self.config.phm_dim
        width = -(-size // phm_dim) * phm_dim  # up to a multiple of n, so each B_i has whole rows
        return CompacterAdapter(
            hidden_size,
            width,
            self.config.activation,
            self._rule,
            self.config.phm_rank,
            self.config.up_projection_init_std,
        )


@register("compacter", CompacterConfig)
class Compacter(_Compacter):
    """Compacter: two PHM adapters per layer (after attention and after the FFN), one shared rule."""

    _sites = ("attention", "ffn")


@register("compacter-pp", CompacterConfig)
class CompacterPlusPlus(_Compacter):
    """Compacter++: one PHM adapter per layer, after the FFN, one shared rule."""

    _sites = ("ffn",)
