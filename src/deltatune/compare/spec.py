"""The grid spec: what to compare, validated in full before anything runs, and expanded into cells.

A spec is a YAML file (or the same mapping built from CLI flags). Its axes are models, tasks,
methods (each with optional config variants under its own name), data fractions, time budgets
and seeds; `train` holds the training settings every cell shares (any `TrainConfig` field except
the three that are axes; a method entry may carry its own `train` overrides, e.g. a learning
rate). `grids` optionally lists several sub-grids, each overriding some axes;
the union of their cells runs, each distinct cell once.

    title: BitFit and LoRA against full fine-tuning
    models: [minilm-l6]
    tasks:
      - stsb
      - {task: snli, max_train_examples: 5000}
      - {name: reviews, path: data/reviews.csv, text_fields: [text]}
    methods:
      - full
      - bitfit
      - {name: lora-r4, method: lora, config: {r: 4}}
      - {name: lora-r16, method: lora, config: {r: 16, alpha: 32}}
      - {name: full-fast, method: full, train: {learning_rate: 1e-4}}
    fractions: [0.1, 0.3, 0.6, 1.0]
    time_budgets: [null]
    seeds: [0, 1, 2]
    train: {epochs: 10, min_steps: 300, early_stopping_patience: 3, eval_every: 30, batch_size: 32}
    lr_search: auto
    baselines: [majority, embedding-cosine]
    keep_deltas: false
    baseline: full
    grids:
      - {name: data}
      - {name: time, fractions: [1.0], time_budgets: [30, 120], train: {epochs: 20}}

`lr_search` (a list of learning rates, or `auto` for each method's own candidates) makes every cell
choose its learning rate on dev by successive halving (`deltatune.search`); it is a training setting, so a
method variant can carry its own (`train: {lr_search: [1e-3, 1e-2]}`), and top-level `lr_search: X` is
short for `train: {lr_search: X}`. Every cell evaluates its kept state on the task's test split, which is
what the report's numbers, intervals and verdicts use; dev chooses the checkpoint and the learning rate.

`baselines` adds rows that involve no training (`deltatune.baselines`: majority, embedding-cosine,
zero-shot, few-shot) for every model and task they apply to: one cell each (few-shot: one per seed),
shown beside the methods under every condition of that task.

`keep_deltas: false` (the default) deletes each cell's delta.safetensors once it is written and
measured (its size stays in the record): a full fine-tuning delta of MiniLM-L6 is 90 MB, and a
grid has hundreds of cells. run.json, deltatune.json and the per-example dev outputs (what the
paired statistics need) are always kept under EXP_DIR/cells/CELL_ID/. The setting applies to
cells run after it is set; it is not part of a cell's identity.

`max_train_examples` (top level or per task) makes fractions fractions of a fixed stratified pool
of that many training examples, e.g. to use a 5,000-pair subset of SNLI's 95k.

Every problem in a spec (unknown key, method, task, model, bad value) is collected and raised
once, naming where it is, so a user fixes a spec in one pass instead of one error per run.

A cell's identity is a hash of its fully resolved settings (model, data, method and its resolved
config, every training setting). Equal settings give the same id in any process on any day, so a
finished cell is never run twice; any change to what a cell would compute gives a new id. The
display name of a method variant is not part of it: renaming `lora-r4` does not re-run anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.cli_options import parse_method_text
from deltatune.config import build_config, to_jsonable
from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.training import TrainConfig

IDENTITY_VERSION = 2
"""Bump when the meaning of a cell's settings changes in a way its hash would not show. (2: cells evaluate
on test and record the head; their settings include the head, pooling, min_steps and lr_search.)"""

AXES = ("models", "tasks", "methods", "fractions", "time_budgets", "seeds", "train")
"""The keys a sub-grid under `grids` may override."""

TOP_LEVEL_KEYS = (
    *AXES,
    "title",
    "description",
    "grids",
    "keep_deltas",
    "baseline",
    "statistics",
    "max_train_examples",
    "source",
    "baselines",
    "lr_search",
)

AXIS_TRAIN_FIELDS = {"data_fraction": "fractions", "seed": "seeds", "time_budget_s": "time_budgets"}
"""TrainConfig fields that are grid axes, and the spec key to use instead."""

EXECUTION_ONLY_FIELDS = ("quiet", "threads", "report_to", "log_dir")
"""TrainConfig fields that change how a cell runs but not what it computes: left out of its identity.
(threads is chosen per machine and --jobs; results match to float rounding.)"""

LATER_FIELD_DEFAULTS = {
    "device": "auto",
    "gradient_checkpointing": False,
    "fsdp": False,
    "regime": "standard",
    "mezo_epsilon": 1e-3,
    "hft_stage_steps": None,
    "surgical_probe_steps": 20,
}
"""TrainConfig fields added after grids were first stored: left out of a cell's identity at their default,
so an experiment stored before them resumes instead of training every cell again."""

LOGGING_FIELDS = ("report_to", "log_dir")
"""Execution-only fields a cell still runs with when the spec sets them (where its training scalars go)."""

LOCAL_TASK_KEYS = (
    "name",
    "path",
    "text_fields",
    "label_field",
    "labels",
    "regression",
    "metric",
    "dev_path",
    "test_path",
    "max_train_examples",
)
CATALOG_TASK_KEYS = ("task", "source", "max_train_examples")
METHOD_KEYS = ("name", "method", "config", "train")
GRID_KEYS = ("name", *AXES)


@dataclass(frozen=True)
class StatisticsConfig:
    bootstrap_samples: int = 1000
    """Bootstrap resamples for each confidence interval."""
    confidence: float = 0.95
    """Coverage of the confidence intervals."""
    margin_points: float = 1.0
    """A method 'matches' the baseline when the whole interval of the difference lies within ± this
    many points (metric × 100)."""
    target_fraction: float = 0.95
    """Time-to-target: training seconds until dev first reaches this fraction of the baseline's best."""
    seed: int = 0
    """Seeds the bootstrap resampling, so a report is the same every time it is built."""

    def __post_init__(self) -> None:
        problems = []
        if self.bootstrap_samples < 100:
            problems.append(f"bootstrap_samples={self.bootstrap_samples} is too few for an interval; use 1000 or more")
        if not 0.5 <= self.confidence < 1:
            problems.append(f"confidence={self.confidence} must be in [0.5, 1), e.g. 0.95")
        if self.margin_points < 0:
            problems.append(f"margin_points={self.margin_points} must not be negative")
        if not 0 < self.target_fraction <= 1:
            problems.append(f"target_fraction={self.target_fraction} must be in (0, 1], e.g. 0.95")
        if problems:
            raise DeltatuneError("; ".join(problems))


