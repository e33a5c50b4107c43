"""Faults from outside the process: kill -9 while training and while saving, two trainings on one --out at
once, and a full disk (a small tmpfs where the tests run as root; a store that reports a full disk
everywhere). After each, nothing half-written is kept, earlier results are intact, and the next run works.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import save_tiny_model_dir, write_sentiment_csv
from deltatune.compare import store
from deltatune.compare.spec import parse_spec, read_spec_file
from deltatune.errors import DeltatuneError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("faults")
    save_tiny_model_dir(directory / "tiny", "bert")
    write_sentiment_csv(directory / "toy.csv", 120)
    return directory


def train_command(workspace: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deltatune.cli",
        "train",
        "--model",
        str(model or workspace / "tiny"),
        "--data",
        str(workspace / "toy.csv"),
        "--text-fields",
        "text",
        "--out",
        str(out),
        "--quiet",
        "--threads",
        "1",
        *extra,
    ]


_STARTED: list[subprocess.Popen] = []
"""Every process a test started: killed when the test ends, passed or failed (a test that timed out waiting
for one must not leave it training for hours on the machine)."""


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


def start(command: list[str], interruptible: bool = False) -> subprocess.Popen:
    """`interruptible`: the process starts with SIGINT's default action even when this test run ignores it (a
    shell starts background commands so, and a child inherits an ignored signal: it would never see Ctrl-C)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if interruptible else None,
    )
    _STARTED.append(process)
    return process


def wait_until(condition, timeout: float = 120.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.glob(f".{name}.*"))


def lock_is_held(lock: Path) -> bool:
    return lock.is_file() and lock.read_text().startswith("pid")


def train_here(workspace: Path, out: Path, *extra: str) -> int:
    """The same command in this process (torch is already imported here: seconds faster than a new process)."""
    from deltatune.cli import main

    return main(train_command(workspace, out, *extra)[3:])


def test_kill_9_while_training_keeps_nothing_and_the_next_run_works(workspace, tmp_path):
    out = tmp_path / "run"
    process = start(train_command(workspace, out, "--method", "full", "--max-steps", "100000"))
    wait_until(lambda: lock_is_held(tmp_path / ".run.lock"), what="the run to take its lock")
    time.sleep(2.0)  # loading and into the training loop
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    assert not [name for name in leftovers(tmp_path, "run") if ".partial-" in name]
    assert train_here(workspace, out, "--method", "bitfit", "--max-steps", "2") == 0
    assert (out / "deltatune.json").is_file() and (out / "run.json").is_file()
    assert leftovers(tmp_path, "run") == []  # the stale lock file went with the run that released it


