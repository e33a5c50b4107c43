"""One cell of a grid, run in its own process: `python -m deltatune.compare.cell EXP_DIR CELL_ID PARENT_PID`.

Running each cell in a fresh process means a crash, an out-of-memory kill or a leak in one cell
costs that cell only, and every cell starts from the same clean state (threads, caches, RNGs).

The cell reads its settings from EXP_DIR/cells/CELL_ID.json (written by the runner), trains
into a staging directory, and renames it to EXP_DIR/cells/CELL_ID/ only when everything is in
it: so a directory under that name is always a complete result, and a killed cell leaves only a
staging directory that the next runner deletes. Recording into the store is the runner's job;
a result directory that exists but was never recorded (the runner died in between) is picked
up by the next run instead of being trained again.

If its runner dies (even by kill -9), the cell dies too: on Linux the kernel sends it SIGKILL
(PR_SET_PDEATHSIG, set by the runner), elsewhere a watchdog thread notices the new parent. An
orphan must not keep training while a resumed runner starts the same cell again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

CELL_RESULT = "cell.json"
"""Written last into a finished cell's directory: which cell it is and how long the process took."""
DISK_FULL_EXIT = 28
"""The cell's exit status when the disk filled up (ENOSPC's number): the runner stops the grid rather than
record the cell as failed, so a resume after freeing space runs it again. No report file is needed for it,
which matters because on a full disk there may be no room to write one."""


def cell_paths(exp_dir: Path, cell_id: str) -> dict[str, Path]:
    cells = exp_dir / "cells"
    return {
        "payload": cells / f"{cell_id}.json",
        "final": cells / cell_id,
        "staging": cells / f".staging-{cell_id}",
        "log": exp_dir / "logs" / f"{cell_id}.log",
        "error": exp_dir / "logs" / f"{cell_id}.error.json",
    }


