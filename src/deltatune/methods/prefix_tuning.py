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
so Llama's last-non-pad pooling works on right-padded batches. Each named delta has its own prefixes
(`<backbone>.prefix_tuning.deltas[name]`); the active delta's are attended to, or, in a batch mixing
deltas row by row, each row's own (shorter prefixes padded with masked-out slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.common import head_names
from deltatune.methods.prompts import (
    arguments_as_keywords,
    backbone_of,
    batch_size_and_length,
    cache_keyword,
    check_position_budget,
    prepend_to_mask,
    reject_non_empty_cache,
)
from deltatune.methods.registry import register
from deltatune.methods.state import (
    DEFAULT_DELTA,
    DeltaSite,
    RowRouting,
    TensorSpec,
    canonical_module_name,
    check_delta_tensors,
    head_specs,
    own_parameter_names,
    read_delta_tensors,
    site_at,
    write_delta_tensors,
)


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
            self.mlp = nn.Sequential(
                nn.Linear(width, mlp_hidden_size), nn.Tanh(), nn.Linear(mlp_hidden_size, shape.num_layers * 2 * width)
            )
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


class PrefixSite(DeltaSite[Prefix]):
    """Each delta's prefixes (registered as `<backbone>.prefix_tuning`); the active one is attended to."""


