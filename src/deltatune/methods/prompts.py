"""What the methods that rewrite the backbone's call share (prompt tuning, prefix tuning,
input-dependent prompts, recursive LMs): finding the backbone and rewriting its call.

These methods leave the training loop alone. The loop calls the task model with right-padded
`input_ids`, `attention_mask` and sometimes `token_type_ids`; the task model calls its backbone
(`model.bert`, `model.model`, ...). A forward pre-hook on the backbone rewrites that call: prompt
tuning turns `input_ids` into `inputs_embeds` with the soft prompt in front, prefix tuning passes
the prefix keys/values as a cache. Either way the attention mask gains ones for the virtual
tokens. The hooks are plain functions that find their parameters on the module they run on (the
active delta's part of the method's site there), so a deep copy of the model runs its own copy of
them, and with no delta of the method active they leave the call alone.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import nn
from transformers import PreTrainedModel

from deltatune.errors import DeltatuneError
from deltatune.methods.common import text_config


def backbone_of(model: nn.Module) -> PreTrainedModel:
    """The pretrained transformer inside a task model (`BertModel`, `LlamaModel`, ...)."""
    backbone = getattr(model, "base_model", model)
    if backbone is model or not isinstance(backbone, PreTrainedModel):
        raise DeltatuneError(
            f"{type(model).__name__} is not a task model with a separate backbone (like "
            "BertForSequenceClassification or LlamaForSequenceClassification); prompt and prefix tuning "
            "need one to attach to."
        )
    return backbone


def word_embeddings(backbone: PreTrainedModel) -> nn.Embedding:
    """The backbone's table of input embeddings."""
    embeddings = backbone.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise DeltatuneError(
            f"{type(backbone).__name__}'s input embeddings are a {type(embeddings).__name__}, not "
            "a table of word embeddings; soft prompts are learned in such a table's space."
        )
    return embeddings


def output_embeddings(causal_lm: PreTrainedModel) -> nn.Module:
    """The causal LM's language-model head (hidden states to logits over the vocabulary)."""
    head = causal_lm.get_output_embeddings()
    if head is None:
        raise DeltatuneError(
            f"{type(causal_lm).__name__} has no language-model head; load a causal LM "
            "(deltatune.sources.models.load_causal_lm)."
        )
    return head


def find_tokenizer(model: nn.Module, why: str, fix: str):
    """The tokenizer saved next to the model (a local directory or the hub cache); never downloads.

    `why` says what the method needs it for and `fix` how to do without, for the error message.
    """
    location = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    problem = "the model was not loaded from a directory"
    if location:
        from transformers import AutoTokenizer

        # which exception transformers raises depends on what is missing (OSError, ValueError, ...)
        try:
            return AutoTokenizer.from_pretrained(location, local_files_only=True)
        except Exception as error:
            problem = f"loading it from {location!r} failed ({str(error).splitlines()[0]})"
    raise DeltatuneError(f"{why}, but {problem}. {fix}")


