"""A task from the user's own files: columns checked, labels read, missing splits made and recorded.

Rows are never skipped silently: an empty text, a missing label, an unknown class or a non-numeric
score is an error naming the file, the row and the value, so the data every method sees are the file's.
"""

from __future__ import annotations

import collections
import logging
import math
import re
from pathlib import Path

from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.metrics import METRICS, REGRESSION_METRICS
from deltatune.sources.splits import DEV_FRACTION, LOCAL_FRACTIONS, carve, score_bins
from deltatune.sources.tables import Table, read_table, sha256_bytes
from deltatune.tasks.spec import Split, TaskData, TaskSpec

logger = logging.getLogger(__name__)


def load_local_data(
    path: str | Path,
    text_fields: tuple[str, ...],
    label_field: str = "label",
    labels: tuple[str, ...] | None = None,
    regression: bool = False,
    name: str | None = None,
    metric: str | None = None,
    dev_path: str | Path | None = None,
    test_path: str | Path | None = None,
) -> TaskData:
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
    labels = _checked_arguments(text_fields, label_field, labels, regression, metric)
    files = {"train": Path(path)}
    if dev_path is not None:
        files["dev"] = Path(dev_path)
    if test_path is not None:
        files["test"] = Path(test_path)
    tables = {split: read_table(file) for split, file in files.items()}
    _refuse_shared_files(files)
    for table in tables.values():
        _check_columns(table, text_fields, label_field)

    texts = {split: _texts_of(table, text_fields) for split, table in tables.items()}
    class_names: tuple[str, ...] = ()  # none for regression
    values: dict[str, list]
    if regression:
        values = {split: _scores_of(table, label_field) for split, table in tables.items()}
    else:
        class_names, values = _class_indices(tables, files, label_field, labels)
    splits: dict[str, Split] = {split: Split(texts[split], values[split]) for split in tables}
    split_provenance = {
        split: {"origin": "official", "from": str(files[split]), "examples": len(splits[split])} for split in splits
    }
    # the user picked their dev set when they gave one; without a test file, there is then no test split
    to_make = () if dev_path is not None else tuple(split for split in ("dev", "test") if split not in files)
    if to_make:
        made, made_provenance = _make_splits(splits.pop("train"), to_make, files["train"], regression)
        splits.update(made)
        split_provenance.update(made_provenance)
    splits = {split: splits[split] for split in ("train", "dev", "test") if split in splits}
    if not regression:
        _warn_unseen_labels(splits, class_names)
    task = _local_task(name or Path(path).stem, text_fields, class_names, regression, metric, splits, files)
    provenance = {
        "task": task.name,
        "source": "local",
        "description": task.source,
        "files": {
            split: {"path": str(file.resolve()), "sha256": sha256_bytes(file.read_bytes())}
            for split, file in files.items()
        },
        "dropped": {},
        "notes": [],
        "splits": split_provenance,
    }
    return TaskData(task, splits, provenance)


def _checked_arguments(
    text_fields: tuple[str, ...], label_field: str, labels: tuple[str, ...] | None, regression: bool, metric: str | None
) -> tuple[str, ...] | None:
    """Every problem with the arguments, raised once; the class names as strings."""
    problems = []
    if len(text_fields) not in (1, 2):
        problems.append(f"text_fields must name one or two columns, got {text_fields!r}")
    elif len(set(text_fields)) != len(text_fields):
        problems.append(f"text_fields names the column {text_fields[0]!r} twice; a pair needs two different columns")
    if label_field in text_fields:
        problems.append(
            f"the label column {label_field!r} is also a text field, so the model would read the answer; "
            "name the label column with label_field (--label-field) and the inputs with text_fields"
        )
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
    return labels


def _class_indices(
    tables: dict[str, Table], files: dict[str, Path], label_field: str, labels: tuple[str, ...] | None
) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """The class names (given, or the column's sorted values) and each split's labels as indices into them."""
    raw = {split: _label_names_of(table, label_field, labels or ()) for split, table in tables.items()}
    if labels is None:
        labels = _sorted_label_names({value for column in raw.values() for value in column})
    values = {split: _label_indices(tables[split], raw[split], labels, label_field) for split in tables}
    _refuse_single_class(raw, labels, files, label_field)
    _warn_unlikely_classes(labels, sum(len(column) for column in raw.values()), label_field)
    return labels, values


