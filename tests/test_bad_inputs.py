"""Bad inputs and faults, one table: each case is a command (or a Python API call), the exit status it must
give, words its message must contain, and what must (or must not) be on disk afterwards.

Every case runs in a fresh copy of a small workspace: a tiny local model (`tiny`), a CSV (`toy.csv`), a
finished BitFit run (`run`), and a file of the user's own (`thesis.tex`). A Python API call counts as
status 2 when it raises DeltatuneError (what the CLI turns into exit status 2), 0 when it returns.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import deltatune
from conftest import make_sentiment_rows, save_tiny_model_dir, write_sentiment_csv
from deltatune.cli import main
from deltatune.errors import DeltatuneError

TRAIN = [
    "train",
    "--model",
    "tiny",
    "--data",
    "toy.csv",
    "--text-fields",
    "text",
    "--method",
    "bitfit",
    "--max-steps",
    "2",
    "--batch-size",
    "16",
    "--quiet",
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_text(relative: str, text: str) -> Callable[[Path], None]:
    def setup(workspace: Path) -> None:
        path = workspace / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    return setup


def labelled_csv(relative: str, labels: list[str]) -> Callable[[Path], None]:
    """A CSV like toy.csv whose label column cycles through `labels` (first rows) then positive/negative."""

    def setup(workspace: Path) -> None:
        rows = make_sentiment_rows(40)
        for row, label in zip(rows, labels, strict=False):  # only the first rows get these labels
            row["label"] = label
        write_rows(workspace / relative, rows)

    return setup


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Path], list[str] | object]
    """CLI arguments (a list) or a Python call returning anything (it runs inside the case)."""
    status: int
    words: tuple[str, ...] = ()
    """Words the message (stderr and stdout; str(error) for the API) must contain."""
    kept: tuple[str, ...] = ()
    """Paths whose files (every file under a directory) must be byte-for-byte as before."""
    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    setup: Callable[[Path], object] | None = None
    """Prepares the workspace; may return a function that undoes something (a lock) after the case."""
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    check: Callable[[Path], None] | None = None
    """Any further assertion on the workspace."""
    max_seconds: float | None = None
    unless_root: bool = False
    """Permission cases: root ignores file modes."""
    env: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Helpers the cases use


def take_lock(target: str) -> Callable[[Path], Callable[[], None]]:
    def setup(workspace: Path) -> Callable[[], None]:
        from deltatune.run_directory import TargetLock

        lock = TargetLock(workspace / target).acquire()
        return lock.release

    return setup


def use_workspace_data(workspace: Path) -> None:
    """The copied run reads the template's toy.csv; point it at this workspace's copy (same bytes)."""
    path = workspace / "run" / "deltatune.json"
    manifest = json.loads(path.read_text())
    manifest["data"]["path"] = str(workspace / "toy.csv")
    path.write_text(json.dumps(manifest))


def append_row(workspace: Path) -> None:
    use_workspace_data(workspace)
    with open(workspace / "toy.csv", "a", encoding="utf-8") as handle:
        handle.write("the film was really great,positive\n")


def delete_data(workspace: Path) -> None:
    use_workspace_data(workspace)
    (workspace / "toy.csv").unlink()


def disk_full_on_save(monkeypatch: pytest.MonkeyPatch, workspace: Path) -> None:
    import deltatune.delta

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(deltatune.delta, "save_tensors", full)


def no_leftovers(workspace: Path) -> None:
    leftovers = [
        p.name
        for p in workspace.rglob(".*")
        if ".partial" in p.name or p.name.endswith(".lock") or ".replaced-" in p.name
    ]
    assert not leftovers, leftovers


def no_raw_html_in_report(workspace: Path) -> None:
    text = (workspace / "exp" / "report.md").read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text


def build_experiment_with_html_names(workspace: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent / "compare"))
    import compare_fakes

    from deltatune.compare import store

    compare_fakes.build_fake_experiment(workspace / "exp")
    connection = store.connect(workspace / "exp")
    with connection:
        connection.execute("UPDATE cells SET variant = '<script>alert(1)</script>' WHERE variant = 'bitfit'")
        connection.execute("UPDATE learning_curve SET primary_value = NULL WHERE point = 0")  # an undefined metric
    connection.close()


def damage_manifest(workspace: Path) -> None:
    path = workspace / "run" / "deltatune.json"
    manifest = json.loads(path.read_text())
    manifest["task"] = "toy"
    path.write_text(json.dumps(manifest))


def poison_delta(workspace: Path) -> None:
    """A delta saved by a diverged run before deltatune refused to save one: every tensor NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    path = workspace / "run" / "delta.safetensors"
    save_file({name: torch.full_like(t, float("nan")) for name, t in load_file(str(path)).items()}, str(path))


