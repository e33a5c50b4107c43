"""The command line end to end on a tiny local model and a CSV it makes: train, eval, predict, errors."""

import csv
import json

import pytest

from conftest import make_sentiment_rows, save_tiny_model_dir
from deltatune.cli import main


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def setup(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny-bert", "bert")
    data = write_csv(tmp_path / "reviews.csv", make_sentiment_rows(200))
    return tmp_path, model_dir, data


def train_args(model_dir, data, out, *extra):
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--text-fields",
        "text",
        "--method",
        "bitfit",
        "--out",
        str(out),
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--quiet",
        *extra,
    ]


def test_train_eval_predict_round_trip(setup, capsys):
    tmp_path, model_dir, data = setup
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, "--learning-rate", "0.01", "--method.train_head", "true")) == 0
    printed = capsys.readouterr().out
    assert "bitfit on reviews" in printed and "saved to" in printed
    record = json.loads((out / "run.json").read_text())
    manifest = json.loads((out / "deltatune.json").read_text())
    for key in (
        "train_config",
        "versions",
        "git",
        "model_fingerprint",
        "data_fingerprint",
        "trainable_params",
        "total_params",
        "delta_bytes",
        "wall_time_s",
        "peak_memory_bytes",
        "train_examples_per_s",
        "train_real_tokens_per_s",
        "learning_curve",
    ):
        assert key in record, key
    assert record["delta_bytes"] == (out / "delta.safetensors").stat().st_size < record["full_model_bytes"] / 5
    assert manifest["task"]["labels"] == ["negative", "positive"]
    from safetensors.torch import load_file

    saved = load_file(str(out / "dev_outputs.safetensors"))
    accuracy = (saved["outputs"].argmax(-1) == saved["labels"].long()).float().mean().item()
    assert accuracy == pytest.approx(record["dev_metrics"]["accuracy"])

    assert main(["eval", str(out), "--split", "dev", "--json"]) == 0
    dev = json.loads(capsys.readouterr().out)
    assert dev["accuracy"] == pytest.approx(record["dev_metrics"]["accuracy"])
    assert main(["eval", str(out), "--split", "test"]) == 0
    assert "reviews test: accuracy" in capsys.readouterr().out

    assert main(["predict", str(out), "the movie was really good", "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)
    assert set(prediction["probabilities"]) == {"negative", "positive"}


def test_an_existing_run_is_not_overwritten(setup, capsys):
    tmp_path, model_dir, data = setup
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, "--max-steps", "2")) == 0
    before = (out / "delta.safetensors").read_bytes()
    assert main(train_args(model_dir, data, out, "--max-steps", "2")) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "delta.safetensors").read_bytes() == before


def test_argument_problems_are_reported_together_before_anything_runs(setup, capsys):
    tmp_path, model_dir, data = setup
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--task",
            "stbs",
            "--method",
            "lroa",
            "--epochs",
            "-1",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert "Unknown method 'lroa'" in error and "Unknown task 'stbs'" in error and "epochs=-1.0" in error
    assert not (tmp_path / "x").exists()


def test_unknown_method_option_names_the_key(setup, capsys):
    tmp_path, model_dir, data = setup
    assert main(train_args(model_dir, data, tmp_path / "x", "--method.train_haed=false")) == 2
    assert "method.train_haed" in capsys.readouterr().err


def test_a_delta_refuses_another_base(setup, capsys):
    tmp_path, model_dir, data = setup
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, "--max-steps", "2")) == 0
    other = save_tiny_model_dir(tmp_path / "other-bert", "bert", seed=7)
    assert main(["eval", str(out), "--base", str(other)]) == 2
    error = capsys.readouterr().err
    assert "trained on base model" in error and str(model_dir) in error


@pytest.mark.parametrize("damage", ["missing_tensors", "corrupt_tensors", "corrupt_manifest", "not_a_run"])
def test_damaged_deltas_get_one_clear_error(setup, capsys, damage):
    tmp_path, model_dir, data = setup
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, "--max-steps", "2")) == 0
    if damage == "missing_tensors":
        (out / "delta.safetensors").unlink()
    elif damage == "corrupt_tensors":
        (out / "delta.safetensors").write_bytes(b"\x00garbage")
    elif damage == "corrupt_manifest":
        (out / "deltatune.json").write_text("{not json")
    else:
        out = tmp_path
    assert main(["predict", str(out), "good"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("deltatune: error:") and "Traceback" not in error
    expected = {
        "missing_tensors": "has no delta.safetensors",
        "corrupt_tensors": "is corrupt",
        "corrupt_manifest": "is corrupt",
        "not_a_run": "has no deltatune.json",
    }[damage]
    assert expected in error


def test_listing_commands(capsys):
    assert main(["methods"]) == 0
    assert "bitfit" in capsys.readouterr().out
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert "stsb" in listing and "sms-spam" in listing and "pearson" in listing
    assert main(["models"]) == 0
    assert "minilm-l6" in capsys.readouterr().out


def test_unknown_model_alias_lists_the_aliases(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_csv(tmp_path / "d.csv", make_sentiment_rows(40))
    assert main(["train", "--model", "minilm-l7", "--data", str(data), "--text-fields", "text", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "minilm-l7" in error and "minilm-l6" in error
