"""Grid cells as Ray tasks: `deltatune compare SPEC --backend ray [--address auto|ray://HOST:PORT|HOST:PORT]`.

Where things run:
  * the driver (the `deltatune compare` process) expands the spec, holds the experiment's lock, and alone
    writes the experiment directory and its SQLite store, as with the local backend. No file is shared
    between machines: results travel through Ray;
  * each pending cell is one Ray task that asks for the cell's CPUs (its thread count) and, when the cell's
    device is a CUDA GPU, one GPU. Ray decides where and when each runs. The task runs the cell as the local
    backend does, in its own `python -m deltatune.compare.cell` process (a crash costs that cell only), inside
    a scratch experiment directory on the worker's machine, and returns what the cell left there: its result
    directory's files, its log and its error report, as bytes;
  * the driver writes those files where a local cell process would have written them (the result directory
    through a staging directory renamed into place), then records the cell in one transaction. So the local
    backend's guarantees hold unchanged: a cell is recorded once or not at all, and after kill -9 of the driver
    at any moment the same command resumes, neither losing nor repeating a cell.

Without an address the driver starts a private Ray instance on this machine (bound to 127.0.0.1, no dashboard,
no usage reporting, `jobs × threads` logical CPUs, so --jobs still bounds how many cells run at once) and stops it
at the end; Ray stops it too if the driver is killed. With an address the driver joins that cluster and leaves it
running; its machines need deltatune installed and the grid's models and data reachable under the same aliases
and paths. Ray's own retries are off (`max_retries=0`): a cell whose worker or machine is lost is recorded as
failed with Ray's error, and `--retry-failed` runs it again, as with the local backend.

The transfer is bounded: a result travels through Ray's object store only up to MAX_RESULT_BYTES (a cell keeps
run.json and its per-example outputs, kilobytes to a few megabytes; with keep_deltas also its delta, 90 MB for
full fine-tuning of MiniLM-L6); a larger one is recorded as failed with a message that says so. A log returns its
last MAX_LOG_BYTES.

Scratch directories live under the experiment's cells/ when the worker's machine sees that directory (a local
instance, or a shared file system), where the next run deletes what a killed task left behind, and otherwise
in the worker's temporary directory, which a task removes when it ends or is cancelled (a worker killed outright
can leave one behind there).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from deltatune.compare.cell import CELL_RESULT, cell_paths
from deltatune.compare.runner import (
    HEARTBEAT_S,
    POLL_S,
    STOP_GRACE_S,
    GridRunSummary,
    _disk_full_as,
    _DiskFull,
    _GridProgress,
    _StopRequest,
    cell_process_arguments,
    run_grid,
    stopped_message,
    write_cell_payload,
)
from deltatune.compare.spec import BaselineCell, Cell, GridSpec
from deltatune.errors import DeltatuneError
from deltatune.run_directory import is_disk_full, replace_directory

MAX_RESULT_BYTES = 1 << 30
"""The most a cell's result directory may hold to travel back to the driver (1 GiB)."""
MAX_LOG_BYTES = 1 << 20
"""How much of the end of a cell's log travels back to the driver (1 MiB)."""
LOCAL_OBJECT_STORE_BYTES = 2 * MAX_RESULT_BYTES
"""The object store of a local Ray instance: results pass through it one at a time; Ray spills beyond it."""
WAIT_S = 0.5
"""How long the driver waits for a task to end before it looks at Ctrl-C and the heartbeat again."""
PROBE_TIMEOUT_S = 5.0
"""How long the driver tries to open a TCP connection to HOST:PORT before saying the address is unreachable."""

_SINGLE_MACHINE_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""A local instance: servers on 127.0.0.1 only, and no usage report sent to Ray's makers."""
_ADDRESS = re.compile(r"^(?:ray://)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})$")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise DeltatuneError(
            "--backend ray needs Ray, which is not installed. Install the extra: "
            "pip install 'deltatune[ray]' (or leave --backend out to run the cells on this "
            "machine)."
        ) from None
    return ray


def check_ray_backend(address: str | None) -> None:
    """Before anything runs: Ray is installed, and the address is one Ray understands and answers on."""
    _import_ray()
    if address is None:
        return
    if address == "auto":
        _check_auto_address()
        return
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise DeltatuneError(
            f"--address {address!r} is not a Ray address. Give auto (the cluster this machine "
            "joined with `ray start`), ray://HOST:PORT (a cluster's Ray Client server, port 10001 "
            "by default) or HOST:PORT (its head node, from a machine of the cluster); or leave "
            "--address out to run on a Ray instance of this machine's own."
        )
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DeltatuneError(
            f"--address {address!r}: nothing answers at {host}:{port} ({reason}). Check that "
            "the Ray cluster is up (`ray status` on its head node) and that the host and port are "
            "right, or leave --address out to run on a Ray instance of this machine's own."
        ) from None


