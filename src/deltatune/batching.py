"""Batching: tokenise a split once, cut it into length-bucketed batches, pad them, and run a model over
them for raw outputs (logits or standardised scores), mapped back to task units.

Training (`deltatune.training`), evaluation, prediction (`deltatune.delta.TunedModel`) and FreeLM all go
through these functions, so an example is encoded and padded the same way everywhere.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deltatune.devices import model_device
from deltatune.errors import DeltatuneError
from deltatune.interrupts import raise_if_requested
from deltatune.metrics import compute_metrics
from deltatune.precision import autocast_for, frozen_linear_weights_in_bf16, resolve_precision
from deltatune.tasks.spec import Split, TaskSpec

SECOND_TEXT = "second_input_ids"
"""For a bi-encoder, the second text of each pair, tokenised on its own (`input_ids` holds the first)."""


@dataclass
class Encoded:
    """A tokenised split: one id list per example, plus the labels."""

    features: dict[str, list[list[int]]]
    """'input_ids' and, for models that use them, 'token_type_ids'; for a bi-encoder also 'second_input_ids'."""
    labels: list
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> Encoded:
        return Encoded(
            {key: [rows[i] for i in indices] for key, rows in self.features.items()}, [self.labels[i] for i in indices]
        )

    @property
    def lengths(self) -> list[int]:
        """Each example's padded width: its longest sequence."""
        lengths = [len(ids) for ids in self.features["input_ids"]]
        if SECOND_TEXT in self.features:
            lengths = [max(a, len(b)) for a, b in zip(lengths, self.features[SECOND_TEXT], strict=True)]
        return lengths


def encode(tokenizer, task: TaskSpec, split: Split, max_length: int, texts_separately: bool = False) -> Encoded:
    """Tokenise a split once, truncating to `max_length` and counting how many needed it.

    `texts_separately` (a bi-encoder): each text of a pair becomes its own sequence.
    """
    if not len(split):
        return Encoded({"input_ids": []}, [])
    columns = list(zip(*split.texts, strict=True))
    if texts_separately:
        first, second = (_tokenise(tokenizer, [column], max_length) for column in columns)
        features = {"input_ids": first[0]["input_ids"], SECOND_TEXT: second[0]["input_ids"]}
        cut = set(first[1]) | set(second[1])
        return Encoded(features, list(split.labels), num_truncated=len(cut))
    features, too_long = _tokenise(tokenizer, columns, max_length)
    return Encoded(features, list(split.labels), num_truncated=len(too_long))


def _tokenise(tokenizer, columns: list, max_length: int) -> tuple[dict[str, list[list[int]]], list[int]]:
    """Features of one sequence per row (of one text, or a pair as one sequence) and which rows were cut."""
    full = tokenizer(*columns, truncation=False, padding=False, verbose=False)
    too_long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    features = {key: list(full[key]) for key in ("input_ids", "token_type_ids") if key in full}
    if too_long:
        again = tokenizer(
            *[[column[i] for i in too_long] for column in columns],
            truncation=True,
            max_length=max_length,
            padding=False,
        )
        for key in features:
            for position, index in enumerate(too_long):
                features[key][index] = again[key][position]
    return features, too_long


def length_bucketed_batches(
    lengths: list[int], batch_size: int, generator: random.Random | None, chunk_batches: int = 50
) -> list[list[int]]:
    """Index batches of similar-length examples.

    Training (`generator` given): shuffle, sort by length within chunks of `chunk_batches`
    batches, cut into batches, shuffle the batch order, so batches stay random but padding is
    small. Evaluation (`generator` None): sort everything by length.
    """
    order = list(range(len(lengths)))
    if generator is None:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    generator.shuffle(order)
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        piece = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [piece[i : i + batch_size] for i in range(0, len(piece), batch_size)]
    generator.shuffle(batches)
    return batches


FORWARD_OVERHEAD_TOKENS = 384
"""What one more forward pass costs, in padded tokens' worth of compute: its fixed per-call work (the module
calls, and in a mixed batch each delta's slices at every site). Chosen by measurement (MiniLM-L6, 16 mixed
deltas of 4 methods, 2-core Xeon): batches of 64 random requests cut with 128, 192, 256, 384, 512 or 1,024
ran 1.1-1.4x faster than uncut; 128 lost offline throughput, 256-512 did not."""