@dataclass(frozen=True)
class TaskEntry:
    """A task of the grid: a catalog task or the user's own files, with an optional training-pool cap."""

    name: str
    data: dict
    """A `deltatune.run.data_record`: how the cell loads the data."""
    max_train_examples: int | None = None
    """Fractions are taken of at most this many training examples (a fixed stratified pool)."""
    data_sha256: str | None = None
    """For local files: their content hash, so an edited file gives new cells."""


@dataclass(frozen=True)
class MethodVariant:
    """A registered method with one configuration, shown under its own name (e.g. lora-r16)."""

    name: str
    method: str
    config: dict = field(default_factory=dict)
    """The overrides as written in the spec."""
    resolved_config: dict = field(default_factory=dict)
    """The method's whole config with defaults filled in: what the identity uses."""
    train: dict = field(default_factory=dict)
    """Training settings for this variant only, over the grid's (e.g. its own learning_rate)."""


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    cell_id: str
    grid: str
    model: str
    task: TaskEntry
    method: MethodVariant
    data_fraction: float
    time_budget_s: float | None
    seed: int
    train: dict
    """Resolved TrainConfig fields other than the axes and the execution-only ones."""
    keep_delta: bool = False

    def identity(self) -> dict:
        return cell_identity(
            self.model, self.task, self.method, self.train, self.data_fraction, self.time_budget_s, self.seed
        )

    def describe(self) -> str:
        budget = f" budget={self.time_budget_s:g}s" if self.time_budget_s is not None else ""
        return (
            f"{self.method.name} on {self.task.name} ({_short_model(self.model)}) "
            f"fraction={self.data_fraction:g}{budget} seed={self.seed}"
        )

    def payload(self) -> dict:
        """Everything the cell process needs, as JSON."""
        return {
            "cell_id": self.cell_id,
            "grid": self.grid,
            "model": self.model,
            "task": self.task.name,
            "data": self.task.data,
            "max_train_examples": self.task.max_train_examples,
            "method": self.method.method,
            "variant": self.method.name,
            "method_overrides": self.method.config,
            "method_config": self.method.resolved_config,
            "data_fraction": self.data_fraction,
            "time_budget_s": self.time_budget_s,
            "seed": self.seed,
            "train": self.train,
            "keep_delta": self.keep_delta,
            "identity": self.identity(),
        }


