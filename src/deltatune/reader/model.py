"""The frozen reader (Levine et al. 2022, "Standing on the Shoulders of Giant Frozen Language Models",
arXiv:2204.10019): a frozen decoder answers a question by reading retrieved passages; only a small
component trains.

    candidates  = BM25 top-N passages for the question q
    ranked      = re-ranker order of the candidates (or BM25's, without a re-ranker)
    input       = [P] "Passage: p_1 \\n\\n ... Passage: p_k \\n\\n" template(q)     (P: soft prompt, L vectors)
    answer      = greedy decoding by the frozen decoder, up to the first newline

What trains (the decoder's weights never change; `frozen_weights_digest` checks it):
  - the soft prompt P ∈ R^{L×d}: L·d parameters (20 × 576 = 11,520 on SmolLM2-135M), trained by the
    answer's next-token loss given the passages (prompt tuning for the frozen reader, Lester et al. 2021);
    with k = 0 passages the same prompt is closed-book prompt tuning, the reader's natural baseline;
  - the re-ranker, a bi-encoder over the frozen decoder's input embeddings:
        e(x) = mean_t E[x_t] (frozen),  s(q, p) = g (W e(q)) · (W e(p)) / √r + a · bm25(q, p) / max bm25,
    W ∈ R^{r×d}, g (from 0) and a scalars: r·d + 2 parameters (64 × 576 + 2 = 36,866), trained with the listwise
    loss −log Σ_{p ∋ answer} softmax_p s(q, p) over the N candidates (a passage "∋ answer" when it
    contains a gold answer), the weak supervision dense retrievers learn from.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from deltatune.methods.prompts import cache_keyword, output_embeddings, word_embeddings

PASSAGE_PREFIX = "Passage: "


class SoftPrompt(nn.Module):
    """L trainable vectors in front of the reader's input; initialised from a text's token embeddings."""

    def __init__(self, embeddings: nn.Embedding, token_ids: list[int], length: int) -> None:
        super().__init__()
        repeated = (token_ids * (length // max(1, len(token_ids)) + 1))[:length]
        self.vectors = nn.Parameter(embeddings.weight[torch.tensor(repeated, dtype=torch.long)].detach().clone())

    @property
    def length(self) -> int:
        return self.vectors.shape[0]


class Reranker(nn.Module):
    """s(q, p) = g · (W e(q)) · (W e(p)) / √r + a · bm25 / max bm25, e = mean frozen input embedding.

    g starts at 0, so an untrained re-ranker keeps BM25's order exactly and training can only move away
    from it where the training questions say so (a random W alone scrambled the order)."""

    def __init__(self, hidden_size: int, rank: int = 64, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.projection = nn.Parameter(torch.randn(rank, hidden_size, generator=generator) / hidden_size**0.5)
        self.dense_weight = nn.Parameter(torch.tensor(0.0))
        self.bm25_weight = nn.Parameter(torch.tensor(1.0))

    def forward(self, question: torch.Tensor, passages: torch.Tensor, bm25: torch.Tensor) -> torch.Tensor:
        """question (B, d), passages (B, N, d), bm25 (B, N) -> scores (B, N)."""
        q = question @ self.projection.T
        p = passages @ self.projection.T
        dense = (p * q[:, None, :]).sum(-1) / self.projection.shape[0] ** 0.5
        scale = bm25.max(dim=1, keepdim=True).values.clamp(min=1e-6)
        return self.dense_weight * dense + self.bm25_weight * bm25 / scale


def reranker_loss(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """−log of the softmax mass on the passages that contain an answer; rows without one are skipped."""
    keep = positive.any(dim=1)
    if not keep.any():
        return scores.sum() * 0.0
    log_probabilities = F.log_softmax(scores[keep], dim=1)
    return -torch.logsumexp(log_probabilities.masked_fill(~positive[keep], -torch.inf), dim=1).mean()


def mean_embeddings(embeddings: nn.Embedding, token_lists: list[list[int]]) -> torch.Tensor:
    """(n, d): the mean input embedding of each token list (zeros for an empty one), in one bag lookup."""
    flat = torch.tensor([token for ids in token_lists for token in ids], dtype=torch.long)
    offsets = torch.tensor([0] + [len(ids) for ids in token_lists[:-1]], dtype=torch.long).cumsum(0)
    return F.embedding_bag(flat, embeddings.weight, offsets, mode="mean").detach()


def frozen_weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of the decoder: equal before and after training."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _embed_rows(
    causal_lm: PreTrainedModel, rows: list[list[int]], prompt: SoftPrompt | None, pad_left: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention_mask, position_ids) for token rows with the soft prompt in front of each;
    padded on the left (generation) or right (training)."""
    embeddings = word_embeddings(causal_lm)
    prompt_length = prompt.length if prompt is not None else 0
    width = prompt_length + max(len(ids) for ids in rows)
    hidden = embeddings.weight.shape[1]
    inputs = embeddings.weight.new_zeros(len(rows), width, hidden)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, ids in enumerate(rows):
        length = prompt_length + len(ids)
        start = width - length if pad_left else 0
        pieces = ([prompt.vectors] if prompt is not None else []) + [embeddings(torch.tensor(ids, dtype=torch.long))]
        inputs[row, start : start + length] = torch.cat(pieces)
        mask[row, start : start + length] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return inputs, mask, positions


