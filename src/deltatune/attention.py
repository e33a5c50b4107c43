"""Attention functions of deltatune's own, registered with transformers' attention registry by name.

A model whose config names such a function (`config._attn_implementation`) calls it in every self-attention
layer with transformers' signature: (module, query, key, value, attention_mask, dropout=..., scaling=...,
**kwargs). Masks for it are built as for SDPA. Used by `deltatune.fast_dropout` (attention dropout at a
third of torch's cost while training) and `deltatune.serve.packed` (packed tokens at inference).
"""

from __future__ import annotations

from collections.abc import Callable

_registered: dict[str, bool] = {}


def register_attention(name: str, function: Callable) -> bool:
    """Register `function` under `name` once (masks as for SDPA); False where transformers has no registry."""
    if name not in _registered:
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        except ImportError:  # an older transformers without the attention registry
            _registered[name] = False
        else:
            AttentionInterface.register(name, function)
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
            _registered[name] = True
    return _registered[name]


__all__ = ["register_attention"]
