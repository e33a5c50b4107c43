"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190) / P-tuning v2 (Liu et al. 2022, arXiv:2110.07602).

Every attention layer l attends to L trainable key/value vectors in front of the real ones:

    head_i = softmax(q_i [P_K^l; K_i]^T / √d_h) [P_V^l; V_i],   P_K^l, P_V^l ∈ R^{L×d_kv}

Only the prefixes (and the task head) train. Parameter cost: num_layers · 2 · L · d_kv, where d_kv is
the key/value width (hidden size for BERT; num_key_value_heads · head_dim for grouped-query
Llama): 6·2·20·384 = 92,160 on MiniLM-L6 (0.4%), 30·2·20·192 = 230,400 on SmolLM2-135M (0.2%).

Reparameterisation (`reparameterize`, Li & Liang §4.3): during training the prefixes are the
output of an MLP, P = MLP(E) with E ∈ R^{L×d_kv}, which steadies optimisation. The MLP is only
a training device: the delta stores the prefixes it produces (not E or the MLP), and loading a
delta gives the plain, non-reparameterised form.

How it sits in the model, matching PEFT's `PrefixTuningConfig` (and P-tuning v2's code): the
prefixes go in as a pre-filled key/value cache, so the model numbers the real tokens from L
onwards (positions L..L+n-1: BERT's learned positions and Llama's rotary positions both shift,
and BERT then takes at most max_position_embeddings - L real tokens). The prefix keys carry no
rotary rotation. The attention mask gains L ones in front; input_ids reach the task head untouched,
so Llama's last-non-pad pooling works on right-padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from deltatune.errors import DeltatuneError
from deltatune.methods._prompts import (
    arguments_as_keywords,
    backbone_of,
    batch_size_and_length,
    cache_keyword,
    check_position_budget,
    prepend_to_mask,
    qualified_name,
    reject_non_empty_cache,
)
from deltatune.methods.common import head_names
from deltatune.methods.registry import register


@dataclass(frozen=True)
class PrefixTuningConfig:
    num_virtual_tokens: int = 20
    """Prefix length L: key/value vectors added in front of every attention layer."""
    reparameterize: bool = False
    """Produce the prefixes with an MLP during training (Li & Liang); the delta still stores only the
    prefixes. P-tuning v2 found it helps on some tasks and not others, so it is off by default."""
    mlp_hidden_size: int = 512
    """Hidden width of the reparameterisation MLP (Li & Liang's and P-tuning v2's code use 512)."""

    def __post_init__(self) -> None:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(f"method.num_virtual_tokens={self.num_virtual_tokens} must be at least 1 (e.g. 20)")
        if self.mlp_hidden_size < 1:
            problems.append(f"method.mlp_hidden_size={self.mlp_hidden_size} must be at least 1 (e.g. 512)")
        if problems:
            raise DeltatuneError("; ".join(problems))


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_key_value_heads: int
    head_dim: int

    @property
    def key_value_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def of(cls, config) -> AttentionShape:
        config = config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


class Prefix(nn.Module):
    """The prefixes of every layer: trained directly, or produced by an MLP while training.

    `key_values()` has shape (num_layers, 2, L, d_kv); index 0 of the second axis is the keys. The
    MLP's output is laid out as PEFT's prefix encoder lays it out ((layer, key/value, width) per
    virtual token), so weights map one to one.
    """

    def __init__(self, shape: AttentionShape, num_tokens: int, reparameterize: bool, mlp_hidden_size: int) -> None:
        super().__init__()
        self.shape, self.num_tokens = shape, num_tokens
        width = shape.key_value_width
        # unit-normal start, as PEFT and P-tuning v2 (nn.Embedding's default init)
        if reparameterize:
            self.embedding = nn.Parameter(torch.randn(num_tokens, width))
            self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden_size), nn.Tanh(),
                                     nn.Linear(mlp_hidden_size, shape.num_layers * 2 * width))
        else:
            self.prefixes = nn.Parameter(torch.randn(shape.num_layers, 2, num_tokens, width))

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "mlp")

    def key_values(self) -> torch.Tensor:
        if not self.reparameterized:
            return self.prefixes
        flat = self.mlp(self.embedding)  # (L, num_layers · 2 · d_kv)
        return flat.view(self.num_tokens, self.shape.num_layers, 2, -1).permute(1, 2, 0, 3)

    def fix(self, key_values: torch.Tensor) -> None:
        """Drop the MLP (if any) and hold `key_values` directly: the form a delta loads into."""
        for name in ("embedding", "mlp"):
            if hasattr(self, name):
                delattr(self, name)
        self.prefixes = nn.Parameter(key_values.detach().clone())

    def as_cache(self, batch_size: int, dtype: torch.dtype) -> DynamicCache:
        """The prefixes as a cache the attention layers extend with the real tokens' keys/values."""
        heads, head_dim = self.shape.num_key_value_heads, self.shape.head_dim
        # (layers, 2, L, heads·head_dim) -> (layers, 2, batch, heads, L, head_dim), a view per layer
        per_head = self.key_values().to(dtype).view(self.shape.num_layers, 2, self.num_tokens, heads, head_dim)
        per_head = per_head.permute(0, 1, 3, 2, 4).unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)
        return DynamicCache([(layer[0], layer[1]) for layer in per_head])


