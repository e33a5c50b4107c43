"""Ready-made grids. `doering2024`: BitFit and adapters against full fine-tuning across data amounts and time budgets.

Doering et al. 2024 (*Empirical Analysis of Efficient Fine-Tuning Methods for Large Pre-Trained
Language Models*, arXiv:2401.04051) compare BitFit and adapters with full fine-tuning on MRPC,
CoLA and STS-B across data fractions and time budgets. Here, on what can be had offline:
MiniLM-L6 as the model; STS-B itself (Pearson), rotten-tomatoes (accuracy, for SST-2-style
sentiment), sms-spam (MCC, standing in for CoLA's MCC on an imbalanced binary task) and an SNLI
subset (accuracy, for sentence-pair inference); methods full, bitfit, houlsby and pfeiffer
adapters, lora; data fractions 0.1 0.3 0.6 1.0; 3 seeds; and a time-budget sweep at the whole
training set.

Every size chooses each method's learning rate on dev (successive halving over its candidates), trains
at least `min_steps` and stops early on dev, judges on the test split, and adds no-training rows
(majority; embedding-cosine for STS-B). Sizes, with `estimate_seconds` (one cell at a time on a 2-core
CPU with native bf16, MiniLM-L6 in bf16; an upper bound, since early stopping usually ends cells sooner;
measured: the demo took 8 min 56 s on a Xeon with AMX and 9 min 44 s on an AMD Zen 4):
    demo   stsb only, full/bitfit/lora, a 2,000-example pool at 25% and 100%, 1 seed, 2 learning rates per
           method (about 10 minutes)
    small  all four tasks, full/bitfit/lora, 1,000-example pools at 25% and 100%, 3 seeds, the demo's
           learning rates; STS-B with the demo's budget, the classification tasks with at least 250 steps
           (`_LONGER_TRAIN`: the demo's 80-96 steps left their runs still learning); estimated at most
           2 h 27 min, its cells took 2 h 13 min on the AMD Zen 4 (docs/results/doering2024-small/)
    full   whole training sets (SNLI: a 5,000-pair pool), all five methods, 4 data fractions, 3 seeds, 4
           learning rates per method, and time budgets of 30, 90 and 270 s (a day or more)
`deltatune compare --preset doering2024 --size S --dry-run` prints the cells and the estimate.
"""

from __future__ import annotations

import copy

from deltatune.errors import DeltatuneError, did_you_mean

_DOERING_METHODS = ["full", "bitfit", "houlsby", "pfeiffer", "lora"]
_DOERING_DESCRIPTION = (
    "Doering et al. 2024 (arXiv:2401.04051) on offline data: is BitFit (and are adapters) as good as full "
    "fine-tuning across data amounts and time budgets? MiniLM-L6; STS-B, rotten-tomatoes (for SST-2), "
    "sms-spam (MCC, for CoLA) and an SNLI subset."
)

_TWO_RATES = [
    {"name": "full", "method": "full", "train": {"lr_search": [5e-5, 1e-4]}},
    {"name": "bitfit", "method": "bitfit", "train": {"lr_search": [3e-3, 1e-2]}},
    {"name": "lora", "method": "lora", "train": {"lr_search": [2e-3, 5e-3]}},
]
"""The demo and small sizes: two candidates each, from the upper middle of the method's own range
(`learning_rate_candidates`), where a run of a few hundred steps does best."""
_SHORT_TRAIN = {
    "batch_size": 32,
    "epochs": 3,
    "min_steps": 80,
    "eval_every": 20,
    "early_stopping_patience": 2,
    "lr_search_rungs": [0.25],
}
"""The demo and small sizes: at least 80 steps, at most 3 epochs, dev every 20 steps, stopping after 2
evaluations without improvement; the search halves its two candidates at a quarter of the plan. The small
size's evaluations read a fixed 500-example part of dev (`eval_examples`; the kept state is then scored on the
whole of dev and on test): about a third of the evaluation cost on STS-B, a tenth on SNLI."""

_LONGER_TRAIN = {"epochs": 8, "min_steps": 250, "eval_every": 25, "early_stopping_patience": 3}
"""The small size's classification tasks: at least 250 steps, at most 8 epochs, dev every 25 steps, stopping after
3 evaluations without improvement. Under `_SHORT_TRAIN`'s 80-96 steps 11 of their 12 comparisons had a run still
learning at its end; with this budget full fine-tuning and LoRA converged on all three (measured:
docs/results/doering2024-small/longer/)."""

