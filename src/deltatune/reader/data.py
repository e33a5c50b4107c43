"""Question-answering data for the frozen reader: examples, a passage corpus, and SQuAD-style scoring.

An example is a question, its gold answers (any one counts), and the id of the passage it was asked
about (or none). The passages of a data set form the corpus the retriever searches: the reader is
open-book over the whole corpus, not handed the gold passage.

Sources:
  - local JSONL, one object per line: `question`, `answers` (a string or a list of strings, or
    SQuAD's {"text": [...]}), and either `context` (one passage) or `passages` (a list of strings);
  - SQuAD-style sets on the Hugging Face hub through `datasets` (`rajpurkar/squad` and any set with
    the columns question, context, answers.text);
  - the WikiText-2 cloze task built offline (`deltatune.reader.cloze`).

Scoring follows the SQuAD evaluation script's definitions: answers are normalised (lower case,
punctuation and the articles a/an/the removed, whitespace collapsed); exact match is 1 when the
normalised prediction equals a normalised gold answer; F1 is the token-overlap F1, the best over
the gold answers.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deltatune.errors import DeltatuneError


@dataclass(frozen=True)
class QAExample:
    question: str
    answers: tuple[str, ...]
    """Gold answers; a prediction matching any of them counts."""
    passage_id: int | None = None
    """The corpus passage the question was written from (left out of retrieval for cloze questions)."""
    example_id: str = ""


@dataclass
class QADataset:
    """Examples by split and the passage corpus they share."""

    name: str
    passages: list[str]
    splits: dict[str, list[QAExample]]
    exclude_own_passage: bool = False
    """True when a question was made from its own passage (cloze): retrieval must not return it."""
    provenance: dict = field(default_factory=dict)

    def split(self, name: str) -> list[QAExample]:
        if name not in self.splits:
            raise DeltatuneError(f"{self.name} has no {name!r} split (it has: {', '.join(self.splits)}).")
        return self.splits[name]


# ---------------------------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(character for character in text if character not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(answer) for answer in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best token-overlap F1 of `prediction` against any gold answer."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
            continue
        common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains_answer(passage: str, answers: Sequence[str]) -> bool:
    """Whether a normalised gold answer occurs in the normalised passage (as whole words)."""
    normalized = f" {normalize_answer(passage)} "
    return any(f" {normalize_answer(answer)} " in normalized for answer in answers if normalize_answer(answer))


# ---------------------------------------------------------------------------------------------- loading


def load_qa_jsonl(path: str | Path, name: str | None = None, split: str = "test") -> QADataset:
    """A local JSONL file as one split; passages are deduplicated into the corpus."""
    path = Path(path)
    if not path.is_file():
        raise DeltatuneError(
            f"QA file {str(path)!r} does not exist. Pass a JSONL file with question, answers "
            "and context (or passages) on every line."
        )
    passages: list[str] = []
    index: dict[str, int] = {}
    examples, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not JSON ({error.msg})")
            continue
        question, answers = record.get("question"), _answers_of(record.get("answers", record.get("answer")))
        texts = record.get("passages") if "passages" in record else [record.get("context")]
        if not isinstance(question, str) or not question.strip():
            problems.append(f"line {number}: no 'question' string")
        elif not answers:
            problems.append(f"line {number}: no 'answers' (a string, a list of strings, or {{\"text\": [...]}})")
        elif not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            problems.append(f"line {number}: needs 'context' (a string) or 'passages' (a list of strings)")
        else:
            ids = [index.setdefault(text, len(index)) for text in texts]
            for text, i in zip(texts, ids, strict=True):
                if i == len(passages):  # a text not seen before: its id is the next position
                    passages.append(text)
            examples.append(
                QAExample(
                    question.strip(), answers, ids[0] if "context" in record else None, str(record.get("id", number))
                )
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DeltatuneError(f"{path}: {shown}.")
    if not examples:
        raise DeltatuneError(f"{path} has no examples.")
    return QADataset(
        name or path.stem,
        passages,
        {split: examples},
        provenance={"source": "jsonl", "path": str(path.resolve()), "examples": len(examples)},
    )


def _answers_of(value) -> tuple[str, ...]:
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(answer.strip() for answer in value if isinstance(answer, str) and answer.strip())


def load_qa_hub(
    dataset_id: str = "rajpurkar/squad",
    splits: Sequence[str] = ("train", "validation"),
    config: str | None = None,
    max_examples: int | None = None,
) -> QADataset:
    """A SQuAD-style set from the Hugging Face hub (columns question, context, answers.text).

    The corpus is every distinct context of the loaded splits; `max_examples` caps each split (the
    first ones, in the set's order).
    """
    try:
        import datasets
    except ImportError:
        raise DeltatuneError(
            "Loading QA data from the hub needs the `datasets` package: pip install datasets"
        ) from None
    passages: list[str] = []
    index: dict[str, int] = {}
    loaded_splits: dict[str, list[QAExample]] = {}
    for split in splits:
        try:
            dataset = datasets.load_dataset(dataset_id, config, split=split)
        except Exception as error:  # network and hub errors come in many types
            raise DeltatuneError(
                f"Could not load {dataset_id!r} split {split!r} from the Hugging Face hub: {type(error).__name__}: "
                f"{str(error)[:300]}. Without the hub, pass a local JSONL file (--data) or use the offline "
                "task wikitext-cloze."
            ) from error
        missing = [column for column in ("question", "context", "answers") if column not in dataset.column_names]
        if missing:
            raise DeltatuneError(
                f"{dataset_id} ({split}) has no column(s) {', '.join(missing)}; a SQuAD-style "
                f"set needs question, context and answers (it has {', '.join(dataset.column_names)})."
            )
        rows = dataset if max_examples is None else dataset.select(range(min(max_examples, len(dataset))))
        examples = []
        for row in rows:
            passage_id = index.setdefault(row["context"], len(index))
            if passage_id == len(passages):
                passages.append(row["context"])
            answers = _answers_of(row["answers"])
            if answers:
                examples.append(QAExample(row["question"].strip(), answers, passage_id, str(row.get("id", ""))))
        loaded_splits["dev" if split == "validation" else split] = examples
    return QADataset(
        dataset_id,
        passages,
        loaded_splits,
        provenance={"source": "hub", "dataset": dataset_id, "config": config, "datasets_version": datasets.__version__},
    )


__all__ = [
    "QADataset",
    "QAExample",
    "contains_answer",
    "exact_match",
    "load_qa_hub",
    "load_qa_jsonl",
    "normalize_answer",
    "token_f1",
]