@dataclass(frozen=True)
class BaselineCell:
    """One no-training row of the grid (`deltatune.baselines`) for a model and task."""

    cell_id: str
    model: str
    task: TaskEntry
    baseline: str
    seed: int
    max_length: int
    grid: str = "baselines"

    def identity(self) -> dict:
        from deltatune.baselines import DEFAULT_SHOTS, SEEDED

        return {
            "identity_version": IDENTITY_VERSION,
            "kind": "baseline",
            "baseline": self.baseline,
            "model": self.model,
            "data": self.task.data,
            "data_sha256": self.task.data_sha256,
            "max_train_examples": self.task.max_train_examples,
            "max_length": self.max_length,
            "seed": self.seed if self.baseline in SEEDED else None,
            "shots": DEFAULT_SHOTS if self.baseline == "few-shot" else None,
        }

    def describe(self) -> str:
        return f"{self.baseline} (no training) on {self.task.name} ({_short_model(self.model)}) seed={self.seed}"

    def payload(self) -> dict:
        return {
            "cell_id": self.cell_id,
            "kind": "baseline",
            "grid": self.grid,
            "model": self.model,
            "task": self.task.name,
            "data": self.task.data,
            "max_train_examples": self.task.max_train_examples,
            "method": self.baseline,
            "variant": self.baseline,
            "method_overrides": {},
            "method_config": {},
            "data_fraction": 1.0,
            "time_budget_s": None,
            "seed": self.seed,
            "train": {"max_length": self.max_length},
            "keep_delta": False,
            "identity": self.identity(),
        }


@dataclass(frozen=True)
class GridSpec:
    """A validated spec: its cells and the settings the statistics and report use."""

    title: str
    description: str
    cells: tuple[Cell, ...]
    methods: tuple[MethodVariant, ...]
    """Every variant in the spec's order (the report keeps this order and its colours)."""
    tasks: tuple[TaskEntry, ...]
    baseline: str | None
    statistics: StatisticsConfig
    keep_deltas: bool
    raw: dict
    """The spec as given (after CLI overrides), for the record."""
    baseline_cells: tuple[BaselineCell, ...] = ()
    baselines: tuple[str, ...] = ()
    """The no-training rows asked for, in the spec's order."""

    @property
    def every_cell(self) -> tuple:
        """The training cells, then the no-training ones: everything the runner runs."""
        return (*self.cells, *self.baseline_cells)


def cell_identity(
    model: str,
    task: TaskEntry,
    method: MethodVariant,
    train: dict,
    data_fraction: float,
    time_budget_s: float | None,
    seed: int,
) -> dict:
    return {
        "identity_version": IDENTITY_VERSION,
        "model": model,
        "data": task.data,
        "data_sha256": task.data_sha256,
        "max_train_examples": task.max_train_examples,
        "method": method.method,
        "method_config": method.resolved_config,
        "train": {
            **{k: v for k, v in train.items() if k not in LOGGING_FIELDS},
            "data_fraction": float(data_fraction),
            "seed": int(seed),
            "time_budget_s": None if time_budget_s is None else float(time_budget_s),
        },
    }


