"""Answering a task without task training: FreeLM's proposition scoring and the LM-scoring baselines.

FreeLM zero-shot (Li et al. 2023): for an input x and candidates y_1..y_C, build the propositions
u_c = template(x, y_c) and pick argmax_c s(u_c), where s is the teacher head's log-odds
logit_true(u) - logit_false(u). With several templates, s is averaged over them.

Base-model baselines (Brown et al. 2020's likelihood scoring): the prompt π(x) is followed by each
answer's verbalisation v_c and the answer whose tokens the causal LM finds most likely wins,
    s_c = (1/|v_c|) Σ_t log p(v_c,t | π(x), v_c,<t)
(mean per token, so multi-token answers are not penalised for length). k-shot prompting puts k
solved demonstrations from the training split in front, π_k(x) = [π(d_1) v(d_1) ... π(d_k) v(d_k)] π(x);
the demonstrations are the same for every test input, so their keys and values are computed once
and reused from a cache.

Regression tasks are scored over their bins; the prediction is the expected score under the softmax
of the bins' scores (see `deltatune.tasks.propositions`).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from deltatune.batching import Encoded, predict_encoded
from deltatune.freelm.model import PROPOSITION_TASK, TRUE_INDEX, FreeLMModel
from deltatune.methods.prompts import cache_keyword, output_embeddings
from deltatune.metrics import compute_metrics
from deltatune.padding import padding_id
from deltatune.tasks.propositions import TaskPropositions
from deltatune.tasks.spec import Split, TaskSpec

FIELD_TOKENS_RESERVED = 48
"""Tokens kept free for a proposition's frame and answer when its input texts are shortened."""


def shorten_texts(tokenizer, rows: Sequence[tuple[str, ...]], max_tokens_per_field: int) -> list[tuple[str, ...]]:
    """Cut every text field to at most `max_tokens_per_field` tokens (decoded back to text).

    Propositions put the answer *after* the input, so truncating the finished proposition would cut
    the answer off; shortening the inputs first keeps every proposition's claim intact.
    """
    if not rows:
        return []
    columns = list(zip(*rows, strict=True))
    shortened = []
    for column in columns:
        ids = tokenizer(list(column), add_special_tokens=False)["input_ids"]
        shortened.append(
            [
                text
                if len(row) <= max_tokens_per_field
                else tokenizer.decode(row[:max_tokens_per_field]).strip() + " ..."
                for text, row in zip(column, ids, strict=True)
            ]
        )
    return [tuple(values) for values in zip(*shortened, strict=True)]


