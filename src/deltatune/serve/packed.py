"""Mixed batches through an encoder's layers without padding: every token packed, each row's tokens attended alone.

A right-padded batch computes every linear layer, LayerNorm and delta site at every padding position too.
Requests reach a server in any order, so one batch holds texts of 3 and 128 tokens side by side: measured
on the serving benchmark's requests (MiniLM-L6, batches of 64 in arrival order), such batches hold 1.4x the
padded tokens of the same inputs sorted by length across a whole workload and need twice the forward passes.

Within the encoder nothing but attention mixes positions. So for the duration of one forward pass the
encoder (`backbone.encoder` of a BERT or RoBERTa model) is given the batch's real tokens alone, one after another, as
a batch of one-token rows `(tokens, 1, width)`:

- every linear layer, LayerNorm and activation runs on the real tokens only;
- every delta site sees one row per token and routes it by its row's delta (`RowMixer.per_token`): the
  sites' per-row code is unchanged, and with the rows grouped by delta each delta's tokens are one slice;
- attention (an attention function registered with transformers, switched in for the duration) regathers each row's
  tokens into padded groups of rows of similar length, runs SDPA with a key mask, and scatters the
  outputs back, so attention costs what it costs on length-sorted padded rows.

The embeddings run on the real tokens too (each token with the position and token type it has in its padded
row; a delta's embedding LayerNorm or bias routed per token), and the pooler and heads on the padded rows
after (padding positions zeroed, which no pooling reads), routed per row as usual. A row alone in its
attention group (batch invariance, below) attends on its slice of the packed tokens, without a gather.
Only deltas whose method declares `position_wise` (its sites act on each token alone: LoRA, (IA)3,
BitFit, LayerNorm tuning, adapters) are packed; prompts and prefixes add tokens or change attention, and
their batches run padded. Outputs equal the padded forward's up to floating-point rounding (tested per
method on a tiny BERT, and on a tiny RoBERTa).

Batch invariance (`MultiTaskModel.batch_invariant`, on by default; `deltatune serve --no-batch-invariant` turns
it off). Without it a row's answer depends, at the last bits, on the rows that share its forward pass: attention
runs each row padded to the longest of its group, and SDPA's result for a row changes with that width (up to one
bf16 step, 3.9e-3, in a row's attention output on a 2-core AMD Zen 4). The answers to 559 of 2,048 requests then
differ in their last bits between calls of 64 in arrival order and one sorted call
(`benchmarks/batch_invariance.py`). With it, every mixed batch of position-wise deltas runs packed, each row
attends in a group of rows of exactly its own length, with no mask (and in either mode a lone adapter at a site
adds its bias after the matmul, as joined adapters do): nothing a row computes depends on another row, provided
the matmuls give a row the same bits whatever the rows beside it. oneDNN's bf16 matmuls do, from two rows up, on
the AMD Zen 4 measured (MKL's fp32 matmuls do not: a row's bits change between 7 and 8 rows), so the guarantee
is bf16 on such a CPU; elsewhere answers agree to rounding. The price is more, smaller attention calls, and
packing where padding would not cost: 0.95-0.99x on a length-sorted call, 0.98-1.03x on arrival-order calls (two
runs, docs/results/serve.md).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.attention import register_attention
from deltatune.batching import padding_aware_batches
from deltatune.methods.state import RowMixer, attached_deltas

ATTENTION_NAME = "deltatune_packed"
PACKABLE_MODEL_TYPES = frozenset({"bert", "roberta"})
"""Encoders whose layers take (hidden states, attention mask), use transformers' attention-function registry
and mix positions nowhere but in self-attention, and whose packed outputs are tested against padded ones."""


@dataclass
class _Group:
    """Rows of similar length whose tokens attend together, padded to the longest of them."""

    rows: int
    width: int
    gather: torch.Tensor
    """(rows · width,) the packed token at each padded position (a padding position reads token 0, masked)."""
    key_mask: torch.Tensor | None
    """(rows, 1, 1, width) bool: which keys are real tokens; None where every row is `width` long."""
    real: torch.Tensor
    """The padded positions (of rows · width) that are real tokens, in packed order."""
    tokens: torch.Tensor
    """The packed tokens they hold."""
    span: tuple[int, int] | None = None
    """(first, end) packed token of a group of one row without padding: its tokens are a slice, not a gather."""


_local = threading.local()


def packable(model: nn.Module, methods: list) -> bool:
    """Whether a mixed batch of deltas of `methods` (None: the base alone) may run packed on `model`."""
    backbone = getattr(model, "base_model", None)
    config = getattr(backbone, "config", None)
    return (
        getattr(config, "model_type", None) in PACKABLE_MODEL_TYPES
        and isinstance(getattr(getattr(backbone, "encoder", None), "layer", None), nn.ModuleList)
        and not getattr(config, "is_decoder", False)
        and register_attention(ATTENTION_NAME, packed_attention)
        and all(method is None or method.position_wise for method in methods)
    )


def packable_deltas(model: nn.Module, names: list[str | None]) -> bool:
    """`packable` for a batch routing these delta names."""
    methods = attached_deltas(model).methods
    return packable(model, [None if name is None else methods[name] for name in dict.fromkeys(names)])


def _layout(lengths: list[int], device: torch.device, exact: bool = False) -> list[_Group]:
    """Rows (packed one after another, `lengths[row]` tokens each) cut into attention groups of similar length;
    `exact`: of equal length, so no row's attention sees padding (`MultiTaskModel.batch_invariant`)."""
    starts = [0, *accumulate(lengths[:-1])]
    if exact:
        same: dict[int, list[int]] = {}
        for row, length in enumerate(lengths):
            same.setdefault(length, []).append(row)
        batches = list(same.values())
    else:
        batches = padding_aware_batches(lengths, len(lengths))
    groups = []
    for batch in batches:
        width = max(lengths[row] for row in batch)
        positions = torch.arange(width)
        valid = positions[None, :] < torch.tensor([lengths[row] for row in batch])[:, None]
        index = torch.tensor([starts[row] for row in batch])[:, None] + positions[None, :]
        real = valid.flatten().nonzero().flatten()
        alone = exact and len(batch) == 1
        groups.append(
            _Group(
                len(batch),
                width,
                torch.where(valid, index, torch.zeros_like(index)).flatten().to(device),
                None if exact else valid[:, None, None, :].to(device),
                real.to(device),
                index.flatten()[real].to(device),
                (starts[batch[0]], starts[batch[0]] + width) if alone else None,
            )
        )
    return groups


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers' attention-function signature over packed tokens: query, key and value are (tokens, heads,
    1, head width); each row's tokens attend to each other only. Returns (tokens, 1, heads, head width)."""
    groups: list[_Group] = _local.layout
    query, key, value = query[:, :, 0], key[:, :, 0], value[:, :, 0]  # (tokens, heads, head width)
    heads, head_width = query.shape[1:]
    output = torch.empty_like(query)
    for group in groups:
        if group.span is not None:  # one row, unpadded: its tokens in place
            start, end = group.span
            row_query, row_key, row_value = (
                tensor[start:end].view(1, end - start, heads, head_width).transpose(1, 2)
                for tensor in (query, key, value)
            )
            attended = F.scaled_dot_product_attention(row_query, row_key, row_value, scale=scaling)
            output[start:end] = attended.transpose(1, 2).reshape(-1, heads, head_width)
            continue
        grouped_query, grouped_key, grouped_value = (
            tensor.index_select(0, group.gather).view(group.rows, group.width, heads, head_width).transpose(1, 2)
            for tensor in (query, key, value)
        )  # (rows, heads, width, head width)
        attended = F.scaled_dot_product_attention(
            grouped_query, grouped_key, grouped_value, attn_mask=group.key_mask, scale=scaling
        )
        padded = attended.transpose(1, 2).reshape(-1, heads, head_width)
        output.index_copy_(0, group.tokens, padded.index_select(0, group.real))
    return output.unsqueeze(1), None


