"""A synthetic experiment directory, written through the real store API with no training at all.

Two tasks (3-class accuracy, and Pearson regression), three methods with known relative quality
(full = baseline, lora as good, bitfit clearly worse), three data fractions, two time budgets,
three seeds, and one no-training row per task: every table, statistic and chart of the report has
something to show, in well under a second.

Planted so that a report reading the wrong numbers fails: bitfit is as good as full on *dev* and
clearly worse on *test* (verdicts must read test); on beta at 10% of the data lora is far behind but
its dev curve was still rising (its verdict must be inconclusive, not 'worse by').
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from deltatune.compare import store

METHODS = {
    "full": ("full", 22_700_000, 90_000_000, 1.9e9),
    "lora": ("lora", 150_000, 600_000, 1.4e9),
    "bitfit": ("bitfit", 100_000, 400_000, 1.3e9),
}
QUALITY = {"full": 0.0, "lora": 0.0, "bitfit": -0.08}
"""How much worse than full each method is (accuracy, and correlation noise)."""
FRACTIONS = (0.1, 0.5, 1.0)
BUDGETS = (5.0, 20.0)
SEEDS = (0, 1, 2)
DEV_SIZE = 400
UNCONVERGED = ("beta", "lora", 0.1)
"""(task, method, fraction) whose runs stopped while dev was still rising, and far behind."""
UNTRAINED = {"alpha": "majority", "beta": "embedding-cosine"}


def _predictions(
    task: str, method: str, fraction: float, seed: int, rng_labels: np.ndarray, regression: bool, split: str = "test"
):
    rng = np.random.default_rng(zlib.crc32(f"{task}/{method}/{fraction}/{seed}/{split}".encode()))
    quality = QUALITY.get(method, 0.0) if split == "test" else 0.0
    if (task, method, fraction) == UNCONVERGED:
        quality = -0.3
    if regression:
        noise = 0.6 + 1.2 * (1 - fraction) - 6 * quality
        scores = rng_labels + rng.normal(0, noise, size=len(rng_labels))
        return scores.reshape(-1, 1).astype(np.float32)
    accuracy = 0.6 + 0.3 * fraction + quality
    correct = rng.random(len(rng_labels)) < accuracy
    wrong = (rng_labels + rng.integers(1, 3, size=len(rng_labels))) % 3
    predicted = np.where(correct, rng_labels, wrong).astype(np.int64)
    logits = rng.normal(0, 0.1, size=(len(rng_labels), 3)).astype(np.float32)
    logits[np.arange(len(rng_labels)), predicted] += 2.0
    return logits


def _metric(task_regression: bool, outputs: np.ndarray, labels: np.ndarray) -> float:
    if task_regression:
        return float(np.corrcoef(outputs[:, 0], labels)[0, 1])
    return float((outputs.argmax(1) == labels).mean())


def build_fake_experiment(exp_dir: Path) -> Path:
    exp_dir.mkdir(parents=True, exist_ok=True)
    label_rng = np.random.default_rng(123)
    tasks = {
        "alpha": (False, label_rng.integers(0, 3, size=DEV_SIZE).astype(np.float32), "accuracy"),
        "beta": (True, label_rng.uniform(0, 5, size=DEV_SIZE).astype(np.float32), "pearson"),
    }
    connection = store.connect(exp_dir)
    count = 0
    for task, (regression, labels, metric) in tasks.items():
        conditions = [(f, None) for f in FRACTIONS] + [(1.0, b) for b in BUDGETS]
        for fraction, budget in conditions:
            for seed in SEEDS:
                for variant, (method, trainable, delta_bytes, peak) in METHODS.items():
                    cell_id = f"{task}-{variant}-{fraction:g}-{budget or 0:g}-{seed}"
                    amount = fraction if budget is None else min(1.0, budget / 20)
                    outputs = _predictions(task, variant, amount, seed, labels, regression)
                    dev_outputs = _predictions(task, variant, amount, seed, labels, regression, "dev")
                    value = _metric(regression, outputs, labels)
                    dev_value = _metric(regression, dev_outputs, labels)
                    rising = budget is None and (task, variant, fraction) == UNCONVERGED
                    # each method searches its own learning rates, as the presets' methods do: still one comparison
                    train = {
                        "epochs": 3.0 if budget is None else 50.0,
                        "batch_size": 32,
                        "lr_search": {"full": [5e-5, 1e-4], "lora": [2e-3, 5e-3], "bitfit": [3e-3, 1e-2]}[variant],
                    }
                    payload = {
                        "cell_id": cell_id,
                        "grid": "data" if budget is None else "time",
                        "model": "fake-model",
                        "task": task,
                        "method": method,
                        "variant": variant,
                        "method_config": {},
                        "data_fraction": fraction,
                        "time_budget_s": budget,
                        "seed": seed,
                        "train": train,
                        "max_train_examples": None,
                    }
                    speed = {"full": 1.0, "lora": 1.6, "bitfit": 2.0}[variant]
                    seconds = (budget or 30 * fraction) / 1.0
                    curve = []
                    for point in range(1, 6):
                        # a converged run levels off at its value by 60% of its steps; the planted one still rises
                        share = point / 5 if rising else min(1.0, point / 3)
                        curve.append(
                            {
                                "step": point * 10,
                                "examples_seen": point * 320,
                                "train_time_s": round(seconds * point / 5, 3),
                                "metrics": {metric: dev_value * (1 - 0.5 * (1 - share) ** (2 * speed))},
                            }
                        )
                    search = {
                        "candidates": [
                            {
                                "learning_rate": rate,
                                "rung_scores": [dev_value - 0.1 * i],
                                "best_dev": dev_value - 0.1 * i if not i else None,
                                "best_step": 10,
                                "steps": 50 if not i else 6,
                                "train_time_s": 1.0,
                                "stopped_at_rung": None if not i else 0,
                                "stopped_by": "epochs",
                            }
                            for i, rate in enumerate((1e-3, 1e-2))
                        ],
                        "rungs": [0.125],
                        "metric": metric,
                        "chosen": 1e-3,
                        "split": "dev",
                        "planned_cost_runs": 1.125,
                        "train_time_s": 2.0,
                        "steps": 56,
                    }
                    record = {
                        "primary_metric": metric,
                        "dev_metrics": {metric: dev_value},
                        "test_metrics": {metric: value},
                        "evaluation_split": "test",
                        "learning_rate": 1e-3,
                        "lr_search": search,
                        "converged": not rising,
                        "learning_curve": curve,
                        "trainable_params": trainable,
                        "total_params": 22_700_000,
                        "trainable_percent": 100 * trainable / 22_700_000,
                        "delta_bytes": delta_bytes,
                        "full_model_bytes": 90_000_000,
                        "peak_memory_bytes": int(peak + 1e7 * seed),
                        "train_time_s": seconds,
                        "eval_time_s": 2.0,
                        "wall_time_s": seconds + 5,
                        "train_examples_per_s": 80.0 * speed,
                        "num_train_examples": int(5000 * fraction),
                        "steps": 50,
                        "best_step": 50,
                        "stopped_by": "epochs" if budget is None else "time_budget",
                        "examples_seen": 1600,
                        "versions": {"transformers": "5.0", "deltatune": "0.1.0"},
                        "git": {"commit": "0123456789abcdef", "dirty": False},
                    }
                    run_dir = exp_dir / "cells" / cell_id
                    run_dir.mkdir(parents=True, exist_ok=True)
                    save_file({"outputs": dev_outputs, "labels": labels}, str(run_dir / "dev_outputs.safetensors"))
                    save_file({"outputs": outputs, "labels": labels}, str(run_dir / "test_outputs.safetensors"))
                    (run_dir / "run.json").write_text(json.dumps(record))
                    store.record_finished(connection, payload, record, f"cells/{cell_id}", seconds + 8)
                    count += 1
    for task, (regression, labels, metric) in tasks.items():
        _record_untrained(connection, exp_dir, task, UNTRAINED[task], regression, labels, metric)
        count += 1
    failed_payload = {
        "cell_id": "alpha-broken",
        "grid": "data",
        "model": "fake-model",
        "task": "alpha",
        "method": "lora",
        "variant": "lora",
        "method_config": {},
        "data_fraction": 0.1,
        "time_budget_s": None,
        "seed": 9,
        "train": {"epochs": 3.0, "batch_size": 32},
    }
    store.record_failed(
        connection, failed_payload, "The cell process was killed by SIGKILL (often the out-of-memory killer).", 3.0
    )
    store.set_meta(
        connection,
        title="Synthetic comparison",
        description="Made up numbers with a known answer.",
        baseline="full",
        statistics={
            "bootstrap_samples": 300,
            "confidence": 0.95,
            "margin_points": 1.0,
            "target_fraction": 0.95,
            "seed": 0,
        },
        methods=list(METHODS),
        baselines=sorted(set(UNTRAINED.values())),
        total_cells=count + 1,
        command="deltatune compare fake.yaml --out fake",
        machine={
            "cpu": "test cpu",
            "cpu_count": 2,
            "memory_bytes": 8e9,
            "platform": "test",
            "python": "3",
            "torch": "2",
            "jobs": 1,
            "threads_per_cell": 2,
        },
    )
    connection.close()
    return exp_dir


def _record_untrained(
    connection, exp_dir: Path, task: str, name: str, regression: bool, labels: np.ndarray, metric: str
) -> None:
    """A no-training row: a constant class for alpha; for beta scores as good as full at 10% of the data."""
    if regression:
        rng = np.random.default_rng(7)
        outputs = (labels + rng.normal(0, 1.8, size=len(labels))).reshape(-1, 1).astype(np.float32)
    else:
        outputs = np.zeros((len(labels), 3), dtype=np.float32)
        outputs[:, 0] = 1.0
    value = _metric(regression, outputs, labels)
    cell_id = f"{task}-{name}"
    payload = {
        "cell_id": cell_id,
        "kind": "baseline",
        "grid": "baselines",
        "model": "fake-model",
        "task": task,
        "method": name,
        "variant": name,
        "method_config": {},
        "data_fraction": 1.0,
        "time_budget_s": None,
        "seed": 0,
        "train": {"max_length": 128},
        "max_train_examples": None,
    }
    record = {
        "kind": "baseline",
        "primary_metric": metric,
        "dev_metrics": {metric: value},
        "test_metrics": {metric: value},
        "evaluation_split": "test",
        "learning_curve": [],
        "trainable_params": 0,
        "total_params": None,
        "delta_bytes": None,
        "peak_memory_bytes": int(1e9),
        "train_time_s": 0.0,
        "eval_time_s": 1.0,
        "steps": 0,
        "best_step": 0,
        "stopped_by": None,
        "converged": None,
        "learning_rate": None,
        "versions": {"transformers": "5.0", "deltatune": "0.1.0"},
        "git": {"commit": "0123456789abcdef", "dirty": False},
    }
    run_dir = exp_dir / "cells" / cell_id
    run_dir.mkdir(parents=True, exist_ok=True)
    for split in ("dev", "test"):
        save_file({"outputs": outputs, "labels": labels}, str(run_dir / f"{split}_outputs.safetensors"))
    store.record_finished(connection, payload, record, f"cells/{cell_id}", 2.0)


EXPECTED_PLOTS = {
    "fraction:alpha",
    "time:alpha",
    "params:alpha",
    "budget:alpha",
    "fraction:beta",
    "time:beta",
    "params:beta",
    "budget:beta",
    "memory",
    "delta",
}