def _watch_parent(parent_pid: int) -> None:
    """Exit when the runner is gone (its child gets re-parented), for systems without PR_SET_PDEATHSIG."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(137)
        time.sleep(1.0)


def run_cell(exp_dir: Path, cell_id: str) -> dict:
    """Train the cell (or score its no-training baseline) and leave its complete result directory in place;
    returns the run record."""
    from deltatune.compare.spec import train_config_for
    from deltatune.delta import write_json_atomic
    from deltatune.run import run_training
    from deltatune.run_directory import replace_directory

    started = time.perf_counter()
    paths = cell_paths(exp_dir, cell_id)
    payload = json.loads(paths["payload"].read_text(encoding="utf-8"))
    threads = int(os.environ.get("DELTATUNE_CELL_THREADS", "0")) or None
    shutil.rmtree(paths["staging"], ignore_errors=True)
    if payload.get("kind") == "baseline":
        record = run_baseline_cell(payload, paths["staging"], threads)
    else:
        config = train_config_for(payload, threads=threads, num_examples=_capped_examples(payload))
        # the learning-rate search says how each rung went in the cell's log
        trained = run_training(
            payload["model"],
            payload["data"],
            payload["method"],
            payload["method_overrides"],
            config,
            out=paths["staging"],
            say=lambda text: print(text, flush=True),
        )
        assert trained is not None  # a cell is one process, which writes and returns the record
        record = trained.to_json()  # the store keeps training and baseline records alike, as their JSON
    if not payload.get("keep_delta"):
        # the record keeps delta_bytes; the tensors themselves (90 MB per full fine-tuning cell) go
        (paths["staging"] / "delta.safetensors").unlink(missing_ok=True)
    write_json_atomic(
        paths["staging"] / CELL_RESULT,
        {
            "cell_id": cell_id,
            "identity": payload["identity"],
            "cell_time_s": time.perf_counter() - started,
            "pid": os.getpid(),
        },
    )
    replace_directory(paths["staging"], paths["final"])
    return record


def run_baseline_cell(payload: dict, staging: Path, threads: int | None) -> dict:
    """Score a no-training baseline on dev and test and write its record and per-example outputs into `staging`."""
    import torch

    from deltatune.baselines import run_baseline
    from deltatune.batching import stratified_subset
    from deltatune.delta import write_json_atomic
    from deltatune.run import DEV_OUTPUTS, RUN_RECORD, TEST_OUTPUTS, git_state, library_versions, save_outputs
    from deltatune.sources.records import load_data_from_record
    from deltatune.training import peak_memory_bytes

    if threads:
        torch.set_num_threads(threads)
    data = load_data_from_record(payload["data"])
    train = data.split("train")
    pool = None  # the grid's training pool: what a baseline may look at (the majority class, demonstrations)
    if payload.get("max_train_examples") and payload["max_train_examples"] < len(train):
        pool = stratified_subset(train.labels, payload["max_train_examples"], payload["seed"], data.task.is_regression)
    result = run_baseline(
        payload["method"],
        payload["model"],
        data,
        pool,
        seed=payload["seed"],
        max_length=payload["train"].get("max_length", 128),
    )
    metric = data.task.metric
    record = {
        "kind": "baseline",
        "baseline": payload["method"],
        "method": payload["method"],
        "model": payload["model"],
        "task": data.task.name,
        "data": payload["data"],
        "data_fingerprint": data.fingerprint(),
        "primary_metric": metric,
        "dev_metrics": result.metrics["dev"],
        "test_metrics": result.metrics.get("test"),
        "evaluation_split": "test" if "test" in result.metrics else "dev",
        "details": result.details,
        "learning_curve": [],
        "trainable_params": 0,
        "total_params": None,
        "trainable_percent": 0.0,
        "delta_bytes": None,
        "full_model_bytes": None,
        "train_time_s": 0.0,
        "eval_time_s": result.seconds,
        "wall_time_s": result.seconds,
        "train_examples_per_s": None,
        "num_train_examples": len(pool or train),
        "steps": 0,
        "best_step": 0,
        "stopped_by": None,
        "examples_seen": 0,
        "learning_rate": None,
        "converged": None,
        "peak_memory_bytes": peak_memory_bytes(),
        "versions": asdict(library_versions()),
        "git": asdict(git_state()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    staging.mkdir(parents=True)
    write_json_atomic(staging / RUN_RECORD, record)
    for split, name in (("dev", DEV_OUTPUTS), ("test", TEST_OUTPUTS)):
        if split in result.outputs:
            save_outputs(staging / name, result.outputs[split], result.labels[split])
    return record


def _capped_examples(payload: dict) -> int | None:
    """With max_train_examples, a fraction is of a fixed pool of that many examples, not of the whole split.

    The trainer's stratified subsets are nested for a given seed (each class is shuffled once and cut
    at the wanted count), so `fraction × pool` examples are drawn from the same pool for every fraction.
    """
    cap = payload.get("max_train_examples")
    if cap is None:
        return None
    from deltatune.sources.records import load_data_from_record

    available = len(load_data_from_record(payload["data"]).split("train"))
    if cap >= available:
        return None
    return max(1, round(payload["data_fraction"] * cap))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3:
        print("usage: python -m deltatune.compare.cell EXP_DIR CELL_ID PARENT_PID", file=sys.stderr)
        return 2
    exp_dir, cell_id, parent_pid = Path(argv[0]), argv[1], int(argv[2])
    if os.getppid() != parent_pid:  # the runner died before this process got going
        return 137
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    paths = cell_paths(exp_dir, cell_id)
    try:
        run_cell(exp_dir, cell_id)
    except BaseException as error:  # noqa: BLE001 - every failure is reported to the runner, then re-raised
        from deltatune.errors import DeltatuneError
        from deltatune.run_directory import is_disk_full

        if isinstance(error, KeyboardInterrupt):
            raise
        if is_disk_full(error):
            with contextlib.suppress(OSError):
                print(f"disk full: {error}", file=sys.stderr)
            return DISK_FULL_EXIT
        trace = traceback.format_exc()
        if isinstance(error, DeltatuneError):  # the user's to fix: the message says how
            message = str(error)
        else:  # a bug: where it happened matters
            message = f"{type(error).__name__}: {error}\n" + "".join(trace.strip().splitlines(True)[-9:-1])
        report = {"type": type(error).__name__, "message": message, "traceback": trace}
        temporary = paths["error"].with_suffix(".tmp")
        temporary.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(report, indent=2), encoding="utf-8")
        os.replace(temporary, paths["error"])
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
