"""Bottleneck adapters: Houlsby et al. 2019 (arXiv:1902.00751) and Pfeiffer et al. 2020 (arXiv:2005.00247).

An adapter is a small residual bottleneck inserted into each frozen transformer layer:

    adapter(x) = x + W_up · act(W_down · x + b_down) + b_up,   W_down: m × d,  W_up: d × m,  m ≪ d

Where it goes (the output of a sub-layer, before that sub-layer's residual add):
    houlsby   two per layer: after the attention output projection and after the FFN output
              projection. BERT (post-LN): after `attention.output.dense` + dropout and after
              `output.dense` + dropout, before the residual add and LayerNorm, as in the paper's code.
              Llama (pre-norm): after `self_attn.o_proj` and after `mlp.down_proj`, before the
              residual add. The paper also trains every LayerNorm (`train_layernorm`, default on).
    pfeiffer  one per layer, at the FFN site only (the adapter AdapterFusion settled on). AdapterHub's
              version additionally re-applies the layer's own LayerNorm around the adapter; we keep
              the plain placement at the same site, which starts exactly at the identity.

The up-projection starts at zero (or a tiny normal, `up_projection_init_std`), so the model's output
is unchanged at step 0. Parameter cost per adapter: 2·d·m + d + m; per model
`adapters_per_layer · num_layers · (2·d·m + d + m)` plus the head (plus the norms for houlsby).
With the defaults, head and norms included: MiniLM-L6 (d=384) houlsby m=64 606k (2.7%), pfeiffer
m=24 114k (0.5%); SmolLM2-135M (d=576, 30 layers) houlsby 4.5M (3.3%), pfeiffer m=36 1.26M (0.9%).
Adapters are non-linear, so they cannot be merged into the base weights: there is no merge hook.
Each site holds one adapter per named delta (`<parent>.adapter.deltas[name]`); the active one runs, or,
in a batch mixing deltas row by row, each row's own (weights gathered per row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.common import head_names, text_config
from deltatune.methods.layers import find_layer_list, is_norm
from deltatune.methods.registry import register
from deltatune.methods.state import (
    DEFAULT_DELTA,
    JOINED_UNITS_PER_WIDTH,
    DeltaSite,
    RowRouting,
    base_parameters,
    joined_owners,
    own_parameter_names,
    site_at,
)

Activation = Literal["relu", "gelu", "tanh", "swish"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU}

# Where each adapter site sits inside a transformer block (the blocks themselves are found structurally,
# see deltatune.methods.layers), per block layout: (site name, parent module, module whose output the
# adapter rewrites). The adapters are registered under `<parent>.adapter`; the site module gets a hook.
BERT_SITES = {"attention": ("attention.output", "attention.output.dropout"), "ffn": ("output", "output.dropout")}
LLAMA_SITES = {"attention": ("self_attn", "self_attn.o_proj"), "ffn": ("mlp", "mlp.down_proj")}


@dataclass(frozen=True)
class HoulsbyConfig:
    bottleneck_size: int | None = None
    """Adapter width m. Give this or reduction_factor, not both; with neither, m = 64 (the paper's middle size)."""
    reduction_factor: float | None = None
    """m = hidden size / reduction_factor (rounded, at least 1). Give this or bottleneck_size, not both."""
    activation: Activation = "gelu"
    """Non-linearity inside the bottleneck: relu, gelu (the paper's code), tanh or swish."""
    train_layernorm: bool = True
    """Also train every LayerNorm/RMSNorm of the backbone, as Houlsby et al. do."""
    up_projection_init_std: float = 0.0
    """Std of the up-projection's normal init. 0 makes each adapter exactly the identity at step 0;
    the paper used 1e-3 (near-identity, not exact)."""

    def __post_init__(self) -> None:
        validate_adapter_config(self, "houlsby", default_bottleneck=64)


@dataclass(frozen=True)
class PfeifferConfig:
    bottleneck_size: int | None = None
    """Adapter width m. Give this or reduction_factor, not both; with neither, reduction_factor 16 is used."""
    reduction_factor: float | None = None
    """m = hidden size / reduction_factor (rounded, at least 1); AdapterFusion used 16. Give this or bottleneck_size."""
    activation: Activation = "relu"
    """Non-linearity inside the bottleneck: relu (AdapterFusion's choice), gelu, tanh or swish."""
    train_layernorm: bool = False
    """Also train every LayerNorm/RMSNorm of the backbone (AdapterFusion's adapters keep them frozen)."""
    up_projection_init_std: float = 0.0
    """Std of the up-projection's normal init. 0 makes each adapter exactly the identity at step 0."""

    def __post_init__(self) -> None:
        validate_adapter_config(self, "pfeiffer", default_reduction=16.0)


def validate_adapter_config(
    config, name: str, default_bottleneck: int | None = None, default_reduction: float | None = None
) -> None:
    """Collect every problem; with neither size option given, fill in the method's default."""
    problems = []
    if config.bottleneck_size is not None and config.reduction_factor is not None:
        problems.append(
            f"{name}: method.bottleneck_size={config.bottleneck_size} and "
            f"method.reduction_factor={config.reduction_factor} both set the adapter width; "
            "give only one of them"
        )
    if config.bottleneck_size is not None and config.bottleneck_size < 1:
        problems.append(f"method.bottleneck_size={config.bottleneck_size} must be at least 1")
    if config.reduction_factor is not None and not config.reduction_factor > 0:
        problems.append(f"method.reduction_factor={config.reduction_factor} must be positive (e.g. 16)")
    if config.activation not in ACTIVATIONS:
        problems.append(f"method.activation={config.activation!r} must be one of {', '.join(ACTIVATIONS)}")
    if not config.up_projection_init_std >= 0:
        problems.append(f"method.up_projection_init_std={config.up_projection_init_std} must be 0 or positive")
    if problems:
        raise DeltatuneError("; ".join(problems))
    if config.bottleneck_size is None and config.reduction_factor is None:
        # frozen dataclass: resolve the default once here, so the recorded config says what ran
        if default_bottleneck is not None:
            object.__setattr__(config, "bottleneck_size", default_bottleneck)
        else:
            object.__setattr__(config, "reduction_factor", default_reduction)


class BottleneckAdapter(nn.Module):
    """x + up(act(down(x))), starting at (or next to) the identity."""

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str, up_init_std: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck_size, hidden_size)
        with torch.no_grad():
            # the down-projection keeps nn.Linear's Kaiming-uniform init so the up-projection gets a
            # useful gradient from the first step even though it starts at (almost) zero
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
            if up_init_std > 0:
                nn.init.trunc_normal_(self.up.weight, std=up_init_std, a=-2 * up_init_std, b=2 * up_init_std)
            else:
                nn.init.zeros_(self.up.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.up(self.activation(self.down(hidden_states)))


class AdapterSite(DeltaSite[nn.Module]):
    """Each delta's adapter at one site (registered as `<parent>.adapter`); the active one runs."""


def _run_adapter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a site module: pass its output through the active delta's adapter there.

    The adapters are looked up on the hooked module (not captured in a closure) so a deep copy of
    the model runs its own copy of them.
    """
    site = site_at(module, "_deltatune_adapter", AdapterSite)
    if site.row_routing is not None:
        return _adapt_rows(site, site.row_routing, output)
    adapter = site.active_part()
    return output if adapter is None else adapter(output)


def _adapt_rows(site: AdapterSite, routing: RowRouting, hidden_states: torch.Tensor) -> torch.Tensor:
    """A mixed batch: each row through its own delta's adapter (rows without one here pass unchanged).

    Outside autograd, with the batch sorted by delta: several adapters of one activation are joined along
    their bottlenecks (`_joined_adapters`: two matmuls, each row masked to its own adapter's units); a single
    adapter runs on its slice. Under autograd, when the routed adapters share one activation, their weights
    are stacked (zero-padded to the widest bottleneck; a zero row adds act(0) = 0) and gathered per row: two
    batched matmuls for the whole batch. Otherwise each adapter runs on its own rows.
    """
    parts = site.row_parts(routing)
    segments = routing.contiguous()
    if segments is not None:  # outside autograd: rows may be rewritten in place
        joined = routing.stacked(site, lambda: _joined_adapters(parts), "joined")
        if joined is not None:  # several adapters: one matmul pair over all their bottlenecks, masked per row,
            # on the span of rows that have an adapter here
            activation, down, down_bias, up, up_bias, owner = joined
            start, end = routing.span(parts)
            rows = hidden_states[start:end]
            row_shape = (end - start,) + (1,) * (hidden_states.ndim - 2)
            inner = activation(F.linear(rows, down, down_bias))
            inner = inner * routing.joined_mask(owner, inner.dtype, start, end).view(*row_shape, -1)
            update = F.linear(inner, up) + up_bias[routing.index[start:end]].view(*row_shape, -1).to(inner.dtype)
            rows.add_(update)  # the span of `hidden_states`, in place
            return hidden_states
        for group, start, end in segments:  # one adapter (or very wide ones): each on its own slice
            adapter = parts[group]
            if isinstance(adapter, BottleneckAdapter):  # as the joined path computes it: the up bias added after
                # the matmul, so a row's answer does not depend on whether its batch joined adapters here
                rows = hidden_states[start:end]
                inner = adapter.activation(F.linear(rows, adapter.down.weight, adapter.down.bias))
                rows.add_(F.linear(inner, adapter.up.weight) + adapter.up.bias.to(inner.dtype))
            elif adapter is not None:
                hidden_states[start:end] = adapter(hidden_states[start:end])
        return hidden_states
    stacks = routing.stacked(site, lambda: _stack_adapters(parts))
    if stacks is None:
        return hidden_states
    if stacks == "per-adapter":
        result = hidden_states.clone()
        for group, adapter in enumerate(parts):
            rows = routing.rows(group)
            if adapter is not None and len(rows):
                result[rows] = adapter(hidden_states[rows])
        return result
    activation, down, down_bias, up, up_bias = stacks
    index = routing.index
    rows = hidden_states.reshape(hidden_states.shape[0], -1, hidden_states.shape[-1])
    inner = activation(torch.baddbmm(down_bias[index].unsqueeze(1), rows, down[index].transpose(1, 2)))
    update = torch.baddbmm(up_bias[index].unsqueeze(1), inner, up[index].transpose(1, 2))
    return hidden_states + update.view(hidden_states.shape)


@torch.no_grad()
def _stack_adapters(parts: list[nn.Module | None]) -> Any:
    """None (no routed delta has an adapter here), "per-adapter" (they cannot be stacked), or the stacks."""
    present = [adapter for adapter in parts if adapter is not None]
    if not present:
        return None
    bottlenecks = [adapter for adapter in present if isinstance(adapter, BottleneckAdapter)]
    if len(bottlenecks) < len(present) or len({repr(adapter.activation) for adapter in bottlenecks}) > 1:
        return "per-adapter"
    width = max(adapter.down.out_features for adapter in bottlenecks)
    hidden = bottlenecks[0].up.out_features
    reference = bottlenecks[0].down.weight
    down, down_bias = reference.new_zeros(len(parts), width, hidden), reference.new_zeros(len(parts), width)
    up, up_bias = reference.new_zeros(len(parts), hidden, width), reference.new_zeros(len(parts), hidden)
    for group, adapter in enumerate(parts):
        if isinstance(adapter, BottleneckAdapter):
            size = adapter.down.out_features
            down[group, :size], down_bias[group, :size] = adapter.down.weight, adapter.down.bias
            up[group, :, :size], up_bias[group] = adapter.up.weight, adapter.up.bias
    return bottlenecks[0].activation, down, down_bias, up, up_bias


@torch.no_grad()
def _joined_adapters(parts: list[nn.Module | None]) -> Any:
    """The routed adapters at a site joined along their bottlenecks, or None (fewer than two, not all
    bottleneck adapters of one activation, or too wide): (activation, down weight (widths, d), down bias,
    up weight (d, widths), each group's up bias (groups, d; zero where it has no adapter), each bottleneck
    unit's group). A row's product is masked to its own adapter's units, so the others add exact zeros."""
    present = [(group, adapter) for group, adapter in enumerate(parts) if isinstance(adapter, BottleneckAdapter)]
    if len(present) < 2 or len(present) < sum(adapter is not None for adapter in parts):
        return None
    adapters = [adapter for _, adapter in present]
    hidden = adapters[0].up.out_features
    widths = [adapter.down.out_features for adapter in adapters]
    if len({repr(adapter.activation) for adapter in adapters}) > 1 or sum(widths) > JOINED_UNITS_PER_WIDTH * hidden:
        return None
    up_bias = adapters[0].up.bias.new_zeros(len(parts), hidden)
    for group, adapter in present:
        up_bias[group] = adapter.up.bias
    owner = joined_owners([group for group, _ in present], widths, up_bias.device)
    return (
        adapters[0].activation,
        torch.cat([adapter.down.weight for adapter in adapters]),
        torch.cat([adapter.down.bias for adapter in adapters]),
        torch.cat([adapter.up.weight for adapter in adapters], dim=1),
        up_bias,
        owner,
    )


def transformer_layers(model: nn.Module) -> tuple[list[nn.Module], dict[str, tuple[str, str]]]:
    """The transformer blocks (found structurally) and the adapter sites of their layout."""
    _, blocks = find_layer_list(model)
    for layout in (BERT_SITES, LLAMA_SITES):
        if all(_has_sites(block, layout) for block in blocks):
            return list(blocks), layout
    backbone = getattr(model, "base_model", model)
    raise DeltatuneError(
        "Adapters know BERT-style layers (encoder.layer.N.attention.output.dense / output.dense) and "
        f"Llama-style layers (layers.N.self_attn.o_proj / mlp.down_proj); {type(backbone).__name__} has "
        "neither. Use a BERT- or Llama-family model, or another method (lora, bitfit)."
    )


def _has_sites(layer: nn.Module, sites: dict[str, tuple[str, str]]) -> bool:
    try:
        for parent, target in sites.values():
            layer.get_submodule(parent)
            layer.get_submodule(target)
    except AttributeError:
        return False
    return True


def bottleneck_size(config: HoulsbyConfig | PfeifferConfig, hidden_size: int) -> int:
    """The adapter width m on a model of `hidden_size`."""
    if config.bottleneck_size is not None:
        return config.bottleneck_size
    assert config.reduction_factor is not None  # the config's __post_init__ sets one of the two
    return max(1, round(hidden_size / config.reduction_factor))


class _Adapters(Method):
    """Shared by houlsby and pfeiffer: only the sites and the defaults differ."""

    batch_mixing = "per-row"
    position_wise = True

    _sites: tuple[str, ...] = ()
    # adapters start as the identity and are fresh, small modules: they need a learning rate 10-30x
    # higher than full fine-tuning to move within a short budget (Houlsby et al. swept 3e-5..3e-3,
    # AdapterHub recommends 1e-4..1e-3; 1e-3 suits small encoders and short budgets)
    default_learning_rate = 1e-3
    # `lr_search: auto`: AdapterHub's range and a step above it
    learning_rate_candidates = (2e-4, 5e-4, 1e-3, 3e-3)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        layers, layout = transformer_layers(model)
        super().apply(model, name)
        hidden_size = text_config(model).hidden_size
        size = bottleneck_size(self.config, hidden_size)
        reference = next(model.parameters())
        for layer in layers:
            for site_name in self._sites:
                parent_name, target_name = layout[site_name]
                parent, target = layer.get_submodule(parent_name), layer.get_submodule(target_name)
                site = getattr(parent, "adapter", None)
                if not isinstance(site, AdapterSite):
                    parent.adapter = site = AdapterSite()
                    # stored outside the module registry: the adapters' parameters are named once, under
                    # the parent, and the hook finds them from the module it runs on
                    object.__setattr__(target, "_deltatune_adapter", site)
                    target.register_forward_hook(_run_adapter)
                adapter = self._new_adapter(hidden_size, size)
                site.add_part(model, name, adapter.to(device=reference.device, dtype=reference.dtype), self.name)

    def _new_adapter(self, hidden_size: int, size: int) -> nn.Module:
        """One adapter (a module mapping hidden states to hidden states) for one site."""
        return BottleneckAdapter(hidden_size, size, self.config.activation, self.config.up_projection_init_std)

    def trainable_names(self, model: nn.Module) -> set[str]:
        names = own_parameter_names(model, self._applied_name())
        if self.config.train_layernorm:
            backbone = getattr(model, "base_model", model)
            norm_ids = {id(p) for m in backbone.modules() if is_norm(m) for p in m.parameters(recurse=False)}
            names |= {n for n, p in base_parameters(model).items() if id(p) in norm_ids}
        return names | head_names(model)


@register("houlsby", HoulsbyConfig)
class Houlsby(_Adapters):
    """Houlsby adapters: two bottleneck adapters per layer (after attention and after the FFN), plus LayerNorms."""

    _sites = ("attention", "ffn")


@register("pfeiffer", PfeifferConfig)
class Pfeiffer(_Adapters):
    """Pfeiffer adapters: one bottleneck adapter per layer, after the FFN."""

    _sites = ("ffn",)
