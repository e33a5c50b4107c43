"""Validation of a grid spec's parts (axes, models, tasks, methods, training settings, baselines): each
check appends every problem it finds, naming where it is, so `deltatune.compare.spec` raises them all at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
from pathlib import Path
from typing import Any

from deltatune.compare.grid import (
    AXIS_TRAIN_FIELDS,
    CATALOG_TASK_KEYS,
    EXECUTION_ONLY_FIELDS,
    LATER_FIELD_DEFAULTS,
    LOCAL_TASK_KEYS,
    LOGGING_FIELDS,
    METHOD_KEYS,
    BaselineCell,
    MethodVariant,
    TaskEntry,
    identity_hash,
)
from deltatune.config import build_config, to_jsonable
from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.training import TrainConfig


def _check_baseline_method(raw: dict, methods: dict[str, MethodVariant], problems: list[str]) -> str | None:
    """The method every other is compared with: `baseline`, or full fine-tuning when the spec has it."""
    baseline = raw.get("baseline")
    if baseline is None:
        return "full" if "full" in methods else None
    if not isinstance(baseline, str):
        problems.append(f"baseline={baseline!r} must be the name of one of the spec's methods")
    elif baseline not in methods and baseline not in _declared_method_names(raw):
        problems.append(
            f"baseline={baseline!r} is not one of the spec's methods. "
            f"{did_you_mean(str(baseline), _declared_method_names(raw))}"
        )
    return baseline


def _check_baselines(value: Any, problems: list[str]) -> tuple[str, ...]:
    from deltatune.baselines import BASELINES

    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"baselines={value!r} must be a list of names from {', '.join(BASELINES)}")
        return ()
    for name in value:
        if name not in BASELINES:
            problems.append(f"baselines: unknown baseline {name!r}. {did_you_mean(name, BASELINES)}")
    if len(set(value)) != len(value):
        problems.append(f"baselines lists {', '.join(sorted({v for v in value if value.count(v) > 1}))} more than once")
    return tuple(dict.fromkeys(v for v in value if v in BASELINES))


def _baseline_cells(
    baselines: tuple[str, ...], cells, tasks: dict[str, TaskEntry], problems: list[str]
) -> tuple[BaselineCell, ...]:
    """One cell per (model, task, baseline) the grid trains on and the baseline applies to; few-shot per seed."""
    from deltatune.baselines import SEEDED, applies_to

    if not baselines:
        return ()
    combinations: dict[tuple[str, str], dict] = {}
    for cell in cells:
        entry = combinations.setdefault((cell.model, cell.task.name), {"seeds": set(), "max_length": set()})
        entry["seeds"].add(cell.seed)
        entry["max_length"].add(cell.train.get("max_length", 128))
    made: dict[str, BaselineCell] = {}
    specs: dict[str, Any] = {}
    for (model, task_name), entry in combinations.items():
        task = tasks[task_name]
        if task_name not in specs:
            specs[task_name] = _task_spec(task, problems)
        if specs[task_name] is None:
            continue
        for name in baselines:
            if applies_to(name, specs[task_name]) is not None:
                continue  # said in the report: the row is absent where the baseline does not apply
            for seed in sorted(entry["seeds"]) if name in SEEDED else [min(entry["seeds"])]:
                cell = BaselineCell("", model, task, name, seed, max(entry["max_length"]))
                cell_id = identity_hash(cell.identity())
                made[cell_id] = dataclasses.replace(cell, cell_id=cell_id)
    return tuple(made.values())


def _task_spec(task: TaskEntry, problems: list[str]):
    """The TaskSpec of a grid task: catalog tasks from the catalog, local files by reading them."""
    from deltatune.tasks import TASKS

    if task.data.get("kind") == "catalog":
        return TASKS[task.data["task"]]
    from deltatune.run import load_data_from_record

    try:
        return load_data_from_record(task.data).task
    except DeltatuneError as error:
        problems.append(f"baselines: task {task.name!r}: {error}")
        return None


def _declared_method_names(raw: dict) -> set[str]:
    """Method names as written, even where they did not validate (for the baseline check's hint)."""
    entries = list(raw.get("methods") or [])
    for grid in raw.get("grids") or []:
        if isinstance(grid, dict):
            entries += list(grid.get("methods") or [])
    names = set()
    for entry in entries:
        if isinstance(entry, str):
            names.add(entry)
        elif isinstance(entry, dict):
            name = entry.get("name") or entry.get("method")
            if isinstance(name, str):
                names.add(name)
    return names


def _check_cap(value: Any, where: str, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{where}={value!r} must be a whole number of at least 1 (or null for no cap)")
        return None
    return value


def _as_list(value: Any, key: str, where: str, problems: list[str]) -> list | None:
    if value is None:
        problems.append(f"{where}{key} is missing; give a list, e.g. {key}: {_EXAMPLES[key]}")
        return None
    if isinstance(value, (str, int, float, dict)) or value is None:
        value = [value]
    if not isinstance(value, list) or not value:
        problems.append(f"{where}{key} must be a non-empty list, e.g. {key}: {_EXAMPLES[key]}")
        return None
    return value


_EXAMPLES = {
    "models": "[minilm-l6]",
    "tasks": "[stsb, sms-spam]",
    "methods": "[full, bitfit, lora]",
    "fractions": "[0.1, 0.3, 1.0]",
    "time_budgets": "[null, 60]",
    "seeds": "[0, 1, 2]",
}


def _check_axes(
    merged: dict,
    wheres: dict[str, str],
    base: Path,
    default_cap: int | None,
    default_source: str,
    problems: list[str],
    cache: dict,
):
    count_before = len(problems)
    where = wheres["models"]
    models = [
        _check_model(m, f"{where}models[{i}]", base, problems)
        for i, m in enumerate(
            _as_list(merged["models"] if merged["models"] is not None else ["minilm-l6"], "models", where, problems)
            or []
        )
    ]
    where = wheres["tasks"]
    tasks = [
        _check_task(t, f"{where}tasks[{i}]", base, default_cap, default_source, problems, cache)
        for i, t in enumerate(_as_list(merged["tasks"], "tasks", where, problems) or [])
    ]
    where = wheres["methods"]
    methods = [
        _check_method(m, f"{where}methods[{i}]", problems)
        for i, m in enumerate(_as_list(merged["methods"], "methods", where, problems) or [])
    ]
    fractions, budgets, seeds = _check_number_axes(merged, wheres, problems)
    train = _check_train(merged["train"], wheres["train"], problems)
    grid_train = merged["train"] if isinstance(merged["train"], dict) else {}
    trains = {}
    for task in tasks:  # the grid's settings, then the task's own, then the method variant's
        for variant in methods:
            if task is None or variant is None:
                continue
            if not task.train and not variant.train:
                trains[task.name, variant.name] = train
                continue
            where = (f"{wheres['tasks']}tasks ({task.name}): " if task.train else "") + (
                f"{wheres['methods']}methods ({variant.name}): " if variant.train else ""
            )
            trains[task.name, variant.name] = _check_train(
                {**grid_train, **task.train, **variant.train}, where, problems
            )
    axes: tuple[tuple[str, list[Any]], ...] = (
        ("models", [m for m in models if m]),
        ("tasks", [t.name for t in tasks if t]),
        ("methods", [m.name for m in methods if m]),
        ("fractions", fractions),
        ("time_budgets", budgets),
        ("seeds", seeds),
    )
    for axis, values in axes:
        duplicates = sorted({str(v) for v in values if values.count(v) > 1})
        if duplicates:
            problems.append(f"{wheres[axis]}{axis} lists {', '.join(duplicates)} more than once")
    if len(problems) > count_before:
        return None
    return models, tasks, methods, fractions, budgets, seeds, trains


def _check_model(value: Any, where: str, base: Path, problems: list[str]) -> str | None:
    """An alias, a local model directory or a hub id ('owner/name'); checked without any network."""
    from deltatune.sources.models import MODEL_ALIASES

    if not isinstance(value, str) or not value.strip():
        problems.append(
            f"{where}={value!r} must be a model name: an alias ({', '.join(MODEL_ALIASES)}), "
            "a local directory or a hub id 'owner/name'"
        )
        return None
    if value in MODEL_ALIASES:
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if path.is_dir():
        if not (path / "config.json").is_file():
            problems.append(
                f"{where}: model directory {str(path)!r} has no config.json; a model directory "
                "holds config.json and *.safetensors weights"
            )
            return None
        return str(path.resolve())
    looks_like_path = value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value
    if looks_like_path:
        problems.append(
            f"{where}: unknown model {value!r}: no directory at {path}. Check the path, or give an "
            f"alias ({', '.join(MODEL_ALIASES)}) or a hub id 'owner/name'."
        )
        return None
    if "/" not in value:
        close = difflib.get_close_matches(value, MODEL_ALIASES, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        problems.append(
            f"{where}: unknown model {value!r}: not an alias ({', '.join(sorted(MODEL_ALIASES))}) "
            f"and not a local directory.{hint} Hub ids are written 'owner/name'."
        )
        return None
    return value  # a hub id: from_pretrained will fetch it in the cell, where a hub is reachable


def _check_number_axes(
    merged: dict, wheres: dict[str, str], problems: list[str]
) -> tuple[list[float], list[float | None], list[int]]:
    """The grid's fractions, time budgets and seeds (each with its default), problems collected."""
    fractions = []
    where = wheres["fractions"]
    for i, value in enumerate(
        _as_list(merged["fractions"] if merged["fractions"] is not None else [1.0], "fractions", where, problems) or []
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            problems.append(f"{where}fractions[{i}]={value!r} must be a number in (0, 1], e.g. 0.3")
        else:
            fractions.append(float(value))
    budgets: list[float | None] = []
    where = wheres["time_budgets"]
    for i, value in enumerate(
        _as_list(
            merged["time_budgets"] if merged["time_budgets"] is not None else [None], "time_budgets", where, problems
        )
        or []
    ):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            budgets.append(None)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            problems.append(
                f"{where}time_budgets[{i}]={value!r} must be seconds (a positive number) or null for no budget"
            )
        else:
            budgets.append(float(value))
    seeds = []
    where = wheres["seeds"]
    for i, value in enumerate(
        _as_list(merged["seeds"] if merged["seeds"] is not None else [42], "seeds", where, problems) or []
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            problems.append(f"{where}seeds[{i}]={value!r} must be a whole number from 0 to 2**63 - 1")
        else:
            seeds.append(value)
    return fractions, budgets, seeds


def _check_catalog_task(
    value: dict, where: str, default_cap: int | None, default_source: str, problems: list[str]
) -> TaskEntry | None:
    """A grid task named from the catalog: {task: NAME, source: ..., max_train_examples: ...}."""
    from deltatune.run import data_record
    from deltatune.tasks import TASKS

    unknown = [k for k in value if k not in CATALOG_TASK_KEYS]
    for key in unknown:
        problems.append(f"{where}: unknown key {key!r} for a catalog task. {did_you_mean(str(key), CATALOG_TASK_KEYS)}")
    name = value["task"]
    if not isinstance(name, str) or name not in TASKS:
        problems.append(
            f"{where}: unknown task {name!r}. {did_you_mean(str(name), TASKS)} For your own data "
            "give {name: ..., path: FILE, text_fields: [...]}."
        )
        return None
    source = value.get("source", default_source)
    if source not in ("auto", "mirror", "hub"):
        problems.append(f"{where}: source={source!r} must be auto, mirror or hub")
        return None
    cap = _check_cap(value.get("max_train_examples", default_cap), f"{where}.max_train_examples", problems)
    train = _task_train(value, where, name, problems)
    if unknown or train is None:
        return None
    return TaskEntry(name, data_record(name, source=source), cap, train=train)


def _task_train(value: dict, where: str, name: str, problems: list[str]) -> dict | None:
    """A task entry's own training settings (checked with the rest of the cell's settings in `_check_axes`)."""
    train = value.get("train") or {}
    if not isinstance(train, dict):
        problems.append(
            f"{where} ({name}): train must be a mapping of training settings for this task's cells, "
            f"e.g. {{min_steps: 250, epochs: 8}}, not {train!r}"
        )
        return None
    return dict(train)


def _check_task(
    value: Any, where: str, base: Path, default_cap: int | None, default_source: str, problems: list[str], cache: dict
) -> TaskEntry | None:
    from deltatune.run import data_record

    if isinstance(value, str):
        value = {"task": value}
    if not isinstance(value, dict):
        problems.append(
            f"{where}={value!r} must be a catalog task name (see `deltatune tasks`) or a mapping "
            "for your own data: {name: reviews, path: reviews.csv, text_fields: [text]}"
        )
        return None
    if "task" in value:
        return _check_catalog_task(value, where, default_cap, default_source, problems)
    unknown = [k for k in value if k not in LOCAL_TASK_KEYS]
    for key in unknown:
        problems.append(
            f"{where}: unknown key {key!r} for a local-data task. {did_you_mean(str(key), (*LOCAL_TASK_KEYS, 'task'))}"
        )
    missing = [k for k in ("path", "text_fields") if k not in value]
    if missing:
        problems.append(
            f"{where}: a local-data task needs {' and '.join(missing)} (and a name), e.g. "
            "{name: reviews, path: reviews.csv, text_fields: [text]}"
        )
        return None
    local: dict[str, Any] = {}
    files = []
    for key in ("path", "dev_path", "test_path"):
        if value.get(key) is None:
            continue
        if "\x00" in str(value[key]):
            problems.append(f"{where}: {key} {str(value[key])!r} holds a NUL character; give a file path")
            return None
        path = Path(str(value[key])).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if not path.is_file():
            problems.append(f"{where}: {key} {str(path)!r} does not exist")
        files.append(path)
        local[key] = str(path)
    text_fields = value["text_fields"]
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    if not isinstance(text_fields, list) or len(text_fields) not in (1, 2):
        problems.append(f"{where}: text_fields={value['text_fields']!r} must name one or two columns")
        return None
    local["text_fields"] = [str(f) for f in text_fields]
    for key in ("label_field", "labels", "regression", "metric"):
        if value.get(key) is not None:
            local[key] = value[key]
    name = str(value.get("name") or Path(local.get("path", "data")).stem)
    local["name"] = name
    cap = _check_cap(value.get("max_train_examples", default_cap), f"{where}.max_train_examples", problems)
    train = _task_train(value, where, name, problems)
    if unknown or train is None or any(not f.is_file() for f in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        key = ("sha256", str(path))
        if key not in cache:
            cache[key] = _file_sha256(path)
        digest.update(cache[key].encode())
    return TaskEntry(name, data_record(name, local=local), cap, digest.hexdigest(), train)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_method(value: Any, where: str, problems: list[str]) -> MethodVariant | None:
    from deltatune.methods import REGISTRY, build_method

    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, dict):
        problems.append(f"{where}={value!r} must be a method name or {{name: lora-r4, method: lora, config: {{r: 4}}}}")
        return None
    for key in value:
        if key not in METHOD_KEYS:
            problems.append(f"{where}: unknown key {key!r}. {did_you_mean(str(key), METHOD_KEYS)}")
    method = value.get("method") or value.get("name")
    if not isinstance(method, str):
        problems.append(f"{where}: say which method, e.g. {{method: lora}}")
        return None
    name = str(value.get("name") or method)
    config = value.get("config") or {}
    if not isinstance(config, dict):
        problems.append(f"{where} ({name}): config must be a mapping of the method's options, e.g. {{r: 4}}")
        return None
    if method not in REGISTRY:
        problems.append(f"{where}: unknown method {method!r}. {did_you_mean(method, REGISTRY)}")
        return None
    try:
        built = build_method(method, config)
    except DeltatuneError as error:
        problems.append(f"{where} ({name}): {error}".replace("\n", "\n    "))
        return None
    train = value.get("train") or {}
    if not isinstance(train, dict):
        problems.append(f"{where} ({name}): train must be a mapping of training settings, e.g. {{learning_rate: 1e-4}}")
        return None
    return MethodVariant(name, method, dict(config), to_jsonable(built.config), dict(train))


def _check_train(value: Any, where: str, problems: list[str]) -> dict:
    value = value or {}
    if not isinstance(value, dict):
        problems.append(f"{where}train must be a mapping of training settings, e.g. {{epochs: 3, batch_size: 32}}")
        return {}
    overrides = {}
    for key, setting in value.items():
        name = str(key).replace("-", "_")
        if name in AXIS_TRAIN_FIELDS:
            problems.append(f"{where}train.{key} is a grid axis here: use {AXIS_TRAIN_FIELDS[name]}: [...] instead")
        elif name == "num_examples":
            problems.append(
                f"{where}train.num_examples would override every fraction; use fractions, and "
                "max_train_examples to cap the training pool"
            )
        else:
            overrides[name] = setting
    try:
        config = build_config(TrainConfig, overrides, prefix="train.")
    except DeltatuneError as error:
        problems.append(f"{where}{error}".replace("\n", "\n    "))
        return {}
    resolved = to_jsonable(config)
    logging_settings = {name: resolved[name] for name in LOGGING_FIELDS if name in overrides}
    for name in (*AXIS_TRAIN_FIELDS, "num_examples", *EXECUTION_ONLY_FIELDS):
        resolved.pop(name, None)
    for name, default in LATER_FIELD_DEFAULTS.items():
        if resolved.get(name) == default:
            resolved.pop(name)
    if "threads" in overrides:  # an explicit thread count is the user's choice, and kept in the record
        resolved["threads"] = config.threads
    resolved.update(logging_settings)
    return resolved
