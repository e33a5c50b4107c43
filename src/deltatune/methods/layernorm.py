"""LayerNorm tuning (Qi, Ruan, Zuo & Li 2022, arXiv:2211.08682): train only the normalisation layers.

Every weight matrix and embedding stays frozen; the gain g (and, where the norm has one, the bias b)
of every normalisation layer trains, together with the task head:

    LayerNorm(x) = g ⊙ (x − mean(x)) / sqrt(var(x) + eps) + b        (BERT, GPT-2: g and b train)
    RMSNorm(x)   = g ⊙ x / sqrt(mean(x²) + eps)                       (Llama: only g exists, and trains)

Same idea as PEFT's `LNTuningConfig` (which cites the later multimodal study of Zhao et al. 2023,
arXiv:2312.11420); with equal weights the two give equal outputs (tests/test_layer_methods.py).

Parameter cost: 2·hidden per LayerNorm (hidden per RMSNorm), i.e. about 4·hidden per block.
MiniLM-L6: 9,984 norm parameters (0.04% of 22.7M) plus the head; SmolLM2-135M: 35,136 (0.03%)
plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.common import head_names
from deltatune.methods.layers import is_norm
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, base_modules


@dataclass(frozen=True)
class LayerNormConfig:
    targets: tuple[str, ...] = ()
    """Names (or name endings) of the norm modules to tune, e.g. 'LayerNorm' or 'input_layernorm'.
    Empty: every LayerNorm / RMSNorm of the model."""


def norm_modules(model: nn.Module, targets: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The base model's norm modules (outside the task head), restricted to `targets` when given."""
    head = head_names(model)
    found = {
        name: module
        for name, module in base_modules(model).items()
        if is_norm(module) and not any(f"{name}.{p}" in head for p, _ in module.named_parameters())
    }
    if not targets:
        return found
    chosen = {
        name: module
        for name, module in found.items()
        if any(name == target or name.endswith(f".{target}") for target in targets)
    }
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in found)]
    if unmatched:
        examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in found})) or "none"
        raise DeltatuneError(
            f"method.targets={targets!r}: {unmatched} matched no normalisation layer of {type(model).__name__}. "
            f"Its norm layers are named like {examples} (full names like {next(iter(found), '?')!r}); "
            "leave method.targets empty to tune all of them."
        )
    return chosen


@register("layernorm", LayerNormConfig)
class LayerNormTuning(Method):
    """LayerNorm tuning: only the gains and biases of the normalisation layers (and the task head) train."""

    # its tensors are small: a batch mixing deltas applies each row's own (deltatune.methods.state.mixed_rows)
    batch_mixing = "per-row"
    position_wise = True

    # a few thousand scale/shift parameters near 1 and 0: like BitFit they need a large step to matter
    default_learning_rate = 1e-3
    # `lr_search: auto`: BitFit's range. On STS-B (MiniLM-L6) the search over 1e-3..3e-2 chose its lowest
    # candidate and 3e-2 fell to 0.77 dev Pearson, so the range reaches one step lower instead
    learning_rate_candidates = (3e-4, 1e-3, 3e-3, 1e-2)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        modules = norm_modules(model, self.config.targets)
        if not modules:
            raise DeltatuneError(
                f"{type(model).__name__} has no LayerNorm or RMSNorm layer, so the 'layernorm' "
                "method has nothing to tune; choose another method (e.g. bitfit or lora)."
            )
        super().apply(model, name)

    def trainable_names(self, model: nn.Module) -> set[str]:
        names = {
            f"{module_name}.{parameter_name}"
            for module_name, module in norm_modules(model, self.config.targets).items()
            for parameter_name, _ in module.named_parameters(recurse=False)
        }
        return names | head_names(model)
