"""What doing nothing scores: rows that sit beside the trained methods, so a method that does not beat
them is visible.

    majority          the training data's most frequent class (classification) or mean score (regression);
                      a correlation metric of a constant is 0
    embedding-cosine  sentence pairs scored by a score (regression) task: cos(u, v) of the two texts' pooled
                      embeddings, mapped linearly onto the task's score range (no training). It is exactly
                      the untrained output of deltatune's bi-encoder head, which is how it is computed here;
                      the pooling is the checkpoint's own sentence-embedding pooling, else mean.
    zero-shot         decoders: the base model's likelihood of each answer's verbaliser after the task's
                      prompt (Brown et al. 2020; `deltatune.freelm.scoring`; a catalog task's own prompt, else
                      one built from the label names); a regression task is answered over score bins, its
                      prediction the expected score
    few-shot          the same with k solved training examples in front (k = 4 by default, drawn by the seed)

Each baseline is scored on the dev and the test split with the per-example outputs saved, like a trained
run's, so the paired statistics treat it as one more row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.metrics import compute_metrics
from deltatune.padding import padding_id
from deltatune.tasks.spec import Split, TaskData, TaskSpec

BASELINES = ("majority", "embedding-cosine", "zero-shot", "few-shot")
SEEDED = frozenset({"few-shot"})
"""Baselines whose outputs depend on the seed; the others are run once per model and task."""
DEFAULT_SHOTS = 4


def applies_to(name: str, task: TaskSpec) -> str | None:
    """Why baseline `name` cannot score `task` (None when it can); the model family is checked when it runs."""
    if name not in BASELINES:
        return f"unknown baseline {name!r}. {did_you_mean(name, BASELINES)}"
    if name == "embedding-cosine" and not (len(task.text_fields) == 2 and task.is_regression):
        return "embedding-cosine scores sentence pairs with a similarity score (like stsb)"
    return None


@dataclass
class BaselineResult:
    """A baseline's scores and per-example outputs (logits or scores in task units, in split order)."""

    name: str
    metrics: dict[str, dict[str, float]]
    """Split ('dev', 'test') -> metrics."""
    outputs: dict[str, np.ndarray]
    labels: dict[str, list]
    seconds: float
    details: dict = field(default_factory=dict)


def run_baseline(
    name: str,
    model_name: str,
    task_data: TaskData,
    train_indices: list[int] | None = None,
    seed: int = 0,
    max_length: int = 128,
    shots: int = DEFAULT_SHOTS,
    batch_size: int = 64,
) -> BaselineResult:
    """Score baseline `name` on the dev and (where there is one) test split of `task_data`.

    `train_indices` restricts the training examples it may look at (the grid's training pool).
    """
    task = task_data.task
    reason = applies_to(name, task)
    if reason is not None:
        raise DeltatuneError(f"Baseline {name!r} cannot score task {task.name!r}: {reason}.")
    train = task_data.split("train")
    if train_indices is not None:
        train = train.subset(train_indices)
    splits: dict[str, Split] = {split: task_data.split(split) for split in ("dev", "test") if split in task_data.splits}
    started = time.perf_counter()
    details: dict = {}
    if name == "majority":
        outputs = {split: _majority_outputs(task, train, len(data)) for split, data in splits.items()}
        details["predicts"] = (
            float(outputs["dev"][0, 0]) if task.is_regression else task.labels[int(outputs["dev"][0].argmax())]
        )
    elif name == "embedding-cosine":
        outputs, details = _embedding_cosine(model_name, task, splits, max_length, batch_size)
    else:
        outputs, details = _prompting(model_name, task, train, splits, shots if name == "few-shot" else 0, seed)
    metrics = {
        split: compute_metrics(task.metrics, _predictions(task, outputs[split]), data.labels)
        for split, data in splits.items()
    }
    return BaselineResult(
        name,
        metrics,
        outputs,
        {split: list(data.labels) for split, data in splits.items()},
        time.perf_counter() - started,
        details,
    )


def _predictions(task: TaskSpec, outputs: np.ndarray) -> np.ndarray:
    return outputs[:, 0] if task.is_regression else outputs.argmax(axis=-1)


def _majority_outputs(task: TaskSpec, train: Split, count: int) -> np.ndarray:
    if task.is_regression:
        return np.full((count, 1), float(np.mean(train.labels)), dtype=np.float32)
    most_common = int(np.bincount(np.asarray(train.labels, dtype=np.int64), minlength=task.num_labels).argmax())
    outputs = np.zeros((count, task.num_labels), dtype=np.float32)
    outputs[:, most_common] = 1.0
    return outputs


def _embedding_cosine(
    model_name: str, task: TaskSpec, splits: dict[str, Split], max_length: int, batch_size: int
) -> tuple[dict[str, np.ndarray], dict]:
    """The untrained bi-encoder's outputs: cos(u, v) mapped onto the score range."""
    from deltatune.batching import encode, predict_encoded, to_task_units
    from deltatune.heads import declared_pooling, head_of, target_scale
    from deltatune.sources.models import load_model_for_task, resolve_model

    pooling = declared_pooling(resolve_model(model_name)) or "mean"
    model, tokenizer = load_model_for_task(model_name, task, head="bi-encoder", pooling=pooling)
    model.eval()
    scale = target_scale(model, task, [])
    pad_token_id = padding_id(tokenizer)
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    outputs = {}
    for split, data in splits.items():
        encoded = encode(tokenizer, task, data, limit, texts_separately=True)
        # fp32: a baseline row should not carry bf16 rounding
        outputs[split] = to_task_units(predict_encoded(model, encoded, task, pad_token_id, batch_size, "fp32"), scale)
    return outputs, {"pooling": head_of(model).pooling, "precision": "fp32"}


def _prompting(
    model_name: str, task: TaskSpec, train: Split, splits: dict[str, Split], shots: int, seed: int
) -> tuple[dict[str, np.ndarray], dict]:
    """Verbaliser scoring by the base decoder (`deltatune.freelm.scoring`), zero-shot or with `shots` examples."""
    from transformers import AutoConfig

    from deltatune.freelm.scoring import (
        choose_demonstrations,
        demonstration_prefix,
        predictions_from_scores,
        verbaliser_scores,
    )
    from deltatune.heads import is_encoder
    from deltatune.sources.models import load_causal_lm, resolve_model
    from deltatune.tasks.propositions import propositions_for

    if is_encoder(AutoConfig.from_pretrained(resolve_model(model_name))):
        raise DeltatuneError(
            f"Prompting baselines need a decoder (a causal language model); {model_name!r} is an "
            "encoder. Use the majority or embedding-cosine baselines for it."
        )
    causal_lm, tokenizer = load_causal_lm(model_name)
    causal_lm.eval()
    propositions = propositions_for(task)
    prefix = ""
    if shots:
        prefix = demonstration_prefix(
            tokenizer, propositions, train, choose_demonstrations(propositions, train, shots, seed)
        )
    outputs = {}
    with torch.no_grad():
        for split, data in splits.items():
            scores = verbaliser_scores(causal_lm, tokenizer, propositions, data.texts, prefix=prefix)
            if task.is_regression:
                outputs[split] = predictions_from_scores(task, propositions, scores).reshape(-1, 1).astype(np.float32)
            else:
                outputs[split] = scores.astype(np.float32)
    return outputs, {"shots": shots, "verbalisers": list(propositions.verbalisers)}


__all__ = ["BASELINES", "SEEDED", "BaselineResult", "applies_to", "run_baseline"]
