"""The grid runner: every cell in its own process, each finished cell recorded once, resumable at any point.

What makes it safe to interrupt at any moment:
  * a cell's result directory appears only complete (the cell renames it into place last);
  * the runner records a finished cell (its row and learning curve) in one SQLite transaction,
    keyed by the cell id, so it is in the store completely or not at all, and never twice;
  * on start, the runner records complete result directories the store does not know yet (the
    previous runner died between a cell finishing and recording it), deletes half-written
    staging directories, and runs every cell of the spec that is neither finished nor failed;
  * cells die with their runner (see `deltatune.compare.cell`), so a resumed grid never races an
    orphan for the same cell;
  * Ctrl-C or SIGTERM stops the running cells and exits; they are not recorded (they did not
    finish) and run again on resume. A cell that fails on its own (an exception, a crash, the
    out-of-memory killer) is recorded as failed with its error, and the grid goes on;
  * a full disk (in a cell, or writing the store) stops the grid the same orderly way, with one
    error that says so: no cell is recorded as failed for it, so a resume after freeing space
    completes the grid.

A lock file keeps two runners off one experiment directory at the same time.

Cells run as processes on this machine (the local backend), or as Ray tasks on a local Ray instance or a
cluster (`--backend ray`, `deltatune.compare.ray_backend`, which hands `run_grid` its own `execute`); either
way this process alone writes the experiment directory and the store, so the guarantees above hold for both.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from deltatune.compare import store
from deltatune.compare.cell import CELL_RESULT, DISK_FULL_EXIT, cell_paths
from deltatune.compare.presets import estimate_cell_seconds
from deltatune.compare.spec import BaselineCell, Cell, GridSpec
from deltatune.errors import DeltatuneError
from deltatune.run_directory import free_space, is_disk_full, lock_or_holder, write_holder

LOCK_NAME = ".runner.lock"
STOP_GRACE_S = 10.0
"""How long stopped cells get to exit after SIGTERM before they are killed."""
HEARTBEAT_S = 60.0
"""With cells running and nothing finishing, say what is still running this often."""
POLL_S = 0.2

_LIBC = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        import ctypes

        _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the forked child before exec: the kernel SIGKILLs it when the runner dies, even by kill -9."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class GridRunSummary:
    total: int
    finished_before: int
    recovered: int
    finished_now: int = 0
    failed_now: int = 0
    failed_kept: int = 0
    left: int = 0
    interrupted: bool = False
    stale: list[str] = field(default_factory=list)
    """Descriptions of recorded cells that no longer belong to the spec."""
    reused: int = 0
    """Cells taken finished from other experiments (`reuse`), counted in `recovered`."""


@dataclass
class _Running:
    cell: Cell | BaselineCell
    process: subprocess.Popen
    started: float
    log: TextIO


def machine_description(jobs: int, threads: int | None) -> dict:
    """What a reader of the results needs to know about where they were measured."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    import torch

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jobs": jobs,
        "threads_per_cell": threads,
    }


def _lock(exp_dir: Path):
    """An exclusive lock on the experiment directory, released by the OS even if the runner is killed."""
    try:
        import fcntl  # noqa: F401  (what lock_or_holder uses)
    except ImportError:  # no flock (Windows): run without the guard
        return None
    try:
        handle = open(exp_dir / LOCK_NAME, "a+")
    except OSError as error:
        if is_disk_full(error):
            raise DeltatuneError(_disk_full_message(exp_dir, "taking the experiment's lock", None)) from None
        raise
    holder = lock_or_holder(handle)
    if holder is not None:
        raise DeltatuneError(
            f"Another `deltatune compare` ({holder}) is running on {exp_dir}. Wait for it to "
            "finish, or stop it (it can be resumed later) before starting another."
        )
    write_holder(handle)
    return handle


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def _log_tail(path: Path, lines: int = 12) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
        return "\n".join(text[-lines:])
    return ""


def _outcome(record: dict) -> str:
    """'test pearson 0.8512 (dev 0.8731), lr 0.001, not converged' for the runner's log."""
    primary = record["primary_metric"]
    text = f"dev {primary} {record['dev_metrics'][primary]:.4f}"
    if record.get("test_metrics"):
        text = f"test {primary} {record['test_metrics'][primary]:.4f} ({text})"
    if record.get("learning_rate"):
        text += f", lr {record['learning_rate']:g}"
    if record.get("converged") is False:
        text += f", NOT CONVERGED after {record['steps']} steps"
    return text