def answer_loss(
    causal_lm: PreTrainedModel, contexts: list[list[int]], answers: list[list[int]], prompt: SoftPrompt | None
) -> torch.Tensor:
    """Mean next-token cross-entropy of each answer (its tokens and the closing newline) after its context."""
    rows = [context + answer for context, answer in zip(contexts, answers, strict=True)]
    inputs, mask, positions = _embed_rows(causal_lm, rows, prompt, pad_left=False)
    hidden = causal_lm.base_model(
        inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state
    offset = prompt.length if prompt is not None else 0
    gathered, targets = [], []
    for row, (context, answer) in enumerate(zip(contexts, answers, strict=True)):
        start = offset + len(context) - 1  # the state before each answer token predicts it
        gathered.append(hidden[row, start : start + len(answer)])
        targets.append(torch.tensor(answer, dtype=torch.long))
    logits = output_embeddings(causal_lm)(torch.cat(gathered)).float()
    return F.cross_entropy(logits, torch.cat(targets))


@torch.no_grad()
def generate_answers(
    causal_lm: PreTrainedModel,
    contexts: list[list[int]],
    prompt: SoftPrompt | None,
    max_new_tokens: int,
    stop_token_ids: set[int],
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy continuation of each context (left-padded batches, key/value cache) until a stop token."""
    backbone = causal_lm.base_model
    head = output_embeddings(causal_lm)
    results: list[list[int]] = [[] for _ in contexts]
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs, mask, positions = _embed_rows(causal_lm, [contexts[i] for i in chunk], prompt, pad_left=True)
        output = backbone(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = _cache_of(output)
        done = torch.zeros(len(chunk), dtype=torch.bool)
        last_hidden, last_position = output.last_hidden_state[:, -1], positions[:, -1]
        for _ in range(max_new_tokens):
            next_tokens = head(last_hidden).float().argmax(dim=-1)
            for row, token in enumerate(next_tokens.tolist()):
                if not done[row]:
                    if token in stop_token_ids:
                        done[row] = True
                    else:
                        results[chunk[row]].append(token)
            if done.all():
                break
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=torch.long)], dim=1)
            last_position = last_position + 1
            output = backbone(
                input_ids=next_tokens[:, None],
                attention_mask=mask,
                position_ids=last_position[:, None],
                use_cache=True,
                **{cache_keyword(backbone): cache},
            )
            cache = _cache_of(output)
            last_hidden = output.last_hidden_state[:, -1]
    return results


def _cache_of(output):
    """The key/value cache of a forward's output (transformers 5 names it `cache`, 4 `past_key_values`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


__all__ = [
    "PASSAGE_PREFIX",
    "Reranker",
    "SoftPrompt",
    "answer_loss",
    "frozen_weights_digest",
    "generate_answers",
    "mean_embeddings",
    "reranker_loss",
]