@cache
def _forward_parameter_names(module_class: type[nn.Module]) -> tuple[str, ...]:
    parameters = list(inspect.signature(module_class.forward).parameters.values())[1:]  # drop self
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def arguments_as_keywords(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's positional arguments moved into keywords (task models pass input_ids positionally)."""
    names = _forward_parameter_names(type(module))  # type: ignore[arg-type]  # a class is hashable; mypy sees an unbound __hash__
    if len(args) > len(names):
        raise RuntimeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    return {**dict(zip(names, args, strict=False)), **kwargs}  # fewer positional arguments than parameters


def cache_keyword(module: nn.Module) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated until 5.40)."""
    names = inspect.signature(type(module).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise DeltatuneError(
        f"{type(module).__name__} takes no key/value cache (neither a `cache` nor a `past_key_values` "
        "argument), so prefix tuning cannot reach its attention layers. Use prompt-tuning or another method."
    )


def reject_non_empty_cache(kwargs: dict, method_name: str) -> None:
    """Incremental decoding would add the virtual tokens again at every step: not supported."""
    for key in ("cache", "past_key_values"):
        existing = kwargs.get(key)
        if existing is not None and hasattr(existing, "get_seq_length") and existing.get_seq_length() > 0:
            raise DeltatuneError(
                f"{method_name} adds its virtual tokens on every forward call, so it cannot "
                "continue from a filled key/value cache (incremental decoding). Call the model "
                "on whole sequences."
            )


def prepend_to_mask(
    attention_mask: torch.Tensor | None, num_tokens: int, batch_size: int, length: int, device: torch.device
) -> torch.Tensor:
    """Ones for the virtual tokens in front of the mask; a missing mask means every token counts.

    The mask is always materialised: encoders given a cache infer the key length from the mask's
    width, so without one they would not see the prefix.
    """
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
    ones = torch.ones(batch_size, num_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=1)


def prepend_soft_tokens(
    kwargs: dict, vectors: torch.Tensor, inputs_embeds: torch.Tensor, length: int, device: torch.device
) -> dict:
    """Backbone keywords with `vectors` (batch, tokens, hidden) in front of `inputs_embeds`.

    The attention mask, token types (the prompt belongs to the first segment) and position ids (the
    prompt takes 0..T-1, the input follows) are extended to match; input_ids give way to the embeddings.
    """
    batch_size, num_tokens = vectors.shape[:2]
    kwargs["inputs_embeds"] = torch.cat([vectors, inputs_embeds], dim=1)
    kwargs["input_ids"] = None
    kwargs["attention_mask"] = prepend_to_mask(kwargs.get("attention_mask"), num_tokens, batch_size, length, device)
    if kwargs.get("token_type_ids") is not None:
        token_type_ids = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch_size, num_tokens), token_type_ids], 1)
    if kwargs.get("position_ids") is not None:
        position_ids = kwargs["position_ids"]
        prompt_positions = torch.arange(num_tokens, device=position_ids.device).expand(position_ids.shape[0], -1)
        kwargs["position_ids"] = torch.cat([prompt_positions, position_ids + num_tokens], dim=1)
    return kwargs


def place_soft_tokens_per_row(
    kwargs: dict,
    vectors: torch.Tensor,
    row_lengths: torch.Tensor,
    inputs_embeds: torch.Tensor,
    length: int,
    device: torch.device,
) -> tuple[dict, torch.Tensor]:
    """Backbone keywords where row r reads its own first `row_lengths[r]` of `vectors` (batch, T, hidden),
    then its input, then unused slots, masked out (a batch mixing deltas with prompts of several lengths).

    Each row sees exactly what `prepend_soft_tokens` gives it alone: its prompt at positions 0..T_r-1 (so
    a head reading position 0 reads the prompt's first token) and its input from position T_r on. Returns
    the keywords and, per row, where its input tokens sit (for `select_positions` on the output).
    """
    batch_size, num_tokens, hidden = vectors.shape
    total = num_tokens + length
    offsets = row_lengths[:, None] + torch.arange(length, device=device)
    spread = offsets[..., None].expand(-1, -1, hidden)
    embeds = inputs_embeds.new_zeros(batch_size, total, hidden)
    embeds[:, :num_tokens] = vectors.to(inputs_embeds.dtype)
    kwargs["inputs_embeds"] = embeds.scatter(1, spread, inputs_embeds)
    kwargs["input_ids"] = None
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
    slots = torch.arange(num_tokens, device=device)
    mask = attention_mask.new_zeros(batch_size, total)
    mask[:, :num_tokens] = (slots[None, :] < row_lengths[:, None]).to(mask.dtype)
    kwargs["attention_mask"] = mask.scatter(1, offsets, attention_mask)
    input_positions = kwargs.get("position_ids")
    if input_positions is None:
        input_positions = torch.arange(length, device=device).expand(batch_size, -1)
    positions = torch.zeros(batch_size, total, dtype=torch.long, device=device)
    positions[:, :num_tokens] = slots
    kwargs["position_ids"] = positions.scatter(1, offsets, input_positions + row_lengths[:, None])
    if kwargs.get("token_type_ids") is not None:
        token_type_ids = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = token_type_ids.new_zeros(batch_size, total).scatter(1, offsets, token_type_ids)
    return kwargs, offsets


def select_positions(output, offsets: torch.Tensor):
    """A backbone output whose last hidden state keeps, per row, only the positions `offsets` (batch, n)."""
    hidden = output[0] if isinstance(output, tuple) else output["last_hidden_state"]
    selected = torch.gather(hidden, 1, offsets[..., None].expand(-1, -1, hidden.shape[-1]))
    if isinstance(output, tuple):
        return (selected, *output[1:])
    output["last_hidden_state"] = selected
    return output


def check_position_budget(backbone: nn.Module, num_tokens: int, length: int, method_name: str) -> None:
    """Models with learned absolute positions (BERT) have a hard limit the virtual tokens count against."""
    embeddings = getattr(backbone, "embeddings", None)
    if getattr(embeddings, "position_embeddings", None) is None:
        return  # rotary or relative positions (Llama): no table to run off the end of
    limit = text_config(backbone).max_position_embeddings
    if num_tokens + length > limit:
        raise DeltatuneError(
            f"{method_name} puts {num_tokens} virtual tokens before the input, and this model has "
            f"{limit} positions, so inputs can be at most {limit - num_tokens} tokens long; got {length}. "
            f"Pass --max-length={limit - num_tokens} (or fewer), or lower method.num_virtual_tokens."
        )


def drop_leading_positions(output, num_tokens: int):
    """A backbone output whose last hidden state loses its first `num_tokens` positions."""
    if isinstance(output, tuple):
        return (output[0][:, num_tokens:], *output[1:])
    output["last_hidden_state"] = output["last_hidden_state"][:, num_tokens:]
    return output


def batch_size_and_length(kwargs: dict) -> tuple[int, int, torch.device]:
    if kwargs.get("input_ids") is not None:
        input_ids = kwargs["input_ids"]
        return input_ids.shape[0], input_ids.shape[1], input_ids.device
    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        raise DeltatuneError("The model was called with neither input_ids nor inputs_embeds.")
    return inputs_embeds.shape[0], inputs_embeds.shape[1], inputs_embeds.device
