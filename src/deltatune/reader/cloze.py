"""An open-book QA task from raw WikiText-2, for measuring a frozen reader offline.

No question-answering set with passages is packaged, so one is built from real text:

  1. Articles are WikiText-2's top-level sections (a line `= Title =` starts one); their paragraphs
     (lines that are not headings) are the passages. WikiText's tokenisation artefacts are undone
     (`@-@` → `-`, space before punctuation removed).
  2. Entity mentions in a paragraph are capitalised multi-word names (2-4 words, each capitalised,
     e.g. "Calamity Raven") and years (1000-2099). A mention is a candidate answer only when the same
     string also occurs in *another* paragraph of the same article, so it can be found by reading.
  3. A question is one sentence of the paragraph (8-60 words) with that mention replaced by a blank
     `_____`; the mention must occur once in the sentence. Each paragraph gives at most one question;
     the choice among candidates is drawn with a seeded generator.
  4. The corpus is every paragraph of the split; a question's own paragraph is left out of retrieval
     (`QADataset.exclude_own_passage`), so the answer must come from other passages.

WikiText-2's train articles give the training questions and its test articles the test questions (the
validation articles the dev questions), each with the split's own passages as the corpus.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from deltatune.reader.data import QADataset, QAExample

BLANK = "_____"
NAME = "wikitext-cloze"

_TITLE = re.compile(r"^= [^=].* =$")
_HEADING = re.compile(r"^=.*=$")
_NAME_PATTERN = re.compile(r"\b(?:[A-Z][a-z]+(?:'s)?)(?: [A-Z][a-z]+){1,3}\b")
_YEAR_PATTERN = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


@dataclass(frozen=True)
class ClozeConfig:
    seed: int = 0
    """Seeds the choice of mention and sentence in each paragraph."""
    max_questions: int | None = None
    """Questions per split at most (the first ones in corpus order after the seeded choice); none for all."""


def detokenize(line: str) -> str:
    """WikiText's raw text back to ordinary spacing: '1 @,@ 000' → '1,000', 'game 's' → "game's"."""
    text = re.sub(r" @(.)@ ", r"\1", line)
    text = re.sub(r" ([.,;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return text.replace(" ' ", "' ").strip()


def articles(lines: list[str]) -> list[list[str]]:
    """The split's articles, each a list of detokenised paragraphs (headings dropped)."""
    found: list[list[str]] = []
    for line in lines:
        if _TITLE.match(line):
            found.append([])
        elif not _HEADING.match(line) and found:
            found[-1].append(detokenize(line))
    return [paragraphs for paragraphs in found if len(paragraphs) >= 2]


def mentions(paragraph: str) -> set[str]:
    names = {match.group(0) for match in _NAME_PATTERN.finditer(paragraph)}
    # a name that only starts a sentence ("The Nameless") is kept without its leading article
    names = {re.sub(r"^(The|A|An|In|On|At|By|For|After|During) ", "", name) for name in names}
    return {name for name in names if " " in name} | set(_YEAR_PATTERN.findall(paragraph))


def _word_positions(mention: str, text: str) -> list[int]:
    """Start offsets of `mention` in `text` as whole words (not inside a longer word or number)."""
    positions, start = [], text.find(mention)
    while start >= 0:
        end = start + len(mention)
        if (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            positions.append(start)
        start = text.find(mention, start + 1)
    return positions


def questions_for_split(lines: list[str], config: ClozeConfig, split: str) -> tuple[list[str], list[QAExample]]:
    """(passages, questions) of one WikiText-2 split; see the module docstring."""
    rng = random.Random(f"{config.seed}-{split}")
    passages: list[str] = []
    examples: list[QAExample] = []
    for paragraphs in articles(lines):
        first = len(passages)
        passages += paragraphs
        found = [mentions(paragraph) for paragraph in paragraphs]
        for position, paragraph in enumerate(paragraphs):
            others = " \n ".join(p for i, p in enumerate(paragraphs) if i != position)
            sentences = [s for s in _SENTENCE_END.split(paragraph) if 8 <= len(s.split()) <= 60]
            candidates = []
            for mention in sorted(found[position]):
                if not _word_positions(mention, others):
                    continue
                candidates += [
                    (mention, sentence) for sentence in sentences if len(_word_positions(mention, sentence)) == 1
                ]
            if not candidates:
                continue
            mention, sentence = rng.choice(candidates)
            start = _word_positions(mention, sentence)[0]
            question = sentence[:start] + BLANK + sentence[start + len(mention) :]
            examples.append(QAExample(question, (mention,), first + position, f"{split}-{first + position}"))
    if config.max_questions is not None:
        examples = examples[: config.max_questions]
    return passages, examples


def load_wikitext_cloze(
    config: ClozeConfig | None = None,
    splits: tuple[str, ...] = ("train", "dev", "test"),
    lines_by_split: dict[str, list[str]] | None = None,
) -> QADataset:
    """The cloze task over WikiText-2 (from its packaged mirror unless `lines_by_split` gives the raw lines,
    keyed by WikiText's split names train/validation/test).

    Passages of all requested splits form one corpus, but a question only ever retrieves from its own
    split's articles: the splits' passages do not overlap, and each question's own passage is excluded.
    """
    config = config or ClozeConfig()
    if lines_by_split is None:
        from deltatune.sources.data import load_text_corpus

        lines_by_split = load_text_corpus("wikitext-2")
    passages: list[str] = []
    loaded: dict[str, list[QAExample]] = {}
    for split in splits:
        split_passages, examples = questions_for_split(lines_by_split[_SPLITS[split]], config, split)
        offset = len(passages)
        passages += split_passages
        loaded[split] = []
        for e in examples:
            assert e.passage_id is not None  # every cloze question is cut from a passage
            loaded[split].append(QAExample(e.question, e.answers, e.passage_id + offset, e.example_id))
    provenance = {
        "source": "wikitext-2 (packaged mirror)",
        "construction": "deltatune.reader.cloze",
        "seed": config.seed,
        "questions": {split: len(examples) for split, examples in loaded.items()},
        "passages": len(passages),
    }
    return QADataset(NAME, passages, loaded, exclude_own_passage=True, provenance=provenance)


__all__ = [
    "BLANK",
    "ClozeConfig",
    "NAME",
    "articles",
    "detokenize",
    "load_wikitext_cloze",
    "mentions",
    "questions_for_split",
]