PRESETS: dict[str, dict[str, dict]] = {
    "doering2024": {
        "full": {
            "title": "BitFit and adapters against full fine-tuning (Doering et al. 2024), full size",
            "description": _DOERING_DESCRIPTION,
            "models": ["minilm-l6"],
            "tasks": ["stsb", "rotten-tomatoes", "sms-spam", {"task": "snli", "max_train_examples": 5000}],
            "methods": _DOERING_METHODS,
            "seeds": [0, 1, 2],
            "train": {"batch_size": 32, "epochs": 10, "min_steps": 300, "eval_every": 60, "early_stopping_patience": 4},
            "lr_search": "auto",
            "baselines": ["majority", "embedding-cosine"],
            "baseline": "full",
            "grids": [
                {"name": "data", "fractions": [0.1, 0.3, 0.6, 1.0], "time_budgets": [None]},
                {
                    "name": "time",
                    "fractions": [1.0],
                    "time_budgets": [30, 90, 270],
                    "train": {"epochs": 50, "early_stopping_patience": None},
                },
            ],
        },
        "small": {
            "title": "BitFit and LoRA against full fine-tuning (Doering et al. 2024), small size",
            "description": _DOERING_DESCRIPTION
            + " Full fine-tuning, BitFit and LoRA; every task's training pool is capped at 1,000 examples;"
            " 3 seeds.",
            "models": ["minilm-l6"],
            "tasks": [
                "stsb",
                {"task": "rotten-tomatoes", "train": _LONGER_TRAIN},
                {"task": "sms-spam", "train": _LONGER_TRAIN},
                {"task": "snli", "train": _LONGER_TRAIN},
            ],
            "max_train_examples": 1000,
            "methods": _TWO_RATES,
            "fractions": [0.25, 1.0],
            "time_budgets": [None],
            "seeds": [0, 1, 2],
            "train": {**_SHORT_TRAIN, "eval_examples": 500},
            "baselines": ["majority", "embedding-cosine"],
            "baseline": "full",
        },
        "demo": {
            "title": "BitFit and LoRA against full fine-tuning on STS-B (Doering et al. 2024, demo size)",
            "description": (
                "A few-minute slice of Doering et al. 2024 (arXiv:2401.04051): MiniLM-L6 on STS-B, "
                "a 2,000-example training pool, one seed; each method's learning rate chosen on dev "
                "from two candidates, training until dev stops improving, verdicts on the official "
                "test split. Too small for conclusions; run --size small or full for those."
            ),
            "models": ["minilm-l6"],
            "tasks": ["stsb"],
            "max_train_examples": 2000,
            "methods": _TWO_RATES,
            "fractions": [0.25, 1.0],
            "time_budgets": [None],
            "seeds": [0],
            "train": _SHORT_TRAIN,
            "baselines": ["embedding-cosine"],
            "baseline": "full",
        },
    },
}

APPROXIMATE_TRAIN_SIZES = {
    "stsb": 5749,
    "rotten-tomatoes": 10246,
    "sms-spam": 3869,
    "snli": 94896,
    "trec": 4907,
    "movie-scores": 8484,
    "disaster-tweets": 6090,
}
"""Training-split sizes of the offline suite (for time estimates only; the cells use the real data)."""

APPROXIMATE_DEV_SIZES = {
    "stsb": 1500,
    "rotten-tomatoes": 1281,
    "sms-spam": 484,
    "snli": 4994,
    "trec": 545,
    "movie-scores": 1060,
    "disaster-tweets": 761,
}
APPROXIMATE_TEST_SIZES = {
    "stsb": 1379,
    "rotten-tomatoes": 1281,
    "sms-spam": 484,
    "snli": 9824,
    "trec": 500,
    "movie-scores": 1061,
    "disaster-tweets": 762,
}