def padding_aware_batches(lengths: list[int], batch_size: int, overhead_tokens: int = FORWARD_OVERHEAD_TOKENS):
    """Index batches of at most `batch_size` rows, sorted by length and cut where it saves compute.

    A batch costs its rows times its longest row (right padding) plus `overhead_tokens`. Among all ways of
    cutting the length-sorted rows into consecutive batches, this returns the cheapest (dynamic programming,
    O(rows × batch_size)): rows of similar lengths share a batch, a few long rows get their own instead of
    padding every short one to their length, and rows are not split into batches so small that the fixed
    cost dominates. Outputs do not depend on the cut beyond floating-point rounding (every row is masked to its
    own length).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(max(0, end - batch_size), end):
            cost = best[start] + (end - start) * longest + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], len(order)
    while end:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def shuffled_batches(count: int, batch_size: int, generator: random.Random) -> list[list[int]]:
    order = list(range(count))
    generator.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def collate(encoded: Encoded, indices: list[int], pad_token_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """Right-pad the chosen examples to the longest among them.

    A bi-encoder's batch holds 2n rows: the first texts of the n examples, then their second texts.
    """
    rows = {key: [values[i] for i in indices] for key, values in encoded.features.items() if key != SECOND_TEXT}
    if SECOND_TEXT in encoded.features:
        rows["input_ids"] = rows["input_ids"] + [encoded.features[SECOND_TEXT][i] for i in indices]
    width = max(len(ids) for ids in rows["input_ids"])
    batch = {}
    for key, values in rows.items():
        pad = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([row + [pad] * (width - len(row)) for row in values], dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in rows["input_ids"]])
    batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    label_type = torch.float32 if regression else torch.long
    batch["labels"] = torch.tensor([encoded.labels[i] for i in indices], dtype=label_type)
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (on the CPU the very same tensors: nothing is copied)."""
    if device.type == "cpu":
        return batch
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def regression_scale(labels) -> tuple[float, float]:
    """(mean, std) of regression targets; std 1 when they are all equal."""
    values = np.asarray(labels, dtype=np.float64)
    std = float(values.std())
    return float(values.mean()), std if std > 0 else 1.0


def to_task_units(outputs: np.ndarray, target_scale) -> np.ndarray:
    """Raw regression outputs (standard units) back to the task's score units; classification unchanged."""
    if target_scale is None:
        return outputs
    mean, std = target_scale
    return outputs * std + mean


@torch.no_grad()
def predict_encoded(
    model: nn.Module, encoded: Encoded, task: TaskSpec, pad_token_id: int, batch_size: int = 64, precision: str = "fp32"
) -> np.ndarray:
    """Raw outputs for every example, in the split's order: logits (classes) or scores. Batches go to the
    device the model is on."""
    was_training = model.training
    model.eval()
    outputs: list[np.ndarray | None] = [None] * len(encoded)
    device = model_device(model)
    precision = resolve_precision(precision, device.type)
    # under bf16 on the CPU, every linear weight is cast once for the whole split rather than once per batch
    # (a GPU's autocast keeps its own cast cache)
    cast_once = precision == "bf16" and device.type == "cpu"
    with frozen_linear_weights_in_bf16(model, include_trainable=True) if cast_once else nullcontext():
        for indices in length_bucketed_batches(encoded.lengths, batch_size, None):
            raise_if_requested()  # a Ctrl-C swallowed by a destructor still stops a long evaluation
            batch = to_device(collate(encoded, indices, pad_token_id, task.is_regression), device)
            batch.pop("labels")
            with autocast_for(precision, device.type):
                logits = model(**batch).logits.float().cpu()
            if logits.shape[0] != len(indices):
                raise DeltatuneError(
                    f"The model gave {logits.shape[0]} outputs for a batch of {len(indices)} examples: its head "
                    "encodes the texts of a pair separately (a bi-encoder), but the split was encoded with the "
                    "texts together. Encode it with encode(..., texts_separately="
                    "deltatune.heads.encodes_texts_separately(model))."
                )
            for position, index in enumerate(indices):
                outputs[index] = logits[position].numpy()
    model.train(was_training)
    width = task.num_labels
    predicted = [output for output in outputs if output is not None]
    assert len(predicted) == len(outputs)  # the batches cover every example once
    return np.stack(predicted) if predicted else np.zeros((0, width), dtype=np.float32)


def outputs_to_predictions(outputs: np.ndarray, task: TaskSpec) -> np.ndarray:
    return outputs[:, 0] if task.is_regression else outputs.argmax(axis=-1)


def evaluate(
    model: nn.Module, encoded: Encoded, task: TaskSpec, pad_token_id: int, batch_size: int = 64, precision: str = "fp32"
) -> dict[str, float]:
    outputs = predict_encoded(model, encoded, task, pad_token_id, batch_size, precision)
    return compute_metrics(task.metrics, outputs_to_predictions(outputs, task), encoded.labels)


def stratified_subset(labels: list, count: int, seed: int, regression: bool) -> list[int]:
    """`count` indices drawn so each class (or score decile) keeps its share; fixed by `seed`."""
    if count >= len(labels):
        return list(range(len(labels)))
    rng = random.Random(seed)
    if regression:
        ranked = sorted(range(len(labels)), key=lambda i: labels[i])
        strata = [ranked[i * len(ranked) // 10 : (i + 1) * len(ranked) // 10] for i in range(10)]
    else:
        by_class: dict = {}
        for i, label in enumerate(labels):
            by_class.setdefault(label, []).append(i)
        strata = [by_class[key] for key in sorted(by_class)]
    chosen: list[int] = []
    remainders = []
    for stratum in strata:
        rng.shuffle(stratum)
        exact = count * len(stratum) / len(labels)
        take = int(exact)
        chosen += stratum[:take]
        remainders.append((exact - take, stratum[take:]))
    # hand out the rounding remainder to the strata that lost most to rounding down
    for _, rest in sorted(remainders, key=lambda r: -r[0])[: count - len(chosen)]:
        chosen.append(rest[0])
    return sorted(chosen)
