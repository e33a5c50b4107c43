"""What a task is: its input fields, its label space, its metrics; and the data that go with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from deltatune.errors import DeltatuneError
from deltatune.metrics import METRICS


@dataclass(frozen=True)
class TaskSpec:
    """A task: one text or a pair in, a named class or a score out, scored by `metric`."""

    name: str
    text_fields: tuple[str, ...]
    """The input columns, one (single text) or two (a pair)."""
    labels: tuple[str, ...] = ()
    """Class names, in label-index order. Empty for a regression task."""
    score_range: tuple[float, float] | None = None
    """(low, high) of the gold score for a regression task."""
    metric: str = "accuracy"
    """The primary metric: the one early stopping and checkpoint selection follow."""
    metrics: tuple[str, ...] = ("accuracy",)
    """Every metric reported, the primary one included."""
    source: str = ""
    """Where the data come from, for `deltatune tasks`."""
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if len(self.text_fields) not in (1, 2):
            problems.append(f"text_fields must name one or two columns, got {self.text_fields!r}")
        if not self.labels and self.score_range is None:
            problems.append("give either class labels or a score_range (regression)")
        if self.labels and self.score_range is not None:
            problems.append("a task has class labels or a score_range, not both")
        for name in (self.metric, *self.metrics):
            if name not in METRICS:
                problems.append(f"unknown metric {name!r} (known: {', '.join(sorted(METRICS))})")
        if self.metric not in self.metrics:
            problems.append(f"primary metric {self.metric!r} must be one of metrics {self.metrics!r}")
        if problems:
            raise DeltatuneError(f"Task {self.name!r} is not well defined: " + "; ".join(problems) + ".")

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        data = dict(data)
        data["text_fields"] = tuple(data["text_fields"])
        data["labels"] = tuple(data.get("labels", ()))
        data["metrics"] = tuple(data["metrics"])
        if data.get("score_range") is not None:
            data["score_range"] = tuple(data["score_range"])
        return cls(**data)


@dataclass
class Split:
    """Examples of one split: `texts[i]` is a tuple with one entry per text field."""

    texts: Sequence[tuple[str, ...]]
    labels: list
    """Class indices (int) for classification, gold scores (float) for regression."""

    def __post_init__(self) -> None:
        assert len(self.texts) == len(self.labels), "texts and labels must align"

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> Split:
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class TaskData:
    """A task with its splits ('train', 'dev' and usually 'test') and how they were obtained."""

    task: TaskSpec
    splits: dict[str, Split]
    provenance: dict = field(default_factory=dict)
    """Where each split came from: official, or made here (seed, fractions, stratified)."""

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DeltatuneError(f"Task {self.task.name!r} has no {name!r} split. Available: {', '.join(self.splits)}.")
        return self.splits[name]

    def fingerprint(self) -> str:
        """sha256 over every split's texts and labels: equal fingerprints, equal data."""
        digest = hashlib.sha256()
        for name in sorted(self.splits):
            split = self.splits[name]
            digest.update(name.encode())
            for texts, label in zip(split.texts, split.labels, strict=True):
                digest.update(json.dumps([texts, label], ensure_ascii=False).encode())
        return digest.hexdigest()