def _default_positions(embeddings: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The position ids the embeddings module computes for right-padded `input_ids` when given none: RoBERTa's
    count from its padding index, BERT's from zero."""
    create = getattr(embeddings, "create_position_ids_from_input_ids", None)
    if create is not None:
        return create(input_ids, embeddings.padding_idx)
    width = input_ids.shape[1]
    return embeddings.position_ids[:, :width].expand(input_ids.shape[0], width)


@contextmanager
def packed_encoder(
    model: nn.Module, mixer: RowMixer, attention_mask: torch.Tensor, exact: bool = False
) -> Iterator[None]:
    """Within the block, one forward pass of `model` (its rows routed by `mixer`, grouped by delta, right-padded
    as `attention_mask` says) runs its embeddings and encoder on the real tokens alone: see the module docstring.
    `exact`: each row attends in a group of rows of its own length, without padding (`_layout`)."""
    backbone: Any = model.base_model
    encoder: Any = backbone.encoder
    embeddings: Any = backbone.embeddings
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    layout = _layout(lengths.tolist(), keep.device, exact)
    rows = mixer.routing
    assert rows is not None  # the caller routed this batch
    tokens = mixer.per_token(lengths)
    embedded: list[torch.Tensor] = []
    original_embeddings, original = embeddings.forward, encoder.forward

    def embed(input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        if input_ids is None or inputs_embeds is not None:  # not a batch of token ids: as the model would
            return original_embeddings(
                input_ids=input_ids,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )
        if position_ids is None:
            position_ids = _default_positions(embeddings, input_ids)
        if token_type_ids is None:  # what both models' buffers hold
            token_type_ids = torch.zeros_like(input_ids)
        mixer.use(tokens)  # a delta's embedding LayerNorm or bias sees one row per token
        try:
            packed = original_embeddings(
                input_ids=input_ids[keep][:, None],
                token_type_ids=token_type_ids.expand_as(input_ids)[keep][:, None],
                position_ids=position_ids.expand_as(input_ids)[keep][:, None],
                **kwargs,
            )
        finally:
            mixer.use(rows)
        embedded.append(packed)
        unpacked = packed.new_zeros((*keep.shape, packed.shape[-1]))
        unpacked[keep] = packed[:, 0]
        return unpacked

    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)  # the embeddings used them; the packed layers need none
        config = backbone.config
        implementation = config._attn_implementation
        _local.layout = layout
        mixer.use(tokens)
        config._attn_implementation = ATTENTION_NAME
        try:
            packed_input = embedded.pop() if embedded else hidden_states[keep].unsqueeze(1)
            output = original(packed_input, None, **kwargs)
        finally:
            config._attn_implementation = implementation
            mixer.use(rows)
            _local.layout = None
        packed = output.last_hidden_state[:, 0]
        unpacked = packed.new_zeros((*keep.shape, packed.shape[-1]))
        unpacked[keep] = packed
        output.last_hidden_state = unpacked
        return output

    patched = {module: "forward" in vars(module) for module in (embeddings, encoder)}  # instance-level already
    embeddings.forward, encoder.forward = embed, forward
    try:
        yield
    finally:
        for module, wrapped in ((embeddings, original_embeddings), (encoder, original)):
            if patched[module]:
                module.forward = wrapped  # put another wrapper back
            else:
                del module.forward  # the class's forward again


__all__ = ["ATTENTION_NAME", "PACKABLE_MODEL_TYPES", "packable", "packable_deltas", "packed_encoder"]