def _check_auto_address() -> None:
    """`--address auto` joins the cluster `ray start` left on this machine (or RAY_ADDRESS): say so early if none.

    Ray finds that cluster with a private helper; a Ray without it leaves the check to `ray.init`, which
    reports the same thing later (after the experiment directory exists, losing nothing).
    """
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        return
    try:
        get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise DeltatuneError(
            "--address auto: no Ray cluster was started on this machine (`ray start --head`) and "
            "RAY_ADDRESS is not set. Start one, give its address as ray://HOST:PORT, or leave "
            "--address out to run on a Ray instance of this machine's own."
        ) from None


def start_local_ray(num_cpus: int, object_store_bytes: int = LOCAL_OBJECT_STORE_BYTES) -> None:
    """A private Ray instance on this machine only: every server on 127.0.0.1, no dashboard, no usage statistics.

    Ray turns a node address of 127.0.0.1 into the machine's network address (and its servers listen there)
    unless told the instance is a single machine's, its default on macOS and Windows; that switch is read
    from the environment when Ray is imported, so it is set in both places, for the start-up only (the
    instance's processes inherit it).
    """
    ray = _import_ray()
    from ray._private import ray_constants

    saved_environment = {name: os.environ.get(name) for name in _SINGLE_MACHINE_ENVIRONMENT}
    saved_switch = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(_SINGLE_MACHINE_ENVIRONMENT)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=object_store_bytes,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_switch
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _connect(ray, address: str | None, num_cpus: int) -> bool:
    """Start or join Ray; returns whether this call did (and so must shut it down at the end).

    A caller that initialised Ray itself (a notebook, a test) keeps its instance, whatever the address.
    """
    if ray.is_initialized():
        return False
    if address is None:
        try:
            start_local_ray(num_cpus)
        except Exception as error:  # noqa: BLE001 - Ray's start-up failures have no common type
            raise DeltatuneError(
                f"Ray could not start on this machine ({_first_line(error)}). Its logs are under "
                "/tmp/ray/session_latest/logs; or leave --backend out to run the cells as local "
                "processes."
            ) from None
        return True
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # a cluster's own setting decides; this driver sends nothing
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as error:  # noqa: BLE001 - Ray's errors for a missing cluster vary (ConnectionError, grpc's, ...)
        raise DeltatuneError(
            f"--address {address!r}: cannot join a Ray cluster there ({_first_line(error)}). Start "
            "one with `ray start --head` and give its address, or leave --address out to run on a "
            "Ray instance of this machine's own."
        ) from None
    return True


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _device(payload: dict) -> str | None:
    return (payload.get("train") or {}).get("device") or payload.get("device")


def _resources(payload: dict, threads: int) -> tuple[int, int]:
    """What a cell asks Ray for: its thread count in CPUs, and a GPU when its device is CUDA ('auto' asks for none)."""
    cpus = int((payload.get("train") or {}).get("threads") or threads)
    device = _device(payload)
    return cpus, int(isinstance(device, str) and device.startswith("cuda"))


def _on_assigned_gpu(payload: dict) -> dict:
    """Ray shows a task only the GPU it assigned (as cuda:0), so a cell's 'cuda:N' becomes 'cuda' on the worker."""
    device = _device(payload)
    if not (isinstance(device, str) and device.startswith("cuda:")):
        return payload
    if "device" in (payload.get("train") or {}):
        return {**payload, "train": {**payload["train"], "device": "cuda"}}
    return {**payload, "device": "cuda"}


def _result_files(final: Path) -> dict[str, bytes] | int | None:
    """A finished cell's files by relative path; None when it did not finish; its size when over MAX_RESULT_BYTES."""
    if not (final / CELL_RESULT).is_file():
        return None
    files = [path for path in sorted(final.rglob("*")) if path.is_file()]
    size = sum(path.stat().st_size for path in files)
    if size > MAX_RESULT_BYTES:
        return size
    return {path.relative_to(final).as_posix(): path.read_bytes() for path in files}


def _log_end(path: Path) -> bytes:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - MAX_LOG_BYTES))
        return handle.read()
    return b""


