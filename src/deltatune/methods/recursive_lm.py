"""Recursive LM (Levine et al. 2022, "Standing on the Shoulders of Giant Frozen Language Models",
arXiv:2204.10019, neural recursion): the frozen model reads its input twice, the second time
through a small trainable connector from its own first reading.

    h^(1) = M(E(x))                       first pass of the frozen backbone M (final hidden states)
    c     = W_2 GELU(W_1 LN(h^(1)) + b_1) + b_2          the connector, W_1 ∈ R^{m×d}, W_2 ∈ R^{d×m}
    h^(2) = M(E(x) + c)        (combine=add)     or     M(c)  (combine=replace)
    logits = head(h^(2))                   the task head reads the second pass

Only the connector and the head train; M runs twice with the same frozen weights. With combine=add
(the default) W_2 and b_2 start at zero, so the second pass starts as an exact copy of the first and
the model's outputs are the base model's: the connector learns, per token, how the first pass's
contextual reading should rewrite that token's input embedding. combine=replace feeds only the
connector's output to the second pass, the paper's pure form (it cannot start at the base model's
outputs). The first pass needs no gradient (nothing before it trains), so training costs one extra
frozen forward pass plus the second pass's forward and backward.

Each named delta has its own connector (`<backbone>.recursion.deltas[name]`); the active delta's runs,
and with none active the backbone reads its input once, as it is.

Parameter cost: LN 2d + d·m + m + m·d + d (+ the task head). On SmolLM2-135M (d=576) with the default
m=256: 1,152 + 147,456 + 256 + 147,456 + 576 = 296,896 (0.22%); on MiniLM-L6 (d=384): 198,016 (0.87%).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.common import head_names
from deltatune.methods.prompts import arguments_as_keywords, backbone_of, reject_non_empty_cache, word_embeddings
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, DeltaSite, own_parameter_names, site_at

METHOD_NAME = "recursive-lm"


@dataclass(frozen=True)
class RecursiveLMConfig:
    connector_size: int = 256
    """Hidden width m of the connector MLP."""
    combine: Literal["add", "replace"] = "add"
    """'add': the second pass reads E(x) + connector(h1), starting exactly at the base model; 'replace': it
    reads connector(h1) alone (the paper's pure neural recursion)."""

    def __post_init__(self) -> None:
        problems = []
        if self.connector_size < 1:
            problems.append(f"method.connector_size={self.connector_size} must be at least 1 (e.g. 256)")
        if self.combine not in ("add", "replace"):
            problems.append(f"method.combine={self.combine!r} must be 'add' or 'replace'")
        if problems:
            raise DeltatuneError("; ".join(problems))


class Connector(nn.Module):
    """LN -> Linear(d, m) -> GELU -> Linear(m, d); with zero_output, the last layer starts at zero."""

    def __init__(self, width: int, hidden: int, zero_output: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, dtype=dtype)
        self.up = nn.Linear(width, hidden, dtype=dtype)
        self.down = nn.Linear(hidden, width, dtype=dtype)
        self.activation = nn.GELU()
        if zero_output:
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(self.norm(hidden))))


def _accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(type(module).forward).parameters


def _first_pass_settings(backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: both passes run without a key/value cache (a cache would hold two passes)."""
    site = site_at(backbone, "recursion", RecursionSite)
    if site.in_second_pass or site.active_part() is None:
        return None
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    reject_non_empty_cache(kwargs, METHOD_NAME)
    if _accepts(backbone, "use_cache"):
        kwargs["use_cache"] = False
    return (), kwargs


def _second_pass(backbone: PreTrainedModel, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: run the backbone again on the connector's rewrite of the input; return that pass."""
    site = site_at(backbone, "recursion", RecursionSite)
    recursion = site.active_part()
    if site.in_second_pass or recursion is None:
        return output
    first = output[0] if isinstance(output, tuple) else output["last_hidden_state"]
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = backbone.get_input_embeddings()(kwargs["input_ids"])
    rewritten = recursion.connector(first).to(inputs_embeds.dtype)
    second_inputs = inputs_embeds + rewritten if recursion.combine == "add" else rewritten
    site.in_second_pass = True
    try:
        return backbone(**{**kwargs, "input_ids": None, "inputs_embeds": second_inputs})
    finally:
        site.in_second_pass = False


class Recursion(nn.Module):
    """One delta's connector and how its output meets the input embeddings."""

    def __init__(self, connector: Connector, combine: str) -> None:
        super().__init__()
        self.connector = connector
        self.combine = combine


class RecursionSite(DeltaSite[Recursion]):
    """Each delta's connector (registered as `<backbone>.recursion`), and the flag that keeps the second
    pass from recursing again."""

    def __init__(self) -> None:
        super().__init__()
        self.in_second_pass = False


@register(METHOD_NAME, RecursiveLMConfig)
class RecursiveLM(Method):
    """Recursive LM: the frozen model reads its input twice, the second time rewritten by a trainable connector."""

    # the connector is a freshly initialised MLP, like an adapter: a rate in the adapters' range
    default_learning_rate = 1e-3
    # `lr_search: auto`: two steps below the adapters' range (3e-4..1e-2): on STS-B (MiniLM-L6, bi-encoder)
    # 3e-4..1e-2 and 1e-4..3e-3 each chose their lowest candidate (1e-2 fell to 0.61 dev Pearson); over
    # 3e-5..1e-3 it chose 1e-4, inside
    learning_rate_candidates = (3e-5, 1e-4, 3e-4, 1e-3)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        backbone = backbone_of(model)
        super().apply(model, name)
        embeddings = word_embeddings(backbone).weight
        connector = Connector(
            embeddings.shape[1],
            self.config.connector_size,
            zero_output=self.config.combine == "add",
            dtype=embeddings.dtype,
        )
        site = getattr(backbone, "recursion", None)
        if not isinstance(site, RecursionSite):
            backbone.recursion = site = RecursionSite()
            backbone.register_forward_pre_hook(_first_pass_settings, with_kwargs=True)
            backbone.register_forward_hook(_second_pass, with_kwargs=True)
        site.add_part(model, name, Recursion(connector, self.config.combine).to(embeddings.device), self.name)

    def trainable_names(self, model: nn.Module) -> set[str]:
        return own_parameter_names(model, self._applied_name()) | head_names(model)