def identity_hash(identity: dict) -> str:
    """16 hex digits of sha256 over canonical JSON: the same in every process (no hash seed)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Reading a spec


def read_spec_file(path: str | Path) -> dict:
    """The YAML mapping in `path`, with where it came from (relative data paths are resolved from it)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DeltatuneError(
            f"Spec file {str(path)!r} does not exist. Give a YAML grid spec, or use "
            "--preset doering2024, or build the grid from flags (see `deltatune compare --help`)."
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_spec_loader())
    except UnicodeDecodeError as error:
        raise DeltatuneError(
            f"Spec file {str(path)!r} is not UTF-8 text (byte {error.start}); save it as UTF-8 YAML."
        ) from None
    except yaml.YAMLError as error:
        raise DeltatuneError(f"Spec file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise DeltatuneError(
            f"Spec file {str(path)!r} must hold a mapping (keys like models:, tasks:, methods:), "
            f"not {type(data).__name__}."
        )
    data.setdefault("_base_dir", str(path.resolve().parent))
    return data


def _spec_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""
    import yaml

    class SpecLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice; give it once", key_node.start_mark
                )
            if isinstance(key, (str, int, float, bool)):
                keys.add(key)
        return loader.construct_mapping(node, deep=deep)

    SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return SpecLoader


def parse_spec(raw: dict, base_dir: str | Path | None = None) -> GridSpec:
    """Validate a spec mapping completely and expand it; every problem is raised at once."""
    raw = dict(raw)
    base = Path(raw.pop("_base_dir", None) or base_dir or ".").resolve()
    problems: list[str] = []
    if raw.get("lr_search") is not None:  # short for train: {lr_search: ...}
        if isinstance(raw.get("train") or {}, dict):
            raw["train"] = {"lr_search": raw["lr_search"], **(raw.get("train") or {})}
    settings = _check_settings(raw, problems)
    expansion = _Expansion()
    for position, entry in enumerate(_grid_entries(raw, problems)):
        _expand_grid(raw, position, entry, base, settings, expansion, problems)
    baselines = _check_baselines(raw.get("baselines"), problems)
    baseline_cells = _baseline_cells(baselines, expansion.cells.values(), expansion.tasks, problems)
    baseline = _check_baseline_method(raw, expansion.methods, problems)
    problems = list(dict.fromkeys(problems))  # an inherited axis is checked once per sub-grid: say it once
    if problems:
        count = len(problems)
        raise DeltatuneError(
            f"The grid spec has {count} problem{'s' if count > 1 else ''} (nothing was run):"
            + "".join(f"\n  - {p}" for p in problems)
        )
    if not expansion.cells:
        raise DeltatuneError(
            "The grid spec expands to no cells: give at least one model, task, method, fraction and seed."
        )
    return GridSpec(
        title=settings.title,
        description=settings.description,
        cells=tuple(expansion.cells.values()),
        methods=tuple(expansion.methods.values()),
        tasks=tuple(expansion.tasks.values()),
        baseline=baseline,
        statistics=settings.statistics,
        keep_deltas=settings.keep_deltas,
        raw=raw,
        baseline_cells=baseline_cells,
        baselines=baselines,
    )


@dataclass(frozen=True)
class _Settings:
    """The spec's top-level settings that every sub-grid shares, after checking."""

    title: str
    description: str
    keep_deltas: bool
    statistics: StatisticsConfig
    default_cap: int | None
    default_source: str


