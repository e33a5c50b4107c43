"""Ready-made grids. `doering2024`: BitFit and adapters against full fine-tuning across data amounts and time budgets.

Doering et al. 2024 (*Empirical Analysis of Efficient Fine-Tuning Methods for Large Pre-Trained
Language Models*, arXiv:2401.04051) compare BitFit and adapters with full fine-tuning on MRPC,
CoLA and STS-B across data fractions and time budgets. Here, on what can be had offline:
MiniLM-L6 as the model; STS-B itself (Pearson), rotten-tomatoes (accuracy, for SST-2-style
sentiment), sms-spam (MCC, standing in for CoLA's MCC on an imbalanced binary task) and an SNLI
subset (accuracy, for sentence-pair inference); methods full, bitfit, houlsby and pfeiffer
adapters, lora; data fractions 0.1 0.3 0.6 1.0; 3 seeds; and a time-budget sweep at the whole
training set.

Sizes (estimates from `estimate_seconds`, at 200 training examples/s: MiniLM-L6 in bf16 on a 2-core CPU):
    demo   stsb only, full/bitfit/lora, a 2,000-example pool, 1 seed, 3 epochs       ~ 5 min
    small  all four tasks and five methods, 2,000-example pools, 3 seeds, 2 epochs,
           time budgets 20 and 60 s                                                  ~ 3.5 h
    full   whole training sets (SNLI: a 5,000-pair pool), 3 seeds, 3 epochs,
           time budgets 60, 180 and 600 s                                            ~ 13 h
"""

from __future__ import annotations

import copy

from deltatune.errors import DeltatuneError, did_you_mean

_DOERING_METHODS = ["full", "bitfit", "houlsby", "pfeiffer", "lora"]
_DOERING_DESCRIPTION = (
    "Doering et al. 2024 (arXiv:2401.04051) on offline data: is BitFit (and are adapters) as good as full "
    "fine-tuning across data amounts and time budgets? MiniLM-L6; STS-B, rotten-tomatoes (for SST-2), "
    "sms-spam (MCC, for CoLA) and an SNLI subset.")

PRESETS: dict[str, dict[str, dict]] = {
    "doering2024": {
        "full": {
            "title": "BitFit and adapters against full fine-tuning (Doering et al. 2024), full size",
            "description": _DOERING_DESCRIPTION,
            "models": ["minilm-l6"],
            "tasks": ["stsb", "rotten-tomatoes", "sms-spam", {"task": "snli", "max_train_examples": 5000}],
            "methods": _DOERING_METHODS,
            "seeds": [0, 1, 2],
            "train": {"epochs": 3, "batch_size": 32, "eval_every": 60},
            "baseline": "full",
            "grids": [
                {"name": "data", "fractions": [0.1, 0.3, 0.6, 1.0], "time_budgets": [None]},
                {"name": "time", "fractions": [1.0], "time_budgets": [30, 90, 270],
                 "train": {"epochs": 50, "eval_every": 60}},
            ],
        },
        "small": {
            "title": "BitFit and adapters against full fine-tuning (Doering et al. 2024), small size",
            "description": _DOERING_DESCRIPTION + " Every task's training pool is capped at 2,000 examples.",
            "models": ["minilm-l6"],
            "tasks": ["stsb", "rotten-tomatoes", "sms-spam", "snli"],
            "max_train_examples": 2000,
            "methods": _DOERING_METHODS,
            "seeds": [0, 1, 2],
            "train": {"epochs": 2, "batch_size": 32, "eval_every": 40},
            "baseline": "full",
            "grids": [
                {"name": "data", "fractions": [0.1, 0.3, 0.6, 1.0], "time_budgets": [None]},
                {"name": "time", "fractions": [1.0], "time_budgets": [20, 60], "train": {"epochs": 50}},
            ],
        },
        "demo": {
            "title": "BitFit and LoRA against full fine-tuning on STS-B (Doering et al. 2024, demo size)",
            "description": ("A few-minute slice of Doering et al. 2024 (arXiv:2401.04051): MiniLM-L6 on STS-B, "
                            "a 2,000-example training pool, one seed, three epochs. Too small for conclusions; "
                            "run --size small or full for those."),
            "models": ["minilm-l6"],
            "tasks": ["stsb"],
            "max_train_examples": 2000,
            "methods": ["full", "bitfit", "lora"],
            "fractions": [0.25, 0.5, 1.0],
            "time_budgets": [None],
            "seeds": [0],
            "train": {"epochs": 3, "batch_size": 16, "eval_every": 60},
            "baseline": "full",
        },
    },
}

APPROXIMATE_TRAIN_SIZES = {"stsb": 5749, "rotten-tomatoes": 10246, "sms-spam": 3869, "snli": 94896, "trec": 4907,
                           "movie-scores": 8484, "disaster-tweets": 6090}
"""Training-split sizes of the offline suite (for time estimates only; the cells use the real data)."""

APPROXIMATE_DEV_SIZES = {"stsb": 1500, "rotten-tomatoes": 1281, "sms-spam": 484, "snli": 4994, "trec": 545,
                         "movie-scores": 1060, "disaster-tweets": 761}


def preset_spec(name: str, size: str = "full") -> dict:
    """The spec mapping of a preset at a size (a copy: callers may change it)."""
    if name not in PRESETS:
        raise DeltatuneError(f"Unknown preset {name!r}. {did_you_mean(name, PRESETS)}")
    sizes = PRESETS[name]
    if size not in sizes:
        raise DeltatuneError(f"Preset {name!r} has no size {size!r}. {did_you_mean(size, sizes)}")
    return copy.deepcopy(sizes[size])


def estimate_cell_seconds(cell, train_examples_per_s: float = 200.0, eval_examples_per_s: float = 1000.0,
                          startup_s: float = 8.0) -> float:
    """A rough wall-clock estimate of one cell (a task of unknown size counts as 1,000 training examples).

    The runner scales these by how long finished cells really took, for its ETA.
    """
    train_size = APPROXIMATE_TRAIN_SIZES.get(cell.task.name, 1000)
    dev_size = APPROXIMATE_DEV_SIZES.get(cell.task.name, 200)
    pool = min(train_size, cell.task.max_train_examples or train_size)
    examples = cell.data_fraction * pool * (cell.train.get("epochs") or 3.0)
    if cell.train.get("max_steps"):
        examples = cell.train["max_steps"] * cell.train.get("batch_size", 32)
    seconds = examples / train_examples_per_s
    if cell.time_budget_s is not None:
        seconds = min(seconds, cell.time_budget_s)
    steps = seconds * train_examples_per_s / cell.train.get("batch_size", 32)
    evaluations = 1 + steps // (cell.train.get("eval_every") or max(1, pool * cell.data_fraction / 32))
    return seconds + evaluations * dev_size / eval_examples_per_s + startup_s


def estimate_seconds(spec, train_examples_per_s: float = 200.0) -> float | None:
    """A rough wall-clock estimate of a parsed GridSpec run one cell at a time; None if a task's size is unknown."""
    if any(cell.task.name not in APPROXIMATE_TRAIN_SIZES for cell in spec.cells):
        return None
    return sum(estimate_cell_seconds(cell, train_examples_per_s) for cell in spec.cells)


__all__ = ["PRESETS", "preset_spec", "estimate_seconds", "estimate_cell_seconds"]
