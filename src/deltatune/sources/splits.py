"""Deterministic splits: how deltatune cuts train, dev and test from a source that lacks them.

Every made split uses SPLIT_SEED and is stratified (by label, or by score decile for regression), so
every method in a comparison sees exactly the same examples, and its provenance says how it was made.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from deltatune.errors import DeltatuneError
from deltatune.tasks.spec import Split

SPLIT_SEED = 0
"""The seed of every split deltatune makes. Changing it changes every made split, and with it
every result that was compared on them: do not."""

LOCAL_FRACTIONS = (0.8, 0.1, 0.1)
"""train / dev / test of a single local file."""

DEV_FRACTION = 0.1
"""The share of train carved out as dev when a source has test data but no dev split."""


def stratified_split(labels: list, fractions: tuple[float, ...], seed: int) -> list[list[int]]:
    """Partition `range(len(labels))` into parts of the given fractions, each class split alike.

    Deterministic for a given (labels, fractions, seed) on every platform and Python version:
    only `random.Random(seed)` is used, and classes are visited in a seeded order. Each class c
    of n_c examples puts floor or ceil of n_c * fraction into each part, so every part has the
    class balance of the whole to within one example per class; the extra examples that rounding
    leaves go to the parts furthest behind their share so far, which keeps every part's total
    within one example of len(labels) * fraction. Labels that are all distinct (e.g. raw
    regression scores) make this a seeded shuffle, so pass score bins to stratify a regression
    task. Each returned index list is sorted, so a part keeps the source's order.
    """
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not f >= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DeltatuneError(
            f"Split fractions must be non-negative and add up to 1, got {fractions!r} "
            f"(sum {sum(fractions):g}). For example (0.8, 0.1, 0.1) for train/dev/test."
        )
    rng = random.Random(seed)
    groups: dict = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    classes = sorted(groups, key=repr)  # a fixed order to start from, whatever the input order
    rng.shuffle(classes)
    parts: list[list[int]] = [[] for _ in fractions]
    quota = [0.0] * len(fractions)  # exact share of each part over the classes seen so far
    allocated = [0] * len(fractions)
    for label in classes:
        members = groups[label]
        rng.shuffle(members)
        exact = [len(members) * f for f in fractions]
        counts = [math.floor(x + 1e-9) for x in exact]
        for k in range(len(fractions)):
            quota[k] += exact[k]
            allocated[k] += counts[k]
        extra = len(members) - sum(counts)
        candidates = [k for k in range(len(fractions)) if exact[k] - counts[k] > 1e-9]
        if len(candidates) < extra:  # only float rounding can get here
            candidates = [k for k in range(len(fractions)) if fractions[k] > 0]
        for k in sorted(candidates, key=lambda k: (allocated[k] - quota[k], k))[:extra]:
            counts[k] += 1
            allocated[k] += 1
        start = 0
        for k, count in enumerate(counts):
            parts[k].extend(members[start : start + count])
            start += count
    return [sorted(part) for part in parts]


def score_bins(scores: Sequence[float], bins: int = 10) -> list[int]:
    """Quantile bin of each score (ties broken by position), to stratify a regression split."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    result = [0] * len(scores)
    for rank, index in enumerate(order):
        result[index] = rank * bins // max(len(scores), 1)
    return result


def carve(
    pool: Split, names: tuple[str, ...], fractions: tuple[float, ...], strata: list, made_from: str, stratified_by: str
) -> tuple[dict[str, Split], dict[str, dict]]:
    """Cut `pool` into named splits with stratified_split, and say how in provenance."""
    parts = stratified_split(strata, fractions, SPLIT_SEED)
    splits = {name: pool.subset(indices) for name, indices in zip(names, parts, strict=True)}
    provenance = {
        name: {
            "origin": "made",
            "from": made_from,
            "seed": SPLIT_SEED,
            "fractions": dict(zip(names, fractions, strict=True)),
            "stratified_by": stratified_by,
            "examples": len(splits[name]),
        }
        for name in names
    }
    return splits, provenance


def official(split: Split, made_from: str) -> dict:
    return {"origin": "official", "from": made_from, "examples": len(split)}


__all__ = ["DEV_FRACTION", "LOCAL_FRACTIONS", "SPLIT_SEED", "carve", "official", "score_bins", "stratified_split"]