def _make_splits(
    pool: Split, to_make: tuple[str, ...], train_file: Path, regression: bool
) -> tuple[dict[str, Split], dict[str, dict]]:
    """Cut the splits the user did not give from the training file, refusing any that would be empty."""
    fractions = LOCAL_FRACTIONS if len(to_make) == 2 else (1 - DEV_FRACTION, DEV_FRACTION)
    strata = score_bins(pool.labels) if regression else pool.labels
    made, made_provenance = carve(
        pool, ("train", *to_make), fractions, strata, str(train_file), "score decile" if regression else "label"
    )
    empty = [split for split, data in made.items() if not len(data)]
    if empty:
        raise DeltatuneError(
            f"{train_file} has only {len(pool)} rows: too few to make {' and '.join(to_make)} splits "
            f"of {', '.join(f'{f:.0%}' for f in fractions[1:])} each ({', '.join(empty)} would be empty). "
            "Add rows, or give dev_path/test_path files."
        )
    return made, made_provenance


def _local_task(
    name: str,
    text_fields: tuple[str, ...],
    labels: tuple[str, ...],
    regression: bool,
    metric: str | None,
    splits: dict[str, Split],
    files: dict[str, Path],
) -> TaskSpec:
    """The task spec of local data: its metrics, and its score range or class names."""
    score_range: tuple[float, float] | None = None
    if regression:
        all_scores = [score for split in splits.values() for score in split.labels]
        metrics: tuple[str, ...] = ("pearson", "spearman")
        score_range = (min(all_scores), max(all_scores))
    else:
        metrics = ("accuracy", "f1")
    primary = metric or metrics[0]
    metrics = (primary, *(m for m in metrics if m != primary))
    source = "local file " + ", ".join(f"{split}: {file}" for split, file in files.items())
    return TaskSpec(
        name,
        text_fields,
        labels,
        score_range=score_range,
        metric=primary,
        metrics=metrics,
        source=source,
        description="",
    )


def _refuse_shared_files(files: dict[str, Path]) -> None:
    """Scoring on the training rows themselves would report memorisation as skill."""
    seen: dict[str, str] = {}
    for split, file in files.items():
        digest = sha256_bytes(file.read_bytes())
        if digest in seen:
            other = seen[digest]
            used = "trained on" if other == "train" else "was selected on"
            raise DeltatuneError(
                f"The {split} file {file} has the same content as the {other} file {files[other]}: {split} scores "
                f"would be measured on rows the model {used}. Give a separate file, or leave it out and deltatune "
                "makes a split from the training file."
            )
        seen[digest] = split


def _check_columns(table: Table, text_fields: tuple[str, ...], label_field: str) -> None:
    missing = [f"{column!r} (text_fields)" for column in text_fields if column not in table.columns]
    if label_field not in table.columns:
        missing.append(f"{label_field!r} (label_field)")
    if missing:
        raise DeltatuneError(
            f"{table.path} has no column {' and no column '.join(missing)}. Its columns are: "
            f"{', '.join(map(repr, table.columns))}. Name those in text_fields / label_field."
        )


def _is_missing(value) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def _rows_error(table: Table, bad: list[str], what: str, fix: str) -> DeltatuneError:
    shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} rows in all)" if len(bad) > 5 else "")
    return DeltatuneError(f"{table.path}: {what} in {shown}. {fix}")


