"""Dropout that costs a third of torch's on a CPU, for the training loop.

torch's CPU dropout (`bernoulli_`) draws one Mersenne-twister number per element. Profiling a bf16
BitFit step of MiniLM-L6 (batch 32) put it at 27% of the step, more than any matrix multiply: BERT
drops out the embeddings, every attention probability matrix and two hidden states per layer. Here
each 64-bit draw from the same generator feeds four 16-bit lanes, and an element is kept when its
lane clears a threshold, so one draw decides four elements (a keep probability within 1/65,536 of
1 - p). The mask is saved as bytes for backward, as torch's own dropout does.

`dropout_set_to(model, p)` sets every dropout probability of a model for a block (`TrainConfig.dropout`).

`fast_dropout(model)` swaps this in for the duration of training and puts everything back after:
every `nn.Dropout` module, and attention dropout through an attention function registered with
transformers that computes attention with this mask while training and defers to SDPA otherwise.
Seeding is unchanged: the draws come from torch's default generator, so `torch.manual_seed` still
makes a run repeatable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PretrainedConfig

from deltatune.attention import register_attention

ATTENTION_NAME = "deltatune_sdpa"
_LANE_STATES = 65536


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - p (to 1/65,536)."""
    count = 1
    for size in shape:
        count *= size
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    lanes = draws.view(torch.int16)[:count]
    return (lanes >= (-_LANE_STATES // 2 + round(p * _LANE_STATES))).view(shape)


class _KeepAndScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None, None


def masked_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout, the same contract as `torch.nn.functional.dropout`."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return _KeepAndScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


def _dropout_forward(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return masked_dropout(x, self.p, self.training)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' attention-function signature: SDPA unless training with attention dropout."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not dropout or not module.training or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    q_length, k_length = scores.shape[-2:]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if attention_mask is None and is_causal and q_length > 1:
        attention_mask = torch.ones(q_length, k_length, dtype=torch.bool).tril(k_length - q_length)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :k_length]
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probabilities = masked_dropout(probabilities, dropout, True)
    output = torch.matmul(probabilities, value)
    return output.transpose(1, 2).contiguous(), None


@contextmanager
def fast_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` drops out with `keep_mask`; afterwards it is exactly as it was."""
    # typed as plain modules: the instance attribute `forward` shadows Dropout's method until deleted below
    swapped: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    for module in swapped:
        module.forward = _dropout_forward.__get__(module)
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch_attention = getattr(model, "set_attn_implementation", None)
    if not (
        previous == "sdpa"
        and _attention_dropout(config) > 0
        and switch_attention is not None
        and register_attention(ATTENTION_NAME, attention_forward)
    ):
        switch_attention = None  # attention dropout stays as it is
    if switch_attention is not None:
        switch_attention(ATTENTION_NAME)
    try:
        yield model
    finally:
        for module in swapped:
            del module.forward
        if switch_attention is not None:
            switch_attention(previous)


_FLOAT_DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "dropout_rate")
"""Module attributes some architectures keep their dropout in as a plain number (Llama's attention, T5's)."""


def _is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextmanager
def dropout_set_to(model: nn.Module, p: float) -> Iterator[nn.Module]:
    """Within the block every dropout of `model` drops with probability `p`; afterwards it is as it was.

    That is every `nn.Dropout` module (the backbone's, its attention's where read from the module, the method's
    own), the numeric dropout attributes some attention modules read at each call, and the config's dropout
    fields (which attention implementations and `fast_dropout` read)."""
    restore: list[tuple[object, str, object]] = []

    def set_value(owner: object, name: str) -> None:
        restore.append((owner, name, getattr(owner, name)))
        setattr(owner, name, p)

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            set_value(module, "p")
        for name in _FLOAT_DROPOUT_ATTRIBUTES:
            if _is_probability(module.__dict__.get(name)):
                set_value(module, name)
    configs, seen = [getattr(model, "config", None)], set()
    while configs:  # the config and the sub-configs it holds (a multimodal model's text_config)
        config = configs.pop()
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        for name, value in list(vars(config).items()):
            if ("dropout" in name or name.endswith("pdrop")) and _is_probability(value):
                set_value(config, name)
            elif isinstance(value, PretrainedConfig):
                configs.append(value)
    try:
        yield model
    finally:
        for owner, name, value in reversed(restore):
            setattr(owner, name, value)


def _attention_dropout(config) -> float:
    for name in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "attention_probs_dropout"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


__all__ = ["dropout_set_to", "fast_dropout", "masked_dropout", "keep_mask", "attention_forward", "ATTENTION_NAME"]