def test_kill_9_while_saving_leaves_a_staging_directory_the_next_run_removes(workspace, tmp_path, capsys):
    # a larger model, so that saving it takes long enough to be caught in the act
    save_tiny_model_dir(tmp_path / "wide", "bert")
    from transformers import AutoModel

    from conftest import tiny_bert_config

    AutoModel.from_config(
        tiny_bert_config(hidden_size=256, intermediate_size=2048, num_hidden_layers=4)
    ).save_pretrained(tmp_path / "wide")
    out = tmp_path / "run"
    for _ in range(5):
        process = start(train_command(workspace, out, "--method", "full", "--max-steps", "1", model=tmp_path / "wide"))
        caught = False
        while process.poll() is None:
            if [p for p in tmp_path.glob(".run.partial-*")]:
                process.send_signal(signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
        process.wait()
        if caught and list(tmp_path.glob(".run.partial-*")) and not out.exists():
            break
        if out.exists():  # the save finished between the look and the kill: try again
            shutil.rmtree(out)
    else:
        pytest.skip("could not kill the process while it was saving in 5 attempts")
    assert train_here(workspace, out, "--method", "bitfit", "--max-steps", "2") == 0
    assert "left by a run that was killed while saving" in capsys.readouterr().err
    assert leftovers(tmp_path, "run") == [] and (out / "delta.safetensors").is_file()


def test_a_second_train_on_the_same_out_fails_at_once_and_names_the_first(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    first = start(train_command(workspace, out, "--method", "bitfit", "--max-steps", "100000", "--time-budget-s", "4"))
    wait_until(lambda: lock_is_held(tmp_path / ".run.lock"), what="the first run to take its lock")
    assert train_here(workspace, out, "--method", "bitfit", "--max-steps", "2") == 2
    assert f"is being written by another deltatune process (pid {first.pid}" in capsys.readouterr().err
    output, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors
    assert (out / "run.json").is_file() and leftovers(tmp_path, "run") == []


@pytest.mark.slow  # the lock itself is covered above, deterministically; this is the race as users meet it
def test_two_trains_started_together_one_wins_and_the_other_says_so(workspace, tmp_path):
    out = tmp_path / "run"
    processes = [
        start(train_command(workspace, out, "--method", "bitfit", "--max-steps", "3", "--seed", str(seed)))
        for seed in (1, 2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(errors for code, errors in results if code == 2)
    assert "is being written by another deltatune process" in loser or "already holds a finished run" in loser
    assert (out / "run.json").is_file() and leftovers(tmp_path, "run") == []


# --------------------------------------------------------------------------------------------
# A full disk


GRID = """
    models: [{model}]
    tasks: [{{name: toy, path: {data}, text_fields: [text]}}]
    methods: [bitfit, {{name: lora-r2, method: lora, config: {{r: 2}}}}]
    fractions: [1.0]
    seeds: [0]
    train: {{max_steps: 2, batch_size: 16, threads: 1}}
"""


def write_grid(workspace: Path, path: Path) -> Path:
    path.write_text(
        textwrap.dedent(GRID.format(model=workspace / "tiny", data=workspace / "toy.csv")), encoding="utf-8"
    )
    return path


def test_a_store_that_reports_a_full_disk_stops_the_grid_and_a_resume_completes_it(workspace, tmp_path, monkeypatch):
    from deltatune.compare import runner

    spec = parse_spec(read_spec_file(write_grid(workspace, tmp_path / "grid.yaml")))
    experiment = tmp_path / "exp"

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(runner.store, "record_finished", full)
    messages: list[str] = []
    with pytest.raises(DeltatuneError) as raised:
        runner.run_grid(spec, experiment, say=messages.append)
    assert "No space left on the device" in str(raised.value) and "run the same command again" in str(raised.value)
    assert store.load_cells(experiment) == []  # nothing recorded as failed for it
    monkeypatch.undo()
    summary = runner.run_grid(spec, experiment, say=messages.append)
    assert summary.recovered + summary.finished_now == 2 and summary.failed_now == 0
    assert {c["status"] for c in store.load_cells(experiment)} == {"finished"}


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs; mounting needs root (and may be refused in a container)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Write a file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "ab") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


def test_train_on_a_full_disk_says_so_and_keeps_the_earlier_run(workspace, small_disk, capsys):
    earlier = small_disk / "earlier"
    assert train_here(workspace, earlier, "--method", "bitfit", "--max-steps", "2") == 0
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    fill(small_disk, leave=16 * 1024)
    capsys.readouterr()
    assert train_here(workspace, small_disk / "new", "--method", "full", "--max-steps", "2") == 2
    errors = capsys.readouterr().err
    assert "No space left on the device" in errors and "Traceback" not in errors
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["earlier", "filler"]


@pytest.mark.slow
def test_compare_on_a_disk_that_fills_up_stops_cleanly_and_resumes(workspace, small_disk, tmp_path):
    grid = write_grid(workspace, tmp_path / "grid.yaml")
    experiment = small_disk / "exp"
    command = [sys.executable, "-m", "deltatune.cli", "compare", str(grid), "--out", str(experiment), "--no-report"]
    process = start(command)
    wait_until(
        lambda: store.store_path(experiment).is_file() and _finished(experiment) >= 1,
        timeout=300,
        what="the first cell to be recorded",
    )
    filler = fill(small_disk, leave=0)
    output, errors = process.communicate(timeout=300)
    if process.returncode == 0:
        pytest.skip("the second cell finished before the disk was filled")
    assert process.returncode == 2, errors
    assert "No space left on the device" in errors and "run the same command again to resume" in errors
    assert "Traceback" not in errors
    assert [c["status"] for c in store.load_cells(experiment)] == ["finished"]
    filler.unlink()
    resumed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(c["status"] for c in store.load_cells(experiment)) == ["finished", "finished"]


def _finished(experiment: Path) -> int:
    try:
        return len(store.load_cells(experiment, status="finished"))
    except (sqlite3.Error, DeltatuneError):
        return 0


def signal_state(pid: int) -> str:
    """A process's blocked, ignored and caught signal masks and where it sleeps in the kernel (for a failure message)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError as error:
        return f"pid {pid}: {error}"
    masks = [line.replace("\t", " ") for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt", "State"))]
    return f"pid {pid}: {', '.join(masks)}, wchan {wchan}"


def torch_is_loading(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("moment", ["importing torch", "training"])
def test_ctrl_c_at_start_up_or_in_training_is_one_line_and_leaves_nothing(workspace, tmp_path, moment):
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc to see when torch starts loading")
    out = tmp_path / "run"
    process = start(train_command(workspace, out, "--method", "full", "--max-steps", "100000"), interruptible=True)
    wait_until(lambda: torch_is_loading(process.pid), interval=0.01, what="torch to start loading")
    if moment == "training":
        wait_until(lambda: lock_is_held(tmp_path / ".run.lock"), what="the run to take its lock")
        time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    try:
        output, errors = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        state = signal_state(process.pid)
        process.send_signal(signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER) prints every thread's stack
        output, errors = process.communicate(timeout=60)
        pytest.fail(
            f"still running 120 s after SIGINT ({state}; this test's own {signal_state(os.getpid())}):\n{errors[-8000:]}"
        )
    assert process.returncode == 130, errors
    assert "interrupted; nothing half-written was kept" in errors and "Traceback" not in errors
    assert not out.exists() and leftovers(tmp_path, "run") == []


def _tiny_training():
    from test_training import trained

    trained(epochs=1)


def _tiny_evaluation():
    from conftest import build_tiny_model, build_tokenizer
    from deltatune.batching import encode, predict_encoded
    from test_training import SENTIMENT, sentiment_splits

    model, tokenizer = build_tiny_model("bert"), build_tokenizer()
    _, dev_split = sentiment_splits()
    predict_encoded(model, encode(tokenizer, SENTIMENT, dev_split, 64), SENTIMENT, tokenizer.pad_token_id, 8)


def _tiny_reader_prompt_training():
    from conftest import build_tokenizer
    from deltatune.reader.config import ReaderConfig
    from deltatune.reader.pipeline import FrozenReader, train_reader
    from test_reader import tiny_causal_lm, toy_dataset

    config = ReaderConfig(top_k=0, rerank=False, prompt_tokens=4, steps=40, batch_size=4, train_examples=12, quiet=True)
    train_reader(FrozenReader(tiny_causal_lm(), build_tokenizer(), config), toy_dataset(), None)


@pytest.mark.parametrize(
    "loop",
    [_tiny_training, _tiny_evaluation, _tiny_reader_prompt_training],
    ids=["training", "evaluation", "reader-prompt"],
)
def test_a_ctrl_c_swallowed_by_a_destructor_still_stops_the_loop(loop):
    """A SIGINT that lands in a `__del__` is printed as 'Exception ignored' and lost; the loop still stops."""
    from deltatune import interrupts

    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the KeyboardInterrupt is raised here, and swallowed

    reported = []
    previous, previous_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = reported.append
    try:
        interrupts.install()
        Collected()  # collected at once: its interrupt does not reach this test
        with pytest.raises(KeyboardInterrupt):
            loop()
        assert reported == []  # no "Exception ignored" report beside the one-line message
    finally:
        interrupts.clear()
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
