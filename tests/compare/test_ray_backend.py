"""The Ray backend on real (tiny) cells: the same store as the local backend, and kill -9 of its driver loses nothing.

One local Ray instance (2 CPUs, 127.0.0.1 only) serves the in-process tests; the kill -9 test's driver runs in
a subprocess and starts its own, which must die with it. Ray's start-up costs several seconds, so the grid is
two tiny cells and the tests share them.
"""

import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from compare_fakes import build_fake_experiment
from tiny_grid import finished_count, wait_until, write_grid_workspace

from deltatune.cli import main
from deltatune.compare import store
from deltatune.compare.ray_backend import run_grid_on_ray
from deltatune.compare.runner import run_grid
from deltatune.compare.spec import parse_spec, read_spec_file

GRID = """
    title: tiny grid
    models: [tiny-bert]
    tasks: [{name: toy, path: toy.csv, text_fields: [text]}]
    methods: [bitfit, {name: lora-r4, method: lora, config: {r: 4}}]
    fractions: [1.0]
    seeds: [0]
    train: {epochs: 2, batch_size: 16, learning_rate: 0.003, threads: 1, eval_every: 4}
"""

COMPARED = (
    "status",
    "kind",
    "variant",
    "method",
    "task",
    "primary_metric",
    "primary_value",
    "dev_value",
    "dev_metrics",
    "test_metrics",
    "evaluation_split",
    "steps",
    "best_step",
    "examples_seen",
    "stopped_by",
    "trainable_params",
    "total_params",
    "delta_bytes",
    "num_train_examples",
    "converged",
    "run_dir",
)
"""A cell's store columns that say what it computed (not when, how fast, or in which process)."""


def rows(exp_dir: Path) -> dict:
    curves = store.load_curves(exp_dir)
    return {
        cell["cell_id"]: (
            {name: cell[name] for name in COMPARED},
            [(point["step"], point["metrics"]) for point in curves.get(cell["cell_id"], [])],
        )
        for cell in store.load_cells(exp_dir)
    }


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


RUNS_CELLS = ("deltatune.compare.cell", "ray::deltatune-cell", "raylet", "gcs_server")
"""The processes that run cells or hand them out: none may outlive a killed driver by more than moments."""


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'deltatune[ray]')")
    from deltatune.compare.ray_backend import start_local_ray

    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_grid_workspace(tmp_path_factory.mktemp("ray-grid"), GRID)


@pytest.fixture(scope="module")
def local_reference(workspace):
    """The grid on the local backend: what the Ray backend must record too."""
    messages: list[str] = []
    summary = run_grid(
        parse_spec(read_spec_file(workspace / "grid.yaml")), workspace / "local", jobs=2, say=messages.append
    )
    assert summary.finished_now == 2 and summary.failed_now == 0, messages
    return workspace / "local"


# first in the module: the Ray instances the later tests start linger for a minute, and --address auto finds them
def test_address_auto_without_a_cluster_is_an_error_before_the_experiment_directory_exists(
    workspace, monkeypatch, capsys
):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'deltatune[ray]')")
    from ray._private.services import get_ray_address_from_environment

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        get_ray_address_from_environment("auto", None)
    except ConnectionError:
        pass
    else:
        pytest.skip("a Ray cluster is running on this machine, so --address auto finds one")
    experiment = workspace / "auto-nothing"
    assert (
        main(
            ["compare", str(workspace / "grid.yaml"), "--out", str(experiment), "--backend", "ray", "--address", "auto"]
        )
        == 2
    )
    assert "--address auto: no Ray cluster was started on this machine" in capsys.readouterr().err
    assert not experiment.exists()


def test_a_ray_grid_records_the_same_cells_and_rows_as_the_local_backend(workspace, local_ray, local_reference):
    experiment = workspace / "on-ray"
    messages: list[str] = []
    summary = run_grid_on_ray(
        parse_spec(read_spec_file(workspace / "grid.yaml")), experiment, jobs=2, say=messages.append
    )
    assert summary.finished_now == 2 and summary.failed_now == 0 and summary.left == 0, messages
    assert rows(experiment) == rows(local_reference)
    assert "submitted 2 cell(s) to Ray" in messages[1] and "1 CPU(s)" in messages[1]
    assert {node["NodeManagerAddress"] for node in local_ray.nodes()} == {"127.0.0.1"}  # nothing off this machine
    for cell in store.load_cells(experiment):
        directory = experiment / cell["run_dir"]
        assert sorted(path.name for path in directory.iterdir()) == sorted(
            path.name for path in (local_reference / cell["run_dir"]).iterdir()
        )
        assert (experiment / "cells" / f"{cell['cell_id']}.json").is_file()
        assert (experiment / "logs" / f"{cell['cell_id']}.log").is_file()
    assert not list((experiment / "cells").glob(".*staging*"))  # the tasks' scratch directories are gone
    assert store.load_meta(experiment)["machine"]["backend"] == "Ray"
    # everything recorded: running again submits nothing
    again = run_grid_on_ray(parse_spec(read_spec_file(workspace / "grid.yaml")), experiment, say=messages.append)
    assert again.finished_now == 0 and again.finished_before == 2 and again.left == 0