def _insert_prefix(backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the backbone: pass the prefixes as a pre-filled cache, widen the mask."""
    site = site_at(backbone, "prefix_tuning", PrefixSite)
    if site.row_routing is not None:
        return _insert_prefixes_per_row(backbone, site, site.row_routing, args, kwargs)
    prefix = site.active_part()
    if prefix is None:
        return None
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    reject_non_empty_cache(kwargs, "prefix-tuning")
    batch_size, length, device = batch_size_and_length(kwargs)
    check_position_budget(backbone, prefix.num_tokens, length, "prefix-tuning")
    dtype = kwargs["inputs_embeds"].dtype if kwargs.get("inputs_embeds") is not None else None
    kwargs[cache_keyword(backbone)] = prefix.as_cache(batch_size, dtype or prefix.key_values().dtype)
    kwargs["attention_mask"] = prepend_to_mask(
        kwargs.get("attention_mask"), prefix.num_tokens, batch_size, length, device
    )
    return (), kwargs


def _insert_prefixes_per_row(
    backbone: nn.Module, site: PrefixSite, routing: RowRouting, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """A mixed batch: each row attends to its own delta's prefixes (masked-out slots pad shorter ones).

    Row r's real tokens are numbered from its own prefix length L_r, as when its delta runs alone.
    """
    stacked = routing.stacked(site, lambda: _stack_prefixes(site.row_parts(routing)))
    if stacked is None:
        return None
    key_values, lengths, shape = stacked
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    reject_non_empty_cache(kwargs, "prefix-tuning")
    batch_size, length, device = batch_size_and_length(kwargs)
    row_lengths = lengths[routing.index]
    check_position_budget(backbone, int(row_lengths.max()), length, "prefix-tuning")
    dtype = kwargs["inputs_embeds"].dtype if kwargs.get("inputs_embeds") is not None else key_values.dtype
    num_tokens = key_values.shape[3]
    per_row = (
        key_values[routing.index]
        .to(dtype)
        .view(batch_size, shape.num_layers, 2, num_tokens, shape.num_key_value_heads, shape.head_dim)
    )
    per_row = per_row.permute(1, 2, 0, 4, 3, 5)  # (layers, key/value, batch, heads, L, head_dim)
    kwargs[cache_keyword(backbone)] = DynamicCache([(layer[0], layer[1]) for layer in per_row])
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
    slots = torch.arange(num_tokens, device=device)
    prefix_mask = (slots[None, :] < row_lengths[:, None]).to(attention_mask.dtype)
    kwargs["attention_mask"] = torch.cat([prefix_mask, attention_mask], dim=1)
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=device).expand(batch_size, -1)
    kwargs["position_ids"] = positions + row_lengths[:, None]
    return (), kwargs


@torch.no_grad()
def _stack_prefixes(parts: list[Prefix | None]):
    """The routed deltas' prefixes zero-padded to the longest, each one's length (0: none), and their shape."""
    present = [prefix for prefix in parts if prefix is not None]
    if not present:
        return None
    reference = present[0].key_values()
    lengths = torch.tensor([0 if prefix is None else prefix.num_tokens for prefix in parts], device=reference.device)
    stack = reference.new_zeros(len(parts), reference.shape[0], 2, int(lengths.max()), reference.shape[-1])
    for group, prefix in enumerate(parts):
        if prefix is not None:
            stack[group, :, :, : prefix.num_tokens] = prefix.key_values()
    return stack, lengths, present[0].shape


@register("prefix-tuning", PrefixTuningConfig)
class PrefixTuning(Method):
    """Prefix tuning / P-tuning v2: trainable key/value prefixes in every attention layer (and the task head)."""

    batch_mixing = "per-row"

    # P-tuning v2 trained prefixes of BERT/RoBERTa-size models with lrs of 5e-3..1e-2: the prefixes
    # are fresh, unit-scale vectors that must move far, yet a step acts on every layer at once, so
    # they tolerate less than prompt tuning's single input-layer prompt
    default_learning_rate = 1e-2
    # `lr_search: auto`: around the default, one step higher than 1e-3..3e-2, where STS-B (MiniLM-L6,
    # bi-encoder) chose the highest candidate and 1e-3 was the worst
    learning_rate_candidates = (3e-3, 1e-2, 3e-2, 1e-1)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        backbone = backbone_of(model)
        cache_keyword(backbone)  # fails early, naming the model, if it takes no cache
        super().apply(model, name)
        site = getattr(backbone, "prefix_tuning", None)
        if not isinstance(site, PrefixSite):
            backbone.prefix_tuning = site = PrefixSite()
            backbone.register_forward_pre_hook(_insert_prefix, with_kwargs=True)
        reference = next(backbone.parameters())
        prefix = Prefix(
            AttentionShape.of(model.config),
            self.config.num_virtual_tokens,
            self.config.reparameterize,
            self.config.mlp_hidden_size,
        )
        site.add_part(model, name, prefix.to(device=reference.device, dtype=reference.dtype), self.name)

    def trainable_names(self, model: nn.Module) -> set[str]:
        return own_parameter_names(model, self._applied_name()) | head_names(model)

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The head and the final prefixes; a reparameterisation MLP is evaluated once and dropped."""
        name = self._applied_name()
        state = read_delta_tensors(model, name, head_names(model))
        site = site_at(backbone_of(model), "prefix_tuning", PrefixSite)
        with torch.no_grad():
            state[f"{canonical_module_name(model, site)}.prefixes"] = site.part_of(name).key_values().detach().clone()
        return state

    def load_delta_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        name = self._applied_name()
        site = site_at(backbone_of(model), "prefix_tuning", PrefixSite)
        prefix = site.part_of(name)
        prefix_name = f"{canonical_module_name(model, site)}.prefixes"
        reference = next(model.parameters())
        expected = head_specs(model)
        expected[prefix_name] = TensorSpec(
            (prefix.shape.num_layers, 2, prefix.num_tokens, prefix.shape.key_value_width), reference.dtype
        )
        check_delta_tensors(
            self.name,
            tensors,
            expected,
            f"method.num_virtual_tokens={prefix.num_tokens} here: was the delta saved with another "
            "prefix length, by another deltatune version, or for another model?",
        )
        # the loaded prefixes train if the form they replace did (prepare_model ran before loading)
        trainable = any(p.requires_grad for p in prefix.parameters())
        prefix.fix(tensors[prefix_name].to(device=reference.device))
        prefix.prefixes.requires_grad_(trainable)
        write_delta_tensors(model, name, {key: tensor for key, tensor in tensors.items() if key != prefix_name})
