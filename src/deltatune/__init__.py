"""deltatune: adapt pretrained language models cheaply, ship each task as a tiny delta, and
find out which way of adapting is best.

    import deltatune
    record = deltatune.train("minilm-l6", task="stsb", method="bitfit", out="runs/stsb-bitfit", epochs=3)
    tuned = deltatune.load("runs/stsb-bitfit")
    tuned.predict("A man is playing a guitar.", "A person plays an instrument.")
    tuned.evaluate("test")
    served = deltatune.load_many(["runs/stsb-bitfit", "runs/spam-lora"])   # one base, many tasks
    served.predict([("A man plays.", "A person plays."), "WIN a prize now"], task=["stsb", "sms-spam"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltatune.errors import DeltatuneError
from deltatune.version import __version__

if TYPE_CHECKING:
    from pathlib import Path

    from deltatune.records import RunRecord


def train(
    model: str = "minilm-l6",
    *,
    task: str | None = None,
    method: str = "full",
    out: str | None = None,
    method_options: dict | None = None,
    source: str = "auto",
    data: dict | None = None,
    overwrite: bool = False,
    say=None,
    **train_options,
) -> RunRecord | None:
    """Train `method` on `model` for a catalog `task` (or your own `data`, see `deltatune.data_record`).

    `train_options` are `TrainConfig` fields (epochs=3, learning_rate=1e-3, lr_search="auto", head="bi-encoder",
    ...). `say` (e.g. `print`) hears how a learning-rate search goes. Returns the run record
    (`deltatune.records.RunRecord`; None on the ranks other than 0 of a multi-process run); with `out` the
    delta and record are saved there.
    """
    from deltatune.config import build_config
    from deltatune.run import data_record, run_training
    from deltatune.training import TrainConfig

    _check_train_arguments(model, task, method, out, method_options, source, data, overwrite)
    config = build_config(TrainConfig, train_options)
    if data is None:
        assert task is not None  # _check_train_arguments demands exactly one of task and data
        data = data_record(task, source=source)
    return run_training(str(model), data, method, method_options, config, out=out, overwrite=overwrite, say=say)


def _check_train_arguments(model, task, method, out, method_options, source, data, overwrite) -> None:
    """Wrong types at the public boundary get one clear error instead of a TypeError from deep inside."""
    import os

    def shown(value) -> str:
        return f"{type(value).__name__} {value!r:.80}"

    problems = []
    if not isinstance(model, (str, os.PathLike)):
        problems.append(f"model must be an alias, a directory or a hub id (text), got {shown(model)}")
    if (task is None) == (data is None):
        problems.append("pass exactly one of task= (a catalog task name) or data= (see deltatune.data_record)")
    if task is not None and not isinstance(task, str):
        problems.append(f"task must be a catalog task name such as 'stsb', got {shown(task)}")
    if data is not None and (not isinstance(data, dict) or data.get("kind") not in ("local", "catalog")):
        problems.append(f"data must be what deltatune.data_record(...) returns, got {shown(data)}")
    if not isinstance(method, str):
        problems.append(f"method must be a method name such as 'lora', got {shown(method)}")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        problems.append(f"out must be a directory path, got {shown(out)}")
    if method_options is not None and (
        not isinstance(method_options, dict) or not all(isinstance(key, str) for key in method_options)
    ):
        problems.append(
            f"method_options must be a dict of option names to values, e.g. {{'r': 8}}, got {shown(method_options)}"
        )
    if not isinstance(source, str):
        problems.append(f"source must be 'auto', 'mirror' or 'hub', got {shown(source)}")
    if not isinstance(overwrite, bool):
        problems.append(f"overwrite must be True or False, got {shown(overwrite)}")
    if problems:
        raise DeltatuneError("deltatune.train(): " + "; ".join(problems) + ".")


def load(directory: str | Path, base: str | None = None):
    """A saved delta applied to its base model: `.predict(...)`, `.evaluate(split)`."""
    from deltatune.delta import load as load_delta

    return load_delta(directory, base=base)


def load_many(run_dirs, names=None, base: str | None = None, batch_invariant: bool = True):
    """Many saved deltas on one base model, loaded once: `.predict(inputs, task=...)` with one task per input
    or for all, `.evaluate(task, split)`, `.attach(run_dir)` / `.detach(name)` (see `deltatune.serve`).
    `batch_invariant` (default on): an input's answer does not depend on the inputs batched with it (see
    `MultiTaskModel.batch_invariant`)."""
    from deltatune.serve.multi import load_many as load_deltas

    return load_deltas(run_dirs, names=names, base=base, batch_invariant=batch_invariant)


def data_record(name: str, *, source: str = "auto", local: dict | None = None) -> dict:
    """Describe training data: a catalog task, or `local={'path': ..., 'text_fields': [...], ...}`."""
    from deltatune.run import data_record as make

    return make(name, source=source, local=local)


__all__ = ["DeltatuneError", "train", "load", "load_many", "data_record", "__version__"]
