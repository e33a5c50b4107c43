"""Prompt tuning (Lester, Al-Rfou & Constant 2021, arXiv:2104.08691): a trainable soft prompt.

The frozen model reads `num_virtual_tokens` learned vectors P ∈ R^{L×d} in front of the embedded
input:  h_0 = [P; E(x)],  with the attention mask extended by L ones. Only P (and the task head)
train. Parameter cost: L·d, e.g. 20 × 384 = 7,680 on MiniLM-L6 (0.03%), 20 × 576 = 11,520 on
SmolLM2-135M (0.01%), plus the head.

How it sits in the model, matching PEFT's `PromptTuningConfig` for SEQ_CLS:
  - The prompt goes in front of everything, [CLS] included. BERT's pooler reads position 0, so
    on BERT the classifier sees the first soft token's final state: that token takes over the
    role of [CLS] (it sits at position 0 with position embedding 0 and attends to the whole input),
    and the real [CLS] becomes an ordinary token at position L.
  - Positions run 0..L+n-1: the real tokens move up by L (PEFT does the same). Models with learned
    absolute positions therefore take at most max_position_embeddings - L real tokens.
  - Each named delta has its own prompt (`<backbone>.soft_prompt.deltas[name]`); the active one is
    prepended, and with no prompt-tuning delta active the backbone runs as it is. In a batch mixing
    deltas row by row, each row gets its own delta's prompt at positions 0..L_r-1, its input after it,
    and masked-out slots at the end (`place_soft_tokens_per_row`).
  - Llama-style heads pool the last non-pad token, found from input_ids. PEFT hands the model
    inputs_embeds instead, so the head falls back to the last position, which is padding in a
    right-padded batch. Here the task model still receives input_ids: the prompt is added inside
    the backbone, and the backbone's output drops the L prompt positions again, so the head's
    index lines up with input_ids and every example of a right-padded batch gets the logits it
    gets alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method
from deltatune.methods.common import head_names
from deltatune.methods.prompts import (
    arguments_as_keywords,
    backbone_of,
    batch_size_and_length,
    check_position_budget,
    drop_leading_positions,
    find_tokenizer,
    place_soft_tokens_per_row,
    prepend_soft_tokens,
    reject_non_empty_cache,
    select_positions,
    word_embeddings,
)
from deltatune.methods.registry import register
from deltatune.methods.state import DEFAULT_DELTA, DeltaSite, RowRouting, SiteT, own_parameter_names, site_at


@dataclass(frozen=True)
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    """Length L of the soft prompt (Lester et al. found 20 enough for large models; small ones like more)."""
    init: Literal["text", "vocab", "random"] = "text"
    """How the prompt starts: 'text' = the embeddings of init_text's tokens (needs the model's tokenizer),
    'vocab' = embeddings of random vocabulary tokens, 'random' = noise at the embedding matrix's scale."""
    init_text: str = "classify the sentiment or meaning of this text"
    """Text whose token embeddings start the prompt (init=text), repeated or cut to num_virtual_tokens.
    The default is a task-neutral instruction of common words: real-token embeddings start training
    where the model expects inputs (Lester et al.: vocabulary-based init beats random, most for small
    models), and the method cannot see the task's label words to use class-label init."""

    def __post_init__(self) -> None:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(f"method.num_virtual_tokens={self.num_virtual_tokens} must be at least 1 (e.g. 20)")
        if self.init not in ("text", "vocab", "random"):
            problems.append(f"method.init={self.init!r} must be one of 'text', 'vocab', 'random'")
        if self.init == "text" and not self.init_text.strip():
            problems.append("method.init=text needs a non-empty method.init_text")
        if problems:
            raise DeltatuneError("; ".join(problems))


class SoftPrompt(nn.Module):
    """The L trainable vectors put in front of every input."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(initial.detach().clone())

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]


class PromptSite(DeltaSite[SoftPrompt]):
    """Each delta's soft prompt (registered as `<backbone>.soft_prompt`); the active one is prepended."""


