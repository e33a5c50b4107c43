"""A comparison grid's data model: its settings, method variants and cells, and each cell's identity.

Built by `deltatune.compare.spec` from a spec (YAML or flags) after `deltatune.compare.spec_checks` has
validated it; read by the runner, the Ray backend, the store and the report.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from deltatune.errors import DeltatuneError

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
    "eval_examples": None,
    "regression_loss": "mse",
    "dropout": None,
    "lr_search_extend": 0,
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
    "train",
)
CATALOG_TASK_KEYS = ("task", "source", "max_train_examples", "train")
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
    train: dict = field(default_factory=dict)
    """Training settings for this task's cells only, over the grid's (e.g. a longer budget for a harder task);
    a method variant's own settings go over these."""


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


def _short_model(model: str) -> str:
    return Path(model).name if "/" in model and Path(model).is_absolute() else model