def _texts_of(table: Table, text_fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    texts, bad = [], []
    for location, record in table.records:
        values = tuple(record.get(column) for column in text_fields)
        empty = [column for column, value in zip(text_fields, values, strict=True) if _is_missing(value)]
        if empty:
            bad.append(f"{location} ({', '.join(empty)})")
        nested = [column for column, value in zip(text_fields, values, strict=True) if not _is_scalar(value)]
        if nested:
            raise _rows_error(
                table,
                [location],
                f"a text that is a {type(record[nested[0]]).__name__}, not a string (column {nested[0]!r})",
                "Each text field must hold one string per row.",
            )
        texts.append(tuple(value if isinstance(value, str) else str(value) for value in values))
    if bad:
        raise _rows_error(
            table,
            bad,
            "empty or missing text",
            "deltatune does not skip rows silently: remove those rows or fill them in.",
        )
    return texts


def _is_scalar(value) -> bool:
    """A string, number or boolean (what a table cell holds); JSON lists and objects are not."""
    return value is None or isinstance(value, (str, int, float, bool))


MISSING_MARKERS = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
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


def _label_names_of(table: Table, label_field: str, class_names: tuple[str, ...] = ()) -> list[str]:
    nested = [
        f"{location} ({type(record.get(label_field)).__name__})"
        for location, record in table.records
        if not _is_scalar(record.get(label_field))
    ]
    if nested:
        raise _rows_error(
            table,
            nested,
            f"a label in column {label_field!r} that is a JSON list or object",
            "A label is one class name (a string or a number) per row.",
        )
    names = [_label_name(record.get(label_field), class_names) for _, record in table.records]
    bad = [
        f"{location} ({record.get(label_field)!r})"
        for (location, record), name in zip(table.records, names, strict=True)
        if name is None
    ]
    if bad:
        raise _rows_error(
            table,
            bad,
            f"no label in column {label_field!r} (empty, null, or a missing-value marker "
            "such as NaN, NA, null or None)",
            "Remove those rows or give them a label; if such a text is a real class name, list it "
            "in --labels (labels=).",
        )
    return [name for name in names if name is not None]  # every one, after the check above


def _refuse_single_class(
    names: dict[str, list[str]], labels: tuple[str, ...], files: dict[str, Path], label_field: str
) -> None:
    """A classifier needs two classes in the data: with one, it learns nothing and scores 1.0 on it."""
    present = {name for column in names.values() for name in column}
    if len(present) >= 2:
        return
    found = f"only the class {next(iter(present))!r}" if present else "no class at all"
    listed = f" (labels lists {', '.join(map(repr, labels))}, but the others never occur)" if len(labels) > 1 else ""
    raise DeltatuneError(
        f"{', '.join(str(f) for f in files.values())}: column {label_field!r} holds {found}{listed}. A classifier "
        "needs examples of at least two classes (with one it learns nothing and scores a meaningless 1.0). Add "
        "examples of the other classes, or use --regression if the column holds scores."
    )


def _warn_unlikely_classes(labels: tuple[str, ...], rows: int, label_field: str) -> None:
    """Say so when the label column looks like scores or an id rather than classes (it still trains)."""

    def number(name: str) -> float | None:
        try:
            return float(name)
        except ValueError:
            return None

    values = [number(name) for name in labels]
    numbers = [value for value in values if value is not None]
    if len(numbers) == len(values) and any(not value.is_integer() for value in numbers):
        logger.warning(
            "Column %r holds numbers such as %s, read as %d class names. If they are scores, pass "
            "--regression (regression=True).",
            label_field,
            ", ".join(labels[:3]),
            len(labels),
        )
    elif len(labels) > 20 and len(labels) > rows / 2:
        logger.warning(
            "Column %r has %d distinct values in %d rows, read as classes with about %.1f examples "
            "each: is it an id or a text column? Name the label column with --label-field, or pass "
            "--regression for scores.",
            label_field,
            len(labels),
            rows,
            rows / len(labels),
        )


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
            logger.warning(
                "The %s data hold labels the training data never show: %s. The model cannot learn "
                "them, so those rows count as errors; add training examples of them.",
                split,
                listed,
            )


_INTEGER = re.compile(r"[+-]?\d+")


def _sorted_label_names(names: set[str]) -> tuple[str, ...]:
    if all(_INTEGER.fullmatch(name) for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _label_indices(table: Table, names: list[str], labels: tuple[str, ...], label_field: str) -> list[int]:
    index = {label: i for i, label in enumerate(labels)}
    unknown = [(location, name) for (location, _), name in zip(table.records, names, strict=True) if name not in index]
    if unknown:
        location, value = unknown[0]
        more = f" ({len(unknown)} rows have labels outside that list)" if len(unknown) > 1 else ""
        hint = ""
        if _INTEGER.fullmatch(value) and not any(_INTEGER.fullmatch(label) for label in labels):
            hint = (
                " The file seems to hold class numbers: write the class names in the file, or leave "
                "labels unset to use the values themselves as names."
            )
        raise DeltatuneError(
            f"Unknown label {value!r} in column {label_field!r} at {location} of {table.path}{more}. "
            f"Valid labels: {', '.join(map(repr, labels))}. Fix the row, or add the label to labels.{hint}"
        )
    return [index[name] for name in names]


def _scores_of(table: Table, label_field: str) -> list[float]:
    scores, bad = [], []
    for location, record in table.records:
        value = record.get(label_field)
        try:
            if value is None or isinstance(value, bool) or _is_missing(value):
                raise ValueError
            score = float(value)
            if not math.isfinite(score):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            bad.append(f"{location} ({value!r})")
            score = 0.0
        scores.append(score)
    if bad:
        raise _rows_error(
            table,
            bad,
            f"a label in column {label_field!r} that is not a number (or is empty, a "
            "missing-value marker such as NaN or NA, or infinite)",
            "regression needs a finite score in every row: fix or remove those rows, or load the "
            "task as classification (without --regression).",
        )
    return scores


__all__ = ["MISSING_MARKERS", "load_local_data"]