def record_huge_max_length(workspace: Path) -> None:
    """A delta from before max_length was capped at the model's positions."""
    path = workspace / "run" / "deltatune.json"
    manifest = json.loads(path.read_text())
    manifest["max_length"] = 100_000
    path.write_text(json.dumps(manifest))


def move_base_model(workspace: Path) -> None:
    path = workspace / "run" / "deltatune.json"
    manifest = json.loads(path.read_text())
    manifest["base_model"]["name"] = str(workspace / "tiny")  # this workspace's copy, not the template's
    path.write_text(json.dumps(manifest))
    shutil.move(workspace / "tiny", workspace / "moved-model")


def kill_during_replace(workspace: Path) -> None:
    """What a kill between the two renames of a replacement leaves: the old run moved aside, no target."""
    os.replace(workspace / "run", workspace / ".run.replaced-x1")


def train_relative_then_leave(workspace: Path) -> None:
    assert (
        main(
            [
                "train",
                "--model",
                "tiny",
                "--data",
                "toy.csv",
                "--text-fields",
                "text",
                "--method",
                "bitfit",
                "--max-steps",
                "2",
                "--quiet",
                "--out",
                "relrun",
            ]
        )
        == 0
    )
    (workspace / "elsewhere").mkdir()


def predict_from_elsewhere(workspace: Path) -> list[str]:
    os.chdir(workspace / "elsewhere")
    return ["predict", "../relrun", "a good film"]


def copy_model(workspace: Path, name: str, drop: tuple[str, ...] = ()) -> None:
    shutil.copytree(workspace / "tiny", workspace / name)
    for file_name in drop:
        (workspace / name / file_name).unlink()


def api(function: Callable[[Path], object]) -> Callable[[Path], object]:
    function.is_api = True
    return function


LONG_TEXT = " ".join(["the movie was really very good"] * 120)  # 720 words


# --------------------------------------------------------------------------------------------
# The table