TRAIN_EXAMPLES_PER_S = {"full": 75.0, "freeze": 140.0, "sparse-mask": 60.0, "houlsby": 120.0}
"""MiniLM-L6 training speed in bf16 on a 2-core CPU with AMX, in STS-B pairs per second through the bi-encoder
head (two texts of ~14 tokens each: the slower case; a single text of the same length trains faster), as
measured by the demo preset's cells; a method not listed trains at DEFAULT_EXAMPLES_PER_S. A 2-core AMD Zen 4
(AVX512-BF16, no AMX) ran the demo within 10% of that time (9 min 44 s against 8 min 56 s)."""
DEFAULT_EXAMPLES_PER_S = 125.0
EVAL_EXAMPLES_PER_S = 500.0
STARTUP_S = 15.0
"""A cell process: start Python, import torch and transformers, load the model, tokenise the data."""
BASELINE_SECONDS = {"majority": 2.0, "embedding-cosine": 12.0, "zero-shot": 120.0, "few-shot": 240.0}
"""Work of a no-training row beyond startup (embedding-cosine: fp32 encoding of STS-B's dev and test; the
prompting rows: SmolLM2-135M scoring a few thousand examples)."""


def preset_spec(name: str, size: str = "full") -> dict:
    """The spec mapping of a preset at a size (a copy: callers may change it)."""
    if name not in PRESETS:
        raise DeltatuneError(f"Unknown preset {name!r}. {did_you_mean(name, PRESETS)}")
    sizes = PRESETS[name]
    if size not in sizes:
        raise DeltatuneError(f"Preset {name!r} has no size {size!r}. {did_you_mean(size, sizes)}")
    return copy.deepcopy(sizes[size])


def estimate_cell_seconds(cell, speed_scale: float = 1.0) -> float:
    """A wall-clock estimate of one cell, with no early stopping (so usually more than it takes).

    A task of unknown size counts as 1,000 training examples. `speed_scale` multiplies every speed (e.g. 0.5 for
    a CPU without native bf16, which trains in fp32). The runner scales these by how long finished cells really took, for its ETA.
    """
    from deltatune.compare.spec import BaselineCell

    if isinstance(cell, BaselineCell):
        return STARTUP_S + BASELINE_SECONDS.get(cell.baseline, 10.0) / speed_scale
    from deltatune.search import search_cost
    from deltatune.training import plan_steps

    config = _train_config(cell)
    train_size = APPROXIMATE_TRAIN_SIZES.get(cell.task.name, 1000)
    pool = min(train_size, cell.task.max_train_examples or train_size)
    examples = max(1, round(cell.data_fraction * pool))
    plan = plan_steps(examples, config)
    speed = TRAIN_EXAMPLES_PER_S.get(cell.method.method, DEFAULT_EXAMPLES_PER_S) * speed_scale
    seconds = plan.planned_steps * config.batch_size / speed
    if cell.time_budget_s is not None:
        seconds = min(seconds, cell.time_budget_s)
    runs = search_cost(_candidate_count(cell, config), config.lr_search_rungs) if config.lr_search else 1.0
    evaluations = runs * (seconds * speed / config.batch_size) / plan.eval_every + 2 * len(config.lr_search_rungs) + 1
    dev, test = APPROXIMATE_DEV_SIZES.get(cell.task.name, 200), APPROXIMATE_TEST_SIZES.get(cell.task.name, 200)
    # evaluations read `eval_examples` of dev; the kept state is then scored on the whole of dev once more
    evaluated = min(dev, config.eval_examples or dev)
    scored = evaluations * evaluated + (dev if evaluated < dev else 0) + test
    return runs * seconds + scored / (EVAL_EXAMPLES_PER_S * speed_scale) + STARTUP_S


def _train_config(cell):
    from deltatune.compare.spec import train_config_for

    return train_config_for(cell.payload())


def _candidate_count(cell, config) -> int:
    from deltatune.search import FALLBACK_FACTORS

    if config.lr_search == "auto":
        from deltatune.methods import get_method_entry

        declared = getattr(get_method_entry(cell.method.method).method_class, "learning_rate_candidates", ())
        return len(declared) or len(FALLBACK_FACTORS)
    return len(set(config.lr_search))


def estimate_seconds(spec, speed_scale: float = 1.0) -> float | None:
    """A wall-clock estimate of a parsed GridSpec run one cell at a time; None if a task's size is unknown."""
    if any(cell.task.name not in APPROXIMATE_TRAIN_SIZES for cell in spec.every_cell):
        return None
    return sum(estimate_cell_seconds(cell, speed_scale) for cell in spec.every_cell)


__all__ = ["PRESETS", "preset_spec", "estimate_seconds", "estimate_cell_seconds"]
