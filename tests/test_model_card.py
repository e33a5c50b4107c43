"""Every run directory carries a model card: Hugging Face metadata, the cost, the metrics, and a command
that trains the same run again (checked by running it)."""

import shlex

import yaml

import deltatune
from conftest import save_tiny_model_dir
from deltatune.cli import main
from deltatune.model_card import model_card
from deltatune.records import BaseModelRecord, DeltaManifest, read_run_record
from deltatune.tasks.spec import TaskSpec
from test_load_many import write_toy_csv


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_trained_run_has_a_card_whose_command_trains_it_again(tmp_path, monkeypatch):
    base = save_tiny_model_dir(tmp_path / "base", "bert")
    data = write_toy_csv(tmp_path / "toy.csv", 96)
    record = deltatune.train(
        str(base),
        data=data,
        method="lora",
        method_options={"r": 4},
        out=str(tmp_path / "run"),
        max_steps=6,
        batch_size=16,
        learning_rate=1e-2,
        quiet=True,
        seed=5,
    )
    text = (tmp_path / "run" / "README.md").read_text()
    front = front_matter(text)
    assert front["library_name"] == "deltatune" and front["pipeline_tag"] == "text-classification"
    assert {"deltatune", "lora", "toy"} <= set(
        front["tags"]
    ) and "base_model" not in front  # a local base has no hub id
    results = {result["dataset"]["split"]: result for result in front["model-index"][0]["results"]}
    assert set(results) == {"dev", "test"}  # the toy data have a test split, scored once on the kept state
    assert results["dev"]["metrics"][0]["value"] == round(record.dev_metrics["accuracy"], 6)
    assert results["test"]["metrics"][0]["value"] == round(record.test_metrics["accuracy"], 6)
    assert f"{record.trainable_params:,}" in text and f"{record.delta_bytes:,} bytes" in text
    command = next(line for line in text.splitlines() if line.startswith("deltatune train"))
    assert "--method.r=4" in command and "--max-steps 6" in command and "--seed 5" in command
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(command)[1:-2] + ["--out", "again"]) == 0
    again = read_run_record(tmp_path / "again")
    assert again.dev_metrics == record.dev_metrics and again.train_config == record.train_config


def test_a_card_names_the_hub_base_and_every_split_measured():
    task = TaskSpec(
        name="stsb",
        text_fields=("sentence1", "sentence2"),
        score_range=(0, 5),
        metric="pearson",
        metrics=("pearson", "spearman"),
    )
    manifest = DeltaManifest(
        method="bitfit",
        method_config={"train_head": True},
        task=task,
        base_model=BaseModelRecord(name="minilm-l6", fingerprint="f" * 64, total_params=22713601),
        metrics={"dev": {"pearson": 0.79, "spearman": 0.78}, "test": {"pearson": 0.75}},
        delta_bytes=111524,
    )
    text = model_card(manifest)
    front = front_matter(text)
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert [r["dataset"]["split"] for r in front["model-index"][0]["results"]] == ["dev", "test"]
    assert "| test | 0.7500 | - |" in text and "111,524 bytes" in text