CASES = [
    # ---- harmful before: --overwrite safety
    Case(
        "overwrite the current directory",
        lambda w: [*TRAIN, "--out", ".", "--overwrite"],
        2,
        ("--out . is the current directory",),
        kept=("thesis.tex", "toy.csv", "run"),
    ),
    Case(
        "overwrite a directory of the user's own",
        lambda w: [*TRAIN, "--out", "notes", "--overwrite"],
        2,
        ("'thesis.tex'", "a deltatune run does not write"),
        kept=("notes",),
        setup=write_text("notes/thesis.tex", "my thesis"),
    ),
    Case(
        "overwrite the file system root",
        lambda w: [*TRAIN, "--out", "/", "--overwrite"],
        2,
        ("root of the file system",),
    ),
    Case(
        "overwrite the home directory",
        lambda w: [*TRAIN, "--out", str(w / "home"), "--overwrite"],
        2,
        ("your home directory",),
        kept=("home",),
        setup=write_text("home/.profile", "PATH=x"),
        env={"HOME": "{workspace}/home"},
    ),
    Case(
        "overwrite an ancestor of the current directory",
        lambda w: [*TRAIN, "--out", "..", "--overwrite"],
        2,
        ("ancestor of the current directory",),
        kept=("thesis.tex",),
    ),
    Case(
        "overwrite an earlier run",
        lambda w: [*TRAIN, "--out", "run", "--overwrite", "--seed", "7"],
        0,
        ("saved to run",),
        present=("run/deltatune.json", "run/run.json"),
        check=no_leftovers,
    ),
    Case(
        "overwrite an earlier run, and the new run fails",
        lambda w: [*TRAIN, "--out", "run", "--overwrite", "--method", "full", "--learning-rate", "1e6"],
        2,
        ("diverged",),
        kept=("run",),
        check=no_leftovers,
    ),
    Case(
        "an existing run without --overwrite",
        lambda w: [*TRAIN, "--out", "run"],
        2,
        ("already holds a finished run", "--overwrite"),
        kept=("run",),
    ),
    # ---- divergence
    Case(
        "a diverging run",
        lambda w: [*TRAIN, "--method", "full", "--learning-rate", "1e6", "--out", "div"],
        2,
        ("Training diverged at step", "learning rate", "nothing was saved"),
        absent=("div",),
        check=no_leftovers,
    ),
    Case(
        "predict with a NaN delta saved by an older deltatune",
        lambda w: ["predict", "run", "good"],
        2,
        ("gives NaN or infinite outputs", "lower learning rate"),
        setup=poison_delta,
    ),
    # ---- data changed since training
    Case(
        "eval --split test after the data file changed",
        lambda w: ["eval", "run", "--split", "test"],
        2,
        ("changed since it was trained", "toy.csv", "sha256", "--data-changed-ok"),
        setup=append_row,
    ),
    Case(
        "eval --data-changed-ok accepts changed data",
        lambda w: ["eval", "run", "--split", "test", "--data-changed-ok"],
        0,
        ("toy test: accuracy",),
        setup=append_row,
    ),
    Case(
        "TunedModel.evaluate after the data file changed",
        api(lambda w: deltatune.load(w / "run").evaluate("dev")),
        2,
        ("data_changed_ok=True",),
        setup=append_row,
    ),
    Case(
        "eval after the data file was deleted",
        lambda w: ["eval", "run"],
        2,
        ("toy.csv that run was trained on is gone",),
        setup=delete_data,
    ),
    # ---- two writers, one target
    Case(
        "train while another process writes the same --out",
        lambda w: [*TRAIN, "--out", "busy"],
        2,
        ("is being written by another deltatune process", f"pid {os.getpid()}"),
        absent=("busy",),
        setup=take_lock("busy"),
    ),
    # ---- data problems
    Case(
        "duplicate column names",
        lambda w: [*TRAIN[:4], "dup.csv", *TRAIN[5:]],
        2,
        ("two columns named 'text'",),
        setup=write_text("dup.csv", "text,text,label\n" + "a,b,x\nc,d,y\n" * 20),
    ),
    Case(
        "a single-class training set",
        lambda w: [*TRAIN[:4], "one.csv", *TRAIN[5:]],
        2,
        ("only the class 'positive'", "at least two classes"),
        setup=labelled_csv("one.csv", ["positive"] * 40),
    ),
    Case(
        "a single class, even with two classes listed",
        lambda w: [*TRAIN[:4], "one.csv", *TRAIN[5:], "--labels", "positive,negative"],
        2,
        ("the others never occur",),
        setup=labelled_csv("one.csv", ["positive"] * 40),
    ),
    *[
        Case(
            f"the missing-value marker {marker!r} as a label",
            lambda w: [*TRAIN[:4], "marker.csv", *TRAIN[5:]],
            2,
            ("row 3 (line 4)", "missing-value marker"),
            setup=labelled_csv("marker.csv", ["positive", "negative", marker]),
        )
        for marker in ("NaN", "NA", "null", "None", "n/a", "")
    ],
    Case(
        "a JSON null label",
        lambda w: [*TRAIN[:4], "nulls.jsonl", *TRAIN[5:]],
        2,
        ("row 2 (line 2)", "no label"),
        setup=write_text("nulls.jsonl", '{"text": "good", "label": "positive"}\n{"text": "bad", "label": null}\n' * 10),
    ),
    Case(
        "a marker that is a declared class name",
        lambda w: [*TRAIN[:4], "marker.csv", *TRAIN[5:], "--labels", "NA,negative,positive"],
        0,
        ("dev accuracy",),
        setup=labelled_csv("marker.csv", ["positive", "negative", "NA"]),
    ),
    Case(
        "regression scores with missing markers name every row",
        lambda w: [
            *TRAIN[:4],
            "scores.csv",
            "--text-fields",
            "text",
            "--label-field",
            "score",
            "--regression",
            "--quiet",
        ],
        2,
        ("row 2 (line 3) ('NA')", "row 4 (line 5) ('nan')", "not a number"),
        setup=write_text("scores.csv", "text,score\ngood,1\nbad,NA\nok,2\nmeh,nan\n" + "fine,3\n" * 20),
    ),
    Case(
        "a label only in the dev data",
        lambda w: [*TRAIN, "--dev-data", "dev.csv"],
        0,
        ("dev data hold labels the training data never show", "'neutral' (2 rows)"),
        setup=labelled_csv("dev.csv", ["neutral", "neutral"]),
    ),
    Case(
        "scores read as classes",
        lambda w: [
            *TRAIN[:4],
            "scores.csv",
            "--text-fields",
            "text",
            "--label-field",
            "score",
            "--max-steps",
            "1",
            "--quiet",
        ],
        0,
        ("holds numbers such as", "pass --regression"),
        setup=write_text("scores.csv", "text,score\n" + "".join(f"good film,{i % 7}.5\n" for i in range(40))),
    ),
    Case(
        "an id column read as classes",
        lambda w: [
            *TRAIN[:4],
            "ids.csv",
            "--text-fields",
            "text",
            "--label-field",
            "id",
            "--max-steps",
            "1",
            "--quiet",
        ],
        0,
        ("60 distinct values in 60 rows", "--label-field"),
        setup=write_text("ids.csv", "id,text\n" + "".join(f"{i},good film\n" for i in range(60))),
    ),
    Case(
        "the label column is also a text field",
        lambda w: [*TRAIN[:6], "text,label", *TRAIN[7:]],
        2,
        ("label column 'label' is also a text field",),
    ),
    Case(
        "the same text field twice",
        lambda w: [*TRAIN[:6], "text,text", *TRAIN[7:]],
        2,
        ("names the column 'text' twice",),
    ),
    Case(
        "a binary file as data",
        lambda w: [*TRAIN[:4], "binary.csv", *TRAIN[5:]],
        2,
        ("NUL byte", "binary"),
        setup=lambda w: (w / "binary.csv").write_bytes(b"\x00\x01\x02\xffPK"),
    ),
    Case(
        "a directory as data",
        lambda w: [*TRAIN[:4], "folder.csv", *TRAIN[5:]],
        2,
        ("is a directory",),
        setup=lambda w: (w / "folder.csv").mkdir(),
    ),
    Case(
        "a named pipe as data",
        lambda w: [*TRAIN[:4], "pipe.csv", *TRAIN[5:]],
        2,
        ("not a regular file",),
        setup=lambda w: os.mkfifo(w / "pipe.csv"),
        max_seconds=60,
    ),
    Case(
        "an unclosed quote in a CSV",
        lambda w: [*TRAIN[:4], "quote.csv", *TRAIN[5:]],
        2,
        ("row 1 (line 2)", "never closed"),
        setup=write_text("quote.csv", 'text,label\n"the film,positive\n' + "bad,negative\n" * 3),
    ),
    Case(
        "a key twice in one JSON object",
        lambda w: [*TRAIN[:4], "twice.jsonl", *TRAIN[5:]],
        2,
        ("line 1", "key 'text' twice"),
        setup=write_text("twice.jsonl", '{"text": "a", "text": "b", "label": "x"}\n' * 5),
    ),
    Case(
        "a JSON list as a text",
        lambda w: [*TRAIN[:4], "lists.jsonl", *TRAIN[5:]],
        2,
        ("a text that is a list",),
        setup=write_text("lists.jsonl", '{"text": ["a", "b"], "label": "x"}\n{"text": ["c"], "label": "y"}\n' * 5),
    ),
    Case(
        "a JSON object as a label",
        lambda w: [*TRAIN[:4], "objects.jsonl", *TRAIN[5:]],
        2,
        ("JSON list or object",),
        setup=write_text("objects.jsonl", '{"text": "a", "label": {"k": 1}}\n' * 10),
    ),
    # ---- --max-length beyond the model's positions
    Case(
        "--max-length beyond the model's positions",
        lambda w: [*TRAIN, "--max-length", "100000", "--out", "long"],
        0,
        ("max_length=100000 is more than tiny can take (64 positions): using max_length=64",),
        check=lambda w: (
            json.loads((w / "long" / "deltatune.json").read_text())["max_length"] == 64
            or pytest.fail("max_length not capped in the manifest")
        ),
    ),
    Case(
        "predict a 720-word text with a delta that records max_length 100000",
        lambda w: ["predict", "run", LONG_TEXT],
        0,
        ("positive",),
        setup=record_huge_max_length,
    ),
    # ---- faults while saving
    Case(
        "the disk fills up while saving a run",
        lambda w: [*TRAIN, "--out", "run", "--overwrite"],
        2,
        ("No space left on the device", "earlier results are untouched"),
        kept=("run",),
        patch=disk_full_on_save,
        check=no_leftovers,
    ),
    Case(
        "--out names a file",
        lambda w: [*TRAIN, "--out", "thesis.tex"],
        2,
        ("is a file, not a directory",),
        kept=("thesis.tex",),
    ),
    Case(
        "--out is a symbolic link",
        lambda w: [*TRAIN, "--out", "link"],
        2,
        ("symbolic link",),
        kept=("run",),
        setup=lambda w: os.symlink(w / "run", w / "link"),
    ),
    Case(
        "a staging directory left by a killed save is cleaned by the next run",
        lambda w: [*TRAIN, "--out", "fresh"],
        0,
        ("saved to fresh",),
        present=("fresh/delta.safetensors",),
        absent=(".fresh.partial-k1",),
        setup=write_text(".fresh.partial-k1/deltatune.json", "{"),
    ),
    Case(
        "a staging-like directory holding a user's file is left alone",
        lambda w: [*TRAIN, "--out", "fresh"],
        0,
        ("saved to fresh",),
        kept=(".fresh.partial-k2",),
        setup=write_text(".fresh.partial-k2/notes.txt", "mine"),
    ),
    Case(
        "a run moved aside by a killed replacement is restored",
        lambda w: [*TRAIN, "--out", "run"],
        2,
        ("already holds a finished run",),
        present=("run/delta.safetensors",),
        absent=(".run.replaced-x1",),
        setup=kill_during_replace,
    ),
    Case(
        "--out in a read-only directory",
        lambda w: [*TRAIN, "--out", "locked/run"],
        2,
        ("locked",),
        setup=lambda w: ((w / "locked").mkdir(), os.chmod(w / "locked", 0o555)),
        unless_root=True,
    ),
    # ---- the Python API at its public boundary
    Case("deltatune.train(123)", api(lambda w: deltatune.train(123, task="stsb")), 2, ("model must be",)),
    Case(
        "deltatune.train(task=[...])",
        api(lambda w: deltatune.train("tiny", task=["stsb"])),
        2,
        ("task must be a catalog task name",),
    ),
    Case(
        "deltatune.train(method_options=[...])",
        api(lambda w: deltatune.train("tiny", task="stsb", method="lora", method_options=["r=4"])),
        2,
        ("method_options must be a dict",),
    ),
    Case(
        "deltatune.train(data='toy.csv')",
        api(lambda w: deltatune.train("tiny", data="toy.csv")),
        2,
        ("data must be what deltatune.data_record",),
    ),
    Case(
        "deltatune.train(out=5)",
        api(lambda w: deltatune.train("tiny", task="stsb", out=5)),
        2,
        ("out must be a directory path",),
    ),
    Case("deltatune.load(42)", api(lambda w: deltatune.load(42)), 2, ("load() takes the path of a delta",)),
    Case(
        "TunedModel.predict(42)",
        api(lambda w: deltatune.load(w / "run").predict(42)),
        2,
        ("must be a string or a list of strings",),
    ),
    Case(
        "TunedModel.predict(batch_size=0)",
        api(lambda w: deltatune.load(w / "run").predict("good", batch_size=0)),
        2,
        ("batch_size must be",),
    ),
    Case("TunedModel.evaluate(42)", api(lambda w: deltatune.load(w / "run").evaluate(42)), 2, ("split must be",)),
    Case(
        "deltatune.data_record(local='toy.csv')",
        api(lambda w: deltatune.data_record("x", local="toy.csv")),
        2,
        ("local must be a dict",),
    ),
    Case(
        "deltatune.data_record with a misspelt key",
        api(lambda w: deltatune.data_record("x", local={"path": "toy.csv", "text_field": ["text"]})),
        2,
        ("unknown key local['text_field']", "text_fields"),
    ),
    Case(
        "deltatune.data_record(text_fields='text')",
        api(lambda w: deltatune.data_record("x", local={"path": "toy.csv", "text_fields": "text"})),
        2,
        ("must be a list of column names",),
    ),
    # ---- the compare report
    Case(
        "report.md escapes names",
        lambda w: ["report", "exp"],
        0,
        ("report.md",),
        setup=build_experiment_with_html_names,
        check=no_raw_html_in_report,
    ),
    Case(
        "report on a missing directory", lambda w: ["report", "nothere"], 2, ("holds no results",), absent=("nothere",)
    ),
    Case(
        "report --out names a file",
        lambda w: ["report", "exp", "--out", "thesis.tex"],
        2,
        ("is a file, not a directory",),
        kept=("thesis.tex",),
        setup=build_experiment_with_html_names,
    ),
    # ---- where the base model is
    Case(
        "a run trained on a relative --model works from another directory",
        predict_from_elsewhere,
        0,
        ("positive",),
        setup=train_relative_then_leave,
    ),
    Case(
        "the recorded base model directory was moved",
        lambda w: ["predict", "run", "good"],
        2,
        ("no longer exists", "--base"),
        setup=move_base_model,
    ),
    Case(
        "a hub id with HF_HUB_OFFLINE set",
        lambda w: [*TRAIN[:2], "someone/some-model", *TRAIN[3:]],
        2,
        ("hub cannot be reached", "HF_HUB_OFFLINE is set"),
        max_seconds=30,
    ),
    Case(
        "a hub id with no network",
        lambda w: [*TRAIN[:2], "someone/some-model", *TRAIN[3:]],
        2,
        ("hub cannot be reached", "no connection to 127.0.0.1:9"),
        max_seconds=30,
        env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"},
    ),
    # ---- values that passed validation and then failed or mis-trained
    Case("--epochs inf", lambda w: [*TRAIN, "--epochs", "inf"], 2, ("epochs='inf': must be a finite number",)),
    Case("--learning-rate nan", lambda w: [*TRAIN, "--learning-rate", "nan"], 2, ("must be a finite number",)),
    Case(
        "--max-grad-norm -1 (would reverse every gradient)",
        lambda w: [*TRAIN, "--max-grad-norm", "-1"],
        2,
        ("max_grad_norm=-1.0 must be positive",),
    ),
    Case("--seed too large for torch", lambda w: [*TRAIN, "--seed", str(10**30)], 2, ("seed=", "2**63 - 1")),
    Case("--threads -1", lambda w: [*TRAIN, "--threads", "-1"], 2, ("threads=-1 must be at least 1",)),
    Case(
        "--method.alpha=nan",
        lambda w: [*TRAIN[:8], "lora", *TRAIN[9:], "--method.alpha=nan"],
        2,
        ("method.alpha='nan': must be a finite number",),
    ),
    # ---- damaged run directories
    Case(
        "a manifest whose task is not a task",
        lambda w: ["predict", "run", "good"],
        2,
        ("is damaged", "its task is str 'toy', not a task spec"),
        setup=damage_manifest,
    ),
    # ---- other commands
    Case(
        "export --out names a file",
        lambda w: ["export", "lora-run", "--out", "thesis.tex"],
        2,
        ("is a file, not a directory",),
        kept=("thesis.tex",),
        setup=lambda w: main([*TRAIN[:8], "lora", *TRAIN[9:], "--out", "lora-run"]),
    ),
    Case(
        "demo with a bad method writes nothing",
        lambda w: ["demo", "--methods", "bitfit,nope", "--out", "demo"],
        2,
        ("Unknown method 'nope'",),
        absent=("demo",),
    ),
    Case(
        "a spec file that is not UTF-8",
        lambda w: ["compare", "spec.yaml", "--dry-run"],
        2,
        ("not UTF-8",),
        setup=lambda w: (w / "spec.yaml").write_bytes(b"\xff\xfe\x00t"),
    ),
    Case(
        "a spec file with a key given twice",
        lambda w: ["compare", "spec.yaml", "--dry-run"],
        2,
        ("the key 'methods' appears twice",),
        setup=write_text("spec.yaml", "tasks: [stsb]\nmethods: [full]\nmethods: [lora]\n"),
    ),
    Case(
        "a spec path with a NUL character",
        lambda w: ["compare", "spec.yaml", "--dry-run"],
        2,
        ("holds a NUL character",),
        setup=write_text("spec.yaml", 'tasks: [{name: x, path: "a\\0b.csv", text_fields: [text]}]\nmethods: [full]\n'),
    ),
    Case(
        "a grid seed too large for torch",
        lambda w: ["compare", "--tasks", "stsb", "--methods", "full", "--seeds", str(2**64), "--dry-run"],
        2,
        ("seeds[0]=",),
    ),
    Case(
        "a grid time budget of inf",
        lambda w: ["compare", "spec.yaml", "--dry-run"],
        2,
        ("time_budgets[0]=inf",),
        setup=write_text("spec.yaml", "tasks: [stsb]\nmethods: [full]\ntime_budgets: [.inf]\n"),
    ),
    Case(
        "a model directory without tokenizer files",
        lambda w: [*TRAIN[:2], "bare", *TRAIN[3:]],
        2,
        ("has no tokenizer files",),
        setup=lambda w: copy_model(w, "bare", drop=("tokenizer.json", "tokenizer_config.json")),
    ),
    Case(
        "a model directory with damaged weights",
        lambda w: [*TRAIN[:2], "broken", *TRAIN[3:]],
        2,
        ("Could not load 'broken'", "save it again"),
        setup=lambda w: (copy_model(w, "broken"), (w / "broken" / "model.safetensors").write_bytes(b"garbage")),
    ),
    Case(
        "a model directory of an unknown architecture",
        lambda w: [*TRAIN[:2], "alien", *TRAIN[3:]],
        2,
        ("Could not load 'alien'", "nonexistent"),
        setup=lambda w: (
            copy_model(w, "alien"),
            (w / "alien" / "config.json").write_text('{"model_type": "nonexistent"}'),
        ),
    ),
    Case(
        "the training file again as --dev-data",
        lambda w: [*TRAIN, "--dev-data", "copy.csv"],
        2,
        ("same content as the train file", "trained on"),
        setup=lambda w: shutil.copy(w / "toy.csv", w / "copy.csv"),
    ),
    Case(
        "compare --out names a file",
        lambda w: ["compare", "--tasks", "stsb", "--methods", "full", "--out", "thesis.tex"],
        2,
        ("is a file, not a directory",),
        kept=("thesis.tex",),
    ),
    Case(
        "results --out names a directory",
        lambda w: ["results", "exp", "--out", "run"],
        2,
        ("is a directory",),
        kept=("run",),
        setup=build_experiment_with_html_names,
    ),
    Case(
        "DELTATUNE_CACHE names a file",
        lambda w: ["fetch", "stsb"],
        2,
        ("DELTATUNE_CACHE", "cannot be used"),
        env={"DELTATUNE_CACHE": "{workspace}/thesis.tex"},
        kept=("thesis.tex",),
    ),
    Case(
        "unicode paths",
        lambda w: [*TRAIN[:4], "données.csv", *TRAIN[5:], "--out", "résultats/実験"],
        0,
        ("saved to résultats/実験",),
        present=("résultats/実験/deltatune.json",),
        setup=lambda w: shutil.copy(w / "toy.csv", w / "données.csv"),
    ),
]