def run_cell_task(payload: dict, cpus: int, exp_dir: str) -> dict:
    """The Ray task: run one cell in its own process in a scratch experiment directory; return what it left there.

    Returns the process's exit code, its wall time, the machine's name, the end of its log, its error report
    (JSON bytes or None), and `files`: the result directory's files, or None when the cell did not finish.
    A cancelled task (KeyboardInterrupt from `ray.cancel`) stops its cell process before it ends.
    """
    cell_id = payload["cell_id"]
    cells = Path(exp_dir) / "cells"
    scratch = Path(tempfile.mkdtemp(prefix=f".ray-staging-{cell_id}-", dir=cells if cells.is_dir() else None))
    started = time.monotonic()
    try:
        (scratch / "cells").mkdir()
        (scratch / "logs").mkdir()
        write_cell_payload(scratch, cell_id, _on_assigned_gpu(payload))
        paths = cell_paths(scratch, cell_id)
        arguments, environment = cell_process_arguments(scratch, cell_id, cpus)
        with open(paths["log"], "wb") as log:
            # a session of its own: a Ctrl-C meant for the driver reaches the cell only through the driver
            process = subprocess.Popen(
                arguments,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                start_new_session=True,
            )
            try:
                # polled, not waited on: Ray's cancel raises KeyboardInterrupt between bytecodes, not inside waitpid
                while (code := process.poll()) is None:
                    time.sleep(POLL_S)
            except BaseException:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        files = _result_files(paths["final"])
        error = paths["error"].read_bytes() if paths["error"].is_file() else None
        if isinstance(files, int):
            code, error = (
                1,
                json.dumps(
                    {
                        "message": (
                            f"The cell finished, but its result directory holds {files / 2**20:.0f} MiB, over the "
                            f"{MAX_RESULT_BYTES / 2**20:.0f} MiB that may travel back from a Ray worker. Set keep_deltas: false "
                            "in the spec (the delta's size stays in the record), or run this grid with --backend local."
                        )
                    }
                ).encode(),
            )
            files = None
        return {
            "code": code,
            "seconds": time.monotonic() - started,
            "node": platform.node(),
            "log": _log_end(paths["log"]),
            "error": error,
            "files": files,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _materialise(exp_dir: Path, cell_id: str, result: dict) -> None:
    """Put what a task returned where a local cell process would have left it (result directory last, by rename)."""
    paths = cell_paths(exp_dir, cell_id)
    paths["log"].write_bytes(result["log"])
    if result["error"] is not None:
        _write_atomic(paths["error"], result["error"])
    if result["files"] is None:
        return
    staging = paths["staging"]
    shutil.rmtree(staging, ignore_errors=True)
    for name, data in result["files"].items():
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"a Ray task returned the file {name!r}, outside its result directory")
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        (staging / relative).write_bytes(data)
    replace_directory(staging, paths["final"])


def _conclude(
    ray,
    reference,
    cell: Cell | BaselineCell,
    submitted: float,
    exp_dir: Path,
    progress: _GridProgress,
    status: Callable[[], str],
) -> None:
    """Bring an ended task's cell into the experiment directory and record it once."""
    try:
        result = ray.get(reference)
    except ray.exceptions.RayError as error:
        cause = getattr(error, "cause", None)
        if cause is not None and is_disk_full(cause):  # the worker's disk: stop the grid, record nothing
            raise _DiskFull(f"cell {cell.describe()} was writing its result on a Ray worker") from error
        message = f"Ray could not run the cell: {type(error).__name__}: {_first_line(error)}"
        with _disk_full_as("writing a cell's error report"):
            _write_atomic(cell_paths(exp_dir, cell.cell_id)["error"], json.dumps({"message": message}).encode())
        progress.conclude(cell, 1, time.monotonic() - submitted, status)
        return
    with _disk_full_as("writing a cell's result"):
        _materialise(exp_dir, cell.cell_id, result)
    progress.conclude(cell, result["code"], result["seconds"], status, where=f" on {result['node']}")


def run_grid_on_ray(spec: GridSpec, exp_dir: str | Path, address: str | None = None, **options) -> GridRunSummary:
    """`run_grid` with every pending cell a Ray task, on a local instance or the cluster at `address`.

    `options` are run_grid's (jobs, retry_failed, say, command, threads). Ray missing or a bad address is a
    DeltatuneError before anything is written.
    """
    check_ray_backend(address)
    return run_grid(
        spec,
        exp_dir,
        backend="Ray" if address is None else f"Ray at {address}",
        execute=functools.partial(execute_on_ray, address=address),
        **options,
    )


