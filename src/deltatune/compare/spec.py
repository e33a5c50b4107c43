"""The grid spec: what to compare, validated in full before anything runs, and expanded into cells.

A spec is a YAML file (or the same mapping built from CLI flags). Its axes are models, tasks,
methods (each with optional config variants under its own name), data fractions, time budgets
and seeds; `train` holds the training settings every cell shares (any `TrainConfig` field except
the three that are axes). A task entry may carry its own `train` overrides (e.g. a longer budget for a
harder task) and a method entry its own (e.g. a learning rate); a cell's settings are the grid's, then its
sub-grid's, then its task's, then its method's. `grids` optionally lists several sub-grids, each overriding
some axes; the union of their cells runs, each distinct cell once.

    title: BitFit and LoRA against full fine-tuning
    models: [minilm-l6]
    tasks:
      - stsb
      - {task: snli, max_train_examples: 5000, train: {min_steps: 500}}
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

This module reads a spec and expands it into cells; the grid's data model (settings, variants, cells, their
identity) lives in `deltatune.compare.grid` and the checks of each part in `deltatune.compare.spec_checks`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.cli_options import parse_method_text
from deltatune.compare.grid import (  # noqa: F401  re-exported: the spec's data model
    AXES,
    AXIS_TRAIN_FIELDS,
    CATALOG_TASK_KEYS,
    EXECUTION_ONLY_FIELDS,
    GRID_KEYS,
    IDENTITY_VERSION,
    LATER_FIELD_DEFAULTS,
    LOCAL_TASK_KEYS,
    LOGGING_FIELDS,
    METHOD_KEYS,
    TOP_LEVEL_KEYS,
    BaselineCell,
    Cell,
    GridSpec,
    MethodVariant,
    StatisticsConfig,
    TaskEntry,
    _short_model,
    cell_identity,
    identity_hash,
)
from deltatune.compare.spec_checks import (
    _baseline_cells,
    _check_axes,
    _check_baseline_method,
    _check_baselines,
    _check_cap,
)
from deltatune.config import build_config
from deltatune.errors import DeltatuneError, did_you_mean
from deltatune.training import TrainConfig

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
        train = trains[task.name, variant.name]
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