# --------------------------------------------------------------------------------------------
# Running a case


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The workspace every case copies: built once (one tiny training run)."""
    root = tmp_path_factory.mktemp("workspace")
    save_tiny_model_dir(root / "tiny", "bert")
    write_sentiment_csv(root / "toy.csv", 80)
    (root / "thesis.tex").write_text("\\documentclass{article} my thesis", encoding="utf-8")
    previous = Path.cwd()
    os.chdir(root)
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        assert main([*TRAIN, "--out", "run"]) == 0
    finally:
        os.chdir(previous)
    return root


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, template: Path, tmp_path: Path, monkeypatch, capsys, caplog):
    if case.unless_root and os.geteuid() == 0:
        pytest.skip("file permissions do not stop root")
    workspace = tmp_path / "workspace"
    shutil.copytree(template, workspace, symlinks=True)
    monkeypatch.chdir(workspace)
    for name, value in case.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value.format(workspace=workspace))
    if case.name.startswith("a hub id with no network"):
        from deltatune.sources import models

        models._probe_hub.cache_clear()
    undo = case.setup(workspace) if case.setup else None
    before = {path: snapshot(workspace / path) for path in case.kept}
    if case.patch:
        case.patch(monkeypatch, workspace)
    capsys.readouterr()
    started = time.monotonic()
    try:
        if getattr(case.call, "is_api", False):
            try:
                case.call(workspace)
                status, message = 0, ""
            except DeltatuneError as error:
                status, message = 2, str(error)
        else:
            status = main(case.call(workspace))
            message = ""
    finally:
        if callable(undo):
            undo()
        os.chdir(workspace)
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    message += captured.err + captured.out + caplog.text
    assert status == case.status, f"exit status {status}, expected {case.status}; output:\n{message}"
    for word in case.words:
        assert word in message, f"{word!r} not in:\n{message}"
    if case.status != 0:
        assert "Traceback" not in message
    for path, files in before.items():
        assert snapshot(workspace / path) == files, f"{path} changed"
    for path in case.present:
        assert (workspace / path).exists(), f"{path} is missing"
    for path in case.absent:
        assert not (workspace / path).exists(), f"{path} is still there"
    if case.max_seconds is not None:
        assert elapsed < case.max_seconds, f"took {elapsed:.1f} s"
    if case.check:
        case.check(workspace)