def field_budget(max_length: int, num_fields: int) -> int:
    return max(8, (max_length - FIELD_TOKENS_RESERVED) // num_fields)


def encode_propositions(tokenizer, propositions: Sequence[str], labels: Sequence[int], max_length: int) -> Encoded:
    """Tokenised the way `deltatune.batching.encode` does it (special tokens included), so a saved
    FreeLM delta loaded with `deltatune.load` scores a proposition exactly as FreeLM did."""
    encoded = tokenizer(list(propositions), truncation=True, max_length=max_length, padding=False)
    return Encoded({"input_ids": list(encoded["input_ids"])}, list(labels))


@torch.no_grad()
def proposition_scores(
    model: FreeLMModel,
    tokenizer,
    propositions: TaskPropositions,
    rows: Sequence[tuple[str, ...]],
    template_indices: Sequence[int] | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    precision: str = "fp32",
) -> np.ndarray:
    """(examples, candidates) teacher log-odds that each candidate's proposition is true, averaged
    over the chosen templates (default: all of the task's templates)."""
    templates = list(template_indices) if template_indices is not None else list(range(len(propositions.templates)))
    rows = shorten_texts(tokenizer, rows, field_budget(max_length, len(propositions.text_fields)))
    texts = [
        propositions.proposition(row, candidate, template)
        for row in rows
        for template in templates
        for candidate in range(propositions.num_candidates)
    ]
    if not texts:
        return np.zeros((0, propositions.num_candidates), dtype=np.float32)
    encoded = encode_propositions(tokenizer, texts, [0] * len(texts), max_length)
    pad_token_id = padding_id(tokenizer)
    logits = predict_encoded(model.classifier, encoded, PROPOSITION_TASK, pad_token_id, batch_size, precision)
    log_odds = logits[:, TRUE_INDEX] - logits[:, 1 - TRUE_INDEX]
    return log_odds.reshape(len(rows), len(templates), propositions.num_candidates).mean(axis=1)


def choose_demonstrations(propositions: TaskPropositions, split: Split, k: int, seed: int) -> list[int]:
    """k training examples for in-context prompting, spread over the candidates (labels or bins)
    as evenly as k allows, in a random order fixed by `seed`."""
    rng = random.Random(seed)
    by_candidate: dict[int, list[int]] = {}
    for index, label in enumerate(split.labels):
        by_candidate.setdefault(propositions.candidate_of(label), []).append(index)
    pools = [rng.sample(indices, len(indices)) for _, indices in sorted(by_candidate.items())]
    rng.shuffle(pools)
    chosen: list[int] = []
    while len(chosen) < k and any(pools):
        for pool in pools:
            if pool and len(chosen) < k:
                chosen.append(pool.pop())
    rng.shuffle(chosen)
    return chosen


def demonstration_prefix(
    tokenizer, propositions: TaskPropositions, split: Split, indices: Sequence[int], max_tokens_per_field: int = 64
) -> str:
    rows = shorten_texts(tokenizer, [split.texts[i] for i in indices], max_tokens_per_field)
    shots = [
        propositions.filled_prompt(row) + propositions.verbalisers[propositions.candidate_of(split.labels[i])]
        for row, i in zip(rows, indices, strict=True)
    ]
    return "".join(shot + "\n\n" for shot in shots)


@torch.no_grad()
def verbaliser_scores(
    causal_lm: PreTrainedModel,
    tokenizer,
    propositions: TaskPropositions,
    rows: Sequence[tuple[str, ...]],
    prefix: str = "",
    max_length: int = 256,
    batch_size: int = 16,
) -> np.ndarray:
    """(examples, candidates) mean log-probability of each verbaliser after the prompt (and `prefix`,
    the k-shot demonstrations, whose keys and values are computed once)."""
    backbone = causal_lm.base_model
    lm_head = output_embeddings(causal_lm)
    was_training = causal_lm.training
    causal_lm.eval()
    rows = shorten_texts(tokenizer, rows, field_budget(max_length, len(propositions.text_fields)))
    prompts = [
        tokenizer(propositions.filled_prompt(row), add_special_tokens=False)["input_ids"][-max_length:] for row in rows
    ]
    verbalisers = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in propositions.verbalisers]
    prefix_cache, prefix_length = None, 0
    if prefix:
        prefix_ids = torch.tensor([tokenizer(prefix, add_special_tokens=False)["input_ids"]])
        prefix_length = prefix_ids.shape[1]
        prefix_cache = _run_prefix(backbone, prefix_ids)

    single_token = all(len(v) == 1 for v in verbalisers)
    if single_token:
        # one sequence per example: the next-token distribution after the prompt scores every answer
        sequences: list[tuple[int, list[int], int | None]] = [(i, prompt, None) for i, prompt in enumerate(prompts)]
    else:
        sequences = [
            (i, prompt + verbaliser, c) for i, prompt in enumerate(prompts) for c, verbaliser in enumerate(verbalisers)
        ]
    scores = np.zeros((len(rows), len(verbalisers)), dtype=np.float32)
    order = sorted(range(len(sequences)), key=lambda s: len(sequences[s][1]))
    for start in range(0, len(order), batch_size):
        chunk = [sequences[s] for s in order[start : start + batch_size]]
        hidden, lengths = _hidden_states(
            backbone, [ids for _, ids, _ in chunk], prefix_cache, prefix_length, padding_id(tokenizer)
        )
        for row, (example, _, candidate) in enumerate(chunk):
            if candidate is None:
                log_probs = torch.log_softmax(lm_head(hidden[row, lengths[row] - 1]).float(), dim=-1)
                for c, verbaliser in enumerate(verbalisers):
                    scores[example, c] = float(log_probs[verbaliser[0]])
            else:
                count = len(verbalisers[candidate])
                positions = torch.arange(lengths[row] - count - 1, lengths[row] - 1)
                log_probs = torch.log_softmax(lm_head(hidden[row, positions]).float(), dim=-1)
                targets = torch.tensor(verbalisers[candidate])
                scores[example, candidate] = float(log_probs.gather(1, targets[:, None]).mean())
    causal_lm.train(was_training)
    return scores


def _run_prefix(backbone: nn.Module, prefix_ids: torch.Tensor):
    """The key/value cache of the demonstrations (transformers 5 names it `cache`, 4 `past_key_values`)."""
    output = backbone(input_ids=prefix_ids, use_cache=True)
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise RuntimeError(f"{type(backbone).__name__} returned no key/value cache for the demonstrations")


def _hidden_states(
    backbone: nn.Module, sequences: list[list[int]], prefix_cache, prefix_length: int, pad_token_id: int
) -> tuple[torch.Tensor, list[int]]:
    """Final hidden states of right-padded `sequences`, continuing after the cached prefix if any."""
    width = max(len(ids) for ids in sequences)
    lengths = [len(ids) for ids in sequences]
    input_ids = torch.tensor([ids + [pad_token_id] * (width - len(ids)) for ids in sequences])
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    arguments = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(sequences))
        arguments.update(
            {
                "attention_mask": torch.cat([torch.ones(len(sequences), prefix_length, dtype=torch.long), mask], dim=1),
                cache_keyword(backbone): cache,
                "use_cache": True,
            }
        )
    return backbone(**arguments).last_hidden_state, lengths


def predictions_from_scores(task: TaskSpec, propositions: TaskPropositions, scores: np.ndarray) -> np.ndarray:
    """Class indices (argmax), or for a regression task the expected score over the bins."""
    if propositions.bins is None:
        return scores.argmax(axis=-1)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return probabilities @ np.asarray(propositions.bins.centres)


def task_metrics(task: TaskSpec, propositions: TaskPropositions, scores: np.ndarray, labels: Sequence) -> dict:
    """The task's own metrics; a binned regression task adds `bin_accuracy` (argmax bin vs gold bin)."""
    metrics = compute_metrics(task.metrics, predictions_from_scores(task, propositions, scores), list(labels))
    if propositions.bins is not None:
        gold_bins = [propositions.candidate_of(label) for label in labels]
        metrics["bin_accuracy"] = compute_metrics(("accuracy",), scores.argmax(axis=-1), gold_bins)["accuracy"]
    return metrics


__all__ = [
    "choose_demonstrations",
    "demonstration_prefix",
    "encode_propositions",
    "field_budget",
    "predictions_from_scores",
    "proposition_scores",
    "shorten_texts",
    "task_metrics",
    "verbaliser_scores",
]