@dataclass
class _Expansion:
    """What the sub-grids expand to so far: each distinct cell once, and every method and task by name."""

    methods: dict[str, MethodVariant] = field(default_factory=dict)
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    cells: dict[str, Cell] = field(default_factory=dict)
    grid_names: set[str] = field(default_factory=set)
    checked: dict[tuple, str] = field(default_factory=dict)
    """sha256 of each local data file already read (a file inherited by several sub-grids is hashed once)."""


def _check_settings(raw: dict, problems: list[str]) -> _Settings:
    """Unknown top-level keys, and the settings that are not axes."""
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"unknown key {key!r}. {did_you_mean(str(key), TOP_LEVEL_KEYS)}")
    keep_deltas = raw.get("keep_deltas", False)
    if not isinstance(keep_deltas, bool):
        problems.append(f"keep_deltas={keep_deltas!r} must be true or false")
        keep_deltas = False
    statistics = StatisticsConfig()
    if raw.get("statistics") is not None:
        if not isinstance(raw["statistics"], dict):
            problems.append("statistics must be a mapping, e.g. {bootstrap_samples: 1000, margin_points: 1.0}")
        else:
            try:
                statistics = build_config(StatisticsConfig, raw["statistics"], prefix="statistics.")
            except DeltatuneError as error:
                problems.append(str(error))
    default_cap = _check_cap(raw.get("max_train_examples"), "max_train_examples", problems)
    default_source = raw.get("source", "auto")
    if default_source not in ("auto", "mirror", "hub"):
        problems.append(f"source={default_source!r} must be auto, mirror or hub")
        default_source = "auto"
    return _Settings(
        str(raw.get("title") or "deltatune comparison"),
        str(raw.get("description") or ""),
        keep_deltas,
        statistics,
        default_cap,
        default_source,
    )


def _grid_entries(raw: dict, problems: list[str]) -> list:
    grid_entries = raw.get("grids")
    if grid_entries is None:
        return [{"name": "main"}]
    if not isinstance(grid_entries, list) or not grid_entries:
        problems.append(
            "grids must be a non-empty list of sub-grids, e.g. [{name: data}, {name: time, "
            "fractions: [1.0], time_budgets: [60]}]"
        )
        return [{"name": "main"}]
    return grid_entries


def _expand_grid(
    raw: dict, position: int, entry: Any, base: Path, settings: _Settings, expansion: _Expansion, problems: list[str]
) -> None:
    """Check one sub-grid (the top-level axes with its overrides) and add its cells to `expansion`."""
    if not isinstance(entry, dict):
        problems.append(f"grids[{position}] must be a mapping of axis overrides, got {entry!r}")
        return
    grid_name = str(entry.get("name") or f"grid{position + 1}")
    if grid_name in expansion.grid_names:
        problems.append(f"grids[{position}]: the name {grid_name!r} is used twice")
    expansion.grid_names.add(grid_name)
    for key in entry:
        if key not in GRID_KEYS:
            problems.append(
                f"grids[{position}] ({grid_name}): unknown key {key!r}. {did_you_mean(str(key), GRID_KEYS)}"
            )
    merged = {axis: raw.get(axis) for axis in AXES}
    for axis in AXES:
        if axis in entry:
            if axis == "train" and isinstance(entry[axis], dict) and isinstance(raw.get("train") or {}, dict):
                merged[axis] = {**(raw.get("train") or {}), **entry[axis]}
            else:
                merged[axis] = entry[axis]
    where = f"grids[{position}] ({grid_name}): " if "grids" in raw else ""
    wheres = {axis: where if axis in entry else "" for axis in AXES}
    axes = _check_axes(merged, wheres, base, settings.default_cap, settings.default_source, problems, expansion.checked)
    if axes is None:
        return
    models, tasks, methods, fractions, budgets, seeds, trains = axes
    for variant in methods:
        previous = expansion.methods.get(variant.name)
        if previous is not None and previous != variant:
            problems.append(
                f"{where}method name {variant.name!r} means different settings in different "
                "sub-grids; give each variant its own name"
            )
        expansion.methods.setdefault(variant.name, variant)
    for task in tasks:
        expansion.tasks.setdefault(task.name, task)
    # seeds outermost: after the first seed every comparison already has one result
    for seed, task, model, fraction, budget, variant in itertools.product(
        seeds, tasks, models, fractions, budgets, methods
    ):
        train = trains[variant.name]
        cell_id = identity_hash(cell_identity(model, task, variant, train, fraction, budget, seed))
        if cell_id in expansion.cells:
            if expansion.cells[cell_id].method.name != variant.name:
                problems.append(
                    f"{where}methods {expansion.cells[cell_id].method.name!r} and {variant.name!r} "
                    "resolve to the same settings (same method and config): drop one"
                )
            continue  # the same cell from two sub-grids runs once
        expansion.cells[cell_id] = Cell(
            cell_id,
            grid_name,
            model,
            task,
            variant,
            float(fraction),
            None if budget is None else float(budget),
            int(seed),
            train,
            settings.keep_deltas,
        )


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


