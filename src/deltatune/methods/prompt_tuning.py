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
  - Llama-style heads pool the last non-pad token, found from input_ids. PEFT hands the model
    inputs_embeds instead, so the head falls back to the last position, which is padding in a
    right-padded batch. Here the task model still receives input_ids: the prompt is added inside
    the backbone, and the backbone's output drops the L prompt positions again, so the head's
    index lines up with input_ids and every example of a right-padded batch gets the logits it
    gets alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods._prompts import (
    arguments_as_keywords,
    backbone_of,
    batch_size_and_length,
    check_position_budget,
    prepend_soft_tokens,
    reject_non_empty_cache,
)
from deltatune.methods.common import head_names
from deltatune.methods.registry import register


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


def _prepend_prompt(backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on the backbone: input_ids -> inputs_embeds with the prompt in front."""
    kwargs = arguments_as_keywords(backbone, args, kwargs)
    reject_non_empty_cache(kwargs, "prompt-tuning")
    prompt = backbone.soft_prompt
    num_tokens = prompt.num_tokens
    batch_size, length, device = batch_size_and_length(kwargs)
    check_position_budget(backbone, num_tokens, length, "prompt-tuning")

    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = backbone.get_input_embeddings()(kwargs["input_ids"])
    virtual = prompt.embeddings.to(inputs_embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
    return (), prepend_soft_tokens(kwargs, virtual, inputs_embeds, length, device)


def _drop_prompt_positions(backbone: nn.Module, args: tuple, output):
    """Forward hook on the backbone: its last hidden state lines up with input_ids again.

    The prompt positions have done their work inside attention; removing them lets heads that index
    the sequence by input_ids (Llama's last-non-pad pooling) find the right token. Pooled outputs
    computed inside the backbone (BERT's pooler on position 0) are left as they are.
    """
    num_tokens = backbone.soft_prompt.num_tokens
    if isinstance(output, tuple):
        return (output[0][:, num_tokens:], *output[1:])
    output["last_hidden_state"] = output["last_hidden_state"][:, num_tokens:]
    return output


@register("prompt-tuning", PromptTuningConfig)
class PromptTuning:
    """Prompt tuning: L trainable soft-token embeddings in front of the input (and the task head)."""

    # Lester et al. used lr 0.3 with Adafactor, whose steps scale with each tensor's RMS. AdamW steps
    # every entry by about lr regardless of scale, and embedding entries are ~0.02-0.1, so 0.3 would
    # blow the prompt up; 3e-2 still moves it far per step, which prompt tuning needs (the whole
    # signal passes through L vectors, and small lrs barely leave the initialisation).
    default_learning_rate = 3e-2
    # `lr_search: auto`: around the default (Lester et al. used 0.3 with Adafactor)
    learning_rate_candidates = (3e-3, 1e-2, 3e-2, 1e-1)

    def __init__(self, config: PromptTuningConfig) -> None:
        self.config = config
        self.tokenizer = None
        """The model's tokenizer for init=text; when unset, it is loaded from the model's own directory."""

    def apply(self, model: nn.Module) -> None:
        backbone = backbone_of(model)
        if hasattr(backbone, "soft_prompt"):
            raise RuntimeError("prompt-tuning: apply() ran twice on the same model")
        word_embeddings = backbone.get_input_embeddings().weight
        with torch.no_grad():
            initial = self.initial_prompt(model, word_embeddings)
        backbone.soft_prompt = SoftPrompt(initial.to(word_embeddings.dtype))
        backbone.register_forward_pre_hook(_prepend_prompt, with_kwargs=True)
        backbone.register_forward_hook(_drop_prompt_positions)

    def initial_prompt(self, model: nn.Module, word_embeddings: torch.Tensor) -> torch.Tensor:
        length = self.config.num_virtual_tokens
        if self.config.init == "random":
            # Lester et al. drew uniform [-0.5, 0.5] for T5, whose embeddings are that large; BERT's and
            # Llama's are ~10x smaller, so match the embedding matrix's own spread instead
            return torch.randn(length, word_embeddings.shape[1], device=word_embeddings.device) * word_embeddings.std()
        if self.config.init == "vocab":
            token_ids = torch.randint(0, word_embeddings.shape[0], (length,), device=word_embeddings.device)
            return word_embeddings[token_ids].clone()
        token_ids = self.init_token_ids(model)
        repeats = -(-length // len(token_ids))  # ceil: repeat a short text, then cut to length
        token_ids = torch.tensor((token_ids * repeats)[:length], device=word_embeddings.device)
        return word_embeddings[token_ids].clone()

    def init_token_ids(self, model: nn.Module) -> list[int]:
        tokenizer = self.tokenizer or self.find_tokenizer(model)
        # no [CLS]/[SEP] or BOS: the prompt should start from the text's words, not copies of markers
        token_ids = list(tokenizer(self.config.init_text, add_special_tokens=False)["input_ids"])
        if not token_ids:
            raise DeltatuneError(f"method.init_text={self.config.init_text!r} has no tokens for this model's "
                                 "tokenizer; give a text with words in it, or use method.init=vocab.")
        return token_ids

    def find_tokenizer(self, model: nn.Module):
        """The tokenizer saved next to the model (a local directory or the hub cache); never downloads."""
        location = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        problem = "the model was not loaded from a directory"
        if location:
            from transformers import AutoTokenizer

            # which exception transformers raises depends on what is missing (OSError, ValueError, ...)
            try:
                return AutoTokenizer.from_pretrained(location, local_files_only=True)
            except Exception as error:
                problem = f"loading it from {location!r} failed ({str(error).splitlines()[0]})"
        raise DeltatuneError(
            f"prompt-tuning with method.init=text embeds method.init_text with the model's tokenizer, but {problem}. "
            "Use method.init=vocab or method.init=random, or set the method's `tokenizer` attribute before "
            "applying it.")

    def trainable_names(self, model: nn.Module) -> set[str]:
        prompt_ids = {id(backbone_of(model).soft_prompt.embeddings)}
        return {n for n, p in model.named_parameters() if id(p) in prompt_ids} | head_names(model)
