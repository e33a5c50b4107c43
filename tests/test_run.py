"""A whole run from names to a record, on a tiny local model and a CSV made here."""

import csv

import pytest

from conftest import make_sentiment_rows, save_tiny_model_dir
from deltatune.run import data_record, run_training
from deltatune.training import TrainConfig


@pytest.fixture
def local(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny-bert", "bert")
    path = tmp_path / "toy.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_sentiment_rows(160))
    return str(model_dir), data_record("toy", local={"path": str(path), "text_fields": ["text"]})


def test_same_seed_same_machine_gives_identical_dev_metrics(local):
    model, data = local
    config = TrainConfig(epochs=3, batch_size=16, eval_every=4, learning_rate=3e-3, quiet=True, seed=11)
    first = run_training(model, data, "full", {}, config)
    second = run_training(model, data, "full", {}, config)
    assert [c["metrics"] for c in first.learning_curve] == [c["metrics"] for c in second.learning_curve]
    assert first.dev_metrics == second.dev_metrics
    other = run_training(
        model,
        data,
        "full",
        {},
        TrainConfig(epochs=3, batch_size=16, eval_every=4, quiet=True, learning_rate=3e-3, seed=12),
    )
    assert [c["metrics"] for c in other.learning_curve] != [c["metrics"] for c in first.learning_curve]


def test_methods_can_add_facts_to_the_run_record(local):
    model, data = local
    record = run_training(
        model, data, "sparse-mask", {"sparsity": "0.05"}, TrainConfig(max_steps=12, batch_size=16, quiet=True)
    )
    report = record.method_report
    assert report["target_sparsity"] == 0.05 and 0 < report["achieved_sparsity"] <= 0.05 + 1e-6
    assert run_training(model, data, "bitfit", {}, TrainConfig(max_steps=1, quiet=True)).method_report == {}


def test_a_sparse_mask_is_kept_and_stopped_only_after_its_ramp(local):
    model, data = local
    # the ramp ends at half the 20 steps; dev is checked after every step and stopping is as impatient as it gets
    config = TrainConfig(max_steps=20, batch_size=16, eval_every=1, early_stopping_patience=1, quiet=True)
    record = run_training(model, data, "sparse-mask", {"sparsity": "0.05"}, config)
    assert record.best_step >= 10 and record.steps >= 11
    assert record.method_report["achieved_sparsity"] == pytest.approx(0.05, abs=1e-3)
