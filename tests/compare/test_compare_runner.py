"""The runner on real (tiny) cells: each in its own process, recorded once, surviving SIGTERM and kill -9.

Each cell is a real `python -m deltatune.compare.cell` process training a tiny random BERT, so
these tests cost a few seconds per cell; the grid is kept to three cells.
"""

import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_grid import finished_count, wait_until, write_grid_workspace

from deltatune.cli import main
from deltatune.compare import store
from deltatune.compare.report import write_report
from deltatune.compare.runner import run_grid
from deltatune.compare.spec import parse_spec, read_spec_file

TRAIN = "{epochs: 2, batch_size: 16, learning_rate: 0.003, threads: 1, eval_every: 4}"

GRID = f"""
    title: tiny grid
    models: [tiny-bert]
    tasks: [{{name: toy, path: toy.csv, text_fields: [text]}}]
    methods: [full, bitfit, {{name: lora-r4, method: lora, config: {{r: 4}}}}]
    fractions: [1.0]
    seeds: [0]
    train: {TRAIN}
"""


def cell_processes(exp_dir: Path) -> list[int]:
    """Live cell processes working on exp_dir (Linux /proc; zombies have no command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"deltatune.compare.cell" in command and str(exp_dir).encode() in command:
                found.append(int(entry.name))
    return found


def table(exp_dir: Path) -> dict:
    """What a user compares: each cell's metrics and its whole learning curve."""
    cells = store.load_cells(exp_dir)
    curves = store.load_curves(exp_dir)
    return {
        c["cell_id"]: (
            c["status"],
            c["variant"],
            c["dev_metrics"],
            c["steps"],
            [(p["step"], p["metrics"]) for p in curves.get(c["cell_id"], [])],
        )
        for c in cells
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_grid_workspace(tmp_path_factory.mktemp("runner"), GRID)


@pytest.fixture(scope="module")
def reference(workspace):
    """An uninterrupted run of the grid: what every interrupted run must end up equal to."""
    spec = parse_spec(read_spec_file(workspace / "grid.yaml"))
    messages: list[str] = []
    summary = run_grid(spec, workspace / "reference", jobs=2, say=messages.append)
    assert summary.finished_now == 3 and summary.failed_now == 0, messages
    return workspace / "reference"


def test_an_uninterrupted_grid_records_every_cell_with_its_run_record(reference):
    cells = store.load_cells(reference)
    assert len(cells) == 3 and {c["status"] for c in cells} == {"finished"}
    assert {c["variant"] for c in cells} == {"full", "bitfit", "lora-r4"}
    for cell in cells:
        directory = reference / cell["run_dir"]
        assert (directory / "run.json").is_file() and (directory / "dev_outputs.safetensors").is_file()
        assert not (directory / "delta.safetensors").exists()  # keep_deltas is false by default
        assert cell["delta_bytes"] > 0 and cell["trainable_params"] > 0 and cell["peak_memory_bytes"] > 0
        assert cell["record"]["versions"]["torch"] and cell["settings"]["train"]["threads"] == 1
    curves = store.load_curves(reference)
    assert all(len(points) >= 2 for points in curves.values())
    assert not list((reference / "cells").glob(".*staging*"))


def test_sigterm_then_kill_9_then_resume_equals_the_uninterrupted_run(workspace, reference):
    experiment = workspace / "interrupted"
    command = [
        sys.executable,
        "-m",
        "deltatune.cli",
        "compare",
        str(workspace / "grid.yaml"),
        "--out",
        str(experiment),
        "--no-report",
    ]

    # 1. SIGTERM while the first cell trains: the runner stops it, records nothing half-done, exits 130
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: cell_processes(experiment), what="the first cell to start")
    runner.send_signal(signal.SIGTERM)
    output, _ = runner.communicate(timeout=60)
    assert runner.returncode == 130, output
    assert "Stopped by SIGTERM" in output
    assert not cell_processes(experiment)
    assert finished_count(experiment) == len([d for d in (experiment / "cells").iterdir() if d.is_dir()])
    assert not list((experiment / "cells").glob(".*staging*"))

    # 2. kill -9 with one cell recorded and the next one training: the cell dies with its runner
    runner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(
        lambda: finished_count(experiment) >= 1 and cell_processes(experiment),
        what="one finished cell and another running",
    )
    recorded_before_kill = finished_count(experiment)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    wait_until(lambda: not cell_processes(experiment), timeout=10, what="the orphaned cell to die")
    assert recorded_before_kill < 3

    # 3. resume: only what is not recorded runs; the result equals the uninterrupted run's, nothing twice
    messages: list[str] = []
    summary = run_grid(parse_spec(read_spec_file(workspace / "grid.yaml")), experiment, jobs=2, say=messages.append)
    assert summary.finished_before + summary.recovered == recorded_before_kill
    assert summary.finished_now == 3 - recorded_before_kill and summary.failed_now == 0
    assert table(experiment) == table(reference)
    with sqlite3.connect(store.store_path(experiment)) as connection:
        assert connection.execute("SELECT COUNT(*), COUNT(DISTINCT cell_id) FROM cells").fetchone() == (3, 3)
        duplicated = connection.execute(
            "SELECT COUNT(*) FROM (SELECT cell_id, point FROM learning_curve "
            "GROUP BY cell_id, point HAVING COUNT(*) > 1)"
        ).fetchone()[0]
    assert duplicated == 0
    assert sum(len(p) for p in store.load_curves(experiment).values()) == sum(
        len(p) for p in store.load_curves(reference).values()
    )
    # and once everything is recorded, running again runs nothing
    again = run_grid(parse_spec(read_spec_file(workspace / "grid.yaml")), experiment, say=messages.append)
    assert again.finished_now == 0 and again.left == 0


