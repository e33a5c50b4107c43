"""Training scalars to TensorBoard and MLflow, as a hook of the training loop (`--report-to`).

The loop (`deltatune.training.Trainer`) hands every scalar it has to `ScalarLoggers.log`: per optimizer
step the loss, the learning rate and examples/s; per dev evaluation the dev metrics; at the end the test
metrics of the kept state. Each logger writes to a local store under the log directory and nothing else:

    LOG_DIR/tensorboard/RUN/   events written by torch's `SummaryWriter` (`tensorboard --logdir LOG_DIR/tensorboard`)
    LOG_DIR/mlruns/            an MLflow file store (`mlflow ui --backend-store-uri LOG_DIR/mlruns`), experiment
                               "deltatune", one MLflow run per training run, named RUN

Both packages are the optional extra `logging`. A logger only reads what the loop hands it: it draws no
random numbers and touches no tensor, so a run trains identically with and without one.
"""

from __future__ import annotations

import importlib.util
import os
import time
import typing
from pathlib import Path
from typing import Literal

from deltatune.errors import DeltatuneError

Logger = Literal["tensorboard", "mlflow"]
LOGGERS = typing.get_args(Logger)
"""The loggers `--report-to` accepts."""

DEFAULT_LOG_DIR = "runs/logs"

MLFLOW_EXPERIMENT = "deltatune"

_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
"""Logger -> the module it needs (both come with `pip install 'deltatune[logging]'`)."""


def missing_logger_packages(report_to: tuple[str, ...]) -> list[str]:
    """One problem per requested logger whose package is not installed (checked without importing it)."""
    return [
        f"report_to={name} needs the {_PACKAGES[name]} package, which is not installed: "
        f"pip install 'deltatune[logging]'"
        for name in report_to
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None
    ]


class ScalarLoggers:
    """Every logger a run reports to; `log` and `close` go to each. With none it does nothing."""

    def __init__(self, loggers: list) -> None:
        self.loggers = loggers

    def log(self, scalars: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(scalars, step)

    def close(self, failed: bool = False) -> None:
        """Flush and close each logger; `failed`: the run ended by an error (MLflow marks the run FAILED)."""
        loggers, self.loggers = self.loggers, []  # closing twice (a paused search's loser, then finish) is a no-op
        for logger in loggers:
            logger.close(failed)


class TensorBoardLogger:
    """Scalars as TensorBoard events in `directory` (torch's `SummaryWriter`)."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, float(value), global_step=step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowLogger:
    """Scalars as the metrics of one MLflow run in a local file store (`file:` URI: no server, no network)."""

    def __init__(self, store: Path, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        # MLflow 3 keeps its file store only behind this switch (it prefers a database); a plain directory
        # needs no server and no migrations, and a user's own setting of the switch wins
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=store.resolve().as_uri())
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(MLFLOW_EXPERIMENT)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, step) for name, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def open_loggers(report_to: tuple[str, ...], log_dir: str | Path | None, run_name: str) -> ScalarLoggers:
    """The loggers `report_to` names, writing under `log_dir` (default `runs/logs`) for the run `run_name`."""
    if not report_to:
        return ScalarLoggers([])
    problems = missing_logger_packages(report_to)
    unknown = [name for name in report_to if name not in LOGGERS]
    if unknown:
        problems.append(f"report_to={','.join(unknown)} is not a logger; choose from {', '.join(LOGGERS)}")
    if problems:
        raise DeltatuneError("; ".join(problems))
    root = Path(log_dir or DEFAULT_LOG_DIR)
    # runs of the same name (a re-run) must not write into one another's TensorBoard directory
    name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    loggers: list = []
    try:
        for logger in dict.fromkeys(report_to):
            loggers.append(
                TensorBoardLogger(root / "tensorboard" / name)
                if logger == "tensorboard"
                else MLflowLogger(root / "mlruns", name)
            )
    except OSError as error:
        ScalarLoggers(loggers).close()
        raise DeltatuneError(
            f"Cannot write training logs under {root}: {error.strerror or error}. Give a --log-dir you can write to."
        ) from None
    return ScalarLoggers(loggers)