def _short_model(model: str) -> str:
    return Path(model).name if "/" in model and Path(model).is_absolute() else model


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
    trains = {}
    for variant in methods:  # a variant's own settings (e.g. its learning rate) over the grid's
        if variant is not None:
            trains[variant.name] = (
                train
                if not variant.train
                else _check_train(
                    {**(merged["train"] if isinstance(merged["train"], dict) else {}), **variant.train},
                    f"{wheres['methods']}methods ({variant.name}): ",
                    problems,
                )
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
    return None if unknown else TaskEntry(name, data_record(name, source=source), cap)


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
    if unknown or any(not f.is_file() for f in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        key = ("sha256", str(path))
        if key not in cache:
            cache[key] = _file_sha256(path)
        digest.update(cache[key].encode())
    return TaskEntry(name, data_record(name, local=local), cap, digest.hexdigest())


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


def train_config_for(cell_payload: dict, threads: int | None = None, num_examples: int | None = None) -> TrainConfig:
    """The TrainConfig a cell trains with (inverse of `_check_train` plus the axes)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in cell_payload["train"].items() if k in fields}
    settings.update(
        data_fraction=cell_payload["data_fraction"],
        seed=cell_payload["seed"],
        time_budget_s=cell_payload["time_budget_s"],
        quiet=True,
        num_examples=num_examples,
    )
    if settings.get("threads") is None:
        settings["threads"] = threads
    return build_config(TrainConfig, settings, prefix="train.")


def spec_from_flags(
    models: list[str] | None = None,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    fractions: list[float] | None = None,
    time_budgets: list[float | None] | None = None,
    seeds: list[int] | None = None,
    train: dict | None = None,
    base: dict | None = None,
    **extra: Any,
) -> dict:
    """A spec mapping from CLI flags, laid over `base` (a spec file or preset) where given.

    Methods on the command line are `NAME`, `NAME:KEY=VALUE,KEY=VALUE` or `LABEL=NAME:KEY=VALUE`,
    e.g. `lora-r16=lora:r=16,alpha=32`.
    """
    spec = dict(base or {})
    for key, value in (
        ("models", models),
        ("tasks", tasks),
        ("fractions", fractions),
        ("time_budgets", time_budgets),
        ("seeds", seeds),
    ):
        if value:
            spec[key] = list(value)
    if methods:
        spec["methods"] = [parse_method_text(text) for text in methods]
    if train:
        spec["train"] = {**(spec.get("train") or {}), **train}
    for key, value in extra.items():
        if value is not None:
            spec[key] = value
    return spec


parse_method_flag = parse_method_text
"""`compare --methods` entries go through the one method-option parser of the command line."""


__all__ = [
    "GridSpec",
    "Cell",
    "BaselineCell",
    "MethodVariant",
    "TaskEntry",
    "StatisticsConfig",
    "parse_spec",
    "read_spec_file",
    "spec_from_flags",
    "identity_hash",
    "train_config_for",
    "parse_method_flag",
    "parse_method_text",
]