def test_a_failing_cell_is_recorded_and_a_changed_spec_runs_only_new_cells(workspace, reference, capsys):
    experiment = workspace / "changed"
    shutil.copytree(reference, experiment)
    (workspace / "broken.csv").write_text("text,label\nthe movie was good,positive\nno label here,\n" * 5)
    spec_path = workspace / "changed.yaml"
    spec_path.write_text(
        textwrap.dedent(f"""
        title: tiny grid, changed
        models: [tiny-bert]
        seeds: [0]
        fractions: [1.0]
        train: {TRAIN}
        keep_deltas: true
        grids:
          - {{name: broken, tasks: [{{name: broken, path: broken.csv, text_fields: [text]}}], methods: [full]}}
          - name: main
            tasks: [{{name: toy, path: toy.csv, text_fields: [text]}}]
            methods: [full, bitfit, {{name: lora-r2, method: lora, config: {{r: 2}}}}]
    """),
        encoding="utf-8",
    )
    messages: list[str] = []
    summary = run_grid(parse_spec(read_spec_file(spec_path)), experiment, say=messages.append)
    text = "\n".join(messages)
    # full and bitfit on toy are unchanged and not run again; lora-r4 no longer belongs and is said so
    assert summary.finished_before == 2 and summary.left == 0
    assert len(summary.stale) == 1 and "lora-r4 on toy" in summary.stale[0] and "no longer belong" in text
    # the broken cell ran first and failed; the grid went on to the new lora-r2 cell
    assert summary.failed_now == 1 and summary.finished_now == 1
    assert text.index("FAILED full on broken") < text.index("finished lora-r2 on toy")
    failed = store.load_cells(experiment, status="failed")
    assert len(failed) == 1 and "broken.csv" in failed[0]["error"]
    new = next(c for c in store.load_cells(experiment) if c["variant"] == "lora-r2")
    assert (experiment / new["run_dir"] / "delta.safetensors").is_file()  # keep_deltas: true
    assert len(store.load_cells(experiment)) == 4 and len(store.load_cells(experiment, include_stale=True)) == 5

    # again from the command line: nothing to run, the failure is kept (and makes the exit status 1)
    assert main(["compare", str(spec_path), "--out", str(experiment)]) == 1
    output = capsys.readouterr()
    assert "0 to run" in output.out and "failed earlier (kept as failed" in output.out
    assert "report:" in output.out and "--retry-failed" in output.err
    html = (experiment / "report.html").read_text(encoding="utf-8")
    assert "Failed cells" in html and "lora-r4" not in html.split("Every cell")[0]
    write_report(experiment, experiment / "all", include_stale=True)
    assert "lora-r4" in (experiment / "all" / "report.md").read_text(encoding="utf-8")


def test_a_finished_but_unrecorded_cell_is_recorded_not_run_again(workspace, reference):
    """The runner died after a cell wrote its result directory but before recording it."""
    experiment = workspace / "unrecorded"
    shutil.copytree(reference, experiment)
    with sqlite3.connect(store.store_path(experiment)) as connection:
        connection.execute("PRAGMA foreign_keys = ON")
        (forgotten,) = connection.execute("SELECT cell_id FROM cells LIMIT 1").fetchone()
        connection.execute("DELETE FROM cells WHERE cell_id = ?", (forgotten,))
    (experiment / "cells" / ".staging-0123456789abcdef").mkdir()  # what a killed cell leaves behind
    messages: list[str] = []
    summary = run_grid(parse_spec(read_spec_file(workspace / "grid.yaml")), experiment, say=messages.append)
    assert summary.recovered == 1 and summary.finished_now == 0 and summary.left == 0
    assert table(experiment) == table(reference)
    assert not list((experiment / "cells").glob(".staging-*"))


