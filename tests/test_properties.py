"""Property tests: whatever bytes a user's data file or grid spec holds, deltatune either reads it or raises
DeltatuneError (never another exception), and reading writes nothing anywhere.

Each test is bounded (max_examples, a deadline per example) so the suite stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltatune.compare.spec  # noqa: F401  imported now, so the first example is not timed with it
import deltatune.methods  # noqa: F401
from deltatune.errors import DeltatuneError
from deltatune.sources.data import load_local_data

BOUNDED = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
"""Fixed examples (derandomize) keep runs repeatable; 60 each keeps every test to seconds."""

# the pieces CSV/TSV/JSON parsing goes wrong on: delimiters, quotes, escapes, line ends, markers, odd unicode
PIECES = st.sampled_from(
    [
        ",",
        "\t",
        '"',
        "'",
        "\\",
        "\n",
        "\r\n",
        "\r",
        " ",
        "text",
        "label",
        "good",
        "bad",
        "NaN",
        "NA",
        "null",
        "None",
        "",
        "{",
        "}",
        "[",
        "]",
        ":",
        "\x00",
        "\ufeff",
        "é",
        "実",
        "\u2028",
        "1",
        "-1",
        "1e400",
        "true",
    ]
)


def fields_text() -> st.SearchStrategy[str]:
    return st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=40).map("".join)


@contextlib.contextmanager
def sandbox():
    """A fresh directory as the working directory: anything written by mistake would show up in it."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory() as directory:
        os.chdir(directory)
        try:
            yield Path(directory)
        finally:
            os.chdir(previous)


def read_only(directory: Path, file_name: str, load) -> None:
    before = sorted(p.name for p in directory.iterdir())
    try:
        load()
    except DeltatuneError:
        pass
    assert sorted(p.name for p in directory.iterdir()) == before, "reading data wrote files"


def load_as(path: Path, regression: bool = False):
    def load():
        data = load_local_data(path, ("text",), "label", regression=regression)
        for split in data.splits.values():  # what training does with them next
            assert all(isinstance(text, str) for texts in split.texts for text in texts)

    return load


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
@BOUNDED
@given(
    header=st.sampled_from(["text,label\n", "text\tlabel\n", "label,text,text\n", "", "text,label,label\n"]),
    body=fields_text(),
    regression=st.booleans(),
)
def test_text_formats_read_or_refuse(suffix, header, body, regression):
    with sandbox() as directory:
        path = directory / f"data{suffix}"
        path.write_text(header + body, encoding="utf-8", errors="surrogatepass")
        read_only(directory, path.name, load_as(path, regression))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
@BOUNDED
@given(raw=st.binary(max_size=400))
def test_random_bytes_read_or_refuse(suffix, raw):
    with sandbox() as directory:
        path = directory / f"data{suffix}"
        path.write_bytes(raw)
        read_only(directory, path.name, load_as(path))


ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "text": st.one_of(st.text(max_size=30), st.none(), st.integers(), st.just("x" * 200_000)),
            "label": st.one_of(
                st.sampled_from(["a", "b", "NaN", "NA", "", "None"]),
                st.none(),
                st.integers(-2, 2),
                st.floats(allow_nan=True, allow_infinity=True),
                st.booleans(),
            ),
        }
    ),
    min_size=0,
    max_size=12,
)


@BOUNDED
@given(rows=ROWS, regression=st.booleans())
def test_json_lines_with_odd_values_read_or_refuse(rows, regression):
    with sandbox() as directory:
        path = directory / "data.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        read_only(directory, path.name, load_as(path, regression))


