"""The Hugging Face hub: GLUE tasks through `datasets.load_dataset("nyu-mll/glue", ...)`.

GLUE hides its test labels on the hub, so a hub task has train and dev splits only. When the hub cannot
be reached, a copy already in the local `datasets` cache still loads, in offline mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from deltatune.errors import DeltatuneError
from deltatune.tasks import OFFLINE_TASKS
from deltatune.tasks.spec import Split, TaskData, TaskSpec

GLUE_HUB_ID = "nyu-mll/glue"


def dev_split_name(task: str) -> str:
    """The hub split deltatune uses as dev: MNLI has two, and the matched one is GLUE's usual dev set."""
    return "validation_matched" if task == "mnli" else "validation"


def load_from_hub(task: TaskSpec) -> TaskData:
    """A GLUE task's train and dev splits from the hub (or the local `datasets` cache when offline)."""
    try:
        import datasets
    except ImportError:
        raise DeltatuneError(
            f"Loading {task.name!r} from the hub needs the `datasets` package: pip install datasets"
        ) from None
    from deltatune.sources.models import hub_unreachable_reason

    dev_split = dev_split_name(task.name)
    unreachable = hub_unreachable_reason()
    try:
        with _datasets_offline(datasets, unreachable is not None):  # a cached copy still loads, at once
            loaded = datasets.load_dataset(GLUE_HUB_ID, task.name)
    except Exception as error:  # network errors surface as many types (ConnectionError, OSError, hub errors)
        offline = ", ".join(OFFLINE_TASKS)
        why = (
            f"the hub could not be reached ({unreachable}) and the data are not in the local cache"
            if unreachable is not None
            else "the hub could not be reached or refused the request"
        )
        raise DeltatuneError(
            f"Could not load task {task.name!r} from the Hugging Face hub ({GLUE_HUB_ID}, config "
            f"{task.name!r}): {type(error).__name__}: {str(error)[:300]}. {why[0].upper()}{why[1:]}. Tasks that "
            f"work offline, from packaged mirrors: {offline}. Or pass your own CSV, JSONL or Parquet file."
        ) from error

    splits, split_provenance, dropped = {}, {}, {}
    for name, hub_split in (("train", "train"), ("dev", dev_split)):
        if hub_split not in loaded:
            raise DeltatuneError(
                f"The hub data for {task.name!r} has no {hub_split!r} split (it has: "
                f"{', '.join(loaded)}). deltatune expects GLUE's layout from {GLUE_HUB_ID}."
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
        for row, label in zip(zip(*columns, strict=True), raw_labels, strict=True):
            if label is None or (not task.is_regression and label < 0):  # -1 marks a hidden label
                unlabelled += 1
                continue
            texts.append(tuple(row))
            labels.append(float(label) if task.is_regression else to_index(int(label)))
        splits[name] = Split(texts, labels)
        split_provenance[name] = {
            "origin": "official",
            "from": f"{GLUE_HUB_ID}/{task.name} {hub_split}",
            "examples": len(texts),
        }
        if unlabelled:
            dropped[f"{hub_split}: label hidden (-1)"] = unlabelled
    provenance = {
        "task": task.name,
        "source": "hub",
        "description": f"{GLUE_HUB_ID} config {task.name!r} via datasets {datasets.__version__}",
        "dropped": dropped,
        "splits": split_provenance,
        "notes": [
            "No 'test' split: GLUE hides its test labels on the hub (all -1). Report dev "
            "results, or hold out part of train with stratified_split for a test set."
        ],
    }
    return TaskData(task, splits, provenance)


@contextlib.contextmanager
def _datasets_offline(datasets_module, offline: bool):
    """`datasets` in offline mode for the block (it reads HF_HUB_OFFLINE once, at import)."""
    config = getattr(datasets_module, "config", None)
    if not offline or config is None or not hasattr(config, "HF_HUB_OFFLINE"):
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


__all__ = ["GLUE_HUB_ID", "dev_split_name", "load_from_hub"]