def _insert_prefix(backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on the backbone: pass the prefixes as a pre-filled cache, widen the mask."""
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    reject_non_empty_cache(kwargs, "prefix-tuning")
    prefix = backbone.prefix_tuning
    batch_size, length, device = batch_size_and_length(kwargs)
    check_position_budget(backbone, prefix.num_tokens, length, "prefix-tuning")
    dtype = kwargs["inputs_embeds"].dtype if kwargs.get("inputs_embeds") is not None else None
    kwargs[cache_keyword(backbone)] = prefix.as_cache(batch_size, dtype or prefix.key_values().dtype)
    kwargs["attention_mask"] = prepend_to_mask(kwargs.get("attention_mask"), prefix.num_tokens, batch_size,
                                               length, device)
    return (), kwargs


@register("prefix-tuning", PrefixTuningConfig)
class PrefixTuning:
    """Prefix tuning / P-tuning v2: trainable key/value prefixes in every attention layer (and the task head)."""

    # P-tuning v2 trained prefixes of BERT/RoBERTa-size models with lrs of 5e-3..1e-2: the prefixes
    # are fresh, unit-scale vectors that must move far, yet a step acts on every layer at once, so
    # they tolerate less than prompt tuning's single input-layer prompt
    default_learning_rate = 1e-2
    # `lr_search: auto`: around the default
    learning_rate_candidates = (1e-3, 3e-3, 1e-2, 3e-2)

    def __init__(self, config: PrefixTuningConfig) -> None:
        self.config = config

    def apply(self, model: nn.Module) -> None:
        backbone = backbone_of(model)
        if hasattr(backbone, "prefix_tuning"):
            raise RuntimeError("prefix-tuning: apply() ran twice on the same model")
        cache_keyword(backbone)  # fails early, naming the model, if it takes no cache
        reference = next(backbone.parameters())
        prefix = Prefix(AttentionShape.of(model.config), self.config.num_virtual_tokens,
                        self.config.reparameterize, self.config.mlp_hidden_size)
        backbone.prefix_tuning = prefix.to(device=reference.device, dtype=reference.dtype)
        backbone.register_forward_pre_hook(_insert_prefix, with_kwargs=True)

    def trainable_names(self, model: nn.Module) -> set[str]:
        prefix_ids = {id(p) for p in backbone_of(model).prefix_tuning.parameters()}
        return {n for n, p in model.named_parameters() if id(p) in prefix_ids} | head_names(model)

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The head and the final prefixes; a reparameterisation MLP is evaluated once and dropped."""
        prefix = backbone_of(model).prefix_tuning
        heads = head_names(model)
        state = {n: p.detach() for n, p in model.named_parameters() if n in heads}
        with torch.no_grad():
            state[f"{qualified_name(model, prefix)}.prefixes"] = prefix.key_values().detach().clone()
        return state

    def load_delta_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        prefix = backbone_of(model).prefix_tuning
        prefix_name = f"{qualified_name(model, prefix)}.prefixes"
        heads = head_names(model)
        expected = heads | {prefix_name}
        missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
        if missing or unexpected:
            raise DeltatuneError(
                f"The delta does not fit the 'prefix-tuning' method on this model: missing tensors "
                f"{sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}. Was it saved by another "
                "deltatune version or for another model?")
        wanted_shape = (prefix.shape.num_layers, 2, prefix.num_tokens, prefix.shape.key_value_width)
        if tuple(tensors[prefix_name].shape) != wanted_shape:
            raise DeltatuneError(
                f"Delta tensor {prefix_name!r} has shape {tuple(tensors[prefix_name].shape)} but this model "
                f"and method.num_virtual_tokens={prefix.num_tokens} need {wanted_shape}: the delta was saved "
                "for another model or prefix length.")
        reference = next(model.parameters())
        # the loaded prefixes train if the form they replace did (prepare_model ran before loading)
        trainable = any(p.requires_grad for p in prefix.parameters())
        prefix.fix(tensors[prefix_name].to(device=reference.device, dtype=reference.dtype))
        prefix.prefixes.requires_grad_(trainable)
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name in heads:
                if parameters[name].shape != tensors[name].shape:
                    raise DeltatuneError(f"Delta tensor {name!r} has shape {tuple(tensors[name].shape)} but the "
                                         f"model expects {tuple(parameters[name].shape)}: the delta was saved for "
                                         "another model or number of labels.")
                parameters[name].copy_(tensors[name].to(parameters[name].dtype))