@BOUNDED
@given(rows=ROWS, names=st.lists(st.sampled_from(["text", "label", "other", ""]), min_size=1, max_size=4))
def test_parquet_tables_read_or_refuse(rows, names):
    import pyarrow as pa
    import pyarrow.parquet as parquet

    with sandbox() as directory:
        path = directory / "data.parquet"
        columns = {}
        for index, name in enumerate(names):  # duplicate names are allowed by Parquet, and refused by deltatune
            key = "text" if name == "text" else "label" if name == "label" else name
            values = [row.get(key) if key in ("text", "label") else index for row in rows]
            try:
                columns[f"{index}"] = (name, pa.array(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                columns[f"{index}"] = (name, pa.array([None if v is None else str(v) for v in values]))
        table = pa.Table.from_arrays(
            [array for _, array in columns.values()], names=[name for name, _ in columns.values()]
        )
        parquet.write_table(table, path)
        read_only(directory, path.name, load_as(path))


# --------------------------------------------------------------------------------------------
# The grid spec parser

SPEC_KEYS = [
    "title",
    "models",
    "tasks",
    "methods",
    "fractions",
    "time_budgets",
    "seeds",
    "train",
    "grids",
    "baseline",
    "statistics",
    "max_train_examples",
    "keep_deltas",
    "source",
    "name",
    "method",
    "config",
    "path",
    "text_fields",
    "task",
    "r",
    "epochs",
    "learning_rate",
    "batch_size",
    "unknown",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**65),
    st.floats(allow_nan=True),
    st.sampled_from(
        [
            "stsb",
            "full",
            "lora",
            "bitfit",
            "minilm-l6",
            "owner/name",
            "../x",
            "~",
            "data.csv",
            "text",
            "",
            "none",
            "<script>",
            "a\x00b.csv",
            "/dev/null",
            ".",
            "data.csv/",
        ]
    ),
    st.text(max_size=10),
)
SPEC_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(SPEC_KEYS), inner, max_size=5)
    ),
    max_leaves=20,
)


@BOUNDED
@given(spec=st.dictionaries(st.sampled_from(SPEC_KEYS), SPEC_VALUES, max_size=8))
def test_grid_specs_parse_or_refuse(spec):
    import yaml

    from deltatune.compare.spec import parse_spec, read_spec_file

    with sandbox() as directory:
        (directory / "data.csv").write_text("text,label\na,x\nb,y\n", encoding="utf-8")
        path = directory / "grid.yaml"
        path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
        before = sorted(p.name for p in directory.iterdir())
        try:
            parse_spec(read_spec_file(path))
        except DeltatuneError:
            pass
        assert sorted(p.name for p in directory.iterdir()) == before


@BOUNDED
@given(text=st.one_of(fields_text(), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_grid_spec_files_of_any_text_parse_or_refuse(text):
    from deltatune.compare.spec import parse_spec, read_spec_file

    with sandbox() as directory:
        path = directory / "grid.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        try:
            parse_spec(read_spec_file(path))
        except DeltatuneError:
            pass
        assert [p.name for p in directory.iterdir()] == ["grid.yaml"]


@BOUNDED
@given(flags=st.lists(st.one_of(PIECES, st.text(max_size=12)), min_size=1, max_size=4))
def test_method_flags_parse_or_refuse(flags):
    from deltatune.compare.spec import parse_spec, spec_from_flags

    try:
        parse_spec(spec_from_flags(tasks=["stsb"], methods=flags))
    except DeltatuneError:
        pass


def _padded_cost(batches, lengths, overhead):
    return sum(len(batch) * max(lengths[i] for i in batch) + overhead for batch in batches)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=9),
    batch_size=st.integers(1, 5),
    overhead=st.integers(0, 80),
)
def test_padding_aware_batches_are_the_cheapest_cut_of_the_sorted_rows(lengths, batch_size, overhead):
    import itertools

    from deltatune.batching import padding_aware_batches

    batches = padding_aware_batches(lengths, batch_size, overhead)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))  # every row once
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    ordered = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cheapest = min(  # every way of cutting the sorted rows into consecutive batches, by brute force
        _padded_cost([ordered[a:b] for a, b in itertools.pairwise((0, *cuts, len(ordered)))], lengths, overhead)
        for count in range(len(ordered))
        for cuts in itertools.combinations(range(1, len(ordered)), count)
        if all(b - a <= batch_size for a, b in itertools.pairwise((0, *cuts, len(ordered))))
    )
    assert _padded_cost(batches, lengths, overhead) == cheapest


def test_padding_aware_batches_keep_short_rows_from_padding_to_a_long_one():
    from deltatune.batching import padding_aware_batches

    lengths = [10] * 15 + [120]
    assert padding_aware_batches(lengths, 64, overhead_tokens=128) == [list(range(15)), [15]]  # 150+128+120+128
    assert padding_aware_batches(lengths, 64, overhead_tokens=2000) == [list(range(16))]  # one pass is cheaper
    assert padding_aware_batches([5, 5, 5], 2, overhead_tokens=0) in ([[0, 1], [2]], [[0], [1, 2]])
