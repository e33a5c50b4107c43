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
    assert parsed["non_finite_values"] == {
        "dev_metrics.pearson": "nan (written as null)",
        "curve[0].loss": "inf (written as null)",
    }
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


# --------------------------------------------------------------------------------------------
# The same guarantees for every directory deltatune publishes: FreeLM, the reader, export, merge


def train_freelm(out, overwrite=False, model=None):
    from deltatune.freelm.artifact import run_freelm_training
    from deltatune.freelm.config import FreeLMConfig
    from test_freelm import SMALL_RUN

    return run_freelm_training(str(model), FreeLMConfig(**SMALL_RUN), out=out, overwrite=overwrite)


def train_reader(out, overwrite=False, model=None):
    from deltatune.reader.artifact import run_reader_training
    from deltatune.reader.config import ReaderConfig
    from test_reader import toy_dataset

    config = ReaderConfig(
        top_k=2,
        candidates=4,
        prompt_tokens=4,
        passage_tokens=8,
        steps=2,
        batch_size=2,
        reranker_steps=2,
        train_examples=4,
        answer_tokens=3,
        quiet=True,
    )
    return run_reader_training(str(model), "toy", config, out=out, overwrite=overwrite, dataset=toy_dataset())


WRITERS = {
    "freelm": (train_freelm, ("delta.safetensors", "deltatune.json", "run.json")),
    "reader": (train_reader, ("reader.safetensors", "reader.json")),
}


@pytest.fixture
def causal_model(tmp_path, offline_data):
    from conftest import build_tokenizer
    from test_freelm import tiny_causal_lm

    path = tmp_path / "tiny-causal"
    tiny_causal_lm(seed=5).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def offline_data(monkeypatch):
    import deltatune.sources.data as data
    from test_freelm import fake_corpus, fake_task_data

    monkeypatch.setattr(data, "load_task_data", fake_task_data)
    monkeypatch.setattr(data, "load_text_corpus", fake_corpus)


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_freelm_and_reader_directories_are_refused_locked_and_cleaned_like_train_runs(
    writer, tmp_path, causal_model, monkeypatch
):
    train, files = WRITERS[writer]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(DeltatuneError, match="holds 'notes.txt', which a deltatune run does not write"):
        train(mine, overwrite=True, model=causal_model)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and leftovers(tmp_path) == []
    monkeypatch.chdir(tmp_path / "mine")
    with pytest.raises(DeltatuneError, match="is the current directory"):
        train(".", overwrite=True, model=causal_model)
    with pytest.raises(DeltatuneError, match="an ancestor of the current directory"):
        train(tmp_path, overwrite=True, model=causal_model)
    monkeypatch.chdir(tmp_path)

    out = tmp_path / "run"
    held = TargetLock(out).acquire()
    with pytest.raises(DeltatuneError, match=f"being written by another deltatune process \\(pid {os.getpid()}"):
        train(out, model=causal_model)
    held.release()

    stale = tmp_path / ".run.partial-killed"
    stale.mkdir()
    (stale / files[0]).write_text("half")
    train(out, model=causal_model)
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert leftovers(tmp_path) == [], "the killed run's staging directory is cleaned and the lock goes"
    with pytest.raises(DeltatuneError, match="already holds a finished run"):
        train(out, model=causal_model)
    (out / files[0]).write_bytes(b"old")
    train(out, overwrite=True, model=causal_model)
    assert (out / files[0]).read_bytes() != b"old"


def test_a_full_disk_while_saving_a_reader_is_one_error_and_keeps_the_old_one(tmp_path, causal_model, monkeypatch):
    import errno

    import deltatune.reader.artifact as artifact
    from deltatune.run_directory import DiskFullError

    out = tmp_path / "reader"
    train_reader(out, model=causal_model)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "save_tensors", full)
    with pytest.raises(DiskFullError, match=r"No space left on the device holding .*reader.* while writing the reader"):
        train_reader(out, overwrite=True, model=causal_model)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_export_and_merge_publish_whole_directories_or_nothing(tmp_path, monkeypatch):
    import errno
    import stat

    import deltatune.hf_export as hf_export
    from conftest import save_tiny_model_dir
    from deltatune.merge import MergeConfig, merge_runs
    from deltatune.run_directory import DiskFullError
    from test_load_many import SENTIMENT, TOPIC, make_run

    base = save_tiny_model_dir(tmp_path / "base", "bert")
    sentiment = make_run(tmp_path / "sentiment", base, "lora", SENTIMENT, 1)
    topic = make_run(tmp_path / "topic", base, "lora", TOPIC, 2)
    exports = tmp_path / "exports"
    exports.mkdir()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(hf_export, "_write_provenance", full)
        with pytest.raises(DiskFullError, match="while writing the export"):
            hf_export.export_hf(sentiment, exports / "sentiment")
    assert list(exports.iterdir()) == [], "no half-written export and no staging directory"

    merged = tmp_path / "merged"
    written = merge_runs([sentiment, topic], merged, MergeConfig(how="task-arithmetic"))
    assert len(written) == 2 and leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    for directory in (merged, *written):  # one directory per task, readable like any other directory
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask
    with pytest.raises(DeltatuneError, match="already exists"):
        merge_runs([sentiment, topic], merged, MergeConfig(how="task-arithmetic"))


def test_equal_tensors_give_a_byte_identical_delta_file_in_every_process(tmp_path):
    """The header's metadata is written sorted: safetensors alone writes it in an order that changes between
    processes, so two equal trainings wrote files with different hashes."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from pathlib import Path; from deltatune.delta import save_tensors; "
        "tensors = {'b.weight': torch.arange(6.0).view(2, 3), 'a.bias': torch.ones(4, dtype=torch.bfloat16)}; "
        "save_tensors(tensors, Path(sys.argv[1]), {'method': 'full', 'format': 'deltatune', 'kind': 'x'})"
    )
    paths = [tmp_path / f"{number}.safetensors" for number in range(3)]
    for path in paths:  # each process draws its own hash seed
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    contents = {path.read_bytes() for path in paths}
    assert len(contents) == 1
    (content,) = contents
    header = json.loads(content[8 : 8 + int.from_bytes(content[:8], "little")])
    assert list(header["__metadata__"]) == ["format", "kind", "method"]
    from safetensors.torch import load_file

    assert load_file(str(paths[0]))["b.weight"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
