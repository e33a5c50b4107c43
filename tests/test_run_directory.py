"""Writing a run without losing anything: replacing a run, divergence, strict JSON, the lock, leftovers."""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import save_tiny_model_dir, write_sentiment_csv
from deltatune.delta import json_text, write_json_atomic
from deltatune.errors import DeltatuneError
from deltatune.run import RUN_FILES, data_record, run_training
from deltatune.run_directory import TargetLock, check_output_directory, clean_leftovers, replace_directory
from deltatune.training import TrainConfig


@pytest.fixture
def local(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny", "bert")
    path = write_sentiment_csv(tmp_path / "toy.csv", 80)
    return str(model), data_record("toy", local={"path": str(path), "text_fields": ["text"]})


def make_run(directory, marker: str = "old"):
    directory.mkdir(parents=True)
    for name in RUN_FILES:
        (directory / name).write_text(marker)
    return directory


def test_a_failed_rename_puts_the_old_run_back(tmp_path, monkeypatch):
    out = make_run(tmp_path / "run")
    new = make_run(tmp_path / "new", "new")
    real_replace = os.replace
    calls = []

    def failing(source, destination):
        calls.append((source, destination))
        if len(calls) == 2:  # the old run is aside; putting the new one in place fails (Ctrl-C, a full disk)
            raise KeyboardInterrupt
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(new, out)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == dict.fromkeys(RUN_FILES, "old")
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_leftovers_are_cleaned_or_restored_only_when_they_hold_run_files(tmp_path):
    out = tmp_path / "run"
    make_run(tmp_path / ".run.partial-a")
    (tmp_path / ".run.partial-b").mkdir()
    (tmp_path / ".run.partial-b" / ".run.json.partial").write_text("{")  # a half-written temporary
    make_run(tmp_path / ".run.partial-mine")
    (tmp_path / ".run.partial-mine" / "notes.txt").write_text("not deltatune's")
    make_run(tmp_path / ".run.replaced-x")
    done = clean_leftovers(out, RUN_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial-mine", "run"]
    assert len(done) == 3 and any("restored" in line for line in done)


def test_the_lock_names_its_holder_and_goes_away(tmp_path):
    first = TargetLock(tmp_path / "run").acquire()
    with pytest.raises(DeltatuneError, match=f"being written by another deltatune process \\(pid {os.getpid()}"):
        TargetLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / ".run.lock").exists()
    TargetLock(tmp_path / "run").acquire().release()


def test_a_directory_with_a_subdirectory_is_not_a_run(tmp_path):
    out = make_run(tmp_path / "run")
    (out / "checkpoints").mkdir()
    with pytest.raises(DeltatuneError, match="holds 'checkpoints'"):
        check_output_directory(out, True, RUN_FILES)


def test_json_is_strict_and_says_which_values_were_not_finite(tmp_path):
    data = {"dev_metrics": {"pearson": math.nan, "spearman": 0.5}, "curve": [{"loss": math.inf}]}
    text = json_text(data)
    parsed = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert parsed["dev_metrics"] == {"pearson": None, "spearman": 0.5}
    assert parsed["non_finite_values"] == {"dev_metrics.pearson": "nan (written as null)",
                                           "curve[0].loss": "inf (written as null)"}
    write_json_atomic(tmp_path / "x.json", data)
    assert json.loads((tmp_path / "x.json").read_text()) == parsed
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_divergence_after_an_evaluation_saves_the_best_state_and_still_fails(local, tmp_path, monkeypatch):
    """A NaN injected after step 3 (evaluating every step): the state of the best evaluation is what is saved."""
    import torch
    from safetensors.torch import load_file

    from deltatune.methods.bitfit import BitFit

    def poison(self, model, step, total):
        if step == 3:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad).fill_(math.nan)

    monkeypatch.setattr(BitFit, "on_step_end", poison, raising=False)
    model, data = local
    out = tmp_path / "run"
    config = TrainConfig(max_steps=20, eval_every=1, batch_size=16, quiet=True)
    with pytest.raises(DeltatuneError) as raised:
        run_training(model, data, "bitfit", None, config, out=out)
    message = str(raised.value)
    assert "Training diverged at step 4" in message and "was saved to" in message and "stopped_by 'diverged'" in message
    record = json.loads((out / "run.json").read_text())
    assert record["stopped_by"] == "diverged" and record["best_step"] <= 3 and record["diverged"]
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "delta.safetensors")).values())


def test_non_finite_tensors_are_never_saved(local, tmp_path, monkeypatch):
    import torch

    from deltatune.methods.bitfit import BitFit

    real = BitFit.delta_state

    def with_nan(self, model):
        tensors = dict(real(self, model))
        name = next(iter(tensors))
        tensors[name] = torch.full_like(tensors[name], math.nan)
        return tensors

    monkeypatch.setattr(BitFit, "delta_state", with_nan)
    model, data = local
    with pytest.raises(DeltatuneError, match="hold NaN or infinite values, so nothing was saved"):
        run_training(model, data, "bitfit", None, TrainConfig(max_steps=2, quiet=True), out=tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "toy.csv"]


def test_a_directory_holding_only_a_readme_is_not_a_run_and_is_never_replaced(tmp_path):
    """README.md is a run file (the model card), but a directory with nothing else is a user's."""
    from deltatune.run import RUN_FILES

    target = tmp_path / "project"
    target.mkdir()
    (target / "README.md").write_text("my notes")
    with pytest.raises(DeltatuneError, match="holds 'README.md', which a deltatune run does not write"):
        check_output_directory(target, True, RUN_FILES)
    assert (target / "README.md").read_text() == "my notes"