def _describe_payload(payload: dict) -> str:
    if payload.get("kind") == "baseline":
        return f"{payload.get('variant')} (no training) on {payload.get('task')} seed={payload.get('seed')}"
    budget = f" budget={payload['time_budget_s']:g}s" if payload.get("time_budget_s") is not None else ""
    return (
        f"{payload.get('variant')} on {payload.get('task')} fraction={payload.get('data_fraction'):g}"
        f"{budget} seed={payload.get('seed')}"
    )


def _record_result_directory(connection, payload: dict, final: Path) -> tuple[dict, str | None]:
    """Record a complete result directory; returns the run record and, if it cannot be compared, why.

    A cell whose primary dev metric is undefined (NaN, stored as null) is recorded as failed with the
    reason: averages and statistics over it would be meaningless.
    """
    record = json.loads((final / "run.json").read_text(encoding="utf-8"))
    cell_info = json.loads((final / CELL_RESULT).read_text(encoding="utf-8"))
    problem = _undefined_metric(record)
    if problem is not None:
        store.record_failed(connection, payload, problem, cell_info.get("cell_time_s"))
    else:
        store.record_finished(connection, payload, record, f"cells/{payload['cell_id']}", cell_info.get("cell_time_s"))
    return record, problem


def _undefined_metric(record: dict) -> str | None:
    primary = record.get("primary_metric")
    value = (record.get("dev_metrics") or {}).get(primary)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return None
    return (
        f"The cell trained, but its dev {primary} is undefined ({value}): the model gave the same output for "
        "every dev example, so it cannot be compared. Try another learning rate or more steps, then run again "
        "with --retry-failed."
    )


class _DiskFull(Exception):
    """Raised inside the runner when the disk is full; `what` says what was being written."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.summary: GridRunSummary | None = None
        """What the grid had done when it stopped, once the loop that ran its cells knows."""


@contextlib.contextmanager
def _disk_full_as(what: str):
    """Turn a full disk (OSError ENOSPC, sqlite's 'database or disk is full') into _DiskFull."""
    try:
        yield
    except (OSError, sqlite3.Error) as error:
        if is_disk_full(error):
            raise _DiskFull(what) from error
        raise


def _disk_full_message(exp_dir: Path, what: str, summary: GridRunSummary | None) -> str:
    done = (
        f" {summary.finished_now} cell(s) finished and were recorded in this run; the cells in flight were "
        "stopped and not recorded."
        if summary is not None
        else ""
    )
    return (
        f"No space left on the device holding {exp_dir}{free_space(exp_dir)} while {what}. The grid stopped."
        f"{done} The results store and every earlier result are intact. Free some space and run the same "
        "command again to resume."
    )


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so stopping is orderly (and restores the handlers)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> _StopRequest:
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
                self.previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def _handle(self, signal_number, frame) -> None:
        self.requested = signal.Signals(signal_number).name

    def __exit__(self, *exc_info) -> None:
        for signal_number, handler in self.previous.items():
            signal.signal(signal_number, handler)


def run_grid(
    spec: GridSpec,
    exp_dir: str | Path,
    jobs: int = 1,
    retry_failed: bool = False,
    say: Callable[[str], None] = print,
    command: str | None = None,
    threads: int | None = None,
    backend: str = "local",
    execute: Callable[..., None] | None = None,
    reuse: Sequence[str | Path] = (),
) -> GridRunSummary:
    """Run every cell of `spec` not yet finished in `exp_dir`; see the module docstring for the guarantees.

    `execute` runs the pending cells: by default up to `jobs` processes on this machine; `backend` names
    where, for the store's record (`deltatune.compare.ray_backend.run_grid_on_ray` passes Ray's). `reuse`
    names other experiment directories: a cell of this spec finished there (the same identity: the same
    settings, data and code path to its result) is copied here instead of run again.
    """
    if jobs < 1:
        raise DeltatuneError(f"--jobs {jobs} must be at least 1.")
    exp_dir = Path(exp_dir).resolve()
    sources = reuse_sources(reuse, exp_dir)
    if exp_dir.exists() and not exp_dir.is_dir():
        raise DeltatuneError(f"--out {exp_dir} is a file, not a directory. Give a directory for the experiment.")
    try:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "cells").mkdir(exist_ok=True)
        (exp_dir / "logs").mkdir(exist_ok=True)
    except OSError as error:
        if is_disk_full(error):
            raise DeltatuneError(_disk_full_message(exp_dir, "creating the experiment directory", None)) from None
        raise DeltatuneError(
            f"Cannot create the experiment directory {exp_dir}: {error.strerror or error}. Give an "
            "--out you can write to."
        ) from None
    lock = _lock(exp_dir)
    try:
        with _disk_full_as("opening the results store"), closing(store.connect(exp_dir)) as connection:
            return _run_locked(
                spec,
                exp_dir,
                connection,
                jobs,
                retry_failed,
                say,
                command,
                threads,
                backend,
                execute or _execute,
                sources,
            )
    except _DiskFull as full:
        raise DeltatuneError(_disk_full_message(exp_dir, full.what, full.summary)) from None
    finally:
        if lock is not None:
            lock.close()


