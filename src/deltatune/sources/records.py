"""Data records: how a run says which data it trained on, loading that data again, and checking it is unchanged.

A record is a small dict stored in a run's manifest and `run.json`: a catalog task (`{"kind": "catalog",
"task": "stsb", "source": "auto"}`) or local files (`{"kind": "local", "path": ...}`). `deltatune eval`,
`deltatune.load(...).evaluate()`, the comparison grid and merging all load data through it.
"""

from __future__ import annotations

import os
from pathlib import Path

from deltatune.errors import DeltatuneError
from deltatune.tasks.spec import TaskData

RUN_RECORD = "run.json"
"""The full record of a run, written beside its delta."""


LOCAL_DATA_KEYS = (
    "path",
    "text_fields",
    "label_field",
    "labels",
    "regression",
    "name",
    "metric",
    "dev_path",
    "test_path",
)
"""What a local data record may hold: the arguments of `deltatune.sources.data.load_local_data`."""


def data_record(task: str, source: str = "auto", local: dict | None = None) -> dict:
    """How to load the data again later (for `deltatune eval`): a catalog task or local files."""
    problems = []
    if not isinstance(task, str) or not task.strip():
        problems.append(f"the name must be text (a catalog task such as 'stsb', or a name for your data), got {task!r}")
    if not isinstance(source, str):
        problems.append(f"source must be 'auto', 'mirror' or 'hub', got {source!r}")
    if local is not None:
        if not isinstance(local, dict):
            problems.append(
                f"local must be a dict like {{'path': 'reviews.csv', 'text_fields': ['text']}}, got "
                f"{type(local).__name__} {local!r}"
            )
        else:
            problems += _local_record_problems(local)
    if problems:
        raise DeltatuneError("Cannot describe the data: " + "; ".join(problems) + ".")
    if local is not None:
        return {"kind": "local", **{k: (str(v) if isinstance(v, (Path, os.PathLike)) else v) for k, v in local.items()}}
    return {"kind": "catalog", "task": task, "source": source}


def _local_record_problems(local: dict) -> list[str]:
    from deltatune.errors import did_you_mean

    problems = [
        f"unknown key local[{key!r}]. {did_you_mean(str(key), LOCAL_DATA_KEYS)}"
        for key in local
        if key not in LOCAL_DATA_KEYS
    ]
    if "path" not in local:
        problems.append("local needs 'path', the training file")
    for key in ("path", "dev_path", "test_path"):
        value = local.get(key)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            problems.append(f"local[{key!r}] must be a file path, got {type(value).__name__} {value!r}")
    fields = local.get("text_fields")
    if isinstance(fields, str):
        problems.append(
            f"local['text_fields'] must be a list of column names, e.g. [{fields!r}], not the text {fields!r}"
        )
    elif not isinstance(fields, (list, tuple)) or not fields or not all(isinstance(f, str) for f in fields):
        problems.append(f"local['text_fields'] must be a list of one or two column names, got {fields!r}")
    labels = local.get("labels")
    if labels is not None and (isinstance(labels, str) or not isinstance(labels, (list, tuple))):
        problems.append(f"local['labels'] must be a list of class names, got {labels!r}")
    for key in ("label_field", "name", "metric"):
        if local.get(key) is not None and not isinstance(local[key], str):
            problems.append(f"local[{key!r}] must be text, got {local[key]!r}")
    if "regression" in local and not isinstance(local["regression"], bool):
        problems.append(f"local['regression'] must be True or False, got {local['regression']!r}")
    return problems


def load_data_from_record(record: dict, run: str | None = None) -> TaskData:
    """The data a record describes; `run` (the run directory it was recorded in) makes a missing file's
    error say where the path came from."""
    from deltatune.sources.data import load_local_data, load_task_data

    if record["kind"] == "local":
        arguments = {k: v for k, v in record.items() if k != "kind"}
        gone = [
            str(arguments[key])
            for key in ("path", "dev_path", "test_path")
            if run is not None and arguments.get(key) and not Path(arguments[key]).exists()
        ]
        if gone:
            raise DeltatuneError(
                f"The data file {gone[0]} that {run} was trained on is gone. Put it back (the run "
                "records its sha256 in run.json) to evaluate on it."
            )
        for key in ("text_fields", "labels"):
            if arguments.get(key) is not None:
                arguments[key] = tuple(arguments[key])
        return load_local_data(**arguments)
    return load_task_data(record["task"], source=record.get("source", "auto"))


def check_data_unchanged(data: TaskData, fingerprint: str | None, files: dict, run: str) -> None:
    """Refuse to score a run on data that differ from what it was trained on, saying which file changed."""
    if fingerprint is None or data.fingerprint() == fingerprint:
        return
    current = data.provenance.get("files") or {}
    changes = [
        f"the {split} file {current[split]['path']} had sha256 {old['sha256'][:12]} when the run was "
        f"trained and has {current[split]['sha256'][:12]} now"
        for split, old in files.items()
        if split in current and current[split]["sha256"] != old["sha256"]
    ]
    what = "; ".join(changes) or (
        "the examples deltatune reads from the same source differ (the source or the way deltatune splits it changed)"
    )
    raise DeltatuneError(
        f"The data of {run} changed since it was trained: {what}. Splits re-made from changed data can overlap "
        "the rows the model trained on, so the score would not be honest. Restore the data, or train again on the "
        "new data; pass --data-changed-ok (data_changed_ok=True) to evaluate anyway."
    )


__all__ = ["LOCAL_DATA_KEYS", "RUN_RECORD", "check_data_unchanged", "data_record", "load_data_from_record"]