def _prepend_prompt(backbone: PreTrainedModel, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the backbone: input_ids -> inputs_embeds with the prompt in front."""
    site = site_at(backbone, "soft_prompt", PromptSite)
    if site.row_routing is not None:
        return _prepend_prompts_per_row(backbone, site, site.row_routing, args, kwargs)
    prompt = site.active_part()
    if prompt is None:
        return None
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    reject_non_empty_cache(kwargs, "prompt-tuning")
    num_tokens = prompt.num_tokens
    batch_size, length, device = batch_size_and_length(kwargs)
    check_position_budget(backbone, num_tokens, length, "prompt-tuning")

    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = backbone.get_input_embeddings()(kwargs["input_ids"])
    virtual = prompt.embeddings.to(inputs_embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
    return (), prepend_soft_tokens(kwargs, virtual, inputs_embeds, length, device)


def _drop_prompt_positions(backbone: PreTrainedModel, args: tuple, output: Any) -> Any:
    """Forward hook on the backbone: its last hidden state lines up with input_ids again.

    The prompt positions have done their work inside attention; removing them lets heads that index
    the sequence by input_ids (Llama's last-non-pad pooling) find the right token. Pooled outputs
    computed inside the backbone (BERT's pooler on position 0) are left as they are.
    """
    site = site_at(backbone, "soft_prompt", PromptSite)
    if site.row_routing is not None:
        offsets = site.row_routing.state.get(("prompt offsets", id(site)))
        return output if offsets is None else select_positions(output, offsets)
    prompt = site.active_part()
    return output if prompt is None else drop_leading_positions(output, prompt.num_tokens)


def _prepend_prompts_per_row(
    backbone: PreTrainedModel, site: PromptSite, routing: RowRouting, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """A mixed batch: each row gets its own delta's prompt (none for rows of other deltas)."""
    stacked = routing.stacked(site, lambda: _stack_prompts(site.row_parts(routing)))
    if stacked is None:
        return None
    prompts, lengths = stacked
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    reject_non_empty_cache(kwargs, "prompt-tuning")
    _, length, device = batch_size_and_length(kwargs)
    row_lengths = lengths[routing.index]
    check_position_budget(backbone, int(row_lengths.max()), length, "prompt-tuning")
    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = backbone.get_input_embeddings()(kwargs["input_ids"])
    kwargs, offsets = place_soft_tokens_per_row(
        kwargs, prompts[routing.index], row_lengths, inputs_embeds, length, device
    )
    routing.state[("prompt offsets", id(site))] = offsets
    return (), kwargs


@torch.no_grad()
def _stack_prompts(parts: list[SoftPrompt | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The routed deltas' prompts zero-padded to the longest, and each one's length (0: no prompt)."""
    present = [prompt for prompt in parts if prompt is not None]
    if not present:
        return None
    reference = present[0].embeddings
    lengths = torch.tensor([0 if prompt is None else prompt.num_tokens for prompt in parts], device=reference.device)
    stack = reference.new_zeros(len(parts), int(lengths.max()), reference.shape[1])
    for group, prompt in enumerate(parts):
        if prompt is not None:
            stack[group, : prompt.num_tokens] = prompt.embeddings
    return stack, lengths


def install_prompt_site(
    backbone: nn.Module,
    attribute: str,
    site_class: type[SiteT],
    pre_hook: Callable[..., Any],
    post_hook: Callable[..., Any],
) -> SiteT:
    """The site `backbone.<attribute>`, created with its hooks the first time a delta needs it."""
    site = getattr(backbone, attribute, None)
    if not isinstance(site, site_class):
        site = site_class()
        setattr(backbone, attribute, site)
        # first of the backbone's pre-hooks: in a batch mixing prompts with prefixes, the prefix hook
        # numbers the positions the prompt hook laid out
        backbone.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
        backbone.register_forward_hook(post_hook)
    return site


@register("prompt-tuning", PromptTuningConfig)
class PromptTuning(Method):
    """Prompt tuning: L trainable soft-token embeddings in front of the input (and the task head)."""

    batch_mixing = "per-row"

    # Lester et al. used lr 0.3 with Adafactor, whose steps scale with each tensor's RMS. AdamW steps
    # every entry by about lr regardless of scale, and embedding entries are ~0.02-0.1, so 0.3 would
    # blow the prompt up; 3e-2 still moves it far per step, which prompt tuning needs (the whole
    # signal passes through L vectors, and small lrs barely leave the initialisation).
    default_learning_rate = 3e-2
    # `lr_search: auto`: the default and above it. On STS-B (MiniLM-L6) the search over 3e-3..1e-1 chose its
    # highest candidate; over 3e-2..1 dev was flat (0.878-0.882 at the rungs) and 0.3 was chosen, inside
    learning_rate_candidates = (3e-2, 1e-1, 3e-1, 1.0)

    def apply(self, model: nn.Module, name: str = DEFAULT_DELTA) -> None:
        backbone = backbone_of(model)
        table = word_embeddings(backbone).weight
        with torch.no_grad():
            initial = initial_prompt(self.config, self.tokenizer, model, table)
        super().apply(model, name)
        site = install_prompt_site(backbone, "soft_prompt", PromptSite, _prepend_prompt, _drop_prompt_positions)
        site.add_part(model, name, SoftPrompt(initial.to(table.dtype)), self.name)

    def trainable_names(self, model: nn.Module) -> set[str]:
        return own_parameter_names(model, self._applied_name()) | head_names(model)


def initial_prompt(
    config: PromptTuningConfig, tokenizer, model: nn.Module, word_embeddings: torch.Tensor
) -> torch.Tensor:
    """The prompt's starting vectors by `config.init` (the tokenizer is needed for init=text)."""
    length = config.num_virtual_tokens
    if config.init == "random":
        # Lester et al. drew uniform [-0.5, 0.5] for T5, whose embeddings are that large; BERT's and
        # Llama's are ~10x smaller, so match the embedding matrix's own spread instead
        return torch.randn(length, word_embeddings.shape[1], device=word_embeddings.device) * word_embeddings.std()
    if config.init == "vocab":
        token_ids = torch.randint(0, word_embeddings.shape[0], (length,), device=word_embeddings.device)
        return word_embeddings[token_ids].clone()
    tokenizer = tokenizer or find_tokenizer(
        model,
        "prompt-tuning with method.init=text embeds method.init_text with the model's tokenizer",
        "Use method.init=vocab or method.init=random, or set the method's `tokenizer` attribute before applying it.",
    )
    # no [CLS]/[SEP] or BOS: the prompt should start from the text's words, not copies of markers
    text_ids = list(tokenizer(config.init_text, add_special_tokens=False)["input_ids"])
    if not text_ids:
        raise DeltatuneError(
            f"method.init_text={config.init_text!r} has no tokens for this model's "
            "tokenizer; give a text with words in it, or use method.init=vocab."
        )
    repeats = -(-length // len(text_ids))  # ceil: repeat a short text, then cut to length
    token_ids = torch.tensor((text_ids * repeats)[:length], device=word_embeddings.device)
    return word_embeddings[token_ids].clone()
