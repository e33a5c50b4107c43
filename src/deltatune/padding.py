"""The pad token, defined once: which token a tokenizer pads with, and which id batches are padded with.

Decoders usually ship without a pad token. Padding with eos is the common convention; the attention
mask (and the model's `pad_token_id`, set from the tokenizer) keeps padded positions out of every
result, so the id itself only has to be a valid one.
"""

from __future__ import annotations

from typing import Any


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its eos token as pad token (unchanged when it has neither)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def padding_id(tokenizer: Any) -> int:
    """The id to pad batches with: the tokenizer's pad token, or 0 when it has none (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


__all__ = ["ensure_pad_token", "padding_id"]