def test_exit_descriptions_name_the_signal():
    from deltatune.compare.runner import _describe_exit, _format_duration

    assert _describe_exit(-9) == "was killed by SIGKILL (often the out-of-memory killer)"
    assert _describe_exit(1) == "exited with code 1"
    assert [_format_duration(s) for s in (None, 5, 125, 7300)] == ["?", "5 s", "2 min 05 s", "2 h 01 min"]


def test_a_searched_cell_and_a_no_training_row_reach_the_store_and_the_report(workspace):
    path = workspace / "searched.yaml"
    path.write_text(
        textwrap.dedent("""
        models: [tiny-bert]
        tasks: [{name: toy, path: toy.csv, text_fields: [text]}]
        methods: [bitfit]
        seeds: [0]
        train: {max_steps: 16, batch_size: 16, eval_every: 4, threads: 1, lr_search: [0.0001, 0.01],
                 lr_search_rungs: [0.25]}
        baselines: [majority]
    """),
        encoding="utf-8",
    )
    spec = parse_spec(read_spec_file(path))
    messages: list[str] = []
    summary = run_grid(spec, workspace / "searched", say=messages.append)
    assert summary.finished_now == 2 and summary.failed_now == 0, messages
    cells = {c["kind"]: c for c in store.load_cells(workspace / "searched")}
    trained, untrained = cells["train"], cells["baseline"]
    search = trained["record"]["lr_search"]
    best = max(search["candidates"], key=lambda c: c["rung_scores"][-1])  # one rung: the better goes on
    assert trained["learning_rate"] == search["chosen"] == best["learning_rate"]
    assert trained["evaluation_split"] == "test" and trained["primary_value"] == trained["test_metrics"]["accuracy"]
    assert trained["converged"] in (0, 1) and trained["dev_value"] == trained["dev_metrics"]["accuracy"]
    assert untrained["variant"] == "majority" and untrained["primary_value"] == untrained["test_metrics"]["accuracy"]
    assert (workspace / "searched" / untrained["run_dir"] / "test_outputs.safetensors").is_file()
    _, markdown = write_report(workspace / "searched")
    text = markdown.read_text(encoding="utf-8")
    assert "majority (no training)" in text and "## Learning-rate search (dev)" in text
    assert f"{search['chosen']:g}" in text and "test accuracy × 100; dev beside it" in text


def test_cells_finished_in_another_experiment_are_copied_not_run_again(workspace, reference, capsys):
    """`--reuse`: a cell of the new grid with the same identity as a finished one elsewhere is taken from there."""
    spec_path = workspace / "wider.yaml"
    spec_path.write_text(
        (workspace / "grid.yaml").read_text(encoding="utf-8").replace("config: {r: 4}}]", "config: {r: 4}}, ia3]"),
        encoding="utf-8",
    )
    experiment = workspace / "wider"
    messages: list[str] = []
    summary = run_grid(parse_spec(read_spec_file(spec_path)), experiment, say=messages.append, reuse=[reference])
    assert summary.reused == 3 and summary.finished_now == 1 and summary.failed_now == 0
    assert f"3 taken finished from {reference} (3)" in messages[0]
    reused = {cell_id: row for cell_id, row in table(experiment).items() if cell_id in table(reference)}
    assert reused == table(reference)  # metrics and whole learning curves, as they were recorded there
    assert {c["variant"] for c in store.load_cells(experiment)} == {"full", "bitfit", "lora-r4", "ia3"}
    assert (experiment / "logs" / f"{next(iter(reused))}.log").is_file()
    write_report(experiment)
    assert f"3 from {reference}" in (experiment / "report.md").read_text(encoding="utf-8")
    # nothing left to take or run: a second run reuses nothing more and keeps the count
    again = run_grid(parse_spec(read_spec_file(spec_path)), experiment, say=messages.append, reuse=[reference])
    assert again.reused == 0 and again.left == 0 and store.load_meta(experiment)["reused"] == {str(reference): 3}
    # the dry run says which cells need no run, and where they finished
    assert (
        main(["compare", str(spec_path), "--out", str(workspace / "new"), "--reuse", str(reference), "--dry-run"]) == 0
    )
    listing = capsys.readouterr().out
    assert listing.count(f"(finished in {reference})") == 3 and not (workspace / "new").exists()
    # a directory that is not an experiment, or the experiment itself, is refused before anything runs
    for wrong, says in ((workspace, "is not an experiment directory"), (experiment, "is the experiment itself")):
        assert main(["compare", str(spec_path), "--out", str(experiment), "--reuse", str(wrong)]) != 0
        assert says in capsys.readouterr().err
