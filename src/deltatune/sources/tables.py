"""Reading the user's own data files (CSV, TSV, JSON lines, a JSON array, Parquet) into a table of records.

Every record keeps where it is in the file ("row 3 (line 4)"), so that an error about its values can name
it. A file that cannot be read as the user meant (bad encoding, a NUL byte, broken quoting, a key given
twice, duplicate columns) is a DeltatuneError that says where and how to fix it, never a guess.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deltatune.errors import DeltatuneError

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class Table:
    """A file's column names and its records, each with where it is in the file (for errors)."""

    path: Path
    columns: list[str]
    records: list[tuple[str, dict]]


_CSV_FIELD_LIMIT = 1 << 24  # review and article texts overflow csv's 128 KB default


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_table(path: Path) -> Table:
    """The records of one data file, refused with a clear error when it is not what its suffix says."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DeltatuneError(
            f"Unsupported data file {str(path)!r}: suffix {path.suffix or '(none)'!r}. deltatune reads "
            f"{', '.join(SUFFIXES)}; export your data to one of these (e.g. CSV with a header row)."
        )
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a pipe or device)"
        raise DeltatuneError(f"Data file {str(path)!r} is {kind}. Give the path of a CSV, TSV, JSONL or Parquet file.")
    if not path.is_file():
        raise DeltatuneError(
            f"No data file at {str(path)!r}. Check the path (relative paths are from "
            f"the current directory, {Path.cwd()})."
        )
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
        raise DeltatuneError(f"{path} has no rows, only a header ({', '.join(table.columns)}). Give a file with data.")
    return table


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    skipped = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    zero = raw.find(b"\x00")
    if zero >= 0:
        line = raw[:zero].count(b"\n") + 1
        raise DeltatuneError(
            f"{path} holds a NUL byte at byte offset {zero} (line {line}): "
            "it is a binary file (or UTF-16), not UTF-8 text. Give a CSV, TSV or JSON lines file "
            "saved as UTF-8."
        )
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


def _read_delimited(path: Path, text: str, delimiter: str) -> Table:
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
                f'{"tab" if delimiter == chr(9) else "comma"} must be quoted ("..."); fix that row.'
            )
        if len(row) < len(columns) and "\n" in row[-1]:
            raise DeltatuneError(
                f"{path} row {row_number} (line {line}) has a quoted field that runs over several lines, and the row "
                f'has fewer fields than the header ({len(row)} of {len(columns)}): probably a quote (") that is '
                "never closed. Fix the quoting on that line."
            )
        # a row with fewer fields than the header leaves its last columns missing
        records.append((f"row {row_number} (line {line})", dict(zip(columns, row, strict=False))))
    return Table(path, columns, records)


def _refuse_duplicate_columns(path: Path, columns: list[str]) -> None:
    seen: set[str] = set()
    for column in columns:
        if column in seen:
            raise DeltatuneError(
                f"{path} has two columns named {column!r}; deltatune will not guess which one you "
                "mean. Rename one of them in the header."
            )
        seen.add(column)


def _object_without_duplicate_keys(path: Path, where: str):
    """A json.loads object_pairs_hook: a key given twice in one object is an error, not 'the last one wins'."""

    def build(pairs: list[tuple[str, object]]) -> dict:
        record: dict = {}
        for key, value in pairs:
            if key in record:
                raise DeltatuneError(
                    f"{path} {where} has the key {key!r} twice in one object; deltatune will not "
                    "guess which value you mean. Keep one of them."
                )
            record[key] = value
        return record

    return build


def _parse_delimited(
    path: Path, text: str, delimiter: str, quoting: Literal[0, 1, 2, 3]
) -> list[tuple[int, list[str]]]:
    """(line number where the record starts, fields) for every non-blank record."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    parsed, start = [], 1
    try:
        for row in reader:
            if row and any(field.strip() for field in row):
                parsed.append((start, row))
            start = reader.line_num + 1
    except csv.Error as error:
        raise DeltatuneError(
            f"Cannot parse {path} line {reader.line_num}: {error}. Fix the quoting on that line."
        ) from None
    return parsed


def _read_json_lines(path: Path, text: str) -> Table:
    records: list[tuple[str, dict]] = []
    columns: dict[str, None] = {}
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_object_without_duplicate_keys(path, f"line {line_number}"))
        except (json.JSONDecodeError, RecursionError) as error:
            detail = (
                f"{error.msg}, column {error.colno}" if isinstance(error, json.JSONDecodeError) else "nested too deeply"
            )
            raise DeltatuneError(
                f"{path} line {line_number} is not valid JSON ({detail}). A JSONL file holds one JSON object per line."
            ) from None
        columns.update(dict.fromkeys(_json_object(path, f"line {line_number}", record, " Write one object per line.")))
        records.append((f"row {len(records) + 1} (line {line_number})", record))
    return Table(path, list(columns), records)


def _read_json_array(path: Path, text: str) -> Table:
    try:
        items = json.loads(text, object_pairs_hook=_object_without_duplicate_keys(path, "(JSON array)"))
    except (json.JSONDecodeError, RecursionError) as error:
        detail = f"{error.msg}, line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise DeltatuneError(
            f"{path} is not valid JSON ({detail}). Give a JSON array of objects, or JSON lines (one object per line)."
        ) from None
    if not isinstance(items, list):
        raise DeltatuneError(
            f"{path} holds a JSON {type(items).__name__}, not an array of objects. Give a JSON "
            "array of objects, or JSON lines (one object per line)."
        )
    records, columns = [], {}
    for item_number, item in enumerate(items, 1):
        columns.update(dict.fromkeys(_json_object(path, f"item {item_number}", item, "")))
        records.append((f"row {item_number}", item))
    return Table(path, list(columns), records)


def _json_object(path: Path, where: str, value: object, fix: str) -> dict:
    """A record must be a JSON object; anything else is refused, saying where it is."""
    if not isinstance(value, dict):
        raise DeltatuneError(
            f'{path} {where} is a JSON {type(value).__name__}, not an object like {{"text": ..., "label": ...}}.' + fix
        )
    return value


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DeltatuneError(f"Reading {path} needs pyarrow: pip install pyarrow (or convert it to CSV).") from None
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DeltatuneError(
            f"{path} is not a readable Parquet file ({type(error).__name__}: {error}). "
            "Check that it was written completely, or give a CSV instead."
        ) from None
    if table.num_rows == 0:
        raise DeltatuneError(f"{path} has no rows (columns: {', '.join(table.column_names)}). Give a file with data.")
    _refuse_duplicate_columns(path, list(table.column_names))
    try:
        rows = table.to_pylist()
    except Exception as error:  # columns pyarrow cannot turn into Python values
        raise DeltatuneError(
            f"{path} has a column deltatune cannot read ({type(error).__name__}: {error}). "
            "Store texts as strings and labels as strings or numbers."
        ) from None
    records = [(f"row {number}", record) for number, record in enumerate(rows, 1)]
    return Table(path, list(table.column_names), records)


__all__ = ["SUFFIXES", "Table", "read_table", "sha256_bytes"]