@pytest.mark.slow  # a second Ray instance starts in the killed driver, and Ray's agents take a minute to exit
def test_kill_9_of_the_driver_then_resume_neither_loses_nor_repeats_a_cell(workspace, local_ray, local_reference):
    experiment = workspace / "killed"
    command = [
        sys.executable,
        "-m",
        "deltatune.cli",
        "compare",
        str(workspace / "grid.yaml"),
        "--out",
        str(experiment),
        "--no-report",
        "--backend",
        "ray",
        "--jobs",
        "1",
    ]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: finished_count(experiment) >= 1, timeout=240, what="the first cell to be recorded")
        family = {pid: command_line(pid) for pid in descendants(driver.pid)}  # its Ray instance, workers, cell
        recorded_before_kill = finished_count(experiment)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    assert recorded_before_kill < 2
    running_cells = {pid for pid, command in family.items() if any(name in command for name in RUNS_CELLS)}
    assert any("raylet" in family[pid] for pid in running_cells)
    wait_until(
        lambda: not any(alive(pid) for pid in running_cells),
        timeout=30,
        what="the killed driver's Ray instance and cell to stop",
    )
    # Ray's agents exit on their own once their raylet is gone, after a timeout of about a minute
    wait_until(lambda: not any(alive(pid) for pid in family), timeout=180, what="Ray's agents to exit")

    messages: list[str] = []
    summary = run_grid_on_ray(
        parse_spec(read_spec_file(workspace / "grid.yaml")), experiment, jobs=2, say=messages.append
    )
    assert summary.finished_before + summary.recovered >= recorded_before_kill
    assert summary.finished_before + summary.recovered + summary.finished_now == 2 and summary.failed_now == 0
    assert rows(experiment) == rows(local_reference)
    with sqlite3.connect(store.store_path(experiment)) as connection:
        assert connection.execute("SELECT COUNT(*), COUNT(DISTINCT cell_id) FROM cells").fetchone() == (2, 2)
    assert not list((experiment / "cells").glob(".*staging*"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--backend", "slurm"], "--backend 'slurm'"),
        (["--address", "auto"], "only --backend ray uses"),
        (["--backend", "ray", "--address", "head-node"], "--address 'head-node' is not a Ray address"),
        (["--backend", "ray", "--address", "ray://head:99999"], "is not a Ray address"),
        (["--backend", "ray", "--address", "ray://127.0.0.1:{port}"], "nothing answers at 127.0.0.1:{port}"),
    ],
)
def test_a_bad_backend_or_address_is_one_clear_error_and_loses_nothing(workspace, tmp_path, capsys, flags, named):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'deltatune[ray]')")
    experiment = build_fake_experiment(tmp_path / "results")
    before = rows(experiment)
    port = str(free_port())
    flags = [flag.replace("{port}", port) for flag in flags]
    assert main(["compare", str(workspace / "grid.yaml"), "--out", str(experiment), *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("deltatune: error: ") and named.replace("{port}", port) in error
    assert len(error.splitlines()) == 1
    assert rows(experiment) == before


def test_without_ray_installed_the_ray_backend_names_the_extra(workspace, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when the extra is missing
    assert main(["compare", str(workspace / "grid.yaml"), "--out", str(workspace / "no-ray"), "--backend", "ray"]) == 2
    error = capsys.readouterr().err
    assert "pip install 'deltatune[ray]'" in error
    assert not (workspace / "no-ray").exists()


def test_the_ray_task_asks_for_the_cells_cpus_and_a_gpu_only_for_cuda():
    from deltatune.compare.ray_backend import _on_assigned_gpu, _resources

    assert _resources({"train": {"threads": 3}}, threads=1) == (3, 0)
    assert _resources({"train": {}}, threads=2) == (2, 0)
    assert _resources({"train": {"device": "cuda:1"}}, threads=2) == (2, 1)
    assert _resources({"train": {"device": "auto"}}, threads=2) == (2, 0)
    assert _on_assigned_gpu({"train": {"device": "cuda:1"}})["train"]["device"] == "cuda"
    assert _on_assigned_gpu({"train": {"device": "cpu"}}) == {"train": {"device": "cpu"}}


def test_a_result_travels_as_bytes_within_its_bound_and_lands_complete(tmp_path, monkeypatch):
    from deltatune.compare import ray_backend
    from deltatune.compare.cell import CELL_RESULT

    finished = tmp_path / "worker" / "cells" / "abc"
    (finished / "nested").mkdir(parents=True)
    (finished / "run.json").write_text('{"primary_metric": "accuracy"}')
    (finished / "nested" / "outputs.bin").write_bytes(bytes(range(256)))
    assert ray_backend._result_files(finished) is None  # no cell.json: the cell did not finish
    (finished / CELL_RESULT).write_text('{"cell_id": "abc"}')
    files = ray_backend._result_files(finished)
    assert sorted(files) == ["cell.json", "nested/outputs.bin", "run.json"]

    experiment = tmp_path / "experiment"
    (experiment / "cells").mkdir(parents=True)
    (experiment / "logs").mkdir()
    ray_backend._materialise(experiment, "abc", {"log": b"trained\n", "error": None, "files": files})
    landed = experiment / "cells" / "abc"
    assert (landed / "nested" / "outputs.bin").read_bytes() == bytes(range(256))
    assert (experiment / "logs" / "abc.log").read_bytes() == b"trained\n"
    assert not (experiment / "cells" / ".staging-abc").exists()

    with pytest.raises(ValueError, match="outside its result directory"):
        ray_backend._materialise(experiment, "def", {"log": b"", "error": None, "files": {"../escape": b"x"}})
    assert not (experiment / "escape").exists() and not (experiment / "cells" / "def").exists()

    monkeypatch.setattr(ray_backend, "MAX_RESULT_BYTES", 100)
    assert ray_backend._result_files(finished) == sum(
        path.stat().st_size for path in finished.rglob("*") if path.is_file()
    )