def execute_on_ray(
    pending: list[Cell | BaselineCell],
    current: dict[str, dict],
    exp_dir: Path,
    connection,
    jobs: int,
    threads: int,
    say: Callable[[str], None],
    summary: GridRunSummary,
    address: str | None = None,
) -> None:
    """Run the pending cells as Ray tasks and record each as it ends; see the module docstring."""
    ray = _import_ray()
    requests = {cell.cell_id: _resources(current[cell.cell_id], threads) for cell in pending}
    widest = max(cpus for cpus, _ in requests.values())
    started_here = _connect(ray, address, jobs * widest)  # a local instance runs `jobs` cells at a time
    try:
        parallel = max(1, int(ray.cluster_resources().get("CPU", widest) // widest))
        progress = _GridProgress(pending, current, exp_dir, connection, parallel, say, summary)
        _run_tasks(ray, pending, current, exp_dir, requests, progress, address)
    finally:
        if started_here:
            ray.shutdown()


def _run_tasks(
    ray,
    pending: list[Cell | BaselineCell],
    current: dict[str, dict],
    exp_dir: Path,
    requests: dict[str, tuple[int, int]],
    progress: _GridProgress,
    address: str | None,
) -> None:
    task = ray.remote(run_cell_task)
    in_flight: dict = {}  # ObjectRef -> (cell, when it was submitted)
    summary, say = progress.summary, progress.say

    def status() -> str:
        return progress.status_line(f"{len(in_flight)} in flight on Ray", {}, [cell for cell, _ in in_flight.values()])

    with _disk_full_as("writing a cell's settings"):
        for cell in pending:  # the driver keeps each cell's settings beside its results, as the local backend does
            write_cell_payload(exp_dir, cell.cell_id, current[cell.cell_id])
    for cell in pending:
        cpus, gpus = requests[cell.cell_id]
        reference = task.options(
            num_cpus=cpus, num_gpus=gpus, max_retries=0, name=f"deltatune-cell-{cell.cell_id}"
        ).remote(current[cell.cell_id], cpus, str(exp_dir))
        in_flight[reference] = (cell, time.monotonic())
    asks = sorted({f"{cpus} CPU(s)" + (f" and {gpus} GPU" if gpus else "") for cpus, gpus in requests.values()})
    say(
        f"{status()} submitted {len(pending)} cell(s) to Ray ({address or 'a local instance'}), each asking for "
        f"{' or '.join(asks)}"
    )
    last_event = time.monotonic()
    with _StopRequest() as stop:
        try:
            while in_flight and stop.requested is None:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
                for reference in ready if stop.requested is None else ():
                    cell, submitted = in_flight.pop(reference)
                    _conclude(ray, reference, cell, submitted, exp_dir, progress, status)
                    last_event = time.monotonic()
                if in_flight and time.monotonic() - last_event > HEARTBEAT_S:
                    say(f"{status()} still waiting for {len(in_flight)} cell(s)")
                    last_event = time.monotonic()
        except _DiskFull as full:
            with contextlib.suppress(_DiskFull, OSError, ray.exceptions.RayError):
                _cancel(ray, in_flight, exp_dir, progress, status)
            summary.interrupted = True
            full.summary = summary
            raise
        if stop.requested is not None:
            summary.interrupted = True
            _cancel(ray, in_flight, exp_dir, progress, status)
            say(stopped_message(stop.requested, summary, len(in_flight)))
    summary.left = len(in_flight)


def _cancel(ray, in_flight: dict, exp_dir: Path, progress: _GridProgress, status: Callable[[], str]) -> None:
    """Cancel every task in flight (each stops its cell), keeping and recording any cell that finished meanwhile."""
    for reference in in_flight:
        ray.cancel(reference)  # a KeyboardInterrupt in the task, which stops its cell process
    ended, stuck = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=STOP_GRACE_S)
    for reference in stuck:
        ray.cancel(reference, force=True)  # kills the worker; the orphaned cell sees its parent gone and exits
    for reference in ended:
        try:
            result = ray.get(reference)
        except ray.exceptions.RayError:  # cancelled: not recorded, it runs again on resume
            continue
        if result["code"] == 0 and result["files"] is not None:
            cell, _ = in_flight.pop(reference)
            _materialise(exp_dir, cell.cell_id, result)
            progress.conclude(cell, 0, result["seconds"], status, where=f" on {result['node']}")


__all__ = [
    "run_grid_on_ray",
    "check_ray_backend",
    "execute_on_ray",
    "run_cell_task",
    "start_local_ray",
    "MAX_RESULT_BYTES",
]