def _run_locked(
    spec: GridSpec,
    exp_dir: Path,
    connection,
    jobs: int,
    retry_failed: bool,
    say: Callable[[str], None],
    command: str | None,
    threads: int | None,
    backend: str,
    execute: Callable[..., None],
    sources: Sequence[Path] = (),
) -> GridRunSummary:
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    every_cell = spec.every_cell
    current = {cell.cell_id: cell.payload() for cell in every_cell}
    recorded_settings = {
        row["cell_id"]: json.loads(row["settings"]) for row in connection.execute("SELECT cell_id, settings FROM cells")
    }
    stale = [_describe_payload(settings) for cell_id, settings in recorded_settings.items() if cell_id not in current]
    _record_spec(connection, spec, current, command, machine_description(jobs, threads), backend)

    # whatever a killed runner or cell left half-written goes; nothing can be running (we hold the lock)
    for leftover in (exp_dir / "cells").glob(".*staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)

    reused = _copy_reused(connection, every_cell, exp_dir, sources, retry_failed)
    recovered = _recover_finished(connection, every_cell, current, exp_dir)
    status = store.statuses(connection)
    finished_before = sum(status.get(c.cell_id) == "finished" for c in every_cell) - recovered
    failed_kept = 0 if retry_failed else sum(status.get(c.cell_id) == "failed" for c in every_cell)
    pending = [
        c
        for c in every_cell
        if status.get(c.cell_id) != "finished" and (retry_failed or status.get(c.cell_id) != "failed")
    ]
    summary = GridRunSummary(
        total=len(every_cell),
        finished_before=finished_before,
        recovered=recovered,
        failed_kept=failed_kept,
        left=len(pending),
        stale=stale,
        reused=sum(reused.values()),
    )

    untrained = f" (and {len(spec.baseline_cells)} without training)" if spec.baseline_cells else ""
    say(
        f"{spec.title}: {len(spec.cells)} cells in the grid{untrained}; {finished_before} finished earlier"
        + _taken_and_recovered(reused, recovered)
        + (f", {failed_kept} failed earlier (kept as failed; --retry-failed runs them again)" if failed_kept else "")
        + f"; {len(pending)} to run, "
        + (f"{jobs} at a time" if backend == "local" else f"on {backend}")
        + f", {threads} thread(s) each."
    )
    if stale:
        shown = "; ".join(stale[:8]) + (f"; and {len(stale) - 8} more" if len(stale) > 8 else "")
        say(
            f"{len(stale)} recorded cell(s) no longer belong to this spec (kept in the store, left out of "
            f"results and the report; `deltatune results --all-cells` shows them): {shown}"
        )
    if not pending:
        return summary
    execute(pending, current, exp_dir, connection, jobs, threads, say, summary)
    return summary


def _record_spec(connection, spec: GridSpec, current: dict[str, dict], command, machine: dict, backend: str) -> None:
    """Mark the spec's cells as current and store what the report needs to know about the grid and the machine."""
    with _disk_full_as("updating the results store"):
        store.mark_current(connection, current)
        store.set_meta(
            connection,
            spec=spec.raw,
            title=spec.title,
            description=spec.description,
            baseline=spec.baseline,
            statistics=vars(spec.statistics),
            methods=[m.name for m in spec.methods],
            method_kinds={m.name: m.method for m in spec.methods},
            baselines=list(spec.baselines),
            tasks=[t.name for t in spec.tasks],
            total_cells=len(spec.every_cell),
            command=command,
            machine={**machine, "backend": backend},
            updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )


def reuse_sources(reuse: Sequence[str | Path], exp_dir: Path | None) -> list[Path]:
    """The experiment directories to take finished cells from, checked before anything is written."""
    sources = []
    for given in reuse:
        source = Path(given).expanduser().resolve()
        if not store.store_path(source).is_file():
            raise DeltatuneError(
                f"--reuse {str(given)!r} is not an experiment directory ({store.STORE_NAME} is missing there). "
                "Give the --out of an earlier `deltatune compare`."
            )
        if source == exp_dir:
            raise DeltatuneError(
                f"--reuse {str(given)!r} is the experiment itself; its finished cells are resumed anyway. Leave it out."
            )
        sources.append(source)
    return sources


def reusable_from(sources: Sequence[Path], cell_id: str) -> Path | None:
    """The first of `sources` holding cell `cell_id` finished (its whole result directory), or None."""
    return next((source for source in sources if (cell_paths(source, cell_id)["final"] / CELL_RESULT).is_file()), None)


def _taken_and_recovered(reused: dict[str, int], recovered: int) -> str:
    """The start line's account of cells recorded without running: copied by --reuse, or found unrecorded."""
    taken = sum(reused.values())
    text = f", {taken} taken finished from " + ", ".join(f"{s} ({n})" for s, n in reused.items()) if taken else ""
    if recovered > taken:
        text += f", {recovered - taken} finished but unrecorded (now recorded)"
    return text


def _copy_reused(
    connection, every_cell: Sequence, exp_dir: Path, sources: Sequence[Path], retry_failed: bool
) -> dict[str, int]:
    """Copy each cell's result directory (and log) from the first source that holds it finished, for
    `_recover_finished` to record; returns how many came from each source, and adds them to the store's count.
    A cell finished here is left alone, and so is one failed here unless `retry_failed`. The copy lands under its
    final name only once whole."""
    status = store.statuses(connection)
    copied: dict[str, int] = {}
    for cell in every_cell:
        if status.get(cell.cell_id) == "finished" or (status.get(cell.cell_id) == "failed" and not retry_failed):
            continue
        paths = cell_paths(exp_dir, cell.cell_id)
        if (paths["final"] / CELL_RESULT).is_file():
            continue  # finished here but unrecorded: `_recover_finished` records it
        source = reusable_from(sources, cell.cell_id)
        if source is None:
            continue
        theirs = cell_paths(source, cell.cell_id)
        with _disk_full_as("copying a finished cell from --reuse"):
            shutil.rmtree(paths["staging"], ignore_errors=True)
            shutil.copytree(theirs["final"], paths["staging"])
            if theirs["log"].is_file():
                shutil.copy2(theirs["log"], paths["log"])
            if paths["final"].exists():  # an incomplete result directory: replaced by the finished one
                shutil.rmtree(paths["final"])
            paths["staging"].rename(paths["final"])
        copied[str(source)] = copied.get(str(source), 0) + 1
    if copied:
        earlier = store.get_meta(connection).get("reused") or {}
        for where, count in copied.items():
            earlier[where] = earlier.get(where, 0) + count
        with _disk_full_as("updating the results store"):
            store.set_meta(connection, reused=earlier)
    return copied


def _recover_finished(connection, every_cell: Sequence, current: dict[str, dict], exp_dir: Path) -> int:
    """Record the cells whose result directory is complete but which the store does not hold as finished (a
    runner killed between the two); returns how many. An unreadable directory goes, so its cell runs again."""
    status = store.statuses(connection)
    recovered = 0
    for cell in every_cell:
        final = cell_paths(exp_dir, cell.cell_id)["final"]
        if status.get(cell.cell_id) != "finished" and (final / CELL_RESULT).is_file():
            try:
                with _disk_full_as("recording a finished cell"):
                    _, problem = _record_result_directory(connection, current[cell.cell_id], final)
                recovered += problem is None
            except (OSError, ValueError, KeyError):
                shutil.rmtree(final, ignore_errors=True)  # unreadable: run it again
    return recovered


class _GridProgress:
    """What every backend shares while cells run: the status line with its ETA, and recording a cell that ended.

    A backend runs the cell its own way but leaves it where a local cell process would have: its result
    directory renamed into place, its log and error report under logs/. `conclude` then records it exactly once.
    """

    def __init__(
        self,
        pending: list[Cell | BaselineCell],
        current: dict[str, dict],
        exp_dir: Path,
        connection,
        parallel: int,
        say: Callable[[str], None],
        summary: GridRunSummary,
    ) -> None:
        self.current, self.exp_dir, self.connection = current, exp_dir, connection
        self.parallel, self.say, self.summary = parallel, say, summary
        self.expected = {cell.cell_id: estimate_cell_seconds(cell) for cell in pending}
        self.durations: list[float] = []
        self.done_estimates: list[float] = []

    def status_line(self, activity: str, running: dict[str, float], waiting: list[Cell | BaselineCell]) -> str:
        """'[3/9 done · 2 running · 4 waiting · ETA 5 min 10 s]'; `running` maps a cell id to when it started."""
        # ETA: each cell's rough cost estimate, scaled by how the finished cells compared with theirs
        eta = None
        if self.durations:
            scale = sum(self.durations) / max(1e-9, sum(self.done_estimates))
            # a running cell past its estimate is assumed to need another tenth of it, not nothing
            remaining = sum(self.expected[c.cell_id] for c in waiting) + sum(
                max(0.1 * self.expected[cell_id], self.expected[cell_id] - (time.monotonic() - started) / scale)
                for cell_id, started in running.items()
            )
            eta = scale * remaining / self.parallel
        summary = self.summary
        failed = summary.failed_now + summary.failed_kept
        return (
            f"[{summary.finished_before + summary.recovered + summary.finished_now}/{summary.total} done"
            + (f" · {failed} failed" if failed else "")
            + f" · {activity} · ETA {_format_duration(eta)}]"
        )

    def conclude(
        self, cell: Cell | BaselineCell, code: int, elapsed: float, status: Callable[[], str], where: str = ""
    ) -> None:
        """Record a cell whose process ended with `code` after `elapsed` seconds (`where` names a remote machine)."""
        payload = self.current[cell.cell_id]
        paths = cell_paths(self.exp_dir, cell.cell_id)
        if code == 0 and (paths["final"] / CELL_RESULT).is_file():
            with _disk_full_as("recording a finished cell"):
                record, problem = _record_result_directory(self.connection, payload, paths["final"])
            if problem is not None:
                self.summary.failed_now += 1
                self.say(f"{status()} FAILED {cell.describe()}: {problem}")
                return
            self.summary.finished_now += 1
            self.durations.append(elapsed)
            self.done_estimates.append(self.expected[cell.cell_id])
            self.say(
                f"{status()} finished {cell.describe()}: {_outcome(record)} in {_format_duration(elapsed)}" + where
            )
            return
        if code == DISK_FULL_EXIT:  # not the cell's fault: not recorded, it runs again on resume
            raise _DiskFull(f"cell {cell.describe()} was writing its result")
        error = None
        with contextlib.suppress(OSError, ValueError):
            error = json.loads(paths["error"].read_text(encoding="utf-8"))["message"]
        if error is None:
            error = f"The cell process {_describe_exit(code)}{where}."
            tail = _log_tail(paths["log"])
            if tail:
                error += f" Last lines of {paths['log']}:\n{tail}"
        with _disk_full_as("recording a failed cell"):
            store.record_failed(self.connection, payload, error, elapsed)
        self.summary.failed_now += 1  # (a failure says nothing about how long the others take: not in the ETA)
        first_line = error.strip().splitlines()[0] if error.strip() else error
        self.say(f"{status()} FAILED {cell.describe()}: {first_line} (log: {paths['log']})")


def write_cell_payload(exp_dir: Path, cell_id: str, payload: dict) -> None:
    """The cell's settings where its process reads them (replaced in one rename), and no stale error report."""
    paths = cell_paths(exp_dir, cell_id)
    temporary = paths["payload"].with_suffix(".tmp")
    try:
        temporary.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        os.replace(temporary, paths["payload"])
    finally:
        temporary.unlink(missing_ok=True)
    paths["error"].unlink(missing_ok=True)


def cell_process_arguments(exp_dir: Path, cell_id: str, threads: int) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one cell's process (see `deltatune.compare.cell`)."""
    environment = {
        **os.environ,
        "DELTATUNE_CELL_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
    }
    return [sys.executable, "-m", "deltatune.compare.cell", str(exp_dir), cell_id, str(os.getpid())], environment


def _execute(
    pending: list[Cell | BaselineCell],
    current: dict[str, dict],
    exp_dir: Path,
    connection,
    jobs: int,
    threads: int,
    say: Callable[[str], None],
    summary: GridRunSummary,
) -> None:
    """The local backend: up to `jobs` cell processes at a time on this machine."""
    queue = collections.deque(pending)
    running: dict[str, _Running] = {}
    progress = _GridProgress(pending, current, exp_dir, connection, jobs, say, summary)
    last_event = time.monotonic()

    def status_line() -> str:
        return progress.status_line(
            f"{len(running)} running · {len(queue)} waiting",
            {cell_id: item.started for cell_id, item in running.items()},
            list(queue),
        )

    def start(cell: Cell | BaselineCell) -> None:
        paths = cell_paths(exp_dir, cell.cell_id)
        with _disk_full_as("writing a cell's settings"):
            write_cell_payload(exp_dir, cell.cell_id, current[cell.cell_id])
            log = open(paths["log"], "w", encoding="utf-8")
        arguments, environment = cell_process_arguments(exp_dir, cell.cell_id, threads)
        process = subprocess.Popen(
            arguments,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,  # Ctrl-C reaches the runner only, which then stops the cells in order
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
        running[cell.cell_id] = _Running(cell, process, time.monotonic(), log)
        say(f"{status_line()} started {cell.describe()} [{cell.cell_id}]")

    with _StopRequest() as stop:
        try:
            while (queue or running) and stop.requested is None:
                while queue and len(running) < jobs and stop.requested is None:
                    start(queue.popleft())
                time.sleep(POLL_S)
                for cell_id, item in list(running.items()):
                    code = item.process.poll()
                    if code is not None and stop.requested is None:
                        del running[cell_id]
                        item.log.close()
                        progress.conclude(item.cell, code, time.monotonic() - item.started, status_line)
                        last_event = time.monotonic()
                if running and time.monotonic() - last_event > HEARTBEAT_S:
                    still = ", ".join(
                        f"{item.cell.describe()} ({_format_duration(time.monotonic() - item.started)})"
                        for item in running.values()
                    )
                    say(f"{status_line()} still running: {still}")
                    last_event = time.monotonic()
        except _DiskFull as full:
            with contextlib.suppress(_DiskFull, OSError, sqlite3.Error):  # stopping must not fail on the full disk
                _stop_running(running, exp_dir, connection, current, summary, say, "a full disk")
            summary.interrupted = True
            full.summary = summary
            raise
        if stop.requested is not None:
            _stop_running(running, exp_dir, connection, current, summary, say, stop.requested)
    summary.left = len(queue) + len(running) if summary.interrupted else len(queue)


def _stop_running(
    running: dict[str, _Running],
    exp_dir: Path,
    connection,
    current: dict[str, dict],
    summary: GridRunSummary,
    say: Callable[[str], None],
    reason: str,
) -> None:
    """Stop the cells in flight (they are not recorded and run again on resume), keeping any that just finished."""
    summary.interrupted = True
    for item in running.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(item.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for item in running.values():
        try:
            item.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(item.process.pid, signal.SIGKILL)
            item.process.wait()
        item.log.close()
    for cell_id in list(running):
        final = cell_paths(exp_dir, cell_id)["final"]
        if running[cell_id].process.returncode == 0 and (final / CELL_RESULT).is_file():
            with _disk_full_as("recording a finished cell"):
                _, problem = _record_result_directory(connection, current[cell_id], final)
            if problem is None:
                summary.finished_now += 1
            else:
                summary.failed_now += 1
            del running[cell_id]
    for leftover in (exp_dir / "cells").glob(".*staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    say(stopped_message(reason, summary, len(running)))


def stopped_message(reason: str, summary: GridRunSummary, stopped: int) -> str:
    return (
        f"Stopped by {reason}: {summary.finished_now} cell(s) finished and recorded in this run; {stopped} "
        "cell(s) in flight were stopped and not recorded. Run the same command again to resume."
    )


__all__ = ["run_grid", "GridRunSummary", "machine_description"]
